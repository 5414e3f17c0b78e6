/* Fuzz targets: one file per parser, fuzz/fuzz_<name>.c, whose body is
 *
 *     MOE_FUZZ_TARGET(name) { ...parse data[0..size)...; return rc; }
 *
 * returning the parser's code (0: accepted, < 0: rejected). The same file
 * builds three ways:
 *   - with -DMOE_FUZZ_LIBFUZZER (make fuzz-build, clang): the target becomes
 *     LLVMFuzzerTestOneInput of build/fuzz/fuzz_<name>;
 *   - otherwise (make test, make fuzz-replay, gcc): it registers itself by
 *     name, so tests/test_fuzz_regress.c replays the files under tests/data/fuzz/<name>/ and
 *     build/fuzz_replay runs any input through it.
 * Adding a parser's target is therefore one new file here, nothing else (the
 * Makefile globs fuzz/fuzz_*.c; seeds: fuzz/seed.c).
 *
 * A target must not abort on a rejected input, must free everything it got,
 * and may call moe_fuzz_trap() when an invariant of an accepted input fails
 * (e.g. a round trip), which the fuzzer reports as a crash. */
#ifndef MOE_FUZZ_H
#define MOE_FUZZ_H

#include <stddef.h>
#include <stdint.h>

typedef int (*moe_fuzz_fn)(const uint8_t *data, size_t size);

/* Registry of the non-libFuzzer builds (fuzz/common.c). */
void moe_fuzz_register(const char *name, moe_fuzz_fn fn);
int moe_fuzz_count(void);
const char *moe_fuzz_name(int i);
moe_fuzz_fn moe_fuzz_find(const char *name);

/* A per-process scratch directory (under /dev/shm when it exists, so that the
 * file-based parsers cost no disk I/O), created on first use, removed at exit. */
const char *moe_fuzz_tmpdir(void);
/* Writes size bytes to tmpdir/name; returns the path (static buffer per slot
 * 0..7) or NULL. */
const char *moe_fuzz_write(int slot, const char *name, const uint8_t *data, size_t size);
/* Targets whose input is several files join them with this separator. */
#define MOE_FUZZ_SEP "\n--moe-file--\n"
/* Splits data into n parts at the first n-1 separators: part[i], len[i];
 * missing parts are empty, the last part holds everything after the (n-1)-th
 * separator. One memmem per part: a byte-by-byte memcmp scan cost more than
 * the loaders did (each compare goes through ASan's and libFuzzer's
 * interceptors, about 60% of the checkpoint target's time). */
void moe_fuzz_split(const uint8_t *data, size_t size, int n, const uint8_t **part, size_t *len);
/* Aborts: an invariant of an accepted input failed. */
void moe_fuzz_trap(const char *what) __attribute__((noreturn));

#ifdef MOE_FUZZ_LIBFUZZER
#define MOE_FUZZ_TARGET(name)                                                  \
    static int fuzz_##name(const uint8_t *data, size_t size);                  \
    int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);              \
    int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {             \
        (void)fuzz_##name(data, size);                                         \
        return 0;                                                              \
    }                                                                          \
    static int fuzz_##name(const uint8_t *data, size_t size)
#else
#define MOE_FUZZ_TARGET(name)                                                  \
    static int fuzz_##name(const uint8_t *data, size_t size);                  \
    __attribute__((constructor)) static void fuzz_##name##_register(void) {    \
        moe_fuzz_register(#name, fuzz_##name);                                 \
    }                                                                          \
    static int fuzz_##name(const uint8_t *data, size_t size)
#endif

#endif
