#include "regfacade/metrics.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "regfacade/fetch.h"
#include "regfacade/log.h"
#include "regfacade/mhd_glue.h"

/* ------------------------------------------------------------------ */
/* label sets */

static const char *const route_names[] = {"ping", "manifest", "blob", "tags", "referrers", "health", "other"};
#define N_ROUTES 7
static const char *const source_names[] = {"cache", "upstream", "generated"};
#define N_SOURCES 3
static const char *const cache_kinds[] = {"manifest", "blob"};
#define N_KINDS 2
static const char *const status_classes[] = {"1xx", "2xx", "3xx", "4xx", "5xx", "error"};
#define N_CLASSES 6
static const char *const error_reasons[] = {"connect", "tls",     "timeout",  "transfer", "auth",
                                            "denied",  "aborted", "internal", "other"};
#define N_REASONS 9
static const char *const retry_whats[] = {"blob", "manifest", "tags"};
#define N_WHATS 3
static const char *const hook_names[] = {"authorize", "resolve", "rewrite", "spec", "log", "other"};
#define N_HOOKS 6
static const char *const outcome_names[] = {"ok", "refused", "error", "budget"};
#define N_OUTCOMES 4
/* Policy hook latency buckets, seconds. */
static const double hook_buckets[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25};
#define N_BUCKETS (sizeof hook_buckets / sizeof hook_buckets[0])
/* Request duration buckets, seconds: manifests answer in milliseconds, a
 * cold layer of a gigabyte takes minutes. */
static const double duration_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300};
#define N_DBUCKETS (sizeof duration_buckets / sizeof duration_buckets[0])
#define MAX_COLLECTORS 16

typedef _Atomic uint64_t counter;

typedef struct {
    char name[64];
    counter requests[N_CLASSES];
    counter errors[N_REASONS];
    counter retries[N_WHATS];
    counter received_bytes;
    _Atomic long ratelimit;
    atomic_bool ratelimit_seen;
} upstream_slot;

static struct {
    counter requests[N_ROUTES][600]; /* [route][HTTP status] */
    counter bytes[N_SOURCES];
    counter cache_hits[N_KINDS], cache_misses[N_KINDS];
    _Atomic int64_t cache_bytes, cache_entries;
    counter evictions, evicted_bytes;
    counter quarantined, verified_bytes;
    counter removed, removed_bytes; /* cache rm */

    pthread_mutex_t lock;                         /* guards adding upstream slots */
    upstream_slot ups[METRICS_MAX_UPSTREAMS + 1]; /* the last one is "other" */
    atomic_int n_ups;

    counter hook_calls[N_HOOKS][N_OUTCOMES];
    counter hook_buckets[N_HOOKS][N_BUCKETS]; /* not cumulative; summed when rendered */
    counter hook_count[N_HOOKS];
    counter hook_sum_ns[N_HOOKS];

    counter dur_buckets[N_ROUTES][N_CLASSES][N_DBUCKETS]; /* not cumulative */
    counter dur_count[N_ROUTES][N_CLASSES];
    counter dur_sum_us[N_ROUTES][N_CLASSES];
    _Atomic int64_t in_flight;        /* requests begun and not ended */
    _Atomic int64_t client_transfers; /* streaming bodies being sent */

    counter reloads_ok, reloads_rejected;
    _Atomic int64_t generation; /* 1 at start, +1 per accepted reload */
    atomic_bool last_reload_ok;
    _Atomic int64_t last_reload_time;

    pthread_mutex_t collectors_lock; /* held while collectors run */
    struct {
        metrics_collect_fn fn;
        void *ud;
    } collectors[MAX_COLLECTORS];

    _Atomic(struct fetcher *) fetcher;
    atomic_bool access_log;
    struct timespec started; /* CLOCK_REALTIME */
} M = {.lock = PTHREAD_MUTEX_INITIALIZER,
       .collectors_lock = PTHREAD_MUTEX_INITIALIZER,
       .access_log = true,
       .generation = 1,
       .last_reload_ok = true};

static void note_start(void) {
    if (!M.started.tv_sec) clock_gettime(CLOCK_REALTIME, &M.started);
}

static int status_class(unsigned status) {
    return status >= 100 && status < 600 ? (int)(status / 100) - 1 : N_CLASSES - 1;
}

#define INC(c) atomic_fetch_add_explicit(&(c), 1, memory_order_relaxed)
#define ADD(c, n) atomic_fetch_add_explicit(&(c), (n), memory_order_relaxed)
#define GET(c) atomic_load_explicit(&(c), memory_order_relaxed)

static int index_of(const char *const *names, int n, const char *s) {
    if (s)
        for (int i = 0; i < n; i++)
            if (strcmp(names[i], s) == 0) return i;
    return -1;
}

static upstream_slot *upstream_slot_for(const char *name) {
    if (!name) name = "";
    int n = atomic_load_explicit(&M.n_ups, memory_order_acquire);
    for (int i = 0; i < n; i++)
        if (strcmp(M.ups[i].name, name) == 0) return &M.ups[i];
    pthread_mutex_lock(&M.lock);
    n = atomic_load_explicit(&M.n_ups, memory_order_relaxed);
    upstream_slot *s = NULL;
    for (int i = 0; i < n && !s; i++)
        if (strcmp(M.ups[i].name, name) == 0) s = &M.ups[i];
    if (!s && n < METRICS_MAX_UPSTREAMS && strlen(name) < sizeof M.ups[0].name) {
        s = &M.ups[n];
        snprintf(s->name, sizeof s->name, "%s", name);
        atomic_store_explicit(&M.n_ups, n + 1, memory_order_release);
    }
    if (!s) {
        s = &M.ups[METRICS_MAX_UPSTREAMS];
        if (!s->name[0]) snprintf(s->name, sizeof s->name, "other");
    }
    pthread_mutex_unlock(&M.lock);
    return s;
}

/* ------------------------------------------------------------------ */
/* config */

int metrics_config_parse(const json_value *section, metrics_config *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    snprintf(out->listen_host, sizeof out->listen_host, "127.0.0.1");
    out->listen_port = 9090;
    out->access_log = true;
    if (!section) return 0;
    if (section->type != JSON_OBJECT) {
        snprintf(err, errlen, "metrics: must be an object");
        return -1;
    }
    out->enabled = true;
    for (size_t i = 0; i < section->count; i++) {
        const char *k = section->keys[i];
        const json_value *v = section->items[i];
        if (strcmp(k, "listen") == 0) {
            if (v->type != JSON_STRING || v->len == 0 || strlen(v->str) != v->len) {
                snprintf(err, errlen, "metrics.listen: must be a non-empty string \"HOST:PORT\"");
                return -1;
            }
            const char *s = v->str;
            const char *colon = strrchr(s, ':');
            char host[64];
            if (!colon || colon == s || colon[1] == '\0') {
                snprintf(err, errlen, "metrics.listen: \"%.100s\" is not HOST:PORT (e.g. \"127.0.0.1:9090\")", s);
                return -1;
            }
            size_t hl = (size_t)(colon - s);
            if (s[0] == '[') {
                if (hl < 3 || s[hl - 1] != ']') {
                    snprintf(err, errlen, "metrics.listen: \"%.100s\": an IPv6 host must be written [ADDR]:PORT", s);
                    return -1;
                }
                s++;
                hl -= 2;
            } else if (memchr(s, ':', hl)) {
                snprintf(err, errlen, "metrics.listen: \"%.100s\": an IPv6 host must be written [ADDR]:PORT", s);
                return -1;
            }
            if (hl >= sizeof host) {
                snprintf(err, errlen, "metrics.listen: host \"%.100s\" is too long", v->str);
                return -1;
            }
            memcpy(host, s, hl);
            host[hl] = '\0';
            struct in_addr a4;
            struct in6_addr a6;
            if (inet_pton(AF_INET, host, &a4) != 1 && inet_pton(AF_INET6, host, &a6) != 1) {
                snprintf(err, errlen, "metrics.listen: \"%.100s\" is not an IP address (names are not resolved)", host);
                return -1;
            }
            char *end = NULL;
            errno = 0;
            long port = strtol(colon + 1, &end, 10);
            if (errno || !end || *end || port < 1 || port > 65535) {
                snprintf(err, errlen, "metrics.listen: port \"%.20s\" must be an integer from 1 to 65535", colon + 1);
                return -1;
            }
            snprintf(out->listen_host, sizeof out->listen_host, "%s", host);
            out->listen_port = (int)port;
        } else if (strcmp(k, "access_log") == 0) {
            if (v->type != JSON_TRUE && v->type != JSON_FALSE) {
                snprintf(err, errlen, "metrics.access_log: must be true or false");
                return -1;
            }
            out->access_log = v->type == JSON_TRUE;
        } else {
            snprintf(err, errlen, "metrics.%.100s: unknown key (allowed: listen, access_log)", k);
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* recording */

void metrics_cache_lookup(const char *kind, bool hit) {
    int k = index_of(cache_kinds, N_KINDS, kind);
    if (k < 0) return;
    if (hit)
        INC(M.cache_hits[k]);
    else
        INC(M.cache_misses[k]);
}

void metrics_cache_put(uint64_t bytes) {
    ADD(M.cache_bytes, (int64_t)bytes);
    ADD(M.cache_entries, 1);
}

void metrics_cache_evicted(uint64_t bytes) {
    INC(M.evictions);
    ADD(M.evicted_bytes, bytes);
    atomic_fetch_sub_explicit(&M.cache_bytes, (int64_t)bytes, memory_order_relaxed);
    atomic_fetch_sub_explicit(&M.cache_entries, 1, memory_order_relaxed);
}

void metrics_cache_quarantined(uint64_t bytes) {
    INC(M.quarantined);
    atomic_fetch_sub_explicit(&M.cache_bytes, (int64_t)bytes, memory_order_relaxed);
    atomic_fetch_sub_explicit(&M.cache_entries, 1, memory_order_relaxed);
}

void metrics_cache_removed(uint64_t bytes) {
    INC(M.removed);
    ADD(M.removed_bytes, bytes);
    atomic_fetch_sub_explicit(&M.cache_bytes, (int64_t)bytes, memory_order_relaxed);
    atomic_fetch_sub_explicit(&M.cache_entries, 1, memory_order_relaxed);
}

void metrics_cache_verified(uint64_t bytes) { ADD(M.verified_bytes, bytes); }

void metrics_cache_scan(const char *cache_dir) {
    char top[PATH_MAX];
    snprintf(top, sizeof top, "%s/blobs/sha256", cache_dir);
    int64_t bytes = 0, entries = 0;
    DIR *d = opendir(top);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.') continue;
            char sub[PATH_MAX];
            snprintf(sub, sizeof sub, "%s/%s", top, e->d_name);
            DIR *d2 = opendir(sub);
            if (!d2) continue;
            struct dirent *f;
            while ((f = readdir(d2)) != NULL) {
                if (f->d_name[0] == '.') continue;
                struct stat st;
                if (fstatat(dirfd(d2), f->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode)) {
                    bytes += st.st_size;
                    entries++;
                }
            }
            closedir(d2);
        }
        closedir(d);
    }
    atomic_store(&M.cache_bytes, bytes);
    atomic_store(&M.cache_entries, entries);
    note_start();
}

void metrics_upstream_request(const char *upstream, long status, const char *result_name) {
    upstream_slot *s = upstream_slot_for(upstream);
    if (result_name) {
        INC(s->requests[N_CLASSES - 1]);
        int r = index_of(error_reasons, N_REASONS, result_name);
        INC(s->errors[r < 0 ? N_REASONS - 1 : r]);
        return;
    }
    INC(s->requests[status_class((unsigned)status)]);
}

void metrics_upstream_known(const char *upstream) { (void)upstream_slot_for(upstream); }

void metrics_upstream_bytes(const char *upstream, uint64_t bytes) {
    ADD(upstream_slot_for(upstream)->received_bytes, bytes);
}

void metrics_reload(bool ok) {
    if (ok) {
        INC(M.reloads_ok);
        atomic_fetch_add(&M.generation, 1);
    } else {
        INC(M.reloads_rejected);
    }
    atomic_store(&M.last_reload_ok, ok);
    atomic_store(&M.last_reload_time, (int64_t)time(NULL));
}

void metrics_upstream_retry(const char *upstream, const char *what) {
    int w = index_of(retry_whats, N_WHATS, what);
    if (w < 0) return;
    INC(upstream_slot_for(upstream)->retries[w]);
}

void metrics_upstream_ratelimit(const char *upstream, long remaining) {
    if (remaining < 0) return;
    upstream_slot *s = upstream_slot_for(upstream);
    atomic_store_explicit(&s->ratelimit, remaining, memory_order_relaxed);
    atomic_store_explicit(&s->ratelimit_seen, true, memory_order_relaxed);
}

void metrics_policy_hook(const char *hook, double seconds, const char *outcome) {
    int h = index_of(hook_names, N_HOOKS, hook);
    if (h < 0) h = N_HOOKS - 1;
    int o = index_of(outcome_names, N_OUTCOMES, outcome);
    if (o < 0) o = 2; /* an unknown outcome is an error */
    INC(M.hook_calls[h][o]);
    if (seconds < 0) seconds = 0;
    size_t b = 0;
    while (b < N_BUCKETS && seconds > hook_buckets[b]) b++;
    if (b < N_BUCKETS) INC(M.hook_buckets[h][b]);
    INC(M.hook_count[h]);
    ADD(M.hook_sum_ns[h], (uint64_t)(seconds * 1e9));
}

void metrics_watch_fetcher(struct fetcher *f) { atomic_store(&M.fetcher, f); }

/* ------------------------------------------------------------------ */
/* access records */

void metrics_set_access_log(bool on) { atomic_store(&M.access_log, on); }

metrics_access *metrics_access_begin(struct MHD_Connection *conn, const char *method, const char *url) {
    metrics_access *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    clock_gettime(CLOCK_MONOTONIC, &a->start);
    atomic_fetch_add_explicit(&M.in_flight, 1, memory_order_relaxed);
    snprintf(a->method, sizeof a->method, "%s", method ? method : "");
    /* MHD hands the path without the query string; cut at '?' anyway. */
    snprintf(a->path, sizeof a->path, "%.*s", (int)strcspn(url ? url : "", "?"), url ? url : "");
    a->route = "other";
    a->source = METRICS_SRC_GENERATED;
    const union MHD_ConnectionInfo *ci =
        conn ? MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS) : NULL;
    if (ci && ci->client_addr) {
        const struct sockaddr *sa = ci->client_addr;
        if (sa->sa_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, a->client_ip, sizeof a->client_ip);
        else if (sa->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, a->client_ip, sizeof a->client_ip);
    }
    return a;
}

void metrics_access_body(metrics_access *a, metrics_source src, uint64_t len, bool streaming) {
    if (!a) return;
    a->source = src;
    a->body_len = len;
    a->streaming = streaming;
    if (streaming && !a->in_transfer) {
        a->in_transfer = true;
        atomic_fetch_add_explicit(&M.client_transfers, 1, memory_order_relaxed);
    }
}

void metrics_access_streamed(metrics_access *a, uint64_t n) {
    if (!a) return;
    a->streamed += n;
    if (strcmp(a->method, "HEAD") != 0 && (unsigned)a->source < N_SOURCES) ADD(M.bytes[a->source], n);
}

void metrics_access_end(metrics_access *a, bool completed_ok) {
    if (!a) return;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double ms = (double)(now.tv_sec - a->start.tv_sec) * 1e3 + (double)(now.tv_nsec - a->start.tv_nsec) / 1e6;
    uint64_t bytes = 0;
    if (strcmp(a->method, "HEAD") != 0 && a->status != 0)
        bytes = a->streaming ? a->streamed : (completed_ok ? a->body_len : 0);
    int r = index_of(route_names, N_ROUTES, a->route);
    if (r < 0) r = N_ROUTES - 1;
    if (a->status >= 100 && a->status < 600) INC(M.requests[r][a->status]);
    /* Streamed bytes were counted as they went (metrics_access_streamed). */
    if ((unsigned)a->source < N_SOURCES && !a->streaming) ADD(M.bytes[a->source], bytes);
    int c = a->status ? status_class(a->status) : N_CLASSES - 1;
    size_t b = 0;
    while (b < N_DBUCKETS && ms / 1e3 > duration_buckets[b]) b++;
    if (b < N_DBUCKETS) INC(M.dur_buckets[r][c][b]);
    INC(M.dur_count[r][c]);
    ADD(M.dur_sum_us[r][c], (uint64_t)(ms * 1e3));
    atomic_fetch_sub_explicit(&M.in_flight, 1, memory_order_relaxed);
    if (a->in_transfer) atomic_fetch_sub_explicit(&M.client_transfers, 1, memory_order_relaxed);
    if (atomic_load_explicit(&M.access_log, memory_order_relaxed)) {
        char f[2048];
        size_t n = (size_t)snprintf(f, sizeof f, "\"method\":\"");
        n = log_json_escape(f, sizeof f - 512, n, a->method);
        n += (size_t)snprintf(f + n, sizeof f - n, "\",\"path\":\"");
        n = log_json_escape(f, sizeof f - 400, n, a->path);
        n += (size_t)snprintf(f + n, sizeof f - n,
                              "\",\"route\":\"%s\",\"status\":%u,\"bytes\":%llu,\"source\":\"%s\","
                              "\"duration_ms\":%.3f,\"client\":\"",
                              route_names[r], a->status, (unsigned long long)bytes,
                              source_names[(unsigned)a->source < N_SOURCES ? a->source : METRICS_SRC_GENERATED], ms);
        n = log_json_escape(f, sizeof f - 200, n, a->client_ip);
        n += (size_t)snprintf(f + n, sizeof f - n, "\",\"upstream\":\"");
        n = log_json_escape(f, sizeof f - 100, n, a->upstream);
        n += (size_t)snprintf(f + n, sizeof f - n, "\",\"completed\":%s", completed_ok ? "true" : "false");
        log_fields_always(LOG_INFO, "access", f);
    }
    free(a);
}

/* ------------------------------------------------------------------ */
/* health */

int metrics_cache_writable(const char *cache_dir, char *why, size_t whylen) {
    char p[PATH_MAX];
    static atomic_ulong seq;
    snprintf(p, sizeof p, "%s/tmp/.readyz-%ld-%lu", cache_dir, (long)getpid(), (unsigned long)INC(seq));
    int fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        snprintf(why, whylen, "cache %s/tmp is not writable: %s", cache_dir, strerror(errno));
        return -1;
    }
    int rc = 0;
    if (write(fd, "x", 1) != 1) {
        snprintf(why, whylen, "cache %s/tmp: write failed: %s", cache_dir, strerror(errno));
        rc = -1;
    }
    close(fd);
    if (unlink(p) != 0 && rc == 0) {
        snprintf(why, whylen, "cache %s/tmp: cannot remove a file: %s", cache_dir, strerror(errno));
        rc = -1;
    }
    return rc;
}

unsigned metrics_health_answer(const char *path, metrics_ready_fn ready, void *ud, char *body, size_t bodylen) {
    if (strcmp(path, "/healthz") == 0) {
        snprintf(body, bodylen, "{\"status\":\"ok\"}");
        return 200;
    }
    if (strcmp(path, "/readyz") != 0) return 0;
    char why[512] = "";
    if (ready && ready(ud, why, sizeof why) != 0) {
        size_t n = (size_t)snprintf(body, bodylen, "{\"status\":\"unavailable\",\"reason\":\"");
        n = log_json_escape(body, bodylen - 3, n, why[0] ? why : "not ready");
        snprintf(body + n, bodylen - n, "\"}");
        return 503;
    }
    if (!why[0]) {
        snprintf(body, bodylen, "{\"status\":\"ready\"}");
        return 200;
    }
    /* Ready, with something to say (degraded: serving alone). */
    size_t n = (size_t)snprintf(body, bodylen, "{\"status\":\"ready\",\"detail\":\"");
    n = log_json_escape(body, bodylen - 3, n, why);
    snprintf(body + n, bodylen - n, "\"}");
    return 200;
}

/* ------------------------------------------------------------------ */
/* exposition */

typedef struct metrics_writer {
    char *buf;
    size_t len, cap;
    bool failed;
} out_buf;

static void out(out_buf *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void out(out_buf *o, const char *fmt, ...) {
    if (o->failed) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->failed = true;
            return;
        }
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        size_t cap = o->cap * 2;
        while (cap < o->len + (size_t)n + 1) cap *= 2;
        char *b = realloc(o->buf, cap);
        if (!b) {
            o->failed = true;
            return;
        }
        o->buf = b;
        o->cap = cap;
    }
}

/* A label value with \, " and newline escaped (names come from config). */
const char *metrics_label(const char *s, char *tmp, size_t tmplen) {
    size_t o = 0;
    for (; *s && o + 3 < tmplen; s++) {
        if (*s == '\\' || *s == '"')
            tmp[o++] = '\\', tmp[o++] = *s;
        else if (*s == '\n')
            tmp[o++] = '\\', tmp[o++] = 'n';
        else
            tmp[o++] = *s;
    }
    tmp[o] = '\0';
    return tmp;
}

#define label metrics_label

static void head(out_buf *o, const char *name, const char *type, const char *help) {
    out(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void metrics_write_head(metrics_writer *w, const char *name, const char *type, const char *help) {
    head(w, name, type, help);
}

void metrics_write(metrics_writer *w, const char *fmt, ...) {
    if (w->failed) return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof line) {
        log_warn("metrics: a collector's line of %d bytes was dropped (at most %zu)", n, sizeof line - 1);
        return;
    }
    out(w, "%s", line);
}

int metrics_add_collector(metrics_collect_fn fn, void *ud) {
    pthread_mutex_lock(&M.collectors_lock);
    int rc = -1;
    for (int i = 0; i < MAX_COLLECTORS && rc != 0; i++)
        if (!M.collectors[i].fn) {
            M.collectors[i].fn = fn;
            M.collectors[i].ud = ud;
            rc = 0;
        }
    pthread_mutex_unlock(&M.collectors_lock);
    return rc;
}

void metrics_remove_collector(metrics_collect_fn fn, void *ud) {
    pthread_mutex_lock(&M.collectors_lock);
    for (int i = 0; i < MAX_COLLECTORS; i++)
        if (M.collectors[i].fn == fn && M.collectors[i].ud == ud) M.collectors[i].fn = NULL;
    pthread_mutex_unlock(&M.collectors_lock);
}

/* Fields of /proc/self/stat after the command name: utime and stime
 * (clock ticks), vsize (bytes). */
static void proc_stat(double *cpu_seconds, long long *vsize) {
    *cpu_seconds = -1;
    *vsize = -1;
    FILE *f = fopen("/proc/self/stat", "r");
    if (!f) return;
    char buf[2048];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')'); /* the name may hold spaces */
    if (!p) return;
    unsigned long long ut = 0, st = 0, vs = 0;
    /* state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
     * priority nice threads itrealvalue starttime vsize */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d %*d %*d %*d %*d %*u %llu", &ut,
               &st, &vs) != 3)
        return;
    long hz = sysconf(_SC_CLK_TCK);
    *cpu_seconds = (double)(ut + st) / (double)(hz > 0 ? hz : 100);
    *vsize = (long long)vs;
}

/* Bytes received and sent on every interface but loopback's peers counted
 * once: the network namespace's totals (as Prometheus' process collector). */
static void proc_net(long long *rx, long long *tx) {
    *rx = *tx = 0;
    FILE *f = fopen("/proc/self/net/dev", "r");
    if (!f) {
        *rx = *tx = -1;
        return;
    }
    char line[512];
    while (fgets(line, sizeof line, f)) {
        char *colon = strchr(line, ':');
        if (!colon) continue; /* the two header lines */
        unsigned long long r = 0, t = 0;
        if (sscanf(colon + 1, "%llu %*u %*u %*u %*u %*u %*u %*u %llu", &r, &t) == 2) {
            *rx += (long long)r;
            *tx += (long long)t;
        }
    }
    fclose(f);
}

/* VmRSS, VmHWM and Threads of this process, from /proc/self/status. */
static void proc_status(long long *rss_kb, long long *hwm_kb, long long *threads) {
    *rss_kb = *hwm_kb = *threads = -1;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "VmRSS:", 6) == 0)
            *rss_kb = atoll(line + 6);
        else if (strncmp(line, "VmHWM:", 6) == 0)
            *hwm_kb = atoll(line + 6);
        else if (strncmp(line, "Threads:", 8) == 0)
            *threads = atoll(line + 8);
    }
    fclose(f);
}

static long count_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    long n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the one opendir holds */
}

char *metrics_render(size_t *len) {
    out_buf o = {.cap = 16384};
    o.buf = malloc(o.cap);
    if (!o.buf) return NULL;
    o.buf[0] = '\0';
    char t1[160];

    head(&o, "regfacade_build_info", "gauge", "Version of this regfacade.");
    out(&o, "regfacade_build_info{version=\"%s\"} 1\n", REGFACADE_VERSION);

    head(&o, "regfacade_requests_total", "counter", "Requests answered, by route and HTTP status.");
    for (int r = 0; r < N_ROUTES; r++)
        for (int s = 100; s < 600; s++) {
            uint64_t v = GET(M.requests[r][s]);
            if (v)
                out(&o, "regfacade_requests_total{route=\"%s\",status=\"%d\"} %llu\n", route_names[r], s,
                    (unsigned long long)v);
        }

    head(&o, "regfacade_response_bytes_total", "counter",
         "Response body bytes sent, by where they came from (cache, upstream, generated).");
    for (int s = 0; s < N_SOURCES; s++)
        out(&o, "regfacade_response_bytes_total{source=\"%s\"} %llu\n", source_names[s],
            (unsigned long long)GET(M.bytes[s]));

    head(&o, "regfacade_cache_hits_total", "counter", "Cache lookups answered from the cache, by kind.");
    for (int k = 0; k < N_KINDS; k++)
        out(&o, "regfacade_cache_hits_total{kind=\"%s\"} %llu\n", cache_kinds[k],
            (unsigned long long)GET(M.cache_hits[k]));
    head(&o, "regfacade_cache_misses_total", "counter", "Cache lookups that went to an upstream, by kind.");
    for (int k = 0; k < N_KINDS; k++)
        out(&o, "regfacade_cache_misses_total{kind=\"%s\"} %llu\n", cache_kinds[k],
            (unsigned long long)GET(M.cache_misses[k]));
    head(&o, "regfacade_cache_size_bytes", "gauge", "Bytes of verified blobs and manifests in the cache.");
    out(&o, "regfacade_cache_size_bytes %lld\n", (long long)GET(M.cache_bytes));
    head(&o, "regfacade_cache_entries", "gauge", "Blobs and manifests in the cache.");
    out(&o, "regfacade_cache_entries %lld\n", (long long)GET(M.cache_entries));
    head(&o, "regfacade_cache_evictions_total", "counter", "Cache entries evicted to stay under cache.max_bytes.");
    out(&o, "regfacade_cache_evictions_total %llu\n", (unsigned long long)GET(M.evictions));
    head(&o, "regfacade_cache_evicted_bytes_total", "counter", "Bytes evicted from the cache.");
    out(&o, "regfacade_cache_evicted_bytes_total %llu\n", (unsigned long long)GET(M.evicted_bytes));
    head(&o, "regfacade_cache_quarantined_total", "counter",
         "Cached files that failed verification and were moved to CACHE/quarantine.");
    out(&o, "regfacade_cache_quarantined_total %llu\n", (unsigned long long)GET(M.quarantined));
    head(&o, "regfacade_cache_removed_total", "counter", "Cache entries removed by cache rm.");
    out(&o, "regfacade_cache_removed_total %llu\n", (unsigned long long)GET(M.removed));
    head(&o, "regfacade_cache_removed_bytes_total", "counter", "Bytes cache rm freed.");
    out(&o, "regfacade_cache_removed_bytes_total %llu\n", (unsigned long long)GET(M.removed_bytes));
    head(&o, "regfacade_cache_verified_bytes_total", "counter",
         "Bytes of cached files hashed again (first open after start, changed files, scrub, cache verify).");
    out(&o, "regfacade_cache_verified_bytes_total %llu\n", (unsigned long long)GET(M.verified_bytes));

    int nu = atomic_load_explicit(&M.n_ups, memory_order_acquire);
    upstream_slot *slots[METRICS_MAX_UPSTREAMS + 1];
    int ns = 0;
    for (int i = 0; i < nu; i++) slots[ns++] = &M.ups[i];
    if (M.ups[METRICS_MAX_UPSTREAMS].name[0]) slots[ns++] = &M.ups[METRICS_MAX_UPSTREAMS];
    head(&o, "regfacade_upstream_requests_total", "counter",
         "Requests to upstream registries, by upstream and status class (\"error\": no HTTP answer).");
    for (int i = 0; i < ns; i++)
        for (int c = 0; c < N_CLASSES; c++) {
            uint64_t v = GET(slots[i]->requests[c]);
            out(&o, "regfacade_upstream_requests_total{upstream=\"%s\",status=\"%s\"} %llu\n",
                label(slots[i]->name, t1, sizeof t1), status_classes[c], (unsigned long long)v);
        }
    head(&o, "regfacade_upstream_errors_total", "counter",
         "Upstream requests that got no usable HTTP answer, by upstream and reason.");
    for (int i = 0; i < ns; i++)
        for (int r = 0; r < N_REASONS; r++) {
            uint64_t v = GET(slots[i]->errors[r]);
            out(&o, "regfacade_upstream_errors_total{upstream=\"%s\",reason=\"%s\"} %llu\n",
                label(slots[i]->name, t1, sizeof t1), error_reasons[r], (unsigned long long)v);
        }
    head(&o, "regfacade_upstream_retries_total", "counter", "Retried upstream transfers, by upstream and kind.");
    for (int i = 0; i < ns; i++)
        for (int w = 0; w < N_WHATS; w++)
            out(&o, "regfacade_upstream_retries_total{upstream=\"%s\",kind=\"%s\"} %llu\n",
                label(slots[i]->name, t1, sizeof t1), retry_whats[w], (unsigned long long)GET(slots[i]->retries[w]));
    head(&o, "regfacade_upstream_received_bytes_total", "counter",
         "Body bytes received from upstream registries as they arrive, by upstream.");
    for (int i = 0; i < ns; i++)
        out(&o, "regfacade_upstream_received_bytes_total{upstream=\"%s\"} %llu\n", label(slots[i]->name, t1, sizeof t1),
            (unsigned long long)GET(slots[i]->received_bytes));
    head(&o, "regfacade_upstream_ratelimit_remaining", "gauge",
         "Last ratelimit-remaining value an upstream sent (Docker Hub), by upstream.");
    for (int i = 0; i < ns; i++)
        if (atomic_load(&slots[i]->ratelimit_seen))
            out(&o, "regfacade_upstream_ratelimit_remaining{upstream=\"%s\"} %ld\n",
                label(slots[i]->name, t1, sizeof t1), atomic_load(&slots[i]->ratelimit));

    struct fetcher *f = atomic_load(&M.fetcher);
    fetch_stats fs = {0};
    if (f) fetcher_stats(f, &fs);
    head(&o, "regfacade_blob_fetches_total", "counter", "Upstream blob fetches started (one per cold blob).");
    out(&o, "regfacade_blob_fetches_total %lu\n", fs.started);
    head(&o, "regfacade_blob_fetch_coalesced_total", "counter",
         "Requests that joined a blob fetch already running instead of starting one.");
    out(&o, "regfacade_blob_fetch_coalesced_total %lu\n", fs.coalesced);
    head(&o, "regfacade_blob_fetch_failures_total", "counter", "Blob fetches that failed after their retries.");
    out(&o, "regfacade_blob_fetch_failures_total %lu\n", fs.failed);
    head(&o, "regfacade_upstream_fetches_in_flight", "gauge", "Blob transfers from upstreams running now.");
    out(&o, "regfacade_upstream_fetches_in_flight %u\n", fs.active);
    head(&o, "regfacade_upstream_fetches_queued", "gauge",
         "Blob fetches waiting for a transfer slot (upstream_client.max_concurrent_fetches).");
    out(&o, "regfacade_upstream_fetches_queued %u\n", fs.queued);
    head(&o, "regfacade_blob_fetch_waiters", "gauge",
         "Client requests attached to a running blob fetch (its first client included).");
    out(&o, "regfacade_blob_fetch_waiters %u\n", fs.waiters);

    head(&o, "regfacade_http_requests_in_flight", "gauge", "Registry API requests begun and not yet ended.");
    out(&o, "regfacade_http_requests_in_flight %lld\n", (long long)atomic_load(&M.in_flight));
    head(&o, "regfacade_client_transfers_in_flight", "gauge",
         "Streamed response bodies (cold blobs) being sent to clients now.");
    out(&o, "regfacade_client_transfers_in_flight %lld\n", (long long)atomic_load(&M.client_transfers));
    head(&o, "regfacade_http_request_duration_seconds", "histogram",
         "Time from a request's arrival to its last byte sent, by route and status class.");
    for (int r = 0; r < N_ROUTES; r++)
        for (int c = 0; c < N_CLASSES; c++) {
            uint64_t count = GET(M.dur_count[r][c]);
            /* The answers alerts are written on are always there; others once seen. */
            bool always = (r == 1 || r == 2) && (c == 1 || c == 3 || c == 4);
            if (!count && !always) continue;
            uint64_t cum = 0;
            for (size_t b = 0; b < N_DBUCKETS; b++) {
                cum += GET(M.dur_buckets[r][c][b]);
                out(&o, "regfacade_http_request_duration_seconds_bucket{route=\"%s\",status=\"%s\",le=\"%g\"} %llu\n",
                    route_names[r], status_classes[c], duration_buckets[b], (unsigned long long)cum);
            }
            out(&o, "regfacade_http_request_duration_seconds_bucket{route=\"%s\",status=\"%s\",le=\"+Inf\"} %llu\n",
                route_names[r], status_classes[c], (unsigned long long)count);
            out(&o, "regfacade_http_request_duration_seconds_sum{route=\"%s\",status=\"%s\"} %.6f\n", route_names[r],
                status_classes[c], (double)GET(M.dur_sum_us[r][c]) / 1e6);
            out(&o, "regfacade_http_request_duration_seconds_count{route=\"%s\",status=\"%s\"} %llu\n", route_names[r],
                status_classes[c], (unsigned long long)count);
        }

    head(&o, "regfacade_reloads_total", "counter", "SIGHUP reloads, by result (ok, rejected).");
    out(&o, "regfacade_reloads_total{result=\"ok\"} %llu\n", (unsigned long long)GET(M.reloads_ok));
    out(&o, "regfacade_reloads_total{result=\"rejected\"} %llu\n", (unsigned long long)GET(M.reloads_rejected));
    head(&o, "regfacade_config_generation", "gauge",
         "The configuration generation serving (1 at start, +1 per reload).");
    out(&o, "regfacade_config_generation %lld\n", (long long)atomic_load(&M.generation));
    head(&o, "regfacade_config_last_reload_successful", "gauge",
         "1 when the last reload was accepted (or none was tried).");
    out(&o, "regfacade_config_last_reload_successful %d\n", atomic_load(&M.last_reload_ok) ? 1 : 0);
    head(&o, "regfacade_config_last_reload_timestamp_seconds", "gauge", "When the last reload was tried (0: never).");
    out(&o, "regfacade_config_last_reload_timestamp_seconds %lld\n", (long long)atomic_load(&M.last_reload_time));

    head(&o, "regfacade_policy_hook_duration_seconds", "histogram", "Wall time of policy hook calls, by hook.");
    for (int h = 0; h < N_HOOKS; h++) {
        uint64_t count = GET(M.hook_count[h]);
        if (!count && h == N_HOOKS - 1) continue; /* every named hook from the start; "other" once seen */
        uint64_t cum = 0;
        for (size_t b = 0; b < N_BUCKETS; b++) {
            cum += GET(M.hook_buckets[h][b]);
            out(&o, "regfacade_policy_hook_duration_seconds_bucket{hook=\"%s\",le=\"%g\"} %llu\n", hook_names[h],
                hook_buckets[b], (unsigned long long)cum);
        }
        out(&o, "regfacade_policy_hook_duration_seconds_bucket{hook=\"%s\",le=\"+Inf\"} %llu\n", hook_names[h],
            (unsigned long long)count);
        out(&o, "regfacade_policy_hook_duration_seconds_sum{hook=\"%s\"} %.9f\n", hook_names[h],
            (double)GET(M.hook_sum_ns[h]) / 1e9);
        out(&o, "regfacade_policy_hook_duration_seconds_count{hook=\"%s\"} %llu\n", hook_names[h],
            (unsigned long long)count);
    }
    head(&o, "regfacade_policy_hook_calls_total", "counter", "Policy hook calls, by hook and outcome.");
    for (int h = 0; h < N_HOOKS; h++)
        for (int c = 0; c < N_OUTCOMES; c++) {
            uint64_t v = GET(M.hook_calls[h][c]);
            if (v)
                out(&o, "regfacade_policy_hook_calls_total{hook=\"%s\",outcome=\"%s\"} %llu\n", hook_names[h],
                    outcome_names[c], (unsigned long long)v);
        }
    head(&o, "regfacade_policy_errors_total", "counter",
         "Policy hook calls that failed (a Lua error or a budget kill), by hook.");
    for (int h = 0; h < N_HOOKS - 1; h++)
        out(&o, "regfacade_policy_errors_total{hook=\"%s\"} %llu\n", hook_names[h],
            (unsigned long long)(GET(M.hook_calls[h][2]) + GET(M.hook_calls[h][3])));
    head(&o, "regfacade_policy_budget_kills_total", "counter",
         "Policy hook calls stopped by their time or instruction budget, by hook.");
    for (int h = 0; h < N_HOOKS - 1; h++)
        out(&o, "regfacade_policy_budget_kills_total{hook=\"%s\"} %llu\n", hook_names[h],
            (unsigned long long)GET(M.hook_calls[h][3]));

    long long rss, hwm, threads, vsize, rx, tx;
    double cpu;
    proc_status(&rss, &hwm, &threads);
    proc_stat(&cpu, &vsize);
    proc_net(&rx, &tx);
    struct rlimit nofile, as;
    if (getrlimit(RLIMIT_NOFILE, &nofile) != 0) nofile.rlim_cur = 0;
    if (getrlimit(RLIMIT_AS, &as) != 0) as.rlim_cur = RLIM_INFINITY;
    head(&o, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
    out(&o, "process_cpu_seconds_total %.2f\n", cpu);
    head(&o, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
    out(&o, "process_virtual_memory_bytes %lld\n", vsize);
    head(&o, "process_virtual_memory_max_bytes", "gauge", "Maximum amount of virtual memory available in bytes.");
    if (as.rlim_cur == RLIM_INFINITY)
        out(&o, "process_virtual_memory_max_bytes 1.8446744073709552e+19\n");
    else
        out(&o, "process_virtual_memory_max_bytes %llu\n", (unsigned long long)as.rlim_cur);
    head(&o, "process_max_fds", "gauge", "Maximum number of open file descriptors.");
    out(&o, "process_max_fds %llu\n", (unsigned long long)nofile.rlim_cur);
    head(&o, "process_network_receive_bytes_total", "counter",
         "Number of bytes received by the process over the network.");
    out(&o, "process_network_receive_bytes_total %lld\n", rx);
    head(&o, "process_network_transmit_bytes_total", "counter",
         "Number of bytes sent by the process over the network.");
    out(&o, "process_network_transmit_bytes_total %lld\n", tx);
    head(&o, "process_resident_memory_bytes", "gauge", "Resident memory of this process.");
    out(&o, "process_resident_memory_bytes %lld\n", rss * 1024);
    head(&o, "regfacade_process_peak_resident_memory_bytes", "gauge", "Peak resident memory (VmHWM).");
    out(&o, "regfacade_process_peak_resident_memory_bytes %lld\n", hwm * 1024);
    head(&o, "regfacade_process_threads", "gauge", "Threads of this process.");
    out(&o, "regfacade_process_threads %lld\n", threads);
    head(&o, "process_open_fds", "gauge", "Open file descriptors.");
    out(&o, "process_open_fds %ld\n", count_fds());
    head(&o, "process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch in seconds.");
    out(&o, "process_start_time_seconds %.2f\n", (double)M.started.tv_sec + (double)M.started.tv_nsec / 1e9);

    pthread_mutex_lock(&M.collectors_lock);
    for (int i = 0; i < MAX_COLLECTORS; i++)
        if (M.collectors[i].fn) M.collectors[i].fn(&o, M.collectors[i].ud);
    pthread_mutex_unlock(&M.collectors_lock);

    if (o.failed) {
        free(o.buf);
        return NULL;
    }
    *len = o.len;
    return o.buf;
}

/* ------------------------------------------------------------------ */
/* listener */

/* Connections the listener takes at once (scrapers and probes are few). */
#define METRICS_MAX_CONNECTIONS 64

struct metrics_server {
    struct MHD_Daemon *daemon;
    mhd_glue_listener *listener; /* its guard against idle-connection floods */
    metrics_ready_fn ready;
    void *ud;
};

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *ctype, char *body, size_t len,
                             bool must_free) {
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, body, must_free ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_MUST_COPY);
    if (!r) {
        if (must_free) free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", ctype);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result metrics_handler(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                       const char *version, const char *upload_data, size_t *upload_data_size,
                                       void **con_cls) {
    (void)version;
    (void)upload_data;
    metrics_server *m = cls;
    if (*con_cls == NULL) {
        *con_cls = (void *)1;
        return MHD_YES;
    }
    if (*upload_data_size != 0) {
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        static char msg[] = "only GET and HEAD are served here\n";
        return reply(conn, 405, "text/plain; charset=utf-8", msg, sizeof msg - 1, false);
    }
    char body[768];
    unsigned st = metrics_health_answer(url, m->ready, m->ud, body, sizeof body);
    if (st) return reply(conn, st, "application/json", body, strlen(body), false);
    if (strcmp(url, "/metrics") == 0) {
        size_t len = 0;
        char *text = metrics_render(&len);
        if (!text) return MHD_NO;
        return reply(conn, 200, "text/plain; version=0.0.4; charset=utf-8", text, len, true);
    }
    static char nf[] = "not found: this listener serves /metrics, /healthz and /readyz\n";
    return reply(conn, 404, "text/plain; charset=utf-8", nf, sizeof nf - 1, false);
}

metrics_server *metrics_server_start(const metrics_config *cfg, metrics_ready_fn ready, void *ud, char *err,
                                     size_t errlen) {
    note_start();
    metrics_set_access_log(cfg->access_log);
    metrics_server *m = calloc(1, sizeof *m);
    if (!m) {
        snprintf(err, errlen, "metrics: out of memory");
        return NULL;
    }
    m->ready = ready;
    m->ud = ud;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG;
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, cfg->listen_host, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)cfg->listen_port);
    } else if (inet_pton(AF_INET6, cfg->listen_host, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)cfg->listen_port);
        flags |= MHD_USE_IPv6;
    } else {
        snprintf(err, errlen, "metrics.listen: \"%s\" is not an IP address", cfg->listen_host);
        free(m);
        return NULL;
    }
    guard_options go = {.header_timeout_s = cfg->header_timeout_s,
                        .max_connections = METRICS_MAX_CONNECTIONS,
                        .listener = "metrics",
                        .limit_name = "the metrics listener's fixed limit"};
    if (!(m->listener = mhd_glue_listener_new(&go, metrics_handler, m, NULL, NULL, err, errlen))) {
        free(m);
        return NULL;
    }
    m->daemon = MHD_start_daemon(flags, 0, NULL, NULL, MHD_GLUE_GUARDED(m->listener), MHD_OPTION_SOCK_ADDR,
                                 (struct sockaddr *)&ss, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)30,
                                 MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned int)1, MHD_OPTION_END);
    if (!m->daemon) {
        mhd_glue_listener_free(m->listener);
        snprintf(err, errlen, "metrics.listen %s:%d: cannot start the metrics listener (port in use?)",
                 cfg->listen_host, cfg->listen_port);
        free(m);
        return NULL;
    }
    return m;
}

void metrics_server_stop(metrics_server *m) {
    if (!m) return;
    if (m->daemon) MHD_stop_daemon(m->daemon);
    mhd_glue_listener_free(m->listener); /* after the daemon, whose callbacks use it */
    free(m);
}
