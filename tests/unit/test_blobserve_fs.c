/*
 * test_blobserve_fs: the blobserve URL grammar (a table of good and bad
 * URLs) and path lookup through layers built in a temp folder: upper layers
 * win, whiteouts and opaque folders hide, a file hides a folder below it,
 * symlinks resolve inside the image (absolute targets and ".." confined to
 * its root), link loops end.
 */
#include "regfacade/blobserve_fs.h"

#include "unit.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static void test_urls(void) {
    static const struct {
        const char *url;
        int status;
        const char *repo, *ref, *path;
        int by_digest, has_slash, trailing;
    } cases[] = {
        {"/ide/web:1.2/index.html", 0, "ide/web", "1.2", "index.html", 0, 1, 0},
        {"/ide/web:1.2/", 0, "ide/web", "1.2", "", 0, 1, 1},
        {"/ide/web:1.2", 0, "ide/web", "1.2", "", 0, 0, 0},
        {"/a:b/c//d/", 0, "a", "b", "c/d", 0, 1, 1},
        {"/a:b/caf%C3%A9.txt", 0, "a", "b", "caf\xc3\xa9.txt", 0, 1, 0},
        {"/a:b/x%20y", 0, "a", "b", "x y", 0, 1, 0},
        {"/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/x", 0, "a/b",
         "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "x", 1, 1, 0},
        {"/a/b/index.html", 400, NULL, NULL, NULL, 0, 0, 0},
        {"index.html", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/:tag/x", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/A:tag/x", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:/x", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:-bad/x", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a@sha256:abc/x", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a@md5:0123456789abcdef0123456789abcdef/x", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/../x", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/./x", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/%2e%2e/x", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/.%2E/x", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/x%2Fy", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/x%2fy", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/x%5cy", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/x\\y", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/x%00y", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/x%0ay", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/x%zz", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/x%2", 400, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/.wh.x", 404, NULL, NULL, NULL, 0, 0, 0},
        {"/a:b/d/.wh..wh..opq", 404, NULL, NULL, NULL, 0, 0, 0},
    };
    for (size_t i = 0; i < COUNT(cases); i++) {
        bs_url u;
        char why[256];
        int st = bs_url_parse(cases[i].url, &u, why, sizeof why);
        if (st != cases[i].status) fprintf(stderr, "url %s: status %d (%s)\n", cases[i].url, st, why);
        CHECK(st == cases[i].status);
        if (st != 0 || cases[i].status != 0) continue;
        CHECK_STR(u.repository, cases[i].repo);
        CHECK_STR(u.reference, cases[i].ref);
        CHECK_STR(u.path, cases[i].path);
        CHECK(u.by_digest == (cases[i].by_digest != 0));
        CHECK(u.has_slash == (cases[i].has_slash != 0));
        CHECK(u.trailing_slash == (cases[i].trailing != 0));
    }
    char out[64];
    CHECK(bs_path_normalize("/index.html", out, sizeof out) && strcmp(out, "index.html") == 0);
    CHECK(bs_path_normalize("a//./b/", out, sizeof out) && strcmp(out, "a/b") == 0);
    CHECK(!bs_path_normalize("a/../b", out, sizeof out));
    CHECK(!bs_path_normalize("/", out, sizeof out));
    /* Tar entry names: the root itself is length 0, not an error. */
    CHECK(bs_path_clean("./", out, sizeof out) == 0 && out[0] == '\0');
    CHECK(bs_path_clean("./usr/bin/", out, sizeof out) == 7 && strcmp(out, "usr/bin") == 0);
    CHECK(bs_path_clean("../etc/passwd", out, sizeof out) == -1);
    CHECK(bs_path_clean("a/b/..", out, sizeof out) == -1);
    char longseg[BS_NAME_MAX + 2];
    memset(longseg, 'x', sizeof longseg - 1);
    longseg[sizeof longseg - 1] = '\0';
    char big[2 * BS_NAME_MAX];
    CHECK(bs_path_clean(longseg, big, sizeof big) == -1); /* 256 bytes: no file system takes it */
    longseg[BS_NAME_MAX] = '\0';
    CHECK(bs_path_clean(longseg, big, sizeof big) == BS_NAME_MAX);
    CHECK(bs_path_clean("abcdef", out, 6) == -1); /* does not fit */
}

/* ---------- lookup over layers made in a temp folder ---------- */

static char base[256];

static void mk(const char *layer, const char *path, const char *content) {
    char p[1024];
    snprintf(p, sizeof p, "%s/%s/%s", base, layer, path);
    /* create parents */
    for (char *s = p + strlen(base) + 1; (s = strchr(s, '/')) != NULL; s++) {
        *s = '\0';
        mkdir(p, 0755);
        *s = '/';
    }
    if (content == NULL) {
        mkdir(p, 0755);
        return;
    }
    FILE *f = fopen(p, "w");
    if (!f) {
        perror(p);
        exit(2);
    }
    fputs(content, f);
    fclose(f);
}

static void ln(const char *layer, const char *path, const char *target) {
    char p[1024];
    snprintf(p, sizeof p, "%s/%s/%s", base, layer, path);
    if (symlink(target, p) != 0) {
        perror(p);
        exit(2);
    }
}

static int roots[3];

/* Content of path through the layers, or "ERR:<errno>" / "DIR". */
static const char *get(const char *path) {
    static char buf[256];
    bs_fs_entry e;
    if (bs_fs_lookup(roots, 3, path, &e) != 0) {
        snprintf(buf, sizeof buf, "ERR:%d", errno);
        return buf;
    }
    if (S_ISDIR(e.st.st_mode)) return "DIR";
    int fd = bs_fs_open(roots, &e);
    if (fd < 0) {
        snprintf(buf, sizeof buf, "OPENERR:%d", errno);
        return buf;
    }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    buf[n > 0 ? n : 0] = '\0';
    return buf;
}

static void test_lookup(void) {
    snprintf(base, sizeof base, "/tmp/rf-bsfs-XXXXXX");
    if (!mkdtemp(base)) {
        perror("mkdtemp");
        exit(2);
    }
    /* l0 (bottom) */
    mk("l0", "a.txt", "a0");
    mk("l0", "gone.txt", "gone");
    mk("l0", "d/x.txt", "x0");
    mk("l0", "d/y.txt", "y0");
    mk("l0", "opq/old.txt", "old");
    mk("l0", "f/inner.txt", "inner");
    mk("l0", "etc/passwd", "image passwd");
    mk("l0", "www/index.html", "www index");
    mk("l0", "deleted-dir/z.txt", "z");
    /* l1 */
    mk("l1", "a.txt", "a1");
    mk("l1", ".wh.gone.txt", "");
    mk("l1", "d/y.txt", "y1");
    mk("l1", "opq/.wh..wh..opq", "");
    mk("l1", "opq/new.txt", "new");
    mk("l1", "f", "now a file");
    mk("l1", ".wh.deleted-dir", "");
    ln("l1", "abs", "/etc/passwd");
    ln("l1", "up", "../../../../../etc/passwd");
    ln("l1", "dirlink", "/d");
    ln("l1", "loop1", "loop2");
    ln("l1", "loop2", "loop1");
    ln("l1", "dangling", "/nowhere");
    /* l2 (top) */
    mk("l2", "d/x.txt", "x2");
    ln("l2", "rel", "d/x.txt");
    ln("l2", "www-link", "www/");
    const char *names[] = {"l0", "l1", "l2"};
    for (int i = 0; i < 3; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/%s", base, names[i]);
        roots[i] = open(p, O_PATH | O_DIRECTORY);
    }
    CHECK_STR(get("a.txt"), "a1"); /* upper wins */
    CHECK_STR(get("d/x.txt"), "x2");
    CHECK_STR(get("d/y.txt"), "y1");        /* folders merge */
    CHECK_STR(get("gone.txt"), "ERR:2");    /* whiteout */
    CHECK_STR(get("opq/old.txt"), "ERR:2"); /* opaque folder */
    CHECK_STR(get("opq/new.txt"), "new");
    CHECK_STR(get("f"), "now a file");       /* a file hides the folder below */
    CHECK_STR(get("f/inner.txt"), "ERR:20"); /* ENOTDIR */
    CHECK_STR(get("deleted-dir/z.txt"), "ERR:2");
    CHECK_STR(get("abs"), "image passwd"); /* absolute target: the image's root */
    CHECK_STR(get("up"), "image passwd");  /* ".." stops at the image root */
    CHECK_STR(get("dirlink/x.txt"), "x2"); /* a link to a folder, then upper layers again */
    CHECK_STR(get("rel"), "x2");
    CHECK_STR(get("www-link/index.html"), "www index");
    CHECK_STR(get("loop1"), "ERR:40"); /* ELOOP */
    CHECK_STR(get("dangling"), "ERR:2");
    CHECK_STR(get(""), "DIR");
    CHECK_STR(get("d"), "DIR");
    CHECK_STR(get("missing/x"), "ERR:2");
    bs_fs_entry e;
    CHECK(bs_fs_lookup(roots, 3, "d/x.txt", &e) == 0 && e.layer == 2 && strcmp(e.path, "d/x.txt") == 0);
    CHECK(bs_fs_lookup(roots, 3, "dirlink/y.txt", &e) == 0 && e.layer == 1 && strcmp(e.path, "d/y.txt") == 0);
    CHECK(bs_fs_lookup(roots, 0, "a.txt", &e) != 0 && errno == EINVAL);
    for (int i = 0; i < 3; i++) close(roots[i]);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", base);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", base);
}

int main(void) {
    test_urls();
    test_lookup();
    return UNIT_DONE("blobserve_fs");
}
