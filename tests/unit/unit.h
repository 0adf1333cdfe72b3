/*
 * unit: the smallest test harness that reports well. Each test file is one
 * program: CHECK records a failure with file:line and goes on; main() ends
 * with UNIT_DONE(), which prints "unit NAME: N passed, M failed" and returns
 * non-zero when anything failed.
 */
#ifndef REGFACADE_UNIT_H
#define REGFACADE_UNIT_H

#include <stdio.h>
#include <string.h>

static int unit_passed, unit_failed;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (cond) {                                                                  \
            unit_passed++;                                                           \
        } else {                                                                     \
            unit_failed++;                                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

#define CHECK_STR(a, b)                                                                                           \
    do {                                                                                                          \
        const char *unit_a_ = (a), *unit_b_ = (b);                                                                \
        if (unit_a_ && unit_b_ && strcmp(unit_a_, unit_b_) == 0) {                                                \
            unit_passed++;                                                                                        \
        } else {                                                                                                  \
            unit_failed++;                                                                                        \
            fprintf(stderr, "%s:%d: CHECK_STR failed: %s == %s (\"%s\" vs \"%s\")\n", __FILE__, __LINE__, #a, #b, \
                    unit_a_ ? unit_a_ : "(null)", unit_b_ ? unit_b_ : "(null)");                                  \
        }                                                                                                         \
    } while (0)

#define UNIT_DONE(name) \
    (printf("unit %s: %d passed, %d failed\n", (name), unit_passed, unit_failed), unit_failed ? 1 : 0)

#endif
