/* blobserve_cache: layers extracted once (libarchive), published by
 * rename, held by reference count, evicted least-recently-used. */
#include "regfacade/blobserve_cache.h"

#include <archive.h>
#include <archive_entry.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/errmsg.h"
#include "regfacade/blobserve_fs.h"
#include "regfacade/dir_lock.h"
#include "regfacade/log.h"
#include "regfacade/ref.h"
#include "regfacade/upstream_answer.h"

#define ENTRY_OVERHEAD 512          /* bytes counted per entry besides file contents */
#define READ_BUF_BYTES (256 * 1024) /* compressed bytes per read from the blob */
#define PATHBUF 4096
#define MAX_REFUSED_LOGGED 10 /* refused entries logged per layer (all are counted) */

typedef enum { L_EXTRACTING, L_READY, L_FAILED } layer_state;

struct bs_layer {
    char key[96];
    layer_state state;
    int refs;
    bool listed; /* in c->layers (failed ones leave at once) */
    uint64_t bytes;
    uint64_t last_used; /* LRU clock tick */
    int rootfd;         /* O_PATH of layers/<key>/root when ready */
    fetch_error err;    /* why it failed, for those who waited for it */
    bool err_final;     /* the layer's bytes failed (bs_cache_acquire) */
    bs_layer *next;
};

struct bs_cache {
    char *dir;
    int lock_fd; /* DIR/lock (dir_lock.h) while open; -1 before */
    uint64_t max_bytes;
    char boot_id[64]; /* this boot's id; "" when unknown (then every extraction is synced) */
    bool opened;      /* fully opened: close records a clean sync */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* broadcast whenever an extraction ends */
    bs_layer *layers;
    uint64_t total; /* bytes of ready layers */
    uint64_t clock;
    unsigned long seq;
    bs_cache_stats stats;
};

/* Paths of evicted trees, deleted after the lock is dropped. */
typedef struct {
    char **paths;
    size_t n, cap;
} victims;

/* ---------- small helpers ---------- */

/* Remove name under dirfd, folders recursively, never following a link. */
static int rm_tree_at(int at, const char *name) {
    if (unlinkat(at, name, 0) == 0 || errno == ENOENT) return 0;
    if (errno != EISDIR && errno != EPERM) return -1;
    int fd = openat(at, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return -1;
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return -1;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        rm_tree_at(dirfd(d), e->d_name);
    }
    closedir(d);
    return unlinkat(at, name, AT_REMOVEDIR);
}

static void rm_tree(const char *path) {
    if (rm_tree_at(AT_FDCWD, path) != 0 && errno != ENOENT)
        log_warn("blobserve: cannot remove %s: %s", path, strerror(errno));
}

static void victims_delete(victims *v) {
    for (size_t i = 0; i < v->n; i++) {
        rm_tree(v->paths[i]);
        free(v->paths[i]);
    }
    free(v->paths);
    v->paths = NULL;
    v->n = v->cap = 0;
}

/* The first line of a small file, without the newline; "" on failure. */
static void read_line(const char *path, char *out, size_t outlen) {
    out[0] = '\0';
    FILE *f = fopen(path, "r");
    if (!f) return;
    if (!fgets(out, (int)outlen, f)) out[0] = '\0';
    fclose(f);
    out[strcspn(out, "\n")] = '\0';
}

/* Write path atomically and durably (temp file, fsync, rename). */
static int write_small_file(const char *path, const char *text) {
    char tmp[PATHBUF];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) return -1;
    size_t n = strlen(text);
    int rc = write(fd, text, n) == (ssize_t)n && fsync(fd) == 0 ? 0 : -1;
    close(fd);
    if (rc == 0) rc = rename(tmp, path);
    if (rc != 0) unlink(tmp);
    return rc;
}

static int make_key(const bs_layer_spec *s, char *out, size_t outlen) {
    if (!ref_is_sha256_digest(s->digest)) return -1;
    const char *v = s->variant ? s->variant : "";
    if (strlen(v) > 16 || strspn(v, "0123456789abcdef") != strlen(v)) return -1;
    snprintf(out, outlen, "%s%s%s", s->digest + 7, *v ? "-" : "", v);
    return 0;
}

static bs_layer *find_locked(bs_cache *c, const char *key) {
    for (bs_layer *l = c->layers; l; l = l->next)
        if (strcmp(l->key, key) == 0) return l;
    return NULL;
}

static void unlist_locked(bs_cache *c, bs_layer *l) {
    for (bs_layer **pp = &c->layers; *pp; pp = &(*pp)->next)
        if (*pp == l) {
            *pp = l->next;
            break;
        }
    l->listed = false;
}

static void free_layer(bs_layer *l) {
    if (l->rootfd >= 0) close(l->rootfd);
    free(l);
}

/* Evict least-recently-used, unheld, ready layers until the total fits.
 * Each victim's tree is renamed into tmp/ at once (so a new extraction of
 * the same key can publish) and deleted later by the caller. */
static void evict_locked(bs_cache *c, victims *v) {
    while (c->total > c->max_bytes) {
        bs_layer *best = NULL;
        for (bs_layer *l = c->layers; l; l = l->next)
            if (l->state == L_READY && l->refs == 0 && (!best || l->last_used < best->last_used)) best = l;
        if (!best) break; /* everything left is held or being extracted */
        char from[PATHBUF], to[PATHBUF];
        snprintf(from, sizeof from, "%s/layers/%s", c->dir, best->key);
        snprintf(to, sizeof to, "%s/tmp/evicted-%s-%lu", c->dir, best->key, ++c->seq);
        if (rename(from, to) != 0) {
            log_warn("blobserve: evicting layer %s: rename %s: %s", best->key, from, strerror(errno));
            snprintf(to, sizeof to, "%s", from);
        }
        unlist_locked(c, best);
        c->total -= best->bytes;
        c->stats.evictions++;
        log_info("blobserve: evicted layer %s (%llu bytes; cache now %llu of %llu bytes)", best->key,
                 (unsigned long long)best->bytes, (unsigned long long)c->total, (unsigned long long)c->max_bytes);
        free_layer(best);
        if (v->n == v->cap) {
            size_t cap = v->cap ? v->cap * 2 : 4;
            char **p = realloc(v->paths, cap * sizeof *p);
            if (!p) continue; /* the tree stays in tmp/ until the next start */
            v->paths = p;
            v->cap = cap;
        }
        char *dup = strdup(to);
        if (dup) v->paths[v->n++] = dup;
    }
}

/* ---------- reading the compressed blob ---------- */

typedef struct {
    int fd;   /* the cached blob, or -1 */
    fetch *x; /* else the running fetch, read as it grows */
    uint64_t off;
    char *buf;
} src_reader;

static la_ssize_t src_read(struct archive *a, void *ud, const void **out) {
    src_reader *r = ud;
    ssize_t n;
    if (r->fd >= 0) {
        do n = pread(r->fd, r->buf, READ_BUF_BYTES, (off_t)r->off);
        while (n < 0 && errno == EINTR);
        if (n < 0) {
            archive_set_error(a, errno, "reading the cached blob: %s", strerror(errno));
            return -1;
        }
    } else {
        n = fetch_read(r->x, r->off, FETCH_READ_ALL, r->buf, READ_BUF_BYTES);
        if (n < 0) {
            archive_set_error(a, EIO, "the download of the blob failed");
            return -1;
        }
    }
    r->off += (uint64_t)n;
    *out = r->buf;
    return n;
}

/* The tar stream: the blob decompressed by a libarchive reader of its own
 * (raw format, every filter), so the tar reader knows whether the
 * compressed stream ended cleanly (gzip or zstd end reached) or failed. */
typedef struct {
    struct archive *unz;
    bool ended;  /* the decompressed stream ended cleanly */
    bool failed; /* decompressing failed: why says how */
    char why[300];
} plain_reader;

static la_ssize_t plain_read(struct archive *a, void *ud, const void **out) {
    plain_reader *p = ud;
    if (p->ended) return 0;
    for (;;) {
        size_t size = 0;
        la_int64_t off;
        int r = archive_read_data_block(p->unz, out, &size, &off);
        if (r == ARCHIVE_EOF) {
            p->ended = true;
            return 0;
        }
        if (r < ARCHIVE_WARN) {
            const char *e = archive_error_string(p->unz);
            p->failed = true;
            snprintf(p->why, sizeof p->why, "decompressing the layer: %s",
                     e ? e : "the compressed stream is cut short or corrupt");
            archive_set_error(a, EIO, "%s", p->why);
            return -1;
        }
        if (size > 0) return (la_ssize_t)size;
    }
}

/* ---------- writing the tree ---------- */

typedef struct {
    const char *key;
    int rootfd; /* O_DIRECTORY of the extraction root */
    const bs_layer_spec *spec;
    uint64_t bytes, max_bytes;
    unsigned long entries, refused;
    const plain_reader *plain;
    bool data_read;     /* the current entry's data was read (read_data) */
    bool ended;         /* the tar ended after the current entry (read_data) */
    char pdir[PATHBUF]; /* the last parent folder opened, and its descriptor */
    int pfd;
    char err[512];
} xwriter;

enum { XW_OK = 0, XW_REFUSED = 1, XW_FATAL = -1 };

static int refuse(xwriter *x, const char *name, const char *why) {
    x->refused++;
    if (x->refused <= MAX_REFUSED_LOGGED)
        log_warn("blobserve: layer %s: refused tar entry \"%.300s\": %s", x->key, name ? name : "(no name)", why);
    return XW_REFUSED;
}

static int fatal(xwriter *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fatal(xwriter *x, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->err, sizeof x->err, fmt, ap);
    va_end(ap);
    return XW_FATAL;
}

static void forget_parent(xwriter *x) {
    if (x->pfd >= 0) close(x->pfd);
    x->pfd = -1;
    x->pdir[0] = '\0';
}

/* Open folder dir (relative to the root; "" is the root), creating missing
 * folders when create, never following a link. Returns an owned fd, or -1
 * with errno (ELOOP/ENOTDIR: a link or a file is in the way). */
static int open_dir(xwriter *x, const char *dir, bool create) {
    if (x->pfd >= 0 && strcmp(dir, x->pdir) == 0) return fcntl(x->pfd, F_DUPFD_CLOEXEC, 0);
    int fd = openat(x->rootfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    char buf[PATHBUF];
    snprintf(buf, sizeof buf, "%s", dir);
    char *save = NULL;
    for (char *c = strtok_r(buf, "/", &save); c; c = strtok_r(NULL, "/", &save)) {
        if (create && mkdirat(fd, c, 0755) != 0 && errno != EEXIST) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        int nfd = openat(fd, c, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        int e = errno;
        close(fd);
        if (nfd < 0) {
            errno = e == ENOENT && !create ? ENOENT : e;
            return -1;
        }
        fd = nfd;
    }
    if (create) {
        forget_parent(x);
        x->pfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (x->pfd >= 0) snprintf(x->pdir, sizeof x->pdir, "%s", dir);
    }
    return fd;
}

/* Split rel into folder and leaf (in place); returns the leaf. */
static const char *split_leaf(char *rel, const char **dir) {
    char *slash = strrchr(rel, '/');
    if (!slash) {
        *dir = "";
        return rel;
    }
    *slash = '\0';
    *dir = rel;
    return slash + 1;
}

/* Make room for a new entry named leaf: 1 when an existing folder is kept
 * (want_dir), 0 when the name is free, -1 on failure. */
static int clear_name(xwriter *x, int pfd, const char *leaf, bool want_dir) {
    struct stat st;
    if (fstatat(pfd, leaf, &st, AT_SYMLINK_NOFOLLOW) != 0) return errno == ENOENT ? 0 : -1;
    if (S_ISDIR(st.st_mode)) {
        if (want_dir) return 1;
        forget_parent(x); /* the cached parent may live under it */
        return rm_tree_at(pfd, leaf) == 0 ? 0 : -1;
    }
    return unlinkat(pfd, leaf, 0) == 0 ? 0 : -1;
}

static int write_all(int fd, const char *p, size_t len, off_t off) {
    while (len > 0) {
        ssize_t n = pwrite(fd, p, len, off);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

/* Apply the edits that name rel to the open file fd. */
static int apply_edits(xwriter *x, int fd, const char *rel) {
    const bs_layer_spec *s = x->spec;
    bool any = false;
    for (size_t i = 0; i < s->n_edits; i++)
        if (strcmp(s->edits[i].path, rel) == 0) any = true;
    if (!any) return XW_OK;
    struct stat st;
    if (fstat(fd, &st) != 0) return fatal(x, "stat %s: %s", rel, strerror(errno));
    if ((uint64_t)st.st_size > s->max_edit_bytes) {
        log_warn("blobserve: layer %s: %s is %lld bytes, over max_replace_file_bytes (%llu); not edited", x->key, rel,
                 (long long)st.st_size, (unsigned long long)s->max_edit_bytes);
        return XW_OK;
    }
    size_t len = (size_t)st.st_size;
    char *buf = malloc(len + 1);
    if (!buf) return fatal(x, "out of memory editing %s", rel);
    size_t got = 0;
    while (got < len) {
        ssize_t n = pread(fd, buf + got, len - got, (off_t)got);
        if (n <= 0) {
            free(buf);
            return fatal(x, "read %s: %s", rel, n < 0 ? strerror(errno) : "short");
        }
        got += (size_t)n;
    }
    unsigned long count = 0;
    for (size_t i = 0; i < s->n_edits; i++) {
        const bs_edit *ed = &s->edits[i];
        if (strcmp(ed->path, rel) != 0 || ed->search_len == 0) continue;
        /* Count, then build the edited text in one pass. */
        size_t hits = 0;
        for (const char *p = buf; (p = memmem(p, len - (size_t)(p - buf), ed->search, ed->search_len)) != NULL;
             p += ed->search_len)
            hits++;
        if (!hits) continue;
        size_t nlen = len - hits * ed->search_len + hits * ed->replacement_len;
        if (nlen > s->max_edit_bytes) {
            free(buf);
            return fatal(x, "editing %s would make it bigger than max_replace_file_bytes", rel);
        }
        char *nb = malloc(nlen + 1);
        if (!nb) {
            free(buf);
            return fatal(x, "out of memory editing %s", rel);
        }
        size_t o = 0;
        const char *p = buf;
        for (const char *q; (q = memmem(p, len - (size_t)(p - buf), ed->search, ed->search_len)) != NULL;
             p = q + ed->search_len) {
            memcpy(nb + o, p, (size_t)(q - p));
            o += (size_t)(q - p);
            memcpy(nb + o, ed->replacement, ed->replacement_len);
            o += ed->replacement_len;
        }
        memcpy(nb + o, p, len - (size_t)(p - buf));
        free(buf);
        buf = nb;
        len = nlen;
        count += hits;
    }
    int rc = XW_OK;
    if (count) {
        if (write_all(fd, buf, len, 0) != 0 || ftruncate(fd, (off_t)len) != 0)
            rc = fatal(x, "rewrite %s: %s", rel, strerror(errno));
        else {
            x->bytes = x->bytes - (uint64_t)st.st_size + len;
            log_info("blobserve: layer %s: %s: %lu replacement%s applied", x->key, rel, count, count == 1 ? "" : "s");
        }
    }
    free(buf);
    return rc;
}

/* Read the data of entry e: written to fd at its offsets (fd < 0: read and
 * dropped), its logical end in *end. XW_OK or XW_FATAL.
 *
 * A tar may stop right after its last entry's data, without the padding to
 * 512 bytes and the two zero blocks that end an archive: umoci writes layers
 * so. containerd, podman and runc unpack them (Go's archive/tar reads the
 * missing padding as the end), so that is the end here too (x->ended) when
 * the entry's data is complete and the compressed stream itself ended
 * cleanly. An entry cut short, or a compressed stream that stops early, is
 * still an error. */
static int read_data(xwriter *x, struct archive *a, struct archive_entry *e, int fd, const char *rel,
                     uint64_t *end_out) {
    x->data_read = true;
    uint64_t end = 0;
    int64_t want = archive_entry_size_is_set(e) ? archive_entry_size(e) : -1;
    for (;;) {
        const void *buf;
        size_t size;
        la_int64_t off;
        int r = archive_read_data_block(a, &buf, &size, &off);
        if (r == ARCHIVE_EOF) break;
        if (r < ARCHIVE_WARN) {
            if (x->plain->failed) return fatal(x, "reading %s from the tar: %s", rel, x->plain->why);
            if (x->plain->ended && want >= 0 && end == (uint64_t)want) {
                x->ended = true; /* only the padding and end blocks are missing */
                break;
            }
            if (x->plain->ended)
                return fatal(x, "reading %s from the tar: the layer ends inside it, after %llu of its %lld bytes", rel,
                             (unsigned long long)end, (long long)want);
            return fatal(x, "reading %s from the tar: %s", rel, archive_error_string(a));
        }
        if (off < 0) return fatal(x, "reading %s from the tar: negative offset", rel);
        if (fd >= 0) {
            if (x->bytes + (uint64_t)off + size > x->max_bytes)
                return fatal(x, "the layer unpacks to more than the cache cap (blobserve.cache.max_bytes, %llu bytes)",
                             (unsigned long long)x->max_bytes);
            if (write_all(fd, buf, size, (off_t)off) != 0) return fatal(x, "write %s: %s", rel, strerror(errno));
        }
        if ((uint64_t)off + size > end) end = (uint64_t)off + size;
    }
    *end_out = end;
    return XW_OK;
}

static int make_file(xwriter *x, struct archive *a, struct archive_entry *e, int pfd, const char *leaf,
                     const char *rel) {
    if (clear_name(x, pfd, leaf, false) != 0) return fatal(x, "replace %s: %s", rel, strerror(errno));
    int fd = openat(pfd, leaf, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) return fatal(x, "create %s: %s", rel, strerror(errno));
    uint64_t end = 0;
    int rc = read_data(x, a, e, fd, rel, &end);
    if (rc == XW_OK && archive_entry_size_is_set(e) && archive_entry_size(e) >= 0) {
        uint64_t size = (uint64_t)archive_entry_size(e);
        if (x->bytes + size > x->max_bytes)
            rc = fatal(x, "the layer unpacks to more than the cache cap (blobserve.cache.max_bytes, %llu bytes)",
                       (unsigned long long)x->max_bytes);
        else if (size != end && ftruncate(fd, (off_t)size) != 0) /* a sparse file's hole at the end */
            rc = fatal(x, "truncate %s: %s", rel, strerror(errno));
        end = size;
    }
    if (rc == XW_OK) {
        x->bytes += end;
        rc = apply_edits(x, fd, rel);
    }
    close(fd);
    return rc;
}

static int make_hardlink(xwriter *x, int pfd, const char *leaf, const char *name, const char *rel, const char *target) {
    char trel[PATHBUF];
    if (bs_path_clean(target, trel, sizeof trel) < 0 || !trel[0])
        return refuse(x, name, "hard link target leaves the layer");
    if (strcmp(trel, rel) == 0) return XW_OK;
    const char *tdir;
    const char *tleaf = split_leaf(trel, &tdir);
    int tfd = open_dir(x, tdir, false);
    if (tfd < 0) return refuse(x, name, "hard link target is not in this layer");
    struct stat st;
    int rc = XW_OK;
    if (fstatat(tfd, tleaf, &st, AT_SYMLINK_NOFOLLOW) != 0 || S_ISDIR(st.st_mode)) {
        rc = refuse(x, name, "hard link target is not a file of this layer");
    } else if (clear_name(x, pfd, leaf, false) != 0) {
        rc = fatal(x, "replace %s: %s", rel, strerror(errno));
    } else if (linkat(tfd, tleaf, pfd, leaf, 0) != 0) {
        rc = refuse(x, name, "hard link could not be made");
    }
    close(tfd);
    return rc;
}

static int write_entry(xwriter *x, struct archive *a, struct archive_entry *e) {
    const char *name = archive_entry_pathname(e);
    char rel[PATHBUF];
    if (!name || bs_path_clean(name, rel, sizeof rel) < 0)
        return refuse(x, name, "\"..\" in the name, or a name too long");
    if (!rel[0]) return XW_OK; /* "./": the root itself */
    x->entries++;
    x->bytes += ENTRY_OVERHEAD;
    if (x->bytes > x->max_bytes)
        return fatal(x, "the layer unpacks to more than the cache cap (blobserve.cache.max_bytes, %llu bytes)",
                     (unsigned long long)x->max_bytes);
    char split[PATHBUF];
    memcpy(split, rel, strlen(rel) + 1);
    const char *dir;
    const char *leaf = split_leaf(split, &dir);
    int pfd = open_dir(x, dir, true);
    if (pfd < 0) {
        if (errno == ELOOP || errno == ENOTDIR || errno == EEXIST)
            return refuse(x, name, "a folder on its path is a symlink or a file");
        return fatal(x, "create folder %s: %s", dir, strerror(errno));
    }
    const char *hl = archive_entry_hardlink(e);
    mode_t type = archive_entry_filetype(e);
    int rc = XW_OK;
    if (strncmp(leaf, ".wh.", 4) == 0) {
        /* A whiteout: kept as an empty marker file for the lookup. */
        if (clear_name(x, pfd, leaf, false) != 0) {
            rc = fatal(x, "replace %s: %s", rel, strerror(errno));
        } else {
            int fd = openat(pfd, leaf, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
            if (fd < 0)
                rc = fatal(x, "create %s: %s", rel, strerror(errno));
            else
                close(fd);
        }
    } else if (hl) {
        rc = make_hardlink(x, pfd, leaf, name, rel, hl);
    } else if (type == AE_IFDIR) {
        int k = clear_name(x, pfd, leaf, true);
        if (k < 0 || (k == 0 && mkdirat(pfd, leaf, 0755) != 0)) rc = fatal(x, "mkdir %s: %s", rel, strerror(errno));
    } else if (type == AE_IFREG) {
        rc = make_file(x, a, e, pfd, leaf, rel);
    } else if (type == AE_IFLNK) {
        const char *target = archive_entry_symlink(e);
        if (!target || !*target) {
            rc = refuse(x, name, "symlink without a target");
        } else if (clear_name(x, pfd, leaf, false) != 0) {
            rc = fatal(x, "replace %s: %s", rel, strerror(errno));
        } else if (symlinkat(target, pfd, leaf) != 0) {
            rc = fatal(x, "symlink %s: %s", rel, strerror(errno));
        }
    }
    /* Devices, fifos and sockets are not files to serve: skipped. */
    close(pfd);
    return rc;
}

/* e: the fetch's own answer (upstream_answer.h: a 429 keeps its
 * Retry-After), saying which layer. */
static void layer_fetch_failed(fetch_error *e, const fetch_error *fe, const bs_layer_spec *spec) {
    char where[120];
    snprintf(where, sizeof where, "layer %s", spec->digest);
    fetch_error_wrap(e, fe, where);
}

/* When the layer is read from a running download: wait for its end; true
 * (with e) when it failed, its digest among other things. */
static bool download_failed(const src_reader *r, const bs_layer_spec *spec, fetch_error *e) {
    if (!r->x) return false;
    fetch_error fe = {0};
    if (fetch_wait_done(r->x, &fe) == 0) return false;
    layer_fetch_failed(e, &fe, spec);
    return true;
}

/* Download (or read) and unpack one layer into tmp/, then publish it as
 * layers/<key>. 0 with *bytes and *rootfd set; -1 with fail. */
static int extract(bs_cache *c, const bs_layer_spec *spec, const bs_source *src, const char *key, uint64_t *bytes,
                   int *rootfd_out, bool *bad_bytes, fetch_error *fail) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char tmp[PATHBUF];
    snprintf(tmp, sizeof tmp, "%s/tmp/x-%s-XXXXXX", c->dir, key);
    if (!mkdtemp(tmp)) {
        fetch_error_set(fail, 500, "UNKNOWN", "blobserve: mkdtemp %s: %s", tmp, strerror(errno));
        return -1;
    }
    src_reader r = {.fd = -1};
    xwriter x = {.key = key, .rootfd = -1, .spec = spec, .max_bytes = c->max_bytes, .pfd = -1};
    struct archive *a = NULL;
    plain_reader pr = {0};
    int rc = -1;
    char p[PATHBUF];
    snprintf(p, sizeof p, "%s/root", tmp);
    if (mkdir(p, 0755) != 0 || (x.rootfd = open(p, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0) {
        fetch_error_set(fail, 500, "UNKNOWN", "blobserve: create %s: %s", p, strerror(errno));
        goto out;
    }
    r.buf = malloc(READ_BUF_BYTES);
    if (!r.buf) {
        fetch_error_set(fail, 500, "UNKNOWN", "blobserve: out of memory");
        goto out;
    }

    /* The compressed bytes: the cached blob, or the (shared) running fetch. */
    char e2[512];
    uint64_t blob_size = 0;
    int have = store_blob_open(src->st, spec->digest, &r.fd, &blob_size, e2, sizeof e2);
    if (have < 0) {
        fetch_error_set(fail, 500, "UNKNOWN", "blobserve: layer %s: %s", spec->digest, e2);
        goto out;
    }
    if (have == 0) {
        int now_cached = 0;
        r.x = fetch_blob(src->fetches, src->u, src->repository, spec->digest, -1, &now_cached, e2, sizeof e2);
        if (!r.x) {
            if (!now_cached || store_blob_open(src->st, spec->digest, &r.fd, &blob_size, e2, sizeof e2) != 1) {
                fetch_error_set(fail, 500, "UNKNOWN", "blobserve: layer %s: %s", spec->digest, e2);
                goto out;
            }
        } else {
            int64_t announced;
            fetch_error fe = {0};
            if (fetch_wait_ready(r.x, &announced, &fe) != 0) {
                layer_fetch_failed(fail, &fe, spec);
                goto out;
            }
        }
    }

    /* Two readers: one decompresses (gzip, zstd, or none), one reads the
     * tar from what it gives (read_data says why). */
    pr.unz = archive_read_new();
    a = archive_read_new();
    if (!pr.unz || !a) {
        fetch_error_set(fail, 500, "UNKNOWN", "blobserve: out of memory");
        goto out;
    }
    archive_read_support_filter_all(pr.unz);
    archive_read_support_format_raw(pr.unz);
    archive_read_support_format_empty(pr.unz);
    struct archive_entry *raw;
    if (archive_read_open(pr.unz, &r, NULL, src_read, NULL) != ARCHIVE_OK) {
        const char *e = archive_error_string(pr.unz);
        fetch_error_set(fail, 502, "UNKNOWN", "layer %s: cannot decompress: %s", spec->digest,
                        e ? e : "the compressed stream is cut short or corrupt");
        goto bad_content;
    }
    int rh = archive_read_next_header(pr.unz, &raw);
    if (rh == ARCHIVE_EOF) {
        pr.ended = true; /* an empty blob: an empty tar */
    } else if (rh < ARCHIVE_WARN) {
        fetch_error_set(fail, 502, "UNKNOWN", "layer %s: cannot decompress: %s", spec->digest,
                        archive_error_string(pr.unz));
        goto bad_content;
    }
    archive_read_support_format_tar(a);
    archive_read_support_format_empty(a);
    if (archive_read_open(a, &pr, NULL, plain_read, NULL) != ARCHIVE_OK) {
        fetch_error_set(fail, 502, "UNKNOWN", "layer %s: not a tar archive: %s", spec->digest,
                        pr.failed ? pr.why : archive_error_string(a));
        goto bad_content;
    }
    x.plain = &pr;
    while (!x.ended) {
        struct archive_entry *e;
        int h = archive_read_next_header(a, &e);
        if (h == ARCHIVE_EOF) break;
        if (h < ARCHIVE_WARN) {
            fetch_error_set(fail, 502, "UNKNOWN", "layer %s: broken tar: %s", spec->digest,
                            pr.failed ? pr.why : archive_error_string(a));
            goto bad_content;
        }
        x.data_read = false;
        int w = write_entry(&x, a, e);
        /* Entries not written as files still have their data read through,
         * so that the end of the tar is found by read_data alone. */
        uint64_t ignored;
        if (w != XW_FATAL && !x.data_read) w = read_data(&x, a, e, -1, archive_entry_pathname(e), &ignored);
        if (w == XW_FATAL) {
            /* Over the cap or unreadable from the tar: the layer's bytes; else our side (500). */
            int st = strstr(x.err, "cache cap") || strstr(x.err, "from the tar") ? 502 : 500;
            fetch_error_set(fail, st, "UNKNOWN", "layer %s: %s", spec->digest, x.err);
            if (st == 502) goto bad_content;
            goto out;
        }
    }
    /* The tar may end before the blob does: the digest is only known to be
     * right once the whole blob arrived. */
    if (download_failed(&r, spec, fail)) goto out;
    char meta[PATHBUF];
    snprintf(meta, sizeof meta, "%s/meta", tmp);
    FILE *mf = fopen(meta, "w");
    if (!mf ||
        fprintf(mf, "bytes %llu\nentries %lu\nrefused %lu\nboot %s\n", (unsigned long long)x.bytes, x.entries,
                x.refused, c->boot_id[0] ? c->boot_id : "-") < 0 ||
        fclose(mf) != 0) {
        fetch_error_set(fail, 500, "UNKNOWN", "blobserve: write %s: %s", meta, strerror(errno));
        goto out;
    }
    /* Durability: a tree stamped with this boot's id is trusted after a
     * restart in the same boot (the page cache survives a process crash);
     * after a reboot only if a clean close synced it (load_layers). Without
     * a boot id, sync each tree before it is published. */
    if (!c->boot_id[0]) syncfs(x.rootfd);
    char final[PATHBUF];
    snprintf(final, sizeof final, "%s/layers/%s", c->dir, key);
    if (rename(tmp, final) != 0) {
        if (errno == EEXIST || errno == ENOTEMPTY) {
            /* A stale tree no table entry knows of (an earlier crash). */
            char stale[PATHBUF];
            pthread_mutex_lock(&c->mu);
            snprintf(stale, sizeof stale, "%s/tmp/stale-%s-%lu", c->dir, key, ++c->seq);
            pthread_mutex_unlock(&c->mu);
            if (rename(final, stale) == 0) rm_tree(stale);
        }
        if (rename(tmp, final) != 0) {
            fetch_error_set(fail, 500, "UNKNOWN", "blobserve: publish %s: %s", final, strerror(errno));
            goto out;
        }
    }
    snprintf(p, sizeof p, "%s/root", final);
    *rootfd_out = open(p, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (*rootfd_out < 0) {
        fetch_error_set(fail, 500, "UNKNOWN", "blobserve: open %s: %s", p, strerror(errno));
        rm_tree(final);
        goto out_published;
    }
    *bytes = x.bytes;
    rc = 0;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    log_info("blobserve: extracted layer %s: %llu bytes, %lu entries, %lu refused, %.3f s", key,
             (unsigned long long)x.bytes, x.entries, x.refused,
             (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    goto out_published;
bad_content:
    /* The layer's bytes failed, unless they were not the blob's: while a
     * download is tailed, a transfer that fails its digest can look like a
     * broken tar first. The fetch's outcome decides. */
    if (download_failed(&r, spec, fail)) goto out;
    *bad_bytes = true;
out:
    rm_tree(tmp);
out_published:
    pthread_mutex_lock(&c->mu);
    c->stats.refused_entries += x.refused;
    pthread_mutex_unlock(&c->mu);
    if (a) archive_read_free(a);
    if (pr.unz) archive_read_free(pr.unz);
    forget_parent(&x);
    if (x.rootfd >= 0) close(x.rootfd);
    if (r.fd >= 0) close(r.fd);
    if (r.x) fetch_release(r.x);
    free(r.buf);
    return rc;
}

/* ---------- public face ---------- */

typedef struct {
    bs_layer *l;
    struct timespec mtime;
} loaded;

static int cmp_loaded(const void *a, const void *b) {
    const loaded *x = a, *y = b;
    if (x->mtime.tv_sec != y->mtime.tv_sec) return x->mtime.tv_sec < y->mtime.tv_sec ? -1 : 1;
    if (x->mtime.tv_nsec != y->mtime.tv_nsec) return x->mtime.tv_nsec < y->mtime.tv_nsec ? -1 : 1;
    return 0;
}

static bool valid_key(const char *k) {
    size_t n = strlen(k);
    if (n != 64 && n != 64 + 17) return false;
    if (strspn(k, "0123456789abcdef") < 64) return false;
    return n == 64 || (k[64] == '-' && strspn(k + 65, "0123456789abcdef") == 16);
}

/* Take in the layers an earlier run published. */
static void load_layers(bs_cache *c) {
    char p[PATHBUF], synced_boot[64];
    snprintf(p, sizeof p, "%s/synced-boot", c->dir);
    read_line(p, synced_boot, sizeof synced_boot);
    snprintf(p, sizeof p, "%s/layers", c->dir);
    DIR *d = opendir(p);
    if (!d) return;
    loaded *list = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char lp[PATHBUF], mp[PATHBUF];
        snprintf(lp, sizeof lp, "%s/%s", p, e->d_name);
        snprintf(mp, sizeof mp, "%s/meta", lp);
        unsigned long long bytes = 0;
        unsigned long entries = 0, refused = 0;
        char boot[64] = "";
        struct stat st;
        FILE *f = valid_key(e->d_name) ? fopen(mp, "r") : NULL;
        bool ok = f &&
                  fscanf(f, "bytes %llu entries %lu refused %lu boot %63s", &bytes, &entries, &refused, boot) == 4 &&
                  fstat(fileno(f), &st) == 0;
        if (f) fclose(f);
        /* Trusted: written in this boot, or synced by a clean close before
         * the reboot (then stamped with this boot). Anything else may have
         * lost data in a crash of the machine: extracted again. */
        bool this_boot = ok && c->boot_id[0] && strcmp(boot, c->boot_id) == 0;
        bool synced = ok && synced_boot[0] && strcmp(boot, synced_boot) == 0;
        bool unknown = ok && !c->boot_id[0] && strcmp(boot, "-") == 0; /* synced when published */
        if (ok && !this_boot && !synced && !unknown) {
            log_warn("blobserve: layer %s was extracted before a restart of the machine and never synced; "
                     "removed",
                     e->d_name);
            ok = false;
        }
        if (ok && synced && !this_boot) {
            char text[256];
            snprintf(text, sizeof text, "bytes %llu\nentries %lu\nrefused %lu\nboot %s\n", bytes, entries, refused,
                     c->boot_id);
            if (write_small_file(mp, text) != 0)
                ok = false;
            else
                stat(mp, &st);
        }
        bs_layer *l = ok ? calloc(1, sizeof *l) : NULL;
        if (l) {
            snprintf(lp + strlen(lp), sizeof lp - strlen(lp), "/root");
            l->rootfd = open(lp, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        }
        if (!l || l->rootfd < 0) {
            log_warn("blobserve: %s/%s is not a complete layer; removed", p, e->d_name);
            if (l) free_layer(l);
            snprintf(lp, sizeof lp, "%s/%s", p, e->d_name);
            rm_tree(lp);
            continue;
        }
        snprintf(l->key, sizeof l->key, "%s", e->d_name);
        l->state = L_READY;
        l->bytes = bytes;
        l->listed = true;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            loaded *nl = realloc(list, cap * sizeof *nl);
            if (!nl) {
                free_layer(l);
                break;
            }
            list = nl;
        }
        list[n].l = l;
        list[n].mtime = st.st_mtim;
        n++;
    }
    closedir(d);
    if (n) qsort(list, n, sizeof *list, cmp_loaded);
    for (size_t i = 0; i < n; i++) {
        list[i].l->last_used = ++c->clock; /* extraction order stands for use order */
        list[i].l->next = c->layers;
        c->layers = list[i].l;
        c->total += list[i].l->bytes;
    }
    free(list);
    if (n)
        log_info("blobserve: %zu extracted layer%s in the cache (%llu bytes)", n, n == 1 ? "" : "s",
                 (unsigned long long)c->total);
}

static int mkdir_0700(const char *path, char *err, size_t errlen) {
    if (mkdir(path, 0700) == 0) return 0;
    struct stat st;
    if (errno != EEXIST || lstat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        errmsg_set(err, errlen, "blobserve.cache.dir: cannot create folder %s: %s", path,
                   errno == EEXIST ? "exists and is not a folder" : strerror(errno));
        return -1;
    }
    return 0;
}

bs_cache *bs_cache_open(const char *dir, uint64_t max_bytes, char *err, size_t errlen) {
    bs_cache *c = calloc(1, sizeof *c);
    if (!c || !(c->dir = strdup(dir))) {
        free(c);
        errmsg_set(err, errlen, "blobserve: out of memory");
        return NULL;
    }
    c->lock_fd = -1;
    c->max_bytes = max_bytes;
    c->stats.max_bytes = max_bytes;
    read_line("/proc/sys/kernel/random/boot_id", c->boot_id, sizeof c->boot_id);
    if (strspn(c->boot_id, "0123456789abcdef-") != strlen(c->boot_id)) c->boot_id[0] = '\0';
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    char p[PATHBUF];
    static const char *const sub[] = {"", "/layers", "/tmp", NULL};
    for (const char *const *s = sub; *s; s++) {
        snprintf(p, sizeof p, "%s%s", dir, *s);
        if (mkdir_0700(p, err, errlen) != 0) {
            bs_cache_close(c);
            return NULL;
        }
    }
    /* One process per folder: a second one would clear tmp/ under the
     * first one's extractions and evict what it serves. */
    if ((c->lock_fd = dir_lock_take(dir, "blobserve.cache.dir", err, errlen)) < 0) {
        bs_cache_close(c);
        return NULL;
    }
    /* Half-made extractions and unfinished deletions of an earlier run. */
    snprintf(p, sizeof p, "%s/tmp", dir);
    DIR *d = opendir(p);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            rm_tree_at(dirfd(d), e->d_name);
        }
        closedir(d);
    }
    load_layers(c);
    victims v = {0};
    pthread_mutex_lock(&c->mu);
    evict_locked(c, &v);
    pthread_mutex_unlock(&c->mu);
    victims_delete(&v);
    c->opened = true;
    return c;
}

void bs_cache_close(bs_cache *c) {
    if (!c) return;
    /* A clean close: everything extracted in this boot reaches the disk,
     * and the record says so (load_layers trusts it after a reboot). */
    if (c->opened && c->boot_id[0]) {
        int fd = open(c->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        char p[PATHBUF];
        snprintf(p, sizeof p, "%s/synced-boot", c->dir);
        if (fd < 0 || syncfs(fd) != 0 || write_small_file(p, c->boot_id) != 0)
            log_warn("blobserve: could not sync the extraction cache %s: %s", c->dir, strerror(errno));
        if (fd >= 0) close(fd);
    }
    for (bs_layer *l = c->layers, *next; l; l = next) {
        next = l->next;
        if (l->refs > 0) log_warn("blobserve: layer %s still held at close", l->key);
        free_layer(l);
    }
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    if (c->lock_fd >= 0) close(c->lock_fd); /* releases the flock */
    free(c->dir);
    free(c);
}

/* Drop one reference; the last one of an unlisted layer frees it. */
static void unref_locked(bs_layer *l) {
    if (--l->refs == 0 && !l->listed) free_layer(l);
}

bs_layer *bs_cache_acquire(bs_cache *c, const bs_layer_spec *spec, const bs_source *src, fetch_error *e, bool *final) {
    *final = false;
    char key[96];
    if (make_key(spec, key, sizeof key) != 0) {
        fetch_error_set(e, 500, "UNKNOWN", "blobserve: %s is not a sha256 layer digest", spec->digest);
        return NULL;
    }
    pthread_mutex_lock(&c->mu);
    bs_layer *l = find_locked(c, key);
    if (l) {
        l->refs++;
        if (l->state == L_EXTRACTING) {
            c->stats.waits++;
            while (l->state == L_EXTRACTING) pthread_cond_wait(&c->cv, &c->mu);
        } else {
            c->stats.hits++;
        }
        if (l->state == L_READY) {
            l->last_used = ++c->clock;
            pthread_mutex_unlock(&c->mu);
            return l;
        }
        *e = l->err;
        *final = l->err_final;
        unref_locked(l);
        pthread_mutex_unlock(&c->mu);
        return NULL;
    }
    l = calloc(1, sizeof *l);
    if (!l) {
        pthread_mutex_unlock(&c->mu);
        fetch_error_set(e, 500, "UNKNOWN", "blobserve: out of memory");
        return NULL;
    }
    snprintf(l->key, sizeof l->key, "%s", key);
    l->state = L_EXTRACTING;
    l->refs = 1;
    l->rootfd = -1;
    l->listed = true;
    l->next = c->layers;
    c->layers = l;
    pthread_mutex_unlock(&c->mu);

    /* This thread extracts; later comers wait on c->cv. */
    uint64_t bytes = 0;
    int rootfd = -1;
    bool bad_bytes = false;
    int rc = extract(c, spec, src, key, &bytes, &rootfd, &bad_bytes, e);

    victims v = {0};
    pthread_mutex_lock(&c->mu);
    if (rc == 0) {
        l->state = L_READY;
        l->bytes = bytes;
        l->rootfd = rootfd;
        l->last_used = ++c->clock;
        c->total += bytes;
        c->stats.extractions++;
        evict_locked(c, &v);
    } else {
        l->state = L_FAILED;
        l->err = *e;
        l->err_final = bad_bytes;
        *final = bad_bytes;
        unlist_locked(c, l); /* the next request tries again */
        c->stats.extraction_failures++;
        unref_locked(l);
        l = NULL;
    }
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    victims_delete(&v);
    /* An upstream's 404 is an answer, not a failure of ours. */
    if (rc != 0) log_msg(upstream_answer_log_level(e->http_status), "blobserve: layer %s: %s", key, e->message);
    return l;
}

bs_layer *bs_cache_try_acquire(bs_cache *c, const bs_layer_spec *spec) {
    char key[96];
    if (make_key(spec, key, sizeof key) != 0) return NULL;
    pthread_mutex_lock(&c->mu);
    bs_layer *l = find_locked(c, key);
    if (l && l->state == L_READY) {
        l->refs++;
        l->last_used = ++c->clock;
        c->stats.hits++;
    } else {
        l = NULL;
    }
    pthread_mutex_unlock(&c->mu);
    return l;
}

void bs_cache_release(bs_cache *c, bs_layer *l) {
    if (!l) return;
    victims v = {0};
    pthread_mutex_lock(&c->mu);
    if (l->refs == 1 && l->listed && c->total > c->max_bytes) {
        l->refs = 0;
        evict_locked(c, &v); /* may free l */
    } else {
        unref_locked(l);
    }
    pthread_mutex_unlock(&c->mu);
    victims_delete(&v);
}

void bs_cache_prefetch(bs_cache *c, const bs_layer_spec *spec, const bs_source *src) {
    char key[96];
    if (make_key(spec, key, sizeof key) != 0) return;
    pthread_mutex_lock(&c->mu);
    bool known = find_locked(c, key) != NULL;
    pthread_mutex_unlock(&c->mu);
    if (known || store_blob_exists(src->st, spec->digest)) return;
    int now_cached = 0;
    char err[512];
    fetch *x = fetch_blob(src->fetches, src->u, src->repository, spec->digest, -1, &now_cached, err, sizeof err);
    if (x)
        fetch_release(x); /* the fetch goes on by itself */
    else if (!now_cached)
        log_warn("blobserve: prefetch of layer %s: %s", spec->digest, err);
}

int bs_layer_rootfd(const bs_layer *l) { return l->rootfd; }
const char *bs_layer_key(const bs_layer *l) { return l->key; }

void bs_cache_get_stats(bs_cache *c, bs_cache_stats *out) {
    pthread_mutex_lock(&c->mu);
    *out = c->stats;
    out->bytes = c->total;
    out->max_bytes = c->max_bytes;
    out->layers = 0;
    out->held = 0;
    for (bs_layer *l = c->layers; l; l = l->next) {
        out->layers++;
        if (l->refs > 0) out->held++;
    }
    pthread_mutex_unlock(&c->mu);
}
