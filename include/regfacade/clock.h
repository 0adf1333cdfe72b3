/*
 * clock: the monotonic time every timeout, TTL and budget is measured in
 * (never the wall clock, which jumps).
 */
#ifndef REGFACADE_CLOCK_H
#define REGFACADE_CLOCK_H

#include <stdint.h>

/* CLOCK_MONOTONIC in milliseconds. */
int64_t clock_monotonic_ms(void);

#endif
