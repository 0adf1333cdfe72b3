/*
 * image: assembling an image from an upstream image plus added layers (see
 * include/regfacade/image.h).
 *
 * Everything works on clones of the base trees: the base manifest and config
 * are never changed, and every member this unit does not rewrite is copied
 * with its key, its position and its bytes (json_clone keeps number text).
 * Only three members are replaced in place (json_object_set keeps their
 * position): manifest "layers", config "rootfs.diff_ids" and config
 * "history". No I/O, no globals.
 */
#include "regfacade/image.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "regfacade/errmsg.h"
#include "regfacade/digest.h"
#include "regfacade/ref.h"

typedef enum { FAMILY_OCI, FAMILY_DOCKER } family;

static bool streq(const char *a, const char *b) { return a && b && strcmp(a, b) == 0; }

/* ------------------------------------------------------------------------ */
/* Media types                                                              */

/* The family of a manifest media type; false when it is none we know. NULL
 * (no mediaType field) is OCI: an OCI manifest may leave it out. */
static bool family_of(const char *manifest_media_type, family *f) {
    if (!manifest_media_type || streq(manifest_media_type, IMAGE_MT_OCI_MANIFEST) ||
        streq(manifest_media_type, IMAGE_MT_OCI_INDEX)) {
        *f = FAMILY_OCI;
        return true;
    }
    if (streq(manifest_media_type, IMAGE_MT_DOCKER_MANIFEST) || streq(manifest_media_type, IMAGE_MT_DOCKER_LIST)) {
        *f = FAMILY_DOCKER;
        return true;
    }
    return false;
}

const char *image_layer_media_type_for(const char *manifest_media_type, const char *layer_media_type) {
    family f;
    if (!layer_media_type || !family_of(manifest_media_type, &f)) return layer_media_type;
    const char *t = layer_media_type;
    if (f == FAMILY_DOCKER) {
        if (streq(t, IMAGE_MT_OCI_LAYER_GZIP)) return IMAGE_MT_DOCKER_LAYER_GZIP;
        if (streq(t, IMAGE_MT_OCI_LAYER_TAR)) return IMAGE_MT_DOCKER_LAYER_TAR;
        if (streq(t, IMAGE_MT_OCI_LAYER_ND_TAR) || streq(t, IMAGE_MT_OCI_LAYER_ND_GZIP) ||
            streq(t, IMAGE_MT_OCI_LAYER_ND_ZSTD))
            return IMAGE_MT_DOCKER_LAYER_FOREIGN;
        return t; /* Docker types, OCI zstd (Docker has none), unknown types */
    }
    if (streq(t, IMAGE_MT_DOCKER_LAYER_GZIP)) return IMAGE_MT_OCI_LAYER_GZIP;
    if (streq(t, IMAGE_MT_DOCKER_LAYER_TAR)) return IMAGE_MT_OCI_LAYER_TAR;
    if (streq(t, IMAGE_MT_DOCKER_LAYER_FOREIGN)) return IMAGE_MT_OCI_LAYER_ND_GZIP;
    return t;
}

/* ------------------------------------------------------------------------ */
/* Checking the inputs                                                      */

/* The base manifest's family, or -1 with err: an index, a list or an
 * unknown media type cannot be assembled. */
static int base_family(const json_value *m, family *f, const char **mt, char *err, size_t errlen) {
    if (!m || m->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "base manifest: not a JSON object");
        return -1;
    }
    json_value *v = json_object_get(m, "mediaType");
    *mt = NULL;
    if (v && v->type != JSON_NULL) {
        if (v->type != JSON_STRING) {
            errmsg_set(err, errlen, "base manifest: mediaType is not a string");
            return -1;
        }
        *mt = v->str;
    }
    if (streq(*mt, IMAGE_MT_OCI_INDEX) || streq(*mt, IMAGE_MT_DOCKER_LIST) ||
        (!*mt && json_object_get(m, "manifests") && !json_object_get(m, "layers"))) {
        errmsg_set(err, errlen, "base manifest: mediaType %s is an index; assemble each platform's manifest",
                   *mt ? *mt : "(none, but it has \"manifests\")");
        return -1;
    }
    if (!family_of(*mt, f)) {
        errmsg_set(err, errlen, "base manifest: mediaType \"%s\" is not an image manifest type (want %s or %s)", *mt,
                   IMAGE_MT_OCI_MANIFEST, IMAGE_MT_DOCKER_MANIFEST);
        return -1;
    }
    return 0;
}

/* A descriptor size: a JSON integer in [0, INT64_MAX] (OCI sizes are int64). */
static bool valid_size(const json_value *v) {
    uint64_t u;
    return v && json_get_uint64(v, &u) && u <= (uint64_t)INT64_MAX;
}

/* Checks base manifest layer descriptor i. */
static int check_base_layer(const json_value *d, size_t i, char *err, size_t errlen) {
    if (!d || d->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "base manifest: layers[%zu] is not an object", i);
        return -1;
    }
    if (!json_object_get_string(d, "mediaType")) {
        errmsg_set(err, errlen, "base manifest: layers[%zu].mediaType is missing or not a string", i);
        return -1;
    }
    const char *dg = json_object_get_string(d, "digest");
    if (!dg || !ref_valid_digest(dg)) {
        errmsg_set(err, errlen, "base manifest: layers[%zu].digest is missing or not a valid digest", i);
        return -1;
    }
    if (!valid_size(json_object_get(d, "size"))) {
        errmsg_set(err, errlen, "base manifest: layers[%zu].size is missing or not an integer in [0, 2^63-1]", i);
        return -1;
    }
    return 0;
}

/* Checks stack entry i (an added layer). Messages count stack entries from
 * 1, as the policy's Lua array does; JSON arrays count from 0. */
static int check_added_layer(const image_layer *l, size_t i, char *err, size_t errlen) {
    i++;
    if (!l->media_type || !l->media_type[0]) {
        errmsg_set(err, errlen, "stack[%zu]: media_type is missing", i);
        return -1;
    }
    if (!l->digest || !ref_valid_digest(l->digest)) {
        errmsg_set(err, errlen, "stack[%zu]: digest \"%s\" is not a valid digest", i, l->digest ? l->digest : "(none)");
        return -1;
    }
    if (!l->diff_id || !ref_valid_digest(l->diff_id)) {
        errmsg_set(err, errlen, "stack[%zu] (layer %s): diff_id \"%s\" is not a valid digest", i, l->digest,
                   l->diff_id ? l->diff_id : "(none)");
        return -1;
    }
    if (l->size > (uint64_t)INT64_MAX) {
        errmsg_set(err, errlen, "stack[%zu] (layer %s): size %" PRIu64 " is larger than 2^63-1", i, l->digest, l->size);
        return -1;
    }
    if (l->urls) {
        if (l->urls->type != JSON_ARRAY) {
            errmsg_set(err, errlen, "stack[%zu] (layer %s): urls is not an array", i, l->digest);
            return -1;
        }
        for (size_t k = 0; k < l->urls->count; k++)
            if (l->urls->items[k]->type != JSON_STRING) {
                errmsg_set(err, errlen, "stack[%zu] (layer %s): urls[%zu] is not a string", i, l->digest, k);
                return -1;
            }
    }
    if (l->annotations) {
        if (l->annotations->type != JSON_OBJECT) {
            errmsg_set(err, errlen, "stack[%zu] (layer %s): annotations is not an object", i, l->digest);
            return -1;
        }
        for (size_t k = 0; k < l->annotations->count; k++)
            if (l->annotations->items[k]->type != JSON_STRING) {
                errmsg_set(err, errlen, "stack[%zu] (layer %s): annotations[\"%s\"] is not a string", i, l->digest,
                           l->annotations->keys[k]);
                return -1;
            }
    }
    return 0;
}

/* Whether a history entry stands for no layer. */
static bool history_is_empty_layer(const json_value *h) {
    json_value *e = json_object_get(h, "empty_layer");
    return e && e->type == JSON_TRUE;
}

/* ------------------------------------------------------------------------ */
/* Building                                                                 */

/* The order in which an added descriptor's mediaType, size and digest go:
 * as in the template descriptor (a base layer, else the config
 * descriptor), the missing ones after in the default order
 * mediaType, size, digest. */
static void descriptor_order(const json_value *tmpl, const char *order[3]) {
    static const char *const def[3] = {"mediaType", "size", "digest"};
    size_t n = 0;
    if (tmpl && tmpl->type == JSON_OBJECT)
        for (size_t i = 0; i < tmpl->count && n < 3; i++)
            for (size_t k = 0; k < 3; k++)
                if (strcmp(tmpl->keys[i], def[k]) == 0) {
                    bool seen = false;
                    for (size_t j = 0; j < n; j++) seen = seen || order[j] == def[k];
                    if (!seen) order[n++] = def[k];
                }
    for (size_t k = 0; k < 3 && n < 3; k++) {
        bool seen = false;
        for (size_t j = 0; j < n; j++) seen = seen || order[j] == def[k];
        if (!seen) order[n++] = def[k];
    }
}

/* A new descriptor for an added layer. NULL on allocation failure. */
static json_value *added_descriptor(const image_layer *l, const char *manifest_mt, const char *const order[3]) {
    json_value *d = json_new_object();
    if (!d) return NULL;
    for (size_t k = 0; k < 3; k++) {
        json_value *v;
        if (strcmp(order[k], "mediaType") == 0)
            v = json_new_string(image_layer_media_type_for(manifest_mt, l->media_type));
        else if (strcmp(order[k], "size") == 0)
            v = json_new_uint64(l->size);
        else
            v = json_new_string(l->digest);
        if (json_object_set(d, order[k], v) != 0) goto fail;
    }
    if (l->urls && json_object_set(d, "urls", json_clone(l->urls)) != 0) goto fail;
    if (l->annotations && json_object_set(d, "annotations", json_clone(l->annotations)) != 0) goto fail;
    return d;
fail:
    json_free(d);
    return NULL;
}

/* A new history entry for an added layer. NULL on allocation failure. */
static json_value *added_history(const image_layer *l, const json_value *created) {
    json_value *h = json_new_object();
    if (!h) return NULL;
    if (created && created->type != JSON_NULL && json_object_set(h, "created", json_clone(created)) != 0) goto fail;
    json_value *by;
    if (l->created_by) {
        by = json_new_string(l->created_by);
    } else {
        char text[64 + REF_DIGEST_MAX];
        snprintf(text, sizeof text, "regfacade: added layer %s", l->digest);
        by = json_new_string(text);
    }
    if (json_object_set(h, "created_by", by) != 0) goto fail;
    if (l->comment && json_object_set(h, "comment", json_new_string(l->comment)) != 0) goto fail;
    return h;
fail:
    json_free(h);
    return NULL;
}

/* Appends to arr, taking item; -1 on failure (item freed). */
static int push(json_value *arr, json_value *item) { return item ? json_array_append(arr, item) : -1; }

int image_assemble(const json_value *base_manifest, const json_value *base_config, const image_layer *stack, size_t n,
                   json_value **out_manifest, json_value **out_config, char *err, size_t errlen) {
    json_value *man = NULL, *cfg = NULL, *layers = NULL, *diff_ids = NULL, *history = NULL;
    if (out_manifest) *out_manifest = NULL;
    if (out_config) *out_config = NULL;
    if (!out_manifest || !out_config || (n && !stack)) {
        errmsg_set(err, errlen, "image_assemble: missing argument");
        return -1;
    }

    /* The base manifest. */
    family fam;
    const char *manifest_mt;
    if (base_family(base_manifest, &fam, &manifest_mt, err, errlen) != 0) return -1;
    const json_value *base_layers = json_object_get(base_manifest, "layers");
    if (!base_layers || base_layers->type != JSON_ARRAY) {
        errmsg_set(err, errlen, "base manifest: layers is missing or not an array");
        return -1;
    }
    for (size_t i = 0; i < base_layers->count; i++)
        if (check_base_layer(base_layers->items[i], i, err, errlen) != 0) return -1;
    const json_value *config_desc = json_object_get(base_manifest, "config");
    if (!config_desc || config_desc->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "base manifest: config is missing or not an object");
        return -1;
    }

    /* The base config. */
    if (!base_config || base_config->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "base config: not a JSON object");
        return -1;
    }
    const json_value *rootfs = json_object_get(base_config, "rootfs");
    if (!rootfs || rootfs->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "base config: rootfs is missing or not an object");
        return -1;
    }
    const json_value *base_diff_ids = json_object_get(rootfs, "diff_ids");
    if (!base_diff_ids || base_diff_ids->type != JSON_ARRAY) {
        errmsg_set(err, errlen, "base config: rootfs.diff_ids is missing or not an array");
        return -1;
    }
    if (base_diff_ids->count != base_layers->count) {
        errmsg_set(err, errlen, "base config has %zu diff_ids for %zu layers", base_diff_ids->count,
                   base_layers->count);
        return -1;
    }
    for (size_t i = 0; i < base_diff_ids->count; i++) {
        const json_value *d = base_diff_ids->items[i];
        if (d->type != JSON_STRING || !ref_valid_digest(d->str)) {
            errmsg_set(err, errlen, "base config: rootfs.diff_ids[%zu] is not a digest string", i);
            return -1;
        }
    }
    const json_value *base_history = json_object_get(base_config, "history");
    if (base_history && base_history->type == JSON_NULL) base_history = NULL; /* null: no history, so none is added */
    if (base_history) {
        if (base_history->type != JSON_ARRAY) {
            errmsg_set(err, errlen, "base config: history is not an array");
            return -1;
        }
        for (size_t i = 0; i < base_history->count; i++)
            if (base_history->items[i]->type != JSON_OBJECT) {
                errmsg_set(err, errlen, "base config: history[%zu] is not an object", i);
                return -1;
            }
    }

    /* The stack. */
    size_t base_at = SIZE_MAX;
    for (size_t i = 0; i < n; i++) {
        if (stack[i].is_base) {
            if (base_at != SIZE_MAX) {
                errmsg_set(err, errlen, "stack[%zu]: \"base\" appears twice (first at stack[%zu])", i + 1, base_at + 1);
                return -1;
            }
            base_at = i;
        } else if (check_added_layer(&stack[i], i, err, errlen) != 0) {
            return -1;
        }
    }

    /* New arrays. */
    const char *order[3];
    descriptor_order(base_layers->count ? base_layers->items[0] : config_desc, order);
    const json_value *created = json_object_get(base_config, "created");
    layers = json_new_array();
    diff_ids = json_new_array();
    if (!layers || !diff_ids) goto oom;
    if (base_history) {
        history = json_new_array();
        if (!history) goto oom;
        /* Without "base", the base's empty_layer entries (its ENV, CMD,
         * LABEL...) still describe the config, so they stay, first. */
        if (base_at == SIZE_MAX)
            for (size_t i = 0; i < base_history->count; i++)
                if (history_is_empty_layer(base_history->items[i]) &&
                    push(history, json_clone(base_history->items[i])) != 0)
                    goto oom;
    }
    for (size_t i = 0; i < n; i++) {
        const image_layer *l = &stack[i];
        if (l->is_base) {
            for (size_t k = 0; k < base_layers->count; k++)
                if (push(layers, json_clone(base_layers->items[k])) != 0 ||
                    push(diff_ids, json_clone(base_diff_ids->items[k])) != 0)
                    goto oom;
            /* The base's history stays a block, in place, whatever its
             * alignment with the base layers was. */
            if (history)
                for (size_t k = 0; k < base_history->count; k++)
                    if (push(history, json_clone(base_history->items[k])) != 0) goto oom;
            continue;
        }
        if (push(layers, added_descriptor(l, manifest_mt, order)) != 0 ||
            push(diff_ids, json_new_string(l->diff_id)) != 0)
            goto oom;
        if (history && push(history, added_history(l, created)) != 0) goto oom;
    }

    /* Clones with the three members replaced in place. */
    man = json_clone(base_manifest);
    cfg = json_clone(base_config);
    if (!man || !cfg) goto oom;
    int rc = json_object_set(man, "layers", layers);
    layers = NULL;
    if (rc != 0) goto oom;
    rc = json_object_set(json_object_get(cfg, "rootfs"), "diff_ids", diff_ids);
    diff_ids = NULL;
    if (rc != 0) goto oom;
    if (history) {
        rc = json_object_set(cfg, "history", history);
        history = NULL;
        if (rc != 0) goto oom;
    }
    *out_manifest = man;
    *out_config = cfg;
    return 0;
oom:
    errmsg_set(err, errlen, "image_assemble: out of memory");
    json_free(man);
    json_free(cfg);
    json_free(layers);
    json_free(diff_ids);
    json_free(history);
    return -1;
}

int image_finish(json_value *manifest, const json_value *config, char **config_bytes, size_t *config_len,
                 char config_digest[80], char **manifest_bytes, size_t *manifest_len, char manifest_digest[80],
                 char *err, size_t errlen) {
    char *cb = NULL, *mb = NULL;
    size_t cl = 0, ml = 0;
    char cd[DIGEST_STRING_LEN], md[DIGEST_STRING_LEN];
    if (config_bytes) *config_bytes = NULL;
    if (manifest_bytes) *manifest_bytes = NULL;
    if (!manifest || !config || !config_bytes || !config_len || !config_digest || !manifest_bytes || !manifest_len ||
        !manifest_digest) {
        errmsg_set(err, errlen, "image_finish: missing argument");
        return -1;
    }
    if (manifest->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "manifest: not a JSON object");
        return -1;
    }
    if (config->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "config: not a JSON object");
        return -1;
    }
    json_value *desc = json_object_get(manifest, "config");
    if (!desc || desc->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "manifest: config is missing or not an object");
        return -1;
    }
    cb = json_serialize(config, &cl);
    if (!cb || digest_bytes(cb, cl, cd) != 0) goto oom;
    /* The descriptor now names the new config: its digest and size change
     * in place; "urls" and "data" (OCI 1.1 embedded content) would still
     * describe the old config's bytes, so they go. */
    if (json_object_set(desc, "digest", json_new_string(cd)) != 0 ||
        json_object_set(desc, "size", json_new_uint64((uint64_t)cl)) != 0)
        goto oom;
    json_object_remove(desc, "urls");
    json_object_remove(desc, "data");
    mb = json_serialize(manifest, &ml);
    if (!mb || digest_bytes(mb, ml, md) != 0) goto oom;
    *config_bytes = cb;
    *config_len = cl;
    snprintf(config_digest, 80, "%s", cd);
    *manifest_bytes = mb;
    *manifest_len = ml;
    snprintf(manifest_digest, 80, "%s", md);
    return 0;
oom:
    errmsg_set(err, errlen, "image_finish: out of memory");
    free(cb);
    free(mb);
    return -1;
}
