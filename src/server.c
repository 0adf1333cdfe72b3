#include "regfacade/server.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/blobserve.h"
#include "regfacade/client_auth.h"
#include "regfacade/cluster.h"
#include "regfacade/fetch.h"
#include "regfacade/generate.h"
#include "regfacade/guard.h"
#include "regfacade/hardening.h"
#include "regfacade/mhd_glue.h"
#include "regfacade/tls.h"
#include "regfacade/json.h"
#include "regfacade/log.h"
#include "regfacade/manifest.h"
#include "regfacade/metrics.h"
#include "regfacade/oci_error.h"
#include "regfacade/policy.h"
#include "regfacade/ref.h"
#include "regfacade/scrub.h"
#include "regfacade/specs.h"
#include "regfacade/store.h"
#include "regfacade/tag_list.h"
#include "regfacade/upstream.h"
#include "regfacade/upstream_answer.h"

#define MAX_URL_BYTES 8192 /* buffer size; the limit is limits.url_max_bytes (at most this) */
#define TAGS_MAX_BYTES (4 * 1024 * 1024)

/* One configuration generation: what a SIGHUP reload replaces. A request
 * holds the generation it started on until it is complete (its response
 * sent and its log hook run), so requests in flight finish on the old one.
 * A retired generation is freed when its last request is done: policy,
 * layer catalog, config and its references to the upstream clients (a
 * blob fetch holds its own, so a client lives until its last fetch ends,
 * and its keep-alive connections close with it; blobserve holds a
 * generation while it works on it). The first generation lives until the
 * server stops (the server's cfg, pol, ups and layers are its). */
typedef struct served {
    config *cfg;
    bool owns_cfg;  /* false for the first (the caller's) */
    upstream **ups; /* parallel to cfg->upstreams */
    policy *pol;
    layer_catalog *layers; /* the config's named layers and file layer digests */
    generate_env gen;      /* what image generation needs */
    int refs;              /* requests on it, plus one while it is current; under gen_lock */
} served;

struct server {
    const config *cfg;
    store *st;
    scrub *scrub; /* background re-hashing of the cache (cache.scrub_bytes_per_second) */
    fetcher *fetches;
    policy *pol;
    upstream **ups; /* parallel to cfg->upstreams */
    struct MHD_Daemon *daemon;
    metrics_server *metrics;     /* the metrics listener, NULL without a "metrics" section */
    layer_catalog *layers;       /* the config's named layers and file layer digests */
    generate_env gen;            /* what image generation needs */
    mhd_glue_listener *listener; /* the registry listener's guard, wired into libmicrohttpd */
    guard *guard;                /* the listener's: header deadline, idle reclaim, per-IP rate limit */
    tls_config *tls;             /* NULL: plain HTTP */
    int listen_fd;               /* bound before the privilege drop; MHD's once started */
    blobserve *blobserve;        /* the blobserve listener, NULL without a "blobserve" section */
    specs *specs;                /* image specs from outside (specs.h), NULL without "specs"/"admin" sections */
    cluster *cluster;            /* shared state on Redis (cluster.h), NULL without a "cluster" section */
    pthread_mutex_t gen_lock;
    served *current; /* the generation new requests get */
    served *first;   /* the one started with (cfg, pol, ups, layers above are its) */
};

/* Everything one request needs, on the connection thread's stack. */
typedef struct {
    server *srv;
    served *sv; /* the configuration generation of this request */
    struct MHD_Connection *conn;
    const char *method;
    bool head;
    char ns[256]; /* decoded ?ns=, "" when absent */
    char repository[REF_NAME_MAX + 1];
    char reference[REF_DIGEST_MAX + 1];
    const char *kind;
    metrics_access *acc; /* access log record and metrics of this request */
    bool cold;           /* a blob that was not cached: its bytes count as upstream */
    char client_ip[64];
    policy_request preq;       /* what resolve saw; valid after run_resolve */
    char target_upstream[128]; /* resolve's answer, for req.target in the hooks after it */
    char target_repository[REF_NAME_MAX + 1];
    client_credentials cred; /* from Authorization; secrets, wiped when the request is done, never logged */
    json_value *spec;        /* the image spec resolve got (preq.spec), freed when the request is done */
    policy_state pstate;     /* what the request's hooks share (req.ctx, authorize's credential set) */
    policy_header hdrs[32];  /* req.headers (without Authorization and Cookie) */
    bool preq_ready;         /* preq filled (fill_preq) */
} request;

/* What lives from a request's headers to its completion (con_cls). */
typedef struct {
    metrics_access *acc;
    policy_log_entry *plog; /* the policy's log hook, run once the response is done */
    struct served *sv;      /* the request's generation, held until it is complete */
} request_life;

/* ---------- responses ---------- */

static void add_common_headers(request *r, struct MHD_Response *resp) {
    MHD_add_response_header(resp, "Docker-Distribution-API-Version", "registry/2.0");
    if (r->ns[0]) MHD_add_response_header(resp, "OCI-Namespace", r->ns);
}

static enum MHD_Result queue(request *r, unsigned status, struct MHD_Response *resp) {
    if (!resp) return MHD_NO;
    if (r->acc) {
        r->acc->status = status;
        if (r->kind) r->acc->route = r->kind;
    }
    add_common_headers(r, resp);
    enum MHD_Result ret = MHD_queue_response(r->conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* The one error reply: an OCI error body, with Retry-After and
 * WWW-Authenticate when given (NULL or "": none). */
static enum MHD_Result send_error_reply(request *r, unsigned status, const char *code, const char *msg,
                                        const char *retry_after, const char *challenge) {
    size_t len = 0;
    char *body = oci_error_body(code, msg, NULL, &len);
    if (!body) return MHD_NO;
    if (status >= 500)
        log_warn("%s %s: %u %s: %s", r->method, r->repository[0] ? r->repository : "-", status, code, msg);
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", "application/json");
    if (retry_after && retry_after[0]) MHD_add_response_header(resp, "Retry-After", retry_after);
    if (challenge && challenge[0]) MHD_add_response_header(resp, "WWW-Authenticate", challenge);
    metrics_access_body(r->acc, METRICS_SRC_GENERATED, len, false);
    return queue(r, status, resp);
}

static enum MHD_Result send_error(request *r, unsigned status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static enum MHD_Result send_error(request *r, unsigned status, const char *code, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return send_error_reply(r, status, code, msg, NULL, NULL);
}

/* A policy's refusal or failure, with the headers it asked for. */
static enum MHD_Result send_policy_error(request *r, const policy_error *e) {
    return send_error_reply(r, (unsigned)e->status, e->code, e->message, e->retry_after, e->challenge);
}

static enum MHD_Result send_fetch_error(request *r, const fetch_error *e) {
    /* A rate limit or an outage always says when to come back
     * (upstream_answer.h); a policy's refusal in the rewrite hook carries
     * its own Retry-After and challenge. */
    const char *retry_after = upstream_answer_retry_after(e);
    if (!retry_after) retry_after = e->retry_after;
    bool limited = e->http_status == 429 || e->http_status == 503;
    return send_error_reply(r, (unsigned)(e->http_status ? e->http_status : 502),
                            e->code   ? e->code
                            : limited ? "TOOMANYREQUESTS"
                                      : "UNKNOWN",
                            e->message, retry_after, e->challenge);
}

/* ---------- request helpers ---------- */

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Percent-decode a query value (MHD is told not to unescape). -1 on bad
 * escapes, control characters or overflow. */
static int query_decode(const char *in, char *out, size_t outlen) {
    size_t o = 0;
    for (const char *p = in; *p; p++) {
        int c = (unsigned char)*p;
        if (c == '%') {
            int h = hexval(p[1]), l = h >= 0 ? hexval(p[2]) : -1;
            if (h < 0 || l < 0) return -1;
            c = h * 16 + l;
            p += 2;
        } else if (c == '+') {
            c = ' ';
        }
        if (c < 0x21 || c == 0x7f || o + 1 >= outlen) return -1;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    return 0;
}

static upstream *find_upstream(served *s, const char *name) {
    for (size_t i = 0; i < s->cfg->n_upstreams; i++)
        if (strcmp(s->cfg->upstreams[i].name, name) == 0) return s->ups[i];
    return NULL;
}

static upstream *upstream_by_name(void *ud, const char *name) { return find_upstream(ud, name); }

/* Free a generation: its policy, layers, config, and its references to
 * its upstream clients (fetches still running hold theirs). */
static void served_free(served *g) {
    if (!g) return;
    policy_free(g->pol);
    layer_catalog_free(g->layers);
    if (g->ups)
        for (size_t i = 0; i < g->cfg->n_upstreams; i++) upstream_free(g->ups[i]);
    free(g->ups);
    if (g->owns_cfg) config_free(g->cfg);
    free(g);
}

/* Build a generation for config c: upstream clients, policy, layers. */
static served *served_build(server *s, config *c, bool owns_cfg, char *err, size_t errlen) {
    served *g = calloc(1, sizeof *g);
    if (!g || !(g->ups = calloc(c->n_upstreams, sizeof *g->ups))) {
        free(g);
        snprintf(err, errlen, "server: out of memory");
        return NULL;
    }
    g->cfg = c;
    for (size_t i = 0; i < c->n_upstreams; i++) {
        const config_upstream *cu = &c->upstreams[i];
        /* An identity token or a helper stands for the account; a
         * username and password go as they are. */
        credentials_options co = {.kind = cu->credential_helper ? CREDENTIALS_HELPER : CREDENTIALS_IDENTITY_TOKEN,
                                  .secret = cu->identity_token,
                                  .helper = cu->credential_helper,
                                  .server_url = cu->credential_server_url,
                                  .timeout_ms = c->credential_helper_timeout_ms,
                                  .cache_seconds = cu->credential_cache_seconds};
        upstream_options uo = {
            .name = cu->name,
            .url = cu->url,
            .username = cu->username,
            .password = cu->password,
            .credentials = cu->credential_helper || cu->identity_token ? &co : NULL,
            .ca_file = cu->ca_file,
            .tls_verify = cu->tls_verify,
            .connect_timeout_ms = c->upstream_connect_timeout_ms,
            .low_speed_limit = c->upstream_low_speed_limit,
            .low_speed_time_s = c->upstream_low_speed_time_s,
            .mirrors = (const char *const *)cu->mirrors,
            .n_mirrors = cu->n_mirrors,
            .retries = c->upstream_retries,
            .retry_budget_ms = c->upstream_retry_budget_s * 1000,
        };
        g->ups[i] = upstream_new(&uo, err, errlen);
        if (!g->ups[i]) goto fail;
    }
    g->pol = policy_new(c, err, errlen);
    if (!g->pol) goto fail;
    g->layers = layer_catalog_new(c, err, errlen);
    if (!g->layers) goto fail;
    g->gen = (generate_env){.cfg = c,
                            .st = s->st,
                            .fetches = s->fetches,
                            .pol = g->pol,
                            .layers = {.cfg = c,
                                       .st = s->st,
                                       .fetches = s->fetches,
                                       .cat = g->layers,
                                       .find_upstream = upstream_by_name,
                                       .ud = g}};
    g->owns_cfg = owns_cfg;
    return g;
fail:
    g->owns_cfg = false; /* on failure the caller keeps its config */
    served_free(g);
    return NULL;
}

static served *served_acquire(server *s) {
    pthread_mutex_lock(&s->gen_lock);
    served *g = s->current;
    g->refs++;
    pthread_mutex_unlock(&s->gen_lock);
    return g;
}

static void served_release(server *s, served *g) {
    pthread_mutex_lock(&s->gen_lock);
    bool done = --g->refs == 0;
    pthread_mutex_unlock(&s->gen_lock);
    /* The last user of a retired generation frees it (not the first: other
     * listeners borrow it; server_stop frees it). */
    if (done && g != s->first) served_free(g);
}

/* blobserve's requests and pre-pulls, and the admin API's cache warm, run
 * on the current generation, as the registry's do. */
static void generation_acquire(void *ud, generation *out) {
    served *g = served_acquire(ud);
    *out = (generation){.cfg = g->cfg, .pol = g->pol, .ups = g->ups, .layers = &g->gen.layers, .handle = g};
}

static void generation_release(void *ud, generation *g) { served_release(ud, g->handle); }

/* A section that a reload cannot change (it is bound at start). */
static bool same_section(const json_value *a, const json_value *b) {
    if (!a || !b) return a == b;
    size_t la, lb;
    char *ta = json_serialize(a, &la), *tb = json_serialize(b, &lb);
    bool same = ta && tb && la == lb && memcmp(ta, tb, la) == 0;
    free(ta);
    free(tb);
    return same;
}

/* The first key of c that differs from old although it is applied only
 * at start (the listening socket and its limits, the store, the fetcher,
 * the user, the sections whose listeners start with the server), or NULL.
 * A reload that changes one is rejected, never half applied. */
static const char *start_only_change(const config *old, const config *c) {
#define CHANGED(key, same) \
    if (!(same)) return key
    CHANGED("listen", strcmp(old->listen_host, c->listen_host) == 0 && old->listen_port == c->listen_port);
    CHANGED("cache.dir", strcmp(old->cache_dir, c->cache_dir) == 0);
    CHANGED("cache.max_bytes", old->cache_max_bytes == c->cache_max_bytes);
    CHANGED("limits.max_connections", old->max_connections == c->max_connections);
    CHANGED("limits.client_timeout_seconds", old->client_timeout_s == c->client_timeout_s);
    CHANGED("limits.header_max_bytes", old->header_max_bytes == c->header_max_bytes);
    CHANGED("limits.connections_per_ip", old->connections_per_ip == c->connections_per_ip);
    CHANGED("limits.requests_per_second", old->requests_per_second == c->requests_per_second);
    CHANGED("limits.request_burst", old->request_burst == c->request_burst);
    CHANGED("limits.header_timeout_seconds", old->header_timeout_s == c->header_timeout_s);
    CHANGED("upstream_client.max_concurrent_fetches",
            old->upstream_max_concurrent_fetches == c->upstream_max_concurrent_fetches);
    CHANGED("user", (!old->user && !c->user) || (old->user && c->user && strcmp(old->user, c->user) == 0));
    CHANGED("tls", same_section(old->tls, c->tls));
    CHANGED("metrics", same_section(old->metrics, c->metrics));
    CHANGED("blobserve", same_section(old->blobserve, c->blobserve));
    CHANGED("admin", same_section(old->admin, c->admin));
    CHANGED("specs", same_section(old->specs, c->specs));
    CHANGED("cluster", same_section(old->cluster, c->cluster));
#undef CHANGED
    return NULL;
}

int server_reload(server *s, config *c, char *err, size_t errlen) {
    const char *fixed = start_only_change(s->cfg, c);
    if (fixed) {
        snprintf(err, errlen, "%s: \"%s\" cannot change on reload (it is applied at start; restart to change it)",
                 c->path, fixed);
        return -1;
    }
    served *g = served_build(s, c, true, err, errlen);
    if (!g) return -1;
    g->refs = 1;
    pthread_mutex_lock(&s->gen_lock);
    served *prev = s->current;
    s->current = g;
    pthread_mutex_unlock(&s->gen_lock);
    /* Specs are checked against the new upstreams and layers; once this
     * returns, no check uses the old config, which prev's release may free. */
    specs_set_config(s->specs, c);
    served_release(s, prev); /* drop its "current" reference */
    blobserve_reloaded(s->blobserve);
    fetcher_set_blob_max_bytes(s->fetches, c->blob_max_bytes);
    scrub_set_rate(s->scrub, c->scrub_bytes_per_second);
    return 0;
}

static enum MHD_Result collect_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    (void)kind;
    request *r = cls;
    if (!value || strcasecmp(key, "Authorization") == 0 || strcasecmp(key, "Proxy-Authorization") == 0 ||
        strcasecmp(key, "Cookie") == 0)
        return MHD_YES;
    size_t n = r->preq.n_headers;
    if (n >= sizeof r->hdrs / sizeof r->hdrs[0]) return MHD_NO;
    r->hdrs[n].name = key; /* MHD keeps it until the request ends; lowercased in the Lua table */
    r->hdrs[n].value = value;
    r->preq.n_headers = n + 1;
    return MHD_YES;
}

/* r->preq: the request as every policy hook sees it (filled once). */
static void fill_preq(request *r) {
    if (r->preq_ready) return;
    r->preq_ready = true;
    const char *host = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Host");
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    r->client_ip[0] = '\0';
    if (ci && ci->client_addr) {
        const struct sockaddr *sa = ci->client_addr;
        if (sa->sa_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, r->client_ip, sizeof r->client_ip);
        else if (sa->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, r->client_ip, sizeof r->client_ip);
    }
    r->preq = (policy_request){
        .method = r->method,
        .kind = r->kind,
        .repository = r->repository[0] ? r->repository : NULL,
        .reference = r->reference[0] ? r->reference : NULL,
        .ns = r->ns[0] ? r->ns : NULL,
        .host = host,
        .client_ip = r->client_ip,
        .user = r->cred.kind == CLIENT_AUTH_BASIC ? r->cred.user : NULL,
        .password = r->cred.kind == CLIENT_AUTH_BASIC ? r->cred.password : NULL,
        .token = r->cred.kind == CLIENT_AUTH_BEARER ? r->cred.token : NULL,
        .headers = r->hdrs,
        .state = &r->pstate,
    };
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, collect_header, r);
}

/* The authorize hook, before anything else is done for the request: a
 * refusal is answered here (with its Retry-After and WWW-Authenticate). */
static int run_authorize(request *r) {
    fill_preq(r);
    policy_error e = {0};
    if (policy_authorize(r->sv->pol, &r->preq, &e) == 0) return 0;
    send_policy_error(r, &e);
    return -1;
}

static int run_resolve(request *r, policy_resolution *res) {
    fill_preq(r);
    policy_request pr = r->preq;
    policy_error e = {0};
    if (specs_resolve(r->srv->specs, r->sv->pol, &pr, res, &r->spec, &e) != 0) {
        send_policy_error(r, &e);
        return -1;
    }
    /* Kept for the rewrite hook, which sees the same req, and where it goes. */
    r->preq = pr;
    snprintf(r->target_upstream, sizeof r->target_upstream, "%.*s", (int)strcspn(res->upstream, "@"), res->upstream);
    snprintf(r->target_repository, sizeof r->target_repository, "%s", res->repository);
    r->preq.target_upstream = r->target_upstream;
    r->preq.target_repository = r->target_repository;
    if (r->acc) snprintf(r->acc->upstream, sizeof r->acc->upstream, "%s", res->upstream);
    return 0;
}

typedef struct {
    const char *name;
    char *buf;
    size_t len, cap;
} header_join;

static enum MHD_Result join_one(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    (void)kind;
    header_join *j = cls;
    if (!value || strcasecmp(key, j->name) != 0) return MHD_YES;
    int n = snprintf(j->buf + j->len, j->cap - j->len, "%s%s", j->len ? ", " : "", value);
    if (n > 0 && (size_t)n < j->cap - j->len) j->len += (size_t)n;
    return MHD_YES;
}

/* All lines of a repeated header joined with ", " (skopeo and podman send
 * one Accept line per media type). NULL when absent. */
static const char *joined_header(request *r, const char *name, char *buf, size_t cap) {
    header_join j = {name, buf, 0, cap};
    buf[0] = '\0';
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, join_one, &j);
    return j.len ? buf : NULL;
}

/* ---------- handlers ---------- */

static enum MHD_Result handle_ping(request *r) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(2, (void *)"{}", MHD_RESPMEM_PERSISTENT);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", "application/json");
    metrics_access_body(r->acc, METRICS_SRC_GENERATED, 2, false);
    return queue(r, MHD_HTTP_OK, resp);
}

/* digest was generated under this name, for a tag, and is not cached any
 * more (evicted while the image that holds it is still served): generate
 * that tag's image again, as a GET of the tag by this client would (the
 * same bytes: generation is deterministic). True when digest is cached now. */
static bool regenerate(request *r, const char *digest) {
    char tag[REF_TAG_MAX + 1], base_digest[100] = "";
    /* Made here, or by another replica of the cluster (which also says on
     * which base: the same bytes even after the tag moved upstream). */
    if (store_made_get(r->srv->st, digest, r->repository, tag, sizeof tag) != 1 &&
        (cluster_made_get(store_cluster(r->srv->st), digest, r->repository, tag, sizeof tag, base_digest,
                          sizeof base_digest) != CLUSTER_HIT ||
         !ref_valid_tag(tag) || !ref_is_sha256_digest(base_digest)))
        return false;
    fill_preq(r);
    policy_request pr = r->preq;
    pr.kind = "manifest";
    pr.method = "GET";
    pr.reference = tag;
    policy_resolution res;
    policy_error pe;
    json_value *spec = NULL;
    if (specs_resolve(r->srv->specs, r->sv->pol, &pr, &res, &spec, &pe) != 0) {
        log_warn("generating %s again for %s:%s: resolve failed: %s", digest, r->repository, tag, pe.message);
        json_free(spec);
        return false;
    }
    upstream *u = find_upstream(r->sv, res.upstream);
    manifest_env env = {.st = r->srv->st, .cfg = r->sv->cfg};
    manifest base, built;
    fetch_error e = {0};
    const char *base_ref = base_digest[0] ? base_digest : res.reference;
    int rc = u && manifest_get(&env, u, res.repository, base_ref, &base, &e) == 0 ? 0 : -1;
    if (rc == 0) {
        if (generate_needed(&r->sv->gen, &res)) {
            rc = generate_image(&r->sv->gen, &pr, &res, u, &base, &built, &e);
            if (rc == 0) manifest_clear(&built);
        }
        manifest_clear(&base);
    }
    policy_resolution_clear(&res);
    json_free(spec);
    bool back = rc == 0 && store_blob_exists(r->srv->st, digest);
    if (rc != 0)
        log_warn("generating %s again for %s:%s failed: %s", digest, r->repository, tag, e.message);
    else if (!back)
        log_warn("generating %s again for %s:%s: the image is another one now", digest, r->repository, tag);
    else
        log_info("generated %s again for %s:%s", digest, r->repository, tag);
    return back;
}

static enum MHD_Result handle_manifest(request *r) {
    if (!ref_valid_tag(r->reference) && !ref_valid_digest(r->reference)) {
        if (strchr(r->reference, ':'))
            return send_error(r, 400, "DIGEST_INVALID", "\"%s\" is not a valid digest", r->reference);
        /* No manifest can have a name that is not a tag: unknown, as the
         * distribution spec (and its conformance suite) has it. */
        return send_error(r, 404, "MANIFEST_UNKNOWN", "\"%s\" is not a valid tag, so no manifest has it", r->reference);
    }
    if (ref_valid_digest(r->reference) && !ref_is_sha256_digest(r->reference))
        return send_error(r, 400, "DIGEST_INVALID", "only sha256 digests are supported, got \"%s\"", r->reference);
    /* A digest pins the bytes: they are served whatever the Accept header
     * says (as distribution does). Accept chooses only among what a tag names. */
    const bool by_digest = ref_is_sha256_digest(r->reference);
    char accept_buf[4096];
    const char *accept = by_digest ? NULL : joined_header(r, "Accept", accept_buf, sizeof accept_buf);
    if (manifest_accepts_only_schema1(accept))
        return send_error(r, 415, "UNSUPPORTED", "Docker schema1 manifests are not supported; accept %s or %s",
                          MT_DOCKER_MANIFEST, MT_OCI_MANIFEST);
    policy_resolution res;
    if (run_resolve(r, &res) != 0) return MHD_YES;
    upstream *u = find_upstream(r->sv, res.upstream);
    store_scope gen; /* what was generated for this name may be served under it too */
    generate_scope(&gen, u, res.repository, r->repository);
    manifest_env env = {.st = r->srv->st, .cfg = r->sv->cfg, .generated = &gen};
    manifest m;
    fetch_error e = {0};
    /* A digest names exact bytes: those, whatever reference the policy
     * answered (a policy that pins a tag must not turn a request for a
     * generated digest into its base). */
    const char *want = ref_is_sha256_digest(r->reference) ? r->reference : res.reference;
    /* A generated manifest (an index's child, say) evicted meanwhile. */
    if (ref_is_sha256_digest(r->reference) && !store_blob_exists(r->srv->st, r->reference)) regenerate(r, r->reference);
    int got = manifest_get(&env, u, res.repository, want, &m, &e);
    if (got == 0 && !ref_is_sha256_digest(r->reference) && generate_needed(&r->sv->gen, &res)) {
        /* A tag: serve the image the policy assembles on this base. (A
         * digest names exact bytes, generated or not: served as they are.) */
        manifest built;
        got = generate_image(&r->sv->gen, &r->preq, &res, u, &m, &built, &e);
        manifest_clear(&m);
        m = built;
        if (got == 0) m.source = "generated";
    }
    policy_resolution_clear(&res);
    if (got != 0) return send_fetch_error(r, &e);
    if (!manifest_accepts(accept, m.media_type)) {
        send_error(r, 404, "MANIFEST_UNKNOWN",
                   "manifest %s:%s is %s, which the request's Accept header does not include", r->repository,
                   r->reference, m.media_type);
        manifest_clear(&m);
        return MHD_YES;
    }
    struct MHD_Response *resp = MHD_create_response_from_buffer(m.len, m.data, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        manifest_clear(&m);
        return MHD_NO;
    }
    metrics_access_body(r->acc,
                        !m.source || strcmp(m.source, "generated") == 0 ? METRICS_SRC_GENERATED
                        : strcmp(m.source, "cache") == 0                ? METRICS_SRC_CACHE
                                                                        : METRICS_SRC_UPSTREAM,
                        m.len, false);
    m.data = NULL; /* owned by the response now */
    char etag[100];
    snprintf(etag, sizeof etag, "\"%s\"", m.digest);
    MHD_add_response_header(resp, "Content-Type", m.media_type);
    MHD_add_response_header(resp, "Docker-Content-Digest", m.digest);
    MHD_add_response_header(resp, "ETag", etag);
    if (m.warning[0]) MHD_add_response_header(resp, "Warning", m.warning);
    manifest_clear(&m);
    return queue(r, MHD_HTTP_OK, resp);
}

/* Range handling shared by cached and cold blobs. Returns 0 with [start,end]
 * set (is_partial tells 206), or -1 after queueing a 416. */
static int blob_range(request *r, uint64_t size, uint64_t *start, uint64_t *end, bool *is_partial) {
    const char *h = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Range");
    range_spec spec;
    *is_partial = false;
    *start = 0;
    *end = size ? size - 1 : 0;
    range_parse_result pr = range_parse(h, &spec);
    if (pr == RANGE_NONE) return 0;
    char cr[64];
    snprintf(cr, sizeof cr, "bytes */%llu", (unsigned long long)size);
    if (pr == RANGE_INVALID || !range_resolve(&spec, size, start, end)) {
        size_t len = 0;
        char msg[256];
        if (pr == RANGE_INVALID)
            snprintf(msg, sizeof msg, "Range \"%.100s\" is malformed or asks for several ranges; ask for one", h);
        else
            snprintf(msg, sizeof msg, "Range \"%.100s\" is not satisfiable for a blob of %llu bytes", h,
                     (unsigned long long)size);
        char *body = oci_error_body(pr == RANGE_INVALID ? "UNSUPPORTED" : "SIZE_INVALID", msg, NULL, &len);
        struct MHD_Response *resp = body ? MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE) : NULL;
        if (!resp) {
            free(body);
            return -1;
        }
        MHD_add_response_header(resp, "Content-Type", "application/json");
        if (size != UINT64_MAX) MHD_add_response_header(resp, "Content-Range", cr); /* unknown size: none */
        metrics_access_body(r->acc, METRICS_SRC_GENERATED, len, false);
        queue(r, 416, resp);
        return -1;
    }
    *is_partial = true;
    return 0;
}

static void blob_headers(struct MHD_Response *resp, const char *digest, uint64_t size, uint64_t start, uint64_t end,
                         bool partial) {
    MHD_add_response_header(resp, "Content-Type", "application/octet-stream");
    MHD_add_response_header(resp, "Docker-Content-Digest", digest);
    MHD_add_response_header(resp, "Accept-Ranges", "bytes");
    char etag[100];
    snprintf(etag, sizeof etag, "\"%s\"", digest);
    MHD_add_response_header(resp, "ETag", etag);
    if (partial) {
        char cr[128];
        snprintf(cr, sizeof cr, "bytes %llu-%llu/%llu", (unsigned long long)start, (unsigned long long)end,
                 (unsigned long long)size);
        MHD_add_response_header(resp, "Content-Range", cr);
    }
}

static enum MHD_Result serve_cached_blob(request *r, const char *digest, int fd, uint64_t size) {
    uint64_t start, end;
    bool partial;
    if (blob_range(r, size, &start, &end, &partial) != 0) {
        close(fd);
        return MHD_YES;
    }
    uint64_t len = size ? end - start + 1 : 0;
    /* from_fd: MHD sends it with sendfile and closes fd when done. */
    struct MHD_Response *resp = MHD_create_response_from_fd_at_offset64(len, fd, start);
    if (!resp) {
        close(fd);
        return MHD_NO;
    }
    blob_headers(resp, digest, size, start, end, partial);
    metrics_access_body(r->acc, r->cold ? METRICS_SRC_UPSTREAM : METRICS_SRC_CACHE, len, false);
    return queue(r, partial ? 206 : 200, resp);
}

typedef struct {
    fetch *x;
    uint64_t start, end; /* the bytes this response sends: [start, end) */
    metrics_access *acc; /* counts the bytes produced */
} spool_reader;

static ssize_t read_spool(void *cls, uint64_t pos, char *buf, size_t max) {
    spool_reader *sr = cls;
    ssize_t n = fetch_read(sr->x, sr->start + pos, sr->end, buf, max);
    if (n > 0) metrics_access_streamed(sr->acc, (uint64_t)n);
    if (n > 0) return n;
    return n == 0 ? MHD_CONTENT_READER_END_OF_STREAM : MHD_CONTENT_READER_END_WITH_ERROR;
}

static void free_spool_reader(void *cls) {
    spool_reader *sr = cls;
    fetch_release(sr->x);
    free(sr);
}

/* HEAD of a blob that is not cached, of size bytes: nothing is started. */
static enum MHD_Result head_reply(request *r, uint64_t size) {
    struct MHD_Response *mr = MHD_create_response_from_callback(size, 4096, read_spool, NULL, NULL);
    if (!mr) return MHD_NO;
    blob_headers(mr, r->reference, size, 0, 0, false);
    return queue(r, 200, mr);
}

/* HEAD of a blob that is not cached: ask the upstream, start nothing. */
static enum MHD_Result head_cold_blob(request *r, upstream *u, const char *repository) {
    char path[600];
    snprintf(path, sizeof path, "%s/blobs/%s", repository, r->reference);
    upstream_request req = {.method = "HEAD", .repository = repository, .path = path};
    upstream_response resp;
    char subject[700];
    snprintf(subject, sizeof subject, "blob %s of %s", r->reference, repository);
    fetch_error e = {0};
    if (upstream_ask(u, &req, &resp, UPSTREAM_WHAT_BLOB, subject, false, &e) != UPSTREAM_ANSWER_OK)
        return send_fetch_error(r, &e);
    if (resp.status != 200 || resp.content_length < 0)
        return send_error(r, 502, "UNKNOWN", "upstream %s answered %ld without a size for HEAD of blob %s",
                          upstream_name(u), resp.status, r->reference);
    return head_reply(r, (uint64_t)resp.content_length);
}

static enum MHD_Result handle_blob(request *r) {
    if (!ref_valid_digest(r->reference))
        return send_error(r, 400, "DIGEST_INVALID", "\"%s\" is not a valid digest", r->reference);
    if (!ref_is_sha256_digest(r->reference))
        return send_error(r, 400, "DIGEST_INVALID", "only sha256 digests are supported, got \"%s\"", r->reference);
    policy_resolution res;
    if (run_resolve(r, &res) != 0) return MHD_YES;
    policy_resolution_clear(&res); /* only the upstream and repository are used */
    const char *digest = r->reference;
    upstream *u = find_upstream(r->sv, res.upstream);
    const char *repository = res.repository;

    /* Served under this name only where it belongs (store.h): generated for
     * the name (a layer added from another image names its origin), or in
     * the upstream repository the name maps to, for this request's account
     * (a link, or the upstream's answer to a HEAD). */
    store_scope gen;
    generate_scope(&gen, u, res.repository, r->repository);
    char origin_up[128], origin_repo[REF_NAME_MAX + 1];
    bool known =
        store_link_get(r->srv->st, &gen, digest, origin_up, sizeof origin_up, origin_repo, sizeof origin_repo) == 1 ||
        fetch_blob_linked(r->srv->fetches, u, res.repository, digest);
    int64_t head_size = -1; /* what the upstream's HEAD said, when it was asked */
    fetch_error e = {0};
    char err[1024];
    int fd;
    uint64_t size;
    int rc = store_blob_open(r->srv->st, digest, &fd, &size, err, sizeof err);
    if (rc < 0) return send_error(r, 500, "UNKNOWN", "%s", err);
    metrics_cache_lookup("blob", rc == 1);
    if (rc == 1) {
        /* Cached, maybe for another repository or account: is it here too? */
        if (!known && fetch_blob_known(r->srv->fetches, u, res.repository, digest, &head_size, &e) != 1) {
            store_blob_close(r->srv->st, digest, fd);
            return send_fetch_error(r, &e);
        }
        return serve_cached_blob(r, digest, fd, size);
    }
    /* A config or file layer of an image generated under this name. */
    if (known && regenerate(r, digest) && store_blob_open(r->srv->st, digest, &fd, &size, err, sizeof err) == 1)
        return serve_cached_blob(r, digest, fd, size);

    /* A layer added from another image lives in that image's repository. */
    if (origin_up[0] && find_upstream(r->sv, origin_up)) {
        u = find_upstream(r->sv, origin_up);
        repository = origin_repo;
    }
    r->cold = true;
    {
        /* A malformed Range is refused before anything is fetched. */
        range_spec spec;
        if (range_parse(MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Range"), &spec) == RANGE_INVALID) {
            uint64_t st, en;
            bool partial;
            blob_range(r, UINT64_MAX, &st, &en, &partial); /* size unknown */
            return MHD_YES;
        }
    }
    if (r->head) {
        if (!known && fetch_blob_known(r->srv->fetches, u, repository, digest, &head_size, &e) != 1)
            return send_fetch_error(r, &e);
        return head_size >= 0 ? head_reply(r, (uint64_t)head_size) : head_cold_blob(r, u, repository);
    }
    /* Not cached: a GET from (u, repository) is the check itself, unless it
     * would join a fetch from elsewhere, or the blob arrived meanwhile. */
    int now_cached = 0;
    /* A plain GET by digest has no descriptor: limits.blob_max_bytes caps it. */
    fetch *x = fetch_blob(r->srv->fetches, u, repository, digest, -1, &now_cached, err, sizeof err);
    if (!known && (x ? !fetch_source_is(x, u, repository) : now_cached)) {
        fetch_release(x);
        if (fetch_blob_known(r->srv->fetches, u, repository, digest, &head_size, &e) != 1)
            return send_fetch_error(r, &e);
        now_cached = 0;
        x = fetch_blob(r->srv->fetches, u, repository, digest, -1, &now_cached, err, sizeof err);
    }
    if (!x) {
        if (!now_cached) return send_error(r, 500, "UNKNOWN", "%s", err);
        rc = store_blob_open(r->srv->st, digest, &fd, &size, err, sizeof err);
        if (rc == 1) return serve_cached_blob(r, digest, fd, size);
        return send_error(r, 500, "UNKNOWN", "blob %s vanished from the cache: %s", digest, rc < 0 ? err : "");
    }
    int64_t announced;
    if (fetch_wait_ready(x, &announced, &e) != 0) {
        fetch_release(x);
        return send_fetch_error(r, &e);
    }
    /* Small blobs, and answers without a size, are verified whole before the
     * first byte: a wrong one becomes a clean 502 instead of a cut stream. */
    if (announced < 0 || (uint64_t)announced <= r->sv->cfg->verify_before_send_bytes) {
        int done = fetch_wait_done(x, &e);
        if (done != 0) {
            fetch_release(x);
            return send_fetch_error(r, &e);
        }
        announced = -1;
        rc = store_blob_open(r->srv->st, digest, &fd, &size, err, sizeof err);
        if (rc == 1) {
            fetch_release(x);
            return serve_cached_blob(r, digest, fd, size);
        }
    }
    int64_t total = announced;
    if (total < 0) {
        /* Verified but not cached (the store failed): the spool still serves. */
        if (fetch_wait_ready(x, &total, &e) != 0 || total < 0) {
            fetch_release(x);
            return send_error(r, 502, "UNKNOWN", "blob %s: size unknown", digest);
        }
    }
    uint64_t start, end;
    bool partial;
    if (blob_range(r, (uint64_t)total, &start, &end, &partial) != 0) {
        fetch_release(x);
        return MHD_YES;
    }
    spool_reader *sr = calloc(1, sizeof *sr);
    if (!sr) {
        fetch_release(x);
        return MHD_NO;
    }
    uint64_t len = total ? end - start + 1 : 0;
    sr->x = x;
    sr->start = start;
    sr->end = start + len;
    sr->acc = r->acc;
    metrics_access_body(r->acc, METRICS_SRC_UPSTREAM, len, true);
    struct MHD_Response *resp = MHD_create_response_from_callback(len, 256 * 1024, read_spool, sr, free_spool_reader);
    if (!resp) {
        free_spool_reader(sr);
        return MHD_NO;
    }
    blob_headers(resp, digest, (uint64_t)total, start, end, partial);
    return queue(r, partial ? 206 : 200, resp);
}

/* Collects the upstream's tags/list answer. */
typedef struct {
    char *buf;
    size_t len, cap;
    bool too_big; /* over TAGS_MAX_BYTES */
} grow_buf;

/* A new answer: whatever an earlier attempt brought is dropped. */
static int tags_headers(void *ud, const upstream_response *resp) {
    (void)resp;
    ((grow_buf *)ud)->len = 0;
    return 0;
}

static int tags_body(void *ud, const char *data, size_t len) {
    grow_buf *b = ud;
    if (b->len + len > TAGS_MAX_BYTES) {
        b->too_big = true;
        return -1;
    }
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 8192;
        while (cap < b->len + len + 1) cap *= 2;
        char *n = realloc(b->buf, cap);
        if (!n) return -1;
        b->buf = n;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, data, len);
    b->len += len;
    return 0;
}

/* Upstream pages of one tag list followed at most (Link rel="next"). */
#define TAGS_MAX_PAGES 64

/* The whole tag list of res's repository: every page the upstream gives
 * (it may page by itself), merged. 0, or -1 with e set. */
static int fetch_tag_list(upstream *u, const policy_resolution *res, tag_list *tl, fetch_error *e) {
    char path[2400];
    snprintf(path, sizeof path, "%s/tags/list", res->repository);
    size_t total = 0;
    for (int page = 0; page < TAGS_MAX_PAGES; page++) {
        grow_buf b = {0};
        upstream_request req = {.method = "GET",
                                .repository = res->repository,
                                .path = path,
                                .on_headers = tags_headers,
                                .on_body = tags_body,
                                .ud = &b};
        upstream_response resp;
        char subject[700];
        snprintf(subject, sizeof subject, "repository %s", res->repository);
        upstream_answer a = upstream_ask(u, &req, &resp, UPSTREAM_WHAT_TAGS, subject, false, e);
        if (a == UPSTREAM_ANSWER_FAILED && b.too_big)
            fetch_error_set(e, 502, "UNKNOWN", "upstream %s sent a tag list of %s over %d bytes", res->upstream,
                            res->repository, TAGS_MAX_BYTES);
        if (a == UPSTREAM_ANSWER_OK && resp.status != 200)
            fetch_error_set(e, 502, "UNKNOWN", "upstream %s answered unexpected status %ld for the tags of %s",
                            res->upstream, resp.status, res->repository);
        if (a != UPSTREAM_ANSWER_OK || resp.status != 200) {
            free(b.buf);
            return -1;
        }
        total += b.len;
        char perr[256];
        int rc = tag_list_add_page(tl, b.buf, b.len, perr, sizeof perr);
        free(b.buf);
        if (rc != 0) {
            fetch_error_set(e, 502, "UNKNOWN", "upstream %s sent an invalid tag list for %s: %s", res->upstream,
                            res->repository, perr);
            return -1;
        }
        if (total > TAGS_MAX_BYTES) {
            fetch_error_set(e, 502, "UNKNOWN", "upstream %s sent tag lists of %s over %d bytes", res->upstream,
                            res->repository, TAGS_MAX_BYTES);
            return -1;
        }
        if (!tag_list_next_path(resp.link, res->repository, path, sizeof path)) return 0;
    }
    fetch_error_set(e, 502, "UNKNOWN", "upstream %s pages the tags of %s past %d pages", res->upstream, res->repository,
                    TAGS_MAX_PAGES);
    return -1;
}

/* GET /v2/NAME/tags/list[?n=N&last=TAG]: the whole list from the upstream,
 * paged here (lexical order; Link rel="next" while more follow), so n and
 * last work whether or not the upstream supports them. */
/* A page of a list (tags/list, _catalog): out (malloc'd JSON, NULL when
 * out of memory) with its Link rel="next" ("" none). */
static enum MHD_Result send_page(request *r, char *out, size_t len, const char *link) {
    if (!out) return MHD_NO;
    struct MHD_Response *mr = MHD_create_response_from_buffer(len, out, MHD_RESPMEM_MUST_FREE);
    if (!mr) {
        free(out);
        return MHD_NO;
    }
    MHD_add_response_header(mr, "Content-Type", "application/json");
    if (link[0]) MHD_add_response_header(mr, "Link", link);
    metrics_access_body(r->acc, METRICS_SRC_GENERATED, len, false);
    return queue(r, 200, mr);
}

static enum MHD_Result handle_tags(request *r) {
    const char *n = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "n");
    const char *last = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "last");
    if (n && (!*n || strspn(n, "0123456789") != strlen(n) || strlen(n) > 9))
        return send_error(r, 400, "UNSUPPORTED", "n=\"%.64s\" must be a non-negative integer", n);
    char last_dec[REF_TAG_MAX + 8] = "";
    if (last && (query_decode(last, last_dec, sizeof last_dec) != 0 || !ref_valid_tag(last_dec)))
        return send_error(r, 400, "UNSUPPORTED", "last=\"%.64s\" must be a tag", last);
    policy_resolution res;
    if (run_resolve(r, &res) != 0) return MHD_YES;
    policy_resolution_clear(&res);
    upstream *u = find_upstream(r->sv, res.upstream);
    tag_list tl = {0};
    fetch_error e = {0};
    if (fetch_tag_list(u, &res, &tl, &e) != 0) {
        tag_list_free(&tl);
        return send_fetch_error(r, &e);
    }
    tag_list_finish(&tl);
    size_t from, to;
    bool more;
    tag_list_page(&tl, last ? last_dec : NULL, n ? strtol(n, NULL, 10) : -1, &from, &to, &more);
    /* The client asked under its own name; answer under it. */
    size_t len;
    char *out = tag_list_json(&tl, r->repository, from, to, &len);
    char link[900] = "";
    /* The next page goes where this one went: ?ns= picked the upstream. */
    const char *ns = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "ns");
    bool ns_ok = ns && *ns && strlen(ns) < 256 &&
                 strspn(ns, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]") == strlen(ns);
    if (more && to > from)
        snprintf(link, sizeof link, "</v2/%s/tags/list?n=%s&last=%s%s%s>; rel=\"next\"", r->repository, n,
                 tl.tags[to - 1], ns_ok ? "&ns=" : "", ns_ok ? ns : "");
    tag_list_free(&tl);
    return send_page(r, out, len, link);
}

/* ---------- catalog ---------- */

#define CATALOG_MAX_RECORDS 100000 /* tag records read for one answer */
#define CATALOG_DEFAULT_N 100
#define CATALOG_MAX_N 1000
#define CATALOG_MAX_CHECKS 2000 /* authorize runs for one page */

typedef struct {
    tag_list names;
    const char *default_upstream;
} catalog_ctx;

/* A record's name as a client reaches it: the repository, under the
 * default upstream; else prefixed with its upstream (the default mapping's
 * /v2/<upstream>/<repository>; a credential set's "@SET" is not part of it). */
static int catalog_collect(void *ud, const char *upstream, const char *repository, const char *tag,
                           const store_tag *t) {
    (void)tag;
    (void)t;
    catalog_ctx *c = ud;
    if (c->names.n >= CATALOG_MAX_RECORDS) return 1;
    size_t ulen = strcspn(upstream, "@");
    char name[REF_NAME_MAX + 1];
    if (c->default_upstream && strlen(c->default_upstream) == ulen && strncmp(upstream, c->default_upstream, ulen) == 0)
        snprintf(name, sizeof name, "%s", repository);
    else if (snprintf(name, sizeof name, "%.*s/%s", (int)ulen, upstream, repository) >= (int)sizeof name ||
             !ref_valid_name(name))
        return 0;
    return tag_list_add(&c->names, name) != 0 ? 2 : 0;
}

/* The repositories the cache holds tag resolutions of (catalog_collect), those the policy's
 * authorize lets this client see (kind "catalog", one run per name), in
 * lexical order, paged with n and last like tags/list. A page stops after
 * CATALOG_MAX_CHECKS names were asked about; its Link goes on from there. */
static enum MHD_Result handle_catalog(request *r) {
    const char *n = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "n");
    const char *last = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "last");
    if (n && (!*n || strspn(n, "0123456789") != strlen(n) || strlen(n) > 9))
        return send_error(r, 400, "UNSUPPORTED", "n=\"%.64s\" must be a non-negative integer", n);
    char last_dec[REF_NAME_MAX + 8] = "";
    if (last && (query_decode(last, last_dec, sizeof last_dec) != 0 || !ref_valid_name(last_dec)))
        return send_error(r, 400, "UNSUPPORTED", "last=\"%.64s\" must be a repository name", last);
    long want = n ? strtol(n, NULL, 10) : CATALOG_DEFAULT_N;
    if (want > CATALOG_MAX_N) want = CATALOG_MAX_N;
    if (run_authorize(r) != 0) return MHD_YES; /* may this client list at all */
    catalog_ctx cc = {.default_upstream = r->sv->cfg->default_upstream};
    if (store_tag_each(r->srv->st, catalog_collect, &cc) == 2) {
        tag_list_free(&cc.names);
        return send_error(r, 500, "UNKNOWN", "out of memory listing the cached repositories");
    }
    tag_list all = cc.names;
    tag_list_finish(&all);
    size_t from, to;
    bool more;
    tag_list_page(&all, last ? last_dec : NULL, -1, &from, &to, &more);
    tag_list page = {0};
    size_t checks = 0, i = from;
    bool oom = false;
    for (; i < to && (long)page.n < want && checks < CATALOG_MAX_CHECKS; i++, checks++) {
        snprintf(r->repository, sizeof r->repository, "%s", all.tags[i]);
        r->preq.repository = r->repository;
        policy_error e = {0};
        if (policy_authorize(r->sv->pol, &r->preq, &e) != 0) continue; /* not this client's to see */
        if (tag_list_add(&page, all.tags[i]) != 0) {
            oom = true;
            break;
        }
    }
    r->repository[0] = '\0';
    more = i < to;
    char link[REF_NAME_MAX + 100] = "";
    if (more && i > from)
        snprintf(link, sizeof link, "</v2/_catalog?n=%ld&last=%s>; rel=\"next\"", want, all.tags[i - 1]);
    tag_list_free(&all);
    size_t len = 0;
    char *out = oom ? NULL : tag_list_json_as(&page, NULL, "repositories", 0, page.n, &len);
    tag_list_free(&page);
    if (!out) return send_error(r, 500, "UNKNOWN", "out of memory listing the cached repositories");
    return send_page(r, out, len, link);
}

/* ---------- referrers (OCI 1.1) ---------- */

/* The entries of index whose artifactType is artifact_type, as a new
 * manifests array (NULL on allocation failure). */
static json_value *referrers_filtered(const json_value *manifests, const char *artifact_type) {
    json_value *out = json_new_array();
    for (size_t i = 0; out && i < manifests->count; i++) {
        const char *at = json_object_get_string(manifests->items[i], "artifactType");
        if (at && strcmp(at, artifact_type) == 0 && json_array_append(out, json_clone(manifests->items[i])) != 0) {
            json_free(out);
            out = NULL;
        }
    }
    return out;
}

/* An index body as the referrers answer: every entry a descriptor; with
 * artifact_type, only its entries (unless the upstream filtered already).
 * NULL with why when the upstream's body is no index. */
static char *referrers_body(const char *body, size_t len, const json_value *attached, const char *artifact_type,
                            bool upstream_filtered, bool *filtered, size_t *out_len, char *why, size_t whylen) {
    char jerr[256];
    json_value *v = len ? json_parse(body, len, 16, jerr, sizeof jerr) : json_new_object();
    if (!v) {
        snprintf(why, whylen, "not JSON: %s", jerr);
        return NULL;
    }
    json_value *m = json_object_get(v, "manifests");
    if (v->type != JSON_OBJECT || (m && m->type != JSON_ARRAY)) {
        snprintf(why, whylen, "not an image index");
        json_free(v);
        return NULL;
    }
    for (size_t i = 0; m && i < m->count; i++) {
        const json_value *d = m->items[i];
        const char *dg = json_object_get_string(d, "digest");
        if (d->type != JSON_OBJECT || !dg || !ref_valid_digest(dg) || !json_object_get_string(d, "mediaType")) {
            snprintf(why, whylen, "manifests[%zu] is not a descriptor (mediaType, digest)", i);
            json_free(v);
            return NULL;
        }
    }
    *filtered = false;
    json_value *list = NULL;
    if (artifact_type && !upstream_filtered && m) {
        list = referrers_filtered(m, artifact_type);
        *filtered = true;
    } else {
        list = m ? json_clone(m) : json_new_array();
    }
    /* What the policy attaches (resolve's `referrers`), filtered like the rest. */
    if (list && attached && attached->count) {
        json_value *extra = artifact_type ? referrers_filtered(attached, artifact_type) : json_clone(attached);
        for (size_t i = 0; extra && list && i < extra->count; i++)
            if (json_array_append(list, json_clone(extra->items[i])) != 0) {
                json_free(list);
                list = NULL;
            }
        if (!extra) {
            json_free(list);
            list = NULL;
        }
        json_free(extra);
        if (artifact_type) *filtered = true;
    }
    /* The answer is always a whole, current index, whatever the upstream
     * left out of it. */
    if (!list || json_object_set(v, "schemaVersion", json_new_int64(2)) != 0 ||
        json_object_set(v, "mediaType", json_new_string(MT_OCI_INDEX)) != 0 ||
        json_object_set(v, "manifests", list) != 0) {
        json_free(v);
        snprintf(why, whylen, "out of memory");
        return NULL;
    }
    char *out = json_serialize(v, out_len);
    json_free(v);
    if (!out) snprintf(why, whylen, "out of memory");
    return out;
}

/* GET /v2/NAME/referrers/DIGEST[?artifactType=T]: the upstream's referrers
 * API where it has one; where it has none (404 for the endpoint), the
 * referrers tag schema (the index tagged sha256-HEX that clients push for
 * such registries); neither: an empty index. Always asked of the upstream
 * repository this request maps to, with its credentials, never cached. */
static enum MHD_Result handle_referrers(request *r) {
    if (!ref_is_sha256_digest(r->reference))
        return send_error(r, 400, "DIGEST_INVALID", "\"%s\" is not a sha256 digest", r->reference);
    const char *at = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "artifactType");
    char at_dec[256] = "";
    if (at &&
        (query_decode(at, at_dec, sizeof at_dec) != 0 || !*at_dec || !strchr(at_dec, '/') ||
         strspn(at_dec, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$&-^_.+/") != strlen(at_dec)))
        return send_error(r, 400, "UNSUPPORTED", "artifactType=\"%.100s\" is not a media type", at);
    policy_resolution res;
    if (run_resolve(r, &res) != 0) return MHD_YES;
    json_value *attached = res.referrers; /* kept past the clear: the policy's own references */
    res.referrers = NULL;
    policy_resolution_clear(&res);
    upstream *u = find_upstream(r->sv, res.upstream);
    char path[900], subject[700];
    snprintf(subject, sizeof subject, "referrers of %s in %s", r->reference, res.repository);
    /* 1. The referrers API (the filter passed on: the upstream may apply it). */
    int pl = snprintf(path, sizeof path, "%s/referrers/%s", res.repository, r->reference);
    if (at) snprintf(path + pl, sizeof path - (size_t)pl, "?artifactType=%s", at);
    grow_buf b = {0};
    upstream_request req = {.method = "GET",
                            .repository = res.repository,
                            .path = path,
                            .accept = MT_OCI_INDEX,
                            .on_headers = tags_headers,
                            .on_body = tags_body,
                            .ud = &b};
    upstream_response resp;
    fetch_error e = {0};
    upstream_answer a = upstream_ask(u, &req, &resp, UPSTREAM_WHAT_MANIFEST, subject, false, &e);
    bool upstream_filtered = at && strstr(resp.filters_applied, "artifactType") != NULL;
    if (a == UPSTREAM_ANSWER_STATUS && resp.status == 404) {
        /* 2. No referrers API: the tag schema. */
        free(b.buf);
        b = (grow_buf){0};
        const char *hex = r->reference + strlen("sha256:");
        snprintf(path, sizeof path, "%s/manifests/sha256-%s", res.repository, hex);
        snprintf(subject, sizeof subject, "referrers tag sha256-%.12s... of %s", hex, res.repository);
        memset(&e, 0, sizeof e);
        upstream_filtered = false;
        a = upstream_ask(u, &req, &resp, UPSTREAM_WHAT_MANIFEST, subject, false, &e);
        if (a == UPSTREAM_ANSWER_STATUS && resp.status == 404) {
            /* 3. Nothing refers to it. */
            free(b.buf);
            b = (grow_buf){0};
            a = UPSTREAM_ANSWER_OK;
            resp.status = 200;
        }
    }
    if (a == UPSTREAM_ANSWER_FAILED && b.too_big)
        fetch_error_set(&e, 502, "UNKNOWN", "upstream %s sent %s over %d bytes", res.upstream, subject, TAGS_MAX_BYTES);
    if (a != UPSTREAM_ANSWER_OK) {
        free(b.buf);
        json_free(attached);
        return send_fetch_error(r, &e);
    }
    char why[256];
    bool filtered = false;
    size_t len = 0;
    char *out =
        referrers_body(b.buf, b.len, attached, at ? at_dec : NULL, upstream_filtered, &filtered, &len, why, sizeof why);
    free(b.buf);
    json_free(attached);
    if (!out)
        return send_error(r, 502, "UNKNOWN", "upstream %s sent an unusable answer for the %s: %s", res.upstream,
                          subject, why);
    struct MHD_Response *mr = MHD_create_response_from_buffer(len, out, MHD_RESPMEM_MUST_FREE);
    if (!mr) {
        free(out);
        return MHD_NO;
    }
    MHD_add_response_header(mr, "Content-Type", MT_OCI_INDEX);
    if (filtered || upstream_filtered) MHD_add_response_header(mr, "OCI-Filters-Applied", "artifactType");
    metrics_access_body(r->acc, METRICS_SRC_UPSTREAM, len, false);
    return queue(r, 200, mr);
}

/* Ready: the cache takes a new file, the policy is loaded, and the
 * listener has room for another client. Never asks an upstream. */
static int server_ready(void *ud, char *why, size_t whylen) {
    server *s = ud;
    pthread_mutex_lock(&s->gen_lock);
    bool loaded = s->current && s->current->pol; /* the generation new requests get */
    pthread_mutex_unlock(&s->gen_lock);
    if (!loaded) {
        snprintf(why, whylen, "no policy loaded");
        return -1;
    }
    /* Idle connections make room (guard.h); only busy ones fill it. */
    guard_load load = guard_get_load(s->guard);
    if (load.open >= s->cfg->max_connections && load.idle == 0) {
        snprintf(why, whylen,
                 "listener saturated: %zu connections open, all busy with requests (limits.max_connections %u); "
                 "new clients wait",
                 load.open, s->cfg->max_connections);
        return -1;
    }
    if (metrics_cache_writable(store_dir(s->st), why, whylen) != 0) return -1;
    /* Degraded is not unready: a replica without Redis serves alone. */
    cluster_degraded_detail(s->cluster, why, whylen);
    return 0;
}

/* /healthz and /readyz, also served on the metrics listener. */
static enum MHD_Result handle_health(request *r, const char *url) {
    r->kind = "health";
    char body[768];
    unsigned status = metrics_health_answer(url, server_ready, r->srv, body, sizeof body);
    size_t len = strlen(body);
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_COPY);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", "application/json");
    MHD_add_response_header(resp, "Cache-Control", "no-store");
    metrics_access_body(r->acc, METRICS_SRC_GENERATED, len, false);
    return queue(r, status, resp);
}

/* ---------- routing ---------- */

static bool has_suffix(const char *s, size_t n, const char *suf) {
    size_t m = strlen(suf);
    return n >= m && memcmp(s + n - m, suf, m) == 0;
}

/* Find the last "/<word>/" in path; returns its offset or -1. */
static long last_segment(const char *path, const char *word) {
    char pat[32];
    snprintf(pat, sizeof pat, "/%s/", word);
    long found = -1;
    for (const char *p = path; (p = strstr(p, pat)) != NULL; p++) found = p - path;
    return found;
}

static bool method_allowed(request *r) { return strcmp(r->method, "GET") == 0 || strcmp(r->method, "HEAD") == 0; }

static enum MHD_Result route(request *r, const char *url) {
    char path[MAX_URL_BYTES];
    size_t ulen = strlen(url);
    if (ulen >= sizeof path || ulen > r->sv->cfg->url_max_bytes)
        return send_error(r, 414, "NAME_INVALID", "URL longer than %u bytes (limits.url_max_bytes)",
                          r->sv->cfg->url_max_bytes);

    /* /<upstream>/v2/... is the same as /v2/<upstream>/... (mirror URLs with a path). */
    if (url[0] == '/' && strncmp(url, "/v2", 3) != 0) {
        const char *slash = strchr(url + 1, '/');
        size_t n = slash ? (size_t)(slash - url - 1) : 0;
        char name[128];
        if (slash && n < sizeof name && strncmp(slash, "/v2", 3) == 0 && (slash[3] == '/' || slash[3] == '\0')) {
            memcpy(name, url + 1, n);
            name[n] = '\0';
            if (config_find_upstream(r->sv->cfg, name)) {
                const char *rest = slash + 3; /* "" or "/..." */
                if (!*rest || strcmp(rest, "/") == 0)
                    snprintf(path, sizeof path, "/v2/");
                else
                    snprintf(path, sizeof path, "/v2/%s%s", name, rest);
                url = path;
                ulen = strlen(url);
            }
        }
    }

    if (strcmp(url, "/healthz") == 0 || strcmp(url, "/readyz") == 0) return handle_health(r, url);
    if (strcmp(url, "/v2/") == 0 || strcmp(url, "/v2") == 0) {
        r->kind = "ping";
        if (!method_allowed(r))
            return send_error(r, 405, "UNSUPPORTED", "%s is not supported on /v2/ (read-only registry)", r->method);
        if (run_authorize(r) != 0) return MHD_YES;
        return handle_ping(r);
    }
    if (strncmp(url, "/v2/", 4) != 0)
        return send_error(r, 404, "UNSUPPORTED", "not an OCI distribution endpoint: only /v2/ is served");
    if (strcmp(url, "/v2/_catalog") == 0) {
        r->kind = "catalog";
        if (!method_allowed(r))
            return send_error(r, 405, "UNSUPPORTED", "%s is not supported on /v2/_catalog (read-only registry)",
                              r->method);
        return handle_catalog(r);
    }
    if (strchr(url, '%'))
        return send_error(r, 400, "NAME_INVALID", "percent-encoded characters are not allowed in the path");
    /* Dot segments and empty segments never name anything: refuse them
     * whole, whichever part of the path they are in. */
    if (strstr(url, "/../") || strstr(url, "/./") || strstr(url, "//") || has_suffix(url, strlen(url), "/..") ||
        has_suffix(url, strlen(url), "/."))
        return send_error(r, 400, "NAME_INVALID",
                          "\".\" and \"..\" segments and empty segments are not allowed in the path");

    const char *rest = url + 4;
    size_t rlen = ulen - 4;
    char name[MAX_URL_BYTES];
    const char *endpoint = NULL;
    long at;
    if (has_suffix(rest, rlen, "/tags/list")) {
        r->kind = "tags";
        endpoint = "tags";
        snprintf(name, sizeof name, "%.*s", (int)(rlen - 10), rest);
    } else if ((at = last_segment(rest, "manifests")) >= 0) {
        r->kind = "manifest";
        endpoint = "manifests";
        snprintf(name, sizeof name, "%.*s", (int)at, rest);
        const char *ref = rest + at + strlen("/manifests/");
        if (strlen(ref) > REF_DIGEST_MAX || !*ref || strchr(ref, '/'))
            return send_error(r, 400, strchr(ref, ':') ? "DIGEST_INVALID" : "MANIFEST_INVALID",
                              "invalid manifest reference in the path");
        snprintf(r->reference, sizeof r->reference, "%s", ref);
    } else if ((at = last_segment(rest, "blobs")) >= 0) {
        r->kind = "blob";
        endpoint = "blobs";
        snprintf(name, sizeof name, "%.*s", (int)at, rest);
        const char *dg = rest + at + strlen("/blobs/");
        if (strncmp(dg, "uploads", 7) == 0 && (dg[7] == '/' || dg[7] == '\0'))
            return send_error(r, 405, "UNSUPPORTED", "pushing is not supported: regfacade is a read-only facade");
        if (strlen(dg) > REF_DIGEST_MAX || !*dg || strchr(dg, '/'))
            return send_error(r, 400, "DIGEST_INVALID", "invalid digest in the path");
        snprintf(r->reference, sizeof r->reference, "%s", dg);
    } else if ((at = last_segment(rest, "referrers")) >= 0) {
        r->kind = "referrers";
        endpoint = "referrers";
        snprintf(name, sizeof name, "%.*s", (int)at, rest);
        const char *dg = rest + at + strlen("/referrers/");
        if (strlen(dg) > REF_DIGEST_MAX || !*dg || strchr(dg, '/') || !ref_valid_digest(dg))
            return send_error(r, 400, "DIGEST_INVALID", "invalid digest in the path");
        snprintf(r->reference, sizeof r->reference, "%s", dg);
    } else {
        return send_error(r, 404, "UNSUPPORTED",
                          "unknown endpoint %.200s (only manifests, blobs, tags/list and referrers)", url);
    }
    if (!ref_valid_name(name)) return send_error(r, 400, "NAME_INVALID", "invalid repository name \"%.300s\"", name);
    snprintf(r->repository, sizeof r->repository, "%s", name);
    if (!method_allowed(r) || (strcmp(endpoint, "tags") == 0 && r->head && 0))
        return send_error(r, 405, "UNSUPPORTED", "%s is not supported on %s (read-only registry)", r->method, endpoint);
    if (run_authorize(r) != 0) return MHD_YES; /* before resolve: who may pull at all */
    if (strcmp(endpoint, "manifests") == 0) return handle_manifest(r);
    if (strcmp(endpoint, "blobs") == 0) return handle_blob(r);
    if (strcmp(endpoint, "referrers") == 0) return handle_referrers(r);
    return handle_tags(r);
}

/* ---------- client protections (guard.h) ---------- */

static enum MHD_Result send_rate_limited(request *r, unsigned retry_after) {
    char msg[160], ra[16];
    /* r->sv is not acquired yet here: the guard runs on the startup config
     * (listener limits change with a restart, not a reload). */
    snprintf(msg, sizeof msg, "too many requests from this client (limits.requests_per_second is %u); retry in %u s",
             r->srv->cfg->requests_per_second, retry_after);
    snprintf(ra, sizeof ra, "%u", retry_after);
    size_t len = 0;
    char *body = oci_error_body("TOOMANYREQUESTS", msg, NULL, &len);
    struct MHD_Response *resp = body ? MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE) : NULL;
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", "application/json");
    MHD_add_response_header(resp, "Retry-After", ra);
    metrics_access_body(r->acc, METRICS_SRC_GENERATED, len, false);
    return queue(r, 429, resp);
}

static enum MHD_Result access_handler(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                      const char *version, const char *upload_data, size_t *upload_data_size,
                                      void **con_cls) {
    (void)version;
    (void)upload_data;
    /* The first call brings the headers; answering there would make MHD
     * close the connection, so the answer comes on the next call. Request
     * bodies are never used: they are consumed and dropped. */
    if (*con_cls == NULL) {
        /* The request's access record; request_completed logs and frees it. */
        request_life *life = calloc(1, sizeof *life);
        if (!life) return MHD_NO;
        if (!(life->acc = metrics_access_begin(conn, method, url))) {
            free(life);
            return MHD_NO;
        }
        *con_cls = life;
        return MHD_YES;
    }
    if (*upload_data_size != 0) {
        *upload_data_size = 0;
        return MHD_YES;
    }
    /* The whole request is in (headers and any body, which a read-only
     * registry never needs); mhd_glue_access told the guard. */
    request_life *life = *con_cls;
    request r = {.srv = cls, .conn = conn, .method = method, .head = strcmp(method, "HEAD") == 0, .acc = life->acc};
    const union MHD_ConnectionInfo *peer = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    unsigned retry_after = 0;
    /* Health probes are never rate-limited (a 429 would get the pod restarted). */
    bool probe = strcmp(url, "/healthz") == 0 || strcmp(url, "/readyz") == 0;
    if (!probe && !guard_rate_allow(r.srv->guard, peer ? peer->client_addr : NULL, &retry_after))
        return send_rate_limited(&r, retry_after);
    const char *ns = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "ns");
    if (ns && query_decode(ns, r.ns, sizeof r.ns) != 0) {
        r.ns[0] = '\0';
        return send_error(&r, 400, "UNSUPPORTED", "the ns query parameter is not a host name");
    }
    client_auth_parse(MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION), &r.cred);
    /* Held until request_completed: the log hook runs on this generation's
     * policy after the response is sent. */
    if (!life->sv) life->sv = served_acquire(r.srv);
    r.sv = life->sv;
    enum MHD_Result ret = route(&r, url);
    /* The log hook runs when the response is done (request_completed);
     * what it sees is copied now (no password or token). */
    fill_preq(&r);
    life->plog = policy_log_begin(r.sv->pol, &r.preq, &life->acc->start);
    policy_state_clear(&r.pstate);
    client_credentials_wipe(&r.cred);
    json_free(r.spec); /* after the rewrite hook, which saw it as req.spec */
    return ret;
}

/* MHD's end of a request (sent, failed or cut): count it, log it. */
static void request_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                              enum MHD_RequestTerminationCode toe) {
    request_life *life = *con_cls;
    if (life) {
        bool ok = toe == MHD_REQUEST_TERMINATED_COMPLETED_OK;
        if (life->plog) {
            const metrics_access *a = life->acc;
            uint64_t bytes = a->streaming ? a->streamed : ok ? a->body_len : 0;
            policy_log_end(life->plog, a->status, bytes, ok, a->upstream);
        }
        metrics_access_end(life->acc, ok);
        if (life->sv) served_release(cls, life->sv);
        free(life);
    }
    *con_cls = NULL;
}

/* Descriptors the configured limits can take at once: a socket per
 * connection plus the cached blob it may be sending (registry; blobserve
 * too when configured), the admin and metrics listeners' connections, per
 * transfer a socket, a spool and the verified file, the upstreams' idle
 * keep-alive connections, and a fixed reserve (store, logs, listening
 * sockets, libmicrohttpd's wake-up pipes). Said at start when the
 * open-files limit is lower: connections past it would be refused. */
static void fd_budget_check(const config *c, uint64_t nofile) {
    uint64_t need = 2 * (uint64_t)c->max_connections + (c->blobserve ? 2 * (uint64_t)c->max_connections : 0) + 64 + 64 +
                    3 * (uint64_t)c->upstream_max_concurrent_fetches + 16 * (uint64_t)c->n_upstreams + 128;
    if (nofile && nofile < need)
        log_warn("the open-files limit %llu is below the %llu descriptors limits.max_connections %u (and the other "
                 "limits) can take: connections past it will be refused; raise the hard limit (ulimit -n, "
                 "LimitNOFILE=) or lower limits.max_connections",
                 (unsigned long long)nofile, (unsigned long long)need, c->max_connections);
}

/* Before anything else is opened: TLS material (already read at config
 * load), the listening socket, then the switch to the configured user, so
 * the store, the upstream clients and the policy run unprivileged. */
static int server_harden(server *s, const config *c, char *err, size_t errlen) {
    if (tls_config_load(c, &s->tls, err, errlen) != 0) return -1;
    if (s->tls && s->tls->expired)
        log_warn("tls: the certificate %s expired on %s", s->tls->subject, s->tls->not_after);
    fd_budget_check(c, hardening_raise_nofile());
    if (hardening_listen(c->listen_host, c->listen_port, 1024, &s->listen_fd, err, errlen) != 0) return -1;
    if (c->user) {
        uid_t uid;
        gid_t gid;
        if (hardening_user_lookup(c->user, &uid, &gid, err, errlen) != 0) return -1;
        if (geteuid() == 0 && hardening_prepare_dir(c->cache_dir, uid, gid, err, errlen) != 0) return -1;
        if (hardening_drop_privileges(c->user, uid, gid, err, errlen) != 0) return -1;
        log_info("running as user %s (uid %u, gid %u)", c->user, (unsigned)uid, (unsigned)gid);
    }
    guard_options go = {.header_timeout_s = c->header_timeout_s,
                        .requests_per_second = c->requests_per_second,
                        .burst = c->request_burst,
                        .max_connections = c->max_connections,
                        .listener = "registry",
                        .limit_name = "limits.max_connections"};
    s->listener = mhd_glue_listener_new(&go, access_handler, s, request_completed, s, err, errlen);
    s->guard = mhd_glue_listener_guard(s->listener);
    return s->listener ? 0 : -1;
}

int server_check(const config *c, char *err, size_t errlen) {
    metrics_config mc;
    char merr[512];
    if (metrics_config_parse(c->metrics, &mc, merr, sizeof merr) != 0) {
        snprintf(err, errlen, "%s: %s", c->path, merr);
        return -1;
    }
    tls_config *tls = NULL;
    if (tls_config_load(c, &tls, err, errlen) != 0) return -1;
    tls_config_free(tls);
    uid_t uid;
    gid_t gid;
    if (c->user && hardening_user_lookup(c->user, &uid, &gid, err, errlen) != 0) return -1;
    blobserve_config *bc = NULL;
    if (blobserve_config_parse(c, &bc, err, errlen) != 0) return -1;
    /* Two listeners on one address: the second bind would fail at start. */
    bool clash = mc.enabled && mc.listen_port == c->listen_port &&
                 (strcmp(mc.listen_host, c->listen_host) == 0 || strcmp(mc.listen_host, "0.0.0.0") == 0 ||
                  strcmp(c->listen_host, "0.0.0.0") == 0);
    bool clash_bs = mc.enabled && bc && mc.listen_port == bc->listen_port &&
                    (strcmp(mc.listen_host, bc->listen_host) == 0 || strcmp(mc.listen_host, "0.0.0.0") == 0 ||
                     strcmp(bc->listen_host, "0.0.0.0") == 0);
    if (clash || clash_bs) {
        snprintf(err, errlen,
                 "%s: metrics.listen %s:%d: the %s listens there already; each listener needs an address "
                 "of its own",
                 c->path, mc.listen_host, mc.listen_port, clash ? "registry (listen)" : "blobserve");
        blobserve_config_free(bc);
        return -1;
    }
    blobserve_config_free(bc);
    if (specs_check_config(c, err, errlen) != 0) return -1;
    if (cluster_check_config(c, err, errlen) != 0) return -1;
    /* A generation as a reload would build it: upstream clients, policy,
     * named layers. Nothing in it touches the store. */
    server probe = {.cfg = c};
    served *g = served_build(&probe, (config *)c, false, err, errlen);
    if (!g) return -1;
    served_free(g);
    /* Last, the cache folder: could serve open it? (Made and removed again
     * when missing, so a refused config leaves nothing behind.) */
    char serr[1200];
    if (store_dir_check(c->cache_dir, serr, sizeof serr) != 0) {
        snprintf(err, errlen, "%s", serr);
        return -1;
    }
    return 0;
}

server *server_start(const config *c, char *err, size_t errlen) {
    /* What check validates, first: serve refuses what check refuses, with
     * the same message, before anything is bound or opened. */
    if (server_check(c, err, errlen) != 0) return NULL;
    server *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "server: out of memory");
        return NULL;
    }
    s->cfg = c;
    s->listen_fd = -1;
    /* Spec providers first: the admin token is read before privileges drop. */
    if (specs_new(c, &s->specs, err, errlen) != 0) goto fail;
    if (server_harden(s, c, err, errlen) != 0) goto fail;
    metrics_config mc;
    char merr[512];
    if (metrics_config_parse(c->metrics, &mc, merr, sizeof merr) != 0) {
        snprintf(err, errlen, "%s: %s", c->path, merr);
        goto fail;
    }
    metrics_set_access_log(mc.access_log);
    s->st = store_open(c->cache_dir, c->cache_max_bytes, err, errlen);
    if (!s->st) goto fail;
    /* Redis down at start is degraded, not a failure: the keeper rejoins. */
    if (cluster_start(c, &s->cluster, err, errlen) != 0) goto fail;
    store_set_cluster(s->st, s->cluster);
    if (!(s->scrub = scrub_start(s->st, c->scrub_bytes_per_second, err, errlen))) goto fail;
    metrics_cache_scan(c->cache_dir);
    fetch_options fo = {.max_concurrent = c->upstream_max_concurrent_fetches, .blob_max_bytes = c->blob_max_bytes};
    s->fetches = fetcher_new(s->st, &fo);
    metrics_watch_fetcher(s->fetches);
    if (!s->fetches) {
        snprintf(err, errlen, "server: out of memory");
        goto fail;
    }
    pthread_mutex_init(&s->gen_lock, NULL);
    s->first = served_build(s, (config *)c, false, err, errlen);
    if (!s->first) goto fail;
    s->current = s->first;
    s->first->refs = 1; /* the current generation's own reference */
    s->ups = s->first->ups;
    s->pol = s->first->pol;
    s->layers = s->first->layers;
    s->gen = s->first->gen;
    /* Pushed specs loaded and the admin API up before the registry serves. */
    generation_env ge = {.cfg = c,
                         .st = s->st,
                         .fetches = s->fetches,
                         .acquire = generation_acquire,
                         .release = generation_release,
                         .ud = s};
    if (specs_start(s->specs, s->st, &ge, err, errlen) != 0) goto fail;

    /* TLS and the per-IP connection limit go in as an option array (they
     * are optional). */
    struct MHD_OptionItem extra[8];
    size_t ne = 0;
    if (s->tls) {
        extra[ne++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, s->tls->cert_pem};
        extra[ne++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, s->tls->key_pem};
        extra[ne++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)s->tls->priorities};
        if (s->tls->key_password)
            extra[ne++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_KEY_PASSWORD, 0, s->tls->key_password};
    }
    if (c->connections_per_ip)
        extra[ne++] =
            (struct MHD_OptionItem){MHD_OPTION_PER_IP_CONNECTION_LIMIT, (intptr_t)c->connections_per_ip, NULL};
    extra[ne] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    s->daemon = MHD_start_daemon(MHD_GLUE_THREAD_PER_CONNECTION | MHD_USE_ITC | (s->tls ? MHD_USE_TLS : 0), 0, NULL,
                                 NULL, MHD_GLUE_GUARDED(s->listener), MHD_OPTION_LISTEN_SOCKET, s->listen_fd,
                                 MHD_OPTION_UNESCAPE_CALLBACK, mhd_glue_keep_url, NULL, MHD_OPTION_CONNECTION_TIMEOUT,
                                 (unsigned int)c->client_timeout_s, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
                                 (size_t)c->header_max_bytes, MHD_OPTION_THREAD_STACK_SIZE, (size_t)(512 * 1024),
                                 MHD_OPTION_ARRAY, extra, MHD_OPTION_END);
    if (!s->daemon) {
        snprintf(err, errlen, "listen %s:%d: cannot start the HTTP%s server (see the libmicrohttpd message above)",
                 c->listen_host, c->listen_port, s->tls ? "S" : "");
        goto fail;
    }
    s->listen_fd = -1; /* closed by MHD_stop_daemon */
    if (s->tls) log_info("serving HTTPS with %s (expires %s)", s->tls->subject, s->tls->not_after);
    mc.header_timeout_s = c->header_timeout_s;
    if (mc.enabled && !(s->metrics = metrics_server_start(&mc, server_ready, s, err, errlen))) goto fail;
    if (c->blobserve) {
        blobserve_config *bc = NULL;
        if (blobserve_config_parse(c, &bc, err, errlen) != 0) goto fail;
        if (!(s->blobserve = blobserve_start(&ge, bc, err, errlen))) goto fail;
    }
    return s;
fail:
    server_stop(s);
    return NULL;
}

server *server_offline(const config *c, store *st, generation_env *ge, char *err, size_t errlen) {
    server *s = calloc(1, sizeof *s);
    if (!s) {
        store_close(st);
        snprintf(err, errlen, "server: out of memory");
        return NULL;
    }
    s->cfg = c;
    s->listen_fd = -1;
    s->st = st;
    fetch_options fo = {.max_concurrent = c->upstream_max_concurrent_fetches, .blob_max_bytes = c->blob_max_bytes};
    if (!(s->fetches = fetcher_new(st, &fo))) {
        snprintf(err, errlen, "server: out of memory");
        server_stop(s);
        return NULL;
    }
    pthread_mutex_init(&s->gen_lock, NULL);
    if (!(s->first = served_build(s, (config *)c, false, err, errlen))) {
        pthread_mutex_destroy(&s->gen_lock);
        server_stop(s);
        return NULL;
    }
    s->current = s->first;
    s->first->refs = 1;
    *ge = (generation_env){.cfg = c,
                           .st = st,
                           .fetches = s->fetches,
                           .acquire = generation_acquire,
                           .release = generation_release,
                           .ud = s};
    return s;
}

int server_drain(server *s, int seconds) {
    if (!s->daemon) return 0;
    /* Stop accepting: the listening socket is closed, connections stay. */
    MHD_socket fd = MHD_quiesce_daemon(s->daemon);
    if (fd != MHD_INVALID_SOCKET) {
        close(fd);
        if (fd == s->listen_fd) s->listen_fd = -1;
    }
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
        unsigned left = di ? di->num_connections : 0;
        if (left == 0) return 0;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec >= seconds) {
            log_warn("shutdown: %u connection(s) still open after %d s; closing them", left, seconds);
            return (int)left;
        }
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

void server_stop(server *s) {
    if (!s) return;
    metrics_server_stop(s->metrics);
    blobserve_stop(s->blobserve); /* before the fetcher, store and policy it borrows */
    if (s->daemon) MHD_stop_daemon(s->daemon);
    specs_free(s->specs); /* its admin listener first; after the registry's requests */
    metrics_watch_fetcher(NULL);
    fetcher_free(s->fetches);
    scrub_stop(s->scrub);
    /* Every request is complete (the daemon is stopped), so every retired
     * generation is freed already. */
    if (s->current && s->current != s->first) served_free(s->current);
    if (s->first) {
        served_free(s->first);
        pthread_mutex_destroy(&s->gen_lock);
    }
    store_close(s->st);
    cluster_stop(s->cluster);            /* after everything that asks it */
    mhd_glue_listener_free(s->listener); /* after the daemon, whose callbacks use it */
    tls_config_free(s->tls);
    if (s->listen_fd >= 0) close(s->listen_fd);
    free(s);
}
