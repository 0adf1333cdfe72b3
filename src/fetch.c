#include "regfacade/fetch.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/clock.h"
#include "regfacade/digest.h"
#include "regfacade/log.h"
#include "regfacade/metrics.h"
#include "regfacade/spool_writer.h"
#include "regfacade/upstream_answer.h"

/* An attempt that brought at least this much restarts the retry budget. */
#define FETCH_PROGRESS_BYTES (1024 * 1024)

typedef enum { FETCH_RUNNING, FETCH_DONE, FETCH_FAILED } fetch_state;

struct fetch {
    fetcher *owner;
    upstream *u; /* held (upstream_hold) until the fetch is destroyed */
    char repository[256];
    char digest[DIGEST_STRING_LEN];
    int refs; /* guarded by owner->lock */
    fetch *next;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    fetch_state state;
    int ready; /* the upstream answered: size is known or -1 */
    int64_t size;
    uint64_t written; /* bytes in the spool */
    fetch_error err;
    store_spool spool;

    /* Used by the fetch thread only. */
    digest_ctx *dg;         /* fed by sw, in order */
    spool_writer *sw;       /* writes the body to the spool and publishes `written` */
    uint64_t attempt_start; /* offset this attempt asked for */
    uint64_t skip;          /* bytes of this answer to drop (200 to a Range request) */
    int no_range;           /* the upstream refused a Range (416): ask for everything, skip what we have */
    int committed;          /* the spool is the cached blob now: its fd pins it until destroyed */
    int64_t want_size;      /* the descriptor's size, -1 when the request had none */
    uint64_t max_bytes;     /* no more than this is written (want_size, or the fetcher's blob_max_bytes) */
    int refused;            /* the answer broke a size rule: final, never retried */
    char attempt_err[512];
    char retry_after[64];    /* Retry-After of the last failed attempt's answer */
    int64_t started_ms;      /* when the transfer took its slot (progress lines) */
    int64_t progress_ms;     /* when the last progress line was logged */
    uint64_t progress_bytes; /* bytes in the spool then */
};

/* Long cold transfers say how they go: one line every FETCH_PROGRESS_MS. */
#define FETCH_PROGRESS_MS 5000

static void progress_maybe(fetch *x);

struct fetcher {
    store *st;
    fetch_options opts;
    pthread_mutex_t lock;
    pthread_cond_t idle;
    pthread_cond_t slot; /* signalled when a transfer slot frees up */
    unsigned active;     /* transfers in progress (at most opts.max_concurrent) */
    unsigned queued;     /* fetches waiting in slot_acquire */
    fetch *running;
    int threads;
    fetch_stats stats;
};

fetcher *fetcher_new(store *s, const fetch_options *opts) {
    fetcher *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->st = s;
    f->opts = *opts;
    if (f->opts.max_concurrent == 0) f->opts.max_concurrent = FETCH_DEFAULT_MAX_CONCURRENT;
    if (f->opts.blob_max_bytes == 0) f->opts.blob_max_bytes = FETCH_DEFAULT_BLOB_MAX_BYTES;
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->idle, NULL);
    pthread_cond_init(&f->slot, NULL);
    return f;
}

void fetcher_free(fetcher *f) {
    if (!f) return;
    pthread_mutex_lock(&f->lock);
    while (f->threads > 0) pthread_cond_wait(&f->idle, &f->lock);
    pthread_mutex_unlock(&f->lock);
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->idle);
    pthread_cond_destroy(&f->slot);
    free(f);
}

void fetcher_set_blob_max_bytes(fetcher *f, uint64_t max) {
    pthread_mutex_lock(&f->lock);
    f->opts.blob_max_bytes = max ? max : FETCH_DEFAULT_BLOB_MAX_BYTES;
    pthread_mutex_unlock(&f->lock);
}

void fetcher_stats(fetcher *f, fetch_stats *out) {
    pthread_mutex_lock(&f->lock);
    *out = f->stats;
    out->active = f->active;
    out->queued = f->queued;
    out->waiters = 0;
    for (const fetch *x = f->running; x; x = x->next)
        if (x->refs > 1) out->waiters += (unsigned)(x->refs - 1); /* less the fetch thread's own */
    pthread_mutex_unlock(&f->lock);
}

static void fetch_destroy(fetch *x) {
    if (x->committed)
        store_blob_close(x->owner->st, x->digest, x->spool.fd); /* unpin: no reader is left */
    else if (x->spool.fd >= 0)
        close(x->spool.fd);
    digest_free(x->dg);
    upstream_free(x->u);
    pthread_mutex_destroy(&x->mu);
    pthread_cond_destroy(&x->cv);
    free(x);
}

void fetch_release(fetch *x) {
    if (!x) return;
    fetcher *f = x->owner;
    pthread_mutex_lock(&f->lock);
    int last = --x->refs == 0;
    pthread_mutex_unlock(&f->lock);
    if (last) fetch_destroy(x);
}

void fetch_error_set(fetch_error *e, int status, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    e->http_status = status;
    e->code = code;
    e->retry_after[0] = '\0';
    e->challenge[0] = '\0';
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

void fetch_error_wrap(fetch_error *e, const fetch_error *from, const char *prefix) {
    char m[sizeof from->message];
    snprintf(m, sizeof m, "%s: %s", prefix, from->message);
    if (e != from) *e = *from;
    snprintf(e->message, sizeof e->message, "%s", m);
}

void fetch_scope(store_scope *out, const upstream *u, const char *repository) {
    /* The account: upstream, URL and user (never the secret); anonymous is
     * an account of its own. */
    char account[4096];
    const char *user = upstream_username(u);
    snprintf(account, sizeof account, "%s\n%s\n%s%s", upstream_name(u), upstream_url(u), user ? "user " : "anonymous",
             user ? user : "");
    store_scope_upstream(out, account, repository);
}

/* The blob came from (u, repository): it may be served there. */
static int fetch_link(store *st, const upstream *u, const char *repository, const char *digest, char *err,
                      size_t errlen) {
    store_scope sc;
    fetch_scope(&sc, u, repository);
    return store_link_put(st, &sc, digest, NULL, NULL, err, errlen);
}

/* Total size from "bytes a-b/total". */
static int64_t content_range_total(const char *cr, uint64_t *first) {
    unsigned long long a, b, total;
    if (sscanf(cr, "bytes %llu-%llu/%llu", &a, &b, &total) != 3) return -1;
    *first = a;
    return (int64_t)total;
}

static int on_headers(void *ud, const upstream_response *r) {
    fetch *x = ud;
    int64_t size = -1;
    x->skip = 0;
    if (r->status == 206) {
        uint64_t first = 0;
        size = content_range_total(r->content_range, &first);
        if (size < 0 || first != x->attempt_start) {
            snprintf(x->attempt_err, sizeof x->attempt_err, "206 answer with unusable Content-Range \"%s\"",
                     r->content_range);
            return -1;
        }
    } else if (r->status == 200) {
        size = r->content_length;
        x->skip = x->attempt_start; /* the upstream ignored our Range: drop what we have */
    } else {
        snprintf(x->attempt_err, sizeof x->attempt_err, "unexpected status %ld", r->status);
        return -1;
    }
    /* Size rules before anything is reserved: a hostile upstream's
     * Content-Length must not take the disk. */
    if (x->want_size >= 0 && size >= 0 && size != x->want_size) {
        snprintf(x->attempt_err, sizeof x->attempt_err,
                 "upstream announced %lld bytes, but the descriptor says %lld; refused before anything was written",
                 (long long)size, (long long)x->want_size);
        x->refused = 1;
        return -1;
    }
    if (size >= 0 && (uint64_t)size > x->max_bytes) {
        snprintf(x->attempt_err, sizeof x->attempt_err,
                 "upstream announced %lld bytes, over the %llu-byte limit (limits.blob_max_bytes); refused before "
                 "anything was written",
                 (long long)size, (unsigned long long)x->max_bytes);
        x->refused = 1;
        return -1;
    }
    pthread_mutex_lock(&x->mu);
    if (!x->ready) {
        x->ready = 1;
        x->size = size;
        pthread_cond_broadcast(&x->cv);
    } else if (size >= 0 && x->size >= 0 && size != x->size) {
        pthread_mutex_unlock(&x->mu);
        snprintf(x->attempt_err, sizeof x->attempt_err, "size changed between attempts (%lld, then %lld)",
                 (long long)x->size, (long long)size);
        return -1;
    }
    pthread_mutex_unlock(&x->mu);
    /* Reserve the spool's blocks up front: writing into allocated blocks is
     * several times cheaper on ext4 than allocating on every write
     * (bench/findings.md). Readers go by `written`, never the file size. */
    if (size > 0) (void)fallocate(x->spool.fd, 0, 0, (off_t)size);
    return 0;
}

static int on_body(void *ud, const char *data, size_t len) {
    fetch *x = ud;
    if (x->skip > 0) {
        size_t drop = len < x->skip ? len : (size_t)x->skip;
        x->skip -= drop;
        data += drop;
        len -= drop;
        if (len == 0) return 0;
    }
    if (x->size >= 0 && spool_writer_end(x->sw) + len > (uint64_t)x->size) {
        snprintf(x->attempt_err, sizeof x->attempt_err, "upstream sent more than the %lld bytes it announced",
                 (long long)x->size);
        return -1;
    }
    /* A body without a length is cut at the limit. */
    if (spool_writer_end(x->sw) + len > x->max_bytes) {
        snprintf(x->attempt_err, sizeof x->attempt_err,
                 "upstream sent more than %llu bytes (%s) without announcing a length; cut, nothing cached",
                 (unsigned long long)x->max_bytes,
                 x->want_size >= 0 ? "the descriptor's size" : "limits.blob_max_bytes");
        x->refused = 1;
        return -1;
    }
    if (spool_writer_put(x->sw, data, len) != 0) {
        snprintf(x->attempt_err, sizeof x->attempt_err, "caching it failed: spool %s: %s", x->spool.path,
                 spool_writer_error(x->sw));
        return -1;
    }
    metrics_upstream_bytes(upstream_name(x->u), len);
    progress_maybe(x);
    return 0;
}

/* On the fetch thread (body and tick callbacks): a progress line every
 * FETCH_PROGRESS_MS while a transfer runs, with its rate since the last one
 * and the clients waiting for it. */
static void progress_maybe(fetch *x) {
    int64_t now = clock_monotonic_ms();
    if (!x->progress_ms) {
        x->started_ms = x->progress_ms = now;
        x->progress_bytes = spool_writer_end(x->sw);
        return;
    }
    if (now - x->progress_ms < FETCH_PROGRESS_MS) return;
    uint64_t have = spool_writer_end(x->sw);
    double mib_s = (double)(have - x->progress_bytes) / 1048576.0 / ((double)(now - x->progress_ms) / 1000.0);
    pthread_mutex_lock(&x->owner->lock);
    int waiting = x->refs > 1 ? x->refs - 1 : 0;
    pthread_mutex_unlock(&x->owner->lock);
    char total[32] = "?";
    if (x->size >= 0) snprintf(total, sizeof total, "%lld", (long long)x->size);
    log_info("fetch: blob %s from %s/%s: %llu of %s bytes after %llds, %.1f MiB/s, %d client%s waiting", x->digest,
             upstream_name(x->u), x->repository, (unsigned long long)have, total,
             (long long)((now - x->started_ms) / 1000), mib_s, waiting, waiting == 1 ? "" : "s");
    x->progress_ms = now;
    x->progress_bytes = have;
}

/* A stalled upstream: bytes that came before the stall still reach readers. */
static int on_tick(void *ud) {
    fetch *x = ud;
    progress_maybe(x);
    if (spool_writer_tick(x->sw) != 0) {
        snprintf(x->attempt_err, sizeof x->attempt_err, "caching it failed: spool %s: %s", x->spool.path,
                 spool_writer_error(x->sw));
        return -1;
    }
    return 0;
}

/* On the spool writer's thread: bytes up to end are readable now. */
static void on_written(void *ud, uint64_t end) {
    fetch *x = ud;
    pthread_mutex_lock(&x->mu);
    x->written = end;
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
}

/* A transfer slot: at most opts.max_concurrent fetches talk to upstreams
 * at once; the others wait here (their clients wait for the first byte). */
static void slot_acquire(fetcher *f) {
    pthread_mutex_lock(&f->lock);
    f->queued++;
    while (f->active >= f->opts.max_concurrent) pthread_cond_wait(&f->slot, &f->lock);
    f->queued--;
    f->active++;
    if (f->active > f->stats.max_active) f->stats.max_active = f->active;
    pthread_mutex_unlock(&f->lock);
}

static void slot_release(fetcher *f) {
    pthread_mutex_lock(&f->lock);
    f->active--;
    pthread_cond_signal(&f->slot);
    pthread_mutex_unlock(&f->lock);
}

/* One attempt. Returns 0 when the whole body is in the spool, 1 to retry,
 * -1 on a final failure (x->err set). */
static int fetch_attempt(fetch *x) {
    char path[600];
    snprintf(path, sizeof path, "%s/blobs/%s", x->repository, x->digest);
    upstream_request req = {
        .method = "GET",
        .repository = x->repository,
        .path = path,
        .accept = NULL,
        .range_start = x->no_range ? 0 : x->written,
        .on_headers = on_headers,
        .on_body = on_body,
        .on_tick = on_tick,
        .ud = x,
    };
    upstream_response resp;
    char err[1024] = "";
    x->attempt_start = x->written;
    x->attempt_err[0] = '\0';
    x->retry_after[0] = '\0';
    memset(&x->err, 0, sizeof x->err);
    upstream_result r = upstream_perform(x->u, &req, &resp, err, sizeof err);
    const char *name = upstream_name(x->u);
    /* Everything this attempt brought goes to the spool before anything
     * looks at `written` (the resume offset, the digest). */
    if (spool_writer_flush(x->sw) != 0) {
        fetch_error_set(&x->err, 502, "UNKNOWN", "caching it failed: spool %s: %s", x->spool.path,
                        spool_writer_error(x->sw));
        return -1;
    }
    if (r == UPSTREAM_OK && (resp.status == 200 || resp.status == 206)) {
        if (x->size >= 0 && x->written < (uint64_t)x->size) {
            snprintf(x->attempt_err, sizeof x->attempt_err, "body ended at %llu of %lld bytes",
                     (unsigned long long)x->written, (long long)x->size);
            return 1;
        }
        return 0;
    }
    if (r == UPSTREAM_OK && resp.status == 416 && x->written > 0 && !x->no_range) {
        snprintf(x->attempt_err, sizeof x->attempt_err,
                 "upstream refused to resume at %llu; asking for the "
                 "whole blob and skipping what arrived",
                 (unsigned long long)x->written);
        x->no_range = 1;
        return 1;
    }
    if (r == UPSTREAM_ERR_ABORTED) {
        fetch_error_set(&x->err, 502, "UNKNOWN", "upstream %s, blob %s: %s", name, x->digest, x->attempt_err);
        return x->refused || (x->attempt_err[0] && strstr(x->attempt_err, "spool")) ? -1 : 1;
    }
    char subject[600];
    snprintf(subject, sizeof subject, "blob %s of %s", x->digest, x->repository);
    bool retry = false;
    if (upstream_answer_map(UPSTREAM_WHAT_BLOB, name, subject, r, &resp, err, &x->err, &retry) == UPSTREAM_ANSWER_OK)
        fetch_error_set(&x->err, 502, "UNKNOWN", "upstream %s answered unexpected status %ld for %s", name, resp.status,
                        subject);
    /* Paces the next attempt (a 429's or a 5xx's Retry-After). */
    if (r == UPSTREAM_OK) snprintf(x->retry_after, sizeof x->retry_after, "%s", resp.retry_after);
    return retry ? 1 : -1;
}

static void *fetch_thread(void *arg) {
    fetch *x = arg;
    fetcher *f = x->owner;
    int rc = -1;
    char gave_up[400] = "";
    upstream_retry rt;
    upstream_retry_init(&rt);
    char err[1024];
    x->sw = spool_writer_new(x->spool.fd, 0, x->dg, on_written, x, err, sizeof err);
    if (!x->sw) {
        fetch_error_set(&x->err, 500, "UNKNOWN", "blob %s: %s", x->digest, err);
        rc = -1;
    }
    for (int attempt = 1; x->sw; attempt++) {
        uint64_t before = x->written;
        slot_acquire(f);
        rc = fetch_attempt(x);
        slot_release(f);
        if (rc != 1) break;
        /* Real progress (not a trickle) starts the retry count and budget again. */
        if (x->written >= before + FETCH_PROGRESS_BYTES) upstream_retry_progress(&rt);
        long delay = upstream_retry_delay(x->u, &rt, x->retry_after, gave_up, sizeof gave_up);
        const char *why = x->attempt_err[0] ? x->attempt_err : x->err.message;
        if (delay < 0) {
            log_warn("blob %s from upstream %s: attempt %d failed (%s); not retrying: %s", x->digest,
                     upstream_name(x->u), attempt, why, gave_up);
            break;
        }
        log_warn("blob %s from upstream %s: attempt %d failed (%s); retrying from byte %llu in %ld ms", x->digest,
                 upstream_name(x->u), attempt, why, (unsigned long long)x->written, delay);
        metrics_upstream_retry(upstream_name(x->u), "blob");
        upstream_sleep_ms(delay);
    }
    spool_writer_free(x->sw);
    x->sw = NULL;
    char got[DIGEST_STRING_LEN] = "";
    if (rc == 0) {
        if (digest_final(x->dg, got) != 0) {
            fetch_error_set(&x->err, 502, "UNKNOWN", "sha256 of blob %s failed", x->digest);
            rc = -1;
        } else if (strcmp(got, x->digest) != 0) {
            fetch_error_set(&x->err, 502, "DIGEST_INVALID",
                            "upstream %s sent bytes with digest %s for blob %s (%llu bytes); not cached",
                            upstream_name(x->u), got, x->digest, (unsigned long long)x->written);
            rc = -1;
        } else {
            /* Verified from (u, repository): it may be served there. A lost
             * link costs one upstream HEAD later, nothing else. */
            if (fetch_link(f->st, x->u, x->repository, x->digest, err, sizeof err) != 0)
                log_error("blob %s: %s", x->digest, err);
            if (store_spool_commit(f->st, &x->spool, x->digest, err, sizeof err) != 0) {
                /* Verified bytes can still be served from the spool; only caching failed. */
                log_error("blob %s: %s", x->digest, err);
                store_spool_discard(f->st, &x->spool);
            } else {
                x->committed = 1;
                metrics_cache_put(x->written);
            }
        }
    }
    if (rc != 0) {
        if (rc == 1 && !x->err.code)
            fetch_error_set(&x->err, 502, "UNKNOWN", "upstream %s, blob %s: %s", upstream_name(x->u), x->digest,
                            x->attempt_err);
        if (rc == 1 && gave_up[0]) {
            size_t ml = strlen(x->err.message);
            if (ml < sizeof x->err.message - 1)
                snprintf(x->err.message + ml, sizeof x->err.message - ml, " (gave up: %s)", gave_up);
        }
        store_spool_discard(f->st, &x->spool);
        /* An upstream's 404 is an answer, not a failure of ours. */
        log_msg(upstream_answer_log_level(x->err.http_status), "blob %s from upstream %s failed: %s", x->digest,
                upstream_name(x->u), x->err.message);
    }

    pthread_mutex_lock(&f->lock);
    /* Leave the running list after the commit, so a newcomer finds the blob
     * either here or in the store. */
    for (fetch **pp = &f->running; *pp; pp = &(*pp)->next)
        if (*pp == x) {
            *pp = x->next;
            break;
        }
    if (rc != 0) f->stats.failed++;
    pthread_mutex_unlock(&f->lock);

    pthread_mutex_lock(&x->mu);
    x->state = rc == 0 ? FETCH_DONE : FETCH_FAILED;
    if (rc == 0 && !x->ready) {
        x->ready = 1;
        x->size = (int64_t)x->written;
    }
    if (rc == 0) x->size = (int64_t)x->written;
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);

    fetch_release(x);
    pthread_mutex_lock(&f->lock);
    if (--f->threads == 0) pthread_cond_broadcast(&f->idle);
    pthread_mutex_unlock(&f->lock);
    return NULL;
}

fetch *fetch_blob(fetcher *f, upstream *u, const char *repository, const char *digest, int64_t want_size,
                  int *now_cached, char *err, size_t errlen) {
    *now_cached = 0;
    pthread_mutex_lock(&f->lock);
    for (fetch *x = f->running; x; x = x->next) {
        if (strcmp(x->digest, digest) == 0) {
            x->refs++;
            f->stats.coalesced++;
            pthread_mutex_unlock(&f->lock);
            return x;
        }
    }
    if (store_blob_exists(f->st, digest)) {
        pthread_mutex_unlock(&f->lock);
        *now_cached = 1;
        return NULL;
    }
    fetch *x = calloc(1, sizeof *x);
    if (!x || !(x->dg = digest_new())) {
        free(x);
        pthread_mutex_unlock(&f->lock);
        snprintf(err, errlen, "fetch %s: out of memory", digest);
        return NULL;
    }
    x->owner = f;
    x->u = upstream_hold(u); /* the fetch may outlive the request's configuration generation */
    snprintf(x->repository, sizeof x->repository, "%s", repository);
    snprintf(x->digest, sizeof x->digest, "%s", digest);
    x->size = -1;
    x->want_size = want_size;
    x->max_bytes = want_size >= 0 ? (uint64_t)want_size : f->opts.blob_max_bytes;
    x->spool.fd = -1;
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->cv, NULL);
    if (store_spool_create(f->st, &x->spool, err, errlen) != 0) {
        pthread_mutex_unlock(&f->lock);
        fetch_destroy(x);
        return NULL;
    }
    x->refs = 2; /* the caller's and the thread's */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_t tid;
    int rc = pthread_create(&tid, &attr, fetch_thread, x);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        pthread_mutex_unlock(&f->lock);
        store_spool_discard(f->st, &x->spool);
        fetch_destroy(x);
        snprintf(err, errlen, "fetch %s: cannot start a thread: %s", digest, strerror(rc));
        return NULL;
    }
    x->next = f->running;
    f->running = x;
    f->threads++;
    f->stats.started++;
    pthread_mutex_unlock(&f->lock);
    return x;
}

int fetch_wait_ready(fetch *x, int64_t *size, fetch_error *e) {
    pthread_mutex_lock(&x->mu);
    while (!x->ready && x->state == FETCH_RUNNING) pthread_cond_wait(&x->cv, &x->mu);
    int rc = 0;
    if (x->ready && x->state != FETCH_FAILED) {
        *size = x->size;
    } else {
        *e = x->err;
        rc = -1;
    }
    pthread_mutex_unlock(&x->mu);
    return rc;
}

int fetch_wait_done(fetch *x, fetch_error *e) {
    pthread_mutex_lock(&x->mu);
    while (x->state == FETCH_RUNNING) pthread_cond_wait(&x->cv, &x->mu);
    int rc = x->state == FETCH_DONE ? 0 : -1;
    if (rc != 0) *e = x->err;
    pthread_mutex_unlock(&x->mu);
    return rc;
}

ssize_t fetch_read(fetch *x, uint64_t off, uint64_t end, void *buf, size_t len) {
    pthread_mutex_lock(&x->mu);
    for (;;) {
        /* Until the digest is verified, readers stay a byte behind the
         * spool and the end of their range: the last byte a reader wants
         * always waits for the digest. */
        uint64_t avail = x->written < end ? x->written : end;
        if (x->state != FETCH_DONE && avail > 0) avail--;
        if (x->state == FETCH_FAILED) {
            pthread_mutex_unlock(&x->mu);
            return -1;
        }
        if (off < avail) {
            size_t n = avail - off < len ? (size_t)(avail - off) : len;
            int fd = x->spool.fd;
            pthread_mutex_unlock(&x->mu);
            ssize_t got = pread(fd, buf, n, (off_t)off);
            return got > 0 ? got : -1;
        }
        if (x->state == FETCH_DONE || off >= end) {
            pthread_mutex_unlock(&x->mu);
            return 0;
        }
        pthread_cond_wait(&x->cv, &x->mu);
    }
}

int fetch_blob_bytes(fetcher *f, upstream *u, const char *repository, const char *digest, int64_t want_size, size_t max,
                     char **data, size_t *len, fetch_error *e) {
    char err[1024];
    for (int round = 0; round < 2; round++) {
        int rc = store_blob_read(f->st, digest, max, data, len, err, sizeof err);
        if (rc == 1) return 0;
        if (rc < 0) {
            fetch_error_set(e, 502, "UNKNOWN", "%s", err);
            return -1;
        }
        if (round == 1) break;
        if (want_size >= 0 && (uint64_t)want_size > max) {
            fetch_error_set(e, 502, "SIZE_INVALID", "blob %s is %lld bytes by its descriptor, over the %zu-byte limit",
                            digest, (long long)want_size, max);
            return -1;
        }
        int now_cached = 0;
        fetch *x = fetch_blob(f, u, repository, digest, want_size, &now_cached, err, sizeof err);
        if (!x) {
            if (now_cached) continue;
            fetch_error_set(e, 500, "UNKNOWN", "%s", err);
            return -1;
        }
        int done = fetch_wait_done(x, e);
        fetch_release(x);
        if (done != 0) return -1;
    }
    fetch_error_set(e, 502, "UNKNOWN", "blob %s was fetched but is not in the cache", digest);
    return -1;
}

bool fetch_blob_linked(fetcher *f, const upstream *u, const char *repository, const char *digest) {
    store_scope sc, everyone;
    fetch_scope(&sc, u, repository);
    store_scope_everyone(&everyone);
    return store_link_get(f->st, &sc, digest, NULL, 0, NULL, 0) == 1 ||
           store_link_get(f->st, &everyone, digest, NULL, 0, NULL, 0) == 1;
}

bool fetch_source_is(const fetch *x, const upstream *u, const char *repository) {
    store_scope a, b;
    fetch_scope(&a, x->u, x->repository);
    fetch_scope(&b, u, repository);
    return strcmp(a.hex, b.hex) == 0;
}

int fetch_blob_known(fetcher *f, upstream *u, const char *repository, const char *digest, int64_t *size,
                     fetch_error *e) {
    *size = -1;
    if (fetch_blob_linked(f, u, repository, digest)) return 1;
    char path[600], subject[600], err[512];
    snprintf(path, sizeof path, "%s/blobs/%s", repository, digest);
    snprintf(subject, sizeof subject, "blob %s of %s", digest, repository);
    upstream_request req = {.method = "HEAD", .repository = repository, .path = path};
    upstream_response resp;
    if (upstream_ask(u, &req, &resp, UPSTREAM_WHAT_BLOB, subject, false, e) != UPSTREAM_ANSWER_OK) return -1;
    if (resp.status != 200) {
        fetch_error_set(e, 502, "UNKNOWN", "upstream %s answered %ld for HEAD of %s", upstream_name(u), resp.status,
                        subject);
        return -1;
    }
    store_scope sc;
    fetch_scope(&sc, u, repository);
    if (store_link_put(f->st, &sc, digest, NULL, NULL, err, sizeof err) != 0) log_error("blob %s: %s", digest, err);
    *size = resp.content_length;
    return 1;
}
