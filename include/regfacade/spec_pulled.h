/*
 * spec_pulled: the "pulled" spec provider. A spec is fetched from an
 * HTTP(S) service with GET <url> (the id put in place of "{id}", or
 * appended to a base URL after '/'), and cached.
 *
 *   200  the body is the spec (parsed and checked by the caller's parse
 *        function before it is cached or handed out)
 *   404  no spec with that id (SPECS_UNKNOWN)
 *   else, or no answer: the provider is unavailable (SPECS_UNAVAILABLE);
 *        connect errors, timeouts, 5xx and 429 are retried with backoff
 *
 * Cache: a successful answer is kept for ttl_s seconds (0: not kept), at
 * most cache_max_entries specs and cache_max_bytes of spec text, least
 * recently used dropped first. Failures of any kind are never cached: the
 * next request asks again. Concurrent look-ups of one id share one request
 * to the service (single flight); every waiter gets the same result.
 *
 * Thread safety: a spec_pulled may be used from many threads at once.
 */
#ifndef REGFACADE_SPEC_PULLED_H
#define REGFACADE_SPEC_PULLED_H

#include <stdbool.h>
#include <stddef.h>

#include "regfacade/json.h"
#include "regfacade/specs.h"

typedef struct spec_pulled spec_pulled;

typedef struct {
    const char *name;             /* provider name, for messages */
    const char *url;              /* "https://host/specs/{id}" or "https://host/specs" */
    const char *ca_file;          /* NULL: system CAs */
    bool tls_verify;              /* false only for tests */
    const char *client_cert_file; /* PEM client certificate (mTLS), or NULL */
    const char *client_key_file;  /* its key (PEM), or NULL: in client_cert_file */
    const char *token;            /* sent as "Authorization: Bearer <token>", or NULL */
    long connect_timeout_ms;      /* 0: 10000 */
    long timeout_ms;              /* one attempt, all of it; 0: 10000 */
    int retries;                  /* extra attempts; < 0: 3 */
    long retry_budget_ms;         /* all attempts and waits; 0: 15000 */
    long ttl_s;                   /* how long an answer is used; 0: not cached */
    size_t cache_max_entries;     /* 0: 1024 */
    size_t cache_max_bytes;       /* 0: 16 MiB */
    size_t max_bytes;             /* a longer answer is a bad answer; 0: SPECS_DEFAULT_MAX_BYTES */
    /* Parse and check an answer: a new tree, or NULL with err. */
    json_value *(*parse)(void *ud, const char *text, size_t len, char *err, size_t errlen);
    void *ud;
} spec_pulled_options;

/* Copies every string. NULL with err on bad options. */
spec_pulled *spec_pulled_new(const spec_pulled_options *o, char *err, size_t errlen);
void spec_pulled_free(spec_pulled *p);

/* Look up id (a valid spec id). SPECS_FOUND with *out (caller frees); else
 * why says what happened. */
specs_result spec_pulled_get(spec_pulled *p, const char *id, json_value **out, char *why, size_t whylen);

typedef struct {
    unsigned long lookups;   /* spec_pulled_get calls */
    unsigned long hits;      /* answered from the cache */
    unsigned long requests;  /* look-ups sent to the service (each may make several attempts) */
    unsigned long coalesced; /* calls that waited for a look-up already running */
    unsigned long failures;  /* look-ups that ended without a spec (unknown, unavailable, bad) */
    size_t entries;          /* cached specs now */
    size_t bytes;            /* their text */
} spec_pulled_stats;
void spec_pulled_get_stats(spec_pulled *p, spec_pulled_stats *out);

/* The URL for id (malloc'd): url with "{id}" replaced, or url + "/" + id. */
char *spec_pulled_url(const char *url, const char *id);

#endif
