#include "regfacade/guard.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/log.h"

#define RATE_BUCKETS 4096

struct guard_conn {
    guard_conn *prev, *next;
    int fd;          /* our dup of the connection's socket */
    double deadline; /* monotonic seconds; 0: disarmed */
    bool cut;
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
    rate_entry *rate[RATE_BUCKETS];
    size_t n_rate;
    guard_stats stats;
};

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
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
        unsigned cut = 0;
        for (guard_conn *c = g->conns; c; c = c->next) {
            if (c->cut || c->deadline == 0 || now < c->deadline) continue;
            /* shutdown() acts on the socket, not on the descriptor: the
             * connection's thread sees EOF and libmicrohttpd closes it. */
            shutdown(c->fd, SHUT_RDWR);
            c->cut = true;
            cut++;
        }
        g->stats.header_timeouts += cut;
        if (cut) {
            unsigned t = g->o.header_timeout_s;
            pthread_mutex_unlock(&g->lock);
            /* One line per sweep, not per connection: a slowloris flood must
             * not become a log flood. */
            log_warn("closed %u connection%s that sent no complete request headers within %u s "
                     "(limits.header_timeout_seconds)",
                     cut, cut == 1 ? "" : "s", t);
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
    pthread_mutex_init(&g->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_cond_init(&g->wake, &ca);
    pthread_condattr_destroy(&ca);
    if (g->o.header_timeout_s) {
        int rc = pthread_create(&g->watchdog, NULL, watchdog_main, g);
        if (rc != 0) {
            snprintf(err, errlen, "guard: cannot start the header-deadline thread: %s", strerror(rc));
            pthread_cond_destroy(&g->wake);
            pthread_mutex_destroy(&g->lock);
            free(g);
            return NULL;
        }
        g->have_thread = true;
    }
    return g;
}

void guard_free(guard *g) {
    if (!g) return;
    pthread_mutex_lock(&g->lock);
    g->stopping = true;
    pthread_cond_broadcast(&g->wake);
    pthread_mutex_unlock(&g->lock);
    if (g->have_thread) pthread_join(g->watchdog, NULL);
    for (guard_conn *c = g->conns, *n; c; c = n) {
        n = c->next;
        close(c->fd);
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
    if (!g || !g->o.header_timeout_s || fd < 0) return NULL;
    guard_conn *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (c->fd < 0) {
        free(c);
        return NULL;
    }
    pthread_mutex_lock(&g->lock);
    c->deadline = now_mono() + g->o.header_timeout_s;
    c->next = g->conns;
    if (g->conns) g->conns->prev = c;
    g->conns = c;
    g->n_conns++;
    pthread_mutex_unlock(&g->lock);
    return c;
}

void guard_conn_headers_done(guard *g, guard_conn *c) {
    if (!g || !c) return;
    pthread_mutex_lock(&g->lock);
    c->deadline = 0;
    pthread_mutex_unlock(&g->lock);
}

void guard_conn_request_done(guard *g, guard_conn *c) {
    if (!g || !c) return;
    pthread_mutex_lock(&g->lock);
    c->deadline = now_mono() + g->o.header_timeout_s;
    pthread_mutex_unlock(&g->lock);
}

void guard_conn_close(guard *g, guard_conn *c) {
    if (!g || !c) return;
    pthread_mutex_lock(&g->lock);
    if (c->prev) c->prev->next = c->next;
    else g->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    g->n_conns--;
    pthread_mutex_unlock(&g->lock);
    close(c->fd);
    free(c);
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
