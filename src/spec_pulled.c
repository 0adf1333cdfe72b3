/* spec_pulled: the pulled spec provider (see include/regfacade/spec_pulled.h).
 *
 * libcurl directly rather than upstream.c: upstream_perform() speaks the
 * distribution API (a /v2/ path, the token flow, mirrors), none of which a
 * spec service has, and it has no client certificates. The timeouts and
 * the retry pacing follow the upstream client's (connect timeout from
 * upstream_client, exponential backoff with jitter within a budget). */
#include "regfacade/spec_pulled.h"

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "regfacade/clock.h"
#include "regfacade/log.h"

#define DEFAULT_CONNECT_TIMEOUT_MS 10000
#define DEFAULT_TIMEOUT_MS 10000
#define DEFAULT_RETRIES 3
#define DEFAULT_RETRY_BUDGET_MS 15000
#define DEFAULT_CACHE_ENTRIES 1024
#define DEFAULT_CACHE_BYTES (16 * 1024 * 1024)
#define FIRST_BACKOFF_MS 200
#define MAX_BACKOFF_MS 5000

typedef struct entry {
    char *id;
    json_value *spec;
    size_t bytes;
    int64_t expires_ms;
    struct entry *prev, *next; /* LRU: head is the most recently used */
} entry;

typedef struct flight {
    char *id;
    bool done;
    int refs;
    specs_result result;
    json_value *spec; /* FOUND: the leader's tree; each waiter gets a clone */
    char why[512];
    struct flight *next;
} flight;

struct spec_pulled {
    char *name, *url, *ca_file, *cert, *key, *auth_header;
    bool tls_verify;
    long connect_timeout_ms, timeout_ms, retry_budget_ms, ttl_s;
    int retries;
    size_t max_entries, max_cache_bytes, max_bytes;
    json_value *(*parse)(void *ud, const char *text, size_t len, char *err, size_t errlen);
    void *ud;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    entry *head, *tail;
    size_t n_entries, cache_bytes;
    flight *flights;
    spec_pulled_stats stats;
};

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

char *spec_pulled_url(const char *url, const char *id) {
    const char *mark = strstr(url, "{id}");
    size_t n = strlen(url) + strlen(id) * 4 + 2;
    char *out = malloc(n);
    if (!out) return NULL;
    if (!mark) {
        size_t ul = strlen(url);
        snprintf(out, n, "%s%s%s", url, ul && url[ul - 1] == '/' ? "" : "/", id);
        return out;
    }
    size_t o = 0;
    for (const char *p = url; *p;) {
        if (strncmp(p, "{id}", 4) == 0) {
            o += (size_t)snprintf(out + o, n - o, "%s", id);
            p += 4;
        } else {
            out[o++] = *p++;
        }
        if (o >= n - 1) break;
    }
    out[o < n ? o : n - 1] = '\0';
    return out;
}

spec_pulled *spec_pulled_new(const spec_pulled_options *o, char *err, size_t errlen) {
    if (!o->url || !o->parse) {
        snprintf(err, errlen, "spec provider %s: url and parse are required", o->name ? o->name : "?");
        return NULL;
    }
    spec_pulled *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errlen, "spec provider %s: out of memory", o->name ? o->name : "?");
        return NULL;
    }
    p->name = strdup(o->name ? o->name : "pulled");
    p->url = strdup(o->url);
    p->ca_file = dup_or_null(o->ca_file);
    p->cert = dup_or_null(o->client_cert_file);
    p->key = dup_or_null(o->client_key_file);
    if (o->token) {
        size_t n = strlen(o->token) + 32;
        p->auth_header = malloc(n);
        if (p->auth_header) snprintf(p->auth_header, n, "Authorization: Bearer %s", o->token);
    }
    p->tls_verify = o->tls_verify;
    p->connect_timeout_ms = o->connect_timeout_ms > 0 ? o->connect_timeout_ms : DEFAULT_CONNECT_TIMEOUT_MS;
    p->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : DEFAULT_TIMEOUT_MS;
    p->retries = o->retries >= 0 ? o->retries : DEFAULT_RETRIES;
    p->retry_budget_ms = o->retry_budget_ms > 0 ? o->retry_budget_ms : DEFAULT_RETRY_BUDGET_MS;
    p->ttl_s = o->ttl_s > 0 ? o->ttl_s : 0;
    p->max_entries = o->cache_max_entries ? o->cache_max_entries : DEFAULT_CACHE_ENTRIES;
    p->max_cache_bytes = o->cache_max_bytes ? o->cache_max_bytes : DEFAULT_CACHE_BYTES;
    p->max_bytes = o->max_bytes ? o->max_bytes : SPECS_DEFAULT_MAX_BYTES;
    p->parse = o->parse;
    p->ud = o->ud;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    if (!p->name || !p->url || (o->ca_file && !p->ca_file) || (o->client_cert_file && !p->cert) ||
        (o->client_key_file && !p->key) || (o->token && !p->auth_header)) {
        snprintf(err, errlen, "spec provider %s: out of memory", o->name ? o->name : "?");
        spec_pulled_free(p);
        return NULL;
    }
    return p;
}

static void entry_free(entry *e) {
    if (!e) return;
    free(e->id);
    json_free(e->spec);
    free(e);
}

void spec_pulled_free(spec_pulled *p) {
    if (!p) return;
    for (entry *e = p->head, *next; e; e = next) {
        next = e->next;
        entry_free(e);
    }
    /* No flight can be running: the server stopped its listeners first. */
    free(p->name);
    free(p->url);
    free(p->ca_file);
    free(p->cert);
    free(p->key);
    if (p->auth_header) {
        memset(p->auth_header, 0, strlen(p->auth_header));
        free(p->auth_header);
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}

/* ---------- the cache (caller holds mu) ---------- */

static void lru_unlink(spec_pulled *p, entry *e) {
    if (e->prev)
        e->prev->next = e->next;
    else
        p->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        p->tail = e->prev;
    e->prev = e->next = NULL;
}

static void lru_push_front(spec_pulled *p, entry *e) {
    e->prev = NULL;
    e->next = p->head;
    if (p->head) p->head->prev = e;
    p->head = e;
    if (!p->tail) p->tail = e;
}

static void cache_drop(spec_pulled *p, entry *e) {
    lru_unlink(p, e);
    p->n_entries--;
    p->cache_bytes -= e->bytes;
    entry_free(e);
}

static entry *cache_find(spec_pulled *p, const char *id) {
    for (entry *e = p->head; e; e = e->next)
        if (strcmp(e->id, id) == 0) return e;
    return NULL;
}

/* Keep a copy of spec for id (replacing an older one), then trim. */
static void cache_put(spec_pulled *p, const char *id, const json_value *spec) {
    if (p->ttl_s == 0) return;
    entry *old = cache_find(p, id);
    if (old) cache_drop(p, old);
    size_t bytes = 0;
    char *text = json_serialize(spec, &bytes);
    free(text);
    if (!text || bytes > p->max_cache_bytes) return;
    entry *e = calloc(1, sizeof *e);
    if (!e || !(e->id = strdup(id)) || !(e->spec = json_clone(spec))) {
        entry_free(e);
        return;
    }
    e->bytes = bytes;
    e->expires_ms = clock_monotonic_ms() + p->ttl_s * 1000;
    lru_push_front(p, e);
    p->n_entries++;
    p->cache_bytes += bytes;
    while (p->tail && (p->n_entries > p->max_entries || p->cache_bytes > p->max_cache_bytes)) cache_drop(p, p->tail);
}

/* ---------- one request to the service ---------- */

typedef struct {
    char *buf;
    size_t len, cap, max;
    bool too_big;
} body;

static size_t write_cb(char *data, size_t size, size_t n, void *ud) {
    body *b = ud;
    size_t len = size * n;
    if (b->len + len > b->max) {
        b->too_big = true;
        return 0; /* aborts the transfer */
    }
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->len + len + 1) cap *= 2;
        char *nb = realloc(b->buf, cap);
        if (!nb) return 0;
        b->buf = nb;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, data, len);
    b->len += len;
    b->buf[b->len] = '\0';
    return len;
}

typedef enum { TRY_OK, TRY_UNKNOWN, TRY_RETRY, TRY_FAIL, TRY_BAD } try_result;

/* One attempt. TRY_OK: *out set. Otherwise why filled. */
static try_result attempt(spec_pulled *p, const char *url, const char *id, json_value **out, char *why, size_t whylen) {
    CURL *h = curl_easy_init();
    if (!h) {
        snprintf(why, whylen, "spec provider %s: cannot set up an HTTP request", p->name);
        return TRY_FAIL;
    }
    body b = {.max = p->max_bytes};
    char errbuf[CURL_ERROR_SIZE] = "";
    struct curl_slist *hdrs = curl_slist_append(NULL, "Accept: application/json");
    if (hdrs && p->auth_header) hdrs = curl_slist_append(hdrs, p->auth_header);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "regfacade/" REGFACADE_VERSION);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, p->connect_timeout_ms);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, p->timeout_ms);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    if (p->ca_file) curl_easy_setopt(h, CURLOPT_CAINFO, p->ca_file);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, p->tls_verify ? 1L : 0L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, p->tls_verify ? 2L : 0L);
    if (p->cert) {
        curl_easy_setopt(h, CURLOPT_SSLCERT, p->cert);
        curl_easy_setopt(h, CURLOPT_SSLCERTTYPE, "PEM");
    }
    if (p->key) {
        curl_easy_setopt(h, CURLOPT_SSLKEY, p->key);
        curl_easy_setopt(h, CURLOPT_SSLKEYTYPE, "PEM");
    }
    CURLcode rc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(h);
    curl_slist_free_all(hdrs);
    try_result tr;
    if (b.too_big) {
        snprintf(why, whylen, "spec provider %s: the answer for \"%s\" is larger than %zu bytes (specs.max_bytes)",
                 p->name, id, p->max_bytes);
        tr = TRY_BAD;
    } else if (rc != CURLE_OK) {
        snprintf(why, whylen, "spec provider %s is unavailable: GET %s: %s", p->name, url,
                 errbuf[0] ? errbuf : curl_easy_strerror(rc));
        tr = rc == CURLE_SSL_CERTPROBLEM || rc == CURLE_SSL_CACERT_BADFILE || rc == CURLE_OUT_OF_MEMORY ? TRY_FAIL
                                                                                                        : TRY_RETRY;
    } else if (status == 404) {
        snprintf(why, whylen, "spec provider %s has no spec \"%s\"", p->name, id);
        tr = TRY_UNKNOWN;
    } else if (status >= 500 || status == 429 || status == 408) {
        snprintf(why, whylen, "spec provider %s is unavailable: GET %s answered %ld", p->name, url, status);
        tr = TRY_RETRY;
    } else if (status != 200) {
        snprintf(why, whylen, "spec provider %s is unavailable: GET %s answered %ld%s", p->name, url, status,
                 status == 401 || status == 403 ? " (it refused our credentials)" : "");
        tr = TRY_FAIL;
    } else {
        char perr[512];
        *out = p->parse(p->ud, b.buf ? b.buf : "", b.len, perr, sizeof perr);
        if (*out) {
            tr = TRY_OK;
        } else {
            snprintf(why, whylen, "spec provider %s sent an invalid spec for \"%s\": %s", p->name, id, perr);
            tr = TRY_BAD;
        }
    }
    free(b.buf);
    return tr;
}

/* Attempts with backoff. */
static specs_result fetch_spec(spec_pulled *p, const char *id, json_value **out, char *why, size_t whylen) {
    char *url = spec_pulled_url(p->url, id);
    if (!url) {
        snprintf(why, whylen, "spec provider %s: out of memory", p->name);
        return SPECS_UNAVAILABLE;
    }
    int64_t start = clock_monotonic_ms();
    long backoff = FIRST_BACKOFF_MS;
    specs_result res = SPECS_UNAVAILABLE;
    for (int n = 0;; n++) {
        try_result tr = attempt(p, url, id, out, why, whylen);
        if (tr == TRY_OK) {
            res = SPECS_FOUND;
            break;
        }
        if (tr == TRY_UNKNOWN) {
            res = SPECS_UNKNOWN;
            break;
        }
        if (tr == TRY_BAD) {
            res = SPECS_BAD_ANSWER;
            break;
        }
        if (tr == TRY_FAIL || n >= p->retries) break;
        /* Jitter: a wait in [backoff/2, 3*backoff/2]. */
        long wait = backoff / 2 + (long)((unsigned long)rand() % (unsigned long)(backoff + 1));
        if (clock_monotonic_ms() - start + wait > p->retry_budget_ms) break;
        sleep_ms(wait);
        backoff = backoff * 2 > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : backoff * 2;
    }
    free(url);
    return res;
}

/* ---------- look-ups ---------- */

static void flight_unref(spec_pulled *p, flight *f) {
    if (--f->refs > 0) return;
    for (flight **pp = &p->flights; *pp; pp = &(*pp)->next)
        if (*pp == f) {
            *pp = f->next;
            break;
        }
    free(f->id);
    json_free(f->spec);
    free(f);
}

/* A waiter's (or the leader's) share of a finished flight. */
static specs_result flight_take(flight *f, json_value **out, char *why, size_t whylen) {
    if (f->result == SPECS_FOUND) {
        *out = json_clone(f->spec);
        if (!*out) {
            snprintf(why, whylen, "out of memory");
            return SPECS_UNAVAILABLE;
        }
        return SPECS_FOUND;
    }
    snprintf(why, whylen, "%s", f->why);
    return f->result;
}

specs_result spec_pulled_get(spec_pulled *p, const char *id, json_value **out, char *why, size_t whylen) {
    *out = NULL;
    pthread_mutex_lock(&p->mu);
    p->stats.lookups++;
    entry *e = cache_find(p, id);
    if (e && e->expires_ms > clock_monotonic_ms()) {
        lru_unlink(p, e);
        lru_push_front(p, e);
        p->stats.hits++;
        *out = json_clone(e->spec);
        pthread_mutex_unlock(&p->mu);
        if (!*out) {
            snprintf(why, whylen, "out of memory");
            return SPECS_UNAVAILABLE;
        }
        return SPECS_FOUND;
    }
    if (e) cache_drop(p, e); /* expired */
    flight *f = p->flights;
    while (f && strcmp(f->id, id) != 0) f = f->next;
    if (f) {
        f->refs++;
        p->stats.coalesced++;
        while (!f->done) pthread_cond_wait(&p->cv, &p->mu);
        specs_result r = flight_take(f, out, why, whylen);
        flight_unref(p, f);
        pthread_mutex_unlock(&p->mu);
        return r;
    }
    f = calloc(1, sizeof *f);
    if (!f || !(f->id = strdup(id))) {
        free(f);
        pthread_mutex_unlock(&p->mu);
        snprintf(why, whylen, "out of memory");
        return SPECS_UNAVAILABLE;
    }
    f->refs = 1;
    f->next = p->flights;
    p->flights = f;
    p->stats.requests++;
    pthread_mutex_unlock(&p->mu);

    json_value *spec = NULL;
    specs_result r = fetch_spec(p, id, &spec, f->why, sizeof f->why);

    pthread_mutex_lock(&p->mu);
    f->result = r;
    f->spec = spec;
    f->done = true;
    if (r == SPECS_FOUND)
        cache_put(p, id, spec);
    else
        p->stats.failures++;
    pthread_cond_broadcast(&p->cv);
    r = flight_take(f, out, why, whylen);
    flight_unref(p, f);
    pthread_mutex_unlock(&p->mu);
    if (r == SPECS_UNAVAILABLE || r == SPECS_BAD_ANSWER) log_warn("%s", why);
    return r;
}

void spec_pulled_get_stats(spec_pulled *p, spec_pulled_stats *out) {
    pthread_mutex_lock(&p->mu);
    *out = p->stats;
    out->entries = p->n_entries;
    out->bytes = p->cache_bytes;
    pthread_mutex_unlock(&p->mu);
}
