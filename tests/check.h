/*
 * check.h — the tiny shared test harness. A test file defines static
 * void functions and runs them with RUN_TEST(fn) from main(), then returns
 * TEST_EXIT(). Each test prints one line, "PASS name", "FAIL name" or
 * "SKIP name: why", which tests/run.sh counts; a failed CHECK prints both
 * values and where it was.
 */
#ifndef KILN_CHECK_H
#define KILN_CHECK_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check_fails_;       /* failures inside the current test */
static int check_total_fails_; /* failed tests in this program */
static const char *check_skip_;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__,        \
                    __LINE__, #cond);                                      \
            check_fails_++;                                                \
        }                                                                  \
    } while (0)

#define CHECK_MSG(cond, ...)                                               \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "  %s:%d: CHECK(%s) failed: ", __FILE__,        \
                    __LINE__, #cond);                                      \
            fprintf(stderr, __VA_ARGS__);                                  \
            fputc('\n', stderr);                                           \
            check_fails_++;                                                \
        }                                                                  \
    } while (0)

#define CHECK_EQ(a, b)                                                     \
    do {                                                                   \
        long long ca_ = (long long)(a), cb_ = (long long)(b);              \
        if (ca_ != cb_) {                                                  \
            fprintf(stderr, "  %s:%d: CHECK_EQ(%s, %s) failed: %lld != %lld\n", \
                    __FILE__, __LINE__, #a, #b, ca_, cb_);                 \
            check_fails_++;                                                \
        }                                                                  \
    } while (0)

#define CHECK_STREQ(a, b)                                                  \
    do {                                                                   \
        const char *ca_ = (a), *cb_ = (b);                                 \
        if (!ca_ || !cb_ || strcmp(ca_, cb_) != 0) {                       \
            fprintf(stderr, "  %s:%d: CHECK_STREQ(%s, %s) failed: \"%s\" != \"%s\"\n", \
                    __FILE__, __LINE__, #a, #b, ca_ ? ca_ : "(null)",      \
                    cb_ ? cb_ : "(null)");                                 \
            check_fails_++;                                                \
        }                                                                  \
    } while (0)

/* |a - b| <= tol * max(1, |a|, |b|): relative for large values, absolute
 * near zero. */
#define CHECK_NEAR(a, b, tol)                                              \
    do {                                                                   \
        double ca_ = (double)(a), cb_ = (double)(b);                       \
        double sc_ = fmax(1.0, fmax(fabs(ca_), fabs(cb_)));                \
        if (!(fabs(ca_ - cb_) <= (tol) * sc_)) {                           \
            fprintf(stderr, "  %s:%d: CHECK_NEAR(%s, %s, %g) failed: %.9g vs %.9g\n", \
                    __FILE__, __LINE__, #a, #b, (double)(tol), ca_, cb_);  \
            check_fails_++;                                                \
        }                                                                  \
    } while (0)

/* |a - b| <= rtol * max(|a|, |b|): purely relative (for a tolerance that
 * already scales with the value, which CHECK_NEAR would scale again).
 * A NaN on either side fails. */
#define CHECK_REL(a, b, rtol)                                              \
    do {                                                                   \
        double ca_ = (double)(a), cb_ = (double)(b);                       \
        double sc_ = fmax(fabs(ca_), fabs(cb_));                           \
        if (!(fabs(ca_ - cb_) <= (rtol) * sc_)) {                          \
            fprintf(stderr, "  %s:%d: CHECK_REL(%s, %s, %g) failed: %.12g vs %.12g\n", \
                    __FILE__, __LINE__, #a, #b, (double)(rtol), ca_, cb_); \
            check_fails_++;                                                \
        }                                                                  \
    } while (0)

/* Marks the current test skipped (with the reason) and returns. */
#define SKIP(why)                                                          \
    do {                                                                   \
        check_skip_ = (why);                                               \
        return;                                                            \
    } while (0)

#define RUN_TEST(fn)                                                       \
    do {                                                                   \
        check_fails_ = 0;                                                  \
        check_skip_ = NULL;                                                \
        fn();                                                              \
        if (check_fails_) {                                                \
            printf("FAIL %s\n", #fn);                                      \
            check_total_fails_++;                                          \
        } else if (check_skip_) {                                          \
            printf("SKIP %s: %s\n", #fn, check_skip_);                     \
        } else {                                                           \
            printf("PASS %s\n", #fn);                                      \
        }                                                                  \
        fflush(stdout);                                                    \
    } while (0)

/* max(w, e) that keeps a NaN on either side (fmax drops it): error and
 * scale accumulators built with it fail every comparison after a NaN. */
static inline double check_max(double w, double e)
{
    return (w != w || e != e) ? NAN : (w > e ? w : e);
}

/* Largest |a - b| over n values (inf if a NaN is on either side: fmax
 * would drop it); *scale receives max(1, max |b|), the scale a relative
 * tolerance multiplies. */
static inline double check_maxdiff(const float *a, const float *b, size_t n, double *scale)
{
    double d = 0, s = 1;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs(b[i]));
        if (a[i] != a[i] || b[i] != b[i]) d = INFINITY;
    }
    *scale = s;
    return d;
}

#define TEST_EXIT() (check_total_fails_ ? 1 : 0)

#endif /* KILN_CHECK_H */
