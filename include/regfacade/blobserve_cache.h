/*
 * blobserve_cache: image layers unpacked once, by digest, on disk.
 *
 *   DIR/layers/<key>/root/   the layer's files, as the tar had them
 *   DIR/layers/<key>/meta    "bytes N\nentries N\nrefused N\n"
 *   DIR/tmp/                 extractions in progress; cleared at start
 *
 * <key> is the layer digest's hex, followed by "-<variant>" when the
 * repository has replacements (the edited files differ, so does the key).
 *
 * An extraction reads the compressed blob from the store, or tails the
 * running single-flight fetch (fetch.h) while it downloads, through
 * libarchive (tar, pax, GNU long names, sparse files; gzip, zstd, plain).
 * Entries are created with *at() calls beneath the extraction root, never
 * following a symlink: "../" names and hard links whose target leaves the
 * layer are refused (counted), absolute names are taken relative to the
 * root, symlinks are stored as they are and only ever resolved by
 * blobserve_fs, within the image. Devices, fifos and sockets are skipped;
 * files are 0644, folders 0755, owned by us. Whiteout files (.wh.NAME,
 * .wh..wh..opq) are kept as empty marker files for blobserve_fs.
 *
 * The finished tree is published with one rename, so a layer is either
 * wholly there or not at all. Concurrent first requests for one layer make
 * one download and one extraction; the others wait on a condition
 * variable. Layers are evicted least-recently-used when their total size
 * (file bytes plus 512 per entry) is over the cap, but never one that is
 * held (acquired and not yet released).
 */
#ifndef REGFACADE_BLOBSERVE_CACHE_H
#define REGFACADE_BLOBSERVE_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "regfacade/fetch.h"
#include "regfacade/store.h"
#include "regfacade/upstream.h"

typedef struct bs_cache bs_cache;
typedef struct bs_layer bs_layer;

/* A find-and-replace edit (blobserve_replacement, without ownership). */
typedef struct {
    const char *path; /* normalized, no leading '/' */
    const char *search;
    size_t search_len;
    const char *replacement;
    size_t replacement_len;
} bs_edit;

/* Where a layer's compressed bytes come from. */
typedef struct {
    store *st;
    fetcher *fetches;
    upstream *u;
    const char *repository; /* upstream repository, for the fetch */
} bs_source;

/* What a layer needs to be extracted. */
typedef struct {
    const char *digest;  /* "sha256:<hex>" */
    const char *variant; /* "" or 16 hex (blobserve_repo_edits.variant) */
    const bs_edit *edits;
    size_t n_edits;
    uint64_t max_edit_bytes; /* a file to edit may be at most this big */
} bs_layer_spec;

typedef struct {
    unsigned long extractions; /* layers extracted and published */
    unsigned long extraction_failures;
    unsigned long waits; /* acquires that waited for a running extraction */
    unsigned long hits;  /* acquires of a ready layer */
    unsigned long evictions;
    unsigned long refused_entries; /* tar entries refused (../, links out of the layer, ...) */
    unsigned long layers;          /* layers in the cache (ready or being extracted) */
    unsigned long held;            /* layers acquired and not yet released */
    uint64_t bytes;                /* size of the ready layers */
    uint64_t max_bytes;
} bs_cache_stats;

/* Open (create) DIR, clear DIR/tmp, take in the layers an earlier run left
 * and evict down to max_bytes. NULL with err. */
bs_cache *bs_cache_open(const char *dir, uint64_t max_bytes, char *err, size_t errlen);
/* Every layer must have been released. */
void bs_cache_close(bs_cache *c);

/* The extracted layer, held until bs_cache_release: the ready one, or the
 * one another thread is extracting (waited for), or one extracted now by
 * this thread. NULL on failure with e (the download's own answer as
 * upstream_answer.h maps it, e.g. 429 with its Retry-After; 502 for bytes
 * that are no usable layer; 500 for our side), and *final true when the
 * layer's own bytes (digest verified) are what failed (not a tar, cut
 * short, over the cap): fetching it again cannot help. */
bs_layer *bs_cache_acquire(bs_cache *c, const bs_layer_spec *spec, const bs_source *src, fetch_error *e, bool *final);
void bs_cache_release(bs_cache *c, bs_layer *l);

/* The layer if it is ready now (held until bs_cache_release), else NULL
 * at once: never waits, downloads or extracts. */
bs_layer *bs_cache_try_acquire(bs_cache *c, const bs_layer_spec *spec);

/* Start the download of a layer that is neither extracted nor cached as a
 * blob, without waiting (the fetch goes on by itself). */
void bs_cache_prefetch(bs_cache *c, const bs_layer_spec *spec, const bs_source *src);

/* A held layer's root folder as an O_PATH descriptor (owned by the cache),
 * and its key ("<hex>" or "<hex>-<variant>"). */
int bs_layer_rootfd(const bs_layer *l);
const char *bs_layer_key(const bs_layer *l);

void bs_cache_get_stats(bs_cache *c, bs_cache_stats *out);

#endif
