#include "regfacade/spool_writer.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/clock.h"

/* Start the disk writeback of every this many bytes written. */
#define SPOOL_WRITER_WRITEBACK_BYTES (8u * 1024 * 1024)

/* The two stages that work on a handed-over buffer, each on its own thread:
 * on a machine with cores to spare, hashing (the slowest stage) runs in
 * parallel with writing and with receiving the next buffer. */
enum { STAGE_WRITE, STAGE_HASH, STAGE_COUNT };

struct spool_writer {
    int fd;
    digest_ctx *dg;
    spool_writer_written_fn on_written;
    void *ud;

    /* Producer side, used by the putting thread only. */
    char *buf[2];
    int fill; /* index of the buffer being filled */
    size_t fill_len;
    int64_t fill_since_ms; /* when its first byte came */
    uint64_t end;          /* offset after the last byte put */

    /* Shared, under mu. */
    pthread_mutex_t mu;
    pthread_cond_t work;            /* a buffer was handed over, or stop */
    pthread_cond_t done;            /* a stage finished the handed-over buffer */
    uint64_t handed;                /* buffers handed over so far */
    uint64_t finished[STAGE_COUNT]; /* buffers each stage is done with */
    int pending;                    /* index of the handed-over buffer */
    size_t pending_len;
    uint64_t pending_off;
    int failed;
    int stop;
    char err[300];

    /* Write stage only. */
    uint64_t writeback_from; /* first byte whose writeback is not started */
    pthread_t threads[STAGE_COUNT];
    int started; /* threads running */
};

typedef struct {
    spool_writer *w;
    int stage;
} stage_arg;

/* The write stage: the spool, then readers are told. 0 or -1 (err set). */
static int write_chunk(spool_writer *w, const char *data, size_t len, uint64_t off, char *err, size_t errlen) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(w->fd, data + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            snprintf(err, errlen, "write at byte %llu: %s", (unsigned long long)(off + done), strerror(errno));
            return -1;
        }
        done += (size_t)n;
    }
    uint64_t end = off + len;
    if (end - w->writeback_from >= SPOOL_WRITER_WRITEBACK_BYTES) {
        /* Asynchronous: queues the pages for the disk and returns. A failure
         * only means the commit's fsync does all the work. */
        (void)sync_file_range(w->fd, (off_t)w->writeback_from, (off_t)(end - w->writeback_from), SYNC_FILE_RANGE_WRITE);
        w->writeback_from = end;
    }
    w->on_written(w->ud, end);
    return 0;
}

static void *stage_thread(void *arg) {
    stage_arg a = *(stage_arg *)arg;
    free(arg);
    spool_writer *w = a.w;
    char err[sizeof w->err];
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (w->finished[a.stage] == w->handed && !w->stop) pthread_cond_wait(&w->work, &w->mu);
        if (w->finished[a.stage] == w->handed) break; /* stop, nothing left */
        const char *data = w->buf[w->pending];
        size_t len = w->pending_len;
        uint64_t off = w->pending_off;
        int failed = w->failed;
        pthread_mutex_unlock(&w->mu);

        int rc = -1;
        if (!failed && a.stage == STAGE_WRITE) {
            rc = write_chunk(w, data, len, off, err, sizeof err);
        } else if (!failed) {
            rc = digest_update(w->dg, data, len);
            if (rc != 0) snprintf(err, sizeof err, "sha256 update of the spool's bytes failed");
        }

        pthread_mutex_lock(&w->mu);
        if (rc != 0 && !failed && !w->failed) {
            w->failed = 1;
            memcpy(w->err, err, sizeof err);
        }
        w->finished[a.stage]++;
        pthread_cond_broadcast(&w->done);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* Every stage is done with the handed-over buffer. Under mu. */
static int stages_idle(const spool_writer *w) {
    for (int i = 0; i < STAGE_COUNT; i++)
        if (w->finished[i] != w->handed) return 0;
    return 1;
}

static void stop_threads(spool_writer *w) {
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_broadcast(&w->work);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < w->started; i++) pthread_join(w->threads[i], NULL);
    w->started = 0;
}

static void destroy(spool_writer *w) {
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->work);
    pthread_cond_destroy(&w->done);
    free(w->buf[0]);
    free(w->buf[1]);
    free(w);
}

spool_writer *spool_writer_new(int fd, uint64_t start, digest_ctx *dg, spool_writer_written_fn on_written, void *ud,
                               char *err, size_t errlen) {
    spool_writer *w = calloc(1, sizeof *w);
    if (!w || !(w->buf[0] = malloc(SPOOL_WRITER_CHUNK)) || !(w->buf[1] = malloc(SPOOL_WRITER_CHUNK))) {
        if (w) {
            free(w->buf[0]);
            free(w);
        }
        snprintf(err, errlen, "spool writer: out of memory");
        return NULL;
    }
    w->fd = fd;
    w->dg = dg;
    w->on_written = on_written;
    w->ud = ud;
    w->end = start;
    w->writeback_from = start;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->done, NULL);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 128 * 1024);
    int rc = 0;
    for (int i = 0; i < STAGE_COUNT && rc == 0; i++) {
        stage_arg *a = malloc(sizeof *a);
        if (!a) {
            rc = ENOMEM;
            break;
        }
        a->w = w;
        a->stage = i;
        rc = pthread_create(&w->threads[i], &attr, stage_thread, a);
        if (rc != 0)
            free(a);
        else
            w->started++;
    }
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        snprintf(err, errlen, "spool writer: cannot start a thread: %s", strerror(rc));
        stop_threads(w);
        destroy(w);
        return NULL;
    }
    return w;
}

/* Gives the fill buffer to the writer. wait: block until the writer is free;
 * otherwise return 1 at once when it is busy. 0 handed over, -1 failed. */
static int hand_over(spool_writer *w, int wait) {
    pthread_mutex_lock(&w->mu);
    while (!stages_idle(w) && !w->failed) {
        if (!wait) {
            pthread_mutex_unlock(&w->mu);
            return 1;
        }
        pthread_cond_wait(&w->done, &w->mu);
    }
    if (w->failed) {
        pthread_mutex_unlock(&w->mu);
        return -1;
    }
    w->pending = w->fill;
    w->pending_len = w->fill_len;
    w->pending_off = w->end - w->fill_len;
    w->handed++;
    pthread_cond_broadcast(&w->work);
    pthread_mutex_unlock(&w->mu);
    w->fill ^= 1;
    w->fill_len = 0;
    return 0;
}

/* Hands over a partial buffer that has waited long enough, if the writer is free. */
static int hand_over_if_due(spool_writer *w) {
    if (w->fill_len == 0 || clock_monotonic_ms() - w->fill_since_ms < SPOOL_WRITER_MAX_DELAY_MS) return 0;
    return hand_over(w, 0) < 0 ? -1 : 0;
}

int spool_writer_put(spool_writer *w, const char *data, size_t len) {
    while (len > 0) {
        size_t n = SPOOL_WRITER_CHUNK - w->fill_len;
        if (n > len) n = len;
        if (w->fill_len == 0) w->fill_since_ms = clock_monotonic_ms();
        memcpy(w->buf[w->fill] + w->fill_len, data, n);
        w->fill_len += n;
        w->end += n;
        data += n;
        len -= n;
        if (w->fill_len == SPOOL_WRITER_CHUNK && hand_over(w, 1) != 0) return -1;
    }
    return hand_over_if_due(w);
}

int spool_writer_tick(spool_writer *w) { return hand_over_if_due(w); }

int spool_writer_flush(spool_writer *w) {
    if (w->fill_len > 0 && hand_over(w, 1) != 0) return -1;
    pthread_mutex_lock(&w->mu);
    while (!stages_idle(w) && !w->failed) pthread_cond_wait(&w->done, &w->mu);
    int rc = w->failed ? -1 : 0;
    pthread_mutex_unlock(&w->mu);
    return rc;
}

uint64_t spool_writer_end(const spool_writer *w) { return w->end; }

const char *spool_writer_error(spool_writer *w) {
    pthread_mutex_lock(&w->mu);
    const char *e = w->failed ? w->err : "";
    pthread_mutex_unlock(&w->mu);
    return e;
}

void spool_writer_free(spool_writer *w) {
    if (!w) return;
    stop_threads(w);
    destroy(w);
}
