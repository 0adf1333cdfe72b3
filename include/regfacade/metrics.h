/*
 * metrics: process-wide counters, gauges and histograms in the Prometheus
 * text format, the health checks (/healthz, /readyz), the per-request
 * access record behind the JSON access log, and the second HTTP listener
 * that serves /metrics, /healthz and /readyz on its own address.
 *
 * Every recording function is thread-safe and cheap (relaxed atomics; a
 * mutex only the first time a new upstream or hook name is seen), callable
 * from any module without a handle. Label sets are fixed (routes, sources,
 * hooks) or bounded (at most METRICS_MAX_UPSTREAMS upstream names; later
 * ones are folded into "other").
 *
 * Config section (config.c keeps it raw in config->metrics):
 *   "metrics": { "listen": "127.0.0.1:9090", "access_log": true }
 * Without the section there is no metrics listener (the counters still run
 * and /healthz, /readyz still answer on the main listener).
 * Names, labels and semantics are documented in docs/observability.md.
 */
#ifndef REGFACADE_METRICS_H
#define REGFACADE_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "regfacade/json.h"

struct MHD_Connection;
struct fetcher;

#define METRICS_MAX_UPSTREAMS 32

/* ---------- config ---------- */

typedef struct {
    bool enabled;              /* the section is present: run the metrics listener */
    char listen_host[64];      /* "127.0.0.1" (IPv4, or IPv6 given as "[::1]:9090") */
    int listen_port;           /* 9090 */
    bool access_log;           /* one JSON line per request on stderr; default true */
    unsigned header_timeout_s; /* not from the section: limits.header_timeout_seconds, set by the caller */
} metrics_config;

/* Validate the raw "metrics" section (NULL: absent, defaults apply). 0 on
 * success; -1 with "metrics.KEY: why" in err. */
int metrics_config_parse(const json_value *section, metrics_config *out, char *err, size_t errlen);

/* ---------- recording ---------- */

/* Where response bytes came from. */
typedef enum { METRICS_SRC_CACHE, METRICS_SRC_UPSTREAM, METRICS_SRC_GENERATED } metrics_source;

/* A blob or manifest lookup: kind is "manifest" or "blob". */
void metrics_cache_lookup(const char *kind, bool hit);
/* An object entered the cache (after its commit). */
void metrics_cache_put(uint64_t bytes);
/* An object left the cache by eviction (store.c's LRU calls this). */
void metrics_cache_evicted(uint64_t bytes);
/* A cached file failed verification and left the cache (store.c). */
void metrics_cache_quarantined(uint64_t bytes);
/* An object left the cache by cache rm (store_blob_remove). */
void metrics_cache_removed(uint64_t bytes);
/* Bytes of cached files hashed again to verify them. */
void metrics_cache_verified(uint64_t bytes);
/* Set the cache gauges from a scan of DIR/blobs (done once at start). */
void metrics_cache_scan(const char *cache_dir);

/* One upstream_perform() ended: status is the final HTTP status when
 * result_name is NULL (an answer arrived), else the transport failure's
 * short name ("connect", "timeout", ...). */
void metrics_upstream_request(const char *upstream, long status, const char *result_name);
/* A retry of a failed upstream transfer; what is "blob" or "manifest". */
void metrics_upstream_retry(const char *upstream, const char *what);
/* Docker Hub's ratelimit-remaining, last value seen per upstream. */
void metrics_upstream_ratelimit(const char *upstream, long remaining);

/* One policy hook call: hook is "authorize", "resolve", "rewrite", "spec" or "log";
 * outcome "ok", "refused", "error" or "budget" (killed by its time or
 * instruction budget). */
void metrics_policy_hook(const char *hook, double seconds, const char *outcome);

/* Fetch counters (fetch.h's fetcher_stats) are read at scrape time. */
void metrics_watch_fetcher(struct fetcher *f);

/* An upstream client exists for this name: its labelled series are shown
 * from now on, at 0 until their first event. */
void metrics_upstream_known(const char *upstream);
/* Body bytes received from an upstream, counted as they arrive. */
void metrics_upstream_bytes(const char *upstream, uint64_t bytes);

/* A SIGHUP reload ended: ok (a new configuration generation serves) or
 * rejected (the old one keeps serving). */
void metrics_reload(bool ok);

/* ---------- collectors: series other modules render at scrape time ---------- */

/* What a collector writes into (the exposition being rendered). */
typedef struct metrics_writer metrics_writer;
typedef void (*metrics_collect_fn)(metrics_writer *w, void *ud);
/* Register fn(w, ud), called on every scrape until removed. 0, or -1 when
 * the table (16 collectors) is full. */
int metrics_add_collector(metrics_collect_fn fn, void *ud);
/* Remove it; once this returns, fn is not running and is not called again. */
void metrics_remove_collector(metrics_collect_fn fn, void *ud);
/* Write "# HELP" and "# TYPE" lines, then sample lines. */
void metrics_write_head(metrics_writer *w, const char *name, const char *type, const char *help);
void metrics_write(metrics_writer *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A label value with \, " and newline escaped, in tmp. */
const char *metrics_label(const char *s, char *tmp, size_t tmplen);

/* ---------- per-request access record (server.c) ---------- */

typedef struct {
    struct timespec start; /* CLOCK_MONOTONIC */
    char method[12];
    char path[512]; /* URL path, never the query string */
    char client_ip[48];
    char upstream[64]; /* "" until the policy picked one */
    const char *route; /* "ping", "manifest", "blob", "tags", "referrers", "health", "other" */
    unsigned status;   /* 0 until a response is queued */
    metrics_source source;
    uint64_t body_len; /* fixed-size body (bytes it will send when complete) */
    bool streaming;    /* the body is produced by a callback: count streamed */
    bool in_transfer;  /* counted in the client-transfers-in-flight gauge */
    uint64_t streamed; /* bytes the callback produced (already in the byte counters) */
} metrics_access;

/* A new record for a request that just arrived (NULL on allocation
 * failure). */
metrics_access *metrics_access_begin(struct MHD_Connection *conn, const char *method, const char *url);
/* Set what the response will send. */
void metrics_access_body(metrics_access *a, metrics_source src, uint64_t len, bool streaming);
/* A streaming body produced n more bytes: counted now, not at the end, so
 * a long transfer shows on /metrics while it runs. */
void metrics_access_streamed(metrics_access *a, uint64_t n);
/* The request ended (MHD's completion callback): count request and bytes,
 * write the access log line, free a. completed_ok: the whole response went
 * out. */
void metrics_access_end(metrics_access *a, bool completed_ok);
/* Turn the access log on or off (metrics.access_log). */
void metrics_set_access_log(bool on);

/* ---------- health ---------- */

/* Readiness callback: 0 ready (why, when not left empty, is a detail the
 * answer carries: ready but degraded); -1 with a reason. */
typedef int (*metrics_ready_fn)(void *ud, char *why, size_t whylen);

/* 0 when DIR/tmp accepts a new file (created and removed again); -1 with
 * why otherwise. */
int metrics_cache_writable(const char *cache_dir, char *why, size_t whylen);

/* The answer to a health path: returns the HTTP status (200 or 503; 0 when
 * path is neither /healthz nor /readyz) and writes a small JSON body. */
unsigned metrics_health_answer(const char *path, metrics_ready_fn ready, void *ud, char *body, size_t bodylen);

/* ---------- exposition and listener ---------- */

/* The whole exposition text (malloc'd, caller frees); NULL on allocation
 * failure. */
char *metrics_render(size_t *len);

typedef struct metrics_server metrics_server;

/* Start the metrics listener (cfg->enabled must be true). NULL with err. */
metrics_server *metrics_server_start(const metrics_config *cfg, metrics_ready_fn ready, void *ud, char *err,
                                     size_t errlen);
void metrics_server_stop(metrics_server *m);

#endif
