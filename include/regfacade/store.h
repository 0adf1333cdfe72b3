/*
 * store: the content-addressed disk cache.
 *
 *   DIR/blobs/sha256/ab/abcd...  verified blobs and manifests, immutable
 *   DIR/tmp/                     spools being written; removed at start
 *   DIR/tags/<sha256(key)>       tag -> digest resolutions with their time
 *   DIR/links/<scope>/<hex>      digests a scope may be served (below)
 *   DIR/generated/<key>          decision key -> generated manifest digest
 *   DIR/made/<hex>               names and tags a generated blob was made for
 *   DIR/lock                     flock'ed by the one process using DIR; its PID
 *   DIR/quarantine/              blobs that failed verification (not counted, never served)
 *
 * Nothing enters blobs/ unless its sha256 was verified; every write is temp
 * file, fsync, rename, so a crash leaves either the whole file or nothing.
 * What is in blobs/ is checked again: a blob is hashed on its first open
 * in the process and whenever its file changed since (inode, size, ctime,
 * mtime), small files read whole (manifests, configs) on every read, and
 * every blob by store_blob_verify (the scrub, `regfacade cache verify`).
 * A blob that fails is moved to quarantine/ and forgotten, so the next
 * request fetches it again; it is never served twice.
 * Thread-safe: all state is on disk or guarded by the store's mutex.
 */
#ifndef REGFACADE_STORE_H
#define REGFACADE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

typedef struct store store;

/* Create the folders (0700), lock the cache folder for this process (an
 * exclusive flock on DIR/lock, which holds the PID; a folder locked by
 * another process is refused with err naming that PID) and clear tmp/.
 * NULL with err on failure. store_close() releases the lock. */
/* Would store_open succeed on dir's folder itself? What `check` asks,
 * without leaving anything behind: an existing dir must be a folder (no
 * symlink) where a file can be made; a missing one must be creatable (made
 * and removed again). 0, or -1 with store_open's own message in err. */
int store_dir_check(const char *dir, char *err, size_t errlen);
store *store_open(const char *dir, uint64_t max_bytes, char *err, size_t errlen);
void store_close(store *s);
const char *store_dir(const store *s);

/* The cluster (cluster.h) whose shared records stand beside this store's
 * own ones (tags, made records, pushed specs, links), NULL for a lone
 * replica. The store asks it for links itself (store_link_put publishes,
 * store_link_get looks there for a link it does not hold and keeps it);
 * for the other records, the modules that read and write them do, through
 * this one handle. Set once, before any request. */
struct cluster;
void store_set_cluster(store *s, struct cluster *cl);
struct cluster *store_cluster(const store *s);

/* Open a cached blob for reading: 1 found (fd and size set; caller closes),
 * 0 not cached (or just quarantined), -1 error (err set). digest must be a
 * valid sha256 digest. A file not yet verified in this process, or changed
 * since, is hashed before the open returns (once: concurrent openers wait).
 * The open marks the blob most recently used and pins it: it is not
 * evicted while fd stays open and refers to it. Close with
 * store_blob_close(), or close(fd) (libmicrohttpd's sendfile responses
 * close it themselves): a pin whose fd was closed is dropped lazily. */
int store_blob_open(store *s, const char *digest, int *fd, uint64_t *size, char *err, size_t errlen);
/* Release the pin of fd on digest (the fd stays open), then evict if the
 * cache is over its cap. */
void store_blob_unpin(store *s, const char *digest, int fd);
/* store_blob_unpin() and close(fd). */
void store_blob_close(store *s, const char *digest, int fd);
/* True while some reader holds digest open (tests, metrics). */
bool store_blob_pinned(store *s, const char *digest);
bool store_blob_exists(store *s, const char *digest);

/* The size cap: blobs/ (verified blobs and manifests, generated ones too)
 * is kept under max_bytes by evicting the least recently used blobs (last
 * open or commit; at start, the order of the files' access/modify times),
 * never one that is pinned; a blob that is in use is skipped and the next
 * is taken. tags/, links/, generated/ and made/ hold small records and are not
 * counted; spools in tmp/ are not counted until committed. */
typedef struct {
    size_t blobs;   /* blobs in the index */
    uint64_t bytes; /* their total size */
    uint64_t max_bytes;
    unsigned long committed; /* commits since open */
    unsigned long evicted;   /* blobs evicted since open */
    uint64_t evicted_bytes;
    unsigned long quarantined; /* blobs that failed verification since open */
} store_stats;
void store_get_stats(store *s, store_stats *out);

/* Read a whole cached blob of at most max bytes (manifests, configs),
 * hashing what was read: 1 found and right (*data malloc'd, caller frees),
 * 0 not cached (or wrong: quarantined), -1 error. */
int store_blob_read(store *s, const char *digest, size_t max, char **data, size_t *len, char *err, size_t errlen);
/* store_blob_read without marking the blob used: for listings (cache ls),
 * which must not change what is evicted first or the "last use" shown. */
int store_blob_peek(store *s, const char *digest, size_t max, char **data, size_t *len, char *err, size_t errlen);

/* Verification of one cached blob, whatever its state: hashed again
 * (pace, when given, is called after every MiB with the bytes just read and
 * stops the hash by returning non-zero), then marked right or quarantined.
 * reason says why it was quarantined, or the error. */
typedef int (*store_pace_fn)(void *ud, uint64_t bytes);
typedef enum {
    STORE_VERIFY_OK,
    STORE_VERIFY_QUARANTINED,
    STORE_VERIFY_GONE,  /* not cached (evicted meanwhile) */
    STORE_VERIFY_ERROR, /* could not be read, or stopped by pace: left as it was */
} store_verify_result;
store_verify_result store_blob_verify(store *s, const char *digest, store_pace_fn pace, void *ud, char *reason,
                                      size_t rlen);

/* The blobs in the index now, least recently used first: *out malloc'd
 * (caller frees), 0; -1 out of memory. */
typedef struct {
    char digest[80];
    uint64_t size;
    time_t used; /* last open or commit; at start, the file's atime or mtime */
    bool pinned; /* held open by a reader now */
} store_blob_ref;
int store_blob_list(store *s, store_blob_ref **out, size_t *n);

/* A spool: a temp file in tmp/ that becomes DIR/blobs/... on commit. */
typedef struct {
    char path[4096];
    int fd;
} store_spool;

int store_spool_create(store *s, store_spool *sp, char *err, size_t errlen);
/* fsync, verify nothing (the caller verified the digest), rename into
 * place, fsync the folder. Closes nothing: the fd stays open for readers,
 * and pins the blob while it does (see store_blob_open). May evict older
 * blobs to stay under the cap. */
int store_spool_commit(store *s, store_spool *sp, const char *digest, char *err, size_t errlen);
/* Remove the spool file (the fd stays open for readers). */
void store_spool_discard(store *s, store_spool *sp);

/* Store bytes whose digest the caller verified (manifests). */
int store_put(store *s, const char *digest, const void *data, size_t len, char *err, size_t errlen);

/* Tag resolutions, keyed by (upstream, repository, tag). */
typedef struct {
    char digest[192];
    char media_type[256];
    time_t fetched; /* when the upstream last confirmed it */
} store_tag;

int store_tag_get(store *s, const char *upstream, const char *repository, const char *tag, store_tag *out);
int store_tag_put(store *s, const char *upstream, const char *repository, const char *tag, const store_tag *t,
                  char *err, size_t errlen);
/* Forget a resolution: 1 removed, 0 there was none, -1 error (err). */
int store_tag_remove(store *s, const char *upstream, const char *repository, const char *tag, char *err, size_t errlen);
/* Every tag record that reads right (damaged ones are skipped): fn returning
 * non-zero stops the walk and is returned; -1 when tags/ cannot be read. */
#define STORE_UPSTREAM_MAX 128
typedef int (*store_tag_fn)(void *ud, const char *upstream, const char *repository, const char *tag,
                            const store_tag *t);
int store_tag_each(store *s, store_tag_fn fn, void *ud);

/* Links: the cache is shared storage, never a shared permission. A digest
 * is served under a scope only when a link says it belongs there:
 *   upstream scope   (upstream account, repository): the digest was fetched
 *                    or verified there with that account, or a manifest
 *                    fetched there references it;
 *   generated scope  (an upstream scope, the name a client asked for): an
 *                    image assembled for that name has it (its manifests,
 *                    config and layers);
 *   everyone         regfacade's own fixed content (the scratch base).
 * A link may name an origin (upstream, repository): where its bytes are
 * fetched when they are not cached (a layer added from another image).
 * DIR/links/<scope>/<hex>: empty, or "upstream\nrepository\n". */
typedef struct {
    char hex[65]; /* sha256 hex naming the scope */
} store_scope;

/* The scope of repository on an upstream account (account: a stable id of
 * the upstream and its user, never a secret; fetch_scope() computes it). */
void store_scope_upstream(store_scope *out, const char *account, const char *repository);
/* The scope of images generated for name (as the client asked for it) from
 * the upstream scope from. */
void store_scope_generated(store_scope *out, const store_scope *from, const char *name);
/* The scope of regfacade's own content, in no upstream (the scratch base
 * of specs.h): linked there, a digest may be served under every name. */
void store_scope_everyone(store_scope *out);
/* Link digest to sc. With an origin (both non-NULL) the link names it
 * (replacing what it named); without, an existing link is left as it is.
 * 0, or -1 with err. */
int store_link_put(store *s, const store_scope *sc, const char *digest, const char *origin_upstream,
                   const char *origin_repository, char *err, size_t errlen);
/* 1 linked (origin filled, "" when the link names none; either buffer may
 * be NULL), 0 not linked (or unreadable). */
int store_link_get(store *s, const store_scope *sc, const char *digest, char *origin_upstream, size_t ulen,
                   char *origin_repository, size_t rlen);

/* Generated images: a decision key (sha256 hex of everything that decided
 * the image) -> the generated manifest's digest. DIR/generated/<key>. */
int store_generated_put(store *s, const char *key, const char *digest, char *err, size_t errlen);
int store_generated_get(store *s, const char *key, char *digest, size_t dlen);

/* The blobs only regfacade has (generated manifests, indexes and configs,
 * file layers) remember the (name, tag) they were generated for, so that
 * one evicted while the image that holds it is still served can be
 * generated again: DIR/made/<hex>, the latest 16 names. */
int store_made_add(store *s, const char *digest, const char *repository, const char *tag, char *err, size_t errlen);
/* 1 with tag filled when digest was generated for repository (NULL: for
 * any name), 0 not. */
int store_made_get(store *s, const char *digest, const char *repository, char *tag, size_t tlen);

/* Remove one cached blob (cache rm), never one a reader holds open
 * (pinned) or one being verified; its links in every scope go with it (a
 * request for it asks its name's upstream again, which links it again);
 * its made/ record stays (a generated part is made again on demand). */
typedef enum { STORE_REMOVED, STORE_NOT_CACHED, STORE_IN_USE, STORE_REMOVE_ERROR } store_remove_result;
store_remove_result store_blob_remove(store *s, const char *digest, char *err, size_t errlen);

/* Garbage collection (cache gc): files in tmp/ unchanged for tmp_min_age
 * seconds (spools no transfer writes any more; 0 when no server runs),
 * tag records whose manifest is not cached and generated/ records whose
 * image is not (both would answer nothing), damaged records in tags/ and
 * generated/, and stray files in blobs/ (not named by their digest: never
 * indexed, never served). Blobs themselves are left to the size cap and
 * cache rm; links/ and made/ records stay (they let an evicted blob be
 * fetched, from its origin, or generated again, and say where it may be
 * served). 0, or -1 with err. */
typedef struct {
    size_t tmp_files;
    uint64_t tmp_bytes;
    size_t tag_records;       /* resolutions of manifests no longer cached */
    size_t generated_records; /* generated images no longer cached */
    size_t damaged_records;
    size_t stray_files;
    uint64_t stray_bytes;
} store_gc_report;
int store_gc(store *s, time_t tmp_min_age, store_gc_report *out, char *err, size_t errlen);

#endif
