/*
 * scrub: the background check of cached bytes. A thread walks the cache's
 * blobs, least recently used first, and hashes each one again
 * (store_blob_verify) at no more than cache.scrub_bytes_per_second; a blob
 * whose bytes are wrong is quarantined by the store (logged with its digest
 * and reason, counted in regfacade_cache_quarantined_total) and fetched
 * again when next asked for. A pass that ends starts the next one after a
 * second. This catches what the checks on open cannot see: bytes that
 * changed on disk without a write through the filesystem (bit rot, a
 * faulty disk), in files served by sendfile, whose bytes never pass
 * through user space.
 */
#ifndef REGFACADE_SCRUB_H
#define REGFACADE_SCRUB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "regfacade/store.h"

typedef struct scrub scrub;

/* Start the thread; bytes_per_second 0 keeps it idle until scrub_set_rate.
 * NULL with err on failure. */
scrub *scrub_start(store *st, uint64_t bytes_per_second, char *err, size_t errlen);
/* A reload's rate, from the next MiB on (0: pause). */
void scrub_set_rate(scrub *sc, uint64_t bytes_per_second);
/* Stop the thread (promptly, also in the middle of a blob) and free. NULL is fine. */
void scrub_stop(scrub *sc);

/* Every cached blob checked at once, unpaced (`regfacade cache verify`,
 * the admin API's POST /cache/verify). */
typedef struct {
    char digest[80];
    char reason[400];
    bool quarantined; /* false: it could not be read (left as it was) */
} scrub_failure;
typedef struct {
    size_t checked;        /* blobs hashed */
    uint64_t bytes;        /* their bytes */
    scrub_failure *failed; /* quarantined or unreadable ones */
    size_t n_failed;
} scrub_report;
/* 0 with *out filled (free with scrub_report_clear); -1 out of memory. */
int scrub_verify_all(store *st, scrub_report *out);
void scrub_report_clear(scrub_report *r);
/* {"checked":N,"bytes":B,"failed":[{"digest","reason","quarantined"}]}, malloc'd. */
char *scrub_report_json(const scrub_report *r, size_t *len);

#endif
