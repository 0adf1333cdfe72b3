/* blobserve_fs: the URL grammar, and path lookup through extracted layers
 * (overlay semantics, whiteouts, symlinks resolved here and confined). */
#include "regfacade/blobserve_fs.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define WH_PREFIX ".wh."
#define WH_OPAQUE ".wh..wh..opq"

/* ---------- URL grammar ---------- */

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int refuse(char *why, size_t whylen, int status, const char *msg) {
    snprintf(why, whylen, "%s", msg);
    return status;
}

int bs_url_parse(const char *raw, bs_url *out, char *why, size_t whylen) {
    /* Field by field: the path buffer is large and needs no clearing. */
    out->repository[0] = out->reference[0] = out->path[0] = '\0';
    out->by_digest = out->has_slash = out->trailing_slash = false;
    if (raw[0] != '/') return refuse(why, whylen, 400, "the URL path must start with '/'");
    const char *p = raw + 1;
    size_t rn = strcspn(p, ":@");
    if (!p[rn])
        return refuse(why, whylen, 400,
                      "no tag or digest: name the image as /REPOSITORY:TAG/PATH or /REPOSITORY@sha256:HEX/PATH");
    if (rn == 0 || rn > REF_NAME_MAX) return refuse(why, whylen, 400, "invalid repository name");
    memcpy(out->repository, p, rn);
    out->repository[rn] = '\0';
    if (!ref_valid_name(out->repository)) return refuse(why, whylen, 400, "invalid repository name");
    char sep = p[rn];
    const char *r = p + rn + 1;
    size_t refn = strcspn(r, "/");
    if (refn == 0 || refn > REF_DIGEST_MAX)
        return refuse(why, whylen, 400, sep == ':' ? "invalid tag" : "invalid digest");
    memcpy(out->reference, r, refn);
    out->reference[refn] = '\0';
    out->by_digest = sep == '@';
    if (sep == ':' && !ref_valid_tag(out->reference)) return refuse(why, whylen, 400, "invalid tag");
    if (sep == '@' && !ref_is_sha256_digest(out->reference))
        return refuse(why, whylen, 400, "invalid digest (only sha256:<64 lowercase hex>)");

    const char *rest = r + refn;
    out->has_slash = *rest == '/';
    size_t rlen = strlen(rest);
    out->trailing_slash = rlen > 0 && rest[rlen - 1] == '/';
    size_t o = 0;
    const char *s = rest;
    while (*s) {
        while (*s == '/') s++;
        if (!*s) break;
        size_t n = strcspn(s, "/");
        char seg[256];
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            int c = (unsigned char)s[i];
            if (c == '%') {
                if (i + 2 >= n) return refuse(why, whylen, 400, "bad percent escape");
                int hi = hexval(s[i + 1]), lo = hi >= 0 ? hexval(s[i + 2]) : -1;
                if (hi < 0 || lo < 0) return refuse(why, whylen, 400, "bad percent escape");
                c = hi * 16 + lo;
                i += 2;
                if (c == '/') return refuse(why, whylen, 400, "an encoded '/' (%2F) is not allowed in the path");
            }
            if (c == 0) return refuse(why, whylen, 400, "NUL is not allowed in the path");
            if (c == '\\') return refuse(why, whylen, 400, "'\\' is not allowed in the path");
            if (c < 0x20 || c == 0x7f)
                return refuse(why, whylen, 400, "control characters are not allowed in the path");
            if (k + 1 >= sizeof seg) return refuse(why, whylen, 400, "a path segment is longer than 255 bytes");
            seg[k++] = (char)c;
        }
        seg[k] = '\0';
        s += n;
        if (strcmp(seg, ".") == 0 || strcmp(seg, "..") == 0)
            return refuse(why, whylen, 400, "\".\" and \"..\" segments are not allowed in the path");
        if (strncmp(seg, WH_PREFIX, strlen(WH_PREFIX)) == 0)
            return refuse(why, whylen, 404, "whiteout markers are not files");
        if (o + k + 2 >= sizeof out->path) return refuse(why, whylen, 400, "path too long");
        if (o) out->path[o++] = '/';
        memcpy(out->path + o, seg, k);
        o += k;
        out->path[o] = '\0';
    }
    return 0;
}

int bs_path_clean(const char *in, char *out, size_t outlen) {
    size_t o = 0;
    const char *s = in;
    if (outlen == 0) return -1;
    out[0] = '\0';
    while (*s) {
        while (*s == '/') s++;
        if (!*s) break;
        size_t n = strcspn(s, "/");
        if (n == 1 && s[0] == '.') {
            s += n;
            continue;
        }
        if (n == 2 && s[0] == '.' && s[1] == '.') return -1;
        if (n > BS_NAME_MAX || o + n + 2 > outlen) return -1;
        if (o) out[o++] = '/';
        memcpy(out + o, s, n);
        o += n;
        out[o] = '\0';
        s += n;
    }
    return (int)o;
}

bool bs_path_normalize(const char *in, char *out, size_t outlen) { return bs_path_clean(in, out, outlen) > 0; }

/* ---------- lookup ---------- */

typedef struct {
    const int *roots;
    size_t n;
    char canon[BS_FS_PATH_MAX]; /* "" or "a/b" */
    size_t clen;
    size_t vis[BS_FS_MAX_LAYERS]; /* layers where canon is a visible folder, top first */
    size_t nvis;
} walk;

/* out = canon "/" prefix name (or prefix name at the root); -1 when too long. */
static int join(char *out, size_t outlen, const walk *w, const char *prefix, const char *name) {
    int n = w->clen ? snprintf(out, outlen, "%s/%s%s", w->canon, prefix, name)
                    : snprintf(out, outlen, "%s%s", prefix, name);
    return n > 0 && (size_t)n < outlen ? 0 : -1;
}

static bool exists_at(int fd, const char *path) {
    struct stat st;
    return fstatat(fd, path, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

static void walk_root(walk *w) {
    w->clen = 0;
    w->canon[0] = '\0';
    w->nvis = 0;
    for (size_t i = w->n; i-- > 0;) {
        w->vis[w->nvis++] = i;
        if (exists_at(w->roots[i], WH_OPAQUE)) break;
    }
}

enum { STEP_DIR, STEP_FILE, STEP_LINK };

/* Look component c up in the current folder. STEP_DIR: walk moved into
 * it; STEP_FILE: *layer, *st set, canon extended; STEP_LINK: target read
 * (canon unchanged); -1 with errno. */
static int step(walk *w, const char *c, size_t *layer, struct stat *st, char *target, size_t tlen) {
    char p[BS_FS_PATH_MAX], m[BS_FS_PATH_MAX];
    if (join(p, sizeof p, w, "", c) != 0 || join(m, sizeof m, w, WH_PREFIX, c) != 0) {
        errno = ENAMETOOLONG;
        return -1;
    }
    size_t nv = 0;
    size_t newvis[BS_FS_MAX_LAYERS];
    bool found = false;
    for (size_t k = 0; k < w->nvis; k++) {
        size_t L = w->vis[k];
        struct stat s;
        if (fstatat(w->roots[L], p, &s, AT_SYMLINK_NOFOLLOW) == 0) {
            if (!found) {
                found = true;
                *layer = L;
                *st = s;
            }
            if (!S_ISDIR(s.st_mode)) break; /* a non-folder hides everything below it */
            newvis[nv++] = L;
            char q[BS_FS_PATH_MAX];
            if (snprintf(q, sizeof q, "%s/%s", p, WH_OPAQUE) < (int)sizeof q && exists_at(w->roots[L], q)) break;
        } else if (errno != ENOENT && errno != ENOTDIR) {
            return -1;
        }
        if (exists_at(w->roots[L], m)) break; /* whited out for the layers below */
    }
    if (!found) {
        errno = ENOENT;
        return -1;
    }
    if (S_ISLNK(st->st_mode)) {
        ssize_t n = readlinkat(w->roots[*layer], p, target, tlen - 1);
        if (n < 0) return -1;
        target[n] = '\0';
        return STEP_LINK;
    }
    if (!S_ISDIR(st->st_mode) && !S_ISREG(st->st_mode)) {
        errno = ENOENT; /* never extracted; never served */
        return -1;
    }
    size_t cl = strlen(c);
    if (w->clen + cl + 2 > sizeof w->canon) {
        errno = ENAMETOOLONG;
        return -1;
    }
    if (w->clen) w->canon[w->clen++] = '/';
    memcpy(w->canon + w->clen, c, cl + 1);
    w->clen += cl;
    if (S_ISDIR(st->st_mode)) {
        memcpy(w->vis, newvis, nv * sizeof *newvis);
        w->nvis = nv;
        return STEP_DIR;
    }
    return STEP_FILE;
}

/* After "..": walk from the root to the parent of canon again (it is made
 * of folders only, so no step can meet a link). */
static int walk_up(walk *w) {
    char parent[BS_FS_PATH_MAX];
    char *slash = strrchr(w->canon, '/');
    size_t pl = slash ? (size_t)(slash - w->canon) : 0;
    memcpy(parent, w->canon, pl);
    parent[pl] = '\0';
    walk_root(w);
    char *save = NULL;
    for (char *c = strtok_r(parent, "/", &save); c; c = strtok_r(NULL, "/", &save)) {
        size_t layer;
        struct stat st;
        char t[8];
        if (step(w, c, &layer, &st, t, sizeof t) != STEP_DIR) {
            errno = ENOENT;
            return -1;
        }
    }
    return 0;
}

int bs_fs_lookup(const int *roots, size_t n, const char *path, bs_fs_entry *out) {
    if (n == 0 || n > BS_FS_MAX_LAYERS) {
        errno = EINVAL;
        return -1;
    }
    walk w; /* not zero-initialized: its buffers are large; walk_root sets what is read */
    w.roots = roots;
    w.n = n;
    walk_root(&w);
    char rest[BS_FS_PATH_MAX];
    if (snprintf(rest, sizeof rest, "%s", path) >= (int)sizeof rest) {
        errno = ENAMETOOLONG;
        return -1;
    }
    size_t pos = 0;
    int links = 0;
    for (;;) {
        while (rest[pos] == '/') pos++;
        if (!rest[pos]) break;
        size_t cn = strcspn(rest + pos, "/");
        char c[256];
        if (cn >= sizeof c) {
            errno = ENAMETOOLONG;
            return -1;
        }
        memcpy(c, rest + pos, cn);
        c[cn] = '\0';
        pos += cn;
        if (strcmp(c, ".") == 0) continue;
        if (strcmp(c, "..") == 0) {
            if (w.clen && walk_up(&w) != 0) return -1;
            continue; /* ".." at the root stays at the root */
        }
        if (strncmp(c, WH_PREFIX, strlen(WH_PREFIX)) == 0) {
            errno = ENOENT;
            return -1;
        }
        size_t layer = 0;
        struct stat st;
        char target[BS_FS_PATH_MAX];
        int r = step(&w, c, &layer, &st, target, sizeof target);
        if (r < 0) return -1;
        if (r == STEP_DIR) continue;
        if (r == STEP_FILE) {
            const char *t = rest + pos;
            while (*t == '/') t++;
            if (*t) {
                errno = ENOTDIR;
                return -1;
            }
            out->layer = layer;
            out->st = st;
            snprintf(out->path, sizeof out->path, "%s", w.canon);
            return 0;
        }
        /* A symlink: its target, then what was left of the path. */
        if (++links > BS_FS_MAX_LINKS) {
            errno = ELOOP;
            return -1;
        }
        char next[BS_FS_PATH_MAX];
        if (snprintf(next, sizeof next, "%s/%s", target, rest + pos) >= (int)sizeof next) {
            errno = ENAMETOOLONG;
            return -1;
        }
        if (target[0] == '/') walk_root(&w); /* absolute: from the image root, never the host's */
        memcpy(rest, next, strlen(next) + 1);
        pos = 0;
    }
    /* A folder: the topmost layer that has it. */
    if (w.nvis == 0) {
        errno = ENOENT;
        return -1;
    }
    out->layer = w.vis[0];
    snprintf(out->path, sizeof out->path, "%s", w.canon);
    if (fstatat(roots[out->layer], w.clen ? w.canon : ".", &out->st, AT_SYMLINK_NOFOLLOW) != 0) return -1;
    return 0;
}

int bs_fs_open(const int *roots, const bs_fs_entry *e) {
    int dirfd = roots[e->layer];
    const char *p = e->path[0] ? e->path : ".";
    /* The lookup already walked this path without links; openat2 makes the
     * kernel refuse any link or escape that appeared meanwhile. */
    struct open_how how = {.flags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW,
                           .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS};
    int fd = (int)syscall(SYS_openat2, dirfd, p, &how, sizeof how);
    if (fd < 0 && errno == ENOSYS) fd = openat(dirfd, p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return -1;
    struct stat st = {0};
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        errno = S_ISDIR(st.st_mode) ? EISDIR : ENOENT;
        return -1;
    }
    return fd;
}
