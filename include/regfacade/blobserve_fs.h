/*
 * blobserve_fs: an image's filesystem, read through its extracted layers,
 * and the URL grammar of the blobserve listener. No HTTP, no caching: pure
 * functions over strings and read-only *at() calls on layer roots.
 *
 * A path resolves the way an overlay mount of the layers would show it:
 * layers are searched from the top down; the topmost entry wins; a
 * ".wh.NAME" marker in a layer hides NAME in every layer below it; a
 * ".wh..wh..opq" marker in a folder hides everything the layers below have
 * in that folder; a non-folder hides everything below it at that path.
 * Symlinks are followed by this code, never by the kernel: an absolute
 * target starts again at the image root, ".." stops at the image root (as
 * in a chroot), at most BS_FS_MAX_LINKS links per lookup. Marker files are
 * never served.
 */
#ifndef REGFACADE_BLOBSERVE_FS_H
#define REGFACADE_BLOBSERVE_FS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/stat.h>

#include "regfacade/ref.h"

#define BS_FS_MAX_LINKS 40
#define BS_FS_MAX_LAYERS 256
#define BS_FS_PATH_MAX 4096

/* ---------- URL grammar ---------- */

typedef struct {
    char repository[REF_NAME_MAX + 1];
    char reference[REF_DIGEST_MAX + 1]; /* tag, or "sha256:<hex>" */
    bool by_digest;
    bool has_slash;            /* something (even just "/") follows the reference */
    bool trailing_slash;       /* the path ends in '/' */
    char path[BS_FS_PATH_MAX]; /* decoded, normalized, no leading or trailing '/': "" is the root */
} bs_url;

/* Parse a raw (not yet percent-decoded) URL path:
 *   "/" REPOSITORY ( ":" TAG | "@" DIGEST ) [ "/" PATH ]
 * The repository ends at the first ':' or '@'. PATH is percent-decoded
 * segment by segment; empty segments are dropped. Returns 0, or an HTTP
 * status (400 for a malformed URL, a missing reference, an encoded '/',
 * '\\', NUL or control character, a "." or ".." segment; 404 for a path
 * through a whiteout marker) with why set. */
int bs_url_parse(const char *raw, bs_url *out, char *why, size_t whylen);

/* The longest segment of a path (a file name on Linux file systems). */
#define BS_NAME_MAX 255

/* A path (a tar entry's name, a path in the config) as a path beneath the
 * root: leading '/', empty and "." segments dropped. Returns its length (0:
 * the root itself), or -1 on a ".." segment, a segment longer than
 * BS_NAME_MAX, or a result that does not fit in outlen. */
int bs_path_clean(const char *in, char *out, size_t outlen);

/* bs_path_clean for a path named in the config (replacements), which must
 * not be the root: false on "..", too long, or empty. */
bool bs_path_normalize(const char *in, char *out, size_t outlen);

/* ---------- lookup ---------- */

typedef struct {
    size_t layer;              /* index into the roots array (0 = bottom layer) */
    char path[BS_FS_PATH_MAX]; /* canonical path inside the image, "" for the root */
    struct stat st;            /* of the winning entry (a folder or a regular file) */
} bs_fs_entry;

/* Look path up in an image whose layer roots (O_PATH or O_DIRECTORY
 * descriptors) are given bottom first. 0 with out filled; -1 with errno:
 * ENOENT (missing or hidden), ENOTDIR, ELOOP, ENAMETOOLONG, EINVAL. */
int bs_fs_lookup(const int *roots, size_t n, const char *path, bs_fs_entry *out);

/* Open the regular file e names (read-only, never through a symlink);
 * -1 with errno. */
int bs_fs_open(const int *roots, const bs_fs_entry *e);

#endif
