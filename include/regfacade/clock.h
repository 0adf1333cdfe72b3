/*
 * clock: the monotonic time every timeout, TTL and budget is measured in
 * (never the wall clock, which jumps).
 */
#ifndef REGFACADE_CLOCK_H
#define REGFACADE_CLOCK_H

#include <stdint.h>
#include <time.h>

/* CLOCK_MONOTONIC in milliseconds. */
int64_t clock_monotonic_ms(void);

/* The time ms from now on clock clk, for pthread_cond_timedwait (whose
 * condition variable must use the same clock). */
struct timespec clock_deadline(clockid_t clk, int64_t ms);

#endif
