/*
 * Unit tests of spool_writer: bytes put in pieces of every size land in the
 * file in order with the right sha256, readers are told in order up to the
 * end, a partial buffer reaches readers after SPOOL_WRITER_MAX_DELAY_MS on
 * a tick (a stalled upstream) and a failing write is reported and stops
 * everything after it.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/clock.h"
#include "regfacade/digest.h"
#include "regfacade/spool_writer.h"
#include "unit.h"

static char tmpdir[256];

typedef struct {
    pthread_mutex_t mu;
    uint64_t end;
    int calls;
    int out_of_order;
} seen;

static void on_written(void *ud, uint64_t end) {
    seen *s = ud;
    pthread_mutex_lock(&s->mu);
    if (end <= s->end) s->out_of_order++;
    s->end = end;
    s->calls++;
    pthread_mutex_unlock(&s->mu);
}

static uint64_t seen_end(seen *s) {
    pthread_mutex_lock(&s->mu);
    uint64_t e = s->end;
    pthread_mutex_unlock(&s->mu);
    return e;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* A spool file named `name` (read-only: every write fails) and a writer on it from `start`. */
typedef struct {
    char path[300];
    int fd;
    digest_ctx *dg;
    seen s;
    spool_writer *w;
} fixture;

static bool fixture_open(fixture *f, const char *name, uint64_t start, bool read_only) {
    char err[256];
    memset(f, 0, sizeof *f);
    pthread_mutex_init(&f->s.mu, NULL);
    snprintf(f->path, sizeof f->path, "%s/%s", tmpdir, name);
    f->fd = open(f->path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(f->fd >= 0);
    if (f->fd >= 0 && start > 0) {
        /* The bytes before `start` are there already (a resumed fetch). */
        char *before = malloc(start);
        CHECK(before != NULL);
        if (before) memset(before, 'x', start);
        CHECK(before && pwrite(f->fd, before, start, 0) == (ssize_t)start);
        free(before);
    }
    if (f->fd >= 0 && read_only) {
        close(f->fd);
        f->fd = open(f->path, O_RDONLY);
        CHECK(f->fd >= 0);
    }
    f->dg = digest_new();
    CHECK(f->dg != NULL);
    if (f->fd < 0 || !f->dg) return false;
    f->w = spool_writer_new(f->fd, start, f->dg, on_written, &f->s, err, sizeof err);
    CHECK(f->w != NULL);
    return f->w != NULL;
}

static void fixture_close(fixture *f) {
    spool_writer_free(f->w);
    digest_free(f->dg);
    if (f->fd >= 0) close(f->fd);
    pthread_mutex_destroy(&f->s.mu);
}

/* 5 MiB and a bit, in pieces from 1 byte to 300 KiB, from offset `start`. */
static void test_pieces(uint64_t start) {
    char name[64];
    snprintf(name, sizeof name, "spool-%llu", (unsigned long long)start);
    fixture f;
    size_t total = 5 * 1024 * 1024 + 12345;
    unsigned char *data = malloc(total);
    CHECK(data != NULL);
    if (!data || !fixture_open(&f, name, start, false)) {
        free(data);
        return;
    }
    srand(42);
    for (size_t i = 0; i < total; i++) data[i] = (unsigned char)rand();
    size_t off = 0, piece = 1;
    while (off < total) {
        size_t n = piece < total - off ? piece : total - off;
        CHECK(spool_writer_put(f.w, (const char *)data + off, n) == 0);
        off += n;
        piece = piece * 3 + 7;
        if (piece > 300 * 1024) piece = 1;
    }
    CHECK(spool_writer_end(f.w) == start + total);
    CHECK(spool_writer_flush(f.w) == 0);
    CHECK(seen_end(&f.s) == start + total);
    CHECK(f.s.out_of_order == 0);
    /* Big chunks, not one call per piece. */
    CHECK(f.s.calls <= (int)(total / SPOOL_WRITER_CHUNK) + 60);
    CHECK_STR(spool_writer_error(f.w), "");

    char got[DIGEST_STRING_LEN], want[DIGEST_STRING_LEN];
    CHECK(digest_final(f.dg, got) == 0);
    CHECK(digest_bytes(data, total, want) == 0);
    CHECK_STR(got, want);
    struct stat st;
    CHECK(fstat(f.fd, &st) == 0 && (uint64_t)st.st_size == start + total);
    unsigned char *back = malloc(total);
    CHECK(back && pread(f.fd, back, total, (off_t)start) == (ssize_t)total);
    CHECK(back && memcmp(back, data, total) == 0);
    free(back);
    free(data);
    fixture_close(&f);
}

/* A few bytes and then nothing (a stalled upstream): a tick after the
 * delay hands them to readers without a flush. */
static void test_tick(void) {
    fixture f;
    if (!fixture_open(&f, "spool-tick", 0, false)) return;
    int64_t t0 = clock_monotonic_ms();
    CHECK(spool_writer_put(f.w, "hello", 5) == 0);
    CHECK(spool_writer_tick(f.w) == 0); /* too early: stays queued */
    int64_t early = clock_monotonic_ms() - t0;
    sleep_ms(50);
    /* (A machine too busy to make both calls within the delay proves nothing here.) */
    if (early < SPOOL_WRITER_MAX_DELAY_MS) CHECK(seen_end(&f.s) == 0);
    CHECK(spool_writer_tick(f.w) == 0);
    for (int i = 0; i < 200 && seen_end(&f.s) != 5; i++) sleep_ms(5);
    CHECK(seen_end(&f.s) == 5);
    char back[8] = "";
    CHECK(pread(f.fd, back, 5, 0) == 5 && memcmp(back, "hello", 5) == 0);
    CHECK(spool_writer_flush(f.w) == 0);
    fixture_close(&f);
}

/* A spool that cannot be written: the error names the offset and the
 * reason; nothing after it is written or hashed. */
static void test_write_failure(void) {
    fixture f;
    if (!fixture_open(&f, "spool-ro", 0, true)) return;
    static char chunk[SPOOL_WRITER_CHUNK];
    int rc = 0;
    for (int i = 0; i < 4 && rc == 0; i++) rc = spool_writer_put(f.w, chunk, sizeof chunk);
    if (rc == 0) rc = spool_writer_flush(f.w);
    CHECK(rc == -1);
    CHECK(spool_writer_flush(f.w) == -1);
    CHECK(spool_writer_put(f.w, "x", 1) == -1 || spool_writer_flush(f.w) == -1);
    CHECK(strstr(spool_writer_error(f.w), "write at byte 0") != NULL);
    CHECK(strstr(spool_writer_error(f.w), "Bad file descriptor") != NULL);
    CHECK(seen_end(&f.s) == 0);
    struct stat st;
    CHECK(stat(f.path, &st) == 0 && st.st_size == 0);
    fixture_close(&f);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/rf-unit-spool-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_pieces(0);
    test_pieces(777);
    test_tick();
    test_write_failure();
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    return UNIT_DONE("spool_writer");
}
