/*
 * Unit tests of the reliability pieces that need no network: the store's
 * size cap (LRU eviction, pins, the index rebuilt at start, partial spools
 * removed, verification and quarantine, made records, removal and gc), the retry pacing of upstream.c (backoff, Retry-After, budget)
 * with mirror URL checks, and the config keys that drive them.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/config.h"
#include "regfacade/digest.h"
#include "regfacade/store.h"
#include "regfacade/upstream.h"
#include "unit.h"

static char tmpdir[256];

static void blob_of(char fill, size_t n, char *buf, char digest[DIGEST_STRING_LEN]) {
    memset(buf, fill, n);
    digest_bytes(buf, n, digest);
}

static bool on_disk(const char *dir, const char *digest) {
    char p[1024];
    snprintf(p, sizeof p, "%s/blobs/sha256/%.2s/%s", dir, digest + 7, digest + 7);
    struct stat st;
    return stat(p, &st) == 0;
}

static void put(store *s, char fill, char d[DIGEST_STRING_LEN]) {
    static char buf[4000];
    char err[256];
    blob_of(fill, sizeof buf, buf, d);
    CHECK(store_put(s, d, buf, sizeof buf, err, sizeof err) == 0);
}

static void test_store_lru(void) {
    char dir[300], err[256];
    snprintf(dir, sizeof dir, "%s/cache", tmpdir);
    store *s = store_open(dir, 10000, err, sizeof err);
    CHECK(s != NULL);
    if (!s) return;
    char a[DIGEST_STRING_LEN], b[DIGEST_STRING_LEN], c[DIGEST_STRING_LEN], d[DIGEST_STRING_LEN], e[DIGEST_STRING_LEN];
    put(s, 'a', a);
    put(s, 'b', b);
    store_stats st;
    store_get_stats(s, &st);
    CHECK(st.blobs == 2 && st.bytes == 8000 && st.evicted == 0);

    /* A is read (pinned, most recent): C evicts B, the least recently used. */
    int fa;
    uint64_t size;
    CHECK(store_blob_open(s, a, &fa, &size, err, sizeof err) == 1 && size == 4000);
    CHECK(store_blob_pinned(s, a));
    put(s, 'c', c);
    CHECK(on_disk(dir, a) && !on_disk(dir, b) && on_disk(dir, c));
    store_get_stats(s, &st);
    CHECK(st.evicted == 1 && st.bytes == 8000);

    /* C used after A: A is the oldest now, but pinned, so D evicts C. */
    int fc;
    CHECK(store_blob_open(s, c, &fc, &size, err, sizeof err) == 1);
    store_blob_close(s, c, fc);
    CHECK(!store_blob_pinned(s, c));
    put(s, 'd', d);
    CHECK(on_disk(dir, a) && !on_disk(dir, c) && on_disk(dir, d));

    /* The reader closes its fd without unpinning (as libmicrohttpd does),
     * and another file takes the same fd number: the pin is stale. */
    close(fa);
    char other[300];
    snprintf(other, sizeof other, "%s/other", tmpdir);
    int fo = open(other, O_RDWR | O_CREAT, 0600);
    CHECK(!store_blob_pinned(s, a));
    put(s, 'e', e);
    CHECK(!on_disk(dir, a) && on_disk(dir, d) && on_disk(dir, e));
    if (fo >= 0) close(fo);

    /* A blob read whole (manifests) leaves no pin behind. */
    char *data = NULL;
    size_t len = 0;
    CHECK(store_blob_read(s, d, 1 << 20, &data, &len, err, sizeof err) == 1 && len == 4000);
    free(data);
    CHECK(!store_blob_pinned(s, d));
    store_close(s);

    /* A partial spool of a killed run, then a restart: the spool is gone,
     * the index is rebuilt from blobs/ and nothing else. */
    char spool[400];
    snprintf(spool, sizeof spool, "%s/tmp/spool-1-1", dir);
    int fs = open(spool, O_WRONLY | O_CREAT, 0600);
    CHECK(fs >= 0 && write(fs, "partial", 7) == 7);
    if (fs >= 0) close(fs);
    s = store_open(dir, 10000, err, sizeof err);
    CHECK(s != NULL);
    if (!s) return;
    CHECK(access(spool, F_OK) != 0);
    store_get_stats(s, &st);
    CHECK(st.blobs == 2 && st.bytes == 8000);
    store_close(s);

    /* A lower cap at start evicts down to it. */
    s = store_open(dir, 5000, err, sizeof err);
    CHECK(s != NULL);
    if (!s) return;
    store_get_stats(s, &st);
    CHECK(st.blobs == 1 && st.bytes == 4000 && st.evicted == 1);
    store_close(s);
}

static int count_tag(void *ud, const char *upstream, const char *repository, const char *tag, const store_tag *t) {
    (void)upstream;
    (void)t;
    if (strcmp(repository, "acme/app") == 0 && strcmp(tag, "v1") == 0) ++*(int *)ud;
    return 0;
}

/* cache rm and cache gc at the store: a pinned blob is never removed, its
 * links go with it, gc takes strays, old spools and records that answer
 * nothing, and leaves blobs and links alone. */
static void test_store_remove_and_gc(void) {
    char dir[300], err[256], a[DIGEST_STRING_LEN], b[DIGEST_STRING_LEN];
    snprintf(dir, sizeof dir, "%s/rmgc", tmpdir);
    store *s = store_open(dir, 1 << 20, err, sizeof err);
    CHECK(s != NULL);
    put(s, 'r', a);
    put(s, 's', b);
    store_scope sc;
    store_scope_upstream(&sc, "reg", "acme/app");
    CHECK(store_link_put(s, &sc, a, NULL, NULL, err, sizeof err) == 0);
    CHECK(store_link_put(s, &sc, b, NULL, NULL, err, sizeof err) == 0);
    store_tag t = {.fetched = 1};
    snprintf(t.digest, sizeof t.digest, "%s", a);
    snprintf(t.media_type, sizeof t.media_type, "application/vnd.oci.image.manifest.v1+json");
    CHECK(store_tag_put(s, "reg", "acme/app", "v1", &t, err, sizeof err) == 0);
    int n = 0;
    CHECK(store_tag_each(s, count_tag, &n) == 0 && n == 1);
    /* In use: refused, still there. */
    int fd;
    uint64_t size;
    CHECK(store_blob_open(s, b, &fd, &size, err, sizeof err) == 1);
    CHECK(store_blob_remove(s, b, err, sizeof err) == STORE_IN_USE && on_disk(dir, b));
    CHECK(strstr(err, "in use") != NULL);
    store_blob_close(s, b, fd);
    CHECK(store_blob_remove(s, b, err, sizeof err) == STORE_REMOVED && !on_disk(dir, b));
    CHECK(store_link_get(s, &sc, b, NULL, 0, NULL, 0) == 0 && store_link_get(s, &sc, a, NULL, 0, NULL, 0) == 1);
    CHECK(store_blob_remove(s, b, err, sizeof err) == STORE_NOT_CACHED);
    CHECK(store_blob_remove(s, "sha256:nope", err, sizeof err) == STORE_REMOVE_ERROR);
    store_stats st;
    store_get_stats(s, &st);
    CHECK(st.blobs == 1 && st.bytes == 4000);
    /* gc: a stray in blobs/, an old and a fresh spool, a damaged tag record. */
    char p[600];
    snprintf(p, sizeof p, "%s/blobs/sha256/%.2s/stray.partial", dir, a + 7);
    int f = open(p, O_WRONLY | O_CREAT, 0600);
    CHECK(f >= 0 && write(f, "xyz", 3) == 3);
    close(f);
    snprintf(p, sizeof p, "%s/tmp/old-spool", dir);
    f = open(p, O_WRONLY | O_CREAT, 0600);
    CHECK(f >= 0 && write(f, "12345", 5) == 5);
    close(f);
    struct timespec old[2] = {{.tv_sec = time(NULL) - 7200}, {.tv_sec = time(NULL) - 7200}};
    CHECK(utimensat(AT_FDCWD, p, old, 0) == 0);
    snprintf(p, sizeof p, "%s/tmp/fresh-spool", dir);
    f = open(p, O_WRONLY | O_CREAT, 0600);
    CHECK(f >= 0);
    close(f);
    snprintf(p, sizeof p, "%s/tags/%064d", dir, 0);
    f = open(p, O_WRONLY | O_CREAT, 0600);
    CHECK(f >= 0 && write(f, "{not json", 9) == 9);
    close(f);
    store_gc_report r;
    CHECK(store_gc(s, 3600, &r, err, sizeof err) == 0);
    CHECK(r.stray_files == 1 && r.stray_bytes == 3 && r.tmp_files == 1 && r.tmp_bytes == 5);
    CHECK(r.damaged_records == 1 && r.tag_records == 0);
    CHECK(access(p, F_OK) != 0 && on_disk(dir, a));
    snprintf(p, sizeof p, "%s/tmp/fresh-spool", dir);
    CHECK(access(p, F_OK) == 0);
    /* The manifest the resolution names goes: the resolution answers nothing. */
    CHECK(store_blob_remove(s, a, err, sizeof err) == STORE_REMOVED);
    CHECK(store_gc(s, 3600, &r, err, sizeof err) == 0 && r.tag_records == 1);
    n = 0;
    CHECK(store_tag_each(s, count_tag, &n) == 0 && n == 0);
    store_close(s);
}

static void test_retry_after_parse(void) {
    CHECK(upstream_parse_retry_after(NULL) == -1);
    CHECK(upstream_parse_retry_after("") == -1);
    CHECK(upstream_parse_retry_after("abc") == -1);
    CHECK(upstream_parse_retry_after("5x") == -1);
    CHECK(upstream_parse_retry_after("5") == 5000);
    CHECK(upstream_parse_retry_after(" 12 ") == 12000);
    CHECK(upstream_parse_retry_after("0") == 0);
    CHECK(upstream_parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0); /* in the past */
    char date[64];
    time_t t = time(NULL) + 20;
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    long ms = upstream_parse_retry_after(date);
    CHECK(ms >= 18000 && ms <= 20000);
}

static upstream *mk(int retries, long budget_ms, long backoff_ms, const char *const *mirrors, size_t n, char *err,
                    size_t errlen) {
    upstream_options o = {.name = "t",
                          .url = "http://127.0.0.1:9",
                          .retries = retries,
                          .retry_budget_ms = budget_ms,
                          .backoff_ms = backoff_ms,
                          .mirrors = mirrors,
                          .n_mirrors = n};
    return upstream_new(&o, err, errlen);
}

static void test_retry_pacing(void) {
    char err[512], why[512];
    upstream *u = mk(2, 60000, 100, NULL, 0, err, sizeof err);
    CHECK(u != NULL);
    if (!u) return;
    upstream_retry r;
    upstream_retry_init(&r);
    long d1 = upstream_retry_delay(u, &r, NULL, why, sizeof why);
    long d2 = upstream_retry_delay(u, &r, "", why, sizeof why);
    CHECK(d1 >= 50 && d1 <= 150);
    CHECK(d2 >= 100 && d2 <= 300);
    CHECK(upstream_retry_delay(u, &r, NULL, why, sizeof why) == -1);
    CHECK(strstr(why, "retries") != NULL);
    /* Progress starts the count again. */
    upstream_retry_progress(&r);
    CHECK(upstream_retry_delay(u, &r, NULL, why, sizeof why) >= 50);
    /* A Retry-After is waited (at least), when it fits the budget. */
    upstream_retry_init(&r);
    CHECK(upstream_retry_delay(u, &r, "2", why, sizeof why) == 2000);
    upstream_free(u);

    u = mk(5, 3000, 100, NULL, 0, err, sizeof err);
    upstream_retry_init(&r);
    CHECK(upstream_retry_delay(u, &r, "10", why, sizeof why) == -1);
    CHECK(strstr(why, "Retry-After") != NULL);
    upstream_free(u);

    /* Backoff longer than the budget left: no retry. */
    u = mk(5, 300, 1000, NULL, 0, err, sizeof err);
    upstream_retry_init(&r);
    CHECK(upstream_retry_delay(u, &r, NULL, why, sizeof why) == -1);
    CHECK(strstr(why, "budget") != NULL);
    upstream_free(u);

    /* retries 0 is "none"; a negative count is the default (3). */
    u = mk(0, 60000, 10, NULL, 0, err, sizeof err);
    upstream_retry_init(&r);
    CHECK(upstream_retry_delay(u, &r, NULL, why, sizeof why) == -1);
    upstream_free(u);
    u = mk(-1, 60000, 10, NULL, 0, err, sizeof err);
    upstream_retry_init(&r);
    int n = 0;
    while (upstream_retry_delay(u, &r, NULL, why, sizeof why) >= 0) n++;
    CHECK(n == 3);
    upstream_free(u);
}

static void test_mirror_urls(void) {
    char err[512];
    const char *good[] = {"http://127.0.0.1:10/", "https://mirror.example"};
    upstream *u = mk(1, 1000, 10, good, 2, err, sizeof err);
    CHECK(u != NULL && upstream_base_count(u) == 3);
    upstream_free(u);
    const char *bad[][1] = {{"ftp://x"}, {"http://user:pw@host"}, {"http://host/?q"}, {"http:// host"}, {""}};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        err[0] = '\0';
        u = mk(1, 1000, 10, bad[i], 1, err, sizeof err);
        CHECK(u == NULL && strstr(err, "mirror") != NULL);
        upstream_free(u);
    }
}

static config *load(const char *text, char *err, size_t errlen) {
    char p[400];
    snprintf(p, sizeof p, "%s/config.json", tmpdir);
    FILE *f = fopen(p, "w");
    if (!f) return NULL;
    fputs(text, f);
    fclose(f);
    return config_load(p, err, errlen);
}

static void test_config_keys(void) {
    char err[1024];
    config *c =
        load("{\"cache\":{\"dir\":\"c\"},\"upstreams\":{\"a\":{\"url\":\"http://127.0.0.1:1\"}}}", err, sizeof err);
    CHECK(c != NULL);
    if (c) {
        CHECK(c->stale_max_seconds == 86400);
        CHECK(c->upstream_retry_budget_s == 30);
        CHECK(c->upstream_max_concurrent_fetches == 64);
        CHECK(c->upstreams[0].n_mirrors == 0);
        config_free(c);
    }
    c = load("{\"cache\":{\"dir\":\"c\",\"stale_max_seconds\":0},\"upstreams\":{\"a\":{\"url\":"
             "\"http://127.0.0.1:1\",\"mirrors\":[\"http://127.0.0.1:2/\",\"https://m.example\"]}},"
             "\"upstream_client\":{\"retry_budget_seconds\":5,\"max_concurrent_fetches\":2}}",
             err, sizeof err);
    CHECK(c != NULL);
    if (c) {
        CHECK(c->stale_max_seconds == 0);
        CHECK(c->upstream_retry_budget_s == 5);
        CHECK(c->upstream_max_concurrent_fetches == 2);
        CHECK(c->upstreams[0].n_mirrors == 2);
        CHECK_STR(c->upstreams[0].mirrors[0], "http://127.0.0.1:2");
        config_free(c);
    } else {
        fprintf(stderr, "config: %s\n", err);
    }
    const char *bad[] = {
        "{\"cache\":{\"dir\":\"c\"},\"upstreams\":{\"a\":{\"url\":\"http://h\",\"mirrors\":\"http://m\"}}}",
        "{\"cache\":{\"dir\":\"c\"},\"upstreams\":{\"a\":{\"url\":\"http://h\",\"mirrors\":[\"ftp://m\"]}}}",
        "{\"cache\":{\"dir\":\"c\"},\"upstreams\":{\"a\":{\"url\":\"http://h\",\"mirrors\":[3]}}}",
        "{\"cache\":{\"dir\":\"c\"},\"upstreams\":{\"a\":{\"url\":\"http://h\"}},"
        "\"upstream_client\":{\"max_concurrent_fetches\":0}}",
        "{\"cache\":{\"dir\":\"c\"},\"upstreams\":{\"a\":{\"url\":\"http://h\"}},"
        "\"upstream_client\":{\"retry_budget_seconds\":0}}",
        "{\"cache\":{\"dir\":\"c\",\"stale_max_seconds\":-1},\"upstreams\":{\"a\":{\"url\":\"http://h\"}}}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        c = load(bad[i], err, sizeof err);
        CHECK(c == NULL);
        config_free(c);
    }
}

static void blob_file(const char *dir, const char *digest, char *out, size_t len) {
    snprintf(out, len, "%s/blobs/sha256/%.2s/%s", dir, digest + 7, digest + 7);
}

static size_t quarantine_count(const char *dir) {
    char cmd[600], line[64] = "";
    snprintf(cmd, sizeof cmd, "ls '%s/quarantine' | wc -l", dir);
    FILE *f = popen(cmd, "r");
    if (!f) return 0;
    if (!fgets(line, sizeof line, f)) line[0] = '\0';
    pclose(f);
    return (size_t)strtoul(line, NULL, 10);
}

static void test_store_verification(void) {
    char dir[300], err[256], p[600];
    snprintf(dir, sizeof dir, "%s/verify", tmpdir);
    store *s = store_open(dir, 1 << 20, err, sizeof err);
    CHECK(s != NULL);
    if (!s) return;
    char a[DIGEST_STRING_LEN], b[DIGEST_STRING_LEN], c[DIGEST_STRING_LEN];
    put(s, 'a', a);
    put(s, 'b', b);
    put(s, 'c', c);

    /* A write to a verified blob's file: the next open hashes it, finds it
     * wrong, quarantines it and answers "not cached". */
    blob_file(dir, a, p, sizeof p);
    int fd = open(p, O_WRONLY);
    CHECK(fd >= 0 && pwrite(fd, "x", 1, 100) == 1);
    if (fd >= 0) close(fd);
    int f;
    uint64_t size;
    CHECK(store_blob_open(s, a, &f, &size, err, sizeof err) == 0);
    CHECK(!on_disk(dir, a) && quarantine_count(dir) == 1);

    /* A truncated one read whole: hashed on the read, not returned. */
    blob_file(dir, b, p, sizeof p);
    CHECK(truncate(p, 10) == 0);
    char *data = NULL;
    size_t len = 0;
    CHECK(store_blob_read(s, b, 1 << 20, &data, &len, err, sizeof err) == 0 && data == NULL);
    CHECK(!on_disk(dir, b) && quarantine_count(dir) == 2);
    store_stats st;
    store_get_stats(s, &st);
    CHECK(st.quarantined == 2 && st.blobs == 1);

    /* The right one stays; store_blob_verify agrees; a missing one is gone. */
    char reason[300];
    CHECK(store_blob_verify(s, c, NULL, NULL, reason, sizeof reason) == STORE_VERIFY_OK);
    CHECK(store_blob_verify(s, a, NULL, NULL, reason, sizeof reason) == STORE_VERIFY_GONE);
    CHECK(store_blob_open(s, c, &f, &size, err, sizeof err) == 1 && size == 4000);
    store_blob_close(s, c, f);

    /* Made records: the latest name first, no duplicates, per name. */
    char tag[200];
    CHECK(store_made_add(s, c, "v/w", "v1", err, sizeof err) == 0);
    CHECK(store_made_add(s, c, "v/x", "v2", err, sizeof err) == 0);
    CHECK(store_made_add(s, c, "v/w", "v1", err, sizeof err) == 0);
    CHECK(store_made_get(s, c, "v/x", tag, sizeof tag) == 1 && strcmp(tag, "v2") == 0);
    CHECK(store_made_get(s, c, "v/w", tag, sizeof tag) == 1 && strcmp(tag, "v1") == 0);
    CHECK(store_made_get(s, c, NULL, tag, sizeof tag) == 1 && strcmp(tag, "v1") == 0);
    CHECK(store_made_get(s, c, "v/y", tag, sizeof tag) == 0);
    CHECK(store_made_get(s, b, NULL, NULL, 0) == 0);
    CHECK(store_made_add(s, c, "bad name!", "v1", err, sizeof err) == -1);
    store_close(s);

    /* After a restart a blob is hashed on its first open: a flip made while
     * stopped is found. */
    blob_file(dir, c, p, sizeof p);
    fd = open(p, O_WRONLY);
    CHECK(fd >= 0 && pwrite(fd, "y", 1, 5) == 1);
    if (fd >= 0) close(fd);
    s = store_open(dir, 1 << 20, err, sizeof err);
    CHECK(s != NULL);
    if (!s) return;
    CHECK(store_blob_open(s, c, &f, &size, err, sizeof err) == 0 && quarantine_count(dir) == 3);
    store_close(s);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/rf-unit-rel-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    upstream_global_init();
    test_store_lru();
    test_store_remove_and_gc();
    test_store_verification();
    test_retry_after_parse();
    test_retry_pacing();
    test_mirror_urls();
    test_config_keys();
    upstream_global_cleanup();
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    return UNIT_DONE("reliability");
}
