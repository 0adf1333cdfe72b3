/* admin: the admin API (see include/regfacade/admin.h). One handler file:
 * its config, its listener, its routes. The specs themselves are specs.c's. */
#include "regfacade/admin.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "regfacade/cachectl.h"
#include "regfacade/json.h"
#include "regfacade/log.h"
#include "regfacade/scrub.h"
#include "regfacade/mhd_glue.h"
#include "regfacade/oci_error.h"
#include "regfacade/specs.h"

#define ADMIN_TOKEN_MIN 16
#define ADMIN_MAX_URL 1024
#define ADMIN_MAX_CONNECTIONS 64
#define ADMIN_TIMEOUT_S 30

struct admin_server {
    const config *cfg;
    admin_config *ac;
    specs *sp;
    store *st;
    generation_env genv; /* the server's generations, for cache warm and REF resolution */
    struct MHD_Daemon *daemon;
    mhd_glue_listener *listener; /* its guard against idle-connection floods */
};

/* ---------- config ---------- */

void admin_config_free(admin_config *ac) {
    if (!ac) return;
    free(ac->listen_host);
    if (ac->token) {
        memset(ac->token, 0, ac->token_len);
        free(ac->token);
    }
    free(ac);
}

static char *read_token(const char *path, size_t *len, char *why, size_t whylen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(why, whylen, "cannot read %s: %s", path, strerror(errno));
        return NULL;
    }
    char buf[4097];
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof buf - 1 - n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        n += (size_t)r;
        if (n == sizeof buf - 1) break;
    }
    close(fd);
    buf[n] = '\0';
    size_t s = 0;
    while (s < n && (buf[s] == ' ' || buf[s] == '\t' || buf[s] == '\r' || buf[s] == '\n')) s++;
    while (n > s && (buf[n - 1] == ' ' || buf[n - 1] == '\t' || buf[n - 1] == '\r' || buf[n - 1] == '\n')) n--;
    char *tok = NULL;
    if (n - s < ADMIN_TOKEN_MIN)
        snprintf(why, whylen, "%s holds %zu characters; an admin token needs at least %d", path, n - s,
                 ADMIN_TOKEN_MIN);
    else if (memchr(buf + s, '\0', n - s) || memchr(buf + s, '\n', n - s) || memchr(buf + s, '\r', n - s))
        snprintf(why, whylen, "%s: the token must be one line without NUL bytes", path);
    else if ((tok = malloc(n - s + 1))) {
        memcpy(tok, buf + s, n - s);
        tok[n - s] = '\0';
        *len = n - s;
    } else
        snprintf(why, whylen, "out of memory");
    memset(buf, 0, sizeof buf);
    return tok;
}

int admin_config_parse(const config *c, admin_config **out, char *err, size_t errlen) {
    *out = NULL;
    const json_value *sec = c->admin;
    if (!sec) return 0;
    static const char *const keys[] = {"listen", "token_file", NULL};
    config_section p_ = {c, "admin", err, errlen}, *p = &p_;
    if (config_section_check_keys(p, sec, "", keys) != 0) return -1;
    const char *listen = json_object_get_string(sec, "listen");
    const char *token_file = json_object_get_string(sec, "token_file");
    if (!listen || !*listen) return config_section_fail(p, "listen: required: \"IPV4:PORT\" (its own port)");
    if (!token_file || !*token_file)
        return config_section_fail(p, "token_file: required: a file holding the admin API's bearer token");
    admin_config *ac = calloc(1, sizeof *ac);
    if (!ac) return config_section_fail(p, ": out of memory");
    const char *colon = strrchr(listen, ':');
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : 0;
    struct in_addr a;
    if (!colon || colon == listen || !colon[1] || *end || port < 1 || port > 65535) {
        admin_config_free(ac);
        return config_section_fail(p, "listen: \"%s\" must be IPV4:PORT", listen);
    }
    ac->listen_host = strndup(listen, (size_t)(colon - listen));
    ac->listen_port = (int)port;
    if (!ac->listen_host || inet_pton(AF_INET, ac->listen_host, &a) != 1) {
        admin_config_free(ac);
        return config_section_fail(p, "listen: \"%s\": the host must be an IPv4 address", listen);
    }
    if (ac->listen_port == c->listen_port &&
        (strcmp(ac->listen_host, c->listen_host) == 0 || strcmp(ac->listen_host, "0.0.0.0") == 0 ||
         strcmp(c->listen_host, "0.0.0.0") == 0)) {
        admin_config_free(ac);
        return config_section_fail(p, "listen: \"%s\" is the registry listener's address; the admin API needs its own",
                                   listen);
    }
    char path[4096], why[600];
    if (token_file[0] == '/' || !c->dir)
        snprintf(path, sizeof path, "%s", token_file);
    else
        snprintf(path, sizeof path, "%s/%s", c->dir, token_file);
    ac->token = read_token(path, &ac->token_len, why, sizeof why);
    if (!ac->token) {
        admin_config_free(ac);
        return config_section_fail(p, "token_file: %s", why);
    }
    *out = ac;
    return 0;
}

/* ---------- responses ---------- */

/* Queue r (consumed) with the headers every answer has. */
static enum MHD_Result send_response(struct MHD_Connection *conn, unsigned status, struct MHD_Response *r,
                                     const char *content_type, const char *extra_name, const char *extra_value) {
    MHD_add_response_header(r, "Content-Type", content_type);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    if (extra_name) MHD_add_response_header(r, extra_name, extra_value);
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_body(struct MHD_Connection *conn, unsigned status, char *body, size_t len,
                                 const char *extra_name, const char *extra_value) {
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    return send_response(conn, status, r, "application/json", extra_name, extra_value);
}

static enum MHD_Result send_error(struct MHD_Connection *conn, const char *method, const char *url, unsigned status,
                                  const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static enum MHD_Result send_error(struct MHD_Connection *conn, const char *method, const char *url, unsigned status,
                                  const char *code, const char *fmt, ...) {
    char msg[1500];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_warn("admin %s %.200s: %u %s: %s", method, url, status, code, msg);
    size_t len = 0;
    char *body = oci_error_body(code, msg, NULL, &len);
    if (!body) return MHD_NO;
    return send_body(conn, status, body, len, status == 401 ? "WWW-Authenticate" : NULL,
                     "Bearer realm=\"regfacade-admin\"");
}

static enum MHD_Result send_empty(struct MHD_Connection *conn, unsigned status) {
    struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---------- one request ---------- */

typedef struct {
    cachectl_warm *w;
    char *line;
    size_t len, off;
} cachectl_warm_stream;

typedef struct {
    char *buf;
    size_t len, cap;
    bool answered;  /* an error went out before the body was read */
    bool too_big;   /* more than specs.max_bytes arrived: the rest is dropped, then 413 */
    size_t dropped; /* bytes dropped so far */
} req_ctx;

/* A body without Content-Length that goes on this far past the limit is
 * cut (the connection is closed) instead of read to its end. */
#define ADMIN_DROP_MAX (16 * 1024 * 1024)

/* Constant time in the token's length, whatever the candidate. */
static bool token_ok(const admin_config *ac, const char *header) {
    if (!header || strncasecmp(header, "Bearer ", 7) != 0) return false;
    const char *cand = header + 7;
    while (*cand == ' ') cand++;
    size_t n = strlen(cand);
    unsigned diff = n != ac->token_len;
    for (size_t i = 0; i < ac->token_len; i++)
        diff |= (unsigned char)ac->token[i] ^ (unsigned char)(i < n ? cand[i] : 0);
    return diff == 0;
}

/* Checks made as soon as the headers are in: token, size. 0: go on. */
static enum MHD_Result early_checks(admin_server *a, struct MHD_Connection *conn, const char *method, const char *url,
                                    req_ctx *ctx, bool *refused) {
    *refused = true;
    const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!auth)
        return send_error(conn, method, url, 401, "UNAUTHORIZED",
                          "the admin API needs \"Authorization: Bearer <token>\" (admin.token_file)");
    if (!token_ok(a->ac, auth)) return send_error(conn, method, url, 401, "UNAUTHORIZED", "the admin token is wrong");
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    size_t max = specs_max_bytes(a->sp);
    if (cl && strtoull(cl, NULL, 10) > max)
        return send_error(conn, method, url, 413, "TOO_LARGE",
                          "the body is %s bytes; a spec is at most %zu "
                          "(specs.max_bytes)",
                          cl, max);
    (void)ctx;
    *refused = false;
    return MHD_YES;
}

/* ---------- cache control (cachectl.h) ---------- */

static enum MHD_Result send_answer(struct MHD_Connection *conn, const char *method, const char *url,
                                   cachectl_answer *ans) {
    if (!ans->body) return MHD_NO;
    if (ans->status >= 400)
        log_warn("admin %s %.200s: %d: %.*s", method, url, ans->status, (int)ans->len, ans->body);
    else
        log_info("admin %s %.200s: %d", method, url, ans->status);
    char *body = ans->body;
    ans->body = NULL;
    return send_body(conn, (unsigned)ans->status, body, ans->len, NULL, NULL);
}

/* The body's JSON object, or NULL after answering 400. */
static json_value *body_object(struct MHD_Connection *conn, const char *method, const char *url, req_ctx *ctx,
                               enum MHD_Result *ret) {
    char jerr[256];
    json_value *v = json_parse(ctx->buf ? ctx->buf : "", ctx->len, 8, jerr, sizeof jerr);
    if (!v || v->type != JSON_OBJECT) {
        json_free(v);
        *ret = send_error(conn, method, url, 400, "UNSUPPORTED", "%s %s needs a JSON object body: %s", method, url,
                          v ? "not an object" : jerr);
        return NULL;
    }
    return v;
}

/* POST /cache/rm and /tags/refresh: {"ref": "NAME:TAG"}. */
static enum MHD_Result cache_ref_op(admin_server *a, struct MHD_Connection *conn, const char *method, const char *url,
                                    req_ctx *ctx, bool forget) {
    enum MHD_Result ret = MHD_NO;
    json_value *v = body_object(conn, method, url, ctx, &ret);
    if (!v) return ret;
    const char *ref = json_object_get_string(v, "ref");
    if (!ref || !*ref) {
        json_free(v);
        return send_error(conn, method, url, 400, "NAME_INVALID",
                          "%s %s: \"ref\" is required (NAME:TAG, "
                          "NAME@sha256:HEX%s)",
                          method, url, forget ? "" : " or sha256:HEX");
    }
    generation g;
    a->genv.acquire(a->genv.ud, &g);
    cachectl_answer ans = {0};
    if (forget)
        cachectl_tag_forget(a->st, a->sp, g.pol, ref, &ans);
    else
        cachectl_remove(a->st, a->sp, g.pol, ref, &ans);
    a->genv.release(a->genv.ud, &g);
    json_free(v);
    return send_answer(conn, method, url, &ans);
}

/* POST /cache/warm streams one progress line per blob (NDJSON), each
 * fetched as the line before it went out. */
static ssize_t warm_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    cachectl_warm_stream *ws = cls;
    if (ws->off == ws->len) {
        free(ws->line);
        ws->line = cachectl_warm_next(ws->w, &ws->len);
        ws->off = 0;
        if (!ws->line) {
            ws->len = 0;
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
    }
    size_t n = ws->len - ws->off < max ? ws->len - ws->off : max;
    memcpy(buf, ws->line + ws->off, n);
    ws->off += n;
    return (ssize_t)n;
}

static void warm_stream_free(void *cls) {
    cachectl_warm_stream *ws = cls;
    cachectl_warm_free(ws->w);
    free(ws->line);
    free(ws);
}

static enum MHD_Result cache_warm(admin_server *a, struct MHD_Connection *conn, const char *method, const char *url,
                                  req_ctx *ctx) {
    enum MHD_Result ret = MHD_NO;
    json_value *v = body_object(conn, method, url, ctx, &ret);
    if (!v) return ret;
    const json_value *refs = json_object_get(v, "refs"), *plats = json_object_get(v, "platforms");
    const char *rl[64], *pl[16];
    size_t nr = 0, np = 0;
    const char *bad = NULL;
    if (!refs || refs->type != JSON_ARRAY || refs->count == 0 || refs->count > 64)
        bad = "\"refs\" must be a list of 1 to 64 image references";
    for (size_t i = 0; !bad && i < refs->count; i++)
        if (refs->items[i]->type != JSON_STRING)
            bad = "\"refs\" must hold strings";
        else
            rl[nr++] = refs->items[i]->str;
    if (!bad && plats && (plats->type != JSON_ARRAY || plats->count > 16))
        bad = "\"platforms\" must be a list of at most 16 \"OS/ARCH[/VARIANT]\"";
    for (size_t i = 0; !bad && plats && i < plats->count; i++)
        if (plats->items[i]->type != JSON_STRING || !strchr(plats->items[i]->str, '/'))
            bad = "\"platforms\" must hold \"OS/ARCH[/VARIANT]\" strings";
        else
            pl[np++] = plats->items[i]->str;
    if (bad) {
        json_free(v);
        return send_error(conn, method, url, 400, "UNSUPPORTED", "POST /cache/warm: %s", bad);
    }
    cachectl_answer err = {0};
    cachectl_warm *w = cachectl_warm_start(&a->genv, a->sp, rl, nr, pl, np, &err);
    json_free(v);
    if (!w) return send_answer(conn, method, url, &err);
    cachectl_warm_stream *ws = calloc(1, sizeof *ws);
    struct MHD_Response *r =
        ws ? MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, warm_reader, ws, warm_stream_free) : NULL;
    if (!r) {
        if (ws) free(ws);
        cachectl_warm_free(w);
        return MHD_NO;
    }
    ws->w = w;
    return send_response(conn, 200, r, "application/x-ndjson", NULL, NULL);
}

static enum MHD_Result route_cache(admin_server *a, struct MHD_Connection *conn, const char *method, const char *url,
                                   req_ctx *ctx) {
    bool get = strcmp(method, "GET") == 0, post = strcmp(method, "POST") == 0;
    cachectl_answer ans = {0};
    if (strcmp(url, "/cache") == 0 && get)
        cachectl_list(a->st, &ans);
    else if (strcmp(url, "/cache/du") == 0 && get)
        cachectl_usage(a->st, a->cfg->cache_max_bytes, &ans);
    /* Spools younger than an hour may be transfers still running. */
    else if (strcmp(url, "/cache/gc") == 0 && post)
        cachectl_gc(a->st, 3600, &ans);
    else if (strcmp(url, "/cache/rm") == 0 && post)
        return cache_ref_op(a, conn, method, url, ctx, false);
    else if (strcmp(url, "/tags/refresh") == 0 && post)
        return cache_ref_op(a, conn, method, url, ctx, true);
    else if (strcmp(url, "/cache/warm") == 0 && post)
        return cache_warm(a, conn, method, url, ctx);
    else
        return send_error(conn, method, url, 405, "UNSUPPORTED",
                          "%s %s: GET /cache, GET /cache/du, POST /cache/rm, "
                          "POST /cache/gc, POST /cache/warm, POST /cache/verify, POST /tags/refresh",
                          method, url);
    return send_answer(conn, method, url, &ans);
}

static bool is_cache_url(const char *url) {
    return strcmp(url, "/cache") == 0 || strcmp(url, "/cache/du") == 0 || strcmp(url, "/cache/gc") == 0 ||
           strcmp(url, "/cache/rm") == 0 || strcmp(url, "/cache/warm") == 0 || strcmp(url, "/tags/refresh") == 0;
}

static enum MHD_Result route(admin_server *a, struct MHD_Connection *conn, const char *method, const char *url,
                             req_ctx *ctx) {
    if (is_cache_url(url)) return route_cache(a, conn, method, url, ctx);
    if (strcmp(url, "/cache/verify") == 0) {
        if (strcmp(method, "POST") != 0)
            return send_error(conn, method, url, 405, "UNSUPPORTED", "%s /cache/verify: only POST runs a verification",
                              method);
        scrub_report rep;
        if (scrub_verify_all(a->st, &rep) != 0)
            return send_error(conn, method, url, 500, "UNKNOWN", "POST /cache/verify: out of memory");
        size_t len = 0;
        char *body = scrub_report_json(&rep, &len);
        log_info("admin POST /cache/verify: %zu blobs checked, %zu failed", rep.checked, rep.n_failed);
        scrub_report_clear(&rep);
        if (!body) return MHD_NO;
        return send_body(conn, 200, body, len, NULL, NULL);
    }
    if (strcmp(url, "/specs") == 0 || strcmp(url, "/specs/") == 0) {
        if (strcmp(method, "GET") != 0)
            return send_error(conn, method, url, 405, "UNSUPPORTED", "%s /specs: only GET lists the pushed specs",
                              method);
        size_t len = 0;
        char *body = specs_pushed_list(a->sp, &len);
        if (!body) return MHD_NO;
        return send_body(conn, 200, body, len, NULL, NULL);
    }
    if (strncmp(url, "/specs/", 7) != 0)
        return send_error(
            conn, method, url, 404, "UNSUPPORTED",
            "unknown endpoint %.200s (the admin API serves "
            "/specs, /specs/<id>, /cache, /cache/du, /cache/rm, /cache/gc, /cache/warm, /cache/verify and "
            "/tags/refresh)",
            url);
    const char *id = url + 7;
    if (!specs_valid_id(id))
        return send_error(conn, method, url, 400, "ID_INVALID",
                          "\"%.200s\" is not a valid spec id: 1 to %d "
                          "characters of [A-Za-z0-9._-], starting with a letter or digit",
                          id, SPECS_ID_MAX);
    if (strcmp(method, "PUT") == 0) {
        char digest[DIGEST_STRING_LEN] = "", msg[1500] = "";
        specs_push_result r = specs_push(a->sp, id, ctx->buf ? ctx->buf : "", ctx->len, digest, msg, sizeof msg);
        switch (r) {
            case SPECS_PUSH_CREATED:
            case SPECS_PUSH_REPLACED: {
                char *body = malloc(512);
                if (!body) return MHD_NO;
                int n = snprintf(body, 512, "{\"id\":\"%s\",\"digest\":\"%s\"}", id, digest);
                char loc[300];
                snprintf(loc, sizeof loc, "/specs/%s", id);
                log_info("admin PUT /specs/%s: %s", id, r == SPECS_PUSH_CREATED ? "201" : "200");
                return send_body(conn, r == SPECS_PUSH_CREATED ? 201 : 200, body, (size_t)n, "Location", loc);
            }
            case SPECS_PUSH_INVALID:
                return send_error(conn, method, url, 400, "SPEC_INVALID", "%s", msg);
            case SPECS_PUSH_TOO_MANY:
                return send_error(conn, method, url, 507, "TOO_MANY_SPECS", "%s", msg);
            case SPECS_PUSH_NO_PROVIDER:
                return send_error(conn, method, url, 404, "UNSUPPORTED", "%s", msg);
            case SPECS_PUSH_UNAVAILABLE:
                return send_error(conn, method, url, 503, "UNAVAILABLE", "%s", msg);
            case SPECS_PUSH_FAILED:
                break;
        }
        return send_error(conn, method, url, 500, "UNKNOWN", "%s", msg);
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0 && strcmp(method, "DELETE") != 0)
        return send_error(conn, method, url, 405, "UNSUPPORTED",
                          "%s is not supported on /specs/<id> (PUT, GET, "
                          "DELETE)",
                          method);
    if (ctx->len) return send_error(conn, method, url, 400, "UNSUPPORTED", "%s /specs/<id> takes no body", method);
    if (strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0) {
        size_t len = 0;
        char *text = specs_pushed_text(a->sp, id, &len);
        if (!text) return send_error(conn, method, url, 404, "SPEC_UNKNOWN", "no pushed spec \"%s\"", id);
        return send_body(conn, 200, text, len, NULL, NULL);
    }
    if (strcmp(method, "DELETE") == 0) {
        char msg[1024] = "";
        int rc = specs_pushed_delete(a->sp, id, msg, sizeof msg);
        if (rc == -2) return send_error(conn, method, url, 503, "UNAVAILABLE", "%s", msg);
        if (rc < 0) return send_error(conn, method, url, 500, "UNKNOWN", "%s", msg);
        if (rc == 0) return send_error(conn, method, url, 404, "SPEC_UNKNOWN", "no pushed spec \"%s\"", id);
        log_info("admin DELETE /specs/%s: 204", id);
        return send_empty(conn, 204);
    }
    return send_error(conn, method, url, 405, "UNSUPPORTED", "%s is not supported on /specs/<id> (PUT, GET, DELETE)",
                      method);
}

static enum MHD_Result access_handler(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                      const char *version, const char *upload_data, size_t *upload_data_size,
                                      void **con_cls) {
    (void)version;
    admin_server *a = cls;
    if (*con_cls == NULL) {
        req_ctx *ctx = calloc(1, sizeof *ctx);
        if (!ctx) return MHD_NO;
        *con_cls = ctx;
        if (strlen(url) > ADMIN_MAX_URL) {
            ctx->answered = true;
            return send_error(conn, method, "(long URL)", 414, "UNSUPPORTED", "URL longer than %d bytes",
                              ADMIN_MAX_URL);
        }
        /* Refusals go out before the body is read (the connection is then
         * closed); good requests are answered once the body is in. */
        bool refused;
        enum MHD_Result ret = early_checks(a, conn, method, url, ctx, &refused);
        if (refused) ctx->answered = true;
        return ret;
    }
    req_ctx *ctx = *con_cls;
    if (*upload_data_size != 0) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (ctx->answered) return MHD_YES;
        size_t max = specs_max_bytes(a->sp);
        if (ctx->too_big || ctx->len + n > max) {
            /* libmicrohttpd takes no answer while a body is coming in: drop
             * the rest, answer 413 at its end. */
            if (!ctx->too_big) {
                ctx->too_big = true;
                free(ctx->buf);
                ctx->buf = NULL;
                ctx->len = ctx->cap = 0;
            }
            ctx->dropped += n;
            if (ctx->dropped > ADMIN_DROP_MAX) {
                log_warn("admin %s %.200s: a body of more than %d bytes: connection closed", method, url,
                         ADMIN_DROP_MAX);
                return MHD_NO;
            }
            return MHD_YES;
        }
        if (ctx->len + n + 1 > ctx->cap) {
            size_t cap = ctx->cap ? ctx->cap * 2 : 4096;
            while (cap < ctx->len + n + 1) cap *= 2;
            char *nb = realloc(ctx->buf, cap);
            if (!nb) return MHD_NO;
            ctx->buf = nb;
            ctx->cap = cap;
        }
        memcpy(ctx->buf + ctx->len, upload_data, n);
        ctx->len += n;
        ctx->buf[ctx->len] = '\0';
        return MHD_YES;
    }
    if (ctx->answered) return MHD_YES;
    ctx->answered = true;
    if (ctx->too_big)
        return send_error(conn, method, url, 413, "TOO_LARGE", "the body is more than %zu bytes (specs.max_bytes)",
                          specs_max_bytes(a->sp));
    return route(a, conn, method, url, ctx);
}

static void request_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                              enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)conn;
    (void)toe;
    req_ctx *ctx = *con_cls;
    if (!ctx) return;
    free(ctx->buf);
    free(ctx);
    *con_cls = NULL;
}

/* ---------- lifecycle ---------- */

admin_server *admin_start(const config *c, admin_config *ac, specs *sp, store *st, const generation_env *ge, char *err,
                          size_t errlen) {
    admin_server *a = calloc(1, sizeof *a);
    if (!a) {
        admin_config_free(ac);
        snprintf(err, errlen, "admin: out of memory");
        return NULL;
    }
    a->cfg = c;
    a->ac = ac;
    a->sp = sp;
    a->st = st;
    a->genv = *ge;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)ac->listen_port)};
    inet_pton(AF_INET, ac->listen_host, &sa.sin_addr);
    guard_options go = {.header_timeout_s = c->header_timeout_s,
                        .max_connections = ADMIN_MAX_CONNECTIONS,
                        .listener = "admin",
                        .limit_name = "the admin listener's fixed limit"};
    if (!(a->listener = mhd_glue_listener_new(&go, access_handler, a, request_completed, a, err, errlen))) {
        admin_stop(a);
        return NULL;
    }
    a->daemon = MHD_start_daemon(MHD_GLUE_THREAD_PER_CONNECTION, 0, NULL, NULL, MHD_GLUE_GUARDED(a->listener),
                                 MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa, MHD_OPTION_UNESCAPE_CALLBACK,
                                 mhd_glue_keep_url, NULL, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)ADMIN_TIMEOUT_S,
                                 MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024),
                                 MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned int)1, MHD_OPTION_END);
    if (!a->daemon) {
        snprintf(err, errlen, "admin.listen %s:%d: cannot start the HTTP server (port in use?)", ac->listen_host,
                 ac->listen_port);
        admin_stop(a);
        return NULL;
    }
    log_info("admin API serving on %s:%d", ac->listen_host, ac->listen_port);
    return a;
}

void admin_stop(admin_server *a) {
    if (!a) return;
    if (a->daemon) MHD_stop_daemon(a->daemon);
    mhd_glue_listener_free(a->listener); /* after the daemon, whose callbacks use it */
    admin_config_free(a->ac);
    free(a);
}
