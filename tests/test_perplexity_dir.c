/* `moe perplexity -m DIR -f TEXT` on a directory `moe train` wrote: the text
 * is tokenized with the run's own tokenizer (tokenizer.json), each chunk
 * starts with its end-of-text id, and the printed estimate is the engine's
 * perplexity of those ids computed here through the library. Needs build/moe
 * and the Brown corpus (4 files of it are the training data, one the text). */
#include "test.h"

#include "internal.h"
#include "io/atomic.h"
#include "tokenizer/tokenizer.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int run(const char *log, char *const argv[]) {
    const pid_t pid = fork();
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0666);
        if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
        execv(argv[0], argv);
        _exit(127);
    }
    int status;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

TEST(perplexity_cli_on_a_train_directory) {
    const char *brown = moe_test_brown_dir();
    char text[512], base[64], corpus[128], dir[128], log[128];
    snprintf(text, sizeof text, "%s/ca01", brown);
    if (access("build/moe", X_OK) != 0 || access(text, R_OK) != 0) {
        moe_test_skip("needs build/moe and the Brown corpus in data/brown");
        return;
    }
    if (!moe_test_tmpdir(base, "ppldir")) return;
    snprintf(corpus, sizeof corpus, "%s/corpus", base);
    snprintf(dir, sizeof dir, "%s/run", base);
    snprintf(log, sizeof log, "%s/log", base);
    CHECK(moe_test_brown_subset(corpus) == 0);
    char *train[] = {"build/moe", "train", "--preset", "tiny", "--data", corpus, "--out", dir, "--steps", "2",
                     "--batch", "2", "--seq", "32", "--threads", "1", "--eval-every", "0", "--quiet", NULL};
    CHECK_EQ_INT(run(log, train), 0);
    char *ppl[] = {"build/moe", "perplexity", "-m", dir, "-f", text, "-c", "32", "--chunks", "6", "-t", "1", NULL};
    CHECK_EQ_INT(run(log, ppl), 0);
    char *out = NULL, err[512];
    size_t n = 0;
    double printed = -1;
    if (moe__read_file(log, 1 << 20, &out, &n, err, sizeof err) == 0) {
        const char *p = strstr(out, "Final estimate: PPL = ");
        if (p) printed = atof(p + strlen("Final estimate: PPL = "));
    }
    moe__free(out);
    CHECK_MSG(printed > 1, "no estimate in the output");
    /* the same through the library: the run's tokenizer, the engine */
    char tpath[256];
    snprintf(tpath, sizeof tpath, "%s/tokenizer.json", dir);
    moe_tokenizer *tok = NULL;
    CHECK_EQ_INT(moe_tokenizer_load(tpath, &tok, err, sizeof err), 0);
    char *txt = NULL;
    size_t len = 0, nid = 0;
    CHECK_EQ_INT(moe__read_file(text, 1 << 24, &txt, &len, err, sizeof err), 0);
    int32_t *ids = malloc(sizeof(int32_t) * (len + 1));
    if (tok && txt && ids) {
        CHECK_EQ_INT(moe_tokenizer_encode(tok, txt, len, ids, len + 1, &nid), 0);
        moe_engine_params p = moe_engine_params_default();
        p.n_ctx = 32, p.n_threads = 1;
        moe_engine *e = NULL;
        CHECK_EQ_INT(moe_engine_load(dir, &p, &e, err, sizeof err), 0);
        double want = 0, se = 0;
        if (e) CHECK_EQ_INT(moe_engine_perplexity(e, ids, 6 * 32, 32, moe_tokenizer_eos(tok), &want, &se, NULL, NULL), 0);
        /* printed with 4 decimals, by build/moe (-O3) while this test may be the
         * sanitizer build (-O1): the same operations, but the compilers may
         * contract and order a few float ops differently, so agree to 1e-7
         * relative (a token or chunk off moves it by far more) */
        CHECK_MSG(fabs(printed - want) <= 1e-4 + 1e-7 * want,
                  "moe perplexity printed %.4f, the engine on the run's tokens gives %.4f", printed, want);
        moe_engine_free(e);
    }
    free(ids);
    moe__free(txt);
    moe_tokenizer_free(tok);
    moe_test_rmdir(base);
}
