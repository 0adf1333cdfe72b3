/* scrub: the background check of cached bytes (include/regfacade/scrub.h). */
#include "regfacade/scrub.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "regfacade/clock.h"
#include "regfacade/json.h"
#include "regfacade/log.h"

struct scrub {
    store *st;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC: stop and rate changes wake the thread */
    uint64_t rate;     /* bytes per second, 0: paused */
    bool stop;
    pthread_t thread;
};

/* Wait ms (or until stopped); true when stopped. Called with mu held. */
static bool wait_ms_locked(scrub *sc, int64_t ms) {
    struct timespec until = clock_deadline(CLOCK_MONOTONIC, ms);
    while (!sc->stop) {
        int rc = pthread_cond_timedwait(&sc->cv, &sc->mu, &until);
        if (rc == ETIMEDOUT) break;
    }
    return sc->stop;
}

/* After each MiB hashed: the time those bytes are worth at the rate. */
static int pace(void *ud, uint64_t bytes) {
    scrub *sc = ud;
    pthread_mutex_lock(&sc->mu);
    bool stopped = sc->stop;
    if (!stopped && sc->rate > 0) stopped = wait_ms_locked(sc, (int64_t)(bytes * 1000 / sc->rate));
    while (!sc->stop && sc->rate == 0) pthread_cond_wait(&sc->cv, &sc->mu); /* paused mid-blob */
    stopped = sc->stop;
    pthread_mutex_unlock(&sc->mu);
    return stopped ? -1 : 0;
}

static void *scrub_thread(void *arg) {
    scrub *sc = arg;
    for (;;) {
        pthread_mutex_lock(&sc->mu);
        while (!sc->stop && sc->rate == 0) pthread_cond_wait(&sc->cv, &sc->mu);
        bool stop = sc->stop;
        pthread_mutex_unlock(&sc->mu);
        if (stop) break;
        store_blob_ref *list = NULL;
        size_t n = 0;
        unsigned long bad = 0, checked = 0;
        if (store_blob_list(sc->st, &list, &n) != 0) {
            log_error("scrub: out of memory listing the cache; trying again in a second");
        }
        for (size_t i = 0; i < n; i++) {
            char reason[400];
            store_verify_result r = store_blob_verify(sc->st, list[i].digest, pace, sc, reason, sizeof reason);
            if (r == STORE_VERIFY_QUARANTINED) bad++;
            if (r == STORE_VERIFY_OK || r == STORE_VERIFY_QUARANTINED) checked++;
            pthread_mutex_lock(&sc->mu);
            stop = sc->stop;
            pthread_mutex_unlock(&sc->mu);
            if (stop) break;
            if (r == STORE_VERIFY_ERROR) log_warn("scrub: %s: %s", list[i].digest, reason);
        }
        free(list);
        if (bad)
            log_warn("scrub: pass over %lu cached blobs quarantined %lu (see the store's lines above)", checked, bad);
        pthread_mutex_lock(&sc->mu);
        stop = wait_ms_locked(sc, 1000);
        pthread_mutex_unlock(&sc->mu);
        if (stop) break;
    }
    return NULL;
}

scrub *scrub_start(store *st, uint64_t bytes_per_second, char *err, size_t errlen) {
    scrub *sc = calloc(1, sizeof *sc);
    if (!sc) {
        snprintf(err, errlen, "scrub: out of memory");
        return NULL;
    }
    sc->st = st;
    sc->rate = bytes_per_second;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&sc->mu, NULL);
    pthread_cond_init(&sc->cv, &ca);
    pthread_condattr_destroy(&ca);
    int rc = pthread_create(&sc->thread, NULL, scrub_thread, sc);
    if (rc != 0) {
        snprintf(err, errlen, "scrub: cannot start a thread: %s", strerror(rc));
        pthread_cond_destroy(&sc->cv);
        pthread_mutex_destroy(&sc->mu);
        free(sc);
        return NULL;
    }
    return sc;
}

void scrub_set_rate(scrub *sc, uint64_t bytes_per_second) {
    if (!sc) return;
    pthread_mutex_lock(&sc->mu);
    sc->rate = bytes_per_second;
    pthread_cond_broadcast(&sc->cv);
    pthread_mutex_unlock(&sc->mu);
}

void scrub_stop(scrub *sc) {
    if (!sc) return;
    pthread_mutex_lock(&sc->mu);
    sc->stop = true;
    pthread_cond_broadcast(&sc->cv);
    pthread_mutex_unlock(&sc->mu);
    pthread_join(sc->thread, NULL);
    pthread_cond_destroy(&sc->cv);
    pthread_mutex_destroy(&sc->mu);
    free(sc);
}

int scrub_verify_all(store *st, scrub_report *out) {
    memset(out, 0, sizeof *out);
    store_blob_ref *list = NULL;
    size_t n = 0;
    if (store_blob_list(st, &list, &n) != 0) return -1;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        char reason[400];
        store_verify_result r = store_blob_verify(st, list[i].digest, NULL, NULL, reason, sizeof reason);
        if (r == STORE_VERIFY_GONE) continue;
        out->checked++;
        out->bytes += list[i].size;
        if (r == STORE_VERIFY_OK) continue;
        scrub_failure *f = realloc(out->failed, (out->n_failed + 1) * sizeof *f);
        if (!f) {
            rc = -1;
            break;
        }
        out->failed = f;
        f += out->n_failed++;
        snprintf(f->digest, sizeof f->digest, "%s", list[i].digest);
        snprintf(f->reason, sizeof f->reason, "%s", reason);
        f->quarantined = r == STORE_VERIFY_QUARANTINED;
    }
    free(list);
    if (rc != 0) scrub_report_clear(out);
    return rc;
}

void scrub_report_clear(scrub_report *r) {
    free(r->failed);
    memset(r, 0, sizeof *r);
}

char *scrub_report_json(const scrub_report *r, size_t *len) {
    json_value *o = json_new_object(), *list = json_new_array();
    bool ok = o && list && json_object_set(o, "checked", json_new_uint64(r->checked)) == 0 &&
              json_object_set(o, "bytes", json_new_uint64(r->bytes)) == 0;
    for (size_t i = 0; ok && i < r->n_failed; i++) {
        json_value *f = json_new_object();
        bool built = f && json_object_set(f, "digest", json_new_string(r->failed[i].digest)) == 0 &&
                     json_object_set(f, "reason", json_new_string(r->failed[i].reason)) == 0 &&
                     json_object_set(f, "quarantined", json_new_bool(r->failed[i].quarantined)) == 0;
        if (!built) json_free(f);
        ok = built && json_array_append(list, f) == 0; /* takes f, also on failure */
    }
    if (ok)
        ok = json_object_set(o, "failed", list) == 0; /* takes list, also on failure */
    else
        json_free(list);
    list = NULL;
    char *text = ok ? json_serialize(o, len) : NULL;
    json_free(o);
    return text;
}
