#include "regfacade/guard.h"

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/log.h"

#define RATE_BUCKETS 4096
/* A connection must have waited this long for a request before it may be
 * closed to make room: a client between connect() and its first header
 * line is not idle. */
#define RECLAIM_MIN_IDLE_S 1.0

struct guard_conn {
    guard_conn *prev, *next;
    int fd;       /* the connection's socket (see guard_conn_open for why it cannot be reused) */
    double since; /* monotonic seconds the wait for a request began; 0: a request is in progress */
    bool cut;     /* shut down, closing */
};

typedef struct rate_entry {
    struct rate_entry *next;
    unsigned char key[17]; /* family byte + up to 16 address bytes */
    double tokens;
    double last;
} rate_entry;

struct guard {
    guard_options o;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    bool stopping;
    bool have_thread;
    pthread_t watchdog;
    guard_conn *conns;
    size_t n_conns;
    size_t n_cut;                /* of n_conns, shut down and closing */
    size_t reclaim_at;           /* open connections (not closing) from which idle ones are closed */
    unsigned reclaimed_unlogged; /* idle connections closed at the limit since the last log line */
    rate_entry *rate[RATE_BUCKETS];
    size_t n_rate;
    guard_stats stats;
};

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* shutdown() acts on the socket, not on the descriptor: the connection's
 * thread sees EOF and libmicrohttpd closes the connection. Called with the
 * lock held. */
static void conn_cut(guard *g, guard_conn *c) {
    shutdown(c->fd, SHUT_RDWR);
    c->cut = true;
    g->n_cut++;
}

/* From reclaim_at open connections on, the connection that has waited
 * longest for a request (never `keep`, at least RECLAIM_MIN_IDLE_S) is
 * closed, until the count is below reclaim_at again or none is idle: idle
 * connections cannot keep everyone else out. Called with the lock held. */
static void reclaim_idle(guard *g, const guard_conn *keep, double now) {
    if (!g->reclaim_at) return;
    while (g->n_conns - g->n_cut >= g->reclaim_at) {
        guard_conn *oldest = NULL;
        for (guard_conn *c = g->conns; c; c = c->next)
            if (c != keep && !c->cut && c->since != 0 && now - c->since >= RECLAIM_MIN_IDLE_S &&
                (!oldest || c->since < oldest->since))
                oldest = c;
        if (!oldest) return; /* every connection is busy (or just came) */
        conn_cut(g, oldest);
        g->stats.idle_reclaimed++;
        g->reclaimed_unlogged++; /* logged by the watchdog's next sweep */
    }
}

static void *watchdog_main(void *arg) {
    guard *g = arg;
    pthread_mutex_lock(&g->lock);
    while (!g->stopping) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 1;
        pthread_cond_timedwait(&g->wake, &g->lock, &until);
        if (g->stopping) break;
        double now = now_mono();
        unsigned cut = 0, t = g->o.header_timeout_s;
        for (guard_conn *c = g->conns; t && c; c = c->next) {
            if (c->cut || c->since == 0 || now < c->since + t) continue;
            conn_cut(g, c);
            cut++;
        }
        g->stats.header_timeouts += cut;
        /* Connections that came while the others were too fresh to close. */
        reclaim_idle(g, NULL, now);
        unsigned reclaimed = g->reclaimed_unlogged;
        g->reclaimed_unlogged = 0;
        if (cut || reclaimed) {
            unsigned max = g->o.max_connections;
            pthread_mutex_unlock(&g->lock);
            /* One line per sweep, not per connection: a slowloris flood must
             * not become a log flood. */
            if (cut)
                log_warn("%s: closed %u connection%s that sent no complete request (headers and any body) within "
                         "%u s (limits.header_timeout_seconds)",
                         g->o.listener, cut, cut == 1 ? "" : "s", t);
            if (reclaimed)
                log_warn("%s: closed %u idle connection%s to make room for new ones (%s %u nearly reached)",
                         g->o.listener, reclaimed, reclaimed == 1 ? "" : "s", g->o.limit_name, max);
            pthread_mutex_lock(&g->lock);
        }
    }
    pthread_mutex_unlock(&g->lock);
    return NULL;
}

guard *guard_new(const guard_options *o, char *err, size_t errlen) {
    guard *g = calloc(1, sizeof *g);
    if (!g) {
        snprintf(err, errlen, "guard: out of memory");
        return NULL;
    }
    g->o = *o;
    if (g->o.requests_per_second && !g->o.burst) g->o.burst = 2 * g->o.requests_per_second;
    if (!g->o.max_tracked_ips) g->o.max_tracked_ips = 65536;
    if (!g->o.listener) g->o.listener = "http";
    if (!g->o.limit_name) g->o.limit_name = "the connection limit";
    /* A reserve of max/32 slots (at least one) stays free for bursts of new
     * clients while idle connections are being closed. */
    if (g->o.max_connections) {
        size_t reserve = g->o.max_connections / 32 ? g->o.max_connections / 32 : 1;
        g->reclaim_at = g->o.max_connections > reserve ? g->o.max_connections - reserve : 1;
    }
    pthread_mutex_init(&g->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_cond_init(&g->wake, &ca);
    pthread_condattr_destroy(&ca);
    /* Also without a header deadline: it logs the connections closed at
     * the limit. */
    int rc = pthread_create(&g->watchdog, NULL, watchdog_main, g);
    if (rc != 0) {
        snprintf(err, errlen, "guard: cannot start the connection watchdog thread: %s", strerror(rc));
        pthread_cond_destroy(&g->wake);
        pthread_mutex_destroy(&g->lock);
        free(g);
        return NULL;
    }
    g->have_thread = true;
    return g;
}

void guard_free(guard *g) {
    if (!g) return;
    pthread_mutex_lock(&g->lock);
    g->stopping = true;
    pthread_cond_broadcast(&g->wake);
    pthread_mutex_unlock(&g->lock);
    if (g->have_thread) pthread_join(g->watchdog, NULL);
    for (guard_conn *c = g->conns, *n; c; c = n) { /* their sockets belong to libmicrohttpd */
        n = c->next;
        free(c);
    }
    for (size_t i = 0; i < RATE_BUCKETS; i++)
        for (rate_entry *e = g->rate[i], *n; e; e = n) {
            n = e->next;
            free(e);
        }
    pthread_cond_destroy(&g->wake);
    pthread_mutex_destroy(&g->lock);
    free(g);
}

guard_conn *guard_conn_open(guard *g, int fd) {
    if (!g || fd < 0) return NULL;
    guard_conn *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    /* No dup of the socket: libmicrohttpd reports a connection closed
     * (guard_conn_close, which forgets it under the lock) before it closes
     * the socket, so while c is listed, fd is this connection's socket. */
    c->fd = fd;
    pthread_mutex_lock(&g->lock);
    c->since = now_mono();
    c->next = g->conns;
    if (g->conns) g->conns->prev = c;
    g->conns = c;
    g->n_conns++;
    reclaim_idle(g, c, c->since);
    pthread_mutex_unlock(&g->lock);
    return c;
}

void guard_conn_headers_done(guard *g, guard_conn *c) {
    if (!g || !c) return;
    pthread_mutex_lock(&g->lock);
    c->since = 0;
    pthread_mutex_unlock(&g->lock);
}

void guard_conn_request_done(guard *g, guard_conn *c) {
    if (!g || !c) return;
    pthread_mutex_lock(&g->lock);
    c->since = now_mono();
    pthread_mutex_unlock(&g->lock);
}

void guard_conn_close(guard *g, guard_conn *c) {
    if (!g || !c) return;
    pthread_mutex_lock(&g->lock);
    if (c->prev)
        c->prev->next = c->next;
    else
        g->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    g->n_conns--;
    if (c->cut) g->n_cut--;
    pthread_mutex_unlock(&g->lock);
    free(c);
}

guard_load guard_get_load(guard *g) {
    guard_load l = {0};
    if (!g) return l;
    pthread_mutex_lock(&g->lock);
    l.open = g->n_conns;
    for (guard_conn *c = g->conns; c; c = c->next)
        if (!c->cut && c->since != 0) l.idle++;
    pthread_mutex_unlock(&g->lock);
    return l;
}

/* ---------- rate limit ---------- */

static size_t peer_key(const struct sockaddr *sa, unsigned char key[17]) {
    memset(key, 0, 17);
    if (sa->sa_family == AF_INET) {
        key[0] = 4;
        memcpy(key + 1, &((const struct sockaddr_in *)sa)->sin_addr, 4);
        return 5;
    }
    if (sa->sa_family == AF_INET6) {
        key[0] = 6;
        memcpy(key + 1, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
        return 17;
    }
    return 0;
}

static size_t key_hash(const unsigned char key[17]) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (int i = 0; i < 17; i++) h = (h ^ key[i]) * 16777619u;
    return h % RATE_BUCKETS;
}

/* Drop the entries whose bucket has refilled: they carry no state. */
static void rate_sweep(guard *g, double now) {
    for (size_t i = 0; i < RATE_BUCKETS; i++) {
        rate_entry **pp = &g->rate[i];
        while (*pp) {
            rate_entry *e = *pp;
            double tokens = e->tokens + (now - e->last) * g->o.requests_per_second;
            if (tokens >= g->o.burst) {
                *pp = e->next;
                free(e);
                g->n_rate--;
            } else {
                pp = &e->next;
            }
        }
    }
}

bool guard_rate_allow(guard *g, const struct sockaddr *peer, unsigned *retry_after_s) {
    if (!g || !g->o.requests_per_second || !peer) return true;
    unsigned char key[17];
    if (!peer_key(peer, key)) return true;
    double rate = g->o.requests_per_second, burst = g->o.burst;
    bool ok = true;
    pthread_mutex_lock(&g->lock);
    double now = now_mono();
    size_t h = key_hash(key);
    rate_entry *e = g->rate[h];
    while (e && memcmp(e->key, key, sizeof e->key) != 0) e = e->next;
    if (!e) {
        if (g->n_rate >= g->o.max_tracked_ips) rate_sweep(g, now);
        if (g->n_rate < g->o.max_tracked_ips && (e = calloc(1, sizeof *e))) {
            memcpy(e->key, key, sizeof e->key);
            e->tokens = burst;
            e->last = now;
            e->next = g->rate[h];
            g->rate[h] = e;
            g->n_rate++;
        }
        /* Table full of active clients (or no memory): let the request
         * through untracked; the connection limits still hold. */
    }
    if (e) {
        e->tokens += (now - e->last) * rate;
        if (e->tokens > burst) e->tokens = burst;
        e->last = now;
        if (e->tokens >= 1.0) {
            e->tokens -= 1.0;
        } else {
            ok = false;
            double wait = (1.0 - e->tokens) / rate;
            unsigned s = (unsigned)wait;
            if ((double)s < wait) s++;
            *retry_after_s = s ? s : 1;
            g->stats.rate_limited++;
        }
    }
    pthread_mutex_unlock(&g->lock);
    return ok;
}

guard_stats guard_get_stats(guard *g) {
    guard_stats s = {0};
    if (!g) return s;
    pthread_mutex_lock(&g->lock);
    s = g->stats;
    pthread_mutex_unlock(&g->lock);
    return s;
}
