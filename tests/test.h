/* Minimal test harness: TEST(name) { ... } registers itself; CHECK* record
 * failures and keep going; the runner prints "N passed, N failed". */
#ifndef MOE_TEST_H
#define MOE_TEST_H

#include <math.h>
#include <stdio.h>

typedef void (*moe_test_fn)(void);
void moe_test_register(const char *name, const char *file, moe_test_fn fn);
void moe_test_fail(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Directory of committed fixtures (tests/data), overridable by MOE_TEST_DATA. */
const char *moe_test_data_dir(void);
/* A fresh directory /tmp/moe_<tag>_XXXXXX in buf (>= 64 bytes), or NULL. */
char *moe_test_tmpdir(char *buf, const char *tag);
/* Entries of a directory (without . and ..), -1 when it cannot be read. */
int moe_test_count_entries(const char *dir);
/* Removes a directory and everything below it. */
void moe_test_rmdir(const char *dir);
/* The Brown corpus of the tests: MOE_BROWN_DIR when set and not empty,
 * else data/brown. */
const char *moe_test_brown_dir(void);
/* A small corpus in dst (created): links to its first 4 files, ca01..ca04
 * (training and validation splits). 0, or -1 when it cannot be made. */
int moe_test_brown_subset(const char *dst);
/* Marks the current test as skipped (e.g. an optional file is absent). */
void moe_test_skip(const char *why);

#define TEST(name)                                                              \
    static void name(void);                                                     \
    __attribute__((constructor)) static void name##_register(void) {            \
        moe_test_register(#name, __FILE__, name);                               \
    }                                                                           \
    static void name(void)

#define CHECK(cond)                                                             \
    do {                                                                        \
        if (!(cond)) moe_test_fail(__FILE__, __LINE__, "CHECK(%s)", #cond);     \
    } while (0)

#define CHECK_MSG(cond, ...)                                                    \
    do {                                                                        \
        if (!(cond)) moe_test_fail(__FILE__, __LINE__, __VA_ARGS__);           \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                      \
    do {                                                                        \
        long long a_ = (long long)(a), b_ = (long long)(b);                     \
        if (a_ != b_)                                                           \
            moe_test_fail(__FILE__, __LINE__, "%s == %s: %lld != %lld", #a, #b, \
                          a_, b_);                                              \
    } while (0)

/* |a-b| <= atol + rtol*|b| */
#define CHECK_CLOSE(a, b, atol, rtol)                                           \
    do {                                                                        \
        double a_ = (double)(a), b_ = (double)(b);                              \
        if (!(fabs(a_ - b_) <= (atol) + (rtol)*fabs(b_)))                       \
            moe_test_fail(__FILE__, __LINE__, "%s ~ %s: %.9g vs %.9g", #a, #b,  \
                          a_, b_);                                              \
    } while (0)

#endif
