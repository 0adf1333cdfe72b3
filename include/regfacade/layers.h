/*
 * layers: where added layers come from, and what they are.
 *
 * A layer spec is one entry of a resolve answer's `layers` stack, or one
 * entry of the config's "layers" section:
 *   "base"                                   the upstream image's own layers
 *   "NAME"                                   a layer named in config "layers"
 *   {"file": "x.tar.gz"}                     a .tar or .tar.gz file
 *   {"image": "UPSTREAM/repo:tag", "skip": N} the layers of another image
 *   {"blob": "sha256:...", "size": N, "media_type": ..., "diff_id": ...,
 *    "urls": [...], "upstream": ..., "repository": ...}  a blob by descriptor
 * Any of them may carry "platforms": ["linux/amd64", ...] (the layer is
 * added for those platforms only), "created_by" and "comment" (the history
 * entry).
 *
 * Sources load lazily, when a request needs them: a file is hashed once
 * (sha256 of the file, and of its uncompressed tar for the diff_id) and
 * copied into the cache so its blob is served from there; an image is
 * resolved through the manifest cache. A source that cannot be loaded fails
 * only the requests that need it, and is tried again by the next one. The
 * exception: a named file layer must be there (a readable file, not zstd)
 * when the catalog is made (check, serve, reload).
 */
#ifndef REGFACADE_LAYERS_H
#define REGFACADE_LAYERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "regfacade/config.h"
#include "regfacade/digest.h"
#include "regfacade/fetch.h"
#include "regfacade/image.h"
#include "regfacade/json.h"
#include "regfacade/store.h"
#include "regfacade/upstream.h"

typedef enum { LAYER_BASE, LAYER_NAMED, LAYER_FILE, LAYER_IMAGE, LAYER_BLOB } layer_kind;

typedef struct {
    layer_kind kind;
    char *name;       /* NAMED: the config name */
    char *file;       /* FILE: absolute path */
    char *image;      /* IMAGE: "UPSTREAM/repo:tag" or "UPSTREAM/repo@sha256:..." */
    int skip;         /* IMAGE */
    char *digest;     /* BLOB */
    uint64_t size;    /* BLOB */
    char *media_type; /* BLOB */
    char *diff_id;    /* BLOB */
    json_value *urls; /* BLOB, optional */
    char *upstream;   /* BLOB: where to fetch it (default: the base's) */
    char *repository; /* BLOB */
    char **platforms; /* optional filter */
    size_t n_platforms;
    char *created_by;
    char *comment;
} layer_spec;

/* Parse one spec from JSON (a string or an object). Relative file paths
 * resolve against base_dir. where names it in messages ("layers[2]").
 * 0 on success; -1 with "where: why" in err. */
int layer_spec_parse(const json_value *v, const char *base_dir, const char *where, layer_spec *out, char *err,
                     size_t errlen);
void layer_spec_clear(layer_spec *s);
/* Canonical text of a spec (for decision keys); malloc'd. */
char *layer_spec_fingerprint(const layer_spec *s);

/* The config's named layers and the cache of file layer digests. */
typedef struct layer_catalog layer_catalog;
layer_catalog *layer_catalog_new(const config *c, char *err, size_t errlen);
void layer_catalog_free(layer_catalog *cat);

/* What layers_resolve needs from the server. */
typedef struct {
    const config *cfg;
    store *st;
    fetcher *fetches;
    layer_catalog *cat;
    upstream *(*find_upstream)(void *ud, const char *name);
    void *ud;
} layer_env;

/* The resolved stack for one platform, ready for image_assemble. */
typedef struct {
    image_layer *items;
    size_t n;
    /* memory the items point into */
    char **strings;
    size_t n_strings;
    json_value **trees;
    size_t n_trees;
} layer_stack;

/* Resolve specs for platform ("os/arch" or "os/arch/variant"). Layers whose
 * platforms filter excludes the platform are left out. Blobs of added layers
 * are recorded with their origin so blob requests find them. 0 on success;
 * -1 with e filled (the message names the layer and the reason). */
int layers_resolve(const layer_env *env, const layer_spec *specs, size_t n, const char *platform,
                   const char *base_upstream, const char *base_repository, layer_stack *out, fetch_error *e);
void layer_stack_clear(layer_stack *s);

/* Feed into key what decides the layers of specs: their canonical text,
 * named layers' definitions, and the current manifest digest of every image
 * source (through the tag cache), so a moved tag gives a new key. 0, or -1
 * with e filled. */
int layers_key(const layer_env *env, const layer_spec *specs, size_t n, digest_ctx *key, fetch_error *e);

/* True when platform matches one of the filter entries ("linux/arm64"
 * matches "linux/arm64" and "linux/arm64/v8"). */
bool layers_platform_matches(char *const *filter, size_t n, const char *platform);

#endif
