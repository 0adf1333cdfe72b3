/*
 * image: assembling an image from an upstream image plus added layers, on
 * JSON trees (json.h), with no I/O. Pure and deterministic: the same inputs
 * give byte-identical manifest and config in every process.
 *
 * The layer stack lists the final layers in order; an entry with
 * is_base set stands for all of the base image's layers (in their order).
 * A stack without a base entry builds an image of the listed layers alone on
 * the base's config.
 *
 * What changes: manifest "layers" and config "rootfs.diff_ids" follow the
 * stack exactly; config "history" gets one entry per added layer at its
 * position (the base's own entries, empty_layer ones included, stay where
 * they were relative to the base layers; without "base", the base's
 * non-empty entries are dropped and its empty_layer entries kept first);
 * added layers' media types are converted to the manifest's family (Docker
 * schema2 <-> OCI; gzip, zstd and uncompressed kept apart); the manifest's
 * "config" descriptor gets the new config's digest and size. Everything
 * else keeps its place and its bytes: key order, unknown fields, empty
 * arrays, exact numbers.
 */
#ifndef REGFACADE_IMAGE_H
#define REGFACADE_IMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "regfacade/json.h"

/* Manifest media types (the two image manifest families and their lists). */
#define IMAGE_MT_OCI_MANIFEST "application/vnd.oci.image.manifest.v1+json"
#define IMAGE_MT_OCI_INDEX "application/vnd.oci.image.index.v1+json"
#define IMAGE_MT_DOCKER_MANIFEST "application/vnd.docker.distribution.manifest.v2+json"
#define IMAGE_MT_DOCKER_LIST "application/vnd.docker.distribution.manifest.list.v2+json"

/* Layer media types image_layer_media_type_for() converts between. Docker
 * has no zstd type (an OCI zstd layer stays OCI in a Docker manifest) and
 * one "foreign" type for every OCI nondistributable variant. */
#define IMAGE_MT_DOCKER_LAYER_GZIP "application/vnd.docker.image.rootfs.diff.tar.gzip"
#define IMAGE_MT_DOCKER_LAYER_TAR "application/vnd.docker.image.rootfs.diff.tar"
#define IMAGE_MT_DOCKER_LAYER_FOREIGN "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
#define IMAGE_MT_OCI_LAYER_TAR "application/vnd.oci.image.layer.v1.tar"
#define IMAGE_MT_OCI_LAYER_GZIP "application/vnd.oci.image.layer.v1.tar+gzip"
#define IMAGE_MT_OCI_LAYER_ZSTD "application/vnd.oci.image.layer.v1.tar+zstd"
#define IMAGE_MT_OCI_LAYER_ND_TAR "application/vnd.oci.image.layer.nondistributable.v1.tar"
#define IMAGE_MT_OCI_LAYER_ND_GZIP "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
#define IMAGE_MT_OCI_LAYER_ND_ZSTD "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

typedef struct {
    bool is_base;           /* stands for the base image's layers; other fields unused */
    const char *media_type; /* as the source gives it (any family) */
    const char *digest;     /* "sha256:..." of the blob */
    uint64_t size;
    const char *diff_id;           /* "sha256:..." of the uncompressed tar */
    const json_value *urls;        /* optional array of strings, copied */
    const json_value *annotations; /* optional object, copied */
    const char *created_by;        /* history entry; NULL: "regfacade: added layer <digest>" */
    const char *comment;           /* history entry comment; may be NULL */
    /* For the rewrite hook's img.layers only (assembly ignores them): */
    const char *source;              /* "file", "image", "blob" (NULL for base entries) */
    const char *name;                /* the config name or the inline source (file path, image ref), or NULL */
    const json_value *source_config; /* config of the image the layer came from (env modifiers), or NULL */
    /* Where an "image" or "blob" layer's bytes are fetched from when they are
     * not cached (NULL: the base image's repository). Linked to the names
     * the image is generated for, and to no others (store.h). */
    const char *origin_upstream;
    const char *origin_repository;
} image_layer;

/* Assemble. base_manifest is an OCI image manifest or Docker schema2
 * manifest (not an index); base_config its config. On success returns 0 and
 * two new trees (*out_manifest, *out_config; caller frees). The manifest's
 * config descriptor is NOT yet updated: call image_finish() after any
 * further edits to the config (the rewrite hook). -1 with "what: why" in
 * err on a malformed input (missing layers array, diff_ids count not
 * matching layers, bad descriptor). The inputs are never changed.
 *
 * Details:
 *  - An added layer's descriptor has mediaType, size and digest in the
 *    order the base's first layer descriptor uses (else its config
 *    descriptor's; else that order), then urls and annotations when given.
 *    Sizes above 2^63-1 are refused (OCI sizes are int64).
 *  - A history entry is added per added layer only when the base config
 *    has a "history" array: {"created": <the base config's "created", when
 *    present, so output depends on inputs only>, "created_by": ...,
 *    "comment": ... (when given)}. With "base" in the stack the base's
 *    history stays one block in place (even when its non-empty entries do
 *    not match the base layers), the added entries before or after it as
 *    their layers are.
 *  - Errors: "base manifest: layers[2].digest ...", "base config has 3
 *    diff_ids for 2 layers", "stack[4] (layer sha256:...): diff_id ...".
 *    Stack entries count from 1 (as the policy's Lua array), JSON arrays
 *    from 0. "base" may appear once. */
int image_assemble(const json_value *base_manifest, const json_value *base_config, const image_layer *stack, size_t n,
                   json_value **out_manifest, json_value **out_config, char *err, size_t errlen);

/* Serialize the config, put its digest and size into the manifest's config
 * descriptor, and serialize the manifest. Both outputs malloc'd (caller
 * frees), with their sha256 digests. 0 on success, -1 with err. The config
 * descriptor keeps its key order; its "urls" and "data" members, which
 * would describe the old config's bytes, are removed. */
int image_finish(json_value *manifest, const json_value *config, char **config_bytes, size_t *config_len,
                 char config_digest[80], char **manifest_bytes, size_t *manifest_len, char manifest_digest[80],
                 char *err, size_t errlen);

/* Media type of a layer converted to the family of manifest_media_type
 * (Docker schema2 or OCI). Returns a static string; the input itself when
 * no conversion applies (unknown types pass through). */
const char *image_layer_media_type_for(const char *manifest_media_type, const char *layer_media_type);

#endif
