/*
 * upstream: the HTTP client for one configured upstream registry (libcurl).
 *
 * It speaks the distribution API's auth: anonymous, Basic, and the Bearer
 * token flow (401 + WWW-Authenticate challenge, token request to the realm
 * with service and scope, token cached per scope and credential until it
 * expires). The account comes from credentials.h, asked for only when a
 * request needs it: a password goes out as Basic (to the registry or its
 * token realm), an identity token only in the OAuth2 refresh-token grant
 * (POST to the realm). When the upstream refuses credentials a helper gave,
 * the helper is asked once more and the request retried. Redirects (a blob's 307 to a CDN) are followed without sending
 * Authorization to another host. Bodies are streamed to callbacks; nothing
 * is buffered whole. One upstream_perform() is one logical request: it may
 * make a token request and retry once after a 401, and move on to a mirror
 * when a base URL fails before answering, but it does not wait and retry
 * (the caller decides that, paced by upstream_retry_delay()).
 *
 * Thread safety: an upstream may be used from many threads at once. It is
 * reference-counted (upstream_hold, upstream_free): a configuration reload
 * drops the old generation's clients while fetches still use them.
 */
#ifndef REGFACADE_UPSTREAM_H
#define REGFACADE_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "regfacade/credentials.h"

typedef struct upstream upstream;

typedef struct {
    const char *name;     /* config key, for messages */
    const char *url;      /* base URL without /v2, e.g. "https://registry-1.docker.io" */
    const char *username; /* NULL: anonymous (unless credentials is set) */
    const char *password; /* with username */
    /* Where the account comes from when it is not a fixed username and
     * password: an identity token or a credential helper (credentials.h).
     * NULL: username/password as above. */
    const credentials_options *credentials;
    const char *ca_file;     /* NULL: system CAs */
    bool tls_verify;         /* false only for tests against self-signed peers */
    long connect_timeout_ms; /* 0: default 10000 */
    long low_speed_limit;    /* bytes/s; 0: default 1024 */
    long low_speed_time_s;   /* 0: default 30 */
    const char *user_agent;  /* NULL: "regfacade/VERSION" */
    /* Mirrors: more base URLs serving the same content, tried in order
     * when the one before fails (see upstream_perform). */
    const char *const *mirrors;
    size_t n_mirrors;
    /* Retry pacing for callers that repeat a request (upstream_retry_*). */
    int retries;          /* extra attempts after a failure; < 0: default 3 (0 is "none") */
    long retry_budget_ms; /* total time retries may take; 0: default 30000 */
    long backoff_ms;      /* first backoff, doubled per failure, with jitter; 0: default 200 */
} upstream_options;

typedef struct {
    long status;                 /* final HTTP status after redirects and auth */
    char content_type[256];      /* without parameters */
    char digest[192];            /* Docker-Content-Digest, "" when absent */
    int64_t content_length;      /* -1 when unknown */
    char content_range[128];     /* raw Content-Range, "" when absent */
    char www_authenticate[2048]; /* of the final response, "" when absent */
    char retry_after[64];        /* raw Retry-After, "" when absent */
    char link[2048];             /* raw Link, "" when absent */
    char filters_applied[128];   /* raw OCI-Filters-Applied (referrers), "" when absent */
    long ratelimit_remaining;    /* from ratelimit-remaining ("76;w=21600"), -1 when absent */
    char error_body[4096];       /* body of a non-2xx answer, truncated, NUL-terminated */
    size_t error_body_len;
} upstream_response;

typedef struct upstream_request upstream_request;
struct upstream_request {
    const char *method;     /* "GET" or "HEAD" */
    const char *repository; /* upstream repository name, for the token scope "repository:NAME:pull" */
    const char *path;       /* after "/v2/", with query if any: "library/alpine/manifests/3.20" */
    const char *accept;     /* Accept header value, or NULL */
    uint64_t range_start;   /* > 0: send "Range: bytes=N-" */
    /* Called once when the final response's headers are complete (2xx
     * only; not for 401 answers that lead to an auth retry, nor for
     * redirects). Return 0 to go on, -1 to abort the transfer. */
    int (*on_headers)(void *ud, const upstream_response *resp);
    /* Called with body bytes of a 2xx final response as they arrive.
     * Return 0 to go on, -1 to abort. */
    int (*on_body)(void *ud, const char *data, size_t len);
    /* Called often (libcurl's progress callback) while the transfer runs,
     * also when no bytes arrive. Return 0 to go on, -1 to abort. */
    int (*on_tick)(void *ud);
    void *ud;
};

typedef enum {
    UPSTREAM_OK = 0,       /* an HTTP answer arrived: see resp->status */
    UPSTREAM_ERR_CONNECT,  /* DNS failure, connection refused or reset before an answer */
    UPSTREAM_ERR_TLS,      /* handshake or certificate failure */
    UPSTREAM_ERR_TIMEOUT,  /* connect timeout or low-speed timeout */
    UPSTREAM_ERR_TRANSFER, /* answer broken midway (reset, truncated body) */
    UPSTREAM_ERR_AUTH,     /* the token request failed, the challenge was unusable, or the
                                 credential helper failed (502) */
    UPSTREAM_ERR_DENIED,   /* the token endpoint refused our credentials (401/403) */
    UPSTREAM_ERR_ABORTED,  /* a callback returned -1 */
    UPSTREAM_ERR_INTERNAL, /* allocation or libcurl setup failure */
} upstream_result;

/* Call once at program start, before threads (wraps curl_global_init). */
int upstream_global_init(void);
void upstream_global_cleanup(void);

/* NULL on bad options (err says which). Copies every string. The caller
 * holds the one reference. */
upstream *upstream_new(const upstream_options *opts, char *err, size_t errlen);
/* Another reference (for work that may outlive the caller's, like a blob
 * fetch thread); returns u. */
upstream *upstream_hold(upstream *u);
/* Drop a reference; the last one frees u, its idle handles and their
 * keep-alive connections. */
void upstream_free(upstream *u);

const char *upstream_name(const upstream *u);
const char *upstream_url(const upstream *u);
/* The account requests go out with: its user name, NULL when anonymous.
 * For an identity token or a credential helper (whose user name is known
 * only once asked) a stable name of the source instead
 * (credentials_account: "identity token", "credential helper PATH"). */
const char *upstream_username(const upstream *u);

/* Perform one request. resp is always filled as far as known. On anything
 * but UPSTREAM_OK, err holds "what failed, where (URL), why".
 *
 * With mirrors, the base URLs are tried in order (url first) as long as a
 * base fails before delivering anything to the caller: a connect, TLS or
 * timeout failure before the answer's headers, or an answer of 5xx or 429.
 * A base that failed so is skipped for a short while (UPSTREAM_BASE_DOWN_MS,
 * or the Retry-After of a 429) unless every base is skipped. A transfer that
 * broke after on_headers was called is returned as it is (the caller
 * resumes it; the broken base is skipped on that retry). Tokens are cached
 * per base URL. */
upstream_result upstream_perform(upstream *u, const upstream_request *req, upstream_response *resp, char *err,
                                 size_t errlen);

/* How many base URLs (url plus mirrors) the upstream has. */
size_t upstream_base_count(const upstream *u);

/* Retry pacing, shared by every caller that repeats a failed request:
 * exponential backoff with jitter (first backoff_ms, doubled per failure,
 * each wait drawn from [d/2, 3d/2] and at most 10 s), at most `retries`
 * retries, all within `retry_budget_ms` counted from upstream_retry_init()
 * (or the last upstream_retry_progress()). A Retry-After (seconds or an
 * HTTP-date) is honoured: the wait is at least that long, and when it does
 * not fit in what is left of the budget no retry is made (the caller passes
 * the 429 and its Retry-After on). */
typedef struct {
    int failures;     /* failed attempts so far */
    int64_t start_ms; /* CLOCK_MONOTONIC milliseconds when the budget started */
} upstream_retry;

void upstream_retry_init(upstream_retry *r);
/* A transfer made progress (bytes arrived): the count and the budget start
 * again, so a long transfer broken several times still resumes. */
void upstream_retry_progress(upstream_retry *r);
/* After a failed attempt: the milliseconds to wait before the next one, or
 * -1 when no retry is left (why says which limit). retry_after is the
 * answer's raw Retry-After header, "" or NULL when none. */
long upstream_retry_delay(const upstream *u, upstream_retry *r, const char *retry_after, char *why, size_t whylen);
/* Sleep ms milliseconds (EINTR-safe). */
void upstream_sleep_ms(long ms);
/* Retry-After as milliseconds from now: delta-seconds or an HTTP-date; 0
 * for a date in the past; -1 when absent or malformed. */
long upstream_parse_retry_after(const char *v);

/* A short stable name for a result ("connect", "tls", "timeout", ...). */
const char *upstream_result_name(upstream_result r);

/* What the client is told about a failed request: upstream_answer.h. */

/* True for results worth retrying (connect, tls, timeout, transfer). */
bool upstream_result_retryable(upstream_result r);

#endif
