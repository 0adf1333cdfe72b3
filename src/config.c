#include "regfacade/config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "regfacade/credentials.h"
#include "regfacade/ref.h"

#define CONFIG_MAX_BYTES (1024 * 1024)

typedef struct {
    const char *file;
    const char *dir;
    char *err;
    size_t errlen;
} load_ctx;

static int fail(load_ctx *lc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(load_ctx *lc, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(lc->err, lc->errlen, "%s: %s", lc->file, msg);
    return -1;
}

char *config_read_file(const char *path, size_t max, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = malloc(max + 1);
    if (!buf) {
        fclose(f);
        errno = ENOMEM;
        return NULL;
    }
    size_t n = fread(buf, 1, max + 1, f);
    int rerr = ferror(f);
    fclose(f);
    if (rerr || n > max) {
        explicit_bzero(buf, n < max ? n : max); /* it may be a secret */
        free(buf);
        errno = rerr ? EIO : EFBIG;
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

static char *resolve_path(load_ctx *lc, const char *p) {
    if (p[0] == '/' || !lc->dir) return strdup(p);
    size_t n = strlen(lc->dir) + strlen(p) + 2;
    char *out = malloc(n);
    if (out) snprintf(out, n, "%s/%s", lc->dir, p);
    return out;
}

/* Every key of obj must be in allowed (NULL-terminated). */
const char *config_unknown_key(const json_value *obj, const char *const *allowed, char *list, size_t listlen) {
    list[0] = '\0';
    for (const char *const *a = allowed; *a; a++) {
        strncat(list, *a, listlen - strlen(list) - 1);
        if (a[1]) strncat(list, ", ", listlen - strlen(list) - 1);
    }
    for (size_t i = 0; i < obj->count; i++) {
        bool ok = false;
        for (const char *const *a = allowed; *a && !ok; a++) ok = strcmp(obj->keys[i], *a) == 0;
        if (!ok) return obj->keys[i];
    }
    return NULL;
}

static int check_keys(load_ctx *lc, const json_value *obj, const char *where, const char *const *allowed) {
    if (!obj || obj->type != JSON_OBJECT) return fail(lc, "%s: must be an object", where);
    char list[512];
    const char *bad = config_unknown_key(obj, allowed, list, sizeof list);
    if (bad) return fail(lc, "%s: unknown key \"%s\" (allowed: %s)", where, bad, list);
    return 0;
}

static int get_string(load_ctx *lc, const json_value *obj, const char *key, const char *where, char **out) {
    json_value *v = json_object_get(obj, key);
    if (!v) return 0;
    if (v->type != JSON_STRING || v->len == 0 || strlen(v->str) != v->len)
        return fail(lc, "%s.%s: must be a non-empty string", where, key);
    free(*out);
    *out = strdup(v->str);
    return *out ? 0 : fail(lc, "%s.%s: out of memory", where, key);
}

static int get_path(load_ctx *lc, const json_value *obj, const char *key, const char *where, char **out) {
    char *raw = NULL;
    if (get_string(lc, obj, key, where, &raw) != 0) return -1;
    if (!raw) return 0;
    free(*out);
    *out = resolve_path(lc, raw);
    free(raw);
    return *out ? 0 : fail(lc, "%s.%s: out of memory", where, key);
}

int config_value_size(const json_value *v, uint64_t *out) {
    if (!v) return -1;
    if (v->type != JSON_STRING) return json_get_uint64(v, out) ? 0 : -1;
    const char *s = v->str;
    if (strlen(s) != v->len || !(*s >= '0' && *s <= '9')) return -1;
    uint64_t n = 0;
    for (; *s >= '0' && *s <= '9'; s++) {
        if (n > (UINT64_MAX - 9) / 10) return -1;
        n = n * 10 + (uint64_t)(*s - '0');
    }
    static const struct {
        const char *suffix;
        uint64_t mul;
    } units[] = {{"", 1},
                 {"B", 1},
                 {"KB", 1000ULL},
                 {"MB", 1000ULL * 1000},
                 {"GB", 1000ULL * 1000 * 1000},
                 {"TB", 1000ULL * 1000 * 1000 * 1000},
                 {"KiB", 1ULL << 10},
                 {"MiB", 1ULL << 20},
                 {"GiB", 1ULL << 30},
                 {"TiB", 1ULL << 40}};
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (strcmp(s, units[i].suffix) == 0) {
            if (n > (UINT64_MAX / 2) / units[i].mul) return -1;
            *out = n * units[i].mul;
            return 0;
        }
    return -1;
}

static bool is_size_key(const char *key) {
    size_t n = strlen(key);
    return (n >= 6 && strcmp(key + n - 6, "_bytes") == 0) ||
           (n >= 17 && strcmp(key + n - 17, "_bytes_per_second") == 0); /* a rate: a size per second */
}

int config_value_uint(const json_value *v, const char *key, uint64_t *out) {
    if (is_size_key(key)) return config_value_size(v, out);
    return v && json_get_uint64(v, out) ? 0 : -1;
}

static int get_u64(load_ctx *lc, const json_value *obj, const char *key, const char *where, uint64_t min, uint64_t max,
                   uint64_t *out) {
    json_value *v = json_object_get(obj, key);
    if (!v) return 0;
    uint64_t n;
    if (config_value_uint(v, key, &n) != 0 || n < min || n > max) {
        if (is_size_key(key))
            return fail(lc,
                        "%s.%s: must be a size from %llu to %llu bytes (an integer, or a string such as "
                        "\"512MiB\" or \"20GiB\")",
                        where, key, (unsigned long long)min, (unsigned long long)max);
        return fail(lc, "%s.%s: must be an integer from %llu to %llu", where, key, (unsigned long long)min,
                    (unsigned long long)max);
    }
    *out = n;
    return 0;
}

static int get_long(load_ctx *lc, const json_value *obj, const char *key, const char *where, long min, long max,
                    long *out) {
    uint64_t n = (uint64_t)*out;
    if (get_u64(lc, obj, key, where, (uint64_t)min, (uint64_t)max, &n) != 0) return -1;
    *out = (long)n;
    return 0;
}

static int get_bool(load_ctx *lc, const json_value *obj, const char *key, const char *where, bool *out) {
    json_value *v = json_object_get(obj, key);
    if (!v) return 0;
    if (v->type != JSON_TRUE && v->type != JSON_FALSE) return fail(lc, "%s.%s: must be true or false", where, key);
    *out = v->type == JSON_TRUE;
    return 0;
}

/* Host (and port) of an http(s) URL, lowercase. */
static int url_host(const char *url, char *host, size_t hostlen) {
    const char *p = NULL;
    if (strncasecmp(url, "http://", 7) == 0)
        p = url + 7;
    else if (strncasecmp(url, "https://", 8) == 0)
        p = url + 8;
    else
        return -1;
    size_t n = strcspn(p, "/?#");
    if (n == 0 || n >= hostlen || memchr(p, '@', n)) return -1;
    for (size_t i = 0; i < n; i++) host[i] = (char)((p[i] >= 'A' && p[i] <= 'Z') ? p[i] + 32 : p[i]);
    host[n] = '\0';
    return 0;
}

/* A base URL that already names the API ("https://host/v2"): every request
 * would go to /v2/v2/... and be answered 404, which reads as "not found". */
static bool ends_in_v2(const char *url) {
    size_t n = strlen(url);
    return n >= 3 && strcasecmp(url + n - 3, "/v2") == 0;
}

static bool is_docker_hub(const char *host) {
    return strcmp(host, "docker.io") == 0 || strcmp(host, "registry-1.docker.io") == 0 ||
           strcmp(host, "index.docker.io") == 0 || strcmp(host, "registry-1.docker.io:443") == 0;
}

static int read_secret(load_ctx *lc, const char *path, const char *where, char **out) {
    size_t len = 0;
    char *s = config_read_file(path, 64 * 1024, &len);
    if (!s) return fail(lc, "%s: cannot read %s: %s", where, path, strerror(errno));
    while (len > 0 && (s[len - 1] == '\n' || s[len - 1] == '\r')) s[--len] = '\0';
    if (len == 0 || strlen(s) != len) {
        free(s);
        return fail(lc, "%s: %s is empty or holds a NUL byte", where, path);
    }
    *out = s;
    return 0;
}

/* u asks the credential helper name (docker-credential-NAME on PATH, or a
 * path): it must exist and be executable now (it is not run). */
static int set_helper(load_ctx *lc, config_upstream *u, const char *name, const char *where) {
    char path[PATH_MAX], why[1024], url[300];
    if (credentials_find_helper(name, lc->dir, NULL, path, sizeof path, why, sizeof why) != 0)
        return fail(lc, "%s: credential helper: %s", where, why);
    credentials_server_url(u->host, url, sizeof url);
    if (!(u->credential_helper = strdup(path)) || !(u->credential_server_url = strdup(url)))
        return fail(lc, "%s: out of memory", where);
    return 0;
}

/* upstreams.NAME.mirrors: an array of http(s) base URLs (at most 15). */
static int load_mirrors(load_ctx *lc, const json_value *obj, const char *where, config_upstream *u) {
    json_value *m = json_object_get(obj, "mirrors");
    if (!m) return 0;
    if (m->type != JSON_ARRAY || m->count > 15)
        return fail(lc, "%s.mirrors: must be an array of at most 15 URLs", where);
    if (m->count == 0) return 0;
    u->mirrors = calloc(m->count, sizeof *u->mirrors);
    if (!u->mirrors) return fail(lc, "%s.mirrors: out of memory", where);
    for (size_t i = 0; i < m->count; i++) {
        json_value *v = m->items[i];
        char host[256];
        if (v->type != JSON_STRING || strlen(v->str) != v->len || url_host(v->str, host, sizeof host) != 0 ||
            strpbrk(v->str, "?# \t"))
            return fail(lc,
                        "%s.mirrors[%zu]: must be an http:// or https:// URL with a host (and no credentials, "
                        "query or spaces)",
                        where, i);
        if (!(u->mirrors[i] = strdup(v->str))) return fail(lc, "%s.mirrors: out of memory", where);
        u->n_mirrors = i + 1;
        size_t n = strlen(u->mirrors[i]);
        while (n > 0 && u->mirrors[i][n - 1] == '/') u->mirrors[i][--n] = '\0';
        if (ends_in_v2(u->mirrors[i]))
            return fail(lc,
                        "%s.mirrors[%zu]: \"%s\" ends in /v2: give the registry's base URL (\"%.*s\"); "
                        "regfacade adds /v2/ to every request itself",
                        where, i, u->mirrors[i], (int)(n - 3), u->mirrors[i]);
    }
    return 0;
}

static int load_upstream(load_ctx *lc, const char *name, const json_value *obj, config_upstream *u) {
    static const char *const keys[] = {"url",
                                       "username",
                                       "password_file",
                                       "ca_file",
                                       "tls_verify",
                                       "library_prefix",
                                       "mirrors",
                                       "credentials",
                                       "credential_helper",
                                       "credential_cache_seconds",
                                       NULL};
    char where[300];
    snprintf(where, sizeof where, "upstreams.%s", name);
    if (!ref_valid_name(name) || strchr(name, '/'))
        return fail(lc, "%s: an upstream name must be one lowercase path component ([a-z0-9._-])", where);
    if (check_keys(lc, obj, where, keys) != 0) return -1;
    u->name = strdup(name);
    u->tls_verify = true;
    if (!u->name) return fail(lc, "%s: out of memory", where);
    if (get_string(lc, obj, "url", where, &u->url) != 0) return -1;
    if (!u->url) return fail(lc, "%s.url: required (e.g. \"https://registry-1.docker.io\")", where);
    size_t n = strlen(u->url);
    while (n > 0 && u->url[n - 1] == '/') u->url[--n] = '\0';
    char host[256];
    if (url_host(u->url, host, sizeof host) != 0)
        return fail(lc, "%s.url: \"%s\" is not an http:// or https:// URL with a host (and no credentials)", where,
                    u->url);
    if (ends_in_v2(u->url))
        return fail(lc,
                    "%s.url: \"%s\" ends in /v2: give the registry's base URL (\"%.*s\"); regfacade adds "
                    "/v2/ to every request itself",
                    where, u->url, (int)(n - 3), u->url);
    u->host = strdup(host);
    u->library_prefix = is_docker_hub(host);
    if (get_string(lc, obj, "username", where, &u->username) != 0) return -1;
    char *password_file = NULL;
    if (get_path(lc, obj, "password_file", where, &password_file) != 0) return -1;
    if (password_file) {
        int rc = read_secret(lc, password_file, where, &u->password);
        free(password_file);
        if (rc != 0) return -1;
        if (!u->username) return fail(lc, "%s: password_file needs username", where);
    } else if (u->username) {
        return fail(lc, "%s: username needs password_file", where);
    }
    char *helper = NULL;
    if (get_string(lc, obj, "credential_helper", where, &helper) != 0) return -1;
    if (helper && u->username) {
        free(helper);
        return fail(lc, "%s: username and credential_helper exclude each other (one account per upstream)", where);
    }
    if (helper && set_helper(lc, u, helper, where) != 0) {
        free(helper);
        return -1;
    }
    free(helper);
    u->credential_cache_seconds = -1; /* upstream_client.credential_cache_seconds unless set */
    if (get_long(lc, obj, "credential_cache_seconds", where, 0, 86400, &u->credential_cache_seconds) != 0) return -1;
    if (get_path(lc, obj, "ca_file", where, &u->ca_file) != 0) return -1;
    if (u->ca_file && access(u->ca_file, R_OK) != 0)
        return fail(lc, "%s.ca_file: cannot read %s: %s", where, u->ca_file, strerror(errno));
    if (get_bool(lc, obj, "tls_verify", where, &u->tls_verify) != 0) return -1;
    if (get_bool(lc, obj, "library_prefix", where, &u->library_prefix) != 0) return -1;
    if (load_mirrors(lc, obj, where, u) != 0) return -1;
    return 0;
}

/* upstreams.NAME.credentials: { SET: { "username", "password_file" } }.
 * Each set becomes an upstream "NAME@SET" with NAME's URL and settings and
 * its own account. Only a policy selects it (authorize or resolve answering
 * credentials = SET, policy.h): '@' is never part of a requested name. */
static int load_credential_sets(load_ctx *lc, const json_value *ups, config *c) {
    static const char *const set_keys[] = {"username", "password_file", NULL};
    size_t base = c->n_upstreams, extra = 0;
    for (size_t i = 0; i < base; i++) {
        json_value *cr = json_object_get(ups->items[i], "credentials");
        if (!cr) continue;
        if (cr->type != JSON_OBJECT)
            return fail(lc, "upstreams.%s.credentials: must be an object of credential sets", c->upstreams[i].name);
        extra += cr->count;
    }
    if (extra == 0) return 0;
    config_upstream *all = realloc(c->upstreams, (base + extra) * sizeof *all);
    if (!all) return fail(lc, "upstreams: out of memory");
    c->upstreams = all;
    memset(all + base, 0, extra * sizeof *all);
    for (size_t i = 0; i < base; i++) {
        json_value *cr = json_object_get(ups->items[i], "credentials");
        for (size_t j = 0; cr && j < cr->count; j++) {
            const config_upstream *b = &c->upstreams[i];
            const char *set = cr->keys[j];
            char where[400];
            snprintf(where, sizeof where, "upstreams.%s.credentials.%s", b->name, set);
            size_t sl = strlen(set);
            if (sl == 0 || sl > 63 ||
                strspn(set, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") != sl)
                return fail(lc, "%s: a credential set name is 1 to 63 of [A-Za-z0-9._-]", where);
            if (check_keys(lc, cr->items[j], where, set_keys) != 0) return -1;
            config_upstream *u = &c->upstreams[c->n_upstreams++];
            size_t nl = strlen(b->name) + sl + 2;
            if (!(u->name = malloc(nl))) return fail(lc, "%s: out of memory", where);
            snprintf(u->name, nl, "%s@%s", b->name, set);
            u->url = strdup(b->url);
            u->host = strdup(b->host);
            u->ca_file = b->ca_file ? strdup(b->ca_file) : NULL;
            u->tls_verify = b->tls_verify;
            u->library_prefix = b->library_prefix;
            if (!u->url || !u->host || (b->ca_file && !u->ca_file)) return fail(lc, "%s: out of memory", where);
            if (b->n_mirrors) {
                if (!(u->mirrors = calloc(b->n_mirrors, sizeof *u->mirrors)))
                    return fail(lc, "%s: out of memory", where);
                for (size_t m = 0; m < b->n_mirrors; m++) {
                    if (!(u->mirrors[m] = strdup(b->mirrors[m]))) return fail(lc, "%s: out of memory", where);
                    u->n_mirrors = m + 1;
                }
            }
            if (get_string(lc, cr->items[j], "username", where, &u->username) != 0) return -1;
            char *password_file = NULL;
            if (get_path(lc, cr->items[j], "password_file", where, &password_file) != 0) return -1;
            if (!u->username || !password_file) {
                free(password_file);
                return fail(lc, "%s: username and password_file are required", where);
            }
            int rc = read_secret(lc, password_file, where, &u->password);
            free(password_file);
            if (rc != 0) return -1;
        }
    }
    return 0;
}

/* Upstreams without their own credentials take them from docker_config:
 * the helper it names for the host (credHelpers, then credsStore), else
 * its auths entry (a password or an identity token). */
static int apply_docker_config(load_ctx *lc, config *c) {
    size_t len = 0;
    char *text = config_read_file(c->docker_config, 4 * 1024 * 1024, &len);
    if (!text) return fail(lc, "docker_config: cannot read %s: %s", c->docker_config, strerror(errno));
    int rc = 0;
    for (size_t i = 0; i < c->n_upstreams && rc == 0; i++) {
        config_upstream *u = &c->upstreams[i];
        if (u->username || u->credential_helper) continue;
        char user[512], pass[16 * 1024], err[512], helper[128], where[400];
        int found = docker_config_helper(text, len, u->host, helper, sizeof helper, err, sizeof err);
        if (found < 0) {
            rc = fail(lc, "docker_config %s: %s", c->docker_config, err);
            break;
        }
        if (found == 1) {
            snprintf(where, sizeof where, "docker_config %s (for upstreams.%s, %s)", c->docker_config, u->name,
                     u->host);
            rc = set_helper(lc, u, helper, where);
            continue;
        }
        found = docker_config_lookup(text, len, u->host, user, sizeof user, pass, sizeof pass, err, sizeof err);
        if (found < 0) {
            rc = fail(lc, "docker_config %s: %s", c->docker_config, err);
        } else if (found == 1 && strcmp(user, CREDENTIALS_TOKEN_USERNAME) == 0) {
            if (!(u->identity_token = strdup(pass))) rc = fail(lc, "docker_config: out of memory");
        } else if (found == 1) {
            u->username = strdup(user);
            u->password = strdup(pass);
            if (!u->username || !u->password) rc = fail(lc, "docker_config: out of memory");
        }
        explicit_bzero(pass, sizeof pass);
    }
    explicit_bzero(text, len);
    free(text);
    return rc;
}

int config_parse_listen(const char *s, char **host, int *port, char *why, size_t whylen) {
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s) {
        snprintf(why, whylen, "\"%s\" must be HOST:PORT (e.g. \"127.0.0.1:5000\")", s);
        return -1;
    }
    char *end = NULL;
    long p = strtol(colon + 1, &end, 10);
    if (!colon[1] || *end || p < 1 || p > 65535) {
        snprintf(why, whylen, "port in \"%s\" must be 1..65535", s);
        return -1;
    }
    char h[64];
    struct in_addr a;
    if ((size_t)(colon - s) >= sizeof h ||
        (snprintf(h, sizeof h, "%.*s", (int)(colon - s), s), inet_pton(AF_INET, h, &a) != 1)) {
        snprintf(why, whylen,
                 "\"%s\": the host must be an IPv4 address such as 127.0.0.1 or 0.0.0.0 (names "
                 "such as localhost are not resolved)",
                 s);
        return -1;
    }
    if (!(*host = strdup(h))) {
        snprintf(why, whylen, "out of memory");
        return -1;
    }
    *port = (int)p;
    return 0;
}

static int parse_listen(load_ctx *lc, const char *s, config *c) {
    char why[300], *host = NULL;
    if (config_parse_listen(s, &host, &c->listen_port, why, sizeof why) != 0) return fail(lc, "listen: %s", why);
    free(c->listen_host);
    c->listen_host = host;
    return 0;
}

static config *config_new_defaults(void) {
    config *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->listen_host = strdup("127.0.0.1");
    c->listen_port = 5000;
    c->cache_max_bytes = 20ULL * 1024 * 1024 * 1024;
    c->tag_ttl_seconds = 60;
    c->policy_options = json_new_object();
    c->manifest_max_bytes = 4 * 1024 * 1024;
    c->verify_before_send_bytes = 1024 * 1024;
    c->blob_max_bytes = 10ULL * 1024 * 1024 * 1024;
    c->scrub_bytes_per_second = 8 * 1024 * 1024;
    c->upstream_connect_timeout_ms = 10000;
    c->upstream_low_speed_time_s = 30;
    c->upstream_low_speed_limit = 1024;
    c->upstream_retries = 3;
    c->upstream_retry_budget_s = 30;
    c->upstream_max_concurrent_fetches = 64;
    c->credential_helper_timeout_ms = CREDENTIALS_DEFAULT_TIMEOUT_MS;
    c->credential_cache_seconds = CREDENTIALS_DEFAULT_CACHE_SECONDS;
    c->stale_max_seconds = 86400;
    c->max_connections = 1024;
    c->client_timeout_s = 300;
    c->shutdown_grace_seconds = 30;
    c->header_max_bytes = 64 * 1024;
    c->url_max_bytes = 4096;
    c->header_timeout_s = 30;
    c->log_level = LOG_INFO;
    c->listen_from = c->cache_dir_from = c->log_level_from = "default";
    if (!c->listen_host || !c->policy_options) {
        config_free(c);
        return NULL;
    }
    return c;
}

/* Client-facing limits (docs/security.md). */
static int load_client_limits(load_ctx *lc, const json_value *limits, config *c) {
    struct {
        const char *key;
        unsigned *field;
        uint64_t min, max;
    } keys[] = {
        {"header_max_bytes", &c->header_max_bytes, 8 * 1024, 1024 * 1024},
        {"url_max_bytes", &c->url_max_bytes, 256, 8192},
        {"connections_per_ip", &c->connections_per_ip, 0, 1000000},
        {"requests_per_second", &c->requests_per_second, 0, 1000000},
        {"request_burst", &c->request_burst, 0, 10000000},
        {"header_timeout_seconds", &c->header_timeout_s, 0, 3600},
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        uint64_t v = *keys[i].field;
        if (get_u64(lc, limits, keys[i].key, "limits", keys[i].min, keys[i].max, &v) != 0) return -1;
        *keys[i].field = (unsigned)v;
    }
    return 0;
}

static int load_tree(load_ctx *lc, const json_value *root, config *c) {
    static const char *const top[] = {
        "listen", "cache",           "policy",  "upstreams", "default_upstream", "docker_config",
        "limits", "upstream_client", "metrics", "tls",       "blobserve",        "admin",
        "specs",  "layers",          "user",    "log_level", "cluster",          NULL};
    static const char *const cache_keys[] = {
        "dir", "max_bytes", "tag_ttl_seconds", "stale_max_seconds", "scrub_bytes_per_second", NULL};
    /* file and options are read here; the limits by policy.c (policy_section). */
    static const char *const policy_keys[] = {"file",
                                              "options",
                                              "hook_time_ms",
                                              "hook_instructions",
                                              "memory_bytes",
                                              "shared_bytes",
                                              "data_files",
                                              "data_dir",
                                              "watch",
                                              "idle_states",
                                              NULL};
    static const char *const limit_keys[] = {"manifest_max_bytes",
                                             "verify_before_send_bytes",
                                             "blob_max_bytes",
                                             "max_connections",
                                             "client_timeout_seconds",
                                             "header_max_bytes",
                                             "url_max_bytes",
                                             "connections_per_ip",
                                             "requests_per_second",
                                             "request_burst",
                                             "header_timeout_seconds",
                                             "shutdown_grace_seconds",
                                             NULL};
    static const char *const client_keys[] = {"connect_timeout_ms",
                                              "low_speed_seconds",
                                              "low_speed_bytes",
                                              "retries",
                                              "retry_budget_seconds",
                                              "max_concurrent_fetches",
                                              "credential_helper_timeout_ms",
                                              "credential_cache_seconds",
                                              NULL};
    if (check_keys(lc, root, "config", top) != 0) return -1;

    char *listen = NULL;
    if (get_string(lc, root, "listen", "config", &listen) != 0) return -1;
    if (listen) {
        int rc = parse_listen(lc, listen, c);
        free(listen);
        if (rc != 0) return -1;
        c->listen_from = "file";
    }
    char *level = NULL;
    if (get_string(lc, root, "log_level", "config", &level) != 0) return -1;
    if (level) {
        int rc = log_level_parse(level, &c->log_level);
        free(level);
        if (rc != 0) return fail(lc, "log_level: must be \"error\", \"warn\", \"info\" or \"debug\"");
        c->log_level_from = "file";
    }

    json_value *cache = json_object_get(root, "cache");
    if (!cache) return fail(lc, "cache: required (at least {\"dir\": \"...\"})");
    if (check_keys(lc, cache, "cache", cache_keys) != 0) return -1;
    if (get_path(lc, cache, "dir", "cache", &c->cache_dir) != 0) return -1;
    if (!c->cache_dir) return fail(lc, "cache.dir: required");
    c->cache_dir_from = "file";
    if (get_u64(lc, cache, "max_bytes", "cache", 1024 * 1024, UINT64_MAX / 2, &c->cache_max_bytes) != 0) return -1;
    if (get_long(lc, cache, "tag_ttl_seconds", "cache", 0, 365L * 86400, &c->tag_ttl_seconds) != 0) return -1;
    if (get_long(lc, cache, "stale_max_seconds", "cache", 0, 365L * 86400, &c->stale_max_seconds) != 0) return -1;
    if (get_u64(lc, cache, "scrub_bytes_per_second", "cache", 0, UINT64_MAX / 2, &c->scrub_bytes_per_second) != 0)
        return -1;

    json_value *policy = json_object_get(root, "policy");
    if (policy) {
        if (check_keys(lc, policy, "policy", policy_keys) != 0) return -1;
        if (!(c->policy_section = json_clone(policy))) return fail(lc, "policy: out of memory");
        if (get_path(lc, policy, "file", "policy", &c->policy_file) != 0) return -1;
        json_value *opts = json_object_get(policy, "options");
        if (opts) {
            if (opts->type != JSON_OBJECT) return fail(lc, "policy.options: must be an object");
            json_free(c->policy_options);
            c->policy_options = json_clone(opts);
            if (!c->policy_options) return fail(lc, "policy.options: out of memory");
        }
    }

    json_value *ups = json_object_get(root, "upstreams");
    if (!ups || ups->type != JSON_OBJECT || ups->count == 0)
        return fail(lc, "upstreams: required, an object with at least one upstream");
    c->upstreams = calloc(ups->count, sizeof *c->upstreams);
    if (!c->upstreams) return fail(lc, "upstreams: out of memory");
    for (size_t i = 0; i < ups->count; i++) {
        for (size_t j = 0; j < i; j++)
            if (strcmp(ups->keys[i], ups->keys[j]) == 0) return fail(lc, "upstreams.%s: defined twice", ups->keys[i]);
        c->n_upstreams = i + 1;
        if (load_upstream(lc, ups->keys[i], ups->items[i], &c->upstreams[i]) != 0) return -1;
    }

    if (get_string(lc, root, "default_upstream", "config", &c->default_upstream) != 0) return -1;
    if (c->default_upstream && !config_find_upstream(c, c->default_upstream))
        return fail(lc, "default_upstream: \"%s\" is not a key of upstreams", c->default_upstream);
    if (!c->default_upstream && c->n_upstreams == 1) c->default_upstream = strdup(c->upstreams[0].name);

    if (get_path(lc, root, "docker_config", "config", &c->docker_config) != 0) return -1;
    if (c->docker_config && apply_docker_config(lc, c) != 0) return -1;
    if (load_credential_sets(lc, ups, c) != 0) return -1;

    json_value *limits = json_object_get(root, "limits");
    if (limits) {
        if (check_keys(lc, limits, "limits", limit_keys) != 0) return -1;
        if (get_u64(lc, limits, "manifest_max_bytes", "limits", 1024, 64 * 1024 * 1024, &c->manifest_max_bytes) != 0)
            return -1;
        if (get_u64(lc, limits, "verify_before_send_bytes", "limits", 0, 1024 * 1024 * 1024,
                    &c->verify_before_send_bytes) != 0)
            return -1;
        if (get_u64(lc, limits, "blob_max_bytes", "limits", 1024, UINT64_MAX / 2, &c->blob_max_bytes) != 0) return -1;
        uint64_t v = c->max_connections;
        if (get_u64(lc, limits, "max_connections", "limits", 1, 1000000, &v) != 0) return -1;
        c->max_connections = (unsigned)v;
        v = c->client_timeout_s;
        if (get_u64(lc, limits, "client_timeout_seconds", "limits", 1, 86400, &v) != 0) return -1;
        c->client_timeout_s = (unsigned)v;
        v = (uint64_t)c->shutdown_grace_seconds;
        if (get_u64(lc, limits, "shutdown_grace_seconds", "limits", 0, 3600, &v) != 0) return -1;
        c->shutdown_grace_seconds = (int)v;
        if (load_client_limits(lc, limits, c) != 0) return -1;
    }
    if (get_string(lc, root, "user", "config", &c->user) != 0) return -1;
    /* Sections validated by the modules that own them. */
    static const char *const owned[] = {"metrics", "tls", "blobserve", "admin", "specs", "layers", "cluster", NULL};
    json_value **slots[] = {&c->metrics, &c->tls, &c->blobserve, &c->admin, &c->specs, &c->layers, &c->cluster};
    for (size_t i = 0; owned[i]; i++) {
        json_value *v = json_object_get(root, owned[i]);
        if (!v) continue;
        if (v->type != JSON_OBJECT) return fail(lc, "%s: must be an object", owned[i]);
        if (!(*slots[i] = json_clone(v))) return fail(lc, "%s: out of memory", owned[i]);
    }
    json_value *client = json_object_get(root, "upstream_client");
    if (client) {
        if (check_keys(lc, client, "upstream_client", client_keys) != 0) return -1;
        if (get_long(lc, client, "connect_timeout_ms", "upstream_client", 1, 600000, &c->upstream_connect_timeout_ms))
            return -1;
        if (get_long(lc, client, "low_speed_seconds", "upstream_client", 1, 3600, &c->upstream_low_speed_time_s))
            return -1;
        if (get_long(lc, client, "low_speed_bytes", "upstream_client", 1, 1L << 30, &c->upstream_low_speed_limit))
            return -1;
        long r = c->upstream_retries;
        if (get_long(lc, client, "retries", "upstream_client", 0, 20, &r)) return -1;
        c->upstream_retries = (int)r;
        if (get_long(lc, client, "retry_budget_seconds", "upstream_client", 1, 3600, &c->upstream_retry_budget_s))
            return -1;
        uint64_t mc = c->upstream_max_concurrent_fetches;
        if (get_u64(lc, client, "max_concurrent_fetches", "upstream_client", 1, 100000, &mc)) return -1;
        c->upstream_max_concurrent_fetches = (unsigned)mc;
        if (get_long(lc, client, "credential_helper_timeout_ms", "upstream_client", 100, 600000,
                     &c->credential_helper_timeout_ms))
            return -1;
        if (get_long(lc, client, "credential_cache_seconds", "upstream_client", 0, 86400, &c->credential_cache_seconds))
            return -1;
    }
    for (size_t i = 0; i < c->n_upstreams; i++)
        if (c->upstreams[i].credential_cache_seconds < 0)
            c->upstreams[i].credential_cache_seconds = c->credential_cache_seconds;
    return 0;
}

config *config_load(const char *path, char *err, size_t errlen) {
    char abs[PATH_MAX];
    if (!realpath(path, abs)) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t len = 0;
    char *text = config_read_file(abs, CONFIG_MAX_BYTES, &len);
    if (!text) {
        snprintf(err, errlen, "%s: cannot read: %s", path, strerror(errno));
        return NULL;
    }
    json_error je;
    json_value *root = json_parse_strict(text, len, 32, &je);
    free(text);
    if (!root) {
        snprintf(err, errlen, "%s:%u:%u: %s", path, je.line, je.column, je.message);
        return NULL;
    }
    char dirbuf[PATH_MAX];
    snprintf(dirbuf, sizeof dirbuf, "%s", abs);
    config *c = config_load_tree(root, path, abs, dirname(dirbuf), err, errlen);
    json_free(root);
    return c;
}

config *config_load_tree(const json_value *root, const char *name, const char *path, const char *dir, char *err,
                         size_t errlen) {
    load_ctx lc = {name, dir, err, errlen};
    config *c = config_new_defaults();
    if (!c) {
        snprintf(err, errlen, "%s: out of memory", name);
        return NULL;
    }
    c->path = strdup(path);
    c->dir = strdup(dir);
    if (!c->path || !c->dir || load_tree(&lc, root, c) != 0) {
        if (!c->path || !c->dir) snprintf(err, errlen, "%s: out of memory", name);
        config_free(c);
        return NULL;
    }
    return c;
}

int config_apply_overrides(config *c, const config_overrides *o, char *err, size_t errlen) {
    char *host = NULL, *dir = NULL;
    int port = 0;
    log_level level = c->log_level;
    char why[300];
    if (o->listen && config_parse_listen(o->listen, &host, &port, why, sizeof why) != 0) {
        snprintf(err, errlen, "%s: %s", o->listen_from, why);
        return -1;
    }
    if (o->log_level && log_level_parse(o->log_level, &level) != 0) {
        snprintf(err, errlen, "%s: \"%.60s\" is not a log level (error, warn, info, debug)", o->log_level_from,
                 o->log_level);
        free(host);
        return -1;
    }
    if (o->cache_dir) {
        char cwd[PATH_MAX];
        if (!*o->cache_dir) {
            snprintf(err, errlen, "%s: must not be empty", o->cache_dir_from);
            free(host);
            return -1;
        }
        if (o->cache_dir[0] == '/') {
            dir = strdup(o->cache_dir);
        } else if (getcwd(cwd, sizeof cwd)) {
            size_t n = strlen(cwd) + strlen(o->cache_dir) + 2;
            if ((dir = malloc(n))) snprintf(dir, n, "%s/%s", cwd, o->cache_dir);
        } else {
            snprintf(err, errlen, "%s: the working folder is unknown: %s", o->cache_dir_from, strerror(errno));
            free(host);
            return -1;
        }
        if (!dir) {
            snprintf(err, errlen, "%s: out of memory", o->cache_dir_from);
            free(host);
            return -1;
        }
    }
    if (host) {
        free(c->listen_host);
        c->listen_host = host;
        c->listen_port = port;
        c->listen_from = o->listen_from;
    }
    if (dir) {
        free(c->cache_dir);
        c->cache_dir = dir;
        c->cache_dir_from = o->cache_dir_from;
    }
    if (o->log_level) {
        c->log_level = level;
        c->log_level_from = o->log_level_from;
    }
    return 0;
}

config *config_default(char *err, size_t errlen) {
    static const char text[] =
        "{\"listen\":\"127.0.0.1:5000\",\"cache\":{\"dir\":\"cache\"},"
        "\"upstreams\":{\"hub\":{\"url\":\"https://registry-1.docker.io\"}},\"default_upstream\":\"hub\"}";
    char jerr[256];
    json_value *root = json_parse(text, sizeof text - 1, 8, jerr, sizeof jerr);
    if (!root) {
        snprintf(err, errlen, "embedded default: %s", jerr);
        return NULL;
    }
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) {
        json_free(root);
        snprintf(err, errlen, "embedded default: getcwd: %s", strerror(errno));
        return NULL;
    }
    load_ctx lc = {"(embedded default)", cwd, err, errlen};
    config *c = config_new_defaults();
    if (!c || !(c->path = strdup("(embedded default)")) || !(c->dir = strdup(cwd)) || load_tree(&lc, root, c) != 0) {
        if (c && (!c->path || !c->dir)) snprintf(err, errlen, "embedded default: out of memory");
        json_free(root);
        config_free(c);
        return NULL;
    }
    c->listen_from = c->cache_dir_from = c->log_level_from = "default";
    json_free(root);
    return c;
}

void config_free(config *c) {
    if (!c) return;
    for (size_t i = 0; i < c->n_upstreams; i++) {
        config_upstream *u = &c->upstreams[i];
        free(u->name);
        free(u->url);
        free(u->host);
        free(u->username);
        if (u->password) memset(u->password, 0, strlen(u->password));
        free(u->password);
        if (u->identity_token) explicit_bzero(u->identity_token, strlen(u->identity_token));
        free(u->identity_token);
        free(u->credential_helper);
        free(u->credential_server_url);
        free(u->ca_file);
        for (size_t j = 0; j < u->n_mirrors; j++) free(u->mirrors[j]);
        free(u->mirrors);
    }
    free(c->upstreams);
    free(c->path);
    free(c->listen_host);
    free(c->cache_dir);
    free(c->policy_file);
    json_free(c->policy_options);
    json_free(c->metrics);
    json_free(c->tls);
    json_free(c->blobserve);
    json_free(c->admin);
    json_free(c->specs);
    json_free(c->cluster);
    json_free(c->layers);
    json_free(c->policy_section);
    free(c->dir);
    free(c->default_upstream);
    free(c->docker_config);
    free(c->user);
    free(c);
}

const config_upstream *config_find_upstream(const config *c, const char *name) {
    for (size_t i = 0; i < c->n_upstreams; i++)
        if (strcmp(c->upstreams[i].name, name) == 0) return &c->upstreams[i];
    return NULL;
}

int config_section_fail(config_section *s, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* A message starting with ':' is about the whole section. */
    snprintf(s->err, s->errlen, "%s: %s%s%s", s->c->path ? s->c->path : "config", s->section, msg[0] == ':' ? "" : ".",
             msg);
    return -1;
}

int config_section_check_keys(config_section *s, const json_value *obj, const char *where, const char *const *allowed) {
    char list[512];
    const char *bad = config_unknown_key(obj, allowed, list, sizeof list);
    if (bad) return config_section_fail(s, "%s%s%s: unknown key (allowed: %s)", where, *where ? "." : "", bad, list);
    return 0;
}
