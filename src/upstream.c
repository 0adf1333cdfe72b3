/*
 * upstream: the HTTP client for one upstream registry (libcurl 7.88).
 *
 * Layout of this file:
 *   - options, the upstream object, the pool of idle easy handles and the
 *     share handle (DNS cache and TLS sessions shared by the pool);
 *   - the token cache;
 *   - the per-transfer context with the header and body callbacks, which
 *     turn libcurl's view (every response of a redirect chain, 401s) into the
 *     caller's view (one final response, callbacks only for a 2xx);
 *   - the token request and upstream_perform() itself.
 *
 * Nothing here is global except libcurl's own global state, set up by
 * upstream_global_init(). Every mutable field of an upstream is behind a
 * mutex; a CURL easy handle is used by one thread at a time (taken from the
 * pool, returned after the request), which is what libcurl requires.
 */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime, strncasecmp, access */
#endif
#include "regfacade/upstream.h"

#include "regfacade/errmsg.h"
#include "regfacade/clock.h"
#include "regfacade/json.h"
#include "regfacade/metrics.h"
#include "regfacade/ref.h"

#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#ifndef REGFACADE_VERSION
#define REGFACADE_VERSION "0.1.0"
#endif

/* Named limits of this module. */
#define UPSTREAM_POOL_MAX 16    /* idle easy handles kept per upstream */
#define UPSTREAM_MAX_REDIRS 10L /* redirects followed per request */
#define UPSTREAM_DEFAULT_CONNECT_MS 10000L
#define UPSTREAM_DEFAULT_LOW_SPEED 1024L /* bytes/s */
#define UPSTREAM_DEFAULT_LOW_SPEED_S 30L
#define TOKEN_BODY_MAX (1024 * 1024)      /* largest token response we read */
#define TOKEN_REQUEST_TIMEOUT_MS 60000L   /* whole token request, connect included */
#define TOKEN_DEFAULT_TTL_S 60            /* when expires_in is absent (token spec) */
#define TOKEN_EARLY_EXPIRY_S 10           /* treat a token as expired this early */
#define TOKEN_CACHE_MAX 256               /* entries per upstream */
#define UPSTREAM_MAX_BASES 16             /* url plus mirrors */
#define UPSTREAM_BASE_DOWN_MS 10000L      /* a failed base URL is skipped this long */
#define UPSTREAM_BASE_DOWN_MAX_MS 300000L /* longest skip a Retry-After may ask */
#define UPSTREAM_DEFAULT_RETRIES 3
#define UPSTREAM_DEFAULT_BUDGET_MS 30000L
#define UPSTREAM_DEFAULT_BACKOFF_MS 200L
#define UPSTREAM_BACKOFF_MAX_MS 10000L /* longest backoff between two attempts */

/* ------------------------------------------------------------------ */
/* small helpers */

static char *xstrdup(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* printf into a fresh malloc'd string; NULL on failure. */
static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static char *xasprintf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return NULL;
    char *s = malloc((size_t)n + 1);
    if (!s) return NULL;
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

static int64_t now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec;
}

/* true when s holds a byte that must never reach a header or a URL */
static bool has_ctl_or_space(const char *s) {
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c <= 0x20 || c == 0x7f) return true;
    }
    return false;
}

static bool has_ctl(const char *s) {
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if ((c < 0x20 && c != '\t') || c == 0x7f) return true;
    }
    return false;
}

/* Copy a URL for a message, leaving out userinfo and the query (a redirect
 * target may be a presigned URL whose query is a credential). */
static void url_for_message(const char *url, char *out, size_t outlen, bool keep_query) {
    if (!url) {
        snprintf(out, outlen, "?");
        return;
    }
    const char *scheme_end = strstr(url, "://");
    const char *auth = scheme_end ? scheme_end + 3 : url;
    const char *host_end = auth + strcspn(auth, "/?#");
    const char *at = NULL;
    for (const char *p = auth; p < host_end; p++)
        if (*p == '@') at = p;
    if (at)
        snprintf(out, outlen, "%.*s%s", (int)(auth - url), url, at + 1);
    else
        snprintf(out, outlen, "%s", url);
    if (!keep_query) {
        char *q = strpbrk(out, "?#");
        if (q) *q = '\0';
    }
}

/* ------------------------------------------------------------------ */
/* the upstream object */

typedef struct token_entry token_entry;
struct token_entry {
    token_entry *next;
    char *scope;     /* "" when the request had no scope */
    bool with_creds; /* the token was issued for our configured credentials */
    char *token;
    int64_t expires; /* monotonic seconds; the entry is stale from then on */
};

struct upstream {
    int refs; /* upstream_new's and upstream_hold's; atomic */
    char *name;
    char *url;          /* without trailing slash */
    credentials *creds; /* the account, never NULL (kind NONE: anonymous) */
    bool with_creds;    /* creds is not anonymous */
    char *ca_file;
    char *user_agent;
    bool tls_verify;
    bool https; /* url is https */
    long connect_timeout_ms;
    long low_speed_limit;
    long low_speed_time_s;

    /* base URLs: bases[0] == url, then the mirrors; down_until[i] is the
     * monotonic ms until which base i is skipped (guarded by pool_mu) */
    char *bases[UPSTREAM_MAX_BASES];
    size_t nbases;
    int64_t down_until[UPSTREAM_MAX_BASES];

    /* retry pacing (upstream_retry_delay) */
    int retries;
    long retry_budget_ms;
    long backoff_ms;

    /* idle easy handles; each one keeps its own connection cache, so a
     * handle taken from here usually finds a live keep-alive connection. */
    pthread_mutex_t pool_mu;
    CURL *idle[UPSTREAM_POOL_MAX];
    int nidle;

    /* DNS cache and TLS session ids shared by all handles of the pool */
    CURLSH *share;
    pthread_mutex_t share_mu[CURL_LOCK_DATA_LAST];

    /* token cache and what we learned about the upstream's auth scheme */
    pthread_mutex_t tok_mu;
    token_entry *tokens;
    int ntokens;
    bool basic_known; /* the last challenge seen was Basic */
};

static void share_lock(CURL *h, curl_lock_data data, curl_lock_access access, void *userptr) {
    (void)h;
    (void)access;
    upstream *u = userptr;
    if ((int)data >= 0 && data < CURL_LOCK_DATA_LAST) pthread_mutex_lock(&u->share_mu[data]);
}

static void share_unlock(CURL *h, curl_lock_data data, void *userptr) {
    (void)h;
    upstream *u = userptr;
    if ((int)data >= 0 && data < CURL_LOCK_DATA_LAST) pthread_mutex_unlock(&u->share_mu[data]);
}

int upstream_global_init(void) { return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK ? 0 : -1; }

void upstream_global_cleanup(void) { curl_global_cleanup(); }

const char *upstream_name(const upstream *u) { return u ? u->name : NULL; }

const char *upstream_url(const upstream *u) { return u ? u->url : NULL; }

const char *upstream_username(const upstream *u) {
    if (!u || !u->with_creds) return NULL;
    const char *user = credentials_static_username(u->creds);
    return user ? user : credentials_account(u->creds);
}

const char *upstream_result_name(upstream_result r) {
    switch (r) {
        case UPSTREAM_OK:
            return "ok";
        case UPSTREAM_ERR_CONNECT:
            return "connect";
        case UPSTREAM_ERR_TLS:
            return "tls";
        case UPSTREAM_ERR_TIMEOUT:
            return "timeout";
        case UPSTREAM_ERR_TRANSFER:
            return "transfer";
        case UPSTREAM_ERR_AUTH:
            return "auth";
        case UPSTREAM_ERR_DENIED:
            return "denied";
        case UPSTREAM_ERR_ABORTED:
            return "aborted";
        case UPSTREAM_ERR_INTERNAL:
            return "internal";
    }
    return "unknown";
}

bool upstream_result_retryable(upstream_result r) {
    return r == UPSTREAM_ERR_CONNECT || r == UPSTREAM_ERR_TLS || r == UPSTREAM_ERR_TIMEOUT ||
           r == UPSTREAM_ERR_TRANSFER;
}

static void token_entry_free(token_entry *e) {
    if (!e) return;
    free(e->scope);
    secret_free(e->token);
    free(e);
}

upstream *upstream_hold(upstream *u) {
    if (u) __atomic_add_fetch(&u->refs, 1, __ATOMIC_RELAXED);
    return u;
}

void upstream_free(upstream *u) {
    /* The last reference frees it; acq_rel so that what the other holders
     * did happens before the cleanup. */
    if (!u || __atomic_sub_fetch(&u->refs, 1, __ATOMIC_ACQ_REL) > 0) return;
    /* Cleaning up the idle handles closes their keep-alive connections. */
    for (int i = 0; i < u->nidle; i++) curl_easy_cleanup(u->idle[i]);
    if (u->share) curl_share_cleanup(u->share);
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++) pthread_mutex_destroy(&u->share_mu[i]);
    pthread_mutex_destroy(&u->pool_mu);
    pthread_mutex_destroy(&u->tok_mu);
    for (token_entry *e = u->tokens, *next; e; e = next) {
        next = e->next;
        token_entry_free(e);
    }
    free(u->name);
    free(u->url);
    for (size_t i = 1; i < u->nbases; i++) /* bases[0] is url */
        free(u->bases[i]);
    credentials_free(u->creds);
    free(u->ca_file);
    free(u->user_agent);
    free(u);
}

/* A base URL: http(s), a host, no credentials, query or fragment. Returns
 * 1 for https, 0 for http, -1 with err set. */
static int check_base_url(const char *name, const char *what, const char *url, char *err, size_t errlen) {
    if (!url || !*url) {
        errmsg_set(err, errlen, "upstream %s: %s is required", name, what);
        return -1;
    }
    bool https = strncasecmp(url, "https://", 8) == 0;
    if (!https && strncasecmp(url, "http://", 7) != 0) {
        errmsg_set(err, errlen, "upstream %s: %s must start with http:// or https://", name, what);
        return -1;
    }
    if (has_ctl_or_space(url)) {
        errmsg_set(err, errlen, "upstream %s: %s contains spaces or control characters", name, what);
        return -1;
    }
    const char *auth = url + (https ? 8 : 7);
    size_t authlen = strcspn(auth, "/?#");
    if (authlen == 0) {
        errmsg_set(err, errlen, "upstream %s: %s has no host", name, what);
        return -1;
    }
    if (memchr(auth, '@', authlen)) {
        /* Credentials in the URL would end up in logs and error messages. */
        errmsg_set(err, errlen, "upstream %s: %s must not contain credentials; use username and password", name, what);
        return -1;
    }
    if (strpbrk(auth, "?#")) {
        errmsg_set(err, errlen, "upstream %s: %s must not have a query or fragment", name, what);
        return -1;
    }
    return https ? 1 : 0;
}

/* A copy of url without trailing slashes; NULL on allocation failure. */
static char *base_dup(const char *url) {
    char *b = xstrdup(url);
    if (b) {
        size_t n = strlen(b);
        while (n > 0 && b[n - 1] == '/') b[--n] = '\0';
    }
    return b;
}

upstream *upstream_new(const upstream_options *opts, char *err, size_t errlen) {
    if (!opts) {
        errmsg_set(err, errlen, "upstream: no options");
        return NULL;
    }
    const char *name = opts->name && *opts->name ? opts->name : NULL;
    if (!name) {
        errmsg_set(err, errlen, "upstream: name is required");
        return NULL;
    }
    metrics_upstream_known(name); /* its series show from the start, at 0 */
    const char *url = opts->url;
    int https_rc = check_base_url(name, "url", url, err, errlen);
    if (https_rc < 0) return NULL;
    bool https = https_rc == 1;
    if (opts->n_mirrors + 1 > UPSTREAM_MAX_BASES || (opts->n_mirrors && !opts->mirrors)) {
        errmsg_set(err, errlen, "upstream %s: at most %d mirrors", name, UPSTREAM_MAX_BASES - 1);
        return NULL;
    }
    for (size_t i = 0; i < opts->n_mirrors; i++)
        if (check_base_url(name, "mirror", opts->mirrors[i], err, errlen) < 0) return NULL;
    if (opts->retry_budget_ms < 0 || opts->backoff_ms < 0) {
        errmsg_set(err, errlen, "upstream %s: retry budget and backoff must not be negative", name);
        return NULL;
    }
    if (opts->password && !opts->username) {
        errmsg_set(err, errlen, "upstream %s: password given without username", name);
        return NULL;
    }
    if (opts->username && (strchr(opts->username, ':') || has_ctl(opts->username))) {
        errmsg_set(err, errlen, "upstream %s: username must not contain ':' or control characters", name);
        return NULL;
    }
    if (opts->ca_file && *opts->ca_file && access(opts->ca_file, R_OK) != 0) {
        errmsg_set(err, errlen, "upstream %s: ca_file %s: %s", name, opts->ca_file, strerror(errno));
        return NULL;
    }
    if (opts->user_agent && has_ctl(opts->user_agent)) {
        errmsg_set(err, errlen, "upstream %s: user_agent contains control characters", name);
        return NULL;
    }
    if (opts->connect_timeout_ms < 0 || opts->low_speed_limit < 0 || opts->low_speed_time_s < 0) {
        errmsg_set(err, errlen, "upstream %s: timeouts and limits must not be negative", name);
        return NULL;
    }

    upstream *u = calloc(1, sizeof *u);
    if (!u) {
        errmsg_set(err, errlen, "upstream %s: out of memory", name);
        return NULL;
    }
    u->refs = 1;
    pthread_mutex_init(&u->pool_mu, NULL);
    pthread_mutex_init(&u->tok_mu, NULL);
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++) pthread_mutex_init(&u->share_mu[i], NULL);

    u->name = xstrdup(name);
    u->url = xstrdup(url);
    credentials_options co = {.kind = opts->username ? CREDENTIALS_STATIC : CREDENTIALS_NONE,
                              .username = opts->username,
                              .secret = opts->password ? opts->password : ""};
    char cerr[300];
    u->creds = credentials_new(opts->credentials ? opts->credentials : &co, cerr, sizeof cerr);
    if (!u->creds) {
        errmsg_set(err, errlen, "upstream %s: %s", name, cerr);
        upstream_free(u);
        return NULL;
    }
    u->with_creds = credentials_get_kind(u->creds) != CREDENTIALS_NONE;
    u->ca_file = opts->ca_file && *opts->ca_file ? xstrdup(opts->ca_file) : NULL;
    u->user_agent = xstrdup(opts->user_agent ? opts->user_agent : "regfacade/" REGFACADE_VERSION);
    if (!u->name || !u->url || !u->user_agent || (opts->ca_file && *opts->ca_file && !u->ca_file)) {
        errmsg_set(err, errlen, "upstream %s: out of memory", name);
        upstream_free(u);
        return NULL;
    }
    size_t n = strlen(u->url);
    while (n > 0 && u->url[n - 1] == '/') u->url[--n] = '\0';
    u->https = https;
    u->tls_verify = opts->tls_verify;
    u->connect_timeout_ms = opts->connect_timeout_ms ? opts->connect_timeout_ms : UPSTREAM_DEFAULT_CONNECT_MS;
    u->low_speed_limit = opts->low_speed_limit ? opts->low_speed_limit : UPSTREAM_DEFAULT_LOW_SPEED;
    u->low_speed_time_s = opts->low_speed_time_s ? opts->low_speed_time_s : UPSTREAM_DEFAULT_LOW_SPEED_S;
    u->retries = opts->retries < 0 ? UPSTREAM_DEFAULT_RETRIES : opts->retries;
    u->retry_budget_ms = opts->retry_budget_ms ? opts->retry_budget_ms : UPSTREAM_DEFAULT_BUDGET_MS;
    u->backoff_ms = opts->backoff_ms ? opts->backoff_ms : UPSTREAM_DEFAULT_BACKOFF_MS;
    u->bases[0] = u->url;
    u->nbases = 1;
    for (size_t i = 0; i < opts->n_mirrors; i++) {
        if (!(u->bases[u->nbases] = base_dup(opts->mirrors[i]))) {
            errmsg_set(err, errlen, "upstream %s: out of memory", name);
            upstream_free(u);
            return NULL;
        }
        u->nbases++;
    }

    u->share = curl_share_init();
    if (!u->share || curl_share_setopt(u->share, CURLSHOPT_LOCKFUNC, share_lock) != CURLSHE_OK ||
        curl_share_setopt(u->share, CURLSHOPT_UNLOCKFUNC, share_unlock) != CURLSHE_OK ||
        curl_share_setopt(u->share, CURLSHOPT_USERDATA, u) != CURLSHE_OK ||
        curl_share_setopt(u->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS) != CURLSHE_OK ||
        curl_share_setopt(u->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION) != CURLSHE_OK) {
        errmsg_set(err, errlen, "upstream %s: cannot set up the libcurl share handle", name);
        upstream_free(u);
        return NULL;
    }
    return u;
}

/* An idle handle (*reused set) or a fresh one; NULL when libcurl cannot
 * make one. */
static CURL *pool_get(upstream *u, bool *reused) {
    CURL *h = NULL;
    pthread_mutex_lock(&u->pool_mu);
    if (u->nidle > 0) h = u->idle[--u->nidle];
    pthread_mutex_unlock(&u->pool_mu);
    *reused = h != NULL;
    if (!h) h = curl_easy_init();
    return h;
}

/* Give a handle back. healthy: its last transfer ended without a libcurl
 * failure. A handle whose transfer failed is not kept: libcurl 7.88.1
 * leaves one that failed to resolve a name refusing CURLOPT_BUFFERSIZE
 * after curl_easy_reset (CURLE_BAD_FUNCTION_ARGUMENT), and a connection
 * that just failed is not worth keeping anyway. */
static void pool_put(upstream *u, CURL *h, bool healthy) {
    if (!h) return;
    if (healthy) {
        /* Drop options (headers lists, callbacks, user data pointing at our
         * stack) but keep live connections, TLS sessions and the DNS cache. */
        curl_easy_reset(h);
        pthread_mutex_lock(&u->pool_mu);
        if (u->nidle < UPSTREAM_POOL_MAX) {
            u->idle[u->nidle++] = h;
            h = NULL;
        }
        pthread_mutex_unlock(&u->pool_mu);
    }
    if (h) curl_easy_cleanup(h);
}

/* ------------------------------------------------------------------ */
/* token cache */

/* Returns a malloc'd copy of a fresh cached token, or NULL. */
static char *token_cache_get(upstream *u, const char *scope, bool with_creds) {
    char *tok = NULL;
    int64_t now = now_s();
    pthread_mutex_lock(&u->tok_mu);
    for (token_entry *e = u->tokens; e; e = e->next) {
        if (e->with_creds == with_creds && strcmp(e->scope, scope) == 0) {
            if (e->expires > now) tok = xstrdup(e->token);
            break;
        }
    }
    pthread_mutex_unlock(&u->tok_mu);
    return tok;
}

/* Remove the entry for (scope, with_creds) if it still holds token. */
static void token_cache_drop(upstream *u, const char *scope, bool with_creds, const char *token) {
    pthread_mutex_lock(&u->tok_mu);
    for (token_entry **pp = &u->tokens; *pp; pp = &(*pp)->next) {
        token_entry *e = *pp;
        if (e->with_creds == with_creds && strcmp(e->scope, scope) == 0) {
            if (!token || strcmp(e->token, token) == 0) {
                *pp = e->next;
                token_entry_free(e);
                u->ntokens--;
            }
            break;
        }
    }
    pthread_mutex_unlock(&u->tok_mu);
}

static void token_cache_put(upstream *u, const char *scope, bool with_creds, const char *token, int64_t ttl_s) {
    int64_t now = now_s();
    int64_t expires = now + ttl_s - TOKEN_EARLY_EXPIRY_S;
    if (expires <= now) return; /* would be stale at once: use it for this request only */
    token_entry *ne = calloc(1, sizeof *ne);
    if (!ne) return;
    ne->scope = xstrdup(scope);
    ne->token = xstrdup(token);
    ne->with_creds = with_creds;
    ne->expires = expires;
    if (!ne->scope || !ne->token) {
        token_entry_free(ne);
        return;
    }
    pthread_mutex_lock(&u->tok_mu);
    /* drop the old entry for this key and every stale one */
    for (token_entry **pp = &u->tokens; *pp;) {
        token_entry *e = *pp;
        if (e->expires <= now || (e->with_creds == with_creds && strcmp(e->scope, scope) == 0)) {
            *pp = e->next;
            token_entry_free(e);
            u->ntokens--;
        } else {
            pp = &e->next;
        }
    }
    /* still full: drop the entry that expires first */
    if (u->ntokens >= TOKEN_CACHE_MAX) {
        token_entry **victim = &u->tokens;
        for (token_entry **pp = &u->tokens; *pp; pp = &(*pp)->next)
            if ((*pp)->expires < (*victim)->expires) victim = pp;
        token_entry *e = *victim;
        *victim = e->next;
        token_entry_free(e);
        u->ntokens--;
    }
    ne->next = u->tokens;
    u->tokens = ne;
    u->ntokens++;
    pthread_mutex_unlock(&u->tok_mu);
}

static bool basic_known(upstream *u) {
    pthread_mutex_lock(&u->tok_mu);
    bool b = u->basic_known;
    pthread_mutex_unlock(&u->tok_mu);
    return b;
}

static void set_basic_known(upstream *u, bool b) {
    pthread_mutex_lock(&u->tok_mu);
    u->basic_known = b;
    pthread_mutex_unlock(&u->tok_mu);
}

/* "Authorization: Basic base64(user:pass)", malloc'd; NULL on failure. */
static char *basic_auth_header(const credential *cr) {
    const char *pass = cr->secret ? cr->secret : "";
    size_t ul = strlen(cr->username), pl = strlen(pass);
    size_t rawlen = ul + 1 + pl;
    char *raw = malloc(rawlen + 1);
    if (!raw) return NULL;
    memcpy(raw, cr->username, ul);
    raw[ul] = ':';
    memcpy(raw + ul + 1, pass, pl);
    raw[rawlen] = '\0';
    size_t enclen = 4 * ((rawlen + 2) / 3) + 1;
    static const char prefix[] = "Authorization: Basic ";
    char *hdr = malloc(sizeof prefix - 1 + enclen);
    if (!hdr) {
        secret_free(raw);
        return NULL;
    }
    memcpy(hdr, prefix, sizeof prefix - 1);
    long n = base64_encode((const unsigned char *)raw, rawlen, hdr + sizeof prefix - 1, enclen);
    secret_wipe(raw, rawlen);
    free(raw);
    if (n < 0) {
        secret_free(hdr);
        return NULL;
    }
    return hdr;
}

/* Free a header list after wiping its contents (it may hold credentials). */
static void slist_free_wiped(struct curl_slist *l) {
    for (struct curl_slist *p = l; p; p = p->next)
        if (p->data) secret_wipe(p->data, strlen(p->data));
    curl_slist_free_all(l);
}

/* ------------------------------------------------------------------ */
/* per-transfer context and callbacks */

typedef enum {
    PH_HEADERS, /* reading the headers of some response */
    PH_DELIVER, /* final 2xx: body goes to on_body */
    PH_CAPTURE, /* final non-2xx: body goes to error_body */
    PH_DISCARD, /* a followed redirect or a 401 we retry: body dropped */
    PH_DONE,    /* HEAD or no body expected; trailers are ignored */
} phase;

typedef enum {
    AUTH_NONE,   /* no auth retry planned */
    AUTH_BEARER, /* fetch a token, then retry */
    AUTH_BASIC,  /* retry with Basic credentials */
    AUTH_BAD,    /* the challenge was unusable: UPSTREAM_ERR_AUTH */
} auth_plan;

typedef struct {
    upstream *u;
    const upstream_request *req;
    upstream_response *resp;
    bool may_retry_auth; /* first attempt only */
    bool sent_basic;     /* this attempt carried Basic credentials */
    phase ph;
    bool have_location; /* the current response had a Location header */
    int redirects;      /* redirects seen in this transfer */
    bool final_seen;    /* the headers of a final response are complete */
    bool aborted;       /* a callback of the caller returned -1 */
    bool delivered;     /* on_headers was called: the caller saw this answer */
    auth_plan plan;
    www_authenticate chal;
    char plan_err[256];
    char errbuf[CURL_ERROR_SIZE];
} xfer;

static void response_reset(upstream_response *r) {
    memset(r, 0, sizeof *r);
    r->content_length = -1;
    r->ratelimit_remaining = -1;
}

/* Copy a header value (already trimmed, len bytes) into a fixed field. */
static void copy_field(char *dst, size_t dstlen, const char *v, size_t len) {
    if (len >= dstlen) len = dstlen - 1;
    memcpy(dst, v, len);
    dst[len] = '\0';
}

static bool parse_int64(const char *v, size_t len, int64_t *out) {
    if (len == 0) return false;
    int64_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (v[i] < '0' || v[i] > '9') return false;
        int d = v[i] - '0';
        if (n > (INT64_MAX - d) / 10) return false;
        n = n * 10 + d;
    }
    *out = n;
    return true;
}

/* Decide, at the end of a 401's headers on the first attempt, whether and
 * how we retry. Only the upstream itself is challenged: a 401 that comes
 * after a redirect (from a CDN) is returned as it is. */
static void plan_auth(xfer *x) {
    x->plan = AUTH_NONE;
    if (!x->may_retry_auth || x->redirects > 0 || x->resp->www_authenticate[0] == '\0') return;
    char perr[160] = "";
    if (www_authenticate_parse(x->resp->www_authenticate, &x->chal, perr, sizeof perr) != 0) {
        x->plan = AUTH_BAD;
        snprintf(x->plan_err, sizeof x->plan_err, "malformed WWW-Authenticate challenge: %s", perr);
        return;
    }
    if (strcasecmp(x->chal.scheme, "Bearer") == 0) {
        if (x->chal.realm[0] == '\0') {
            x->plan = AUTH_BAD;
            snprintf(x->plan_err, sizeof x->plan_err, "Bearer challenge without a realm");
            return;
        }
        x->plan = AUTH_BEARER;
    } else if (strcasecmp(x->chal.scheme, "Basic") == 0) {
        /* Without credentials, or if they were just refused, the 401 is
         * the answer. */
        if (x->u->with_creds && !x->sent_basic) x->plan = AUTH_BASIC;
    }
    /* any other scheme: return the 401 as it is */
}

/* End of the headers of one response. Returns false to abort. */
static bool headers_complete(xfer *x) {
    long st = x->resp->status;
    if (st >= 100 && st < 200) {
        /* 100 Continue, 103 Early Hints: the real response follows */
        x->ph = PH_HEADERS;
        return true;
    }
    if (st >= 300 && st < 400 && x->have_location) {
        /* libcurl follows every 3xx with a Location (FOLLOWLOCATION is on);
         * past the limit it fails with CURLE_TOO_MANY_REDIRECTS. */
        x->redirects++;
        x->ph = PH_DISCARD;
        return true;
    }
    x->final_seen = true;
    if (st == 401) {
        plan_auth(x);
        if (x->plan == AUTH_BEARER || x->plan == AUTH_BASIC) {
            x->ph = PH_DISCARD;
            return true;
        }
    }
    if (st >= 200 && st < 300) {
        x->ph = strcmp(x->req->method, "HEAD") == 0 ? PH_DONE : PH_DELIVER;
        x->delivered = true;
        if (x->req->on_headers && x->req->on_headers(x->req->ud, x->resp) != 0) {
            x->aborted = true;
            return false;
        }
        return true;
    }
    x->ph = PH_CAPTURE;
    return true;
}

static size_t header_cb(char *buf, size_t size, size_t nitems, void *ud) {
    xfer *x = ud;
    size_t total = size * nitems;
    upstream_response *r = x->resp;

    /* After the final response's headers only trailers can come. */
    if (x->ph == PH_DELIVER || x->ph == PH_CAPTURE || x->ph == PH_DONE) return total;

    if (total >= 5 && strncmp(buf, "HTTP/", 5) == 0) {
        /* a status line starts a new response: forget the previous one */
        response_reset(r);
        x->have_location = false;
        x->ph = PH_HEADERS;
        const char *p = memchr(buf, ' ', total);
        long st = 0;
        if (p) {
            p++;
            for (int i = 0; i < 3 && p < buf + total && isdigit((unsigned char)*p); i++, p++) st = st * 10 + (*p - '0');
        }
        r->status = st;
        return total;
    }
    if (total <= 2 && (buf[0] == '\r' || buf[0] == '\n')) {
        if (x->ph == PH_HEADERS) return headers_complete(x) ? total : 0;
        return total;
    }
    if (x->ph != PH_HEADERS) return total;             /* trailers of a discarded response */
    if (buf[0] == ' ' || buf[0] == '\t') return total; /* obsolete line folding: ignored */

    const char *colon = memchr(buf, ':', total);
    if (!colon) return total;
    size_t nlen = (size_t)(colon - buf);
    const char *v = colon + 1;
    const char *end = buf + total;
    while (v < end && (*v == ' ' || *v == '\t')) v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t')) end--;
    size_t vlen = (size_t)(end - v);

#define HDR_IS(lit) (nlen == sizeof(lit) - 1 && strncasecmp(buf, lit, nlen) == 0)
    if (HDR_IS("content-type")) {
        size_t l = 0;
        while (l < vlen && v[l] != ';') l++;
        while (l > 0 && (v[l - 1] == ' ' || v[l - 1] == '\t')) l--;
        copy_field(r->content_type, sizeof r->content_type, v, l);
    } else if (HDR_IS("docker-content-digest")) {
        copy_field(r->digest, sizeof r->digest, v, vlen);
    } else if (HDR_IS("content-length")) {
        int64_t n;
        r->content_length = parse_int64(v, vlen, &n) ? n : -1;
    } else if (HDR_IS("content-range")) {
        copy_field(r->content_range, sizeof r->content_range, v, vlen);
    } else if (HDR_IS("www-authenticate")) {
        /* several challenges may come as several headers: keep the first,
         * which is the one www_authenticate_parse() reads anyway */
        if (r->www_authenticate[0] == '\0') copy_field(r->www_authenticate, sizeof r->www_authenticate, v, vlen);
    } else if (HDR_IS("retry-after")) {
        copy_field(r->retry_after, sizeof r->retry_after, v, vlen);
    } else if (HDR_IS("link")) {
        copy_field(r->link, sizeof r->link, v, vlen);
    } else if (HDR_IS("oci-filters-applied")) {
        copy_field(r->filters_applied, sizeof r->filters_applied, v, vlen);
    } else if (HDR_IS("ratelimit-remaining")) {
        size_t l = 0;
        while (l < vlen && v[l] >= '0' && v[l] <= '9') l++;
        int64_t n;
        r->ratelimit_remaining = (parse_int64(v, l, &n) && n <= LONG_MAX) ? (long)n : -1;
    } else if (HDR_IS("location")) {
        x->have_location = vlen > 0;
    }
#undef HDR_IS
    return total;
}

static int tick_cb(void *ud, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow) {
    (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
    xfer *x = ud;
    if (x->ph == PH_DELIVER && x->req->on_tick && x->req->on_tick(x->req->ud) != 0) {
        x->aborted = true;
        return 1;
    }
    return 0;
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *ud) {
    xfer *x = ud;
    size_t total = size * nmemb;
    switch (x->ph) {
        case PH_DELIVER:
            if (x->req->on_body && total > 0 && x->req->on_body(x->req->ud, data, total) != 0) {
                x->aborted = true;
                return 0;
            }
            return total;
        case PH_CAPTURE: {
            upstream_response *r = x->resp;
            size_t room = sizeof r->error_body - 1 - r->error_body_len;
            size_t n = total < room ? total : room;
            memcpy(r->error_body + r->error_body_len, data, n);
            r->error_body_len += n;
            r->error_body[r->error_body_len] = '\0';
            return total;
        }
        default:
            return total;
    }
}

/* Set the options every request of ours shares. */
static CURLcode common_setup(upstream *u, CURL *h, xfer *x, const char *url) {
    CURLcode rc = CURLE_OK;
#define SET(opt, val)                                           \
    do {                                                        \
        if (rc == CURLE_OK) rc = curl_easy_setopt(h, opt, val); \
    } while (0)
    SET(CURLOPT_URL, url);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_SHARE, u->share);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_FOLLOWLOCATION, 1L);
    SET(CURLOPT_MAXREDIRS, UPSTREAM_MAX_REDIRS);
    /* CURLOPT_UNRESTRICTED_AUTH stays 0 (its default, set here so nobody
     * turns it on by accident): libcurl then sends our Authorization header
     * only to the host, port and scheme of the first request of a redirect
     * chain. A registry's token or Basic credentials are for the registry;
     * a blob redirect goes to a CDN or a presigned object-store URL that
     * must not see them (a leak, and S3 also rejects a request carrying
     * both a signature and an Authorization header). */
    SET(CURLOPT_UNRESTRICTED_AUTH, 0L);
    SET(CURLOPT_USERAGENT, u->user_agent);
    SET(CURLOPT_CONNECTTIMEOUT_MS, u->connect_timeout_ms);
    SET(CURLOPT_LOW_SPEED_LIMIT, u->low_speed_limit);
    SET(CURLOPT_LOW_SPEED_TIME, u->low_speed_time_s);
    SET(CURLOPT_TCP_KEEPALIVE, 1L);
    /* Bigger reads than the 16 KiB default: a blob's bytes reach the spool
     * in fewer writes and wake its readers less often (bench/findings.md). */
    SET(CURLOPT_BUFFERSIZE, 256L * 1024);
    /* headers of a proxy's CONNECT answer must not look like ours */
    SET(CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L);
    /* No CURLOPT_ACCEPT_ENCODING: bodies must arrive byte for byte as
     * stored upstream, since their digests are checked. */
    if (u->ca_file) SET(CURLOPT_CAINFO, u->ca_file);
    SET(CURLOPT_SSL_VERIFYPEER, u->tls_verify ? 1L : 0L);
    SET(CURLOPT_SSL_VERIFYHOST, u->tls_verify ? 2L : 0L);
    SET(CURLOPT_HEADERFUNCTION, header_cb);
    SET(CURLOPT_HEADERDATA, x);
    SET(CURLOPT_WRITEFUNCTION, write_cb);
    SET(CURLOPT_WRITEDATA, x);
    SET(CURLOPT_ERRORBUFFER, x->errbuf);
    if (x->req->on_tick) {
        SET(CURLOPT_XFERINFOFUNCTION, tick_cb);
        SET(CURLOPT_XFERINFODATA, x);
        SET(CURLOPT_NOPROGRESS, 0L);
    }
#undef SET
    return rc;
}

static bool is_tls_error(CURLcode c) {
    switch (c) {
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_SSL_ENGINE_NOTFOUND:
        case CURLE_SSL_ENGINE_SETFAILED:
        case CURLE_SSL_CERTPROBLEM:
        case CURLE_SSL_CIPHER:
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_ENGINE_INITFAILED:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_SHUTDOWN_FAILED:
        case CURLE_SSL_CRL_BADFILE:
        case CURLE_SSL_ISSUER_ERROR:
        case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
        case CURLE_SSL_INVALIDCERTSTATUS:
        case CURLE_SSL_CLIENTCERT:
        case CURLE_USE_SSL_FAILED:
            return true;
        default:
            return false;
    }
}

/* Map a libcurl failure to our result. answered: a final answer had
 * begun (a failure then breaks it midway); redirected: the URL that failed
 * came from the upstream's Location. */
static upstream_result curl_failure_result(CURLcode c, bool answered, bool redirected) {
    if (is_tls_error(c)) return UPSTREAM_ERR_TLS;
    switch (c) {
        case CURLE_OPERATION_TIMEDOUT:
            return UPSTREAM_ERR_TIMEOUT;
        case CURLE_TOO_MANY_REDIRECTS:
        case CURLE_UNSUPPORTED_PROTOCOL: /* a redirect to a scheme we refuse */
            return UPSTREAM_ERR_TRANSFER;
        case CURLE_URL_MALFORMAT:
            /* our own URL was checked; after a redirect it is the upstream's
         * Location that is broken */
            return redirected ? UPSTREAM_ERR_TRANSFER : UPSTREAM_ERR_INTERNAL;
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_RESOLVE_PROXY:
        case CURLE_COULDNT_CONNECT:
            return UPSTREAM_ERR_CONNECT;
        case CURLE_OUT_OF_MEMORY:
        case CURLE_FAILED_INIT:
        case CURLE_BAD_FUNCTION_ARGUMENT:
        case CURLE_UNKNOWN_OPTION:
        case CURLE_NOT_BUILT_IN:
        case CURLE_WRITE_ERROR: /* not the caller's (it would have aborted): libcurl's own */
            return UPSTREAM_ERR_INTERNAL;
        default:
            /* SEND_ERROR, RECV_ERROR, GOT_NOTHING, PARTIAL_FILE, HTTP2 errors,
         * WEIRD_SERVER_REPLY...: before a final answer arrived, the peer
         * could not be reached properly (reset before an answer, or a
         * redirect target that does not answer); after it, the answer
         * broke midway. */
            return answered ? UPSTREAM_ERR_TRANSFER : UPSTREAM_ERR_CONNECT;
    }
}

/* Map a libcurl failure of a transfer to our result. */
static upstream_result map_curl_error(CURLcode c, const xfer *x) {
    if (x->aborted) return UPSTREAM_ERR_ABORTED;
    return curl_failure_result(c, x->final_seen, x->redirects > 0);
}

/* out = "could not resolve host NAME" for url's host; false when url has none. */
static bool could_not_resolve(const char *url, char *out, size_t outlen) {
    CURLU *cu = curl_url();
    char *host = NULL;
    bool ok = cu && curl_url_set(cu, CURLUPART_URL, url, 0) == CURLUE_OK &&
              curl_url_get(cu, CURLUPART_HOST, &host, 0) == CURLUE_OK && host;
    if (ok) snprintf(out, outlen, "could not resolve host %s", host);
    curl_free(host);
    curl_url_cleanup(cu);
    return ok;
}

static void curl_failure_message(upstream *u, CURL *h, const upstream_request *req, const char *url, CURLcode c,
                                 const xfer *x, char *err, size_t errlen) {
    char shown[2048], eff[1024] = "";
    url_for_message(url, shown, sizeof shown, true);
    char *effective = NULL;
    if (curl_easy_getinfo(h, CURLINFO_EFFECTIVE_URL, &effective) == CURLE_OK && effective &&
        strcmp(effective, url) != 0) {
        char e[900];
        url_for_message(effective, e, sizeof e, false);
        snprintf(eff, sizeof eff, " (redirected to %s)", e);
    }
    const char *why;
    char resolve[300];
    if (x->aborted)
        why = "aborted by the receiver";
    else if (c == CURLE_COULDNT_RESOLVE_HOST && could_not_resolve(effective ? effective : url, resolve, sizeof resolve))
        why = resolve; /* the same words whatever libcurl's version says */
    else
        why = x->errbuf[0] ? x->errbuf : curl_easy_strerror(c);
    errmsg_set(err, errlen, "upstream %s: %s %s%s: %s", u->name, req->method, shown, eff, why);
}

/* ------------------------------------------------------------------ */
/* token request */

typedef struct {
    char *buf;
    size_t len;
    bool too_big;
    long status;
    char errbuf[CURL_ERROR_SIZE];
} token_xfer;

static size_t token_write_cb(char *data, size_t size, size_t nmemb, void *ud) {
    token_xfer *t = ud;
    size_t total = size * nmemb;
    if (t->len + total > TOKEN_BODY_MAX) {
        t->too_big = true;
        return 0;
    }
    char *nb = realloc(t->buf, t->len + total + 1);
    if (!nb) return 0;
    memcpy(nb + t->len, data, total);
    t->buf = nb;
    t->len += total;
    t->buf[t->len] = '\0';
    return total;
}

/* Build realm?service=..&scope=.. ; NULL on allocation failure. */
static char *token_url(CURL *h, const char *realm, const char *service, const char *scope) {
    char *es = service[0] ? curl_easy_escape(h, service, 0) : NULL;
    char *sc = scope[0] ? curl_easy_escape(h, scope, 0) : NULL;
    if ((service[0] && !es) || (scope[0] && !sc)) {
        curl_free(es);
        curl_free(sc);
        return NULL;
    }
    char sep = strchr(realm, '?') ? '&' : '?';
    char *url;
    if (es && sc)
        url = xasprintf("%s%cservice=%s&scope=%s", realm, sep, es, sc);
    else if (es)
        url = xasprintf("%s%cservice=%s", realm, sep, es);
    else if (sc)
        url = xasprintf("%s%cscope=%s", realm, sep, sc);
    else
        url = xstrdup(realm);
    curl_free(es);
    curl_free(sc);
    return url;
}

/* The OAuth2 refresh-token grant's form (as Docker and containerd send
 * it), malloc'd; NULL on allocation failure. Holds the token: wipe it. */
static char *refresh_grant_form(CURL *h, const char *refresh_token, const char *service, const char *scope) {
    char *et = curl_easy_escape(h, refresh_token, 0);
    char *es = curl_easy_escape(h, service, 0);
    char *sc = curl_easy_escape(h, scope, 0);
    char *form = NULL;
    if (et && es && sc)
        form = xasprintf("grant_type=refresh_token&refresh_token=%s&service=%s%s%s&client_id=regfacade", et, es,
                         scope[0] ? "&scope=" : "", sc);
    if (et) secret_wipe(et, strlen(et));
    curl_free(et);
    curl_free(es);
    curl_free(sc);
    return form;
}

/* Get a token for the challenge with the credentials cr (anonymous when
 * cr->username is NULL). On success returns UPSTREAM_OK and a malloc'd
 * token in *token_out; on failure, with err filled (never with a secret in
 * it): UPSTREAM_ERR_DENIED when the realm refused the credentials, the
 * transport's failure when it could not be asked (a name that does not
 * resolve is worth a retry like any other), and UPSTREAM_ERR_AUTH for
 * anything else. The realm is the one the upstream named: our Basic
 * credentials go there, as every registry client does; an identity token
 * goes there only in a refresh-token grant (POST), never as Basic. */
static upstream_result fetch_token(upstream *u, CURL *h, const www_authenticate *chal, const char *our_scope,
                                   const char *cache_scope, const credential *cr, char **token_out, char *err,
                                   size_t errlen) {
    *token_out = NULL;
    char realm_shown[1100];
    url_for_message(chal->realm, realm_shown, sizeof realm_shown, false);
    bool with_user = cr->username != NULL;
    bool refresh = with_user && cr->identity_token;
    const char *how = refresh ? "POST (refresh-token grant)" : "GET";

    bool realm_https = strncasecmp(chal->realm, "https://", 8) == 0;
    if (!realm_https && strncasecmp(chal->realm, "http://", 7) != 0) {
        errmsg_set(err, errlen, "upstream %s: token realm %s is not an http(s) URL", u->name, realm_shown);
        return UPSTREAM_ERR_AUTH;
    }
    if (has_ctl_or_space(chal->realm)) {
        errmsg_set(err, errlen, "upstream %s: token realm contains spaces or control characters", u->name);
        return UPSTREAM_ERR_AUTH;
    }
    if (with_user && u->https && !realm_https) {
        /* Credentials configured for an https upstream are not sent in
         * clear text to a realm it names. */
        errmsg_set(err, errlen,
                   "upstream %s: token realm %s is plain http but the upstream is https; refusing to "
                   "send credentials",
                   u->name, realm_shown);
        return UPSTREAM_ERR_AUTH;
    }

    const char *scope = chal->scope[0] ? chal->scope : our_scope;
    char *url = refresh ? xstrdup(chal->realm) : token_url(h, chal->realm, chal->service, scope);
    char *form = refresh ? refresh_grant_form(h, cr->secret, chal->service, scope) : NULL;
    if (!url || (refresh && !form)) {
        free(url);
        secret_free(form);
        errmsg_set(err, errlen, "upstream %s: out of memory", u->name);
        return UPSTREAM_ERR_AUTH;
    }

    token_xfer t = {0};
    struct curl_slist *hdrs = NULL;
    upstream_result ret = UPSTREAM_ERR_AUTH;
    curl_easy_reset(h);
    CURLcode rc = CURLE_OK;
#define SET(opt, val)                                           \
    do {                                                        \
        if (rc == CURLE_OK) rc = curl_easy_setopt(h, opt, val); \
    } while (0)
    SET(CURLOPT_URL, url);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_SHARE, u->share);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_FOLLOWLOCATION, 1L);
    SET(CURLOPT_MAXREDIRS, UPSTREAM_MAX_REDIRS);
    SET(CURLOPT_UNRESTRICTED_AUTH, 0L); /* as for the main request: see common_setup() */
    SET(CURLOPT_USERAGENT, u->user_agent);
    SET(CURLOPT_CONNECTTIMEOUT_MS, u->connect_timeout_ms);
    SET(CURLOPT_TIMEOUT_MS, TOKEN_REQUEST_TIMEOUT_MS);
    SET(CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L);
    if (u->ca_file) SET(CURLOPT_CAINFO, u->ca_file);
    SET(CURLOPT_SSL_VERIFYPEER, u->tls_verify ? 1L : 0L);
    SET(CURLOPT_SSL_VERIFYHOST, u->tls_verify ? 2L : 0L);
    SET(CURLOPT_WRITEFUNCTION, token_write_cb);
    SET(CURLOPT_WRITEDATA, &t);
    SET(CURLOPT_ERRORBUFFER, t.errbuf);
    /* The form stays ours (not copied by libcurl) so that it is wiped. */
    if (refresh) SET(CURLOPT_POSTFIELDS, form);
#undef SET
    if (rc == CURLE_OK) {
        struct curl_slist *n = curl_slist_append(hdrs, "Accept: application/json");
        if (n)
            hdrs = n;
        else
            rc = CURLE_OUT_OF_MEMORY;
    }
    if (rc == CURLE_OK && with_user && !refresh) {
        char *basic = basic_auth_header(cr);
        struct curl_slist *n = basic ? curl_slist_append(hdrs, basic) : NULL;
        secret_free(basic);
        if (n)
            hdrs = n;
        else
            rc = CURLE_OUT_OF_MEMORY;
    }
    if (rc == CURLE_OK) rc = curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    if (rc != CURLE_OK) {
        errmsg_set(err, errlen, "upstream %s: token request to %s: cannot set up libcurl: %s", u->name, realm_shown,
                   curl_easy_strerror(rc));
        goto out;
    }

    rc = curl_easy_perform(h);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &t.status);
    if (rc != CURLE_OK) {
        char resolve[300];
        if (t.too_big)
            errmsg_set(err, errlen, "upstream %s: token request %s %s: response larger than %d bytes", u->name, how,
                       realm_shown, TOKEN_BODY_MAX);
        else
            errmsg_set(err, errlen, "upstream %s: token request %s %s: %s", u->name, how, realm_shown,
                       rc == CURLE_COULDNT_RESOLVE_HOST && could_not_resolve(url, resolve, sizeof resolve) ? resolve
                       : t.errbuf[0]                                                                       ? t.errbuf
                                     : curl_easy_strerror(rc));
        if (!t.too_big) ret = curl_failure_result(rc, t.status != 0, false);
        goto out;
    }
    if (t.status != 200) {
        /* An OAuth2 server refuses a refresh token with 400 invalid_grant. */
        bool refused = t.status == 401 || t.status == 403 || (refresh && t.status == 400);
        errmsg_set(err, errlen, "upstream %s: token request %s %s: HTTP status %ld%s", u->name, how, realm_shown,
                   t.status, refused ? " (credentials refused?)" : "");
        if (refused) ret = UPSTREAM_ERR_DENIED; /* refused, not broken */
        goto out;
    }

    char jerr[160];
    json_value *root = json_parse(t.buf ? t.buf : "", t.len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    if (!root) {
        errmsg_set(err, errlen, "upstream %s: token request %s %s: response is not JSON: %s", u->name, how, realm_shown,
                   jerr);
        goto out;
    }
    const char *tok = json_object_get_string(root, "token");
    if (!tok || !*tok) tok = json_object_get_string(root, "access_token");
    if (!tok || !*tok || has_ctl_or_space(tok)) {
        errmsg_set(err, errlen,
                   "upstream %s: token request %s %s: response has no usable \"token\" or "
                   "\"access_token\"",
                   u->name, how, realm_shown);
        json_free(root);
        goto out;
    }
    int64_t ttl = TOKEN_DEFAULT_TTL_S;
    int64_t e;
    if (json_get_int64(json_object_get(root, "expires_in"), &e) && e > 0) ttl = e;
    *token_out = xstrdup(tok);
    if (*token_out) {
        token_cache_put(u, cache_scope, u->with_creds, tok, ttl);
        ret = UPSTREAM_OK;
    } else {
        errmsg_set(err, errlen, "upstream %s: out of memory", u->name);
    }
    /* the parsed tree holds the tokens too (a rotated refresh_token is not
     * kept: the configured one is asked again) */
    static const char *const secrets[] = {"token", "access_token", "refresh_token"};
    for (size_t i = 0; i < sizeof secrets / sizeof secrets[0]; i++) {
        json_value *tv = json_object_get(root, secrets[i]);
        if (tv && tv->str) secret_wipe(tv->str, tv->len);
    }
    json_free(root);

out:
    /* libcurl keeps no pointer to the list or the form after this */
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
    if (refresh) curl_easy_setopt(h, CURLOPT_POSTFIELDS, NULL);
    slist_free_wiped(hdrs);
    secret_free(form);
    if (t.buf) {
        secret_wipe(t.buf, t.len);
        free(t.buf);
    }
    free(url);
    return ret;
}

/* ------------------------------------------------------------------ */
/* the request */

typedef enum { SEND_NONE, SEND_BEARER, SEND_BASIC } send_auth;

/* Every option of one attempt on h: the common ones, HEAD, and the header
 * list (Accept, Range, Authorization), returned in *hdrs for the caller to
 * free after the transfer. */
static CURLcode request_setup(upstream *u, CURL *h, xfer *x, const char *url, const upstream_request *req,
                              send_auth how, const char *token, const credential *cr, struct curl_slist **hdrs) {
    *hdrs = NULL;
    curl_easy_reset(h);
    CURLcode rc = common_setup(u, h, x, url);
    if (rc == CURLE_OK && strcmp(x->req->method, "HEAD") == 0) rc = curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    /* Build the header list; each append is checked. */
    char *lines[3] = {NULL, NULL, NULL};
    int nl = 0;
    if (req->accept && *req->accept) lines[nl++] = xasprintf("Accept: %s", req->accept);
    if (req->range_start > 0) lines[nl++] = xasprintf("Range: bytes=%" PRIu64 "-", req->range_start);
    if (how == SEND_BEARER)
        lines[nl++] = xasprintf("Authorization: Bearer %s", token);
    else if (how == SEND_BASIC)
        lines[nl++] = basic_auth_header(cr);
    for (int i = 0; i < nl; i++) {
        struct curl_slist *n = lines[i] ? curl_slist_append(*hdrs, lines[i]) : NULL;
        if (n)
            *hdrs = n;
        else if (rc == CURLE_OK)
            rc = CURLE_OUT_OF_MEMORY;
        secret_free(lines[i]);
    }
    if (rc == CURLE_OK && *hdrs) rc = curl_easy_setopt(h, CURLOPT_HTTPHEADER, *hdrs);
    return rc;
}

/* The credentials of this request, asked for once (a helper may run). 0,
 * or -1 with err naming the helper. */
static int request_credentials(upstream *u, credential *cr, bool *have, char *err, size_t errlen) {
    if (*have) return 0;
    char why[900];
    if (credentials_get(u->creds, cr, why, sizeof why) != 0) {
        errmsg_set(err, errlen, "upstream %s: no credentials: %s", u->name, why);
        return -1;
    }
    *have = true;
    return 0;
}

/* The upstream refused cr. When a helper gave it, forget its answer and
 * ask again: true with cr replaced. False when asking again cannot help
 * (*res untouched) or the helper failed (*res = UPSTREAM_ERR_AUTH, err
 * says why). */
static bool reask_credentials(upstream *u, credential *cr, char *err, size_t errlen, upstream_result *res) {
    if (!credentials_refused(u->creds, cr)) return false;
    credential_clear(cr);
    bool have = false;
    if (request_credentials(u, cr, &have, err, errlen) != 0) {
        *res = UPSTREAM_ERR_AUTH;
        return false;
    }
    return true;
}

/* One request to base URL number bi. *delivered: on_headers was called (the
 * caller saw an answer), so another base must not be tried for it. */
static upstream_result perform_base(upstream *u, size_t bi, const upstream_request *req, upstream_response *resp,
                                    bool *delivered, char *err, size_t errlen) {
    *delivered = false;
    if (err && errlen) err[0] = '\0';
    if (resp) response_reset(resp);
    if (!u || !req || !resp) {
        errmsg_set(err, errlen, "upstream: bad arguments");
        return UPSTREAM_ERR_INTERNAL;
    }
    const char *method = req->method ? req->method : "GET";
    bool head = strcmp(method, "HEAD") == 0;
    if (!head && strcmp(method, "GET") != 0) {
        errmsg_set(err, errlen, "upstream %s: method %s is not supported", u->name, method);
        return UPSTREAM_ERR_INTERNAL;
    }
    const char *path = req->path ? req->path : "";
    if (has_ctl_or_space(path) || path[0] == '/') {
        errmsg_set(err, errlen, "upstream %s: invalid request path", u->name);
        return UPSTREAM_ERR_INTERNAL;
    }
    if (req->accept && has_ctl(req->accept)) {
        errmsg_set(err, errlen, "upstream %s: invalid Accept value", u->name);
        return UPSTREAM_ERR_INTERNAL;
    }
    const char *repo = req->repository ? req->repository : "";
    if (has_ctl_or_space(repo)) {
        errmsg_set(err, errlen, "upstream %s: invalid repository name", u->name);
        return UPSTREAM_ERR_INTERNAL;
    }

    /* the request we describe in errors: the caller's method even when a
     * NULL method meant GET */
    upstream_request rq = *req;
    rq.method = method;

    char *url = xasprintf("%s/v2/%s", u->bases[bi], path);
    char *scope = repo[0] ? xasprintf("repository:%s:pull", repo) : xstrdup("");
    /* tokens are cached per base URL: a mirror's realm is not the main's */
    char *cscope = bi == 0 ? xstrdup(scope ? scope : "") : xasprintf("%zu|%s", bi, scope ? scope : "");
    bool reused = false, healthy = true;
    CURL *h = pool_get(u, &reused);
    upstream_result res = UPSTREAM_ERR_INTERNAL;
    char *token = NULL;
    credential cr = {0}; /* asked for only when this request needs it */
    if (!url || !scope || !cscope || !h) {
        errmsg_set(err, errlen, "upstream %s: out of memory or libcurl init failure", u->name);
        goto out;
    }

    bool creds = u->with_creds;
    bool have_cr = false;
    bool reasked = false; /* the helper was asked again after a refusal */
    send_auth how = SEND_NONE;
    token = token_cache_get(u, cscope, creds);
    if (token) {
        how = SEND_BEARER;
    } else if (creds && basic_known(u)) {
        if (request_credentials(u, &cr, &have_cr, err, errlen) != 0) {
            res = UPSTREAM_ERR_AUTH;
            goto out;
        }
        if (cr.username && !cr.identity_token) how = SEND_BASIC;
    }

    for (int attempt = 0; attempt < 3; attempt++) {
        xfer x;
        memset(&x, 0, sizeof x);
        x.u = u;
        x.req = &rq;
        x.resp = resp;
        x.may_retry_auth = attempt == 0;
        x.sent_basic = how == SEND_BASIC;
        x.ph = PH_HEADERS;
        response_reset(resp);

        struct curl_slist *hdrs = NULL;
        CURLcode rc = request_setup(u, h, &x, url, &rq, how, token, &cr, &hdrs);
        if (rc != CURLE_OK && reused) {
            /* A pooled handle that libcurl will not set up again: a fresh
             * one takes its place, so one broken handle never fails a
             * request (nor, returned to the pool, every later one). */
            slist_free_wiped(hdrs);
            curl_easy_cleanup(h);
            reused = false;
            h = curl_easy_init();
            rc = h ? request_setup(u, h, &x, url, &rq, how, token, &cr, &hdrs) : CURLE_FAILED_INIT;
        }
        if (rc != CURLE_OK) {
            errmsg_set(err, errlen, "upstream %s: %s %s: cannot set up libcurl: %s", u->name, method, url,
                       curl_easy_strerror(rc));
            slist_free_wiped(hdrs);
            healthy = false;
            res = UPSTREAM_ERR_INTERNAL;
            goto out;
        }

        rc = curl_easy_perform(h);
        /* libcurl keeps no pointer to the list after perform */
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
        slist_free_wiped(hdrs);
        *delivered = x.delivered;

        if (rc != CURLE_OK) {
            healthy = false;
            res = map_curl_error(rc, &x);
            curl_failure_message(u, h, &rq, url, rc, &x, err, errlen);
            goto out;
        }

        if (x.plan == AUTH_BAD) {
            errmsg_set(err, errlen, "upstream %s: %s %s: 401 with %s", u->name, method, url, x.plan_err);
            res = UPSTREAM_ERR_AUTH;
            goto out;
        }
        if (x.plan == AUTH_BEARER) {
            if (how == SEND_BEARER) token_cache_drop(u, cscope, creds, token); /* refused: do not reuse it */
            set_basic_known(u, false);
            secret_free(token);
            token = NULL;
            if (request_credentials(u, &cr, &have_cr, err, errlen) != 0) {
                res = UPSTREAM_ERR_AUTH;
                goto out;
            }
            res = fetch_token(u, h, &x.chal, scope, cscope, &cr, &token, err, errlen);
            if (res == UPSTREAM_ERR_DENIED && !reasked) {
                /* The realm refused them: a helper may have newer ones. */
                upstream_result rr = UPSTREAM_OK;
                if (reask_credentials(u, &cr, err, errlen, &rr)) {
                    reasked = true;
                    res = fetch_token(u, h, &x.chal, scope, cscope, &cr, &token, err, errlen);
                } else if (rr != UPSTREAM_OK) {
                    res = rr; /* the helper failed when asked again */
                    goto out;
                }
            }
            if (res != UPSTREAM_OK) {
                healthy = false; /* the token request may have failed in libcurl */
                goto out;
            }
            how = SEND_BEARER;
            continue;
        }
        if (x.plan == AUTH_BASIC) {
            if (how == SEND_BEARER) token_cache_drop(u, cscope, creds, token); /* the upstream moved to Basic */
            set_basic_known(u, true);
            if (request_credentials(u, &cr, &have_cr, err, errlen) != 0) {
                res = UPSTREAM_ERR_AUTH;
                goto out;
            }
            /* None for this server (or only an identity token, which is
             * never Basic): the 401 is the answer. */
            if (!cr.username || cr.identity_token) {
                res = UPSTREAM_OK;
                break;
            }
            how = SEND_BASIC;
            continue;
        }
        if (resp->status == 401 && how == SEND_BASIC && !reasked) {
            /* Basic refused: a helper may have a newer password. */
            upstream_result rr = UPSTREAM_OK;
            if (reask_credentials(u, &cr, err, errlen, &rr)) {
                reasked = true;
                if (cr.username && !cr.identity_token) continue;
            } else if (rr != UPSTREAM_OK) {
                res = rr;
                goto out;
            }
        }
        if (resp->status == 401 && x.may_retry_auth && resp->www_authenticate[0] == '\0' && how == SEND_BEARER) {
            /* refused without a new challenge: forget the token anyway */
            token_cache_drop(u, cscope, creds, token);
        }
        res = UPSTREAM_OK;
        break;
    }

out:
    credential_clear(&cr);
    metrics_upstream_request(u->name, resp->status, res == UPSTREAM_OK ? NULL : upstream_result_name(res));
    metrics_upstream_ratelimit(u->name, resp->ratelimit_remaining);
    if (token) secret_free(token);
    pool_put(u, h, healthy);
    free(url);
    free(scope);
    free(cscope);
    return res;
}

size_t upstream_base_count(const upstream *u) { return u ? u->nbases : 0; }

/* Whether a failure of a base, before anything was delivered, sends the
 * request on to the next base. */
static bool base_failed(upstream_result res, const upstream_response *resp) {
    if (res == UPSTREAM_OK) return resp->status >= 500 || resp->status == 429;
    return res == UPSTREAM_ERR_CONNECT || res == UPSTREAM_ERR_TLS || res == UPSTREAM_ERR_TIMEOUT ||
           res == UPSTREAM_ERR_TRANSFER;
}

static void base_mark_down(upstream *u, size_t bi, const upstream_response *resp) {
    long ms = UPSTREAM_BASE_DOWN_MS;
    if (resp->status == 429) {
        long ra = upstream_parse_retry_after(resp->retry_after);
        if (ra > ms) ms = ra < UPSTREAM_BASE_DOWN_MAX_MS ? ra : UPSTREAM_BASE_DOWN_MAX_MS;
    }
    pthread_mutex_lock(&u->pool_mu);
    u->down_until[bi] = clock_monotonic_ms() + ms;
    pthread_mutex_unlock(&u->pool_mu);
}

upstream_result upstream_perform(upstream *u, const upstream_request *req, upstream_response *resp, char *err,
                                 size_t errlen) {
    if (!u || !req || !resp || u->nbases <= 1) {
        bool delivered;
        return perform_base(u, 0, req, resp, &delivered, err, errlen);
    }
    /* The order: bases not skipped, in configured order; then the skipped
     * ones, so a request is never refused without trying. */
    size_t order[UPSTREAM_MAX_BASES], n = 0;
    int64_t now = clock_monotonic_ms();
    pthread_mutex_lock(&u->pool_mu);
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < u->nbases; i++)
            if ((u->down_until[i] <= now) == (pass == 0)) order[n++] = i;
    pthread_mutex_unlock(&u->pool_mu);

    char tried[600] = "";
    upstream_result res = UPSTREAM_ERR_INTERNAL;
    for (size_t k = 0; k < n; k++) {
        size_t bi = order[k];
        bool delivered = false;
        res = perform_base(u, bi, req, resp, &delivered, err, errlen);
        bool failed = base_failed(res, resp);
        if (failed)
            base_mark_down(u, bi, resp);
        else if (res == UPSTREAM_OK) {
            pthread_mutex_lock(&u->pool_mu);
            u->down_until[bi] = 0; /* it answers again */
            pthread_mutex_unlock(&u->pool_mu);
        }
        if (!failed || delivered || k + 1 == n) break;
        /* Next base; remember this one for the final message. */
        char shown[300];
        url_for_message(u->bases[bi], shown, sizeof shown, false);
        size_t tl = strlen(tried);
        if (tl < sizeof tried - 1)
            snprintf(tried + tl, sizeof tried - tl, "%s%s: %s", tl ? ", " : "", shown,
                     res == UPSTREAM_OK ? (resp->status == 429 ? "429" : "5xx") : upstream_result_name(res));
    }
    if (tried[0] && res != UPSTREAM_OK && err && errlen) {
        size_t el = strlen(err);
        if (el < errlen - 1) snprintf(err + el, errlen - el, " (tried before: %s)", tried);
    }
    return res;
}

/* ------------------------------------------------------------------ */
/* retry pacing */

static uint32_t jitter_u32(void) { return arc4random(); }

void upstream_sleep_ms(long ms) {
    if (ms <= 0) return;
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

long upstream_parse_retry_after(const char *v) {
    if (!v) return -1;
    while (*v == ' ' || *v == '\t') v++;
    if (!*v) return -1;
    if (*v >= '0' && *v <= '9') {
        int64_t n = 0;
        const char *p = v;
        for (; *p >= '0' && *p <= '9'; p++) {
            if (n > 100000000) return -1;
            n = n * 10 + (*p - '0');
        }
        while (*p == ' ' || *p == '\t') p++;
        if (*p) return -1;
        return (long)(n * 1000);
    }
    time_t when = curl_getdate(v, NULL);
    if (when == (time_t)-1) return -1;
    time_t now = time(NULL);
    if (when <= now) return 0;
    int64_t d = (int64_t)(when - now);
    return d > 100000000 ? 100000000L * 1000 : (long)(d * 1000);
}

void upstream_retry_init(upstream_retry *r) {
    r->failures = 0;
    r->start_ms = clock_monotonic_ms();
}

void upstream_retry_progress(upstream_retry *r) { upstream_retry_init(r); }

long upstream_retry_delay(const upstream *u, upstream_retry *r, const char *retry_after, char *why, size_t whylen) {
    r->failures++;
    if (r->failures > u->retries) {
        errmsg_set(why, whylen, "%d retr%s spent (upstream_client.retries)", u->retries, u->retries == 1 ? "y" : "ies");
        return -1;
    }
    long base = u->backoff_ms;
    for (int i = 1; i < r->failures && base < UPSTREAM_BACKOFF_MAX_MS; i++) base *= 2;
    if (base > UPSTREAM_BACKOFF_MAX_MS) base = UPSTREAM_BACKOFF_MAX_MS;
    long delay = base / 2 + (long)(jitter_u32() % (uint32_t)(base + 1));
    long ra = upstream_parse_retry_after(retry_after);
    int64_t left = r->start_ms + u->retry_budget_ms - clock_monotonic_ms();
    if (ra >= 0 && ra > left) {
        errmsg_set(why, whylen,
                   "the upstream asks to wait %lds (Retry-After), more than the %llds left of the "
                   "retry budget (upstream_client.retry_budget_seconds)",
                   (ra + 999) / 1000, (long long)(left > 0 ? left / 1000 : 0));
        return -1;
    }
    if (ra > delay) delay = ra;
    if (delay > left) {
        errmsg_set(why, whylen, "the retry budget of %lds is spent (upstream_client.retry_budget_seconds)",
                   u->retry_budget_ms / 1000);
        return -1;
    }
    return delay;
}
