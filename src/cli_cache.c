/* cli_cache: regfacade cache ls|du|rm|gc|warm, tags refresh (see
 * include/regfacade/cli_cache.h). */
#include "regfacade/cli_cache.h"

#include <curl/curl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "regfacade/admin.h"
#include "regfacade/cachectl.h"
#include "regfacade/json.h"
#include "regfacade/policy.h"
#include "regfacade/ref.h"
#include "regfacade/server.h"
#include "regfacade/store.h"
#include "regfacade/upstream.h"

/* ---------- printing ---------- */

static void human_size(uint64_t n, char *out, size_t len) {
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)n;
    size_t u = 0;
    while (v >= 1024 && u + 1 < sizeof units / sizeof units[0]) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(out, len, "%" PRIu64 " B", n);
    else
        snprintf(out, len, "%.1f %s", v, units[u]);
}

static void human_time(int64_t t, char *out, size_t len) {
    if (t <= 0) {
        snprintf(out, len, "-");
        return;
    }
    time_t tt = (time_t)t;
    struct tm tm;
    if (!gmtime_r(&tt, &tm) || strftime(out, len, "%Y-%m-%d %H:%M:%SZ", &tm) == 0) snprintf(out, len, "%" PRId64, t);
}

static uint64_t num(const json_value *o, const char *key) {
    uint64_t v = 0;
    return json_get_uint64(json_object_get(o, key), &v) ? v : 0;
}

static int64_t inum(const json_value *o, const char *key) {
    int64_t v = 0;
    return json_get_int64(json_object_get(o, key), &v) ? v : 0;
}

static const char *str(const json_value *o, const char *key) {
    const char *s = json_object_get_string(o, key);
    return s ? s : "";
}

static void print_ls(const json_value *v) {
    const json_value *images = json_object_get(v, "images"), *blobs = json_object_get(v, "blobs");
    printf("%-12s %-32s %-16s %-71s %10s  %s\n", "UPSTREAM", "REPOSITORY", "TAG", "DIGEST", "SIZE", "LAST USE");
    for (size_t i = 0; images && images->type == JSON_ARRAY && i < images->count; i++) {
        const json_value *im = images->items[i];
        char size[32], used[40];
        human_size(num(im, "size"), size, sizeof size);
        human_time(inum(im, "last_used"), used, sizeof used);
        uint64_t missing = num(im, "missing");
        printf("%-12s %-32s %-16s %-71s %10s  %s", str(im, "upstream"), str(im, "repository"), str(im, "tag"),
               str(im, "digest"), size, used);
        if (missing) printf("  (%" PRIu64 " of %" PRIu64 " blobs not cached)", missing, num(im, "blobs"));
        printf("\n");
    }
    printf("\n%-71s %10s  %-20s  %s\n", "BLOB", "SIZE", "LAST USE", "IN USE");
    for (size_t i = 0; blobs && blobs->type == JSON_ARRAY && i < blobs->count; i++) {
        const json_value *b = blobs->items[i];
        char size[32], used[40];
        human_size(num(b, "size"), size, sizeof size);
        human_time(inum(b, "last_used"), used, sizeof used);
        const json_value *iu = json_object_get(b, "in_use");
        printf("%-71s %10s  %-20s  %s\n", str(b, "digest"), size, used, iu && iu->type == JSON_TRUE ? "yes" : "no");
    }
}

static void print_du(const json_value *v) {
    char b[32], m[32], t[32], q[32];
    human_size(num(v, "bytes"), b, sizeof b);
    human_size(num(v, "max_bytes"), m, sizeof m);
    human_size(num(v, "tmp_bytes"), t, sizeof t);
    human_size(num(v, "quarantine_bytes"), q, sizeof q);
    printf("%s\n  blobs        %" PRIu64 " (%s of %s, cache.max_bytes)\n  tag records  %" PRIu64
           "\n  tmp          %" PRIu64 " files (%s)\n  quarantine   %" PRIu64 " files (%s)\n",
           str(v, "dir"), num(v, "blobs"), b, m, num(v, "tag_records"), num(v, "tmp_files"), t,
           num(v, "quarantine_files"), q);
}

static void print_rm(const json_value *v) {
    const json_value *tags = json_object_get(v, "tags"), *removed = json_object_get(v, "removed"),
                     *in_use = json_object_get(v, "in_use");
    for (size_t i = 0; tags && tags->type == JSON_ARRAY && i < tags->count; i++)
        printf("forgot %s %s:%s\n", str(tags->items[i], "upstream"), str(tags->items[i], "repository"),
               str(tags->items[i], "tag"));
    for (size_t i = 0; removed && removed->type == JSON_ARRAY && i < removed->count; i++) {
        char size[32];
        human_size(num(removed->items[i], "size"), size, sizeof size);
        printf("removed %s (%s)\n", str(removed->items[i], "digest"), size);
    }
    for (size_t i = 0; in_use && in_use->type == JSON_ARRAY && i < in_use->count; i++)
        if (in_use->items[i]->type == JSON_STRING)
            printf("kept %s: in use (a reader holds it open)\n", in_use->items[i]->str);
    char total[32];
    human_size(num(v, "bytes"), total, sizeof total);
    printf("%s: %zu blobs removed (%s)\n", str(v, "ref"), removed && removed->type == JSON_ARRAY ? removed->count : 0,
           total);
}

static void print_gc(const json_value *v) {
    char t[32], s[32];
    human_size(num(v, "tmp_bytes"), t, sizeof t);
    human_size(num(v, "stray_bytes"), s, sizeof s);
    printf("removed %" PRIu64 " tmp leftovers (%s), %" PRIu64 " tag records and %" PRIu64
           " generated records of images no longer cached, %" PRIu64 " damaged records, %" PRIu64
           " stray files in blobs/ (%s)\n",
           num(v, "tmp_files"), t, num(v, "tag_records"), num(v, "generated_records"), num(v, "damaged_records"),
           num(v, "stray_files"), s);
}

static void print_refresh(const json_value *v) {
    const json_value *f = json_object_get(v, "forgotten");
    printf("%s: %s %s:%s: %s\n", str(v, "ref"), str(v, "upstream"), str(v, "repository"), str(v, "tag"),
           f && f->type == JSON_TRUE ? "resolution forgotten; the next pull asks the upstream"
                                     : "no resolution was cached");
}

/* A warm progress line; the summary's failure count, or -1 for a blob line. */
static long print_warm_line(const char *line, size_t len, bool json) {
    char jerr[128];
    json_value *v = json_parse(line, len, 8, jerr, sizeof jerr);
    long failed = -1;
    const json_value *done = v ? json_object_get(v, "done") : NULL;
    if (done && done->type == JSON_TRUE) failed = (long)num(v, "failed");
    if (json) {
        printf("%.*s\n", (int)len, line);
    } else if (!v) {
        printf("(unreadable progress line: %s)\n", jerr);
    } else if (failed >= 0) {
        char b[32];
        human_size(num(v, "bytes"), b, sizeof b);
        printf("warmed: %" PRIu64 " blobs, %" PRIu64 " fetched (%s), %" PRIu64 " were cached, %" PRIu64 " failed\n",
               num(v, "blobs"), num(v, "fetched"), b, num(v, "cached"), num(v, "failed"));
    } else {
        char size[32];
        int64_t s = inum(v, "size");
        human_size(s > 0 ? (uint64_t)s : 0, size, sizeof size);
        printf("%-8s %s %s (%s)%s%s\n", str(v, "state"), str(v, "ref"), str(v, "digest"), size,
               json_object_get(v, "error") ? ": " : "", str(v, "error"));
    }
    fflush(stdout);
    json_free(v);
    return failed;
}

/* The answer of status (an OCI error body on failure) printed; the exit status. */
static int print_answer(const cli_cache_request *rq, int status, const char *body, size_t len) {
    char jerr[128];
    json_value *v = json_parse(body ? body : "", len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    if (status >= 400 && status != 409) {
        const json_value *errs = v ? json_object_get(v, "errors") : NULL;
        const char *msg = errs && errs->type == JSON_ARRAY && errs->count ? str(errs->items[0], "message") : "";
        fprintf(stderr, "regfacade %s: %d: %s\n", rq->cmd, status, *msg ? msg : (body ? body : ""));
        json_free(v);
        return 1;
    }
    if (!v) {
        fprintf(stderr, "regfacade %s: the answer is not JSON: %s\n", rq->cmd, jerr);
        return 1;
    }
    if (rq->json)
        printf("%.*s\n", (int)len, body);
    else if (strcmp(rq->cmd, "cache ls") == 0)
        print_ls(v);
    else if (strcmp(rq->cmd, "cache du") == 0)
        print_du(v);
    else if (strcmp(rq->cmd, "cache rm") == 0)
        print_rm(v);
    else if (strcmp(rq->cmd, "cache gc") == 0)
        print_gc(v);
    else
        print_refresh(v);
    json_free(v);
    if (status == 409)
        fprintf(stderr, "regfacade %s: blobs in use were kept; run it again once they are not\n", rq->cmd);
    return status == 409 ? 1 : 0;
}

/* ---------- offline ---------- */

/* cache warm on a stopped server's cache: its upstream clients and policy,
 * built as serve builds them, without listening. Takes st over. */
static int warm_offline(const config *c, store *st, const cli_cache_request *rq) {
    char err[2048];
    if (upstream_global_init() != 0) {
        fprintf(stderr, "regfacade cache warm: libcurl initialization failed\n");
        store_close(st);
        return 1;
    }
    generation_env ge;
    server *s = server_offline(c, st, &ge, err, sizeof err);
    if (!s) {
        fprintf(stderr, "regfacade cache warm: %s\n", err);
        upstream_global_cleanup();
        return 1;
    }
    cachectl_answer a = {0};
    cachectl_warm *w = cachectl_warm_start(&ge, NULL, rq->args, rq->n_args, rq->platforms, rq->n_platforms, &a);
    int rc = 1;
    if (!w) {
        rc = print_answer(rq, a.body ? a.status : 500, a.body, a.len);
        if (rc == 0) rc = 1;
    } else {
        long failed = -1;
        char *line;
        size_t len;
        while ((line = cachectl_warm_next(w, &len))) {
            long f = print_warm_line(line, len - 1, rq->json);
            if (f >= 0) failed = f;
            free(line);
        }
        rc = failed == 0 ? 0 : 1;
        cachectl_warm_free(w);
    }
    cachectl_answer_clear(&a);
    server_stop(s);
    upstream_global_cleanup();
    return rc;
}

static int run_offline(const config *c, store *st, const cli_cache_request *rq) {
    policy *pol = NULL;
    char err[2048];
    bool needs_policy = strcmp(rq->cmd, "tags refresh") == 0 ||
                        (strcmp(rq->cmd, "cache rm") == 0 && !ref_is_sha256_digest(rq->args[0]));
    if (needs_policy && !(pol = policy_new(c, err, sizeof err))) {
        fprintf(stderr, "regfacade %s: %s\n", rq->cmd, err);
        return 1;
    }
    cachectl_answer a = {0};
    if (strcmp(rq->cmd, "cache ls") == 0)
        cachectl_list(st, &a);
    else if (strcmp(rq->cmd, "cache du") == 0)
        cachectl_usage(st, c->cache_max_bytes, &a);
    else if (strcmp(rq->cmd, "cache gc") == 0)
        cachectl_gc(st, 0, &a); /* no server: no spool is live */
    else if (strcmp(rq->cmd, "cache rm") == 0)
        cachectl_remove(st, NULL, pol, rq->args[0], &a);
    else
        cachectl_tag_forget(st, NULL, pol, rq->args[0], &a);
    int rc = 1;
    if (!a.body)
        fprintf(stderr, "regfacade %s: out of memory\n", rq->cmd);
    else
        rc = print_answer(rq, a.status, a.body, a.len);
    cachectl_answer_clear(&a);
    policy_free(pol);
    return rc;
}

/* ---------- through the admin API ---------- */

typedef struct {
    char *buf;
    size_t len, cap;
    bool stream; /* cache warm: lines printed as they come */
    bool json;
    long failed; /* from the summary line; -1 before it */
    long status;
    CURL *h;
} http_body;

static size_t on_data(char *data, size_t size, size_t nmemb, void *ud) {
    http_body *b = ud;
    size_t n = size * nmemb;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 16384;
        while (cap < b->len + n + 1) cap *= 2;
        if (cap > 256u * 1024 * 1024) return 0;
        char *nb = realloc(b->buf, cap);
        if (!nb) return 0;
        b->buf = nb;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, data, n);
    b->len += n;
    b->buf[b->len] = '\0';
    if (b->stream) {
        if (!b->status) curl_easy_getinfo(b->h, CURLINFO_RESPONSE_CODE, &b->status);
        if (b->status != 200) return n; /* an error body: printed whole at the end */
        char *nl;
        while ((nl = memchr(b->buf, '\n', b->len))) {
            size_t line = (size_t)(nl - b->buf);
            long f = print_warm_line(b->buf, line, b->json);
            if (f >= 0) b->failed = f;
            memmove(b->buf, nl + 1, b->len - line - 1);
            b->len -= line + 1;
            b->buf[b->len] = '\0';
        }
    }
    return n;
}

static char *request_body(const cli_cache_request *rq) {
    if (strcmp(rq->cmd, "cache rm") == 0 || strcmp(rq->cmd, "tags refresh") == 0) {
        json_value *o = json_new_object();
        size_t len;
        char *out = o && json_object_set(o, "ref", json_new_string(rq->args[0])) == 0 ? json_serialize(o, &len) : NULL;
        json_free(o);
        return out;
    }
    if (strcmp(rq->cmd, "cache warm") != 0) return strdup("");
    json_value *o = json_new_object(), *refs = json_new_array(), *plats = json_new_array();
    bool bad = !o || !refs || !plats;
    for (size_t i = 0; !bad && i < rq->n_args; i++) bad = json_array_append(refs, json_new_string(rq->args[i])) != 0;
    for (size_t i = 0; !bad && i < rq->n_platforms; i++)
        bad = json_array_append(plats, json_new_string(rq->platforms[i])) != 0;
    char *out = NULL;
    size_t len;
    if (!bad && json_object_set(o, "refs", refs) == 0) {
        refs = NULL;
        if (json_object_set(o, "platforms", plats) == 0) {
            plats = NULL;
            out = json_serialize(o, &len);
        } else {
            plats = NULL;
        }
    }
    json_free(refs);
    json_free(plats);
    json_free(o);
    return out;
}

static int run_online(const config *c, const admin_config *ac, const char *why_offline, const cli_cache_request *rq) {
    static const struct {
        const char *cmd, *method, *path;
    } routes[] = {{"cache ls", "GET", "/cache"},         {"cache du", "GET", "/cache/du"},
                  {"cache rm", "POST", "/cache/rm"},     {"cache gc", "POST", "/cache/gc"},
                  {"cache warm", "POST", "/cache/warm"}, {"tags refresh", "POST", "/tags/refresh"}};
    const char *method = NULL, *path = NULL;
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
        if (strcmp(routes[i].cmd, rq->cmd) == 0) {
            method = routes[i].method;
            path = routes[i].path;
        }
    if (!method) return 2;
    char url[512], auth[4200];
    snprintf(url, sizeof url, "http://%s:%d%s", ac->listen_host, ac->listen_port, path);
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", ac->token);
    char *body = request_body(rq);
    CURL *h = curl_easy_init();
    struct curl_slist *hdrs = curl_slist_append(NULL, auth);
    struct curl_slist *h2 = hdrs ? curl_slist_append(hdrs, "Content-Type: application/json") : NULL;
    memset(auth, 0, sizeof auth);
    if (!body || !h || !h2) {
        fprintf(stderr, "regfacade %s: out of memory\n", rq->cmd);
        free(body);
        curl_slist_free_all(hdrs);
        if (h) curl_easy_cleanup(h);
        return 1;
    }
    hdrs = h2;
    http_body b = {.stream = strcmp(rq->cmd, "cache warm") == 0, .json = rq->json, .failed = -1, .h = h};
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http");
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    if (strcmp(method, "POST") == 0) curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    CURLcode cr = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(h);
    curl_slist_free_all(hdrs);
    free(body);
    int rc;
    if (cr != CURLE_OK) {
        fprintf(stderr, "regfacade %s: %s; and the admin API at %s:%d (admin.listen) did not answer: %s\n", rq->cmd,
                why_offline, ac->listen_host, ac->listen_port, curl_easy_strerror(cr));
        rc = 1;
    } else if (b.stream && status == 200) {
        if (b.failed < 0) fprintf(stderr, "regfacade cache warm: the server ended the progress before its summary\n");
        rc = b.failed == 0 ? 0 : 1;
    } else {
        rc = print_answer(rq, (int)status, b.buf, b.len);
    }
    free(b.buf);
    (void)c;
    return rc;
}

int cli_cache_run(const config *c, const cli_cache_request *rq) {
    char err[2048];
    /* No cap but for warm: looking must not evict anything; warming makes
     * room as serving does. */
    bool warm = strcmp(rq->cmd, "cache warm") == 0;
    store *st = store_open(c->cache_dir, warm ? c->cache_max_bytes : UINT64_MAX, err, sizeof err);
    if (st && warm) return warm_offline(c, st, rq);
    if (st) {
        int rc = run_offline(c, st, rq);
        store_close(st);
        return rc;
    }
    /* Held by a running server (or unreadable): ask that server. */
    admin_config *ac = NULL;
    char aerr[1024];
    if (admin_config_parse(c, &ac, aerr, sizeof aerr) != 0) {
        fprintf(stderr, "regfacade %s: %s; and the admin section cannot be used: %s\n", rq->cmd, err, aerr);
        return 1;
    }
    if (!ac) {
        fprintf(stderr, "regfacade %s: %s; and %s has no \"admin\" section to reach the running server through\n",
                rq->cmd, err, c->path);
        return 1;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
        fprintf(stderr, "regfacade %s: libcurl initialization failed\n", rq->cmd);
        admin_config_free(ac);
        return 1;
    }
    int rc = run_online(c, ac, err, rq);
    admin_config_free(ac);
    curl_global_cleanup();
    return rc;
}
