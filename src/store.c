#include "regfacade/store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "regfacade/digest.h"
#include "regfacade/json.h"
#include "regfacade/ref.h"

struct store {
    char *dir;
    uint64_t max_bytes;
    pthread_mutex_t lock;
    unsigned long spool_seq;
};

static int mkdir_0700(const char *path, char *err, size_t errlen) {
    if (mkdir(path, 0700) == 0) return 0;
    if (errno != EEXIST) {
        snprintf(err, errlen, "store: mkdir %s: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    /* lstat: a symlink where a cache folder belongs is refused, never followed. */
    if (lstat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "store: %s exists and is not a folder", path);
        return -1;
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

store *store_open(const char *dir, uint64_t max_bytes, char *err, size_t errlen) {
    store *s = calloc(1, sizeof *s);
    if (!s || !(s->dir = strdup(dir))) {
        free(s);
        snprintf(err, errlen, "store: out of memory");
        return NULL;
    }
    s->max_bytes = max_bytes;
    pthread_mutex_init(&s->lock, NULL);
    static const char *const subdirs[] = {"", "/blobs", "/blobs/sha256", "/tmp", "/tags", "/origins", "/generated",
                                          NULL};
    for (const char *const *sd = subdirs; *sd; sd++) {
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s%s", dir, *sd);
        if (mkdir_0700(p, err, errlen) != 0) {
            store_close(s);
            return NULL;
        }
    }
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s/tmp", dir);
    clear_tmp(tmp); /* partial spools of an earlier run are never trusted */
    return s;
}

void store_close(store *s) {
    if (!s) return;
    pthread_mutex_destroy(&s->lock);
    free(s->dir);
    free(s);
}

const char *store_dir(const store *s) { return s->dir; }

static int blob_path(const store *s, const char *digest, char *out, size_t outlen) {
    if (!ref_is_sha256_digest(digest)) return -1;
    const char *hex = digest + 7;
    int n = snprintf(out, outlen, "%s/blobs/sha256/%.2s/%s", s->dir, hex, hex);
    return n > 0 && (size_t)n < outlen ? 0 : -1;
}

int store_blob_open(store *s, const char *digest, int *fd, uint64_t *size, char *err, size_t errlen) {
    char p[PATH_MAX];
    if (blob_path(s, digest, p, sizeof p) != 0) {
        snprintf(err, errlen, "store: %s is not a sha256 digest", digest);
        return -1;
    }
    int f = open(p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (f < 0) {
        if (errno == ENOENT) return 0;
        snprintf(err, errlen, "store: open %s: %s", p, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(f, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(f);
        snprintf(err, errlen, "store: %s is not a regular file", p);
        return -1;
    }
    *fd = f;
    *size = (uint64_t)st.st_size;
    return 1;
}

bool store_blob_exists(store *s, const char *digest) {
    char p[PATH_MAX];
    struct stat st;
    return blob_path(s, digest, p, sizeof p) == 0 && lstat(p, &st) == 0 && S_ISREG(st.st_mode);
}

int store_blob_read(store *s, const char *digest, size_t max, char **data, size_t *len, char *err, size_t errlen) {
    int fd;
    uint64_t size;
    int rc = store_blob_open(s, digest, &fd, &size, err, errlen);
    if (rc <= 0) return rc;
    if (size > max) {
        close(fd);
        snprintf(err, errlen, "store: %s is %llu bytes, over the %zu-byte limit", digest,
                 (unsigned long long)size, max);
        return -1;
    }
    char *buf = malloc(size + 1);
    if (!buf) {
        close(fd);
        snprintf(err, errlen, "store: out of memory reading %s", digest);
        return -1;
    }
    size_t got = 0;
    while (got < size) {
        ssize_t n = pread(fd, buf + got, size - got, (off_t)got);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            free(buf);
            close(fd);
            snprintf(err, errlen, "store: read %s: %s", digest, n < 0 ? strerror(errno) : "short file");
            return -1;
        }
        got += (size_t)n;
    }
    close(fd);
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
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
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
    if (rename(sp->path, p) != 0) {
        snprintf(err, errlen, "store: rename %s to %s: %s", sp->path, p, strerror(errno));
        return -1;
    }
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
    if (rc != 0) store_spool_discard(s, &sp);
    close(sp.fd);
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

int store_tag_get(store *s, const char *upstream, const char *repository, const char *tag, store_tag *out) {
    char p[PATH_MAX];
    if (tag_path(s, upstream, repository, tag, p, sizeof p) != 0) return -1;
    int fd = open(p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return 0;
    char buf[2048];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    char jerr[128];
    json_value *v = json_parse(buf, (size_t)n, 4, jerr, sizeof jerr);
    if (!v) return 0; /* a damaged record is a miss, never an answer */
    const char *dg = json_object_get_string(v, "digest");
    const char *mt = json_object_get_string(v, "media_type");
    const char *rp = json_object_get_string(v, "repository");
    const char *tg = json_object_get_string(v, "tag");
    const char *up = json_object_get_string(v, "upstream");
    int64_t when = 0;
    int rc = 0;
    if (dg && mt && rp && tg && up && json_get_int64(json_object_get(v, "fetched"), &when) &&
        strcmp(rp, repository) == 0 && strcmp(tg, tag) == 0 && strcmp(up, upstream) == 0 &&
        ref_is_sha256_digest(dg) && strlen(mt) < sizeof out->media_type) {
        snprintf(out->digest, sizeof out->digest, "%s", dg);
        snprintf(out->media_type, sizeof out->media_type, "%s", mt);
        out->fetched = (time_t)when;
        rc = 1;
    }
    json_free(v);
    return rc;
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

int store_origin_put(store *s, const char *digest, const char *upstream, const char *repository, char *err,
                     size_t errlen) {
    if (!ref_is_sha256_digest(digest)) {
        snprintf(err, errlen, "store: origin of %s: not a sha256 digest", digest);
        return -1;
    }
    char p[PATH_MAX], text[600];
    snprintf(p, sizeof p, "%s/origins/%s", s->dir, digest + 7);
    snprintf(text, sizeof text, "%s\n%s\n", upstream, repository);
    char old[600];
    if (record_read(p, old, sizeof old) && strcmp(old, text) == 0) return 0;
    return record_write(s, p, text, err, errlen);
}

int store_origin_get(store *s, const char *digest, char *upstream, size_t ulen, char *repository, size_t rlen) {
    if (!ref_is_sha256_digest(digest)) return 0;
    char p[PATH_MAX], text[600];
    snprintf(p, sizeof p, "%s/origins/%s", s->dir, digest + 7);
    if (!record_read(p, text, sizeof text)) return 0;
    char *nl = strchr(text, '\n');
    if (!nl) return 0;
    *nl = '\0';
    char *repo = nl + 1;
    repo[strcspn(repo, "\n")] = '\0';
    if (!*text || !ref_valid_name(repo)) return 0;
    snprintf(upstream, ulen, "%s", text);
    snprintf(repository, rlen, "%s", repo);
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
