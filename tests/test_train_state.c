/* train_state.json (src/train/state_json.c): a hand-written file parses to
 * exactly its values; the writer's text parses back to the same state; each
 * kind of hostile input is refused with a message naming the file and the key
 * (the full set of rejections is replayed from tests/data/fuzz/train_state/). */
#include "test.h"

#include "train/state_json.h"

#include <string.h>

static const char *GOOD =
    "{\"step\": 20, \"tokens\": 2560, \"skipped_steps\": 1, \"loss_spikes\": 3, \"extra\": {\"ignored\": [1]},"
    " \"command\": \"moe train --steps 20\", \"data\": \"/srv/brown\", \"train\": [[1, 5.5], [2, -0.0], [3, 1e-310]], \"val\": []}";

TEST(train_state_parses_exact_values_and_round_trips) {
    moe__train_state s, s2;
    char err[256];
    int rc = moe__train_state_parse(GOOD, strlen(GOOD), "ts.json", &s, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(s.step, 20);
    CHECK(s.tokens == 2560.0);
    CHECK_EQ_INT(s.skipped_steps, 1);
    CHECK_EQ_INT(s.loss_spikes, 3);
    CHECK(s.command && !strcmp(s.command, "moe train --steps 20"));
    CHECK(s.data && !strcmp(s.data, "/srv/brown"));
    CHECK_EQ_INT(s.train.n, 3);
    CHECK_EQ_INT(s.val.n, 0);
    if (s.train.n == 3) {
        CHECK(s.train.step[0] == 1 && s.train.val[0] == 5.5 && s.train.step[2] == 3);
        CHECK(s.train.val[1] == 0 && !signbit(s.train.val[1])); /* -0 becomes 0: JSON writes it so */
        CHECK(s.train.val[2] == 1e-310);                         /* a subnormal, exactly */
    }
    char *js = moe__train_state_json(&s);
    CHECK(js != NULL);
    rc = js ? moe__train_state_parse(js, strlen(js), "back", &s2, err, sizeof err) : -1;
    CHECK_MSG(rc == 0, "%s", err);
    if (!rc) {
        CHECK(s2.step == 20 && s2.tokens == 2560 && s2.skipped_steps == 1 && s2.loss_spikes == 3);
        CHECK(s2.command && !strcmp(s2.command, s.command));
        CHECK(s2.data && !strcmp(s2.data, s.data));
        CHECK(s2.train.n == 3 && !memcmp(s2.train.val, s.train.val, 3 * sizeof(double)));
        moe__train_state_free(&s2);
    }
    moe__free(js);
    /* a NaN loss is left out of the file rather than written as null */
    s.train.val[1] = NAN;
    js = moe__train_state_json(&s);
    CHECK(js && moe__train_state_parse(js, strlen(js), "nan", &s2, err, sizeof err) == 0 && s2.train.n == 2);
    moe__train_state_free(&s2);
    moe__free(js);
    moe__train_state_free(&s);
    CHECK(s.command == NULL && s.train.n == 0);
}

TEST(train_state_rejections_name_the_file_and_key) {
    static const struct {
        const char *text, *want;
        int rc;
    } cases[] = {
        {"{\"tokens\": 0, \"train\": [], \"val\": []}", "\"step\" is missing", MOE_EFORMAT},
        {"{\"step\": 2147483648, \"tokens\": 0, \"train\": [], \"val\": []}", "\"step\" must be an integer",
         MOE_EFORMAT},
        {"{\"step\": 1, \"tokens\": 1e400, \"train\": [], \"val\": []}", "\"tokens\" must be an integer", MOE_EFORMAT},
        {"{\"step\": 1, \"step\": 1, \"tokens\": 0, \"train\": [], \"val\": []}", "\"step\" appears twice",
         MOE_EFORMAT},
        {"{\"step\": 1, \"tokens\": 0, \"train\": [[1, 2], [2, null]], \"val\": []}", "\"train\"[1] must be a pair",
         MOE_EFORMAT},
        {"{\"step\": 1, \"tokens\": 0, \"train\": [], \"val\": {}}", "\"val\" must be an array", MOE_EFORMAT},
        {"{\"step\": 1, \"tokens\": 0, \"command\": [], \"train\": [], \"val\": []}", "\"command\" must be a string",
         MOE_EFORMAT},
        {"{\"step\": 1, \"tokens\": 0, \"data\": 7, \"train\": [], \"val\": []}", "\"data\" must be a string",
         MOE_EFORMAT},
        {"[]", "top level must be a JSON object", MOE_EFORMAT},
        {"{\"step\": 1,", "not valid JSON", MOE_EFORMAT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe__train_state s;
        char err[256] = "";
        int rc = moe__train_state_parse(cases[i].text, strlen(cases[i].text), "ts.json", &s, err, sizeof err);
        CHECK_MSG(rc == cases[i].rc, "case %zu: rc %d (%s)", i, rc, err);
        CHECK_MSG(!strncmp(err, "ts.json: ", 9) && strstr(err, cases[i].want), "case %zu: %s", i, err);
        CHECK(s.command == NULL && s.data == NULL && s.train.step == NULL && s.val.step == NULL); /* nothing left to free */
    }
    /* the size cap is checked before any parsing */
    moe__train_state s;
    char err[256];
    CHECK_EQ_INT(moe__train_state_parse("{}", MOE__TRAIN_STATE_MAX_BYTES + 1, "big", &s, err, sizeof err),
                 MOE_ELIMIT);
}
