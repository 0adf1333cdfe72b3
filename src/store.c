#include "regfacade/store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/cluster.h"
#include "regfacade/digest.h"
#include "regfacade/dir_lock.h"
#include "regfacade/json.h"
#include "regfacade/ref.h"
#include "regfacade/log.h"
#include "regfacade/metrics.h"

/* A reader of a cached blob: an open fd of the blob's file. The pin holds
 * while that fd still refers to that file (same device and inode), so a
 * reader that closes its fd without store_blob_unpin() (libmicrohttpd
 * closes a sendfile response's fd itself) releases the pin all the same;
 * stale pins are pruned whenever the entry's pins are looked at. */
typedef struct blob_pin blob_pin;
struct blob_pin {
    blob_pin *next;
    int fd;
    dev_t dev;
    ino_t ino;
};

/* One blob in blobs/: its size and place in the LRU list, and whether its
 * bytes were hashed in this process: the file as it was then (inode, size,
 * change and modify times; any write changes them) is the one known right.
 * A verifying entry is never removed (its verifier holds a pointer). */
typedef struct blob_entry blob_entry;
struct blob_entry {
    blob_entry *hnext;         /* hash chain */
    blob_entry *newer, *older; /* LRU list: s->newest ... s->oldest */
    uint64_t size;
    blob_pin *pins;
    bool verified, verifying;
    dev_t vdev;
    ino_t vino;
    off_t vsize;
    struct timespec vctime, vmtime;
    time_t used; /* last open or commit (at start: the file's atime or mtime) */
    char hex[65];
};

struct store {
    char *dir;
    struct cluster *cluster; /* store_set_cluster: set once before any request */
    uint64_t max_bytes;
    pthread_mutex_t lock;
    pthread_cond_t verified_cv; /* an entry's verifying went false */
    unsigned long spool_seq;
    /* The index of blobs/, guarded by lock: built by a scan at open,
     * updated by commits, opens and evictions. */
    blob_entry **buckets;
    size_t nbuckets, nentries;
    blob_entry *newest, *oldest;
    uint64_t total; /* bytes of every indexed blob */
    store_stats stats;
    int lock_fd; /* DIR/lock, flock'ed while the store is open */
};

/* ---------- the index ---------- */

static size_t hex_hash(const char *hex) {
    size_t h = 0;
    for (int i = 0; i < 12 && hex[i]; i++) h = h * 16 + (size_t)(hex[i] <= '9' ? hex[i] - '0' : hex[i] - 'a' + 10);
    return h;
}

static blob_entry *index_find(store *s, const char *hex) {
    if (!s->nbuckets) return NULL;
    for (blob_entry *e = s->buckets[hex_hash(hex) % s->nbuckets]; e; e = e->hnext)
        if (strcmp(e->hex, hex) == 0) return e;
    return NULL;
}

static void lru_unlink(store *s, blob_entry *e) {
    if (e->newer)
        e->newer->older = e->older;
    else
        s->newest = e->older;
    if (e->older)
        e->older->newer = e->newer;
    else
        s->oldest = e->newer;
    e->newer = e->older = NULL;
}

static void lru_push_newest(store *s, blob_entry *e) {
    e->older = s->newest;
    e->newer = NULL;
    if (s->newest) s->newest->newer = e;
    s->newest = e;
    if (!s->oldest) s->oldest = e;
}

static void index_touch(store *s, blob_entry *e) {
    e->used = time(NULL);
    if (s->newest == e) return;
    lru_unlink(s, e);
    lru_push_newest(s, e);
}

static int index_grow(store *s) {
    size_t n = s->nbuckets ? s->nbuckets * 2 : 1024;
    blob_entry **b = calloc(n, sizeof *b);
    if (!b) return -1;
    for (size_t i = 0; i < s->nbuckets; i++) {
        for (blob_entry *e = s->buckets[i], *next; e; e = next) {
            next = e->hnext;
            size_t k = hex_hash(e->hex) % n;
            e->hnext = b[k];
            b[k] = e;
        }
    }
    free(s->buckets);
    s->buckets = b;
    s->nbuckets = n;
    return 0;
}

/* The entry of hex, added as the newest when new (size updated when
 * known). NULL on allocation failure. */
static blob_entry *index_add(store *s, const char *hex, uint64_t size) {
    blob_entry *e = index_find(s, hex);
    if (e) {
        s->total = s->total - e->size + size;
        e->size = size;
        index_touch(s, e);
        return e;
    }
    if (s->nentries >= s->nbuckets && index_grow(s) != 0) return NULL;
    e = calloc(1, sizeof *e);
    if (!e) return NULL;
    snprintf(e->hex, sizeof e->hex, "%s", hex);
    e->size = size;
    e->used = time(NULL);
    size_t k = hex_hash(hex) % s->nbuckets;
    e->hnext = s->buckets[k];
    s->buckets[k] = e;
    lru_push_newest(s, e);
    s->nentries++;
    s->total += size;
    return e;
}

static void index_remove(store *s, blob_entry *e) {
    blob_entry **pp = &s->buckets[hex_hash(e->hex) % s->nbuckets];
    while (*pp && *pp != e) pp = &(*pp)->hnext;
    if (*pp) *pp = e->hnext;
    lru_unlink(s, e);
    s->nentries--;
    s->total -= e->size;
    for (blob_pin *p = e->pins, *next; p; p = next) {
        next = p->next;
        free(p);
    }
    free(e);
}

/* Drop the pins whose fd no longer refers to the pinned file; true when a
 * live one is left. */
static bool pins_prune(blob_entry *e) {
    for (blob_pin **pp = &e->pins; *pp;) {
        struct stat st;
        blob_pin *p = *pp;
        if (fstat(p->fd, &st) == 0 && st.st_dev == p->dev && st.st_ino == p->ino) {
            pp = &p->next;
        } else {
            *pp = p->next;
            free(p);
        }
    }
    return e->pins != NULL;
}

static void pin_remove(blob_entry *e, int fd) {
    for (blob_pin **pp = &e->pins; *pp; pp = &(*pp)->next) {
        if ((*pp)->fd == fd) {
            blob_pin *p = *pp;
            *pp = p->next;
            free(p);
            return;
        }
    }
}

static void pin_add(blob_entry *e, int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return;
    pins_prune(e);
    blob_pin *p = calloc(1, sizeof *p);
    if (!p) return; /* unpinned: at worst it may be evicted while read (the open fd still reads it whole) */
    p->fd = fd;
    p->dev = st.st_dev;
    p->ino = st.st_ino;
    p->next = e->pins;
    e->pins = p;
}

static int blob_path_hex(const store *s, const char *hex, char *out, size_t outlen) {
    int n = snprintf(out, outlen, "%s/blobs/sha256/%.2s/%s", s->dir, hex, hex);
    return n > 0 && (size_t)n < outlen ? 0 : -1;
}

/* Remove least recently used blobs until the total fits max_bytes; pinned
 * blobs (being read) are skipped. Called with the lock held. */
static void evict_locked(store *s) {
    blob_entry *e = s->oldest;
    while (s->total > s->max_bytes && e) {
        blob_entry *newer = e->newer;
        if (!e->verifying && !pins_prune(e)) {
            char p[PATH_MAX];
            uint64_t size = e->size;
            if (blob_path_hex(s, e->hex, p, sizeof p) == 0 && unlink(p) != 0 && errno != ENOENT)
                log_error("store: evicting %s: %s", p, strerror(errno));
            index_remove(s, e);
            s->stats.evicted++;
            s->stats.evicted_bytes += size;
            metrics_cache_evicted(size);
        }
        e = newer;
    }
}

/* ---------- verification ---------- */

static void mark_verified(blob_entry *e, const struct stat *st) {
    e->verified = true;
    e->vdev = st->st_dev;
    e->vino = st->st_ino;
    e->vsize = st->st_size;
    e->vctime = st->st_ctim;
    e->vmtime = st->st_mtim;
}

static bool same_file_state(const struct stat *a, const struct stat *b) {
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* Is the file (st) still the one that was verified? */
static bool still_verified(const blob_entry *e, const struct stat *st) {
    struct stat v = {
        .st_dev = e->vdev, .st_ino = e->vino, .st_size = e->vsize, .st_ctim = e->vctime, .st_mtim = e->vmtime};
    return e->verified && same_file_state(&v, st);
}

#define HASH_CHUNK (1024 * 1024)

/* sha256 of fd from byte 0 to its end, in 1 MiB reads; pace (if any) is
 * called after each and may stop the hash. 0 (out, *len set), -1 read
 * error (err set), -2 stopped by pace. */
static int hash_fd(int fd, store_pace_fn pace, void *ud, char out[DIGEST_STRING_LEN], uint64_t *len, char *err,
                   size_t errlen) {
    digest_ctx *d = digest_new();
    char *buf = malloc(HASH_CHUNK);
    int rc = 0;
    *len = 0;
    if (!d || !buf) {
        snprintf(err, errlen, "out of memory");
        rc = -1;
    }
    while (rc == 0) {
        ssize_t n = pread(fd, buf, HASH_CHUNK, (off_t)*len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            snprintf(err, errlen, "read at %llu: %s", (unsigned long long)*len, strerror(errno));
            rc = -1;
            break;
        }
        if (n == 0) break;
        if (digest_update(d, buf, (size_t)n) != 0) {
            snprintf(err, errlen, "sha256 failed");
            rc = -1;
            break;
        }
        *len += (uint64_t)n;
        if (pace && pace(ud, (uint64_t)n) != 0) rc = -2;
    }
    if (rc == 0 && digest_final(d, out) != 0) {
        snprintf(err, errlen, "sha256 failed");
        rc = -1;
    }
    free(buf);
    digest_free(d);
    return rc;
}

/* Move a blob that failed verification out of blobs/ into quarantine/ and
 * forget it: it is never served again, and the next request fetches it
 * anew. Only when blobs/ still holds the file fd has open (a blob fetched
 * again meanwhile is left alone). Called with the lock held; e must not be
 * verifying. */
static void quarantine_locked(store *s, blob_entry *e, int fd, const char *reason) {
    char p[PATH_MAX], q[PATH_MAX];
    struct stat a, b;
    if (blob_path_hex(s, e->hex, p, sizeof p) != 0 || fstat(fd, &a) != 0 || lstat(p, &b) != 0 || a.st_dev != b.st_dev ||
        a.st_ino != b.st_ino)
        return;
    snprintf(q, sizeof q, "%s/quarantine/sha256-%s-%lld-%lu", s->dir, e->hex, (long long)time(NULL), ++s->spool_seq);
    if (rename(p, q) != 0) {
        log_error("store: quarantining sha256:%s: rename %s to %s: %s; removing it instead", e->hex, p, q,
                  strerror(errno));
        if (unlink(p) != 0 && errno != ENOENT) log_error("store: removing %s: %s", p, strerror(errno));
        q[0] = '\0';
    }
    log_error("store: cached blob sha256:%s failed verification (%s)%s%s; it is fetched again when next asked for",
              e->hex, reason, q[0] ? ": moved to " : "", q);
    s->stats.quarantined++;
    metrics_cache_quarantined(e->size);
    index_remove(s, e);
}

/* The verdict on the bytes of fd (opened: its state when it was opened),
 * with the lock held and e not verifying: right, and blobs/ still holds
 * that file unchanged, marks e verified (1); wrong, or changed while it was
 * hashed (a cached file never changes), quarantines it (0). */
static int settle_locked(store *s, blob_entry *e, int fd, const struct stat *opened, bool right, uint64_t len,
                         const char *reason) {
    struct stat now, there;
    char p[PATH_MAX];
    if (right && fstat(fd, &now) == 0 && same_file_state(opened, &now)) {
        if (blob_path_hex(s, e->hex, p, sizeof p) == 0 && lstat(p, &there) == 0 && there.st_dev == now.st_dev &&
            there.st_ino == now.st_ino) {
            /* The size as verified; not a use (a scrub must not reorder
             * what is evicted first). */
            s->total = s->total - e->size + len;
            e->size = len;
            mark_verified(e, &now);
        }
        return 1;
    }
    quarantine_locked(s, e, fd, right ? "the file changed while it was hashed" : reason);
    return 0;
}

/* Hash fd (pinned on e; st its state when opened) with the lock released;
 * the caller set e->verifying. Returns with the lock held and e->verifying
 * cleared: 1 verified, 0 quarantined (e is gone), -1 read error (reason
 * set; nothing changed). */
static int verify_locked(store *s, blob_entry *e, int fd, const struct stat *st, char *reason, size_t rlen) {
    char got[DIGEST_STRING_LEN], err[256];
    uint64_t len = 0;
    pthread_mutex_unlock(&s->lock);
    int hr = hash_fd(fd, NULL, NULL, got, &len, err, sizeof err);
    metrics_cache_verified(len);
    pthread_mutex_lock(&s->lock);
    e->verifying = false;
    pthread_cond_broadcast(&s->verified_cv);
    if (hr != 0) {
        snprintf(reason, rlen, "%s", err);
        return -1;
    }
    snprintf(reason, rlen, "its %llu bytes hash to %s", (unsigned long long)len, got);
    return settle_locked(s, e, fd, st, strcmp(got + 7, e->hex) == 0, len, reason);
}

/* The entry of hex once no one is verifying it (NULL: not indexed).
 * Called with the lock held; may wait. */
static blob_entry *entry_settled(store *s, const char *hex) {
    blob_entry *e;
    while ((e = index_find(s, hex)) && e->verifying) pthread_cond_wait(&s->verified_cv, &s->lock);
    return e;
}

static bool is_hex64(const char *s) { return strlen(s) == 64 && strspn(s, "0123456789abcdef") == 64; }

typedef struct {
    char hex[65];
    uint64_t size;
    time_t used;
} scan_item;

static int by_used(const void *a, const void *b) {
    const scan_item *x = a, *y = b;
    return x->used < y->used ? -1 : x->used > y->used ? 1 : strcmp(x->hex, y->hex);
}

/* Index every blob in blobs/sha256/xx/, oldest use (atime or mtime, the
 * later) first, so the LRU order survives a restart as far as the
 * filesystem kept it. */
static int index_scan(store *s, char *err, size_t errlen) {
    char top[PATH_MAX];
    snprintf(top, sizeof top, "%s/blobs/sha256", s->dir);
    DIR *d = opendir(top);
    if (!d) {
        snprintf(err, errlen, "store: open %s: %s", top, strerror(errno));
        return -1;
    }
    scan_item *items = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    int rc = 0;
    while (rc == 0 && (de = readdir(d)) != NULL) {
        if (strlen(de->d_name) != 2 || strspn(de->d_name, "0123456789abcdef") != 2) continue;
        char sub[PATH_MAX];
        snprintf(sub, sizeof sub, "%s/%s", top, de->d_name);
        /* O_NOFOLLOW: a symlink in place of blobs/sha256/xx is never
         * followed (eviction would unlink files wherever it pointed). */
        int sfd = open(sub, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        DIR *d2 = sfd >= 0 ? fdopendir(sfd) : NULL;
        if (!d2) {
            if (sfd >= 0) close(sfd);
            continue;
        }
        struct dirent *f;
        while ((f = readdir(d2)) != NULL) {
            if (!is_hex64(f->d_name) || strncmp(f->d_name, de->d_name, 2) != 0) continue;
            char p[PATH_MAX];
            struct stat st;
            snprintf(p, sizeof p, "%s/%s", sub, f->d_name);
            if (lstat(p, &st) != 0 || !S_ISREG(st.st_mode)) continue;
            if (n == cap) {
                size_t nc = cap ? cap * 2 : 256;
                scan_item *ni = realloc(items, nc * sizeof *ni);
                if (!ni) {
                    snprintf(err, errlen, "store: out of memory scanning %s", top);
                    rc = -1;
                    break;
                }
                items = ni;
                cap = nc;
            }
            snprintf(items[n].hex, sizeof items[n].hex, "%s", f->d_name);
            items[n].size = (uint64_t)st.st_size;
            items[n].used = st.st_atime > st.st_mtime ? st.st_atime : st.st_mtime;
            n++;
        }
        closedir(d2);
    }
    closedir(d);
    if (rc == 0 && n) qsort(items, n, sizeof *items, by_used);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        blob_entry *e = index_add(s, items[i].hex, items[i].size);
        if (!e) {
            snprintf(err, errlen, "store: out of memory indexing %s", top);
            rc = -1;
        } else {
            e->used = items[i].used;
        }
    }
    free(items);
    return rc;
}

static int mkdir_0700(const char *path, char *err, size_t errlen) {
    if (mkdir(path, 0700) == 0) return 0;
    if (errno != EEXIST) {
        snprintf(err, errlen, "store: mkdir %s: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    /* lstat: a symlink where a cache folder belongs is refused, never followed. */
    if (lstat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "store: %s exists and is not a folder (a symlink is not followed)", path);
        return -1;
    }
    /* An existing folder of ours is made private too: the cache holds
     * images that need not be public. */
    if (st.st_uid == geteuid() && (st.st_mode & 0077)) {
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 || fchmod(fd, 0700) != 0) {
            snprintf(err, errlen, "store: chmod 0700 %s: %s", path, strerror(errno));
            if (fd >= 0) close(fd);
            return -1;
        }
        close(fd);
    }
    return 0;
}

static void clear_tmp(const char *tmpdir) {
    DIR *d = opendir(tmpdir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
        unlink(p);
    }
    closedir(d);
}

int store_dir_check(const char *dir, char *err, size_t errlen) {
    struct stat st;
    if (lstat(dir, &st) != 0) {
        if (mkdir(dir, 0700) != 0) { /* the call store_open makes, with its message */
            snprintf(err, errlen, "store: mkdir %s: %s", dir, strerror(errno));
            return -1;
        }
        if (rmdir(dir) != 0) log_warn("check: made and could not remove %s: %s", dir, strerror(errno));
        return 0;
    }
    if (!S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "store: %s exists and is not a folder (a symlink is not followed)", dir);
        return -1;
    }
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/.check-%ld", dir, (long)getpid());
    int fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "store: cache.dir %s: cannot create a file in it: %s", dir, strerror(errno));
        return -1;
    }
    close(fd);
    unlink(p);
    return 0;
}

/* One process per cache folder (dir_lock.h): a second one would empty tmp/
 * under the first one's spools (its commits then fail) and evict what it
 * serves. */
static int lock_dir(store *s, char *err, size_t errlen) {
    char why[1200];
    int fd = dir_lock_take(s->dir, "cache.dir", why, sizeof why);
    if (fd < 0) {
        snprintf(err, errlen, "store: %s", why);
        return -1;
    }
    s->lock_fd = fd;
    return 0;
}

store *store_open(const char *dir, uint64_t max_bytes, char *err, size_t errlen) {
    store *s = calloc(1, sizeof *s);
    if (!s || !(s->dir = strdup(dir))) {
        free(s);
        snprintf(err, errlen, "store: out of memory");
        return NULL;
    }
    s->lock_fd = -1;
    s->max_bytes = max_bytes;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->verified_cv, NULL);
    static const char *const subdirs[] = {"",       "/blobs",     "/blobs/sha256", "/tmp",        "/tags",
                                          "/links", "/generated", "/made",         "/quarantine", NULL};
    for (const char *const *sd = subdirs; *sd; sd++) {
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s%s", dir, *sd);
        if (mkdir_0700(p, err, errlen) != 0) {
            store_close(s);
            return NULL;
        }
    }
    if (lock_dir(s, err, errlen) != 0) { /* before tmp/ is touched */
        store_close(s);
        return NULL;
    }
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s/tmp", dir);
    clear_tmp(tmp); /* partial spools of an earlier run are never trusted */
    if (index_scan(s, err, errlen) != 0) {
        store_close(s);
        return NULL;
    }
    pthread_mutex_lock(&s->lock);
    evict_locked(s); /* the cap may have been lowered since the last run */
    pthread_mutex_unlock(&s->lock);
    return s;
}

void store_close(store *s) {
    if (!s) return;
    while (s->oldest) index_remove(s, s->oldest);
    free(s->buckets);
    pthread_cond_destroy(&s->verified_cv);
    pthread_mutex_destroy(&s->lock);
    if (s->lock_fd >= 0) close(s->lock_fd); /* releases the flock */
    free(s->dir);
    free(s);
}

const char *store_dir(const store *s) { return s->dir; }

void store_set_cluster(store *s, struct cluster *cl) { s->cluster = cl; }
struct cluster *store_cluster(const store *s) {
    return s->cluster;
}

static int blob_path(const store *s, const char *digest, char *out, size_t outlen) {
    if (!ref_is_sha256_digest(digest)) return -1;
    const char *hex = digest + 7;
    int n = snprintf(out, outlen, "%s/blobs/sha256/%.2s/%s", s->dir, hex, hex);
    return n > 0 && (size_t)n < outlen ? 0 : -1;
}

/* Open and pin a cached blob. verify: a file not verified in this process,
 * or changed since (another inode, size, ctime or mtime), is hashed first
 * and quarantined when wrong (then 0: not cached). Without verify the
 * caller checks the bytes itself (settle_read). */
static int blob_open(store *s, const char *digest, bool verify, bool touch, int *fd, uint64_t *size, char *err,
                     size_t errlen) {
    char p[PATH_MAX];
    if (blob_path(s, digest, p, sizeof p) != 0) {
        snprintf(err, errlen, "store: %s is not a sha256 digest", digest);
        return -1;
    }
    /* Open and pin under the lock, so an eviction cannot come between. */
    pthread_mutex_lock(&s->lock);
    for (;;) {
        int f = open(p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (f < 0) {
            int e = errno;
            pthread_mutex_unlock(&s->lock);
            if (e == ENOENT) return 0;
            snprintf(err, errlen, "store: open %s: %s", p, strerror(e));
            return -1;
        }
        struct stat st;
        if (fstat(f, &st) != 0 || !S_ISREG(st.st_mode)) {
            pthread_mutex_unlock(&s->lock);
            close(f);
            snprintf(err, errlen, "store: %s is not a regular file", p);
            return -1;
        }
        blob_entry *e = index_find(s, digest + 7);
        if (e && e->verifying) { /* one hash at a time: wait for its verdict, then look again */
            close(f);
            pthread_cond_wait(&s->verified_cv, &s->lock);
            continue;
        }
        if (!e) e = index_add(s, digest + 7, (uint64_t)st.st_size);
        if (!e) {
            pthread_mutex_unlock(&s->lock);
            close(f);
            snprintf(err, errlen, "store: out of memory indexing %s", digest);
            return -1;
        }
        pin_add(e, f);
        if (verify && !still_verified(e, &st)) {
            char reason[300];
            e->verifying = true;
            int v = verify_locked(s, e, f, &st, reason, sizeof reason);
            if (v < 0) pin_remove(e, f);
            pthread_mutex_unlock(&s->lock);
            if (v <= 0) close(f);
            if (v == 0) return 0;
            if (v < 0) {
                snprintf(err, errlen, "store: verifying %s: %s", p, reason);
                return -1;
            }
            *fd = f;
            *size = (uint64_t)st.st_size;
            return 1;
        }
        if (touch) index_touch(s, e); /* a listing (cache ls) is no use */
        pthread_mutex_unlock(&s->lock);
        *fd = f;
        *size = (uint64_t)st.st_size;
        return 1;
    }
}

int store_blob_open(store *s, const char *digest, int *fd, uint64_t *size, char *err, size_t errlen) {
    return blob_open(s, digest, true, true, fd, size, err, errlen);
}

store_verify_result store_blob_verify(store *s, const char *digest, store_pace_fn pace, void *ud, char *reason,
                                      size_t rlen) {
    char p[PATH_MAX];
    reason[0] = '\0';
    if (blob_path(s, digest, p, sizeof p) != 0) {
        snprintf(reason, rlen, "%s is not a sha256 digest", digest);
        return STORE_VERIFY_ERROR;
    }
    /* Hashed without the lock, a pin or the verifying mark: a paced hash
     * may take minutes, and readers must not wait for it. The verdict
     * applies only if blobs/ still holds this very file. */
    int f = open(p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat st;
    if (f < 0 || fstat(f, &st) != 0) {
        int e = errno;
        if (f >= 0) close(f);
        if (e == ENOENT) return STORE_VERIFY_GONE; /* evicted meanwhile */
        snprintf(reason, rlen, "open %s: %s", p, strerror(e));
        return STORE_VERIFY_ERROR;
    }
    char got[DIGEST_STRING_LEN], err[256];
    uint64_t len = 0;
    int hr = hash_fd(f, pace, ud, got, &len, err, sizeof err);
    metrics_cache_verified(len);
    if (hr != 0) {
        close(f);
        snprintf(reason, rlen, "%s", hr == -2 ? "stopped" : err);
        return STORE_VERIFY_ERROR;
    }
    snprintf(reason, rlen, "its %llu bytes hash to %s", (unsigned long long)len, got);
    pthread_mutex_lock(&s->lock);
    blob_entry *e = entry_settled(s, digest + 7);
    struct stat there;
    if (!e && (lstat(p, &there) != 0 || there.st_dev != st.st_dev || there.st_ino != st.st_ino)) {
        pthread_mutex_unlock(&s->lock);
        close(f);
        return STORE_VERIFY_GONE; /* evicted (or quarantined) while hashed */
    }
    if (!e) e = index_add(s, digest + 7, (uint64_t)st.st_size); /* a file the index did not know */
    int v = e ? settle_locked(s, e, f, &st, strcmp(got + 7, digest + 7) == 0, len, reason) : -1;
    pthread_mutex_unlock(&s->lock);
    close(f);
    if (v < 0) {
        snprintf(reason, rlen, "out of memory");
        return STORE_VERIFY_ERROR;
    }
    return v ? STORE_VERIFY_OK : STORE_VERIFY_QUARANTINED;
}

int store_blob_list(store *s, store_blob_ref **out, size_t *n) {
    pthread_mutex_lock(&s->lock);
    size_t cnt = s->nentries;
    store_blob_ref *list = calloc(cnt ? cnt : 1, sizeof *list);
    size_t i = 0;
    for (blob_entry *e = s->oldest; list && e && i < cnt; e = e->newer, i++) {
        snprintf(list[i].digest, sizeof list[i].digest, "sha256:%s", e->hex);
        list[i].size = e->size;
        list[i].used = e->used;
        list[i].pinned = pins_prune(e);
    }
    pthread_mutex_unlock(&s->lock);
    if (!list) return -1;
    *out = list;
    *n = i;
    return 0;
}

void store_blob_unpin(store *s, const char *digest, int fd) {
    if (!ref_is_sha256_digest(digest)) return;
    pthread_mutex_lock(&s->lock);
    blob_entry *e = index_find(s, digest + 7);
    if (e) {
        pin_remove(e, fd);
        if (s->total > s->max_bytes) evict_locked(s);
    }
    pthread_mutex_unlock(&s->lock);
}

void store_blob_close(store *s, const char *digest, int fd) {
    if (fd < 0) return;
    store_blob_unpin(s, digest, fd);
    close(fd);
}

bool store_blob_pinned(store *s, const char *digest) {
    if (!ref_is_sha256_digest(digest)) return false;
    pthread_mutex_lock(&s->lock);
    blob_entry *e = index_find(s, digest + 7);
    bool pinned = e && pins_prune(e);
    pthread_mutex_unlock(&s->lock);
    return pinned;
}

void store_get_stats(store *s, store_stats *out) {
    pthread_mutex_lock(&s->lock);
    *out = s->stats;
    out->blobs = s->nentries;
    out->bytes = s->total;
    out->max_bytes = s->max_bytes;
    pthread_mutex_unlock(&s->lock);
}

bool store_blob_exists(store *s, const char *digest) {
    char p[PATH_MAX];
    struct stat st;
    return blob_path(s, digest, p, sizeof p) == 0 && lstat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static int blob_read(store *s, const char *digest, size_t max, bool touch, char **data, size_t *len, char *err,
                     size_t errlen);

int store_blob_read(store *s, const char *digest, size_t max, char **data, size_t *len, char *err, size_t errlen) {
    return blob_read(s, digest, max, true, data, len, err, errlen);
}

int store_blob_peek(store *s, const char *digest, size_t max, char **data, size_t *len, char *err, size_t errlen) {
    return blob_read(s, digest, max, false, data, len, err, errlen);
}

static int blob_read(store *s, const char *digest, size_t max, bool touch, char **data, size_t *len, char *err,
                     size_t errlen) {
    int fd;
    uint64_t size;
    /* Small files read whole: hashed on every read (cheap), not only once. */
    int rc = blob_open(s, digest, false, touch, &fd, &size, err, errlen);
    if (rc <= 0) return rc;
    struct stat opened;
    if (fstat(fd, &opened) != 0) {
        store_blob_close(s, digest, fd);
        snprintf(err, errlen, "store: fstat %s: %s", digest, strerror(errno));
        return -1;
    }
    if (size > max) {
        store_blob_close(s, digest, fd);
        snprintf(err, errlen, "store: %s is %llu bytes, over the %zu-byte limit", digest, (unsigned long long)size,
                 max);
        return -1;
    }
    char *buf = malloc(size + 1);
    if (!buf) {
        store_blob_close(s, digest, fd);
        snprintf(err, errlen, "store: out of memory reading %s", digest);
        return -1;
    }
    size_t got = 0;
    while (got < size) {
        ssize_t n = pread(fd, buf + got, size - got, (off_t)got);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            free(buf);
            store_blob_close(s, digest, fd);
            snprintf(err, errlen, "store: read %s: %s", digest, n < 0 ? strerror(errno) : "short file");
            return -1;
        }
        got += (size_t)n;
    }
    char d[DIGEST_STRING_LEN] = "", reason[200];
    bool right = digest_bytes(buf, size, d) == 0 && strcmp(d, digest) == 0;
    snprintf(reason, sizeof reason, "its %llu bytes hash to %s", (unsigned long long)size, d);
    metrics_cache_verified(size);
    pthread_mutex_lock(&s->lock);
    blob_entry *e = entry_settled(s, digest + 7);
    if (e && settle_locked(s, e, fd, &opened, right, size, reason) == 0) right = false;
    pthread_mutex_unlock(&s->lock);
    store_blob_close(s, digest, fd);
    if (!right) {
        free(buf);
        return 0; /* quarantined: not cached any more */
    }
    buf[size] = '\0';
    *data = buf;
    *len = size;
    return 1;
}

int store_spool_create(store *s, store_spool *sp, char *err, size_t errlen) {
    pthread_mutex_lock(&s->lock);
    unsigned long seq = ++s->spool_seq;
    pthread_mutex_unlock(&s->lock);
    snprintf(sp->path, sizeof sp->path, "%s/tmp/spool-%ld-%lu", s->dir, (long)getpid(), seq);
    sp->fd = open(sp->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (sp->fd < 0) {
        snprintf(err, errlen, "store: create spool %s: %s", sp->path, strerror(errno));
        return -1;
    }
    return 0;
}

static int fsync_dir(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int store_spool_commit(store *s, store_spool *sp, const char *digest, char *err, size_t errlen) {
    char p[PATH_MAX], d[PATH_MAX];
    if (blob_path(s, digest, p, sizeof p) != 0) {
        snprintf(err, errlen, "store: %s is not a sha256 digest", digest);
        return -1;
    }
    snprintf(d, sizeof d, "%s/blobs/sha256/%.2s", s->dir, digest + 7);
    if (mkdir_0700(d, err, errlen) != 0) return -1;
    if (fsync(sp->fd) != 0) {
        snprintf(err, errlen, "store: fsync %s: %s", sp->path, strerror(errno));
        return -1;
    }
    /* Rename, index and pin under the lock: an eviction sees the blob
     * either absent or indexed, never a file it does not know. The spool's
     * fd pins the blob for as long as it stays open (fetch readers). */
    struct stat st;
    pthread_mutex_lock(&s->lock);
    if (rename(sp->path, p) != 0) {
        int e = errno;
        pthread_mutex_unlock(&s->lock);
        snprintf(err, errlen, "store: rename %s to %s: %s", sp->path, p, strerror(e));
        return -1;
    }
    if (fstat(sp->fd, &st) == 0) {
        blob_entry *e = index_add(s, digest + 7, (uint64_t)st.st_size);
        if (e) pin_add(e, sp->fd);
        if (e && !e->verifying) mark_verified(e, &st); /* the caller hashed these bytes on their way in */
        s->stats.committed++;
        evict_locked(s);
    }
    pthread_mutex_unlock(&s->lock);
    if (fsync_dir(d) != 0) {
        snprintf(err, errlen, "store: fsync %s: %s", d, strerror(errno));
        return -1;
    }
    return 0;
}

void store_spool_discard(store *s, store_spool *sp) {
    (void)s;
    if (sp->path[0]) unlink(sp->path);
}

int store_put(store *s, const char *digest, const void *data, size_t len, char *err, size_t errlen) {
    if (store_blob_exists(s, digest)) return 0;
    store_spool sp;
    if (store_spool_create(s, &sp, err, errlen) != 0) return -1;
    const char *p = data;
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(sp.fd, p + done, len - done);
        if (n < 0) {
            if (errno == EINTR) continue;
            snprintf(err, errlen, "store: write %s: %s", sp.path, strerror(errno));
            store_spool_discard(s, &sp);
            close(sp.fd);
            return -1;
        }
        done += (size_t)n;
    }
    int rc = store_spool_commit(s, &sp, digest, err, errlen);
    if (rc != 0) {
        store_spool_discard(s, &sp);
        close(sp.fd);
    } else {
        store_blob_close(s, digest, sp.fd);
    }
    return rc;
}

static int tag_path(const store *s, const char *upstream, const char *repository, const char *tag, char *out,
                    size_t outlen) {
    char key[1024], d[DIGEST_STRING_LEN];
    int n = snprintf(key, sizeof key, "%s\n%s\n%s", upstream, repository, tag);
    if (n < 0 || (size_t)n >= sizeof key || digest_bytes(key, (size_t)n, d) != 0) return -1;
    n = snprintf(out, outlen, "%s/tags/%s", s->dir, d + 7);
    return n > 0 && (size_t)n < outlen ? 0 : -1;
}

/* A tag record's fields; 0 when it is damaged (never an answer). */
static int tag_record_parse(const char *buf, size_t n, store_tag *out, char *up, size_t ulen, char *repo, size_t rlen,
                            char *tag, size_t tlen) {
    char jerr[128];
    json_value *v = json_parse(buf, n, 4, jerr, sizeof jerr);
    if (!v) return 0;
    const char *dg = json_object_get_string(v, "digest");
    const char *mt = json_object_get_string(v, "media_type");
    const char *rp = json_object_get_string(v, "repository");
    const char *tg = json_object_get_string(v, "tag");
    const char *u = json_object_get_string(v, "upstream");
    int64_t when = 0;
    int rc = 0;
    if (dg && mt && rp && tg && u && json_get_int64(json_object_get(v, "fetched"), &when) && ref_is_sha256_digest(dg) &&
        strlen(mt) < sizeof out->media_type && strlen(u) < ulen && strlen(rp) < rlen && strlen(tg) < tlen) {
        snprintf(out->digest, sizeof out->digest, "%s", dg);
        snprintf(out->media_type, sizeof out->media_type, "%s", mt);
        out->fetched = (time_t)when;
        snprintf(up, ulen, "%s", u);
        snprintf(repo, rlen, "%s", rp);
        snprintf(tag, tlen, "%s", tg);
        rc = 1;
    }
    json_free(v);
    return rc;
}

#define TAG_RECORD_MAX 2048

int store_tag_get(store *s, const char *upstream, const char *repository, const char *tag, store_tag *out) {
    char p[PATH_MAX];
    if (tag_path(s, upstream, repository, tag, p, sizeof p) != 0) return -1;
    int fd = open(p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return 0;
    char buf[TAG_RECORD_MAX];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    char up[STORE_UPSTREAM_MAX], rp[REF_NAME_MAX + 1], tg[REF_TAG_MAX + 1];
    store_tag t;
    if (!tag_record_parse(buf, (size_t)n, &t, up, sizeof up, rp, sizeof rp, tg, sizeof tg) ||
        strcmp(rp, repository) != 0 || strcmp(tg, tag) != 0 || strcmp(up, upstream) != 0)
        return 0;
    *out = t;
    return 1;
}

int store_tag_remove(store *s, const char *upstream, const char *repository, const char *tag, char *err,
                     size_t errlen) {
    char p[PATH_MAX];
    if (tag_path(s, upstream, repository, tag, p, sizeof p) != 0) {
        snprintf(err, errlen, "store: tag key too long");
        return -1;
    }
    if (unlink(p) == 0) return 1;
    if (errno == ENOENT) return 0;
    snprintf(err, errlen, "store: remove tag record %s: %s", p, strerror(errno));
    return -1;
}

/* The regular files of DIR/sub (not following links): fn(ud, name, path,
 * st) for each; -1 when the folder cannot be read. */
typedef int (*file_fn)(void *ud, const char *name, const char *path, const struct stat *st);
static int each_file(const store *s, const char *sub, file_fn fn, void *ud) {
    char top[PATH_MAX];
    snprintf(top, sizeof top, "%s/%s", s->dir, sub);
    int dfd = open(top, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!d) {
        if (dfd >= 0) close(dfd);
        return -1;
    }
    struct dirent *de;
    int rc = 0;
    while (rc == 0 && (de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.') continue;
        char p[PATH_MAX];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", top, de->d_name);
        if (lstat(p, &st) != 0) continue;
        rc = fn(ud, de->d_name, p, &st);
    }
    closedir(d);
    return rc;
}

typedef struct {
    store_tag_fn fn;
    void *ud;
} tag_walk;

static int tag_walk_one(void *ud, const char *name, const char *path, const struct stat *st) {
    tag_walk *w = ud;
    if (!is_hex64(name) || !S_ISREG(st->st_mode)) return 0;
    char buf[TAG_RECORD_MAX];
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    char up[STORE_UPSTREAM_MAX], rp[REF_NAME_MAX + 1], tg[REF_TAG_MAX + 1];
    store_tag t;
    if (n <= 0 || !tag_record_parse(buf, (size_t)n, &t, up, sizeof up, rp, sizeof rp, tg, sizeof tg)) return 0;
    return w->fn(w->ud, up, rp, tg, &t);
}

int store_tag_each(store *s, store_tag_fn fn, void *ud) {
    tag_walk w = {fn, ud};
    return each_file(s, "tags", tag_walk_one, &w);
}

int store_tag_put(store *s, const char *upstream, const char *repository, const char *tag, const store_tag *t,
                  char *err, size_t errlen) {
    char p[PATH_MAX];
    if (tag_path(s, upstream, repository, tag, p, sizeof p) != 0) {
        snprintf(err, errlen, "store: tag key too long");
        return -1;
    }
    json_value *o = json_new_object();
    if (!o || json_object_set(o, "upstream", json_new_string(upstream)) ||
        json_object_set(o, "repository", json_new_string(repository)) ||
        json_object_set(o, "tag", json_new_string(tag)) || json_object_set(o, "digest", json_new_string(t->digest)) ||
        json_object_set(o, "media_type", json_new_string(t->media_type)) ||
        json_object_set(o, "fetched", json_new_int64((int64_t)t->fetched))) {
        json_free(o);
        snprintf(err, errlen, "store: out of memory");
        return -1;
    }
    size_t len;
    char *text = json_serialize(o, &len);
    json_free(o);
    if (!text) {
        snprintf(err, errlen, "store: out of memory");
        return -1;
    }
    store_spool sp;
    int rc = store_spool_create(s, &sp, err, errlen);
    if (rc == 0) {
        if (write(sp.fd, text, len) != (ssize_t)len || fsync(sp.fd) != 0 || rename(sp.path, p) != 0) {
            snprintf(err, errlen, "store: write tag record %s: %s", p, strerror(errno));
            unlink(sp.path);
            rc = -1;
        }
        close(sp.fd);
    }
    free(text);
    return rc;
}

/* Small records: write temp, fsync, rename; read whole. */
static int record_write(store *s, const char *path, const char *text, char *err, size_t errlen) {
    store_spool sp;
    if (store_spool_create(s, &sp, err, errlen) != 0) return -1;
    size_t len = strlen(text);
    int rc = 0;
    if (write(sp.fd, text, len) != (ssize_t)len || fsync(sp.fd) != 0 || rename(sp.path, path) != 0) {
        snprintf(err, errlen, "store: write %s: %s", path, strerror(errno));
        unlink(sp.path);
        rc = -1;
    }
    close(sp.fd);
    return rc;
}

static int record_read(const char *path, char *buf, size_t len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = '\0';
    return 1;
}

/* ---------- links ---------- */

/* sha256 hex of a NUL-separated list of strings: a scope's name on disk. */
static void scope_hash(store_scope *out, const char *const *parts, size_t n) {
    char full[DIGEST_STRING_LEN] = "";
    digest_ctx *d = digest_new();
    for (size_t i = 0; d && i < n; i++)
        digest_update(d, parts[i] ? parts[i] : "", strlen(parts[i] ? parts[i] : "") + 1);
    if (!d || digest_final(d, full) != 0) snprintf(full, sizeof full, "sha256:"); /* out of memory: matches nothing */
    digest_free(d);
    snprintf(out->hex, sizeof out->hex, "%s", full + 7);
}

void store_scope_upstream(store_scope *out, const char *account, const char *repository) {
    const char *parts[] = {"regfacade-scope-v1", "upstream", account, repository};
    scope_hash(out, parts, 4);
}

void store_scope_generated(store_scope *out, const store_scope *from, const char *name) {
    const char *parts[] = {"regfacade-scope-v1", "generated", from->hex, name};
    scope_hash(out, parts, 4);
}

void store_scope_everyone(store_scope *out) {
    const char *parts[] = {"regfacade-scope-v1", "everyone"};
    scope_hash(out, parts, 2);
}

static int link_path(const store *s, const store_scope *sc, const char *digest, char *p, size_t plen) {
    if (!ref_is_sha256_digest(digest) || strlen(sc->hex) != 64) return -1;
    int n = snprintf(p, plen, "%s/links/%s/%s", s->dir, sc->hex, digest + 7);
    return n > 0 && (size_t)n < plen ? 0 : -1;
}

int store_link_put(store *s, const store_scope *sc, const char *digest, const char *origin_upstream,
                   const char *origin_repository, char *err, size_t errlen) {
    char p[PATH_MAX], d[PATH_MAX], text[600] = "", old[600];
    if (link_path(s, sc, digest, p, sizeof p) != 0) {
        snprintf(err, errlen, "store: link of %s: not a sha256 digest", digest);
        return -1;
    }
    bool origin = origin_upstream && origin_repository;
    if (origin) snprintf(text, sizeof text, "%s\n%s\n", origin_upstream, origin_repository);
    /* Without an origin an existing link is kept as it is (it may name one). */
    old[0] = '\0';
    bool exists = record_read(p, old, sizeof old) == 1 || access(p, F_OK) == 0;
    if (exists && (!origin || strcmp(old, text) == 0)) return 0;
    snprintf(d, sizeof d, "%s/links/%s", s->dir, sc->hex);
    if (mkdir_0700(d, err, errlen) != 0) return -1;
    if (record_write(s, p, text, err, errlen) != 0) return -1;
    /* The cluster's replicas may serve it there too (degraded: this one only). */
    cluster_link_put(s->cluster, sc->hex, digest, text);
    return 0;
}

/* A link another replica of the cluster made: kept here too (0 written, -1 not). */
static int link_from_cluster(store *s, const store_scope *sc, const char *digest, const char *p, char *text,
                             size_t tlen) {
    if (cluster_link_get(s->cluster, sc->hex, digest, text, tlen) != CLUSTER_HIT) return -1;
    char d[PATH_MAX], err[512];
    snprintf(d, sizeof d, "%s/links/%s", s->dir, sc->hex);
    if (mkdir_0700(d, err, sizeof err) != 0 || record_write(s, p, text, err, sizeof err) != 0)
        log_error("store: keeping a link from the cluster: %s", err);
    return 0;
}

int store_link_get(store *s, const store_scope *sc, const char *digest, char *origin_upstream, size_t ulen,
                   char *origin_repository, size_t rlen) {
    char p[PATH_MAX], text[600];
    if (origin_upstream && ulen) origin_upstream[0] = '\0';
    if (origin_repository && rlen) origin_repository[0] = '\0';
    if (link_path(s, sc, digest, p, sizeof p) != 0) return 0;
    if (!record_read(p, text, sizeof text)) {
        if (access(p, F_OK) == 0) return 1; /* empty: no origin */
        if (link_from_cluster(s, sc, digest, p, text, sizeof text) != 0) return 0;
        if (!text[0]) return 1;
    }
    char *nl = strchr(text, '\n');
    if (!nl) return 1;
    *nl = '\0';
    char *repo = nl + 1;
    repo[strcspn(repo, "\n")] = '\0';
    if (*text && ref_valid_name(repo) && origin_upstream && origin_repository) {
        snprintf(origin_upstream, ulen, "%s", text);
        snprintf(origin_repository, rlen, "%s", repo);
    }
    return 1;
}

int store_generated_put(store *s, const char *key, const char *digest, char *err, size_t errlen) {
    char p[PATH_MAX];
    if (strlen(key) != 64 || strspn(key, "0123456789abcdef") != 64) {
        snprintf(err, errlen, "store: bad generated key");
        return -1;
    }
    snprintf(p, sizeof p, "%s/generated/%s", s->dir, key);
    return record_write(s, p, digest, err, errlen);
}

int store_generated_get(store *s, const char *key, char *digest, size_t dlen) {
    char p[PATH_MAX], text[200];
    if (strlen(key) != 64 || strspn(key, "0123456789abcdef") != 64) return 0;
    snprintf(p, sizeof p, "%s/generated/%s", s->dir, key);
    if (!record_read(p, text, sizeof text)) return 0;
    text[strcspn(text, "\n")] = '\0';
    if (!ref_is_sha256_digest(text)) return 0;
    snprintf(digest, dlen, "%s", text);
    return 1;
}

/* DIR/made/<hex>: one "repository tag" line per name the blob was generated
 * for, the latest first, at most STORE_MADE_MAX. */
#define STORE_MADE_MAX 16
#define MADE_RECORD_MAX (STORE_MADE_MAX * (REF_NAME_MAX + REF_TAG_MAX + 2) + 1)

static int made_path(const store *s, const char *digest, char *out, size_t outlen) {
    if (!ref_is_sha256_digest(digest)) return -1;
    int n = snprintf(out, outlen, "%s/made/%s", s->dir, digest + 7);
    return n > 0 && (size_t)n < outlen ? 0 : -1;
}

int store_made_add(store *s, const char *digest, const char *repository, const char *tag, char *err, size_t errlen) {
    char p[PATH_MAX];
    if (made_path(s, digest, p, sizeof p) != 0 || !ref_valid_name(repository) || !ref_valid_tag(tag)) {
        snprintf(err, errlen, "store: generated-for record of %s: bad digest, name or tag", digest);
        return -1;
    }
    char *old = malloc(MADE_RECORD_MAX), *text = malloc(MADE_RECORD_MAX);
    if (!old || !text) {
        free(old);
        free(text);
        snprintf(err, errlen, "store: out of memory");
        return -1;
    }
    if (!record_read(p, old, MADE_RECORD_MAX)) old[0] = '\0';
    int n = snprintf(text, MADE_RECORD_MAX, "%s %s\n", repository, tag);
    size_t len = (size_t)n, lines = 1;
    for (char *line = old, *next; *line && lines < STORE_MADE_MAX; line = next) {
        next = line + strcspn(line, "\n");
        if (*next) *next++ = '\0';
        if (strlen(line) == (size_t)n - 1 && strncmp(text, line, (size_t)n - 1) == 0) continue; /* now first */
        int m = snprintf(text + len, MADE_RECORD_MAX - len, "%s\n", line);
        if (m < 0 || (size_t)m >= MADE_RECORD_MAX - len) break;
        len += (size_t)m;
        lines++;
    }
    int rc = 0;
    if (!record_read(p, old, MADE_RECORD_MAX) || strcmp(old, text) != 0) rc = record_write(s, p, text, err, errlen);
    free(old);
    free(text);
    return rc;
}

int store_made_get(store *s, const char *digest, const char *repository, char *tag, size_t tlen) {
    char p[PATH_MAX];
    if (made_path(s, digest, p, sizeof p) != 0) return 0;
    char *text = malloc(MADE_RECORD_MAX);
    if (!text) return 0;
    int found = 0;
    if (record_read(p, text, MADE_RECORD_MAX)) {
        for (char *line = text, *next; *line && !found; line = next) {
            next = line + strcspn(line, "\n");
            if (*next) *next++ = '\0';
            char *sp = strchr(line, ' ');
            if (!sp) continue;
            *sp = '\0';
            if (!ref_valid_name(line) || !ref_valid_tag(sp + 1)) continue; /* a damaged line is no answer */
            if (repository && strcmp(line, repository) != 0) continue;
            if (tag) snprintf(tag, tlen, "%s", sp + 1);
            found = 1;
        }
    }
    free(text);
    return found;
}

/* The links of hex in every scope go with its bytes: under no name is it
 * known any more, so the next request for it asks that name's upstream,
 * which links it again. */
static int unlink_link(void *ud, const char *name, const char *path, const struct stat *st) {
    (void)name;
    if (!S_ISDIR(st->st_mode)) return 0;
    char p[PATH_MAX];
    if (snprintf(p, sizeof p, "%s/%s", path, (const char *)ud) >= (int)sizeof p) return 0;
    if (unlink(p) != 0 && errno != ENOENT) log_warn("store: remove link %s: %s", p, strerror(errno));
    return 0;
}

static void unlink_links(store *s, const char *hex) {
    if (each_file(s, "links", unlink_link, (void *)hex) != 0)
        log_warn("store: cannot read %s/links to remove the links of sha256:%s", s->dir, hex);
}

store_remove_result store_blob_remove(store *s, const char *digest, char *err, size_t errlen) {
    char p[PATH_MAX];
    if (blob_path(s, digest, p, sizeof p) != 0) {
        snprintf(err, errlen, "store: %s is not a sha256 digest", digest);
        return STORE_REMOVE_ERROR;
    }
    /* Under the lock, as an eviction: no reader can open it between the
     * check and the unlink. */
    pthread_mutex_lock(&s->lock);
    blob_entry *e = index_find(s, digest + 7);
    if (e && (e->verifying || pins_prune(e))) {
        pthread_mutex_unlock(&s->lock);
        snprintf(err, errlen, "%s is in use (a reader holds it open)", digest);
        return STORE_IN_USE;
    }
    store_remove_result r = STORE_REMOVED;
    if (unlink(p) != 0) {
        if (errno == ENOENT) {
            r = STORE_NOT_CACHED;
        } else {
            snprintf(err, errlen, "store: remove %s: %s", p, strerror(errno));
            r = STORE_REMOVE_ERROR;
        }
    }
    if (e && r != STORE_REMOVE_ERROR) {
        if (r == STORE_REMOVED) metrics_cache_removed(e->size);
        index_remove(s, e);
    }
    pthread_mutex_unlock(&s->lock);
    if (r == STORE_REMOVED) unlink_links(s, digest + 7);
    return r;
}

/* ---------- garbage collection ---------- */

typedef struct {
    store *s;
    time_t tmp_before; /* tmp/ files last changed before this are leftovers */
    store_gc_report *rep;
} gc_ctx;

static void gc_unlink(const char *path, const struct stat *st, size_t *count, uint64_t *bytes) {
    if (unlink(path) != 0) {
        if (errno != ENOENT) log_warn("store: gc: remove %s: %s", path, strerror(errno));
        return;
    }
    (*count)++;
    if (bytes) *bytes += (uint64_t)st->st_size;
}

static int gc_tmp(void *ud, const char *name, const char *path, const struct stat *st) {
    (void)name;
    gc_ctx *g = ud;
    if (S_ISREG(st->st_mode) && st->st_mtime < g->tmp_before)
        gc_unlink(path, st, &g->rep->tmp_files, &g->rep->tmp_bytes);
    return 0;
}

static int gc_tag(void *ud, const char *name, const char *path, const struct stat *st) {
    gc_ctx *g = ud;
    if (!S_ISREG(st->st_mode)) return 0;
    char buf[TAG_RECORD_MAX];
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
    if (fd >= 0) close(fd);
    char up[STORE_UPSTREAM_MAX], rp[REF_NAME_MAX + 1], tg[REF_TAG_MAX + 1];
    store_tag t;
    if (!is_hex64(name) || n <= 0 || !tag_record_parse(buf, (size_t)n, &t, up, sizeof up, rp, sizeof rp, tg, sizeof tg))
        gc_unlink(path, st, &g->rep->damaged_records, NULL);
    else if (!store_blob_exists(g->s, t.digest)) /* the manifest it names is gone: it answers nothing */
        gc_unlink(path, st, &g->rep->tag_records, NULL);
    return 0;
}

static int gc_generated(void *ud, const char *name, const char *path, const struct stat *st) {
    gc_ctx *g = ud;
    if (!S_ISREG(st->st_mode)) return 0;
    char digest[200];
    if (!store_generated_get(g->s, name, digest, sizeof digest))
        gc_unlink(path, st, &g->rep->damaged_records, NULL);
    else if (!store_blob_exists(g->s, digest)) /* generated again on the next pull anyway */
        gc_unlink(path, st, &g->rep->generated_records, NULL);
    return 0;
}

/* Files in blobs/sha256/xx/ that are no blob: not named by their own
 * digest, or not regular files. The store never indexes or serves them. */
static int gc_blob_dir(void *ud, const char *name, const char *path, const struct stat *st) {
    gc_ctx *g = ud;
    if (strlen(name) != 2 || strspn(name, "0123456789abcdef") != 2 || !S_ISDIR(st->st_mode)) {
        if (!S_ISDIR(st->st_mode)) gc_unlink(path, st, &g->rep->stray_files, &g->rep->stray_bytes);
        return 0;
    }
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!d) {
        if (dfd >= 0) close(dfd);
        return 0;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
        char p[PATH_MAX];
        struct stat fst;
        snprintf(p, sizeof p, "%s/%s", path, de->d_name);
        if (lstat(p, &fst) != 0 || S_ISDIR(fst.st_mode)) continue;
        if (!is_hex64(de->d_name) || strncmp(de->d_name, name, 2) != 0 || !S_ISREG(fst.st_mode))
            gc_unlink(p, &fst, &g->rep->stray_files, &g->rep->stray_bytes);
    }
    closedir(d);
    return 0;
}

int store_gc(store *s, time_t tmp_min_age, store_gc_report *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    gc_ctx g = {s, time(NULL) - tmp_min_age, out};
    static const struct {
        const char *sub;
        file_fn fn;
    } walks[] = {{"tmp", gc_tmp}, {"tags", gc_tag}, {"generated", gc_generated}, {"blobs/sha256", gc_blob_dir}};
    for (size_t i = 0; i < sizeof walks / sizeof walks[0]; i++)
        if (each_file(s, walks[i].sub, walks[i].fn, &g) != 0) {
            snprintf(err, errlen, "store: gc: cannot read %s/%s: %s", s->dir, walks[i].sub, strerror(errno));
            return -1;
        }
    return 0;
}
