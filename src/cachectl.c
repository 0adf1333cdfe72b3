/* cachectl: cache ls, du, rm, gc, warm and tags refresh (see
 * include/regfacade/cachectl.h). */
#include "regfacade/cachectl.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "regfacade/cluster.h"
#include "regfacade/json.h"
#include "regfacade/log.h"
#include "regfacade/manifest.h"
#include "regfacade/oci_error.h"
#include "regfacade/ref.h"
#include "regfacade/specs.h"
#include "regfacade/generate.h"

#define MANIFEST_READ_MAX (4 * 1024 * 1024)
#define WARM_MAX_BLOBS 10000 /* blobs one warm request may plan */

void cachectl_answer_clear(cachectl_answer *a) {
    free(a->body);
    a->body = NULL;
    a->len = 0;
}

static int answer_error(cachectl_answer *out, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int answer_error(cachectl_answer *out, int status, const char *code, const char *fmt, ...) {
    char msg[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    out->status = status;
    out->body = oci_error_body(code, msg, NULL, &out->len);
    return -1;
}

/* Serialize v (freed) as the answer; -1 on allocation failure. */
static int answer_json(cachectl_answer *out, int status, json_value *v, bool oom) {
    out->body = v && !oom ? json_serialize(v, &out->len) : NULL;
    json_free(v);
    if (!out->body) return answer_error(out, 500, "UNKNOWN", "out of memory");
    out->status = status;
    return 0;
}

/* json_object_set that remembers a failure instead of returning it. */
static void put(json_value *o, const char *key, json_value *v, bool *oom) {
    if (!v || json_object_set(o, key, v) != 0) *oom = true;
}
static void append(json_value *a, json_value *v, bool *oom) {
    if (!v || json_array_append(a, v) != 0) *oom = true;
}

/* ---------- references ---------- */

int cachectl_ref_split(const char *ref, char *name, size_t nlen, char *reference, size_t rlen, char *err,
                       size_t errlen) {
    const char *at = strchr(ref, '@');
    const char *slash = strrchr(ref, '/');
    const char *colon = strrchr(ref, ':');
    if (ref_is_sha256_digest(ref)) {
        snprintf(name, nlen, "%s", "");
        snprintf(reference, rlen, "%s", ref);
        return 0;
    }
    size_t n;
    if (at) {
        n = (size_t)(at - ref);
        snprintf(reference, rlen, "%s", at + 1);
        if (!ref_is_sha256_digest(reference)) {
            snprintf(err, errlen, "\"%.300s\": \"%.200s\" is not a sha256 digest", ref, at + 1);
            return -1;
        }
    } else if (colon && (!slash || colon > slash)) {
        n = (size_t)(colon - ref);
        snprintf(reference, rlen, "%s", colon + 1);
        if (!ref_valid_tag(reference)) {
            snprintf(err, errlen, "\"%.300s\": \"%.200s\" is not a valid tag", ref, colon + 1);
            return -1;
        }
    } else {
        n = strlen(ref);
        snprintf(reference, rlen, "%s", "latest");
    }
    if (n >= nlen) n = nlen - 1;
    memcpy(name, ref, n);
    name[n] = '\0';
    if (!ref_valid_name(name)) {
        snprintf(err, errlen,
                 "\"%.300s\": \"%.300s\" is not a valid repository name (NAME:TAG, NAME@sha256:HEX or "
                 "sha256:HEX)",
                 ref, name);
        return -1;
    }
    return 0;
}

/* REF through the policy's spec and resolve hooks, as a client's manifest
 * request (sp: the pushed, pulled and fixed specs; NULL offline). */
static int resolve_ref(specs *sp, policy *pol, const char *ref, policy_resolution *res, cachectl_answer *out) {
    char name[REF_NAME_MAX + 1], reference[REF_DIGEST_MAX + 1], why[800];
    if (cachectl_ref_split(ref, name, sizeof name, reference, sizeof reference, why, sizeof why) != 0)
        return answer_error(out, 400, "NAME_INVALID", "%s", why);
    if (!name[0]) return answer_error(out, 400, "NAME_INVALID", "\"%s\" names no repository", ref);
    policy_request pr = {.method = "GET", .kind = "manifest", .repository = name, .reference = reference};
    policy_error pe = {0};
    json_value *spec = NULL;
    int rc = specs_resolve(sp, pol, &pr, res, &spec, &pe);
    json_free(spec);
    if (rc != 0)
        return answer_error(out, pe.status >= 400 ? pe.status : 500, pe.code[0] ? pe.code : "DENIED",
                            "%s: the policy's resolve: %s", ref, pe.message);
    return 0;
}

/* ---------- digest sets: an image's blobs ---------- */

typedef struct {
    char (*d)[80];
    size_t n, cap;
    bool sorted, oom;
} dset;

static int cmp80(const void *a, const void *b) { return strcmp(a, b); }

static bool dset_has(dset *s, const char *digest) {
    if (!s->sorted) {
        if (s->n) qsort(s->d, s->n, sizeof *s->d, cmp80);
        s->sorted = true;
    }
    return s->n && bsearch(digest, s->d, s->n, sizeof *s->d, cmp80) != NULL;
}

/* Linear before sorting (small sets); after, the set is only read. */
static bool dset_add(dset *s, const char *digest) {
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->d[i], digest) == 0) return false;
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 32;
        void *nd = realloc(s->d, nc * sizeof *s->d);
        if (!nd) {
            s->oom = true;
            return false;
        }
        s->d = nd;
        s->cap = nc;
    }
    snprintf(s->d[s->n++], sizeof *s->d, "%s", digest);
    s->sorted = false;
    return true;
}

/* The same without the duplicate scan: for the big "kept" set, which is
 * sorted before it is read. */
static void dset_push(dset *s, const char *digest) {
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 256;
        void *nd = realloc(s->d, nc * sizeof *s->d);
        if (!nd) {
            s->oom = true;
            return;
        }
        s->d = nd;
        s->cap = nc;
    }
    snprintf(s->d[s->n++], sizeof *s->d, "%s", digest);
    s->sorted = false;
}

/* digest and, as far as the cache holds them, what it refers to: an
 * index's manifests, a manifest's config and layers. add is dset_add or
 * dset_push. */
static void tree_walk(store *st, const char *digest, dset *out, bool (*add)(dset *, const char *), int depth) {
    add(out, digest);
    char *data = NULL, err[300];
    size_t len = 0;
    if (depth > 2 || store_blob_peek(st, digest, MANIFEST_READ_MAX, &data, &len, err, sizeof err) != 1) return;
    json_value *v = json_parse(data, len, JSON_DEFAULT_MAX_DEPTH, err, sizeof err);
    free(data);
    if (!v || v->type != JSON_OBJECT) {
        json_free(v);
        return;
    }
    const json_value *children = json_object_get(v, "manifests");
    for (size_t i = 0; children && children->type == JSON_ARRAY && i < children->count; i++) {
        const char *c = json_object_get_string(children->items[i], "digest");
        if (c && ref_is_sha256_digest(c)) tree_walk(st, c, out, add, depth + 1);
    }
    const char *cfg = json_object_get_string(json_object_get(v, "config"), "digest");
    if (cfg && ref_is_sha256_digest(cfg)) add(out, cfg);
    const json_value *layers = json_object_get(v, "layers");
    for (size_t i = 0; layers && layers->type == JSON_ARRAY && i < layers->count; i++) {
        const char *l = json_object_get_string(layers->items[i], "digest");
        if (l && ref_is_sha256_digest(l)) add(out, l);
    }
    json_free(v);
}

static bool push_adapter(dset *s, const char *d) {
    dset_push(s, d);
    return true;
}

/* The cached blobs, sorted by digest, for lookups. */
typedef struct {
    store_blob_ref *b;
    size_t n;
} blob_index;

static int cmp_ref(const void *a, const void *b) {
    return strcmp(((const store_blob_ref *)a)->digest, ((const store_blob_ref *)b)->digest);
}

static const store_blob_ref *blob_find(const blob_index *bi, const char *digest) {
    store_blob_ref key;
    snprintf(key.digest, sizeof key.digest, "%s", digest);
    return bi->n ? bsearch(&key, bi->b, bi->n, sizeof *bi->b, cmp_ref) : NULL;
}

/* ---------- ls ---------- */

typedef struct {
    store *st;
    const blob_index *bi;
    json_value *images;
    bool oom;
} ls_ctx;

static int ls_tag(void *ud, const char *upstream, const char *repository, const char *tag, const store_tag *t) {
    ls_ctx *c = ud;
    dset tree = {0};
    tree_walk(c->st, t->digest, &tree, dset_add, 0);
    uint64_t size = 0;
    time_t used = 0;
    size_t missing = 0;
    for (size_t i = 0; i < tree.n; i++) {
        const store_blob_ref *b = blob_find(c->bi, tree.d[i]);
        if (!b) {
            missing++;
            continue;
        }
        size += b->size;
        if (b->used > used) used = b->used;
    }
    json_value *o = json_new_object();
    if (!o)
        c->oom = true;
    else {
        put(o, "upstream", json_new_string(upstream), &c->oom);
        put(o, "repository", json_new_string(repository), &c->oom);
        put(o, "tag", json_new_string(tag), &c->oom);
        put(o, "digest", json_new_string(t->digest), &c->oom);
        put(o, "media_type", json_new_string(t->media_type), &c->oom);
        put(o, "resolved", json_new_int64((int64_t)t->fetched), &c->oom);
        put(o, "size", json_new_uint64(size), &c->oom);
        put(o, "blobs", json_new_uint64(tree.n), &c->oom);
        put(o, "missing", json_new_uint64(missing), &c->oom);
        put(o, "last_used", json_new_int64((int64_t)used), &c->oom);
        append(c->images, o, &c->oom);
    }
    c->oom |= tree.oom;
    free(tree.d);
    return 0;
}

static int blob_index_load(store *st, blob_index *bi) { return store_blob_list(st, &bi->b, &bi->n); }

void cachectl_list(store *st, cachectl_answer *out) {
    blob_index bi = {0};
    if (blob_index_load(st, &bi) != 0) {
        answer_error(out, 500, "UNKNOWN", "out of memory listing the cache");
        return;
    }
    bool oom = false;
    json_value *root = json_new_object(), *blobs = json_new_array();
    ls_ctx c = {st, &bi, json_new_array(), false};
    /* Blobs in LRU order (as listed), before the index is sorted. */
    for (size_t i = 0; blobs && i < bi.n; i++) {
        json_value *o = json_new_object();
        if (!o) {
            oom = true;
            break;
        }
        put(o, "digest", json_new_string(bi.b[i].digest), &oom);
        put(o, "size", json_new_uint64(bi.b[i].size), &oom);
        put(o, "last_used", json_new_int64((int64_t)bi.b[i].used), &oom);
        put(o, "in_use", json_new_bool(bi.b[i].pinned), &oom);
        append(blobs, o, &oom);
    }
    if (bi.n) qsort(bi.b, bi.n, sizeof *bi.b, cmp_ref);
    bool unreadable = root && blobs && c.images && store_tag_each(st, ls_tag, &c) < 0;
    if (!root || !blobs || !c.images || unreadable) {
        json_free(root);
        json_free(blobs);
        json_free(c.images);
        free(bi.b);
        if (unreadable)
            answer_error(out, 500, "UNKNOWN", "cannot read %s/tags", store_dir(st));
        else
            answer_error(out, 500, "UNKNOWN", "out of memory listing the cache");
        return;
    }
    put(root, "images", c.images, &oom);
    put(root, "blobs", blobs, &oom);
    answer_json(out, 200, root, oom || c.oom);
    free(bi.b);
}

/* ---------- du ---------- */

static void count_dir(const char *dir, const char *sub, size_t *files, uint64_t *bytes) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, sub);
    DIR *d = opendir(p);
    *files = 0;
    if (bytes) *bytes = 0;
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.') continue;
        char f[4400];
        struct stat st;
        snprintf(f, sizeof f, "%s/%s", p, de->d_name);
        if (lstat(f, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        (*files)++;
        if (bytes) *bytes += (uint64_t)st.st_size;
    }
    closedir(d);
}

void cachectl_usage(store *st, uint64_t max_bytes, cachectl_answer *out) {
    store_stats ss;
    store_get_stats(st, &ss);
    size_t tags, tmp_n, q_n;
    uint64_t tmp_b, q_b;
    count_dir(store_dir(st), "tags", &tags, NULL);
    count_dir(store_dir(st), "tmp", &tmp_n, &tmp_b);
    count_dir(store_dir(st), "quarantine", &q_n, &q_b);
    bool oom = false;
    json_value *o = json_new_object();
    if (!o)
        oom = true;
    else {
        put(o, "dir", json_new_string(store_dir(st)), &oom);
        put(o, "blobs", json_new_uint64(ss.blobs), &oom);
        put(o, "bytes", json_new_uint64(ss.bytes), &oom);
        put(o, "max_bytes", json_new_uint64(max_bytes), &oom);
        put(o, "tag_records", json_new_uint64(tags), &oom);
        put(o, "tmp_files", json_new_uint64(tmp_n), &oom);
        put(o, "tmp_bytes", json_new_uint64(tmp_b), &oom);
        put(o, "quarantine_files", json_new_uint64(q_n), &oom);
        put(o, "quarantine_bytes", json_new_uint64(q_b), &oom);
    }
    answer_json(out, 200, o, oom);
}

/* ---------- rm ---------- */

typedef struct {
    store *st;
    const char *digest; /* the manifest being removed */
    json_value *tags;   /* resolutions removed */
    dset kept;          /* blobs other resolutions' images hold */
    bool oom;
    char err[600];
    bool failed;
} rm_ctx;

static json_value *tag_json(const char *upstream, const char *repository, const char *tag, bool *oom) {
    json_value *o = json_new_object();
    if (!o) {
        *oom = true;
        return NULL;
    }
    put(o, "upstream", json_new_string(upstream), oom);
    put(o, "repository", json_new_string(repository), oom);
    put(o, "tag", json_new_string(tag), oom);
    return o;
}

/* Resolutions to the removed manifest go with it; every other one keeps
 * its image's blobs. */
static int rm_tag(void *ud, const char *upstream, const char *repository, const char *tag, const store_tag *t) {
    rm_ctx *c = ud;
    if (strcmp(t->digest, c->digest) != 0) {
        tree_walk(c->st, t->digest, &c->kept, push_adapter, 0);
        return 0;
    }
    /* In a cluster the shared resolution goes too (else the next pull
     * would take the removed manifest's digest from it); Redis down: the
     * local removal goes on, said in the log. */
    if (cluster_tag_forget(store_cluster(c->st), upstream, repository, tag) == CLUSTER_DOWN)
        log_warn("cache rm: %s %s:%s: the cluster's Redis is unreachable; its shared resolution stays", upstream,
                 repository, tag);
    int r = store_tag_remove(c->st, upstream, repository, tag, c->err, sizeof c->err);
    if (r < 0)
        c->failed = true;
    else if (r == 1)
        append(c->tags, tag_json(upstream, repository, tag, &c->oom), &c->oom);
    return 0;
}

/* The manifest digest REF names: 1 found (had_tag: through a cached
 * resolution), 0 answered (an error). */
static int rm_target(store *st, specs *sp, policy *pol, const char *ref, char *digest, size_t dlen,
                     cachectl_answer *out) {
    if (ref_is_sha256_digest(ref)) {
        snprintf(digest, dlen, "%s", ref);
        return 1;
    }
    if (!pol) {
        answer_error(out, 500, "UNKNOWN", "%s: no policy to resolve the name with", ref);
        return 0;
    }
    policy_resolution res;
    if (resolve_ref(sp, pol, ref, &res, out) != 0) return 0;
    store_tag t;
    int found = 1;
    if (ref_is_sha256_digest(res.reference))
        snprintf(digest, dlen, "%s", res.reference);
    else if (store_tag_get(st, res.upstream, res.repository, res.reference, &t) == 1)
        snprintf(digest, dlen, "%s", t.digest);
    else {
        answer_error(out, 404, "MANIFEST_UNKNOWN", "%s (%s %s:%s) has no cached resolution", ref, res.upstream,
                     res.repository, res.reference);
        found = 0;
    }
    policy_resolution_clear(&res);
    return found;
}

void cachectl_remove(store *st, specs *sp, policy *pol, const char *ref, cachectl_answer *out) {
    char digest[80] = "";
    if (!rm_target(st, sp, pol, ref, digest, sizeof digest, out)) return;
    rm_ctx c = {.st = st, .digest = digest, .tags = json_new_array()};
    json_value *removed = json_new_array(), *in_use = json_new_array();
    /* The image's blobs, read before anything goes. */
    dset tree = {0};
    tree_walk(st, digest, &tree, dset_add, 0);
    if (c.tags && store_tag_each(st, rm_tag, &c) < 0) {
        c.failed = true;
        snprintf(c.err, sizeof c.err, "cannot read %s/tags", store_dir(st));
    }
    uint64_t bytes = 0;
    bool oom = c.oom || tree.oom || c.kept.oom || !removed || !in_use || !c.tags;
    size_t n_removed = 0, n_in_use = 0;
    blob_index bi = {0};
    if (!oom && blob_index_load(st, &bi) != 0)
        oom = true;
    else if (bi.n)
        qsort(bi.b, bi.n, sizeof *bi.b, cmp_ref);
    for (size_t i = 0; !oom && !c.failed && i < tree.n; i++) {
        if (dset_has(&c.kept, tree.d[i])) continue;
        const store_blob_ref *b = blob_find(&bi, tree.d[i]);
        uint64_t size = b ? b->size : 0;
        char err[600];
        store_remove_result r = store_blob_remove(st, tree.d[i], err, sizeof err);
        if (r == STORE_REMOVED) {
            json_value *o = json_new_object();
            if (!o)
                oom = true;
            else {
                put(o, "digest", json_new_string(tree.d[i]), &oom);
                put(o, "size", json_new_uint64(size), &oom);
                append(removed, o, &oom);
            }
            bytes += size;
            n_removed++;
        } else if (r == STORE_IN_USE) {
            append(in_use, json_new_string(tree.d[i]), &oom);
            n_in_use++;
        } else if (r == STORE_REMOVE_ERROR) {
            c.failed = true;
            snprintf(c.err, sizeof c.err, "%s", err);
        }
    }
    free(bi.b);
    free(tree.d);
    free(c.kept.d);
    size_t n_tags = c.tags ? c.tags->count : 0;
    json_value *o = NULL;
    if (!oom && !c.failed && (n_removed || n_in_use || n_tags) && (o = json_new_object())) {
        put(o, "ref", json_new_string(ref), &oom);
        put(o, "digest", json_new_string(digest), &oom);
        put(o, "tags", c.tags, &oom);
        put(o, "removed", removed, &oom);
        put(o, "in_use", in_use, &oom);
        put(o, "bytes", json_new_uint64(bytes), &oom);
        c.tags = removed = in_use = NULL;
    }
    json_free(c.tags);
    json_free(removed);
    json_free(in_use);
    if (c.failed)
        answer_error(out, 500, "UNKNOWN", "%s: %s", ref, c.err);
    else if (oom)
        answer_error(out, 500, "UNKNOWN", "%s: out of memory", ref);
    else if (!o)
        answer_error(out, 404, "BLOB_UNKNOWN", "%s: nothing of it is cached", ref);
    else
        answer_json(out, n_in_use ? 409 : 200, o, oom);
    if (o)
        log_info("cache rm %s: %zu blobs removed (%llu bytes), %zu resolutions, %zu in use kept", ref, n_removed,
                 (unsigned long long)bytes, n_tags, n_in_use);
}

/* ---------- gc, tags refresh ---------- */

void cachectl_gc(store *st, time_t tmp_min_age, cachectl_answer *out) {
    store_gc_report r;
    char err[600];
    if (store_gc(st, tmp_min_age, &r, err, sizeof err) != 0) {
        answer_error(out, 500, "UNKNOWN", "%s", err);
        return;
    }
    bool oom = false;
    json_value *o = json_new_object();
    if (!o)
        oom = true;
    else {
        put(o, "tmp_files", json_new_uint64(r.tmp_files), &oom);
        put(o, "tmp_bytes", json_new_uint64(r.tmp_bytes), &oom);
        put(o, "tag_records", json_new_uint64(r.tag_records), &oom);
        put(o, "generated_records", json_new_uint64(r.generated_records), &oom);
        put(o, "damaged_records", json_new_uint64(r.damaged_records), &oom);
        put(o, "stray_files", json_new_uint64(r.stray_files), &oom);
        put(o, "stray_bytes", json_new_uint64(r.stray_bytes), &oom);
    }
    log_info("cache gc: %zu tmp files, %zu tag and %zu generated records of uncached images, %zu damaged records, "
             "%zu stray files removed",
             r.tmp_files, r.tag_records, r.generated_records, r.damaged_records, r.stray_files);
    answer_json(out, 200, o, oom);
}

void cachectl_tag_forget(store *st, specs *sp, policy *pol, const char *ref, cachectl_answer *out) {
    policy_resolution res;
    if (resolve_ref(sp, pol, ref, &res, out) != 0) return;
    char err[600];
    /* In a cluster, the shared resolution first (else the next pull would
     * take it again); Redis unreachable: nothing changed. */
    cluster_result shared = ref_is_sha256_digest(res.reference)
                                ? CLUSTER_OFF
                                : cluster_tag_forget(store_cluster(st), res.upstream, res.repository, res.reference);
    int r = ref_is_sha256_digest(res.reference) ? 2
            : shared == CLUSTER_DOWN
                ? 3
                : store_tag_remove(st, res.upstream, res.repository, res.reference, err, sizeof err);
    if (r == 1 || (r == 0 && shared == CLUSTER_HIT)) r = 1;
    if (r == 3) {
        answer_error(out, 503, "UNAVAILABLE",
                     "%s: the cluster's Redis is unreachable, and the tag would stay "
                     "resolved on the other replicas; nothing changed, refresh it again",
                     ref);
    } else if (r == 2) {
        answer_error(out, 400, "TAG_INVALID", "%s resolves to the digest %s: a digest has no tag to refresh", ref,
                     res.reference);
    } else if (r < 0) {
        answer_error(out, 500, "UNKNOWN", "%s: %s", ref, err);
    } else {
        bool oom = false;
        json_value *o = json_new_object();
        if (!o)
            oom = true;
        else {
            put(o, "ref", json_new_string(ref), &oom);
            put(o, "upstream", json_new_string(res.upstream), &oom);
            put(o, "repository", json_new_string(res.repository), &oom);
            put(o, "tag", json_new_string(res.reference), &oom);
            put(o, "forgotten", json_new_bool(r == 1), &oom);
        }
        log_info("tags refresh %s: %s %s:%s %s", ref, res.upstream, res.repository, res.reference,
                 r == 1 ? "forgotten" : "had no resolution");
        answer_json(out, 200, o, oom);
    }
    policy_resolution_clear(&res);
}

/* ---------- warm ---------- */

typedef struct {
    upstream *u;
    size_t ref; /* index into refs */
    char repository[REF_NAME_MAX + 1];
    char digest[80];
    int64_t size;  /* -1: unknown */
    bool manifest; /* fetched by start already */
} warm_item;

struct cachectl_warm {
    const generation_env *env;
    specs *sp;
    generation g;
    char **refs;
    size_t n_refs;
    warm_item *items;
    size_t n, cap, next;
    size_t fetched, cached, failed;
    uint64_t bytes;
    bool done;
};

static int warm_add(cachectl_warm *w, upstream *u, size_t ref, const char *repository, const char *digest, int64_t size,
                    bool manifest) {
    for (size_t i = 0; i < w->n; i++)
        if (strcmp(w->items[i].digest, digest) == 0 && w->items[i].u == u &&
            strcmp(w->items[i].repository, repository) == 0)
            return 0;
    if (w->n >= WARM_MAX_BLOBS) return -1;
    if (w->n == w->cap) {
        size_t nc = w->cap ? w->cap * 2 : 64;
        warm_item *ni = realloc(w->items, nc * sizeof *ni);
        if (!ni) return -1;
        w->items = ni;
        w->cap = nc;
    }
    warm_item *it = &w->items[w->n++];
    *it = (warm_item){.u = u, .ref = ref, .size = size, .manifest = manifest};
    snprintf(it->repository, sizeof it->repository, "%s", repository);
    snprintf(it->digest, sizeof it->digest, "%s", digest);
    return 0;
}

static bool platform_wanted(const json_value *desc, const char *const *platforms, size_t n) {
    if (n == 0) return true;
    const json_value *pl = json_object_get(desc, "platform");
    const char *os = json_object_get_string(pl, "os"), *arch = json_object_get_string(pl, "architecture");
    const char *var = json_object_get_string(pl, "variant");
    if (!os || !arch) return false;
    char a[200], b[200];
    snprintf(a, sizeof a, "%s/%s", os, arch);
    snprintf(b, sizeof b, "%s/%s/%s", os, arch, var ? var : "");
    for (size_t i = 0; i < n; i++)
        if (strcmp(platforms[i], a) == 0 || (var && strcmp(platforms[i], b) == 0)) return true;
    return false;
}

/* One image manifest's config and layers into the plan. */
static upstream *gen_upstream_of(const generation *g, const char *name) {
    size_t n = strcspn(name, "@"); /* a credential set's "NAME@SET": the upstream NAME */
    for (size_t i = 0; i < g->cfg->n_upstreams; i++)
        if (strlen(g->cfg->upstreams[i].name) == n && strncmp(g->cfg->upstreams[i].name, name, n) == 0)
            return g->ups[i];
    return NULL;
}

/* The layers resolve adds (res->layers) to one platform's image, from other
 * images and blobs, where their bytes are fetched from (file layers are
 * made on assembly). platform NULL: the config's. */
static int warm_plan_added(cachectl_warm *w, size_t ref, const policy_resolution *res, upstream *u,
                           const json_value *mv, const char *platform, cachectl_answer *err) {
    if (!res->has_layers || !w->g.layers) return 0;
    char plat[128];
    fetch_error fe = {0};
    if (platform) {
        snprintf(plat, sizeof plat, "%s", platform);
    } else {
        const json_value *cfg = json_object_get(mv, "config");
        const char *cd = json_object_get_string(cfg, "digest");
        int64_t size = -1;
        if (!json_get_int64(json_object_get(cfg, "size"), &size)) size = -1;
        char *bytes = NULL, jerr[256];
        size_t len = 0;
        if (!cd ||
            fetch_blob_bytes(w->env->fetches, u, res->repository, cd, size, MANIFEST_READ_MAX, &bytes, &len, &fe) != 0)
            return answer_error(err, cd ? fe.http_status : 502, cd ? fe.code : "MANIFEST_INVALID",
                                "%s: the image's config: %s", w->refs[ref], cd ? fe.message : "none");
        json_value *cv = json_parse(bytes, len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
        free(bytes);
        generate_platform_of_config(cv, plat, sizeof plat);
        json_free(cv);
    }
    layer_stack stack = {0};
    if (layers_resolve(w->g.layers, res->layers, res->n_layers, plat, res->upstream, res->repository, &stack, &fe) != 0)
        return answer_error(err, fe.http_status, fe.code, "%s: the policy's layers for %s: %s", w->refs[ref], plat,
                            fe.message);
    int rc = 0;
    for (size_t i = 0; i < stack.n && rc == 0; i++) {
        const image_layer *it = &stack.items[i];
        if (it->is_base || !it->digest || (it->source && strcmp(it->source, "file") == 0)) continue;
        const char *up = it->origin_upstream ? it->origin_upstream : res->upstream;
        const char *repo = it->origin_repository ? it->origin_repository : res->repository;
        upstream *lu = gen_upstream_of(&w->g, up);
        if (!lu)
            rc = answer_error(err, 500, "UNKNOWN", "%s: layer %s: upstream %s is not configured", w->refs[ref],
                              it->digest, up);
        else if (warm_add(w, lu, ref, repo, it->digest, (int64_t)it->size, false) != 0)
            rc = answer_error(err, 413, "TOO_LARGE", "%s: more than %d blobs to warm in one request", w->refs[ref],
                              WARM_MAX_BLOBS);
    }
    layer_stack_clear(&stack);
    return rc;
}

static int warm_plan_image(cachectl_warm *w, upstream *u, size_t ref, const policy_resolution *res,
                           const char *platform, const manifest *m, cachectl_answer *err) {
    const char *repository = res->repository;
    char jerr[256];
    json_value *v = json_parse(m->data, m->len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    if (!v) return answer_error(err, 502, "MANIFEST_INVALID", "%s: manifest %s: %s", w->refs[ref], m->digest, jerr);
    int rc = 0;
    const json_value *cfg = json_object_get(v, "config");
    const json_value *layers = json_object_get(v, "layers");
    const json_value *all[1 + 256];
    size_t n = 0;
    if (cfg) all[n++] = cfg;
    for (size_t i = 0; layers && layers->type == JSON_ARRAY && i < layers->count && n < sizeof all / sizeof all[0]; i++)
        all[n++] = layers->items[i];
    for (size_t i = 0; i < n && rc == 0; i++) {
        const char *d = json_object_get_string(all[i], "digest");
        int64_t size = -1;
        if (!json_get_int64(json_object_get(all[i], "size"), &size) || size < 0) size = -1;
        if (!d || !ref_is_sha256_digest(d)) {
            rc = answer_error(err, 502, "MANIFEST_INVALID", "%s: manifest %s: a descriptor without a sha256 digest",
                              w->refs[ref], m->digest);
        } else if (warm_add(w, u, ref, repository, d, size, false) != 0) {
            rc = answer_error(err, 413, "TOO_LARGE", "%s: more than %d blobs to warm in one request", w->refs[ref],
                              WARM_MAX_BLOBS);
        }
    }
    if (rc == 0) rc = warm_plan_added(w, ref, res, u, v, platform, err);
    json_free(v);
    return rc;
}

static int warm_plan_ref(cachectl_warm *w, size_t ref, const char *const *platforms, size_t n_platforms,
                         cachectl_answer *err) {
    policy_resolution res;
    if (resolve_ref(w->sp, w->g.pol, w->refs[ref], &res, err) != 0) return -1;
    upstream *u = gen_upstream_of(&w->g, res.upstream);
    if (!u) {
        answer_error(err, 500, "UNKNOWN", "%s: upstream %s is not configured", w->refs[ref], res.upstream);
        policy_resolution_clear(&res);
        return -1;
    }
    manifest_env env = {.st = w->env->st, .cfg = w->g.cfg};
    manifest m;
    fetch_error fe = {0};
    int rc = 0;
    if (manifest_get(&env, u, res.repository, res.reference, &m, &fe) != 0) {
        answer_error(err, fe.http_status, fe.code, "%s: %s", w->refs[ref], fe.message);
        policy_resolution_clear(&res);
        return -1;
    }
    warm_add(w, u, ref, res.repository, m.digest, (int64_t)m.len, true);
    if (strcmp(m.media_type, MT_OCI_INDEX) == 0 || strcmp(m.media_type, MT_DOCKER_LIST) == 0) {
        char jerr[256];
        json_value *v = json_parse(m.data, m.len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
        const json_value *children = v ? json_object_get(v, "manifests") : NULL;
        size_t picked = 0;
        for (size_t i = 0; rc == 0 && children && children->type == JSON_ARRAY && i < children->count; i++) {
            const char *cd = json_object_get_string(children->items[i], "digest");
            if (!cd || !ref_is_sha256_digest(cd) || !platform_wanted(children->items[i], platforms, n_platforms))
                continue;
            manifest child;
            if (manifest_get(&env, u, res.repository, cd, &child, &fe) != 0) {
                rc = answer_error(err, fe.http_status, fe.code, "%s: %s: %s", w->refs[ref], cd, fe.message);
                break;
            }
            picked++;
            warm_add(w, u, ref, res.repository, child.digest, (int64_t)child.len, true);
            char plat[128];
            generate_platform_of_entry(children->items[i], plat, sizeof plat);
            if (strcmp(child.media_type, MT_OCI_INDEX) != 0 && strcmp(child.media_type, MT_DOCKER_LIST) != 0)
                rc = warm_plan_image(w, u, ref, &res, plat, &child, err);
            manifest_clear(&child);
        }
        json_free(v);
        if (rc == 0 && picked == 0)
            rc = answer_error(err, 404, "MANIFEST_UNKNOWN", "%s: the index %s has no manifest for the platforms named",
                              w->refs[ref], m.digest);
    } else {
        rc = warm_plan_image(w, u, ref, &res, NULL, &m, err);
    }
    manifest_clear(&m);
    policy_resolution_clear(&res);
    return rc == 0 ? 0 : -1;
}

cachectl_warm *cachectl_warm_start(const generation_env *env, specs *sp, const char *const *refs, size_t n_refs,
                                   const char *const *platforms, size_t n_platforms, cachectl_answer *err) {
    memset(err, 0, sizeof *err);
    if (n_refs == 0) {
        answer_error(err, 400, "NAME_INVALID", "no image to warm: name at least one REF");
        return NULL;
    }
    cachectl_warm *w = calloc(1, sizeof *w);
    if (!w || !(w->refs = calloc(n_refs, sizeof *w->refs))) {
        free(w);
        answer_error(err, 500, "UNKNOWN", "out of memory");
        return NULL;
    }
    w->env = env;
    w->sp = sp;
    env->acquire(env->ud, &w->g);
    for (size_t i = 0; i < n_refs; i++)
        if (!(w->refs[i] = strdup(refs[i]))) {
            w->n_refs = i;
            cachectl_warm_free(w);
            answer_error(err, 500, "UNKNOWN", "out of memory");
            return NULL;
        }
    w->n_refs = n_refs;
    for (size_t i = 0; i < n_refs; i++)
        if (warm_plan_ref(w, i, platforms, n_platforms, err) != 0) {
            if (!err->body) answer_error(err, 500, "UNKNOWN", "%s: out of memory", refs[i]);
            cachectl_warm_free(w);
            return NULL;
        }
    log_info("cache warm: %zu images, %zu blobs and manifests", n_refs, w->n);
    return w;
}

char *cachectl_warm_next(cachectl_warm *w, size_t *len) {
    if (w->done) return NULL;
    bool oom = false;
    json_value *o = json_new_object();
    if (!o) return NULL;
    if (w->next == w->n) {
        w->done = true;
        put(o, "done", json_new_bool(true), &oom);
        put(o, "blobs", json_new_uint64(w->n), &oom);
        put(o, "fetched", json_new_uint64(w->fetched), &oom);
        put(o, "cached", json_new_uint64(w->cached), &oom);
        put(o, "failed", json_new_uint64(w->failed), &oom);
        put(o, "bytes", json_new_uint64(w->bytes), &oom);
        log_info("cache warm done: %zu blobs, %zu fetched (%llu bytes), %zu were cached, %zu failed", w->n, w->fetched,
                 (unsigned long long)w->bytes, w->cached, w->failed);
    } else {
        warm_item *it = &w->items[w->next++];
        const char *state = "cached";
        char why[1100] = "";
        if (it->manifest || store_blob_exists(w->env->st, it->digest)) {
            w->cached++;
        } else {
            int now_cached = 0;
            fetch *x =
                fetch_blob(w->env->fetches, it->u, it->repository, it->digest, it->size, &now_cached, why, sizeof why);
            fetch_error fe = {0};
            if (!x && now_cached) {
                w->cached++;
            } else if (!x || fetch_wait_done(x, &fe) != 0) {
                if (x) snprintf(why, sizeof why, "%s", fe.message);
                state = "failed";
                w->failed++;
            } else {
                state = "fetched";
                w->fetched++;
                if (it->size > 0) w->bytes += (uint64_t)it->size;
            }
            if (x) fetch_release(x);
        }
        put(o, "ref", json_new_string(w->refs[it->ref]), &oom);
        put(o, "digest", json_new_string(it->digest), &oom);
        put(o, "size", json_new_int64(it->size), &oom);
        put(o, "state", json_new_string(state), &oom);
        if (why[0] && strcmp(state, "failed") == 0) {
            put(o, "error", json_new_string(why), &oom);
            log_warn("cache warm %s: %s: %s", w->refs[it->ref], it->digest, why);
        }
    }
    char *text = oom ? NULL : json_serialize(o, len);
    json_free(o);
    if (!text) return NULL;
    char *line = realloc(text, *len + 2);
    if (!line) {
        free(text);
        return NULL;
    }
    line[(*len)++] = '\n';
    line[*len] = '\0';
    return line;
}

void cachectl_warm_free(cachectl_warm *w) {
    if (!w) return;
    w->env->release(w->env->ud, &w->g);
    for (size_t i = 0; i < w->n_refs; i++) free(w->refs[i]);
    free(w->refs);
    free(w->items);
    free(w);
}
