/* cluster: shared state on Redis (see include/regfacade/cluster.h).
 *
 * A fixed pool of connections, kept by one background thread: request
 * threads never connect or resolve names themselves, they borrow a
 * connected slot (waiting at most timeout_ms) and run their commands with
 * the socket timeouts set to timeout_ms. A transport failure opens the
 * breaker (one log line); the keeper probes with its own connection and
 * refills the pool when Redis answers again. */
#include "regfacade/cluster.h"

#include <errno.h>
#include <hiredis.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "regfacade/clock.h"
#include "regfacade/json.h"
#include "regfacade/log.h"
#include "regfacade/metrics.h"

#define CLUSTER_MAX_CONNECTIONS 256

typedef struct {
    redisContext *c; /* NULL: not connected */
    unsigned gen;    /* the breaker generation it was connected in */
    bool busy;
} slot;

struct cluster {
    char *host;
    int port;
    char ns[64];
    long timeout_ms, retry_ms, record_ttl_s;
    size_t n_slots;
    slot *slots;

    pthread_mutex_t mu;
    pthread_cond_t cv; /* a slot was released or filled; stop */
    bool up;           /* the breaker is closed */
    unsigned gen;      /* bumped when the breaker opens: older connections are dropped */
    bool stopping;
    int64_t down_since_ms;
    char down_why[256];
    pthread_t keeper;
    bool keeper_started;

    atomic_ulong calls_hit, calls_miss, calls_skipped, calls_failed, outages;
    _Atomic int64_t refusal_logged_ms; /* last "refused" log line (0: none yet) */
};

/* ---------- config ---------- */

typedef struct {
    char *host;
    int port;
    char ns[64];
    long timeout_ms, retry_ms, record_ttl_s, connections;
} cluster_config;

static int get_long(config_section *p, const json_value *sec, const char *key, long lo, long hi, long *out) {
    const json_value *v = json_object_get(sec, key);
    if (!v) return 0;
    uint64_t u;
    if (config_value_uint(v, key, &u) != 0 || u < (uint64_t)lo || u > (uint64_t)hi)
        return config_section_fail(p, "%s: must be an integer from %ld to %ld", key, lo, hi);
    *out = (long)u;
    return 0;
}

static bool valid_namespace(const char *s) {
    if (!*s || strlen(s) > 32) return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '-' ||
              *s == '_' || *s == '.'))
            return false;
    return true;
}

static int parse_config(const config *c, cluster_config *cc, char *err, size_t errlen) {
    memset(cc, 0, sizeof *cc);
    const json_value *sec = c->cluster;
    static const char *const keys[] = {"redis",       "namespace",          "timeout_ms", "retry_ms",
                                       "connections", "record_ttl_seconds", NULL};
    config_section p_ = {c, "cluster", err, errlen}, *p = &p_;
    if (config_section_check_keys(p, sec, "", keys) != 0) return -1;
    const char *redis = json_object_get_string(sec, "redis");
    if (!redis || !*redis) return config_section_fail(p, "redis: required: \"HOST:PORT\" of the Redis server");
    const char *colon = strrchr(redis, ':');
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || colon == redis || !colon[1] || *end || port < 1 || port > 65535)
        return config_section_fail(p, "redis: \"%s\" must be HOST:PORT", redis);
    const char *ns = json_object_get_string(sec, "namespace");
    if (json_object_get(sec, "namespace") && (!ns || !valid_namespace(ns)))
        return config_section_fail(p, "namespace: must be 1 to 32 characters of [A-Za-z0-9._-]");
    snprintf(cc->ns, sizeof cc->ns, "%s", ns ? ns : "regfacade");
    cc->timeout_ms = 250;
    cc->retry_ms = 1000;
    cc->connections = 8;
    cc->record_ttl_s = 30L * 86400;
    if (get_long(p, sec, "timeout_ms", 1, 10000, &cc->timeout_ms) != 0 ||
        get_long(p, sec, "retry_ms", 10, 600000, &cc->retry_ms) != 0 ||
        get_long(p, sec, "connections", 1, CLUSTER_MAX_CONNECTIONS, &cc->connections) != 0 ||
        get_long(p, sec, "record_ttl_seconds", 60, 10L * 365 * 86400, &cc->record_ttl_s) != 0)
        return -1;
    if (!(cc->host = strndup(redis, (size_t)(colon - redis)))) return config_section_fail(p, ": out of memory");
    cc->port = (int)port;
    return 0;
}

int cluster_check_config(const config *c, char *err, size_t errlen) {
    if (!c->cluster) return 0;
    cluster_config cc;
    if (parse_config(c, &cc, err, errlen) != 0) return -1;
    free(cc.host);
    return 0;
}

/* ---------- connections and the breaker ---------- */

static struct timeval tv_of(long ms) { return (struct timeval){.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000}; }

/* A connected context with the command timeout set, or NULL with why. */
static redisContext *connect_one(cluster *cl, char *why, size_t whylen) {
    redisContext *c = redisConnectWithTimeout(cl->host, cl->port, tv_of(cl->timeout_ms));
    if (!c) {
        snprintf(why, whylen, "out of memory");
        return NULL;
    }
    if (c->err) {
        snprintf(why, whylen, "connecting to %s:%d: %s", cl->host, cl->port, c->errstr);
        redisFree(c);
        return NULL;
    }
    if (redisSetTimeout(c, tv_of(cl->timeout_ms)) != REDIS_OK) {
        snprintf(why, whylen, "setting the timeout on %s:%d: %s", cl->host, cl->port, c->errstr);
        redisFree(c);
        return NULL;
    }
    return c;
}

/* What went wrong on c, in words: a socket timeout reads "no answer
 * within N ms" rather than EAGAIN's "Resource temporarily unavailable". */
static const char *failure_of(const cluster *cl, const redisContext *c, int saved_errno, char *buf, size_t len) {
    if (c->err == REDIS_ERR_IO && (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK))
        snprintf(buf, len, "no answer within %ld ms (cluster.timeout_ms)", cl->timeout_ms);
    else
        snprintf(buf, len, "%s", c->errstr[0] ? c->errstr : "no reply");
    return buf;
}

/* PING on c: 0, or -1 with why. */
static int ping(cluster *cl, redisContext *c, char *why, size_t whylen) {
    redisReply *r = redisCommand(c, "PING");
    int saved = errno;
    int ok = r && r->type == REDIS_REPLY_STATUS;
    char what[128];
    if (!r)
        snprintf(why, whylen, "PING to %s:%d: %s", cl->host, cl->port, failure_of(cl, c, saved, what, sizeof what));
    else if (!ok)
        snprintf(why, whylen, "PING to %s:%d answered %.100s", cl->host, cl->port,
                 r->type == REDIS_REPLY_ERROR ? r->str : "something else");
    if (r) freeReplyObject(r);
    return ok ? 0 : -1;
}

/* Open the breaker (mu held): one log line per outage, idle connections
 * dropped now, busy ones when they come back. */
static void trip_locked(cluster *cl, const char *why) {
    if (!cl->up) return;
    cl->up = false;
    cl->gen++;
    cl->down_since_ms = clock_monotonic_ms();
    snprintf(cl->down_why, sizeof cl->down_why, "%s", why);
    atomic_fetch_add(&cl->outages, 1);
    for (size_t i = 0; i < cl->n_slots; i++)
        if (!cl->slots[i].busy && cl->slots[i].c) {
            redisFree(cl->slots[i].c);
            cl->slots[i].c = NULL;
        }
    pthread_cond_broadcast(&cl->cv);
    log_error("cluster: Redis %s:%d unreachable (%s); serving alone from the cache and the upstreams until it "
              "answers again",
              cl->host, cl->port, why);
}

/* Connect every empty idle slot (called by the keeper without mu: connects
 * may take timeout_ms each). */
static void fill_slots(cluster *cl) {
    for (size_t i = 0; i < cl->n_slots; i++) {
        pthread_mutex_lock(&cl->mu);
        bool empty = !cl->slots[i].c && !cl->slots[i].busy && !cl->stopping;
        unsigned gen = cl->gen;
        if (empty) cl->slots[i].busy = true; /* ours while connecting */
        pthread_mutex_unlock(&cl->mu);
        if (!empty) continue;
        char why[256];
        redisContext *c = connect_one(cl, why, sizeof why);
        pthread_mutex_lock(&cl->mu);
        cl->slots[i].busy = false;
        if (c && gen == cl->gen && cl->up) {
            cl->slots[i].c = c;
            cl->slots[i].gen = gen;
            c = NULL;
        }
        pthread_cond_broadcast(&cl->cv);
        pthread_mutex_unlock(&cl->mu);
        if (c) redisFree(c);
    }
}

/* The keeper: probes every retry_ms with its own connection; closes the
 * breaker when Redis answers, opens it when it stops answering (so an
 * outage is seen even without requests), keeps the pool filled. */
static void *keeper_main(void *ud) {
    cluster *cl = ud;
    redisContext *probe = NULL;
    for (;;) {
        char why[256] = "";
        if (!probe) probe = connect_one(cl, why, sizeof why);
        if (probe && ping(cl, probe, why, sizeof why) != 0) {
            redisFree(probe);
            probe = NULL;
        }
        pthread_mutex_lock(&cl->mu);
        if (cl->stopping) {
            pthread_mutex_unlock(&cl->mu);
            break;
        }
        if (!probe) {
            trip_locked(cl, why);
        } else if (!cl->up) {
            cl->up = true;
            long down_for = (long)(clock_monotonic_ms() - cl->down_since_ms);
            log_info("cluster: Redis %s:%d answers again (after %ld ms); the shared state is used again", cl->host,
                     cl->port, down_for);
        }
        bool up = cl->up;
        pthread_mutex_unlock(&cl->mu);
        if (up) fill_slots(cl);
        pthread_mutex_lock(&cl->mu);
        struct timespec until = clock_deadline(CLOCK_MONOTONIC, cl->retry_ms);
        while (!cl->stopping && pthread_cond_timedwait(&cl->cv, &cl->mu, &until) != ETIMEDOUT) {
        }
        bool stop = cl->stopping;
        pthread_mutex_unlock(&cl->mu);
        if (stop) break;
    }
    if (probe) redisFree(probe);
    return NULL;
}

/* Borrow a connected slot, waiting at most timeout_ms. NULL: degraded (the
 * breaker is open, or every connection stayed busy). */
static slot *acquire(cluster *cl) {
    pthread_mutex_lock(&cl->mu);
    struct timespec until = clock_deadline(CLOCK_MONOTONIC, cl->timeout_ms);
    slot *got = NULL;
    while (cl->up && !cl->stopping) {
        for (size_t i = 0; i < cl->n_slots && !got; i++)
            if (!cl->slots[i].busy && cl->slots[i].c) got = &cl->slots[i];
        if (got || pthread_cond_timedwait(&cl->cv, &cl->mu, &until) == ETIMEDOUT) break;
    }
    if (got) got->busy = true;
    pthread_mutex_unlock(&cl->mu);
    return got;
}

/* Give s back; broken: its connection failed (why says how), which opens
 * the breaker unless an outage was already seen since it connected. */
static void release(cluster *cl, slot *s, bool broken, const char *why) {
    pthread_mutex_lock(&cl->mu);
    if (broken || s->gen != cl->gen) {
        if (broken && s->gen == cl->gen) trip_locked(cl, why);
        redisFree(s->c);
        s->c = NULL;
    }
    s->busy = false;
    pthread_cond_broadcast(&cl->cv);
    pthread_mutex_unlock(&cl->mu);
}

/* One pipelined exchange: n commands (argv form, binary-safe), n replies.
 * CLUSTER_HIT with every reply in out (caller frees each), or CLUSTER_DOWN
 * with none. A Redis error reply is not a transport failure: it is logged,
 * counted and the call is degraded, the breaker stays closed. */
typedef struct {
    int argc;
    const char *argv[6];
    size_t len[6];
} cmd;

static void arg(cmd *c, const char *s, size_t len) {
    c->argv[c->argc] = s;
    c->len[c->argc++] = len;
}
static void args(cmd *c, const char *s) { arg(c, s, strlen(s)); }

static cluster_result exchange(cluster *cl, cmd *cmds, size_t n, redisReply **out) {
    slot *s = acquire(cl);
    if (!s) {
        atomic_fetch_add(&cl->calls_skipped, 1);
        return CLUSTER_DOWN;
    }
    char why[256] = "";
    bool broken = false;
    size_t got = 0;
    int saved = 0;
    for (size_t i = 0; i < n && !broken; i++)
        if (redisAppendCommandArgv(s->c, cmds[i].argc, cmds[i].argv, cmds[i].len) != REDIS_OK) broken = true;
    while (got < n && !broken) {
        void *r = NULL;
        if (redisGetReply(s->c, &r) != REDIS_OK || !r) {
            saved = errno;
            if (r) freeReplyObject(r);
            broken = true;
        } else {
            out[got++] = r;
        }
    }
    if (broken) failure_of(cl, s->c, saved, why, sizeof why);
    bool error_reply = false;
    for (size_t i = 0; i < got && !broken && !error_reply; i++)
        if (out[i]->type == REDIS_REPLY_ERROR) {
            error_reply = true;
            /* At most one line a minute: a Redis out of memory refuses every call. */
            int64_t now = clock_monotonic_ms(), last = atomic_load(&cl->refusal_logged_ms);
            if ((last == 0 || now - last >= 60000) &&
                atomic_compare_exchange_strong(&cl->refusal_logged_ms, &last, now))
                log_warn("cluster: Redis %s:%d refused %.*s: %s (this request went on alone; said at most once a "
                         "minute)",
                         cl->host, cl->port, (int)cmds[i].len[0], cmds[i].argv[0], out[i]->str);
        }
    release(cl, s, broken, why);
    if (broken || error_reply) {
        for (size_t i = 0; i < got; i++) freeReplyObject(out[i]);
        atomic_fetch_add(&cl->calls_failed, 1);
        return CLUSTER_DOWN;
    }
    return CLUSTER_HIT;
}

static cluster_result counted(cluster *cl, cluster_result r) {
    if (r == CLUSTER_HIT)
        atomic_fetch_add(&cl->calls_hit, 1);
    else if (r == CLUSTER_MISS)
        atomic_fetch_add(&cl->calls_miss, 1);
    return r;
}

/* ---------- metrics ---------- */

static void collect(metrics_writer *w, void *ud) {
    cluster *cl = ud;
    metrics_write_head(w, "regfacade_cluster_redis_up", "gauge",
                       "1 while Redis answers and the shared state is used; 0 while degraded (serving alone).");
    metrics_write(w, "regfacade_cluster_redis_up %d\n", cluster_up(cl) ? 1 : 0);
    metrics_write_head(w, "regfacade_cluster_redis_outages_total", "counter",
                       "Times Redis stopped answering (the breaker opened).");
    metrics_write(w, "regfacade_cluster_redis_outages_total %lu\n", atomic_load(&cl->outages));
    metrics_write_head(w, "regfacade_cluster_calls_total", "counter",
                       "Shared-state look-ups and writes by result: hit, miss, skipped (degraded or every connection "
                       "busy: not asked), failed (no answer in time, or an error reply).");
    metrics_write(w, "regfacade_cluster_calls_total{result=\"hit\"} %lu\n", atomic_load(&cl->calls_hit));
    metrics_write(w, "regfacade_cluster_calls_total{result=\"miss\"} %lu\n", atomic_load(&cl->calls_miss));
    metrics_write(w, "regfacade_cluster_calls_total{result=\"skipped\"} %lu\n", atomic_load(&cl->calls_skipped));
    metrics_write(w, "regfacade_cluster_calls_total{result=\"failed\"} %lu\n", atomic_load(&cl->calls_failed));
}

/* ---------- life ---------- */

int cluster_start(const config *c, cluster **out, char *err, size_t errlen) {
    *out = NULL;
    if (!c->cluster) return 0;
    cluster_config cc;
    if (parse_config(c, &cc, err, errlen) != 0) return -1;
    cluster *cl = calloc(1, sizeof *cl);
    slot *slots = calloc((size_t)cc.connections, sizeof *slots);
    if (!cl || !slots) {
        free(cl);
        free(slots);
        free(cc.host);
        snprintf(err, errlen, "cluster: out of memory");
        return -1;
    }
    cl->host = cc.host;
    cl->port = cc.port;
    snprintf(cl->ns, sizeof cl->ns, "%s", cc.ns);
    cl->timeout_ms = cc.timeout_ms;
    cl->retry_ms = cc.retry_ms;
    cl->record_ttl_s = cc.record_ttl_s;
    cl->n_slots = (size_t)cc.connections;
    cl->slots = slots;
    pthread_condattr_t ca;
    pthread_mutex_init(&cl->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&cl->cv, &ca);
    pthread_condattr_destroy(&ca);
    /* Start as if Redis had answered: the keeper's first probe, at once,
     * says otherwise (one log line) when it does not. */
    cl->up = true;
    cl->down_since_ms = clock_monotonic_ms();
    int rc = pthread_create(&cl->keeper, NULL, keeper_main, cl);
    if (rc != 0) {
        snprintf(err, errlen, "cluster: cannot start the Redis connection keeper: %s", strerror(rc));
        cluster_stop(cl);
        return -1;
    }
    cl->keeper_started = true;
    if (metrics_add_collector(collect, cl) != 0) {
        snprintf(err, errlen, "cluster: cannot register its metrics (the collector table is full)");
        cluster_stop(cl);
        return -1;
    }
    log_info("cluster: sharing tag resolutions, generated images and pushed specs through Redis %s:%d (keys %s:v1:*)",
             cl->host, cl->port, cl->ns);
    *out = cl;
    return 0;
}

void cluster_stop(cluster *cl) {
    if (!cl) return;
    metrics_remove_collector(collect, cl);
    pthread_mutex_lock(&cl->mu);
    cl->stopping = true;
    pthread_cond_broadcast(&cl->cv);
    pthread_mutex_unlock(&cl->mu);
    if (cl->keeper_started) pthread_join(cl->keeper, NULL);
    for (size_t i = 0; i < cl->n_slots; i++)
        if (cl->slots[i].c) redisFree(cl->slots[i].c);
    pthread_cond_destroy(&cl->cv);
    pthread_mutex_destroy(&cl->mu);
    free(cl->slots);
    free(cl->host);
    free(cl);
}

bool cluster_up(cluster *cl) {
    if (!cl) return false;
    pthread_mutex_lock(&cl->mu);
    bool up = cl->up;
    pthread_mutex_unlock(&cl->mu);
    return up;
}

bool cluster_degraded_detail(cluster *cl, char *out, size_t outlen) {
    if (outlen) out[0] = '\0';
    if (!cl) return false;
    pthread_mutex_lock(&cl->mu);
    bool down = !cl->up;
    if (down)
        snprintf(out, outlen,
                 "degraded: Redis %s:%d unreachable for %lds (%s); serving alone from the cache and the upstreams",
                 cl->host, cl->port, (long)((clock_monotonic_ms() - cl->down_since_ms) / 1000), cl->down_why);
    pthread_mutex_unlock(&cl->mu);
    return down;
}

/* ---------- keys and records ---------- */

/* "<ns>:v1:<kind>:<a>:<b>:<c>" (parts that are NULL left out). Repository
 * names, tags and upstream names cannot hold the characters that would
 * make two keys collide with ':' between them in this order (tags have no
 * ':', digests are checked by the callers). */
static int key_of(const cluster *cl, char *out, size_t outlen, const char *kind, const char *a, const char *b,
                  const char *c) {
    int n = snprintf(out, outlen, "%s:v1:%s:%s%s%s%s%s", cl->ns, kind, a, b ? ":" : "", b ? b : "", c ? ":" : "",
                     c ? c : "");
    return n > 0 && (size_t)n < outlen ? 0 : -1;
}

/* "digest media_type": split into the buffers. */
static bool split_pair(const char *s, size_t len, char *a, size_t alen, char *b, size_t blen) {
    const char *sp = memchr(s, ' ', len);
    if (!sp || (size_t)(sp - s) >= alen || len - (size_t)(sp - s) - 1 >= blen) return false;
    snprintf(a, alen, "%.*s", (int)(sp - s), s);
    snprintf(b, blen, "%.*s", (int)(len - (size_t)(sp - s) - 1), sp + 1);
    return a[0] != '\0';
}

static void free_replies(redisReply **r, size_t n) {
    for (size_t i = 0; i < n; i++) freeReplyObject(r[i]);
}

/* A GET's and PTTL's replies: HIT with the record, MISS when absent. */
static cluster_result read_tag(redisReply **rp, char *digest, size_t dlen, char *mt, size_t mtlen, long *left_ms) {
    if (rp[0]->type != REDIS_REPLY_STRING) return CLUSTER_MISS;
    if (!split_pair(rp[0]->str, rp[0]->len, digest, dlen, mt, mtlen)) return CLUSTER_MISS;
    *left_ms = rp[1]->type == REDIS_REPLY_INTEGER ? (long)rp[1]->integer : -1;
    /* Gone between the two commands, or a record without TTL (not ours). */
    return *left_ms > 0 ? CLUSTER_HIT : CLUSTER_MISS;
}

cluster_result cluster_tag_get(cluster *cl, const char *upstream, const char *repository, const char *tag, char *digest,
                               size_t dlen, char *media_type, size_t mtlen, long *left_ms) {
    if (!cl) return CLUSTER_OFF;
    char key[1024];
    if (key_of(cl, key, sizeof key, "tag", upstream, repository, tag) != 0) return CLUSTER_DOWN;
    cmd c[2] = {{0}, {0}};
    args(&c[0], "GET");
    args(&c[0], key);
    args(&c[1], "PTTL");
    args(&c[1], key);
    redisReply *rp[2];
    cluster_result r = exchange(cl, c, 2, rp);
    if (r != CLUSTER_HIT) return r;
    r = read_tag(rp, digest, dlen, media_type, mtlen, left_ms);
    free_replies(rp, 2);
    return counted(cl, r);
}

cluster_result cluster_tag_claim(cluster *cl, const char *upstream, const char *repository, const char *tag,
                                 long ttl_ms, char *digest, size_t dlen, char *media_type, size_t mtlen,
                                 long *left_ms) {
    if (!cl) return CLUSTER_OFF;
    char key[1024], val[512], px[32];
    int n = snprintf(val, sizeof val, "%s %s", digest, media_type);
    if (key_of(cl, key, sizeof key, "tag", upstream, repository, tag) != 0 || n <= 0 || (size_t)n >= sizeof val)
        return CLUSTER_DOWN;
    snprintf(px, sizeof px, "%ld", ttl_ms);
    /* SET NX first, then read what is there: ours when we won, the other
     * replica's when it was first (both in one round trip). */
    cmd c[3] = {{0}, {0}, {0}};
    args(&c[0], "SET");
    args(&c[0], key);
    arg(&c[0], val, (size_t)n);
    args(&c[0], "NX");
    args(&c[0], "PX");
    args(&c[0], px);
    args(&c[1], "GET");
    args(&c[1], key);
    args(&c[2], "PTTL");
    args(&c[2], key);
    redisReply *rp[3];
    cluster_result r = exchange(cl, c, 3, rp);
    if (r != CLUSTER_HIT) return r;
    char d[192], m[256];
    r = read_tag(rp + 1, d, sizeof d, m, sizeof m, left_ms);
    if (r == CLUSTER_HIT) {
        snprintf(digest, dlen, "%s", d);
        snprintf(media_type, mtlen, "%s", m);
    }
    free_replies(rp, 3);
    return counted(cl, r);
}

/* DEL of one key: HIT deleted, MISS not there. */
static cluster_result del_key(cluster *cl, const char *key) {
    cmd c = {0};
    args(&c, "DEL");
    args(&c, key);
    redisReply *rp;
    cluster_result r = exchange(cl, &c, 1, &rp);
    if (r != CLUSTER_HIT) return r;
    r = rp->type == REDIS_REPLY_INTEGER && rp->integer > 0 ? CLUSTER_HIT : CLUSTER_MISS;
    freeReplyObject(rp);
    return counted(cl, r);
}

cluster_result cluster_tag_forget(cluster *cl, const char *upstream, const char *repository, const char *tag) {
    if (!cl) return CLUSTER_OFF;
    char key[1024];
    if (key_of(cl, key, sizeof key, "tag", upstream, repository, tag) != 0) return CLUSTER_DOWN;
    return del_key(cl, key);
}

cluster_result cluster_made_add(cluster *cl, const char *digest, const char *repository, const char *tag,
                                const char *base_digest) {
    if (!cl) return CLUSTER_OFF;
    char key[256], val[512], secs[32];
    int n = snprintf(val, sizeof val, "%s %s", tag, base_digest);
    if (key_of(cl, key, sizeof key, "made", digest, NULL, NULL) != 0 || n <= 0 || (size_t)n >= sizeof val)
        return CLUSTER_DOWN;
    snprintf(secs, sizeof secs, "%ld", cl->record_ttl_s);
    cmd c[2] = {{0}, {0}};
    args(&c[0], "HSET");
    args(&c[0], key);
    args(&c[0], repository);
    arg(&c[0], val, (size_t)n);
    args(&c[1], "EXPIRE");
    args(&c[1], key);
    args(&c[1], secs);
    redisReply *rp[2];
    cluster_result r = exchange(cl, c, 2, rp);
    if (r != CLUSTER_HIT) return r;
    free_replies(rp, 2);
    return counted(cl, CLUSTER_HIT);
}

cluster_result cluster_made_get(cluster *cl, const char *digest, const char *repository, char *tag, size_t tlen,
                                char *base, size_t blen) {
    if (!cl) return CLUSTER_OFF;
    char key[256];
    if (key_of(cl, key, sizeof key, "made", digest, NULL, NULL) != 0) return CLUSTER_DOWN;
    cmd c = {0};
    args(&c, "HGET");
    args(&c, key);
    args(&c, repository);
    redisReply *rp;
    cluster_result r = exchange(cl, &c, 1, &rp);
    if (r != CLUSTER_HIT) return r;
    r = rp->type == REDIS_REPLY_STRING && split_pair(rp->str, rp->len, tag, tlen, base, blen) ? CLUSTER_HIT
                                                                                              : CLUSTER_MISS;
    freeReplyObject(rp);
    return counted(cl, r);
}

cluster_result cluster_link_put(cluster *cl, const char *scope_hex, const char *digest, const char *text) {
    if (!cl) return CLUSTER_OFF;
    char key[256], secs[32];
    if (key_of(cl, key, sizeof key, "link", scope_hex, digest, NULL) != 0) return CLUSTER_DOWN;
    snprintf(secs, sizeof secs, "%ld", cl->record_ttl_s);
    cmd c = {0};
    args(&c, "SET");
    args(&c, key);
    args(&c, text);
    args(&c, "EX");
    args(&c, secs);
    redisReply *rp;
    cluster_result r = exchange(cl, &c, 1, &rp);
    if (r != CLUSTER_HIT) return r;
    freeReplyObject(rp);
    return counted(cl, CLUSTER_HIT);
}

cluster_result cluster_link_get(cluster *cl, const char *scope_hex, const char *digest, char *text, size_t tlen) {
    if (!cl) return CLUSTER_OFF;
    char key[256];
    if (key_of(cl, key, sizeof key, "link", scope_hex, digest, NULL) != 0) return CLUSTER_DOWN;
    cmd c = {0};
    args(&c, "GET");
    args(&c, key);
    redisReply *rp;
    cluster_result r = exchange(cl, &c, 1, &rp);
    if (r != CLUSTER_HIT) return r;
    r = rp->type == REDIS_REPLY_STRING && rp->len < tlen ? CLUSTER_HIT : CLUSTER_MISS;
    if (r == CLUSTER_HIT) snprintf(text, tlen, "%.*s", (int)rp->len, rp->str);
    freeReplyObject(rp);
    return counted(cl, r);
}

cluster_result cluster_spec_put(cluster *cl, const char *provider, const char *id, const char *text, size_t len,
                                bool *replaced) {
    *replaced = false;
    if (!cl) return CLUSTER_OFF;
    char key[512];
    if (key_of(cl, key, sizeof key, "spec", provider, id, NULL) != 0) return CLUSTER_DOWN;
    /* SET ... GET (Redis 6.2): the old value tells a replacement from a new
     * spec, whichever replica it was pushed to before. */
    cmd c = {0};
    args(&c, "SET");
    args(&c, key);
    arg(&c, text, len);
    args(&c, "GET");
    redisReply *rp;
    cluster_result r = exchange(cl, &c, 1, &rp);
    if (r != CLUSTER_HIT) return r;
    *replaced = rp->type == REDIS_REPLY_STRING;
    freeReplyObject(rp);
    return counted(cl, CLUSTER_HIT);
}

cluster_result cluster_spec_get(cluster *cl, const char *provider, const char *id, size_t max, char **text,
                                size_t *len) {
    *text = NULL;
    if (!cl) return CLUSTER_OFF;
    char key[512];
    if (key_of(cl, key, sizeof key, "spec", provider, id, NULL) != 0) return CLUSTER_DOWN;
    cmd c = {0};
    args(&c, "GET");
    args(&c, key);
    redisReply *rp;
    cluster_result r = exchange(cl, &c, 1, &rp);
    if (r != CLUSTER_HIT) return r;
    if (rp->type != REDIS_REPLY_STRING) {
        r = CLUSTER_MISS;
    } else if (rp->len > max || !(*text = malloc(rp->len + 1))) {
        log_warn("cluster: spec %s/%s in Redis: %s", provider, id,
                 rp->len > max ? "larger than specs.max_bytes; ignored" : "out of memory");
        r = CLUSTER_DOWN;
    } else {
        memcpy(*text, rp->str, rp->len);
        (*text)[rp->len] = '\0';
        *len = rp->len;
    }
    freeReplyObject(rp);
    return r == CLUSTER_DOWN ? r : counted(cl, r);
}

cluster_result cluster_spec_del(cluster *cl, const char *provider, const char *id) {
    if (!cl) return CLUSTER_OFF;
    char key[512];
    if (key_of(cl, key, sizeof key, "spec", provider, id, NULL) != 0) return CLUSTER_DOWN;
    return del_key(cl, key);
}
