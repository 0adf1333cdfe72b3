#include "regfacade/manifest.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "regfacade/cluster.h"
#include "regfacade/digest.h"
#include "regfacade/json.h"
#include "regfacade/log.h"
#include "regfacade/metrics.h"
#include "regfacade/ref.h"
#include "regfacade/upstream_answer.h"

void manifest_clear(manifest *m) {
    free(m->data);
    memset(m, 0, sizeof *m);
}

static bool is_schema1(const char *mt) {
    return strcmp(mt, MT_DOCKER_SCHEMA1) == 0 || strcmp(mt, MT_DOCKER_SCHEMA1_SIGNED) == 0;
}

static bool is_supported(const char *mt) {
    return strcmp(mt, MT_OCI_MANIFEST) == 0 || strcmp(mt, MT_OCI_INDEX) == 0 || strcmp(mt, MT_DOCKER_MANIFEST) == 0 ||
           strcmp(mt, MT_DOCKER_LIST) == 0;
}

int manifest_media_type(const char *data, size_t len, const char *content_type, char *out, size_t outlen,
                        fetch_error *e) {
    char jerr[256];
    json_value *v = json_parse(data, len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    if (!v || v->type != JSON_OBJECT) {
        fetch_error_set(e, 502, "MANIFEST_INVALID", "the manifest is not a JSON object (%s)", v ? "wrong type" : jerr);
        json_free(v);
        return -1;
    }
    const char *mt = json_object_get_string(v, "mediaType");
    int64_t schema = 0;
    json_get_int64(json_object_get(v, "schemaVersion"), &schema);
    int rc = 0;
    if ((mt && is_schema1(mt)) || schema == 1 || (!mt && content_type && is_schema1(content_type))) {
        fetch_error_set(
            e, 415, "UNSUPPORTED",
            "Docker schema1 manifests are not supported (the image must be pushed as Docker schema2 or OCI)");
        rc = -1;
    } else if (mt) {
        if (!is_supported(mt)) {
            fetch_error_set(e, 502, "MANIFEST_INVALID", "unsupported manifest mediaType \"%s\"", mt);
            rc = -1;
        } else {
            snprintf(out, outlen, "%s", mt);
        }
    } else if (content_type && is_supported(content_type)) {
        snprintf(out, outlen, "%s", content_type);
    } else {
        /* OCI allows mediaType to be absent: tell by the shape. */
        snprintf(out, outlen, "%s", json_object_get(v, "manifests") ? MT_OCI_INDEX : MT_OCI_MANIFEST);
    }
    json_free(v);
    return rc;
}

/* Does one Accept entry (type without parameters) admit mt? */
static bool accept_entry_matches(const char *entry, size_t n, const char *mt) {
    if (n == 3 && strncmp(entry, "*/*", 3) == 0) return true;
    if (n == 1 && entry[0] == '*') return true;
    return strlen(mt) == n && strncasecmp(entry, mt, n) == 0;
}

/* Calls fn on each Accept entry (trimmed, parameters removed); stops when
 * fn returns true. */
static bool accept_each(const char *accept, bool (*fn)(const char *, size_t, const void *), const void *ud) {
    const char *p = accept;
    while (*p) {
        size_t n = strcspn(p, ",");
        const char *s = p;
        size_t m = strcspn(s, ";,");
        while (m > 0 && (*s == ' ' || *s == '\t')) s++, m--;
        while (m > 0 && (s[m - 1] == ' ' || s[m - 1] == '\t')) m--;
        if (m > 0 && fn(s, m, ud)) return true;
        p += n;
        if (*p == ',') p++;
    }
    return false;
}

static bool match_mt(const char *s, size_t n, const void *ud) { return accept_entry_matches(s, n, ud); }

bool manifest_accepts(const char *accept, const char *mt) {
    if (!accept || !*accept) return true;
    return accept_each(accept, match_mt, mt);
}

static bool not_schema1(const char *s, size_t n, const void *ud) {
    (void)ud;
    return !((n == strlen(MT_DOCKER_SCHEMA1) && strncasecmp(s, MT_DOCKER_SCHEMA1, n) == 0) ||
             (n == strlen(MT_DOCKER_SCHEMA1_SIGNED) && strncasecmp(s, MT_DOCKER_SCHEMA1_SIGNED, n) == 0));
}

bool manifest_accepts_only_schema1(const char *accept) {
    if (!accept || !*accept) return false;
    return !accept_each(accept, not_schema1, NULL);
}

/* Buffering a manifest body under the size cap. */
typedef struct {
    char *buf;
    size_t len, cap, max;
    bool too_big;
} body_buf;

static int buf_headers(void *ud, const upstream_response *r) {
    body_buf *b = ud;
    b->len = 0; /* a new answer: whatever an earlier attempt brought is dropped */
    if (r->content_length > 0 && (uint64_t)r->content_length > b->max) {
        b->too_big = true;
        return -1;
    }
    return 0;
}

static int buf_body(void *ud, const char *data, size_t len) {
    body_buf *b = ud;
    if (b->len + len > b->max) {
        b->too_big = true;
        return -1;
    }
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 16384;
        while (cap < b->len + len + 1) cap *= 2;
        char *n = realloc(b->buf, cap);
        if (!n) return -1;
        b->buf = n;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, data, len);
    b->len += len;
    b->buf[b->len] = '\0';
    return 0;
}

/* e for a final upstream answer about manifest `what` that is not what
 * the caller can use (upstream_answer.h has the one mapping). */
static void map_status(fetch_error *e, const upstream_response *r, upstream *u, const char *what) {
    char subject[700];
    snprintf(subject, sizeof subject, "manifest %s", what);
    if (upstream_answer_map(UPSTREAM_WHAT_MANIFEST, upstream_name(u), subject, UPSTREAM_OK, r, "", e, NULL) ==
        UPSTREAM_ANSWER_OK)
        fetch_error_set(e, 502, "UNKNOWN", "upstream %s answered unexpected status %ld for %s", upstream_name(u),
                        r->status, subject);
}

/* One upstream request, asked again as upstream_ask() says (transport
 * errors, 5xx, 429 with a Retry-After). quick: a stale answer is at hand,
 * so no retry is waited for. Returns 0 with resp filled (a status below 500
 * other than 429), -1 with e set. */
static int perform_retry(const manifest_env *env, upstream *u, upstream_request *req, upstream_response *resp,
                         body_buf *b, const char *what, bool quick, fetch_error *e) {
    (void)env;
    char subject[700];
    snprintf(subject, sizeof subject, "manifest %s", what);
    upstream_answer a = upstream_ask(u, req, resp, UPSTREAM_WHAT_MANIFEST, subject, quick, e);
    if (a == UPSTREAM_ANSWER_FAILED && b && b->too_big) {
        fetch_error_set(e, 502, "MANIFEST_INVALID",
                        "manifest %s from upstream %s exceeds the %zu-byte limit "
                        "(limits.manifest_max_bytes)",
                        what, upstream_name(u), b->max);
        return -1;
    }
    if (a == UPSTREAM_ANSWER_FAILED || resp->status >= 500 || resp->status == 429) return -1;
    return 0;
}

static void link_upstream(const manifest_env *env, upstream *u, const char *repository, const manifest *m);

/* GET the manifest named by reference; verify against want_digest when
 * given. 0 with out filled, -1 with e. */
static int fetch_manifest(const manifest_env *env, upstream *u, const char *repository, const char *reference,
                          const char *want_digest, bool quick, manifest *out, fetch_error *e) {
    char path[600], what[600];
    snprintf(path, sizeof path, "%s/manifests/%s", repository, reference);
    snprintf(what, sizeof what, "%s:%s", repository, reference);
    body_buf b = {.max = env->cfg->manifest_max_bytes};
    metrics_cache_lookup("manifest", false);
    upstream_request req = {.method = "GET",
                            .repository = repository,
                            .path = path,
                            .accept = MANIFEST_ACCEPT_ALL,
                            .on_headers = buf_headers,
                            .on_body = buf_body,
                            .ud = &b};
    upstream_response resp;
    if (perform_retry(env, u, &req, &resp, &b, what, quick, e) != 0) {
        free(b.buf);
        return -1;
    }
    if (resp.status != 200) {
        map_status(e, &resp, u, what);
        free(b.buf);
        return -1;
    }
    if (!b.buf) b.buf = calloc(1, 1);
    char got[DIGEST_STRING_LEN];
    if (!b.buf || digest_bytes(b.buf, b.len, got) != 0) {
        free(b.buf);
        fetch_error_set(e, 500, "UNKNOWN", "out of memory hashing manifest %s", what);
        return -1;
    }
    const char *expect = want_digest ? want_digest : (ref_is_sha256_digest(resp.digest) ? resp.digest : NULL);
    if (expect && strcmp(expect, got) != 0) {
        fetch_error_set(e, 502, "DIGEST_INVALID",
                        "upstream %s sent manifest %s with digest %s, expected %s; not cached", upstream_name(u), what,
                        got, expect);
        free(b.buf);
        return -1;
    }
    if (manifest_media_type(b.buf, b.len, resp.content_type, out->media_type, sizeof out->media_type, e) != 0) {
        char m[sizeof e->message];
        snprintf(m, sizeof m, "upstream %s, manifest %s: %s", upstream_name(u), what, e->message);
        snprintf(e->message, sizeof e->message, "%s", m);
        free(b.buf);
        return -1;
    }
    char err[512];
    bool was_cached = store_blob_exists(env->st, got);
    if (store_put(env->st, got, b.buf, b.len, err, sizeof err) != 0)
        log_error("manifest %s: %s", what, err);
    else if (!was_cached)
        metrics_cache_put(b.len);
    out->data = b.buf;
    out->len = b.len;
    out->source = "upstream";
    snprintf(out->digest, sizeof out->digest, "%s", got);
    link_upstream(env, u, repository, out);
    return 0;
}

/* ---------- links (store.h): which manifests a scope may be served ---------- */

int manifest_link(store *st, const store_scope *sc, const char *digest, const char *data, size_t len, char *err,
                  size_t errlen) {
    char jerr[256];
    json_value *v = json_parse(data, len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    if (!v || v->type != JSON_OBJECT) {
        json_free(v);
        snprintf(err, errlen, "link manifest %s: not a JSON object (%s)", digest, v ? "wrong type" : jerr);
        return -1;
    }
    /* What it references first: a linked manifest always has its parts linked. */
    int rc = 0;
    const char *cfg = json_object_get_string(json_object_get(v, "config"), "digest");
    if (cfg && ref_is_sha256_digest(cfg)) rc = store_link_put(st, sc, cfg, NULL, NULL, err, errlen);
    static const char *const lists[] = {"layers", "manifests"};
    for (size_t l = 0; l < 2 && rc == 0; l++) {
        const json_value *a = json_object_get(v, lists[l]);
        for (size_t i = 0; a && a->type == JSON_ARRAY && i < a->count && rc == 0; i++) {
            const char *d = json_object_get_string(a->items[i], "digest");
            if (d && ref_is_sha256_digest(d)) rc = store_link_put(st, sc, d, NULL, NULL, err, errlen);
        }
    }
    json_free(v);
    return rc == 0 ? store_link_put(st, sc, digest, NULL, NULL, err, errlen) : -1;
}

/* May digest be served under (u, repository) (or the generated name of env)? */
static bool linked(const manifest_env *env, upstream *u, const char *repository, const char *digest) {
    store_scope sc, everyone;
    fetch_scope(&sc, u, repository);
    store_scope_everyone(&everyone);
    return store_link_get(env->st, &sc, digest, NULL, 0, NULL, 0) == 1 ||
           (env->generated && store_link_get(env->st, env->generated, digest, NULL, 0, NULL, 0) == 1) ||
           store_link_get(env->st, &everyone, digest, NULL, 0, NULL, 0) == 1;
}

/* m came from (u, repository), or the upstream confirmed it is there. */
static void link_upstream(const manifest_env *env, upstream *u, const char *repository, const manifest *m) {
    store_scope sc;
    char err[512];
    fetch_scope(&sc, u, repository);
    if (manifest_link(env->st, &sc, m->digest, m->data, m->len, err, sizeof err) != 0)
        log_error("manifest %s in %s: %s", m->digest, repository, err);
}

static int from_store(const manifest_env *env, const char *digest, manifest *out, fetch_error *e) {
    char err[512];
    char *data = NULL;
    size_t len = 0;
    int rc = store_blob_read(env->st, digest, env->cfg->manifest_max_bytes, &data, &len, err, sizeof err);
    if (rc <= 0) {
        if (rc < 0) fetch_error_set(e, 500, "UNKNOWN", "%s", err);
        return rc;
    }
    if (manifest_media_type(data, len, NULL, out->media_type, sizeof out->media_type, e) != 0) {
        free(data);
        return -1;
    }
    out->data = data;
    out->len = len;
    out->source = "cache";
    metrics_cache_lookup("manifest", true);
    snprintf(out->digest, sizeof out->digest, "%s", digest);
    return 1;
}

/* age_s: how long ago the resolution was made (0: just now; for one
 * taken from the cluster, the TTL minus what Redis says is left, so that
 * only this node's clock is compared with this node's clock). */
static void remember_tag(const manifest_env *env, upstream *u, const char *repository, const char *tag,
                         const manifest *m, long age_s) {
    store_tag t;
    snprintf(t.digest, sizeof t.digest, "%s", m->digest);
    snprintf(t.media_type, sizeof t.media_type, "%s", m->media_type);
    t.fetched = time(NULL) - (age_s > 0 ? age_s : 0);
    char err[512];
    if (store_tag_put(env->st, upstream_name(u), repository, tag, &t, err, sizeof err) != 0)
        log_error("tag %s:%s: %s", repository, tag, err);
}

/* A manifest by digest under (u, repository): from the cache where it is
 * linked to this scope, else once the upstream confirmed it, else fetched. */
static int get_by_digest(const manifest_env *env, upstream *u, const char *repository, const char *reference,
                         manifest *out, fetch_error *e) {
    if (linked(env, u, repository, reference)) {
        int rc = from_store(env, reference, out, e);
        if (rc != 0) return rc > 0 ? 0 : -1;
    } else if (store_blob_exists(env->st, reference)) {
        /* Cached for another scope: served here only when the upstream
         * has it in this repository for this account. */
        char path[600], what[600];
        snprintf(path, sizeof path, "%s/manifests/%s", repository, reference);
        snprintf(what, sizeof what, "%s@%s", repository, reference);
        upstream_request req = {
            .method = "HEAD", .repository = repository, .path = path, .accept = MANIFEST_ACCEPT_ALL};
        upstream_response resp;
        if (perform_retry(env, u, &req, &resp, NULL, what, false, e) != 0) return -1;
        if (resp.status != 200) {
            map_status(e, &resp, u, what);
            return -1;
        }
        int rc = from_store(env, reference, out, e);
        if (rc < 0) return -1;
        if (rc > 0) {
            link_upstream(env, u, repository, out);
            return 0;
        }
    }
    return fetch_manifest(env, u, repository, reference, reference, false, out, e);
}

/* ---------- the cluster's tag resolutions (cluster.h) ---------- */

/* The resolution the replicas share, when there is one: HIT with t filled
 * and *age_s how old it is. Below CLUSTER_MISS: alone (the local records
 * decide). A TTL of 0 caches nothing, so nothing is shared either. */
static cluster_result shared_tag(const manifest_env *env, upstream *u, const char *repository, const char *tag,
                                 store_tag *t, long *age_s) {
    if (env->cfg->tag_ttl_seconds <= 0) return CLUSTER_OFF;
    long left_ms = 0;
    cluster_result r = cluster_tag_get(store_cluster(env->st), upstream_name(u), repository, tag, t->digest,
                                       sizeof t->digest, t->media_type, sizeof t->media_type, &left_ms);
    if (r == CLUSTER_HIT && !ref_is_sha256_digest(t->digest)) r = CLUSTER_MISS;
    *age_s = env->cfg->tag_ttl_seconds - left_ms / 1000;
    return r;
}

/* This replica resolved tag to *m: publish it unless another replica was
 * first, in which case its resolution is the one served (replicas agree
 * on what a tag means until the shared TTL ends), then remember it here. */
static void publish_tag(const manifest_env *env, upstream *u, const char *repository, const char *tag, manifest *m) {
    long age_s = 0;
    cluster *cl = store_cluster(env->st);
    if (cl && env->cfg->tag_ttl_seconds > 0) {
        store_tag t;
        snprintf(t.digest, sizeof t.digest, "%s", m->digest);
        snprintf(t.media_type, sizeof t.media_type, "%s", m->media_type);
        long left_ms = 0;
        cluster_result r = cluster_tag_claim(cl, upstream_name(u), repository, tag, env->cfg->tag_ttl_seconds * 1000,
                                             t.digest, sizeof t.digest, t.media_type, sizeof t.media_type, &left_ms);
        if (r == CLUSTER_HIT) age_s = env->cfg->tag_ttl_seconds - left_ms / 1000;
        if (r == CLUSTER_HIT && strcmp(t.digest, m->digest) != 0 && ref_is_sha256_digest(t.digest)) {
            manifest other;
            fetch_error e2 = {0};
            memset(&other, 0, sizeof other);
            if (get_by_digest(env, u, repository, t.digest, &other, &e2) == 0) {
                other.source = m->source;
                manifest_clear(m);
                *m = other;
            } else {
                /* What this replica just got from the upstream is right too. */
                log_warn("tag %s:%s: the cluster's resolution %s cannot be loaded (%s); serving %s", repository, tag,
                         t.digest, e2.message, m->digest);
                age_s = 0;
            }
        }
    }
    remember_tag(env, u, repository, tag, m, age_s);
}

/* Failures of the upstream (not answers about the image) that a known tag
 * resolution may stand in for. */
static bool upstream_failed(const fetch_error *e) { return e->http_status == 429 || e->http_status >= 500; }

/* The part of manifest_get that may ask the upstream: run once per
 * (upstream, repository, reference) at a time (see manifest_get). */
static int get_from_upstream(const manifest_env *env, upstream *u, const char *repository, const char *reference,
                             manifest *out, fetch_error *e) {
    if (ref_is_sha256_digest(reference)) return get_by_digest(env, u, repository, reference, out, e);

    /* The cluster's resolution, while it lasts, is this replica's too. */
    store_tag known;
    long shared_age = 0;
    cluster_result shared = shared_tag(env, u, repository, reference, &known, &shared_age);
    if (shared == CLUSTER_HIT) {
        if (get_by_digest(env, u, repository, known.digest, out, e) != 0) return -1;
        remember_tag(env, u, repository, reference, out, shared_age);
        return 0;
    }
    int have_known = store_tag_get(env->st, upstream_name(u), repository, reference, &known) == 1;
    time_t now = time(NULL);
    have_known = have_known && linked(env, u, repository, known.digest);
    /* Redis answered that no replica resolved the tag within the TTL: a
     * local record must not say otherwise. */
    if (have_known && shared != CLUSTER_MISS && now - known.fetched < env->cfg->tag_ttl_seconds) {
        int rc = from_store(env, known.digest, out, e);
        if (rc > 0) return 0;
        if (rc < 0) return -1;
    }
    /* May the known resolution stand in when the upstream fails? Then the
     * upstream gets no waited-for retries: the stale answer is quicker. */
    long age = have_known ? (long)(now - known.fetched) : 0;
    bool stale_ok = have_known && env->cfg->stale_max_seconds > 0 && age <= env->cfg->stale_max_seconds &&
                    store_blob_exists(env->st, known.digest);

    /* HEAD first: cheap, and not counted as a pull by Docker Hub. */
    char path[600], what[600];
    snprintf(path, sizeof path, "%s/manifests/%s", repository, reference);
    snprintf(what, sizeof what, "%s:%s", repository, reference);
    upstream_request req = {.method = "HEAD", .repository = repository, .path = path, .accept = MANIFEST_ACCEPT_ALL};
    upstream_response resp;
    int rc = perform_retry(env, u, &req, &resp, NULL, what, stale_ok, e);
    if (rc == 0 && resp.status == 200 && ref_is_sha256_digest(resp.digest)) {
        int got = from_store(env, resp.digest, out, e);
        if (got > 0) link_upstream(env, u, repository, out); /* the upstream says the tag names it here */
        if (got > 0 ||
            (got == 0 && fetch_manifest(env, u, repository, resp.digest, resp.digest, stale_ok, out, e) == 0)) {
            publish_tag(env, u, repository, reference, out);
            return 0;
        }
    } else if (rc == 0 && resp.status == 404) {
        map_status(e, &resp, u, what);
        return -1;
    } else if (rc == 0 && (resp.status == 200 || resp.status == 405 || resp.status == 400)) {
        /* No digest on HEAD, or HEAD not allowed: GET the tag. */
        if (fetch_manifest(env, u, repository, reference, NULL, stale_ok, out, e) == 0) {
            publish_tag(env, u, repository, reference, out);
            return 0;
        }
    } else if (rc == 0) {
        map_status(e, &resp, u, what);
    }
    /* The upstream failed or rate-limited us: a known resolution, within
     * cache.stale_max_seconds, is better than no answer. */
    if (stale_ok && upstream_failed(e)) {
        fetch_error e2;
        manifest_clear(out);
        if (from_store(env, known.digest, out, &e2) > 0) {
            snprintf(out->warning, sizeof out->warning,
                     "299 - \"served from cache: upstream %s failed to resolve %s; this resolution is %lds old "
                     "(%.200s)\"",
                     upstream_name(u), what, age, e->message);
            log_warn("tag %s served stale from cache (%lds old): %s", what, age, e->message);
            return 0;
        }
    }
    return -1;
}

/* ---------- coalescing ---------- */

/* One upstream resolution in progress; everyone asking the same
 * (store, upstream, repository, reference) meanwhile waits for it and gets
 * a copy of its result. Process-wide, like the upstreams and the store. */
typedef struct flight flight;
struct flight {
    flight *next;
    const store *st;
    const upstream *u;
    char *repository, *reference;
    int refs; /* guarded by flights_mu */
    bool done;
    int rc;
    manifest m;
    fetch_error e;
};

static pthread_mutex_t flights_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t flights_cv = PTHREAD_COND_INITIALIZER;
static flight *flights;
static manifest_flight_stats flight_counts;

void manifest_get_flight_stats(manifest_flight_stats *out) {
    pthread_mutex_lock(&flights_mu);
    *out = flight_counts;
    pthread_mutex_unlock(&flights_mu);
}

static void flight_unref(flight *f) {
    /* called with flights_mu held */
    if (--f->refs > 0) return;
    manifest_clear(&f->m);
    free(f->repository);
    free(f->reference);
    free(f);
}

static int copy_result(const flight *f, manifest *out, fetch_error *e) {
    if (f->rc != 0) {
        *e = f->e;
        return -1;
    }
    *out = f->m;
    out->data = malloc(f->m.len + 1);
    if (!out->data) {
        memset(out, 0, sizeof *out);
        fetch_error_set(e, 500, "UNKNOWN", "out of memory copying manifest");
        return -1;
    }
    memcpy(out->data, f->m.data, f->m.len);
    out->data[f->m.len] = '\0';
    return 0;
}

int manifest_get(const manifest_env *env, upstream *u, const char *repository, const char *reference, manifest *out,
                 fetch_error *e) {
    memset(out, 0, sizeof *out);
    if (ref_is_sha256_digest(reference)) {
        if (linked(env, u, repository, reference)) {
            int rc = from_store(env, reference, out, e);
            if (rc != 0) return rc > 0 ? 0 : -1;
        }
    } else if (ref_valid_digest(reference)) {
        fetch_error_set(e, 400, "DIGEST_INVALID", "only sha256 digests are supported, got %s", reference);
        return -1;
    } else {
        store_tag known;
        long age;
        cluster_result shared = shared_tag(env, u, repository, reference, &known, &age);
        if ((shared == CLUSTER_HIT ||
             (shared < CLUSTER_MISS && store_tag_get(env->st, upstream_name(u), repository, reference, &known) == 1 &&
              time(NULL) - known.fetched < env->cfg->tag_ttl_seconds)) &&
            linked(env, u, repository, known.digest)) {
            int rc = from_store(env, known.digest, out, e);
            if (rc != 0) return rc > 0 ? 0 : -1;
        }
    }

    /* Not answered from the cache: one upstream resolution per key. */
    pthread_mutex_lock(&flights_mu);
    flight *f = flights;
    while (f && !(f->st == env->st && f->u == u && strcmp(f->repository, repository) == 0 &&
                  strcmp(f->reference, reference) == 0))
        f = f->next;
    if (f) {
        f->refs++;
        flight_counts.coalesced++;
        while (!f->done) pthread_cond_wait(&flights_cv, &flights_mu);
        int rc = copy_result(f, out, e);
        flight_unref(f);
        pthread_mutex_unlock(&flights_mu);
        return rc;
    }
    f = calloc(1, sizeof *f);
    if (!f || !(f->repository = strdup(repository)) || !(f->reference = strdup(reference))) {
        if (f) free(f->repository);
        free(f);
        pthread_mutex_unlock(&flights_mu);
        fetch_error_set(e, 500, "UNKNOWN", "out of memory");
        return -1;
    }
    f->st = env->st;
    f->u = u;
    f->refs = 1;
    f->next = flights;
    flights = f;
    flight_counts.started++;
    pthread_mutex_unlock(&flights_mu);

    int rc = get_from_upstream(env, u, repository, reference, &f->m, &f->e);

    pthread_mutex_lock(&flights_mu);
    for (flight **pp = &flights; *pp; pp = &(*pp)->next)
        if (*pp == f) {
            *pp = f->next;
            break;
        }
    f->rc = rc;
    f->done = true;
    pthread_cond_broadcast(&flights_cv);
    rc = copy_result(f, out, e);
    flight_unref(f);
    pthread_mutex_unlock(&flights_mu);
    return rc;
}
