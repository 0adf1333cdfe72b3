#include "regfacade/layers.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "regfacade/digest.h"
#include "regfacade/log.h"
#include "regfacade/manifest.h"
#include "regfacade/ref.h"

#define CONFIG_BLOB_MAX (16 * 1024 * 1024)

#define MT_OCI_LAYER "application/vnd.oci.image.layer.v1.tar"
#define MT_OCI_LAYER_GZIP "application/vnd.oci.image.layer.v1.tar+gzip"

/* ---------- specs ---------- */

void layer_spec_clear(layer_spec *s) {
    free(s->name);
    free(s->file);
    free(s->image);
    free(s->digest);
    free(s->media_type);
    free(s->diff_id);
    json_free(s->urls);
    free(s->upstream);
    free(s->repository);
    for (size_t i = 0; i < s->n_platforms; i++) free(s->platforms[i]);
    free(s->platforms);
    free(s->created_by);
    free(s->comment);
    memset(s, 0, sizeof *s);
}

static int opt_string(const json_value *o, const char *key, const char *where, char **out, char *err, size_t errlen) {
    json_value *v = json_object_get(o, key);
    if (!v) return 0;
    if (v->type != JSON_STRING || v->len == 0 || strlen(v->str) != v->len) {
        snprintf(err, errlen, "%s.%s: must be a non-empty string", where, key);
        return -1;
    }
    if (!(*out = strdup(v->str))) {
        snprintf(err, errlen, "%s: out of memory", where);
        return -1;
    }
    return 0;
}

int layer_spec_parse(const json_value *v, const char *base_dir, const char *where, layer_spec *out, char *err,
                     size_t errlen) {
    memset(out, 0, sizeof *out);
    if (v->type == JSON_STRING) {
        if (strcmp(v->str, "base") == 0) {
            out->kind = LAYER_BASE;
            return 0;
        }
        if (v->len == 0) {
            snprintf(err, errlen, "%s: an empty layer name", where);
            return -1;
        }
        out->kind = LAYER_NAMED;
        out->name = strdup(v->str);
        return out->name ? 0 : -1;
    }
    if (v->type != JSON_OBJECT) {
        snprintf(err, errlen, "%s: a layer is \"base\", a name, or a table with file, image or blob", where);
        return -1;
    }
    static const char *const allowed[] = {"file",       "image",      "skip",    "blob",     "size",
                                          "media_type", "diff_id",    "urls",    "upstream", "repository",
                                          "platforms",  "created_by", "comment", NULL};
    for (size_t i = 0; i < v->count; i++) {
        bool ok = false;
        for (const char *const *a = allowed; *a; a++)
            if (strcmp(v->keys[i], *a) == 0) ok = true;
        if (!ok) {
            snprintf(err, errlen, "%s: unknown key \"%s\"", where, v->keys[i]);
            return -1;
        }
    }
    int kinds = !!json_object_get(v, "file") + !!json_object_get(v, "image") + !!json_object_get(v, "blob");
    if (kinds != 1) {
        snprintf(err, errlen, "%s: exactly one of file, image or blob is required", where);
        return -1;
    }
    char *file = NULL;
    if (opt_string(v, "file", where, &file, err, errlen) != 0 ||
        opt_string(v, "image", where, &out->image, err, errlen) != 0 ||
        opt_string(v, "blob", where, &out->digest, err, errlen) != 0 ||
        opt_string(v, "media_type", where, &out->media_type, err, errlen) != 0 ||
        opt_string(v, "diff_id", where, &out->diff_id, err, errlen) != 0 ||
        opt_string(v, "upstream", where, &out->upstream, err, errlen) != 0 ||
        opt_string(v, "repository", where, &out->repository, err, errlen) != 0 ||
        opt_string(v, "created_by", where, &out->created_by, err, errlen) != 0 ||
        opt_string(v, "comment", where, &out->comment, err, errlen) != 0) {
        free(file);
        goto fail;
    }
    if (file) {
        out->kind = LAYER_FILE;
        if (file[0] == '/' || !base_dir) {
            out->file = file;
        } else {
            size_t n = strlen(base_dir) + strlen(file) + 2;
            out->file = malloc(n);
            if (out->file) snprintf(out->file, n, "%s/%s", base_dir, file);
            free(file);
            if (!out->file) goto fail;
        }
    } else if (out->image) {
        out->kind = LAYER_IMAGE;
        json_value *skip = json_object_get(v, "skip");
        int64_t n = 0;
        if (skip && (!json_get_int64(skip, &n) || n < 0 || n > 10000)) {
            snprintf(err, errlen, "%s.skip: must be an integer from 0 to 10000", where);
            goto fail;
        }
        out->skip = (int)n;
    } else {
        out->kind = LAYER_BLOB;
        if (!ref_is_sha256_digest(out->digest)) {
            snprintf(err, errlen, "%s.blob: \"%s\" is not a sha256 digest", where, out->digest);
            goto fail;
        }
        if (!out->diff_id || !ref_is_sha256_digest(out->diff_id)) {
            snprintf(err, errlen, "%s.diff_id: required, a sha256 digest", where);
            goto fail;
        }
        if (!out->media_type) {
            snprintf(err, errlen, "%s.media_type: required", where);
            goto fail;
        }
        if (!json_get_uint64(json_object_get(v, "size"), &out->size)) {
            snprintf(err, errlen, "%s.size: required, a non-negative integer", where);
            goto fail;
        }
        if (out->repository && !ref_valid_name(out->repository)) {
            snprintf(err, errlen, "%s.repository: \"%s\" is not a valid repository name", where, out->repository);
            goto fail;
        }
        json_value *urls = json_object_get(v, "urls");
        if (urls) {
            if (urls->type != JSON_ARRAY) {
                snprintf(err, errlen, "%s.urls: must be an array of strings", where);
                goto fail;
            }
            for (size_t i = 0; i < urls->count; i++)
                if (urls->items[i]->type != JSON_STRING) {
                    snprintf(err, errlen, "%s.urls[%zu]: must be a string", where, i + 1);
                    goto fail;
                }
            if (!(out->urls = json_clone(urls))) goto fail;
        }
    }
    json_value *pl = json_object_get(v, "platforms");
    if (pl) {
        if (pl->type != JSON_ARRAY || pl->count == 0) {
            snprintf(err, errlen, "%s.platforms: must be a non-empty array of \"os/arch[/variant]\"", where);
            goto fail;
        }
        out->platforms = calloc(pl->count, sizeof *out->platforms);
        if (!out->platforms) goto fail;
        for (size_t i = 0; i < pl->count; i++) {
            const json_value *p = pl->items[i];
            if (p->type != JSON_STRING || !strchr(p->str, '/')) {
                snprintf(err, errlen, "%s.platforms[%zu]: must be \"os/arch[/variant]\"", where, i + 1);
                goto fail;
            }
            if (!(out->platforms[i] = strdup(p->str))) goto fail;
            out->n_platforms = i + 1;
        }
    }
    return 0;
fail:
    if (!err[0]) snprintf(err, errlen, "%s: out of memory", where);
    layer_spec_clear(out);
    return -1;
}

char *layer_spec_fingerprint(const layer_spec *s) {
    char buf[8192];
    int n = 0;
    switch (s->kind) {
        case LAYER_BASE:
            n = snprintf(buf, sizeof buf, "base");
            break;
        case LAYER_NAMED:
            n = snprintf(buf, sizeof buf, "name:%s", s->name);
            break;
        case LAYER_FILE: {
            struct stat st;
            if (stat(s->file, &st) != 0) memset(&st, 0, sizeof st);
            n = snprintf(buf, sizeof buf, "file:%s:%lld:%lld.%09ld", s->file, (long long)st.st_size,
                         (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
            break;
        }
        case LAYER_IMAGE:
            n = snprintf(buf, sizeof buf, "image:%s:%d", s->image, s->skip);
            break;
        case LAYER_BLOB:
            n = snprintf(buf, sizeof buf, "blob:%s:%llu:%s:%s:%s:%s", s->digest, (unsigned long long)s->size,
                         s->media_type, s->diff_id, s->upstream ? s->upstream : "", s->repository ? s->repository : "");
            if (s->urls && n > 0 && (size_t)n < sizeof buf) {
                size_t ul;
                char *u = json_serialize(s->urls, &ul);
                if (u) n += snprintf(buf + n, sizeof buf - (size_t)n, ":%s", u);
                free(u);
            }
            break;
    }
    if (n < 0) return NULL;
    size_t used = (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1;
    for (size_t i = 0; i < s->n_platforms && used < sizeof buf - 1; i++)
        used += (size_t)snprintf(buf + used, sizeof buf - used, "|%s", s->platforms[i]);
    if (used < sizeof buf - 1)
        snprintf(buf + used, sizeof buf - used, "|%s|%s", s->created_by ? s->created_by : "",
                 s->comment ? s->comment : "");
    return strdup(buf);
}

/* ---------- the catalog and file layers ---------- */

typedef struct file_entry {
    char *path;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime;
    char digest[DIGEST_STRING_LEN];
    char diff_id[DIGEST_STRING_LEN];
    const char *media_type;
    struct file_entry *next;
} file_entry;

struct layer_catalog {
    char **names;
    layer_spec *specs;
    size_t n;
    pthread_mutex_t lock;
    file_entry *files;
};

/* zstd's frame magic: layer files are .tar or .tar.gz. */
static bool is_zstd(const unsigned char *b, size_t n) {
    return n >= 4 && b[0] == 0x28 && b[1] == 0xb5 && b[2] == 0x2f && b[3] == 0xfd;
}

#define ZSTD_FILE_REFUSED "zstd-compressed layer files are not supported (use .tar or .tar.gz)"

/* A named file layer must be there when the config loads (check, serve,
 * reload), not only when the first pull needs it: a file that can be
 * opened and read, and is not zstd. Hashing waits for the first pull. */
static int probe_file(const char *path, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "layer file %s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    unsigned char head[4];
    ssize_t n = 0;
    int rc = -1;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        snprintf(err, errlen, "layer file %s: not a regular file", path);
    else if ((n = pread(fd, head, sizeof head, 0)) < 0)
        snprintf(err, errlen, "layer file %s: read: %s", path, strerror(errno));
    else if (n == 0)
        snprintf(err, errlen, "layer file %s: empty (a layer file is a .tar or .tar.gz)", path);
    else if (is_zstd(head, (size_t)n))
        snprintf(err, errlen, "layer file %s: " ZSTD_FILE_REFUSED, path);
    else
        rc = 0;
    close(fd);
    return rc;
}

layer_catalog *layer_catalog_new(const config *c, char *err, size_t errlen) {
    layer_catalog *cat = calloc(1, sizeof *cat);
    if (!cat) {
        snprintf(err, errlen, "layers: out of memory");
        return NULL;
    }
    pthread_mutex_init(&cat->lock, NULL);
    const json_value *sec = c->layers;
    if (!sec || sec->count == 0) return cat;
    cat->names = calloc(sec->count, sizeof *cat->names);
    cat->specs = calloc(sec->count, sizeof *cat->specs);
    if (!cat->names || !cat->specs) {
        snprintf(err, errlen, "layers: out of memory");
        layer_catalog_free(cat);
        return NULL;
    }
    for (size_t i = 0; i < sec->count; i++) {
        char where[300];
        snprintf(where, sizeof where, "%s: layers.%s", c->path, sec->keys[i]);
        if (strcmp(sec->keys[i], "base") == 0) {
            snprintf(err, errlen, "%s: \"base\" is reserved for the upstream image's layers", where);
            layer_catalog_free(cat);
            return NULL;
        }
        if (sec->items[i]->type != JSON_OBJECT) {
            snprintf(err, errlen, "%s: must be an object with file, image or blob", where);
            layer_catalog_free(cat);
            return NULL;
        }
        if (layer_spec_parse(sec->items[i], c->dir, where, &cat->specs[i], err, errlen) != 0) {
            layer_catalog_free(cat);
            return NULL;
        }
        char perr[600];
        if (cat->specs[i].kind == LAYER_FILE && probe_file(cat->specs[i].file, perr, sizeof perr) != 0) {
            snprintf(err, errlen, "%s: %s", where, perr);
            layer_spec_clear(&cat->specs[i]);
            layer_catalog_free(cat);
            return NULL;
        }
        cat->names[i] = strdup(sec->keys[i]);
        cat->n = i + 1;
    }
    return cat;
}

void layer_catalog_free(layer_catalog *cat) {
    if (!cat) return;
    for (size_t i = 0; i < cat->n; i++) {
        free(cat->names[i]);
        layer_spec_clear(&cat->specs[i]);
    }
    free(cat->names);
    free(cat->specs);
    for (file_entry *f = cat->files, *next; f; f = next) {
        next = f->next;
        free(f->path);
        free(f);
    }
    pthread_mutex_destroy(&cat->lock);
    free(cat);
}

static const layer_spec *catalog_find(const layer_catalog *cat, const char *name) {
    for (size_t i = 0; i < cat->n; i++)
        if (strcmp(cat->names[i], name) == 0) return &cat->specs[i];
    return NULL;
}

/* A ustar header (magic at 257) or the zero block of an empty archive. */
static bool looks_like_tar(const unsigned char *block, size_t n) {
    if (n < 512) return false;
    if (memcmp(block + 257, "ustar", 5) == 0) return true;
    for (size_t i = 0; i < 512; i++)
        if (block[i]) return false;
    return true;
}

/* Hash a layer file, copy it into the store, and check it is a (gzipped) tar. */
static int describe_file(store *st, const char *path, file_entry *fe, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "layer file %s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    digest_ctx *file_dg = digest_new(), *tar_dg = digest_new();
    store_spool sp = {.fd = -1};
    unsigned char *in = malloc(65536), *out = malloc(65536);
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    bool gz = false, z_ready = false, header_checked = false, z_done = false;
    unsigned char head[512];
    size_t head_len = 0;
    int rc = -1;
    if (!file_dg || !tar_dg || !in || !out) {
        snprintf(err, errlen, "layer file %s: out of memory", path);
        goto out;
    }
    if (store_spool_create(st, &sp, err, errlen) != 0) goto out;
    uint64_t total = 0;
    for (bool first = true;; first = false) {
        ssize_t n = read(fd, in, 65536);
        if (n < 0) {
            if (errno == EINTR) continue;
            snprintf(err, errlen, "layer file %s: read: %s", path, strerror(errno));
            goto out;
        }
        if (n == 0) break;
        if (first) {
            gz = n >= 2 && in[0] == 0x1f && in[1] == 0x8b;
            if (is_zstd(in, (size_t)n)) {
                snprintf(err, errlen, "layer file %s: " ZSTD_FILE_REFUSED, path);
                goto out;
            }
            if (gz) {
                if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) {
                    snprintf(err, errlen, "layer file %s: zlib init failed", path);
                    goto out;
                }
                z_ready = true;
            }
        }
        total += (uint64_t)n;
        if (digest_update(file_dg, in, (size_t)n) != 0 || write(sp.fd, in, (size_t)n) != n) {
            snprintf(err, errlen, "layer file %s: copying into the cache: %s", path, strerror(errno));
            goto out;
        }
        const unsigned char *plain = in;
        size_t plain_len = (size_t)n;
        if (gz) {
            zs.next_in = in;
            zs.avail_in = (uInt)n;
            /* Until this input is used up and no output is pending. After a
             * member's end, more input is another gzip member (a .gz made by
             * `cat a.gz b.gz` or pigz -i): read as gunzip and containerd do,
             * so the diff_id covers the whole tar. */
            bool more = true;
            while (more) {
                if (z_done) {
                    if (inflateReset(&zs) != Z_OK) {
                        snprintf(err, errlen, "layer file %s: zlib reset failed", path);
                        goto out;
                    }
                    z_done = false;
                }
                zs.next_out = out;
                zs.avail_out = 65536;
                int zr = inflate(&zs, Z_NO_FLUSH);
                if (zr == Z_BUF_ERROR && zs.avail_out == 65536) break; /* needs the next read */
                if (zr != Z_OK && zr != Z_STREAM_END) {
                    snprintf(err, errlen, "layer file %s: corrupt gzip data (%s)", path,
                             zs.msg ? zs.msg : "inflate failed");
                    goto out;
                }
                size_t got = 65536 - zs.avail_out;
                digest_update(tar_dg, out, got);
                for (size_t i = 0; i < got && head_len < 512; i++) head[head_len++] = out[i];
                if (zr == Z_STREAM_END) z_done = true;
                more = zs.avail_in > 0 || (!z_done && zs.avail_out == 0);
            }
            plain_len = 0;
        } else {
            digest_update(tar_dg, plain, plain_len);
            for (size_t i = 0; i < plain_len && head_len < 512; i++) head[head_len++] = plain[i];
        }
        if (!header_checked && head_len >= 512) {
            header_checked = true;
            if (!looks_like_tar(head, head_len)) {
                snprintf(err, errlen, "layer file %s: not a tar archive%s", path, gz ? " inside the gzip" : "");
                goto out;
            }
        }
    }
    if (gz && !z_done) {
        snprintf(err, errlen, "layer file %s: truncated gzip data", path);
        goto out;
    }
    if (!header_checked) {
        snprintf(err, errlen, "layer file %s: not a tar archive (%zu bytes%s)", path, head_len,
                 gz ? " uncompressed" : "");
        goto out;
    }
    if (digest_final(file_dg, fe->digest) != 0 || digest_final(tar_dg, fe->diff_id) != 0) {
        snprintf(err, errlen, "layer file %s: sha256 failed", path);
        goto out;
    }
    fe->media_type = gz ? MT_OCI_LAYER_GZIP : MT_OCI_LAYER;
    fe->size = (off_t)total;
    if (store_blob_exists(st, fe->digest)) {
        store_spool_discard(st, &sp);
    } else if (store_spool_commit(st, &sp, fe->digest, err, errlen) != 0) {
        goto out;
    }
    rc = 0;
out:
    if (rc != 0 && sp.fd >= 0) store_spool_discard(st, &sp);
    if (sp.fd >= 0) close(sp.fd);
    if (z_ready) inflateEnd(&zs);
    digest_free(file_dg);
    digest_free(tar_dg);
    free(in);
    free(out);
    close(fd);
    return rc;
}

/* The file's descriptor, computed once per (path, inode, size, mtime). */
static int file_layer(const layer_env *env, const char *path, file_entry *out, fetch_error *e) {
    struct stat st;
    if (stat(path, &st) != 0) {
        fetch_error_set(e, 500, "UNKNOWN", "layer file %s: %s", path, strerror(errno));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        fetch_error_set(e, 500, "UNKNOWN", "layer file %s: not a regular file", path);
        return -1;
    }
    layer_catalog *cat = env->cat;
    pthread_mutex_lock(&cat->lock);
    for (file_entry *f = cat->files; f; f = f->next) {
        if (strcmp(f->path, path) == 0 && f->dev == st.st_dev && f->ino == st.st_ino && f->size == st.st_size &&
            f->mtime.tv_sec == st.st_mtim.tv_sec && f->mtime.tv_nsec == st.st_mtim.tv_nsec &&
            store_blob_exists(env->st, f->digest)) {
            *out = *f;
            pthread_mutex_unlock(&cat->lock);
            return 0;
        }
    }
    pthread_mutex_unlock(&cat->lock);
    file_entry fe = {.dev = st.st_dev, .ino = st.st_ino, .mtime = st.st_mtim};
    char err[1024];
    if (describe_file(env->st, path, &fe, err, sizeof err) != 0) {
        fetch_error_set(e, 500, "UNKNOWN", "%s", err);
        log_error("%s", err);
        return -1;
    }
    if (fe.size != st.st_size) {
        fetch_error_set(e, 500, "UNKNOWN", "layer file %s changed while it was read", path);
        return -1;
    }
    file_entry *keep = malloc(sizeof *keep);
    if (keep && (keep->path = strdup(path))) {
        char *p = keep->path;
        *keep = fe;
        keep->path = p;
        pthread_mutex_lock(&cat->lock);
        keep->next = cat->files;
        cat->files = keep;
        pthread_mutex_unlock(&cat->lock);
    } else {
        free(keep);
    }
    *out = fe;
    return 0;
}

/* ---------- stacks ---------- */

void layer_stack_clear(layer_stack *s) {
    for (size_t i = 0; i < s->n_strings; i++) free(s->strings[i]);
    free(s->strings);
    for (size_t i = 0; i < s->n_trees; i++) json_free(s->trees[i]);
    free(s->trees);
    free(s->items);
    memset(s, 0, sizeof *s);
}

static const char *keep_string(layer_stack *s, const char *v) {
    if (!v) return NULL;
    char **n = realloc(s->strings, (s->n_strings + 1) * sizeof *n);
    if (!n) return NULL;
    s->strings = n;
    char *c = strdup(v);
    if (!c) return NULL;
    s->strings[s->n_strings++] = c;
    return c;
}

static const json_value *keep_tree(layer_stack *s, json_value *v) {
    if (!v) return NULL;
    json_value **n = realloc(s->trees, (s->n_trees + 1) * sizeof *n);
    if (!n) {
        json_free(v);
        return NULL;
    }
    s->trees = n;
    s->trees[s->n_trees++] = v;
    return v;
}

static image_layer *push_item(layer_stack *s) {
    image_layer *n = realloc(s->items, (s->n + 1) * sizeof *n);
    if (!n) return NULL;
    s->items = n;
    memset(&s->items[s->n], 0, sizeof s->items[s->n]);
    return &s->items[s->n++];
}

bool layers_platform_matches(char *const *filter, size_t n, const char *platform) {
    for (size_t i = 0; i < n; i++) {
        size_t fl = strlen(filter[i]);
        if (strcmp(filter[i], platform) == 0) return true;
        /* "linux/arm64" matches "linux/arm64/v8"; never the other way. */
        if (strncmp(filter[i], platform, fl) == 0 && platform[fl] == '/' && strchr(filter[i], '/') &&
            !strchr(strchr(filter[i], '/') + 1, '/'))
            return true;
    }
    return false;
}

/* Split "UPSTREAM/repo:tag" or "UPSTREAM/repo@digest" (UPSTREAM optional:
 * the default upstream). */
static int parse_image_ref(const config *c, const char *ref, char *up, size_t ul, char *repo, size_t rl, char *tag,
                           size_t tl) {
    char buf[600];
    snprintf(buf, sizeof buf, "%s", ref);
    char *at = strchr(buf, '@');
    char *reference;
    if (at) {
        *at = '\0';
        reference = at + 1;
    } else {
        char *slash = strrchr(buf, '/');
        char *colon = strrchr(slash ? slash : buf, ':');
        if (colon) {
            *colon = '\0';
            reference = colon + 1;
        } else {
            reference = "latest";
        }
    }
    char *first = strchr(buf, '/');
    const char *name = buf;
    const char *upstream = c->default_upstream;
    if (first) {
        *first = '\0';
        if (config_find_upstream(c, buf)) {
            upstream = buf;
            name = first + 1;
        } else {
            *first = '/';
        }
    }
    if (!upstream || !ref_valid_name(name) || (!ref_valid_tag(reference) && !ref_is_sha256_digest(reference)))
        return -1;
    snprintf(up, ul, "%s", upstream);
    snprintf(repo, rl, "%s", name);
    snprintf(tag, tl, "%s", reference);
    return 0;
}

/* "os/arch[/variant]" of an index entry's platform object. */
static void platform_string(const json_value *p, char *out, size_t outlen) {
    const char *os = json_object_get_string(p, "os"), *arch = json_object_get_string(p, "architecture");
    const char *variant = json_object_get_string(p, "variant");
    snprintf(out, outlen, "%s/%s%s%s", os ? os : "unknown", arch ? arch : "unknown", variant ? "/" : "",
             variant ? variant : "");
}

/* The layers of another image, for one platform. */
static int image_layers(const layer_env *env, const layer_spec *spec, const char *label, const char *platform,
                        layer_stack *out, fetch_error *e) {
    char up[128], repo[300], ref[200];
    if (parse_image_ref(env->cfg, spec->image, up, sizeof up, repo, sizeof repo, ref, sizeof ref) != 0) {
        fetch_error_set(e, 500, "UNKNOWN",
                        "layer image \"%s\": not UPSTREAM/repository:tag or @sha256 digest of a "
                        "configured upstream",
                        spec->image);
        return -1;
    }
    upstream *u = env->find_upstream(env->ud, up);
    manifest_env menv = {.st = env->st, .cfg = env->cfg};
    manifest m;
    if (manifest_get(&menv, u, repo, ref, &m, e) != 0) {
        char msg[sizeof e->message];
        snprintf(msg, sizeof msg, "layer image %s: %s", spec->image, e->message);
        snprintf(e->message, sizeof e->message, "%s", msg);
        if (e->http_status == 404) { /* the image asked for exists; its layer source does not */
            e->http_status = 502;
            e->code = "UNKNOWN"; /* not MANIFEST_UNKNOWN: that would say the requested image is unknown */
        }
        return -1;
    }
    char jerr[256];
    json_value *man = json_parse(m.data, m.len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    if (man && (strcmp(m.media_type, MT_OCI_INDEX) == 0 || strcmp(m.media_type, MT_DOCKER_LIST) == 0)) {
        /* Pick the entry for this platform, else linux/amd64, else the first. */
        json_value *list = json_object_get(man, "manifests");
        const char *pick = NULL;
        char fallback[80] = "";
        for (size_t i = 0; list && list->type == JSON_ARRAY && i < list->count; i++) {
            char ps[128];
            platform_string(json_object_get(list->items[i], "platform"), ps, sizeof ps);
            const char *d = json_object_get_string(list->items[i], "digest");
            if (!d) continue;
            char *const want[] = {(char *)platform};
            if (layers_platform_matches(want, 1, ps) || strcmp(ps, platform) == 0) {
                pick = d;
                break;
            }
            if (!fallback[0] || strcmp(ps, "linux/amd64") == 0) snprintf(fallback, sizeof fallback, "%s", d);
        }
        char chosen[80];
        snprintf(chosen, sizeof chosen, "%s", pick ? pick : fallback);
        json_free(man);
        man = NULL;
        manifest_clear(&m);
        if (!chosen[0] || manifest_get(&menv, u, repo, chosen, &m, e) != 0) {
            if (!chosen[0]) fetch_error_set(e, 502, "UNKNOWN", "layer image %s: an empty index", spec->image);
            return -1;
        }
        man = json_parse(m.data, m.len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    }
    manifest_clear(&m);
    if (!man) {
        fetch_error_set(e, 502, "UNKNOWN", "layer image %s: manifest: %s", spec->image, jerr);
        return -1;
    }
    const char *cfg_digest = json_object_get_string(json_object_get(man, "config"), "digest");
    int64_t cfg_size = -1; /* the descriptor's size: what the fetch must bring */
    if (!json_get_int64(json_object_get(json_object_get(man, "config"), "size"), &cfg_size) || cfg_size < 0)
        cfg_size = -1;
    json_value *layers = json_object_get(man, "layers");
    if (!cfg_digest || !ref_is_sha256_digest(cfg_digest) || !layers || layers->type != JSON_ARRAY) {
        json_free(man);
        fetch_error_set(e, 502, "UNKNOWN", "layer image %s: the manifest has no config or layers", spec->image);
        return -1;
    }
    char *cfg_bytes = NULL;
    size_t cfg_len = 0;
    if (fetch_blob_bytes(env->fetches, u, repo, cfg_digest, cfg_size, CONFIG_BLOB_MAX, &cfg_bytes, &cfg_len, e) != 0) {
        json_free(man);
        return -1;
    }
    json_value *cfg = json_parse(cfg_bytes, cfg_len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    free(cfg_bytes);
    json_value *diff_ids = cfg ? json_object_get(json_object_get(cfg, "rootfs"), "diff_ids") : NULL;
    if (!diff_ids || diff_ids->type != JSON_ARRAY || diff_ids->count != layers->count) {
        fetch_error_set(e, 502, "UNKNOWN", "layer image %s: its config does not list one diff_id per layer",
                        spec->image);
        json_free(cfg);
        json_free(man);
        return -1;
    }
    const json_value *kept_cfg = keep_tree(out, cfg);
    int rc = 0;
    for (size_t i = (size_t)spec->skip; i < layers->count && rc == 0; i++) {
        const json_value *d = layers->items[i];
        const char *digest = json_object_get_string(d, "digest");
        const char *mt = json_object_get_string(d, "mediaType");
        uint64_t size;
        const char *diff = diff_ids->items[i]->type == JSON_STRING ? diff_ids->items[i]->str : NULL;
        if (!digest || !ref_is_sha256_digest(digest) || !mt || !json_get_uint64(json_object_get(d, "size"), &size) ||
            !diff) {
            fetch_error_set(e, 502, "UNKNOWN", "layer image %s: layer %zu has a malformed descriptor", spec->image, i);
            rc = -1;
            break;
        }
        image_layer *it = push_item(out);
        if (!it) {
            rc = -1;
            fetch_error_set(e, 500, "UNKNOWN", "out of memory");
            break;
        }
        it->digest = keep_string(out, digest);
        it->media_type = keep_string(out, mt);
        it->size = size;
        it->diff_id = keep_string(out, diff);
        it->source = "image";
        it->name = keep_string(out, label ? label : spec->image); /* as for files: the config name first */
        it->source_config = kept_cfg;
        it->created_by = keep_string(out, spec->created_by);
        it->comment = keep_string(out, spec->comment);
        json_value *urls = json_object_get(d, "urls");
        if (urls) it->urls = keep_tree(out, json_clone(urls));
        it->origin_upstream = keep_string(out, up);
        it->origin_repository = keep_string(out, repo);
        if (!it->origin_upstream || !it->origin_repository) {
            rc = -1;
            fetch_error_set(e, 500, "UNKNOWN", "out of memory");
        }
    }
    json_free(man);
    return rc;
}

static int resolve_one(const layer_env *env, const layer_spec *spec, const char *label, const char *platform,
                       const char *base_upstream, const char *base_repository, layer_stack *out, fetch_error *e) {
    if (spec->n_platforms && !layers_platform_matches(spec->platforms, spec->n_platforms, platform)) return 0;
    switch (spec->kind) {
        case LAYER_BASE: {
            image_layer *it = push_item(out);
            if (!it) break;
            it->is_base = true;
            return 0;
        }
        case LAYER_NAMED: {
            const layer_spec *named = catalog_find(env->cat, spec->name);
            if (!named) {
                fetch_error_set(e, 500, "UNKNOWN", "layer \"%s\" is not defined in the config's layers", spec->name);
                return -1;
            }
            if (named->kind == LAYER_NAMED || named->kind == LAYER_BASE) break;
            return resolve_one(env, named, spec->name, platform, base_upstream, base_repository, out, e);
        }
        case LAYER_FILE: {
            file_entry fe;
            if (file_layer(env, spec->file, &fe, e) != 0) {
                char msg[sizeof e->message];
                snprintf(msg, sizeof msg, "layer %s: %s", label ? label : spec->file, e->message);
                snprintf(e->message, sizeof e->message, "%s", msg);
                return -1;
            }
            image_layer *it = push_item(out);
            if (!it) break;
            it->digest = keep_string(out, fe.digest);
            it->diff_id = keep_string(out, fe.diff_id);
            it->media_type = fe.media_type;
            it->size = (uint64_t)fe.size;
            it->source = "file";
            it->name = keep_string(out, label ? label : spec->file);
            it->created_by = keep_string(out, spec->created_by);
            it->comment = keep_string(out, spec->comment);
            return it->digest && it->diff_id ? 0 : -1;
        }
        case LAYER_IMAGE:
            return image_layers(env, spec, label, platform, out, e);
        case LAYER_BLOB: {
            image_layer *it = push_item(out);
            if (!it) break;
            it->digest = keep_string(out, spec->digest);
            it->diff_id = keep_string(out, spec->diff_id);
            it->media_type = keep_string(out, spec->media_type);
            it->size = spec->size;
            it->source = "blob";
            it->name = keep_string(out, label ? label : spec->digest);
            it->created_by = keep_string(out, spec->created_by);
            it->comment = keep_string(out, spec->comment);
            if (spec->urls) it->urls = keep_tree(out, json_clone(spec->urls));
            const char *up = spec->upstream ? spec->upstream : base_upstream;
            const char *repo = spec->repository ? spec->repository : base_repository;
            if (!config_find_upstream(env->cfg, up)) {
                fetch_error_set(e, 500, "UNKNOWN", "layer %s: upstream \"%s\" is not configured", it->name, up);
                return -1;
            }
            it->origin_upstream = keep_string(out, up);
            it->origin_repository = keep_string(out, repo);
            return it->origin_upstream && it->origin_repository ? 0 : -1;
        }
    }
    fetch_error_set(e, 500, "UNKNOWN", "layer %s: out of memory or invalid", label ? label : "?");
    return -1;
}

int layers_resolve(const layer_env *env, const layer_spec *specs, size_t n, const char *platform,
                   const char *base_upstream, const char *base_repository, layer_stack *out, fetch_error *e) {
    memset(out, 0, sizeof *out);
    for (size_t i = 0; i < n; i++) {
        if (resolve_one(env, &specs[i], NULL, platform, base_upstream, base_repository, out, e) != 0) {
            layer_stack_clear(out);
            return -1;
        }
    }
    return 0;
}

static int key_one(const layer_env *env, const layer_spec *spec, digest_ctx *key, int depth, fetch_error *e) {
    char *fp = layer_spec_fingerprint(spec);
    if (!fp) {
        fetch_error_set(e, 500, "UNKNOWN", "out of memory");
        return -1;
    }
    digest_update(key, fp, strlen(fp) + 1);
    free(fp);
    if (spec->kind == LAYER_NAMED && depth == 0) {
        const layer_spec *named = catalog_find(env->cat, spec->name);
        if (!named) {
            fetch_error_set(e, 500, "UNKNOWN", "layer \"%s\" is not defined in the config's layers", spec->name);
            return -1;
        }
        return key_one(env, named, key, depth + 1, e);
    }
    if (spec->kind == LAYER_IMAGE) {
        char up[128], repo[300], ref[200];
        if (parse_image_ref(env->cfg, spec->image, up, sizeof up, repo, sizeof repo, ref, sizeof ref) != 0) {
            fetch_error_set(e, 500, "UNKNOWN",
                            "layer image \"%s\": not UPSTREAM/repository:tag or @sha256 digest of a "
                            "configured upstream",
                            spec->image);
            return -1;
        }
        manifest_env menv = {.st = env->st, .cfg = env->cfg};
        manifest m;
        if (manifest_get(&menv, env->find_upstream(env->ud, up), repo, ref, &m, e) != 0) {
            char msg[sizeof e->message];
            snprintf(msg, sizeof msg, "layer image %s: %s", spec->image, e->message);
            snprintf(e->message, sizeof e->message, "%s", msg);
            if (e->http_status == 404) {
                e->http_status = 502;
                e->code = "UNKNOWN";
            }
            return -1;
        }
        digest_update(key, m.digest, strlen(m.digest) + 1);
        manifest_clear(&m);
    }
    return 0;
}

int layers_key(const layer_env *env, const layer_spec *specs, size_t n, digest_ctx *key, fetch_error *e) {
    for (size_t i = 0; i < n; i++)
        if (key_one(env, &specs[i], key, 0, e) != 0) return -1;
    return 0;
}
