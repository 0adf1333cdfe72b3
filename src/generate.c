#include "regfacade/generate.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "regfacade/cluster.h"
#include "regfacade/digest.h"
#include "regfacade/image.h"
#include "regfacade/json.h"
#include "regfacade/log.h"
#include "regfacade/oci_error.h"
#include "regfacade/ref.h"

#define CONFIG_BLOB_MAX (16 * 1024 * 1024)

/* The stack the decision asks for ({"base"} when resolve gave none). */
static const layer_spec *stack_of(const policy_resolution *res, size_t *n) {
    static const layer_spec base_only = {.kind = LAYER_BASE};
    if (res->has_layers) {
        *n = res->n_layers;
        return res->layers;
    }
    *n = 1;
    return &base_only;
}

void generate_scope(store_scope *out, const upstream *u, const char *repository, const char *name) {
    store_scope from;
    fetch_scope(&from, u, repository);
    store_scope_generated(out, &from, name);
}

bool generate_needed(const generate_env *env, const policy_resolution *res) {
    if (policy_has_rewrite(env->pol) || res->n_platforms > 0) return true;
    if (!res->has_layers) return false;
    return !(res->n_layers == 1 && res->layers[0].kind == LAYER_BASE && res->layers[0].n_platforms == 0);
}

static bool is_index(const char *mt) { return strcmp(mt, MT_OCI_INDEX) == 0 || strcmp(mt, MT_DOCKER_LIST) == 0; }

void generate_platform_of_config(const json_value *cfg, char *out, size_t outlen) {
    const char *os = json_object_get_string(cfg, "os"), *arch = json_object_get_string(cfg, "architecture");
    const char *variant = json_object_get_string(cfg, "variant");
    snprintf(out, outlen, "%s/%s%s%s", os ? os : "linux", arch ? arch : "amd64", variant ? "/" : "",
             variant ? variant : "");
}

void generate_platform_of_entry(const json_value *entry, char *out, size_t outlen) {
    const json_value *p = json_object_get(entry, "platform");
    const char *os = json_object_get_string(p, "os"), *arch = json_object_get_string(p, "architecture");
    const char *variant = json_object_get_string(p, "variant");
    snprintf(out, outlen, "%s/%s%s%s", os ? os : "unknown", arch ? arch : "unknown", variant ? "/" : "",
             variant ? variant : "");
}

/* The OCI error code c as a static string (fetch_error.code is not copied);
 * "UNKNOWN" when it is none of the spec's codes. */
static const char *static_code(const char *c) {
    const char *k = oci_error_code_known(c);
    return k ? k : "UNKNOWN";
}

/* Blobs of an index's children, stored only once the whole index is
 * assembled: a platform that fails leaves nothing half-built behind. */
typedef struct {
    char digest[80];
    char *bytes;
    size_t len;
} pending_blob;
typedef struct {
    pending_blob *items;
    size_t n;
} pending;

/* Takes *bytes (sets it NULL). 0, or -1 when out of memory. */
static int pending_add(pending *p, const char *digest, char **bytes, size_t len) {
    pending_blob *n = realloc(p->items, (p->n + 1) * sizeof *n);
    if (!n) return -1;
    p->items = n;
    snprintf(n[p->n].digest, sizeof n[p->n].digest, "%s", digest);
    n[p->n].bytes = *bytes;
    n[p->n].len = len;
    p->n++;
    *bytes = NULL;
    return 0;
}

static void pending_clear(pending *p) {
    for (size_t i = 0; i < p->n; i++) free(p->items[i].bytes);
    free(p->items);
    memset(p, 0, sizeof *p);
}

static int pending_store(store *st, const pending *p, char *err, size_t errlen) {
    for (size_t i = 0; i < p->n; i++)
        if (store_put(st, p->items[i].digest, p->items[i].bytes, p->items[i].len, err, errlen) != 0) return -1;
    return 0;
}

/* The blobs an assembly made that only regfacade has (manifests, index,
 * configs, file layers): recorded with the name and tag they were made for
 * (store_made_add), so that one evicted can be generated again. */
typedef struct {
    char (*d)[80];
    size_t n;
} made_list;

static int made_add(made_list *m, const char *digest) {
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->d[i], digest) == 0) return 0;
    char(*n)[80] = realloc(m->d, (m->n + 1) * sizeof *n);
    if (!n) return -1;
    m->d = n;
    snprintf(m->d[m->n++], 80, "%s", digest);
    return 0;
}

/* Are the made parts of the generated manifest digest (and of its children,
 * for an index) all in the store? A part is "made" when it has a record;
 * the upstream's own blobs are fetched when asked for, so they do not count. */
static bool generated_complete(const generate_env *env, const char *digest, int depth, char *missing, size_t mlen) {
    char *bytes = NULL, err[512], jerr[128];
    size_t len = 0;
    if (store_blob_read(env->st, digest, env->cfg->manifest_max_bytes, &bytes, &len, err, sizeof err) != 1) {
        snprintf(missing, mlen, "%s", digest);
        return false;
    }
    json_value *m = json_parse(bytes, len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    free(bytes);
    bool ok = m != NULL;
    const json_value *children = json_object_get(m, "manifests"), *layers = json_object_get(m, "layers");
    const json_value *lists[] = {children, layers};
    for (size_t l = 0; ok && l < 2; l++) {
        for (size_t i = 0; ok && lists[l] && lists[l]->type == JSON_ARRAY && i < lists[l]->count; i++) {
            const char *d = json_object_get_string(lists[l]->items[i], "digest");
            if (!d || !ref_is_sha256_digest(d) || !store_made_get(env->st, d, NULL, NULL, 0)) continue;
            if (l == 0 && depth < 1)
                ok = generated_complete(env, d, depth + 1, missing, mlen);
            else if (!store_blob_exists(env->st, d)) {
                snprintf(missing, mlen, "%s", d);
                ok = false;
            }
        }
    }
    const char *cd = json_object_get_string(json_object_get(m, "config"), "digest");
    if (ok && cd && ref_is_sha256_digest(cd) && store_made_get(env->st, cd, NULL, NULL, 0) &&
        !store_blob_exists(env->st, cd)) {
        snprintf(missing, mlen, "%s", cd);
        ok = false;
    }
    json_free(m);
    return ok;
}

/* Same JSON text (the serializer is deterministic)? */
static bool same_tree(const json_value *a, const json_value *b) {
    size_t la = 0, lb = 0;
    char *sa = json_serialize(a, &la), *sb = json_serialize(b, &lb);
    bool same = sa && sb && la == lb && memcmp(sa, sb, la) == 0;
    free(sa);
    free(sb);
    return same;
}

int generate_assemble(policy *pol, const policy_request *req, const char *what, const json_value *base,
                      const char *base_bytes, size_t base_len, const json_value *cfg, const image_layer *stack,
                      size_t n, char **manifest, size_t *manifest_len, char manifest_digest[80], char **config,
                      size_t *config_len, char config_digest[80], bool *unchanged, bool *failed, fetch_error *e) {
    char err[1024];
    json_value *man_out = NULL, *cfg_out = NULL;
    int rc = -1;
    *manifest = *config = NULL;
    *manifest_len = *config_len = 0;
    *unchanged = false;
    *failed = true;
    if (image_assemble(base, cfg, stack, n, &man_out, &cfg_out, err, sizeof err) != 0) {
        fetch_error_set(e, 502, "MANIFEST_INVALID", "assembling %s: %s", what, err);
        goto out;
    }
    policy_error pe;
    if (policy_rewrite(pol, req, &man_out, &cfg_out, stack, n, &pe) != 0) {
        /* e->code must outlive pe (a local): a static string. */
        fetch_error_set(e, pe.status, static_code(pe.code), "%s", pe.message);
        /* A refusal's headers go to the client as the policy gave them. */
        snprintf(e->retry_after, sizeof e->retry_after, "%s", pe.retry_after);
        snprintf(e->challenge, sizeof e->challenge, "%s", pe.challenge);
        *failed = pe.failed;
        goto out;
    }
    /* Nothing changed (a stack of "base" alone, left as it was by the
     * rewrite hook): the upstream's own bytes, so a mirrored image keeps its
     * digest (serializing again may differ, e.g. by a trailing newline). */
    if (same_tree(man_out, base) && same_tree(cfg_out, cfg)) {
        *unchanged = true;
        if (!(*manifest = malloc(base_len ? base_len : 1)) ||
            digest_bytes(base_bytes, base_len, manifest_digest) != 0) {
            fetch_error_set(e, 500, "UNKNOWN", "out of memory");
            goto out;
        }
        memcpy(*manifest, base_bytes, base_len);
        *manifest_len = base_len;
    } else if (image_finish(man_out, cfg_out, config, config_len, config_digest, manifest, manifest_len,
                            manifest_digest, err, sizeof err) != 0) {
        fetch_error_set(e, 500, "UNKNOWN", "finishing %s: %s", what, err);
        goto out;
    }
    rc = 0;
    *failed = false;
out:
    if (rc != 0) {
        free(*manifest);
        free(*config);
        *manifest = *config = NULL;
    }
    json_free(man_out);
    json_free(cfg_out);
    return rc;
}

/* Link what an assembled image has to gen, the scope of the name it is
 * generated for: layers added from elsewhere with their origin, then the
 * manifest with everything it references. */
static int link_generated(const generate_env *env, const store_scope *gen, const layer_stack *stack, const char *digest,
                          const char *bytes, size_t len, fetch_error *e) {
    char err[512] = "";
    int rc = 0;
    for (size_t i = 0; i < stack->n && rc == 0; i++) {
        const image_layer *it = &stack->items[i];
        if (!it->is_base && it->digest && it->origin_upstream && it->origin_repository)
            rc = store_link_put(env->st, gen, it->digest, it->origin_upstream, it->origin_repository, err, sizeof err);
    }
    if (rc == 0) rc = manifest_link(env->st, gen, digest, bytes, len, err, sizeof err);
    if (rc != 0) fetch_error_set(e, 500, "UNKNOWN", "linking the assembled image: %s", err);
    return rc;
}

/* Assemble one image manifest (not an index) and store it (or, with pend,
 * leave its config and manifest in pend for the caller to store). On
 * success out_digest/out_size/out_mt describe the stored manifest. */
static int assemble_one(const generate_env *env, const policy_request *req, const policy_resolution *res, upstream *u,
                        const store_scope *gen, const char *base_bytes, size_t base_len, const char *base_mt,
                        char out_digest[80], uint64_t *out_size, manifest *keep, pending *pend, made_list *made,
                        fetch_error *e) {
    char jerr[256], err[1024];
    json_value *base = json_parse(base_bytes, base_len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    if (!base) {
        fetch_error_set(e, 502, "MANIFEST_INVALID", "base manifest of %s: %s", res->repository, jerr);
        return -1;
    }
    const char *cfg_digest = json_object_get_string(json_object_get(base, "config"), "digest");
    int64_t cfg_size = -1; /* the descriptor's size: what the fetch must bring */
    if (!json_get_int64(json_object_get(json_object_get(base, "config"), "size"), &cfg_size) || cfg_size < 0)
        cfg_size = -1;
    if (!cfg_digest || !ref_is_sha256_digest(cfg_digest)) {
        json_free(base);
        fetch_error_set(e, 502, "MANIFEST_INVALID", "base manifest of %s has no config digest", res->repository);
        return -1;
    }
    char *cfg_bytes = NULL;
    size_t cfg_len = 0;
    if (fetch_blob_bytes(env->fetches, u, res->repository, cfg_digest, cfg_size, CONFIG_BLOB_MAX, &cfg_bytes, &cfg_len,
                         e) != 0) {
        json_free(base);
        return -1;
    }
    json_value *cfg = json_parse(cfg_bytes, cfg_len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    free(cfg_bytes);
    if (!cfg) {
        json_free(base);
        fetch_error_set(e, 502, "MANIFEST_INVALID", "config %s of %s: %s", cfg_digest, res->repository, jerr);
        return -1;
    }
    char platform[128];
    generate_platform_of_config(cfg, platform, sizeof platform);
    size_t n;
    const layer_spec *specs = stack_of(res, &n);
    layer_stack stack;
    if (layers_resolve(&env->layers, specs, n, platform, res->upstream, res->repository, &stack, e) != 0) {
        json_free(base);
        json_free(cfg);
        return -1;
    }
    int rc = -1;
    char *cb = NULL, *mb = NULL;
    size_t cl = 0, ml = 0;
    char cd[80], md[80];
    bool unchanged = false, failed = false;
    char what[400];
    snprintf(what, sizeof what, "%s for %s", res->repository, platform);
    if (generate_assemble(env->pol, req, what, base, base_bytes, base_len, cfg, stack.items, stack.n, &mb, &ml, md, &cb,
                          &cl, cd, &unchanged, &failed, e) != 0)
        goto out;
    if (ml > env->cfg->manifest_max_bytes) {
        fetch_error_set(e, 500, "MANIFEST_INVALID",
                        "the assembled manifest is %zu bytes, over limits.manifest_max_bytes", ml);
        goto out;
    }
    snprintf(out_digest, 80, "%s", md);
    *out_size = ml;
    if (!unchanged && (made_add(made, md) != 0 || made_add(made, cd) != 0)) {
        fetch_error_set(e, 500, "UNKNOWN", "out of memory");
        goto out;
    }
    for (size_t i = 0; i < stack.n; i++)
        if (stack.items[i].source && strcmp(stack.items[i].source, "file") == 0 &&
            made_add(made, stack.items[i].digest) != 0) {
            fetch_error_set(e, 500, "UNKNOWN", "out of memory");
            goto out;
        }
    if (pend && link_generated(env, gen, &stack, md, mb, ml, e) != 0) goto out;
    if (pend) {
        if ((!unchanged && pending_add(pend, cd, &cb, cl) != 0) || pending_add(pend, md, &mb, ml) != 0) {
            fetch_error_set(e, 500, "UNKNOWN", "out of memory");
            goto out;
        }
    } else if ((!unchanged && store_put(env->st, cd, cb, cl, err, sizeof err) != 0) ||
               store_put(env->st, md, mb, ml, err, sizeof err) != 0) {
        fetch_error_set(e, 500, "UNKNOWN", "storing the assembled image: %s", err);
        goto out;
    }
    if (!pend && link_generated(env, gen, &stack, md, mb, ml, e) != 0) goto out;
    if (keep) {
        keep->data = mb;
        keep->len = ml;
        snprintf(keep->digest, sizeof keep->digest, "%s", md);
        snprintf(keep->media_type, sizeof keep->media_type, "%s", base_mt);
        mb = NULL;
    }
    rc = 0;
out:
    free(cb);
    free(mb);
    json_free(base);
    json_free(cfg);
    layer_stack_clear(&stack);
    return rc;
}

static int assemble_index(const generate_env *env, const policy_request *req, const policy_resolution *res, upstream *u,
                          const store_scope *gen, const manifest *base, manifest *out, made_list *made,
                          fetch_error *e) {
    char jerr[256], err[512];
    json_value *idx = json_parse(base->data, base->len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    json_value *list = idx ? json_object_get(idx, "manifests") : NULL;
    if (!list || list->type != JSON_ARRAY) {
        json_free(idx);
        fetch_error_set(e, 502, "MANIFEST_INVALID", "index of %s: %s", res->repository,
                        idx ? "no manifests array" : jerr);
        return -1;
    }
    manifest_env menv = {.st = env->st, .cfg = env->cfg};
    bool changed = false; /* any entry dropped or rewritten */
    pending pend = {0};   /* the children's blobs, stored once all are built */
    for (size_t i = 0; i < list->count;) {
        json_value *entry = list->items[i];
        char platform[128];
        generate_platform_of_entry(entry, platform, sizeof platform);
        if (res->n_platforms && !layers_platform_matches(res->platforms, res->n_platforms, platform)) {
            /* Dropped by the policy: remove from the index. */
            json_free(entry);
            memmove(&list->items[i], &list->items[i + 1], (list->count - i - 1) * sizeof *list->items);
            list->count--;
            changed = true;
            continue;
        }
        const char *child_digest = json_object_get_string(entry, "digest");
        if (strcmp(platform, "unknown/unknown") == 0 || !child_digest) {
            i++; /* attestations and the like stay as they are */
            continue;
        }
        manifest child;
        if (manifest_get(&menv, u, res->repository, child_digest, &child, e) != 0) {
            json_free(idx);
            pending_clear(&pend);
            return -1;
        }
        if (is_index(child.media_type)) {
            manifest_clear(&child);
            i++;
            continue;
        }
        char nd[80];
        uint64_t ns = 0;
        int rc =
            assemble_one(env, req, res, u, gen, child.data, child.len, child.media_type, nd, &ns, NULL, &pend, made, e);
        manifest_clear(&child);
        if (rc != 0) {
            json_free(idx);
            pending_clear(&pend);
            return -1;
        }
        if (strcmp(nd, child_digest) != 0) changed = true;
        if (json_object_set(entry, "digest", json_new_string(nd)) != 0 ||
            json_object_set(entry, "size", json_new_uint64(ns)) != 0) {
            json_free(idx);
            pending_clear(&pend);
            fetch_error_set(e, 500, "UNKNOWN", "out of memory");
            return -1;
        }
        i++;
    }
    if (list->count == 0) {
        json_free(idx);
        pending_clear(&pend);
        fetch_error_set(e, 404, "MANIFEST_UNKNOWN", "the policy's platforms leave no manifest in the index of %s",
                        res->repository);
        return -1;
    }
    size_t len;
    char *bytes = NULL;
    if (!changed) { /* every child as it was: the upstream's index bytes as they are */
        len = base->len;
        if ((bytes = malloc(len ? len : 1))) memcpy(bytes, base->data, len);
    } else {
        bytes = json_serialize(idx, &len);
    }
    json_free(idx);
    char d[DIGEST_STRING_LEN];
    err[0] = '\0';
    int stored = bytes ? pending_store(env->st, &pend, err, sizeof err) : -1;
    pending_clear(&pend);
    if (!bytes || stored != 0 || digest_bytes(bytes, len, d) != 0 ||
        store_put(env->st, d, bytes, len, err, sizeof err) != 0) {
        free(bytes);
        fetch_error_set(e, 500, "UNKNOWN", "storing the assembled index: %s", bytes ? err : "out of memory");
        return -1;
    }
    if (manifest_link(env->st, gen, d, bytes, len, err, sizeof err) != 0) {
        free(bytes);
        fetch_error_set(e, 500, "UNKNOWN", "linking the assembled index: %s", err);
        return -1;
    }
    out->data = bytes;
    out->len = len;
    snprintf(out->digest, sizeof out->digest, "%s", d);
    snprintf(out->media_type, sizeof out->media_type, "%s", base->media_type);
    if (changed && made_add(made, d) != 0) {
        fetch_error_set(e, 500, "UNKNOWN", "out of memory");
        return -1;
    }
    return 0;
}

/* Everything that decides the generated image, hashed. */
/* The rewrite hook sees req: the name and tag the client asked for are part
 * of the key, so two names never share an image the hook told apart. (Hooks
 * must not make images depend on the client: that would not be cacheable.) */
static int decision_key(const generate_env *env, const policy_request *req, const policy_resolution *res,
                        const manifest *base, char key[65], fetch_error *e) {
    digest_ctx *d = digest_new();
    if (!d) {
        fetch_error_set(e, 500, "UNKNOWN", "out of memory");
        return -1;
    }
    const char *parts[] = {"regfacade-generate-v1",
                           base->digest,
                           policy_fingerprint(env->pol),
                           res->upstream,
                           res->repository,
                           res->fingerprint ? res->fingerprint : "",
                           req->repository,
                           req->reference ? req->reference : ""};
    for (size_t i = 0; i < sizeof parts / sizeof *parts; i++) digest_update(d, parts[i], strlen(parts[i]) + 1);
    size_t n;
    const layer_spec *specs = stack_of(res, &n);
    int rc = layers_key(&env->layers, specs, n, d, e);
    char full[DIGEST_STRING_LEN];
    if (rc == 0 && digest_final(d, full) == 0) snprintf(key, 65, "%s", full + 7);
    digest_free(d);
    return rc;
}

int generate_image(const generate_env *env, const policy_request *req, const policy_resolution *res, upstream *u,
                   const manifest *base, manifest *out, fetch_error *e) {
    memset(out, 0, sizeof *out);
    char key[65], digest[100], err[512];
    if (decision_key(env, req, res, base, key, e) != 0) return -1;
    /* The image belongs to the name it is generated for (store.h). */
    store_scope gen;
    generate_scope(&gen, u, res->repository, req->repository ? req->repository : "");
    if (store_generated_get(env->st, key, digest, sizeof digest) == 1 && ref_is_sha256_digest(digest)) {
        /* Built before: served as stored while every part it made is still
         * cached and it is linked to this name; a part evicted meanwhile
         * (config, file layer, index child) is made again by assembling
         * again (the same bytes), and a missing link is written again. */
        manifest_env menv = {.st = env->st, .cfg = env->cfg, .generated = &gen};
        char missing[80] = "";
        if (!generated_complete(env, digest, 0, missing, sizeof missing)) {
            log_info("generated image %s for %s:%s lost %s from the cache; generating it again", digest,
                     req->repository, req->reference ? req->reference : "", missing);
        } else if (store_link_get(env->st, &gen, digest, NULL, 0, NULL, 0) == 1 &&
                   manifest_get(&menv, u, res->repository, digest, out, e) == 0) {
            return 0;
        }
    }
    int rc;
    made_list made = {0};
    if (is_index(base->media_type)) {
        rc = assemble_index(env, req, res, u, &gen, base, out, &made, e);
    } else {
        uint64_t size;
        rc = assemble_one(env, req, res, u, &gen, base->data, base->len, base->media_type, digest, &size, out, NULL,
                          &made, e);
    }
    if (rc != 0) {
        free(made.d);
        log_error("generating %s from %s@%s failed: %s", req->repository, res->repository, base->digest, e->message);
        return -1;
    }
    /* What it made remembers this name and tag (generated for a tag only). */
    for (size_t i = 0; req->reference && ref_valid_tag(req->reference) && i < made.n; i++) {
        if (store_made_add(env->st, made.d[i], req->repository, req->reference, err, sizeof err) != 0)
            log_error("%s", err);
        /* And the cluster's record, with the base: another replica asked
         * for this digest generates it again (cluster.h). */
        cluster_made_add(store_cluster(env->st), made.d[i], req->repository, req->reference, base->digest);
    }
    free(made.d);
    if (store_generated_put(env->st, key, out->digest, err, sizeof err) != 0) log_error("%s", err);
    return 0;
}
