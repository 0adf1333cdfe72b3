/*
 * fetch: one upstream transfer per blob digest, shared by every client that
 * wants it (single flight).
 *
 * The first client of a cold blob starts a fetch: a thread GETs the blob
 * from the upstream into a spool file (through a spool_writer, which
 * writes and hashes in 256 KiB chunks on threads of its own), and retries a
 * broken transfer with "Range: bytes=N-" from where it stopped. Every
 * client, the first included, reads the spool as it grows, so the first
 * byte goes out before the transfer ends and nothing is held whole in
 * memory. The fetch goes on when a client disconnects. Only when the digest
 * is verified does the spool become the cached blob; the last byte of the
 * blob is released to readers only then, so a client never receives a
 * whole wrong body.
 */
#ifndef REGFACADE_FETCH_H
#define REGFACADE_FETCH_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "regfacade/store.h"
#include "regfacade/upstream.h"

typedef struct fetcher fetcher;
typedef struct fetch fetch;

/* Why a fetch failed, ready for an OCI error answer. */
typedef struct {
    int http_status;  /* 404, 429, 502, 503, 504, 403 */
    const char *code; /* OCI error code: BLOB_UNKNOWN, DIGEST_INVALID, ... */
    char retry_after[64];
    char challenge[512]; /* WWW-Authenticate of a policy's refusal (rewrite), "" none */
    char message[1024];
} fetch_error;

/* A broken transfer is retried, resumed with Range, paced by the
 * upstream's retry settings (upstream_retry_delay: backoff with jitter,
 * Retry-After, retries and budget; an attempt that brought at least 1 MiB
 * restarts the count and the budget, a trickle does not). */
#define FETCH_DEFAULT_MAX_CONCURRENT 64
#define FETCH_DEFAULT_BLOB_MAX_BYTES (10ULL * 1024 * 1024 * 1024)
typedef struct {
    unsigned max_concurrent; /* transfers at once (upstream_client.max_concurrent_fetches); more wait for a
                                slot, they do not fail; 0: FETCH_DEFAULT_MAX_CONCURRENT */
    uint64_t blob_max_bytes; /* largest blob fetched without a descriptor (limits.blob_max_bytes); 0:
                                FETCH_DEFAULT_BLOB_MAX_BYTES */
} fetch_options;

fetcher *fetcher_new(store *s, const fetch_options *opts);
/* Waits for running fetches to finish. */
void fetcher_free(fetcher *f);
/* A reload's limits.blob_max_bytes, for fetches started from now on. */
void fetcher_set_blob_max_bytes(fetcher *f, uint64_t max);

/* The link scope (store.h) of repository on u's account: upstream name,
 * URL and user name (never the secret); anonymous is an account too. */
void fetch_scope(store_scope *out, const upstream *u, const char *repository);

/* Does a link say digest is a blob of (u, repository) (or everyone's,
 * store.h)? Never asks the upstream. */
bool fetch_blob_linked(fetcher *f, const upstream *u, const char *repository, const char *digest);

/* Is digest a blob of (u, repository)? 1 when a link says so (there, or to
 * everyone: store.h; no upstream request; *size -1) or the upstream answers a HEAD with 200 (linked then;
 * *size its Content-Length, -1 when absent); -1 with e filled otherwise:
 * 404 BLOB_UNKNOWN when the upstream does not have it there, 403 DENIED
 * when it refuses the account, 429/502/504 when it fails. */
int fetch_blob_known(fetcher *f, upstream *u, const char *repository, const char *digest, int64_t *size,
                     fetch_error *e);

/* The fetch of digest from (u, repository): the running one, or a new one.
 * Fetches are shared by digest: a caller serving the blob under a scope
 * makes sure it belongs there (a link, fetch_blob_known), or that the fetch
 * is its own (fetch_source_is: the GET from there is the check); a
 * verified fetch links the digest to the (u, repository) it came from.
 * Returns a reference (release with fetch_release). Returns NULL with
 * *now_cached set when the blob reached the cache meanwhile (open it from
 * the store), or NULL with err set on allocation or thread failure.
 *
 * want_size: the size a descriptor gave the blob (a manifest's layer or
 * config), -1 when the request has none (a client's GET by digest). An
 * answer whose announced size differs from want_size, or exceeds
 * blob_max_bytes when there is no want_size, is refused before a byte is
 * written or reserved (502, not retried); a body without a length is cut
 * at that size. A request that joins a running fetch shares its rule. */
fetch *fetch_blob(fetcher *f, upstream *u, const char *repository, const char *digest, int64_t want_size,
                  int *now_cached, char *err, size_t errlen);
/* Does x fetch from repository with u's account (fetch_scope)? A request
 * that joins a fetch from elsewhere checks its own repository first. */
bool fetch_source_is(const fetch *x, const upstream *u, const char *repository);

/* Block until the upstream answered. 0: *size set (the blob's full size,
 * -1 if the upstream did not say); -1: failed, e filled. */
int fetch_wait_ready(fetch *x, int64_t *size, fetch_error *e);
/* Block until the fetch ended. 0: verified and cached; -1: failed, e set. */
int fetch_wait_done(fetch *x, fetch_error *e);

/* Read up to len bytes at offset off of the range that ends (exclusive)
 * at end, blocking until they arrive. The range's last byte is released
 * only once the whole blob's digest is verified, so a reader never gets a
 * complete range of a wrong blob; FETCH_READ_ALL reads to the blob's end.
 * > 0: bytes read; 0: end of the range (verified blob); -1: the fetch failed. */
#define FETCH_READ_ALL UINT64_MAX
ssize_t fetch_read(fetch *x, uint64_t off, uint64_t end, void *buf, size_t len);

void fetch_release(fetch *x);

/* A small blob (an image config) whole in memory: from the store, or
 * fetched (single flight, verified, cached) and then read. want_size: the
 * descriptor's size (see fetch_blob), refused over max. 0 with *data
 * malloc'd (caller frees); -1 with e filled. */
int fetch_blob_bytes(fetcher *f, upstream *u, const char *repository, const char *digest, int64_t want_size, size_t max,
                     char **data, size_t *len, fetch_error *e);

/* Fill e (status, code, printf-style message; retry_after, challenge cleared). The
 * one constructor of fetch errors, used by every module that returns one. */
void fetch_error_set(fetch_error *e, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* e = from (status, code, Retry-After) with the message "PREFIX: message"
 * (say where it happened); e may be from. */
void fetch_error_wrap(fetch_error *e, const fetch_error *from, const char *prefix);

/* Counters for metrics and tests. */
typedef struct {
    unsigned long started;   /* upstream fetches started */
    unsigned long coalesced; /* requests that joined a running fetch */
    unsigned long failed;
    unsigned max_active; /* most transfers that were in progress at once */
    unsigned active;     /* transfers in progress now */
    unsigned queued;     /* fetches waiting for a transfer slot now */
    unsigned waiters;    /* client requests attached to running fetches now */
} fetch_stats;
void fetcher_stats(fetcher *f, fetch_stats *out);

#endif
