/* blobserve: the second listener. URL -> image (policy resolve, manifest,
 * platform) -> layers (extraction cache) -> file (lookup) -> response
 * (sendfile, ETag, Range, conditional GET). Also /readyz, /_stats and the
 * pre-pull thread. */
#include "regfacade/blobserve.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/blobserve_cache.h"
#include "regfacade/blobserve_fs.h"
#include "regfacade/clock.h"
#include "regfacade/digest.h"
#include "regfacade/json.h"
#include "regfacade/log.h"
#include "regfacade/manifest.h"
#include "regfacade/metrics.h"
#include "regfacade/mhd_glue.h"
#include "regfacade/upstream_answer.h"

#define IMAGE_CACHE_MAX 256 /* resolved images kept in memory */
#define DIGEST_IMAGE_TTL_S (24 * 3600)
#define MAX_URL_BYTES 8192
/* Per-connection buffer for request headers and response headers (MHD
 * clears it per request, so it is kept modest; browsers' cookies fit). */
#define BS_CONNECTION_MEMORY (32 * 1024)

/* A resolved image: where it comes from and its layers, bottom first. */
typedef struct image {
    char key[REF_NAME_MAX + REF_DIGEST_MAX + 2]; /* "repo:tag" / "repo@digest" as requested */
    char upstream[128];
    char repository[256];     /* upstream repository */
    char manifest_digest[80]; /* of the platform manifest */
    time_t expires;
    uint64_t used;
    unsigned long epoch; /* blobserve.epoch it was resolved in: a reload makes it stale */
    struct image *next;
    size_t n_layers;
    char layers[BS_FS_MAX_LAYERS][DIGEST_STRING_LEN]; /* last: copies stop at n_layers */
} image;

/* One image of "prepull": pending (tried, with a backoff), done, or failed
 * for good (the upstream or the policy answered so, or the layer's own
 * bytes are unusable): not tried again until a reload. */
typedef enum { PREPULL_PENDING, PREPULL_DONE, PREPULL_FAILED } prepull_state;

typedef struct {
    prepull_state state;
    char why[512]; /* the last failure */
} prepull;

struct blobserve {
    blobserve_env env;
    blobserve_config *bc;
    bs_cache *cache;
    struct MHD_Daemon *daemon;
    mhd_glue_listener *listener; /* its guard against idle-connection floods */

    pthread_mutex_t mu;
    pthread_cond_t cv; /* wakes the pre-pull thread on stop, and stop when workers end */
    bool stopping;
    bool collecting; /* blobserve_collect is registered with metrics */
    image *images;
    size_t n_images;
    uint64_t image_clock;
    unsigned long epoch; /* counts reloads (blobserve_reloaded) */

    bs_edit **edits;  /* per bc->edits entry: its edits as the cache takes them */
    unsigned workers; /* slow-path threads running (guarded by mu; stop waits for 0) */

    pthread_t prepull_thread;
    bool prepull_running;
    prepull *prepulls; /* per bc->prepull entry (guarded by mu) */

    atomic_ulong requests;
};

/* A request that cannot be answered from what is ready (an image to
 * resolve, a layer to download or extract): its connection is suspended
 * while a thread of its own does that work, then resumed. */
typedef struct {
    blobserve *b;
    struct MHD_Connection *conn;
    bs_url u;
    size_t n;
    bs_layer *held[BS_FS_MAX_LAYERS]; /* when err.http_status is 0 */
    fetch_error err;                  /* http_status 0, or the error to answer */
    bool done;
} slow_req;

/* Per request: the layer the served file lives in, held until the
 * response has been sent (MHD_OPTION_NOTIFY_COMPLETED), and the slow-path
 * work while it runs. */
typedef struct {
    bs_layer *held;
    slow_req *slow;
} req_ctx;

/* ---------- small responses ---------- */

/* A text answer; retry_after (NULL: none) goes out as Retry-After. */
static enum MHD_Result send_message(struct MHD_Connection *conn, unsigned status, const char *retry_after,
                                    const char *text) {
    char msg[2048];
    int n = snprintf(msg, sizeof msg - 1, "%s", text);
    if (n < 0) n = 0;
    if ((size_t)n > sizeof msg - 2) n = (int)sizeof msg - 2;
    msg[n++] = '\n';
    msg[n] = '\0';
    struct MHD_Response *r = MHD_create_response_from_buffer((size_t)n, msg, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "text/plain; charset=utf-8");
    MHD_add_response_header(r, "Cache-Control", "no-store");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    if (status == 405) MHD_add_response_header(r, "Allow", "GET, HEAD");
    if (retry_after) MHD_add_response_header(r, "Retry-After", retry_after);
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_text(struct MHD_Connection *conn, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static enum MHD_Result send_text(struct MHD_Connection *conn, unsigned status, const char *fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return send_message(conn, status, NULL, msg);
}

/* A failed resolution or layer, answered as the registry listener answers
 * it (upstream_answer.h): a 429 keeps the upstream's Retry-After. */
static enum MHD_Result send_failure(struct MHD_Connection *conn, const fetch_error *e) {
    return send_message(conn, (unsigned)(e->http_status ? e->http_status : 502), upstream_answer_retry_after(e),
                        e->message);
}

static enum MHD_Result send_redirect(struct MHD_Connection *conn, const char *url) {
    char loc[MAX_URL_BYTES + 2];
    snprintf(loc, sizeof loc, "%s/", url);
    struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Location", loc);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    enum MHD_Result ret = MHD_queue_response(conn, 301, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---------- content types ---------- */

static const struct {
    const char *ext;
    const char *type;
} mime_types[] = {
    {"html", "text/html; charset=utf-8"},
    {"htm", "text/html; charset=utf-8"},
    {"css", "text/css; charset=utf-8"},
    {"js", "text/javascript; charset=utf-8"},
    {"mjs", "text/javascript; charset=utf-8"},
    {"cjs", "text/javascript; charset=utf-8"},
    {"json", "application/json"},
    {"map", "application/json"},
    {"webmanifest", "application/manifest+json"},
    {"txt", "text/plain; charset=utf-8"},
    {"md", "text/markdown; charset=utf-8"},
    {"xml", "application/xml"},
    {"svg", "image/svg+xml"},
    {"png", "image/png"},
    {"jpg", "image/jpeg"},
    {"jpeg", "image/jpeg"},
    {"gif", "image/gif"},
    {"webp", "image/webp"},
    {"avif", "image/avif"},
    {"ico", "image/vnd.microsoft.icon"},
    {"bmp", "image/bmp"},
    {"woff", "font/woff"},
    {"woff2", "font/woff2"},
    {"ttf", "font/ttf"},
    {"otf", "font/otf"},
    {"eot", "application/vnd.ms-fontobject"},
    {"wasm", "application/wasm"},
    {"pdf", "application/pdf"},
    {"zip", "application/zip"},
    {"gz", "application/gzip"},
    {"tar", "application/x-tar"},
    {"mp4", "video/mp4"},
    {"webm", "video/webm"},
    {"mp3", "audio/mpeg"},
    {"wav", "audio/wav"},
    {"ogg", "audio/ogg"},
    {"csv", "text/csv; charset=utf-8"},
    {"yaml", "application/yaml"},
    {"yml", "application/yaml"},
};

static const char *content_type(const char *path) {
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    const char *dot = strrchr(base, '.');
    if (!dot || dot == base) return "application/octet-stream";
    for (size_t i = 0; i < sizeof mime_types / sizeof mime_types[0]; i++)
        if (strcasecmp(dot + 1, mime_types[i].ext) == 0) return mime_types[i].type;
    return "application/octet-stream";
}

/* ---------- images ---------- */

static bool is_layer_type(const char *mt) {
    return mt && strstr(mt, "tar") && (strstr(mt, ".layer.") || strstr(mt, ".rootfs."));
}

/* The platform's entry of an index: os/arch(/variant) as configured, else
 * the first entry that is not an attestation ("unknown/unknown"). */
static const char *pick_platform(const blobserve_config *bc, const json_value *idx, char *why, size_t whylen) {
    const json_value *ms = json_object_get(idx, "manifests");
    if (!ms || ms->type != JSON_ARRAY || ms->count == 0) {
        snprintf(why, whylen, "the image index lists no manifests");
        return NULL;
    }
    const char *first = NULL;
    for (size_t i = 0; i < ms->count; i++) {
        const json_value *d = ms->items[i];
        const char *dg = json_object_get_string(d, "digest");
        if (!dg || !ref_is_sha256_digest(dg)) continue;
        const json_value *pl = json_object_get(d, "platform");
        const char *os = json_object_get_string(pl, "os");
        const char *arch = json_object_get_string(pl, "architecture");
        const char *var = json_object_get_string(pl, "variant");
        if (os && arch && strcmp(os, bc->platform_os) == 0 && strcmp(arch, bc->platform_arch) == 0 &&
            (!bc->platform_variant || (var && strcmp(var, bc->platform_variant) == 0)))
            return dg;
        if (!first && !(os && strcmp(os, "unknown") == 0)) first = dg;
    }
    if (!first) snprintf(why, whylen, "the image index has no usable manifest");
    return first;
}

static upstream *find_upstream(const blobserve_generation *g, const char *name) {
    for (size_t i = 0; i < g->cfg->n_upstreams; i++)
        if (strcmp(g->cfg->upstreams[i].name, name) == 0) return g->ups[i];
    return NULL;
}

/* Work on the server's current generation. The epoch is read first: an
 * image resolved on a generation a reload has replaced is then filed under
 * an old epoch, and never served from memory again. */
static unsigned long work_begin(blobserve *b, blobserve_generation *g) {
    pthread_mutex_lock(&b->mu);
    unsigned long epoch = b->epoch;
    pthread_mutex_unlock(&b->mu);
    b->env.acquire(b->env.ud, g);
    return epoch;
}

static void work_end(blobserve *b, blobserve_generation *g) { b->env.release(b->env.ud, g); }

/* Resolve (repository, reference) as the URL names them into *out, from
 * the in-memory cache or by policy + manifests. 0, or -1 with e. */
static void image_key(const char *repository, const char *reference, bool by_digest, char *key, size_t keylen) {
    snprintf(key, keylen, "%s%c%s", repository, by_digest ? '@' : ':', reference);
}

/* The in-memory resolution of key when it is still fresh: true with *out
 * filled. Never blocks on anything but the mutex. */
static bool image_cached(blobserve *b, const char *key, image *out) {
    time_t now = time(NULL);
    bool found = false;
    pthread_mutex_lock(&b->mu);
    for (image *im = b->images; im; im = im->next)
        if (strcmp(im->key, key) == 0 && im->expires > now && im->epoch == b->epoch) {
            im->used = ++b->image_clock;
            /* The fixed part, then only the digests in use (not all 256 slots). */
            memcpy(out, im, offsetof(image, layers));
            memcpy(out->layers, im->layers, im->n_layers * sizeof im->layers[0]);
            found = true;
            break;
        }
    pthread_mutex_unlock(&b->mu);
    return found;
}

static int resolve_image(blobserve *b, const blobserve_generation *g, unsigned long epoch, const char *repository,
                         const char *reference, bool by_digest, image *out, fetch_error *e) {
    char key[sizeof out->key];
    image_key(repository, reference, by_digest, key, sizeof key);
    if (image_cached(b, key, out)) return 0;
    time_t now = time(NULL);

    /* The same decision the registry listener makes for a manifest request. */
    policy_request pr = {.method = "GET", .kind = "manifest", .repository = repository, .reference = reference};
    policy_resolution res;
    policy_error pe;
    if (policy_resolve(g->pol, &pr, &res, &pe) != 0) {
        fetch_error_set(e, pe.status, "UNKNOWN", "%s: %s", key, pe.message);
        return -1;
    }
    /* Only where the image comes from is used: blobserve serves the
     * upstream image's files, not layers the policy adds for pulls. */
    policy_resolution_clear(&res);
    upstream *u = find_upstream(g, res.upstream);
    if (!u) {
        fetch_error_set(e, 500, "UNKNOWN", "%s: upstream %s is not configured", key, res.upstream);
        return -1;
    }
    manifest_env env = {.st = b->env.st, .cfg = g->cfg};
    manifest m;
    fetch_error fe = {0};
    if (manifest_get(&env, u, res.repository, res.reference, &m, &fe) != 0) {
        fetch_error_wrap(e, &fe, key);
        return -1;
    }
    char jerr[256];
    json_value *v = json_parse(m.data, m.len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    if (v && (strcmp(m.media_type, MT_OCI_INDEX) == 0 || strcmp(m.media_type, MT_DOCKER_LIST) == 0)) {
        char w[256];
        const char *child = pick_platform(b->bc, v, w, sizeof w);
        if (!child) {
            json_free(v);
            manifest_clear(&m);
            fetch_error_set(e, 404, "UNKNOWN", "%s: %s", key, w);
            return -1;
        }
        char cd[DIGEST_STRING_LEN];
        snprintf(cd, sizeof cd, "%s", child);
        json_free(v);
        manifest_clear(&m);
        if (manifest_get(&env, u, res.repository, cd, &m, &fe) != 0) {
            fetch_error_wrap(e, &fe, key);
            return -1;
        }
        v = json_parse(m.data, m.len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    }
    const json_value *layers = v ? json_object_get(v, "layers") : NULL;
    int rc = -1;
    if (!v || !layers || layers->type != JSON_ARRAY) {
        fetch_error_set(e, 502, "UNKNOWN", "%s: manifest %s is not an image manifest with layers", key, m.digest);
    } else if (layers->count == 0 || layers->count > BS_FS_MAX_LAYERS) {
        fetch_error_set(e, 502, "UNKNOWN", "%s: the image has %zu layers (1 to %d are served)", key, layers->count,
                        BS_FS_MAX_LAYERS);
    } else {
        memset(out, 0, sizeof *out);
        rc = 0;
        for (size_t i = 0; i < layers->count; i++) {
            const char *dg = json_object_get_string(layers->items[i], "digest");
            const char *mt = json_object_get_string(layers->items[i], "mediaType");
            if (!dg || !ref_is_sha256_digest(dg)) {
                fetch_error_set(e, 502, "UNKNOWN", "%s: layer %zu has no sha256 digest", key, i);
                rc = -1;
                break;
            }
            if (!is_layer_type(mt)) {
                fetch_error_set(e, 415, "UNKNOWN", "%s: layer %zu has media type %s, which is not a tar layer", key, i,
                                mt ? mt : "(none)");
                rc = -1;
                break;
            }
            snprintf(out->layers[i], sizeof out->layers[i], "%s", dg);
        }
        if (rc == 0) {
            out->n_layers = layers->count;
            snprintf(out->key, sizeof out->key, "%s", key);
            snprintf(out->upstream, sizeof out->upstream, "%s", res.upstream);
            snprintf(out->repository, sizeof out->repository, "%s", res.repository);
            snprintf(out->manifest_digest, sizeof out->manifest_digest, "%s", m.digest);
            /* Tags are looked up again after the tag TTL; digests never change. */
            out->expires = now + (by_digest ? DIGEST_IMAGE_TTL_S : g->cfg->tag_ttl_seconds);
            out->epoch = epoch;
        }
    }
    json_free(v);
    manifest_clear(&m);
    if (rc != 0 || out->expires <= now) return rc;

    image *copy = malloc(sizeof *copy);
    if (!copy) return 0;
    memcpy(copy, out, sizeof *copy);
    pthread_mutex_lock(&b->mu);
    /* Replace an older entry for the key; drop the least used when full. */
    for (image **pp = &b->images; *pp; pp = &(*pp)->next)
        if (strcmp((*pp)->key, key) == 0) {
            image *old = *pp;
            *pp = old->next;
            free(old);
            b->n_images--;
            break;
        }
    if (b->n_images >= IMAGE_CACHE_MAX) {
        image **victim = &b->images;
        for (image **pp = &b->images; *pp; pp = &(*pp)->next)
            if ((*pp)->used < (*victim)->used) victim = pp;
        image *old = *victim;
        *victim = old->next;
        free(old);
        b->n_images--;
    }
    copy->used = ++b->image_clock;
    copy->next = b->images;
    b->images = copy;
    b->n_images++;
    pthread_mutex_unlock(&b->mu);
    return 0;
}

/* Layer i of im as the cache keys it: with the edits (and their variant)
 * of the repository the URL names. */
static bs_layer_spec layer_spec_for(blobserve *b, const image *im, size_t i, const char *url_repository) {
    bs_layer_spec spec = {im->layers[i], "", NULL, 0, b->bc->max_replace_file_bytes};
    for (size_t r = 0; r < b->bc->n_edits; r++)
        if (strcmp(b->bc->edits[r].repository, url_repository) == 0) {
            spec.variant = b->bc->edits[r].variant;
            spec.edits = b->edits[r];
            spec.n_edits = b->bc->edits[r].n;
        }
    return spec;
}

/* The fast path: every layer of im ready now. true with held[] filled;
 * false with nothing held. */
static bool try_acquire_all(blobserve *b, const image *im, const char *url_repository, bs_layer **held) {
    for (size_t i = 0; i < im->n_layers; i++) {
        bs_layer_spec spec = layer_spec_for(b, im, i, url_repository);
        if (!(held[i] = bs_cache_try_acquire(b->cache, &spec))) {
            for (size_t j = 0; j < i; j++) bs_cache_release(b->cache, held[j]);
            return false;
        }
    }
    return true;
}

/* Acquire every layer of im (bottom first), starting the downloads of all
 * missing ones at once; may block for as long as downloads and extractions
 * take. 0 with held[] filled; -1 with e (nothing held). */
static int acquire_layers(blobserve *b, const blobserve_generation *g, const image *im, const char *url_repository,
                          bs_layer **held, fetch_error *e, bool *final) {
    *final = false;
    bs_source src = {b->env.st, b->env.fetches, find_upstream(g, im->upstream), im->repository};
    if (!src.u) {
        fetch_error_set(e, 500, "UNKNOWN", "upstream %s is not configured", im->upstream);
        return -1;
    }
    bs_layer_spec specs[BS_FS_MAX_LAYERS];
    for (size_t i = 0; i < im->n_layers; i++) {
        specs[i] = layer_spec_for(b, im, i, url_repository);
        if (im->n_layers > 1) bs_cache_prefetch(b->cache, &specs[i], &src);
    }
    for (size_t i = 0; i < im->n_layers; i++) {
        held[i] = bs_cache_acquire(b->cache, &specs[i], &src, e, final);
        if (!held[i]) {
            fetch_error_wrap(e, e, im->key);
            for (size_t j = 0; j < i; j++) bs_cache_release(b->cache, held[j]);
            return -1;
        }
    }
    return 0;
}

/* ---------- serving a file ---------- */

/* Does an If-None-Match / If-Range list name etag? Weak comparison when
 * weak_ok (If-None-Match), strong otherwise. */
static bool etag_listed(const char *header, const char *etag, bool weak_ok) {
    const char *p = header;
    size_t el = strlen(etag);
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == ',') p++;
        if (!*p) break;
        size_t n = strcspn(p, ",");
        size_t m = n;
        while (m > 0 && (p[m - 1] == ' ' || p[m - 1] == '\t')) m--;
        if (m == 1 && p[0] == '*') return true;
        const char *t = p;
        if (m > 2 && strncmp(t, "W/", 2) == 0) {
            if (!weak_ok) {
                p += n;
                continue;
            }
            t += 2;
            m -= 2;
        }
        if (m == el && memcmp(t, etag, el) == 0) return true;
        p += n;
    }
    return false;
}

/* "\"<16 hex of the layer digest>-<16 hex FNV-1a of layer key and path>\"".
 * An ETag is compared only with the one cached for the same URL, so it
 * needs to change when the content can (another layer, another edit
 * variant), not to be a cryptographic hash: FNV-1a is per request cheap. */
static void make_etag(const char *layer_key, const char *path, char *out, size_t outlen) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const char *p = layer_key; *p; p++) h = (h ^ (unsigned char)*p) * 0x100000001b3ULL;
    h = (h ^ '\n') * 0x100000001b3ULL;
    for (const char *p = path; *p; p++) h = (h ^ (unsigned char)*p) * 0x100000001b3ULL;
    static const char hex[] = "0123456789abcdef";
    char buf[40];
    size_t o = 0;
    buf[o++] = '"';
    for (size_t i = 0; i < 16 && layer_key[i]; i++) buf[o++] = layer_key[i];
    buf[o++] = '-';
    for (int i = 15; i >= 0; i--) buf[o++] = hex[(h >> (i * 4)) & 15];
    buf[o++] = '"';
    buf[o] = '\0';
    snprintf(out, outlen, "%s", buf);
}

static enum MHD_Result serve_file(blobserve *b, struct MHD_Connection *conn, int fd, const bs_fs_entry *e,
                                  const char *layer_key, bool by_digest) {
    char etag[48], cc[96];
    make_etag(layer_key, e->path, etag, sizeof etag);
    if (by_digest)
        snprintf(cc, sizeof cc, "public, max-age=31536000, immutable");
    else
        snprintf(cc, sizeof cc, "public, max-age=%ld", b->bc->tag_max_age_s);
    uint64_t size = (uint64_t)e->st.st_size;

    const char *inm = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "If-None-Match");
    if (inm && etag_listed(inm, etag, true)) {
        close(fd);
        struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
        if (!r) return MHD_NO;
        MHD_add_response_header(r, "ETag", etag);
        MHD_add_response_header(r, "Cache-Control", cc);
        enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_NOT_MODIFIED, r);
        MHD_destroy_response(r);
        return ret;
    }

    uint64_t start = 0, end = size ? size - 1 : 0;
    bool partial = false;
    const char *rh = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Range");
    const char *ifr = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "If-Range");
    range_spec spec;
    /* A malformed or multi-part Range is ignored (RFC 9110 allows it): the
     * whole file is the answer. So is any Range when If-Range names
     * another version. */
    if (rh && (!ifr || etag_listed(ifr, etag, false)) && range_parse(rh, &spec) == RANGE_OK) {
        if (!range_resolve(&spec, size, &start, &end)) {
            close(fd);
            char cr[64];
            snprintf(cr, sizeof cr, "bytes */%llu", (unsigned long long)size);
            struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
            if (!r) return MHD_NO;
            MHD_add_response_header(r, "Content-Range", cr);
            MHD_add_response_header(r, "ETag", etag);
            enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_RANGE_NOT_SATISFIABLE, r);
            MHD_destroy_response(r);
            return ret;
        }
        partial = true;
    }
    uint64_t len = size ? end - start + 1 : 0;
    struct MHD_Response *r;
    if (len <= b->bc->inline_max_bytes) {
        /* Small: one pread, and the body leaves with the headers in one
         * write (sendfile would make it a second send and a second TCP
         * segment; bench/BLOBSERVE.md measured the difference). */
        char *buf = malloc(len ? len : 1);
        ssize_t got = 0;
        while (buf && (uint64_t)got < len) {
            ssize_t n = pread(fd, buf + got, len - (uint64_t)got, (off_t)(start + (uint64_t)got));
            if (n <= 0) {
                if (n < 0 && errno == EINTR) continue;
                break;
            }
            got += n;
        }
        close(fd);
        if (!buf || (uint64_t)got != len) {
            free(buf);
            return send_text(conn, 500, "reading %s failed", e->path);
        }
        r = MHD_create_response_from_buffer(len, buf, MHD_RESPMEM_MUST_FREE);
        if (!r) {
            free(buf);
            return MHD_NO;
        }
    } else {
        /* MHD sends it with sendfile and closes fd when the response is done. */
        r = MHD_create_response_from_fd_at_offset64(len, fd, start);
        if (!r) {
            close(fd);
            return MHD_NO;
        }
    }
    MHD_add_response_header(r, "Content-Type", content_type(e->path));
    MHD_add_response_header(r, "ETag", etag);
    MHD_add_response_header(r, "Cache-Control", cc);
    MHD_add_response_header(r, "Accept-Ranges", "bytes");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    if (partial) {
        char cr[128];
        snprintf(cr, sizeof cr, "bytes %llu-%llu/%llu", (unsigned long long)start, (unsigned long long)end,
                 (unsigned long long)size);
        MHD_add_response_header(r, "Content-Range", cr);
    }
    enum MHD_Result ret = MHD_queue_response(conn, partial ? MHD_HTTP_PARTIAL_CONTENT : MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

/* Look u's path up through the held layers (bottom first) and answer.
 * Releases every layer but the served file's, which ctx keeps until the
 * response is sent (eviction skips it). */
static enum MHD_Result serve_path(blobserve *b, struct MHD_Connection *conn, req_ctx *ctx, const char *url,
                                  const bs_url *u, bs_layer **held, size_t n) {
    int roots[BS_FS_MAX_LAYERS];
    for (size_t i = 0; i < n; i++) roots[i] = bs_layer_rootfd(held[i]);
    enum MHD_Result ret;
    bs_fs_entry e;
    int fd = -1;
    int rc = bs_fs_lookup(roots, n, u->path, &e);
    if (rc == 0 && S_ISDIR(e.st.st_mode)) {
        if (u->path[0] && !u->trailing_slash) {
            ret = send_redirect(conn, url);
            goto done;
        }
        char idx[BS_FS_PATH_MAX + 16];
        snprintf(idx, sizeof idx, "%s%sindex.html", e.path, e.path[0] ? "/" : "");
        rc = bs_fs_lookup(roots, n, idx, &e);
        if (rc == 0 && S_ISDIR(e.st.st_mode)) {
            rc = -1;
            errno = ENOENT;
        }
    } else if (rc == 0 && u->trailing_slash) {
        rc = -1; /* "file/" names a folder that is not there */
        errno = ENOTDIR;
    }
    if (rc == 0) fd = bs_fs_open(roots, &e);
    if (rc != 0 || fd < 0) {
        int err = errno;
        if (err == ENOENT || err == ENOTDIR || err == ELOOP || err == EISDIR || err == ENAMETOOLONG)
            ret = send_text(conn, 404, "%s not found in %s%c%s", u->path[0] ? u->path : "/", u->repository,
                            u->by_digest ? '@' : ':', u->reference);
        else
            ret = send_text(conn, 500, "reading %s: %s", u->path, strerror(err));
        goto done;
    }
    ctx->held = held[e.layer];
    held[e.layer] = NULL;
    ret = serve_file(b, conn, fd, &e, bs_layer_key(ctx->held), u->by_digest);
done:
    for (size_t i = 0; i < n; i++)
        if (held[i]) bs_cache_release(b->cache, held[i]);
    return ret;
}

/* The slow path's thread: resolve the image and acquire its layers
 * (downloading and extracting what is missing), then resume the
 * connection, whose handler answers from s. */
static void *slow_main(void *arg) {
    slow_req *s = arg;
    blobserve *b = s->b;
    image *im = malloc(sizeof *im);
    bool final;
    blobserve_generation g;
    unsigned long epoch = work_begin(b, &g);
    if (!im) {
        fetch_error_set(&s->err, 500, "UNKNOWN", "blobserve: out of memory");
    } else if (resolve_image(b, &g, epoch, s->u.repository, s->u.reference, s->u.by_digest, im, &s->err) != 0 ||
               acquire_layers(b, &g, im, s->u.repository, s->held, &s->err, &final) != 0) {
        if (s->err.http_status >= 500) log_warn("blobserve: %s", s->err.message);
    } else {
        s->n = im->n_layers;
        s->err.http_status = 0;
    }
    work_end(b, &g);
    free(im);
    s->done = true;
    MHD_resume_connection(s->conn); /* s belongs to the connection from here on */
    pthread_mutex_lock(&b->mu);
    if (--b->workers == 0) pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

static void slow_free(blobserve *b, slow_req *s) {
    if (!s) return;
    if (s->done && s->err.http_status == 0)
        for (size_t i = 0; i < s->n; i++)
            if (s->held[i]) bs_cache_release(b->cache, s->held[i]);
    free(s);
}

static enum MHD_Result handle_file(blobserve *b, struct MHD_Connection *conn, req_ctx *ctx, const char *url) {
    slow_req *s = ctx->slow;
    if (s) {
        /* Resumed: the slow path is done. */
        ctx->slow = NULL;
        enum MHD_Result ret;
        if (s->err.http_status != 0) {
            ret = send_failure(conn, &s->err);
        } else {
            ret = serve_path(b, conn, ctx, url, &s->u, s->held, s->n);
            s->n = 0; /* serve_path released or kept them */
        }
        slow_free(b, s);
        return ret;
    }
    bs_url u;
    char why[1024];
    int st = bs_url_parse(url, &u, why, sizeof why);
    if (st != 0) return send_text(conn, (unsigned)st, "%s", why);
    if (!blobserve_config_allows(b->bc, u.repository))
        return send_text(conn, 403, "repository %s is not served here (blobserve.repositories)", u.repository);
    if (!u.has_slash) return send_redirect(conn, url); /* "/repo:tag" is the folder "/repo:tag/" */

    /* The fast path: the image is resolved and every layer is ready. This
     * thread serves many connections, so it never waits for more. */
    image im; /* on the stack: image_cached copies only the digests in use */
    char key[sizeof im.key];
    image_key(u.repository, u.reference, u.by_digest, key, sizeof key);
    bs_layer *held[BS_FS_MAX_LAYERS];
    if (image_cached(b, key, &im) && try_acquire_all(b, &im, u.repository, held))
        return serve_path(b, conn, ctx, url, &u, held, im.n_layers);

    /* The slow path, off this thread. */
    s = calloc(1, sizeof *s);
    if (!s) return MHD_NO;
    s->b = b;
    s->conn = conn;
    s->u = u;
    ctx->slow = s;
    pthread_mutex_lock(&b->mu);
    b->workers++;
    pthread_mutex_unlock(&b->mu);
    MHD_suspend_connection(conn);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 1024 * 1024);
    pthread_t t;
    if (pthread_create(&t, &attr, slow_main, s) != 0) slow_main(s); /* no thread: do it here */
    pthread_attr_destroy(&attr);
    return MHD_YES;
}

/* ---------- /readyz, /_stats ---------- */

static enum MHD_Result handle_readyz(blobserve *b, struct MHD_Connection *conn) {
    if (!b->bc->wait_for_prepull || b->bc->n_prepull == 0) return send_text(conn, 200, "ready");
    char pending[1500] = "", failed[1900] = "", last[512] = "";
    size_t np = 0, nf = 0;
    pthread_mutex_lock(&b->mu);
    for (size_t i = 0; i < b->bc->n_prepull; i++) {
        const prepull *pp = &b->prepulls[i];
        if (pp->state == PREPULL_PENDING) {
            np++;
            strncat(pending, " ", sizeof pending - strlen(pending) - 1);
            strncat(pending, b->bc->prepull[i], sizeof pending - strlen(pending) - 1);
            if (pp->why[0]) snprintf(last, sizeof last, "%s", pp->why);
        } else if (pp->state == PREPULL_FAILED) {
            nf++;
            size_t used = strlen(failed);
            snprintf(failed + used, sizeof failed - used, "%spre-pull of %s failed (not retried until a reload): %s",
                     used ? "; " : "", b->bc->prepull[i], pp->why);
        }
    }
    pthread_mutex_unlock(&b->mu);
    if (np == 0 && nf == 0) return send_text(conn, 200, "ready");
    if (np == 0) return send_text(conn, 503, "not ready: %s", failed);
    return send_text(conn, 503, "pre-pulling %zu image%s:%s%s%s%s%s", np, np == 1 ? "" : "s", pending,
                     last[0] ? "; last error: " : "", last, nf ? "; " : "", failed);
}

static enum MHD_Result handle_stats(blobserve *b, struct MHD_Connection *conn) {
    bs_cache_stats cs;
    bs_cache_get_stats(b->cache, &cs);
    fetch_stats fs;
    fetcher_stats(b->env.fetches, &fs);
    size_t pending = 0, failed = 0;
    pthread_mutex_lock(&b->mu);
    for (size_t i = 0; i < b->bc->n_prepull; i++) {
        if (b->prepulls[i].state == PREPULL_PENDING) pending++;
        if (b->prepulls[i].state == PREPULL_FAILED) failed++;
    }
    size_t images = b->n_images;
    pthread_mutex_unlock(&b->mu);
    char body[1024];
    int n = snprintf(body, sizeof body,
                     "{\"requests\":%lu,\"extractions\":%lu,\"extraction_failures\":%lu,\"waits\":%lu,"
                     "\"hits\":%lu,\"evictions\":%lu,\"refused_entries\":%lu,\"layers\":%lu,\"held\":%lu,"
                     "\"bytes\":%llu,\"max_bytes\":%llu,\"images\":%zu,\"prepull_pending\":%zu,\"prepull_failed\":%zu,"
                     "\"blob_fetches_started\":%lu,\"blob_fetches_coalesced\":%lu}\n",
                     atomic_load(&b->requests), cs.extractions, cs.extraction_failures, cs.waits, cs.hits, cs.evictions,
                     cs.refused_entries, cs.layers, cs.held, (unsigned long long)cs.bytes,
                     (unsigned long long)cs.max_bytes, images, pending, failed, fs.started, fs.coalesced);
    struct MHD_Response *r = MHD_create_response_from_buffer((size_t)n, body, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "application/json");
    MHD_add_response_header(r, "Cache-Control", "no-store");
    enum MHD_Result ret = MHD_queue_response(conn, 200, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---------- MHD glue ---------- */

static enum MHD_Result access_handler(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                      const char *version, const char *upload_data, size_t *upload_data_size,
                                      void **con_cls) {
    (void)version;
    (void)upload_data;
    blobserve *b = cls;
    /* First call: headers only. Answering on the second call keeps the
     * connection alive (as in server.c). */
    if (*con_cls == NULL) {
        req_ctx *ctx = calloc(1, sizeof *ctx);
        if (!ctx) return MHD_NO;
        *con_cls = ctx;
        return MHD_YES;
    }
    if (*upload_data_size != 0) {
        *upload_data_size = 0;
        return MHD_YES;
    }
    req_ctx *ctx = *con_cls;
    atomic_fetch_add(&b->requests, 1);
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return send_text(conn, 405, "%s is not supported: blobserve serves GET and HEAD", method);
    if (strlen(url) >= MAX_URL_BYTES) return send_text(conn, 414, "URL longer than %d bytes", MAX_URL_BYTES);
    if (strcmp(url, "/readyz") == 0) return handle_readyz(b, conn);
    if (strcmp(url, "/_stats") == 0) return handle_stats(b, conn);
    return handle_file(b, conn, ctx, url);
}

static void request_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                              enum MHD_RequestTerminationCode toe) {
    (void)conn;
    (void)toe;
    blobserve *b = cls;
    req_ctx *ctx = *con_cls;
    if (!ctx) return;
    if (ctx->held) bs_cache_release(b->cache, ctx->held);
    /* A slow path whose answer was never sent (the connection closed). Its
     * thread has finished: the connection was resumed. */
    slow_free(b, ctx->slow);
    free(ctx);
    *con_cls = NULL;
}

/* ---------- pre-pull ---------- */

/* One attempt at ref, on the current generation. -1 with why and *final
 * when trying again cannot help. */
static int prepull_one(blobserve *b, const char *ref, char *why, size_t whylen, bool *final) {
    *final = false;
    char url[1024];
    snprintf(url, sizeof url, "/%s/", ref);
    bs_url u;
    if (bs_url_parse(url, &u, why, whylen) != 0) {
        *final = true;
        return -1;
    }
    image *im = malloc(sizeof *im);
    if (!im) {
        snprintf(why, whylen, "out of memory");
        return -1;
    }
    fetch_error fe = {0};
    bs_layer *held[BS_FS_MAX_LAYERS];
    blobserve_generation g;
    unsigned long epoch = work_begin(b, &g);
    int rc = resolve_image(b, &g, epoch, u.repository, u.reference, u.by_digest, im, &fe);
    /* The policy or the upstream said no (refused, unknown, not a tar layer):
     * so it will say again. Timeouts and rate limits pass. */
    int status = fe.http_status;
    if (rc != 0) *final = status >= 400 && status < 500 && status != 408 && status != 429;
    if (rc == 0) rc = acquire_layers(b, &g, im, u.repository, held, &fe, final);
    if (rc != 0) snprintf(why, whylen, "%s", fe.message);
    work_end(b, &g);
    if (rc == 0)
        for (size_t i = 0; i < im->n_layers; i++) bs_cache_release(b->cache, held[i]);
    free(im);
    return rc;
}

/* Pre-pull every image: a failure that may pass is tried again with a
 * backoff doubling from 1 s to 60 s; one that cannot is reported and left
 * until a reload (which may have fixed the credentials or the policy), which
 * also tries the pending ones again at once. */
static void *prepull_main(void *arg) {
    blobserve *b = arg;
    long backoff_ms = 1000;
    pthread_mutex_lock(&b->mu);
    unsigned long seen = b->epoch;
    pthread_mutex_unlock(&b->mu);
    for (;;) {
        bool pending = false, failed = false;
        for (size_t i = 0; i < b->bc->n_prepull; i++) {
            pthread_mutex_lock(&b->mu);
            prepull_state st = b->prepulls[i].state;
            bool stop = b->stopping;
            pthread_mutex_unlock(&b->mu);
            if (stop) return NULL;
            if (st == PREPULL_FAILED) failed = true;
            if (st != PREPULL_PENDING) continue;
            char why[1024];
            bool final = false;
            int rc = prepull_one(b, b->bc->prepull[i], why, sizeof why, &final);
            pthread_mutex_lock(&b->mu);
            prepull *pp = &b->prepulls[i];
            if (rc == 0) {
                pp->state = PREPULL_DONE;
            } else {
                pp->state = final ? PREPULL_FAILED : PREPULL_PENDING;
                snprintf(pp->why, sizeof pp->why, "%.500s", why);
            }
            pthread_mutex_unlock(&b->mu);
            if (rc == 0) {
                log_info("blobserve: pre-pulled %s", b->bc->prepull[i]);
            } else if (final) {
                failed = true;
                log_error("blobserve: pre-pull of %s failed; not retried until a reload: %s", b->bc->prepull[i], why);
            } else {
                pending = true;
                log_warn("blobserve: pre-pull of %s failed (retrying in %ld s): %s", b->bc->prepull[i],
                         backoff_ms / 1000, why);
            }
        }
        if (!pending && !failed) {
            log_info("blobserve: pre-pull complete (%zu image%s)", b->bc->n_prepull, b->bc->n_prepull == 1 ? "" : "s");
            return NULL;
        }
        /* Wait for the backoff (only when something is pending), a reload,
         * or a stop. */
        struct timespec until = clock_deadline(CLOCK_REALTIME, backoff_ms);
        pthread_mutex_lock(&b->mu);
        while (!b->stopping && b->epoch == seen) {
            if (!pending)
                pthread_cond_wait(&b->cv, &b->mu);
            else if (pthread_cond_timedwait(&b->cv, &b->mu, &until) == ETIMEDOUT)
                break;
        }
        bool stop = b->stopping, reloaded = b->epoch != seen;
        if (reloaded) {
            seen = b->epoch;
            for (size_t i = 0; i < b->bc->n_prepull; i++)
                if (b->prepulls[i].state == PREPULL_FAILED) b->prepulls[i].state = PREPULL_PENDING;
        }
        pthread_mutex_unlock(&b->mu);
        if (stop) return NULL;
        if (reloaded)
            backoff_ms = 1000;
        else if (backoff_ms < 60000)
            backoff_ms *= 2;
    }
}

/* ---------- lifecycle ---------- */

/* /metrics: the same figures as /_stats, as Prometheus series. */
static void blobserve_collect(metrics_writer *w, void *ud) {
    blobserve *b = ud;
    bs_cache_stats cs;
    bs_cache_get_stats(b->cache, &cs);
    pthread_mutex_lock(&b->mu);
    size_t pending = 0, failed = 0;
    for (size_t i = 0; i < b->bc->n_prepull; i++) {
        if (b->prepulls[i].state == PREPULL_PENDING) pending++;
        if (b->prepulls[i].state == PREPULL_FAILED) failed++;
    }
    size_t images = b->n_images;
    pthread_mutex_unlock(&b->mu);
    const struct {
        const char *name, *type, *help;
        unsigned long long v;
    } rows[] = {
        {"regfacade_blobserve_requests_total", "counter", "Requests to the blobserve listener.",
         (unsigned long long)atomic_load(&b->requests)},
        {"regfacade_blobserve_extractions_total", "counter", "Layers extracted into the blobserve cache.",
         cs.extractions},
        {"regfacade_blobserve_extraction_failures_total", "counter", "Layer extractions that failed.",
         cs.extraction_failures},
        {"regfacade_blobserve_layer_hits_total", "counter", "Requests served from a layer already extracted.", cs.hits},
        {"regfacade_blobserve_layer_waits_total", "counter", "Requests that waited for an extraction running.",
         cs.waits},
        {"regfacade_blobserve_evictions_total", "counter", "Extracted layers evicted to stay under the cap.",
         cs.evictions},
        {"regfacade_blobserve_refused_entries_total", "counter",
         "Tar entries refused while extracting (paths out of the layer, links out of it).", cs.refused_entries},
        {"regfacade_blobserve_layers", "gauge", "Layers in the blobserve cache (ready or being extracted).", cs.layers},
        {"regfacade_blobserve_cache_bytes", "gauge", "Bytes of extracted layers.", cs.bytes},
        {"regfacade_blobserve_cache_max_bytes", "gauge", "The blobserve cache's cap.", cs.max_bytes},
        {"regfacade_blobserve_images", "gauge", "Images blobserve has resolved and holds.", images},
        {"regfacade_blobserve_prepull_pending", "gauge", "Images of blobserve.prepull not pulled yet.", pending},
        {"regfacade_blobserve_prepull_failed", "gauge",
         "Images of blobserve.prepull that cannot be pulled (not retried until a reload).", failed},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        metrics_write_head(w, rows[i].name, rows[i].type, rows[i].help);
        metrics_write(w, "%s %llu\n", rows[i].name, rows[i].v);
    }
}

blobserve *blobserve_start(const blobserve_env *env, blobserve_config *bc, char *err, size_t errlen) {
    blobserve *b = calloc(1, sizeof *b);
    if (!b) {
        blobserve_config_free(bc);
        snprintf(err, errlen, "blobserve: out of memory");
        return NULL;
    }
    b->env = *env;
    b->bc = bc;
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
    b->prepulls = calloc(bc->n_prepull ? bc->n_prepull : 1, sizeof *b->prepulls);
    if (!b->prepulls) {
        snprintf(err, errlen, "blobserve: out of memory");
        goto fail;
    }
    b->edits = calloc(bc->n_edits ? bc->n_edits : 1, sizeof *b->edits);
    if (!b->edits) {
        snprintf(err, errlen, "blobserve: out of memory");
        goto fail;
    }
    for (size_t r = 0; r < bc->n_edits; r++) {
        const blobserve_repo_edits *re = &bc->edits[r];
        if (!(b->edits[r] = calloc(re->n, sizeof *b->edits[r]))) {
            snprintf(err, errlen, "blobserve: out of memory");
            goto fail;
        }
        for (size_t i = 0; i < re->n; i++)
            b->edits[r][i] = (bs_edit){re->items[i].path, re->items[i].search, re->items[i].search_len,
                                       re->items[i].replacement, re->items[i].replacement_len};
    }
    b->cache = bs_cache_open(bc->cache_dir, bc->cache_max_bytes, err, errlen);
    if (!b->cache) goto fail;

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)bc->listen_port)};
    if (inet_pton(AF_INET, bc->listen_host, &sa.sin_addr) != 1) {
        snprintf(err, errlen, "blobserve.listen: \"%s\" is not an IPv4 address", bc->listen_host);
        goto fail;
    }
    /* Event-driven, one thread per CPU, like nginx's workers: answers come
     * from ready layers without blocking; anything that has to wait
     * (resolving an image, downloading, extracting) runs on a thread of its
     * own while the connection is suspended. */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned pool = ncpu < 1 ? 1 : ncpu > 16 ? 16 : (unsigned)ncpu;
    /* The registry's limits: the same clients, the same floods. */
    guard_options go = {.header_timeout_s = env->cfg->header_timeout_s,
                        .max_connections = env->cfg->max_connections,
                        .listener = "blobserve",
                        .limit_name = "limits.max_connections"};
    if (!(b->listener = mhd_glue_listener_new(&go, access_handler, b, request_completed, b, err, errlen))) goto fail;
    b->daemon =
        MHD_start_daemon(MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG, 0, NULL, NULL,
                         MHD_GLUE_GUARDED(b->listener), MHD_OPTION_THREAD_POOL_SIZE, pool, MHD_OPTION_SOCK_ADDR,
                         (struct sockaddr *)&sa, MHD_OPTION_UNESCAPE_CALLBACK, mhd_glue_keep_url, NULL,
                         MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)env->cfg->client_timeout_s,
                         MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)BS_CONNECTION_MEMORY, MHD_OPTION_THREAD_STACK_SIZE,
                         (size_t)(1024 * 1024), MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned int)1, MHD_OPTION_END);
    if (!b->daemon) {
        snprintf(err, errlen, "blobserve.listen %s:%d: cannot start the HTTP server (port in use?)", bc->listen_host,
                 bc->listen_port);
        goto fail;
    }
    if (bc->n_prepull) {
        if (pthread_create(&b->prepull_thread, NULL, prepull_main, b) != 0) {
            snprintf(err, errlen, "blobserve: cannot start the pre-pull thread");
            goto fail;
        }
        b->prepull_running = true;
    }
    if (metrics_add_collector(blobserve_collect, b) != 0) {
        snprintf(err, errlen, "blobserve: cannot register the metrics collector (table full)");
        goto fail;
    }
    b->collecting = true;
    log_info("blobserve serving on %s:%d (cache %s, cap %llu bytes, %s)", bc->listen_host, bc->listen_port,
             bc->cache_dir, (unsigned long long)bc->cache_max_bytes,
             bc->any_repository ? "any repository" : "listed repositories");
    return b;
fail:
    blobserve_stop(b);
    return NULL;
}

void blobserve_reloaded(blobserve *b) {
    if (!b) return;
    pthread_mutex_lock(&b->mu);
    b->epoch++;
    for (image *im = b->images, *next; im; im = next) {
        next = im->next;
        free(im);
    }
    b->images = NULL;
    b->n_images = 0;
    pthread_cond_broadcast(&b->cv); /* the pre-pull thread */
    pthread_mutex_unlock(&b->mu);
}

void blobserve_stop(blobserve *b) {
    if (!b) return;
    if (b->collecting) metrics_remove_collector(blobserve_collect, b);
    pthread_mutex_lock(&b->mu);
    b->stopping = true;
    pthread_cond_broadcast(&b->cv);
    /* Suspended connections must be resumed before the daemon stops. */
    while (b->workers > 0) pthread_cond_wait(&b->cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
    if (b->prepull_running) pthread_join(b->prepull_thread, NULL);
    if (b->daemon) MHD_stop_daemon(b->daemon);
    mhd_glue_listener_free(b->listener); /* after the daemon, whose callbacks use it */
    bs_cache_close(b->cache);
    for (image *im = b->images, *next; im; im = next) {
        next = im->next;
        free(im);
    }
    free(b->prepulls);
    if (b->edits)
        for (size_t r = 0; r < b->bc->n_edits; r++) free(b->edits[r]);
    free(b->edits);
    blobserve_config_free(b->bc);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->cv);
    free(b);
}
