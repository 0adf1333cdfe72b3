#include "regfacade/policy.h"

#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "regfacade/digest.h"
#include "regfacade/image_rewrite.h"
#include "regfacade/log.h"
#include "regfacade/lua_json.h"
#include "regfacade/lua_embedded.h"
#include "regfacade/metrics.h"
#include "regfacade/ref.h"

#define POLICY_HOOK_BUDGET_MS 250   /* wall time one hook call may take */
#define POLICY_COUNT_HOOK_EVERY 10000

struct policy {
    const config *cfg;
    char fingerprint[65];
    pthread_mutex_t lock;
    lua_State **idle;
    size_t n_idle, cap;
};

/* Per-state run context, kept in the state's extra space (no statics: states
 * move between threads). */
typedef struct {
    struct timespec deadline;
    int tripped;
} run_ctx;

static run_ctx *ctx_of(lua_State *L) { return *(run_ctx **)lua_getextraspace(L); }

static void budget_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    run_ctx *rc = ctx_of(L);
    if (!rc || rc->deadline.tv_sec == 0) return;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (rc->tripped || now.tv_sec > rc->deadline.tv_sec ||
        (now.tv_sec == rc->deadline.tv_sec && now.tv_nsec > rc->deadline.tv_nsec)) {
        /* Once tripped, fire on every line so the script's own pcall cannot
         * swallow the timeout. */
        rc->tripped = 1;
        lua_sethook(L, budget_hook, LUA_MASKCOUNT | LUA_MASKLINE, 1);
        luaL_error(L, "policy hook exceeded its %d ms time budget", POLICY_HOOK_BUDGET_MS);
    }
}

/* package.searchers entry for the embedded lua/regfacade/NAME.lua modules. */
static int embedded_searcher(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    for (const embedded_module *m = embedded_lua_modules; m->module; m++) {
        if (strcmp(m->module, name) == 0) {
            if (luaL_loadbufferx(L, m->source, m->len, m->chunkname, "t") != LUA_OK) return lua_error(L);
            lua_pushstring(L, m->chunkname + 1);
            return 2;
        }
    }
    lua_pushfstring(L, "\n\tno embedded module '%s'", name);
    return 1;
}

static void push_json(lua_State *L, const json_value *v, int depth) {
    if (depth > 64 || !lua_checkstack(L, 4)) {
        lua_pushnil(L);
        return;
    }
    switch (v->type) {
    case JSON_NULL: lua_pushnil(L); break;
    case JSON_TRUE: lua_pushboolean(L, 1); break;
    case JSON_FALSE: lua_pushboolean(L, 0); break;
    case JSON_NUMBER: {
        int64_t i;
        if (json_get_int64(v, &i)) lua_pushinteger(L, (lua_Integer)i);
        else lua_pushnumber(L, strtod(v->str, NULL));
        break;
    }
    case JSON_STRING: lua_pushlstring(L, v->str, v->len); break;
    case JSON_ARRAY:
        lua_createtable(L, (int)v->count, 0);
        for (size_t i = 0; i < v->count; i++) {
            push_json(L, v->items[i], depth + 1);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        break;
    case JSON_OBJECT:
        lua_createtable(L, 0, (int)v->count);
        for (size_t i = 0; i < v->count; i++) {
            lua_pushlstring(L, v->keys[i], v->key_lens[i]);
            push_json(L, v->items[i], depth + 1);
            lua_rawset(L, -3);
        }
        break;
    }
}

static int l_log(lua_State *L) {
    const char *level = luaL_checkstring(L, 1);
    const char *msg = luaL_checkstring(L, 2);
    lua_Debug ar;
    char where[256] = "?";
    if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "Sl", &ar))
        snprintf(where, sizeof where, "%s:%d", ar.short_src, ar.currentline);
    log_level lv = strcmp(level, "error") == 0 ? LOG_ERROR
                   : strcmp(level, "warn") == 0 ? LOG_WARN
                   : strcmp(level, "debug") == 0 ? LOG_DEBUG
                                                 : LOG_INFO;
    log_msg(lv, "policy %s: %s", where, msg);
    return 0;
}

/* require "regfacade": the config as data, and the host functions. */
static int open_regfacade(lua_State *L) {
    const config *c = lua_touserdata(L, lua_upvalueindex(1));
    lua_newtable(L);
    lua_newtable(L); /* config */
    lua_newtable(L); /* upstreams */
    for (size_t i = 0; i < c->n_upstreams; i++) {
        const config_upstream *u = &c->upstreams[i];
        lua_newtable(L);
        lua_pushstring(L, u->url);
        lua_setfield(L, -2, "url");
        lua_pushstring(L, u->host);
        lua_setfield(L, -2, "host");
        lua_pushboolean(L, u->library_prefix);
        lua_setfield(L, -2, "library_prefix");
        lua_setfield(L, -2, u->name);
    }
    lua_setfield(L, -2, "upstreams");
    if (c->default_upstream) {
        lua_pushstring(L, c->default_upstream);
        lua_setfield(L, -2, "default_upstream");
    }
    push_json(L, c->policy_options, 0);
    lua_setfield(L, -2, "options");
    lua_setfield(L, -2, "config");
    lua_pushcfunction(L, l_log);
    lua_setfield(L, -2, "log");
    /* The one JSON codec, and its null, as regfacade.json / regfacade.null. */
    luaL_requiref(L, "regfacade.json", luaopen_regfacade_json, 0);
    lua_setfield(L, -2, "json");
    lua_json_push_null(L);
    lua_setfield(L, -2, "null");
    lua_pushstring(L, REGFACADE_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}

static int traceback(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) msg = luaL_tolstring(L, 1, NULL);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static const char *const hook_names[] = {"authorize", "resolve", "rewrite", "log", "spec", NULL};

/* A new state with the policy loaded and its hooks table at registry key
 * "regfacade.hooks". NULL with err on failure. */
static lua_State *state_new(const config *c, char *err, size_t errlen) {
    lua_State *L = luaL_newstate();
    run_ctx *rc = calloc(1, sizeof *rc);
    if (!L || !rc) {
        if (L) lua_close(L);
        free(rc);
        snprintf(err, errlen, "policy: out of memory creating a Lua state");
        return NULL;
    }
    *(run_ctx **)lua_getextraspace(L) = rc;
    luaL_openlibs(L);
    lua_sethook(L, budget_hook, LUA_MASKCOUNT, POLICY_COUNT_HOOK_EVERY);

    /* Embedded modules come before the file system: the library a policy
     * gets is the one this binary was built with. */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "searchers");
    lua_Integer n = (lua_Integer)luaL_len(L, -1);
    for (lua_Integer i = n; i >= 2; i--) {
        lua_rawgeti(L, -1, i);
        lua_rawseti(L, -2, i + 1);
    }
    lua_pushcfunction(L, embedded_searcher);
    lua_rawseti(L, -2, 2);
    lua_pop(L, 1);
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_regfacade_json);
    lua_setfield(L, -2, "regfacade.json");
    lua_pushlightuserdata(L, (void *)c);
    lua_pushcclosure(L, open_regfacade, 1);
    lua_setfield(L, -2, "regfacade");
    lua_pop(L, 1);
    if (c->policy_file) {
        /* The policy's own folder first, for its helper modules. */
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", c->policy_file);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0';
        lua_pushfstring(L, "%s/?.lua;", dir);
        lua_getfield(L, -2, "path");
        lua_concat(L, 2);
        lua_setfield(L, -2, "path");
    }
    lua_pop(L, 1);

    lua_pushcfunction(L, traceback);
    int status;
    const char *what = c->policy_file ? c->policy_file : "(embedded default policy)";
    if (c->policy_file) {
        status = luaL_loadfilex(L, c->policy_file, "t");
        if (status == LUA_OK) status = lua_pcall(L, 0, 1, -2);
    } else {
        lua_getglobal(L, "require");
        lua_pushstring(L, "regfacade.default");
        status = lua_pcall(L, 1, 1, -3);
    }
    if (status != LUA_OK) {
        snprintf(err, errlen, "policy %s: %s", what, lua_tostring(L, -1));
        lua_close(L);
        free(rc);
        return NULL;
    }
    if (!lua_istable(L, -1)) {
        snprintf(err, errlen, "policy %s: the module must return a table of hooks, got %s", what,
                 luaL_typename(L, -1));
        lua_close(L);
        free(rc);
        return NULL;
    }
    for (const char *const *h = hook_names; *h; h++) {
        lua_getfield(L, -1, *h);
        int t = lua_type(L, -1);
        lua_pop(L, 1);
        if (t != LUA_TNIL && t != LUA_TFUNCTION) {
            snprintf(err, errlen, "policy %s: hook \"%s\" must be a function, got %s", what, *h, lua_typename(L, t));
            lua_close(L);
            free(rc);
            return NULL;
        }
    }
    lua_setfield(L, LUA_REGISTRYINDEX, "regfacade.hooks");
    lua_settop(L, 0);
    return L;
}

static void state_free(lua_State *L) {
    run_ctx *rc = ctx_of(L);
    lua_close(L);
    free(rc);
}

/* sha256 of the policy source (or the embedded default's name and
 * version) and the options. */
static int compute_fingerprint(const config *c, char out[65], char *err, size_t errlen) {
    digest_ctx *d = digest_new();
    if (!d) {
        snprintf(err, errlen, "policy: out of memory");
        return -1;
    }
    int rc = 0;
    if (c->policy_file) {
        FILE *f = fopen(c->policy_file, "rb");
        if (!f) {
            snprintf(err, errlen, "policy %s: cannot open: %s", c->policy_file, strerror(errno));
            rc = -1;
        } else {
            char buf[8192];
            size_t n;
            while ((n = fread(buf, 1, sizeof buf, f)) > 0) digest_update(d, buf, n);
            fclose(f);
        }
    } else {
        digest_update(d, "embedded:" REGFACADE_VERSION, strlen("embedded:" REGFACADE_VERSION));
    }
    size_t olen = 0;
    char *opts = json_serialize(c->policy_options, &olen);
    if (opts) digest_update(d, opts, olen);
    free(opts);
    char full[DIGEST_STRING_LEN];
    if (rc == 0 && digest_final(d, full) == 0) snprintf(out, 65, "%s", full + 7);
    digest_free(d);
    return rc;
}

const char *policy_fingerprint(const policy *p) { return p->fingerprint; }

void policy_resolution_clear(policy_resolution *r) {
    for (size_t i = 0; i < r->n_layers; i++) layer_spec_clear(&r->layers[i]);
    free(r->layers);
    for (size_t i = 0; i < r->n_platforms; i++) free(r->platforms[i]);
    free(r->platforms);
    free(r->fingerprint);
    r->layers = NULL;
    r->platforms = NULL;
    r->fingerprint = NULL;
    r->n_layers = r->n_platforms = 0;
    r->has_layers = false;
}

policy *policy_new(const config *c, char *err, size_t errlen) {
    policy *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errlen, "policy: out of memory");
        return NULL;
    }
    p->cfg = c;
    pthread_mutex_init(&p->lock, NULL);
    if (compute_fingerprint(c, p->fingerprint, err, errlen) != 0) {
        policy_free(p);
        return NULL;
    }
    /* Compile once now so a broken policy is reported before any traffic. */
    lua_State *L = state_new(c, err, errlen);
    if (!L) {
        policy_free(p);
        return NULL;
    }
    p->cap = 16;
    p->idle = calloc(p->cap, sizeof *p->idle);
    if (!p->idle) {
        state_free(L);
        policy_free(p);
        snprintf(err, errlen, "policy: out of memory");
        return NULL;
    }
    p->idle[p->n_idle++] = L;
    return p;
}

void policy_free(policy *p) {
    if (!p) return;
    for (size_t i = 0; i < p->n_idle; i++) state_free(p->idle[i]);
    free(p->idle);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

static lua_State *acquire(policy *p, char *err, size_t errlen) {
    pthread_mutex_lock(&p->lock);
    lua_State *L = p->n_idle ? p->idle[--p->n_idle] : NULL;
    pthread_mutex_unlock(&p->lock);
    return L ? L : state_new(p->cfg, err, errlen);
}

static void release(policy *p, lua_State *L, int broken) {
    lua_settop(L, 0);
    if (!broken) {
        pthread_mutex_lock(&p->lock);
        if (p->n_idle == p->cap) {
            size_t cap = p->cap * 2;
            lua_State **n = realloc(p->idle, cap * sizeof *n);
            if (n) {
                p->idle = n;
                p->cap = cap;
            }
        }
        if (p->n_idle < p->cap) {
            p->idle[p->n_idle++] = L;
            L = NULL;
        }
        pthread_mutex_unlock(&p->lock);
    }
    /* A state that overran its budget may hold anything: rebuild it. */
    if (L) state_free(L);
}

static void error_set(policy_error *e, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* A Lua value from a resolve answer as JSON: strings, integers, booleans,
 * arrays (sequences) and string-keyed tables (keys sorted, so the same
 * answer gives the same text). NULL with err on anything else. */
static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static json_value *lua_to_json(lua_State *L, int idx, int depth, char *err, size_t errlen) {
    idx = lua_absindex(L, idx);
    if (depth > 16) {
        snprintf(err, errlen, "nested too deeply");
        return NULL;
    }
    switch (lua_type(L, idx)) {
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        return json_new_stringn(s, n);
    }
    case LUA_TBOOLEAN: return json_new_bool(lua_toboolean(L, idx));
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) return json_new_int64((int64_t)lua_tointeger(L, idx));
        snprintf(err, errlen, "a number that is not an integer");
        return NULL;
    case LUA_TTABLE: break;
    default:
        snprintf(err, errlen, "a %s value", luaL_typename(L, idx));
        return NULL;
    }
    lua_Integer len = (lua_Integer)lua_rawlen(L, idx);
    if (len > 0) {
        json_value *arr = json_new_array();
        for (lua_Integer i = 1; arr && i <= len; i++) {
            lua_rawgeti(L, idx, i);
            json_value *item = lua_to_json(L, -1, depth + 1, err, errlen);
            lua_pop(L, 1);
            if (!item || json_array_append(arr, item) != 0) {
                json_free(arr);
                return NULL;
            }
        }
        return arr;
    }
    size_t n = 0, cap = 8;
    char **keys = malloc(cap * sizeof *keys);
    lua_pushnil(L);
    while (keys && lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            snprintf(err, errlen, "a table with a %s key", luaL_typename(L, -1));
            lua_pop(L, 1);
            for (size_t i = 0; i < n; i++) free(keys[i]);
            free(keys);
            return NULL;
        }
        if (n == cap) {
            char **nk = realloc(keys, (cap *= 2) * sizeof *nk);
            if (!nk) break;
            keys = nk;
        }
        keys[n++] = strdup(lua_tostring(L, -1));
    }
    json_value *obj = keys ? json_new_object() : NULL;
    if (keys) qsort(keys, n, sizeof *keys, cmp_str);
    for (size_t i = 0; i < n; i++) {
        if (obj && keys[i]) {
            lua_getfield(L, idx, keys[i]);
            json_value *v = lua_to_json(L, -1, depth + 1, err, errlen);
            lua_pop(L, 1);
            if (!v || json_object_set(obj, keys[i], v) != 0) {
                json_free(obj);
                obj = NULL;
            }
        }
        free(keys[i]);
    }
    free(keys);
    return obj;
}

/* The `layers` and `platforms` of a resolve answer (table at t). 0, or -1
 * with e set. */
static int read_layers(policy *p, lua_State *L, int t, policy_resolution *out, policy_error *e) {
    lua_getfield(L, t, "layers");
    int has = !lua_isnil(L, -1);
    if (has && !lua_istable(L, -1)) {
        error_set(e, 500, "UNKNOWN", "policy resolve: layers must be a list, got %s", luaL_typename(L, -1));
        lua_pop(L, 1);
        return -1;
    }
    char err[600];
    json_value *fp = json_new_array();
    if (has) {
        size_t n = lua_rawlen(L, -1);
        out->has_layers = true;
        out->layers = calloc(n ? n : 1, sizeof *out->layers);
        if (!out->layers || !fp) {
            error_set(e, 500, "UNKNOWN", "policy resolve: out of memory");
            lua_pop(L, 1);
            json_free(fp);
            return -1;
        }
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, -1, (lua_Integer)i + 1);
            err[0] = '\0';
            json_value *v = lua_to_json(L, -1, 0, err, sizeof err);
            lua_pop(L, 1);
            char where[64];
            snprintf(where, sizeof where, "layers[%zu]", i + 1);
            if (!v) {
                error_set(e, 500, "UNKNOWN", "policy resolve: %s: %s", where, err[0] ? err : "out of memory");
                lua_pop(L, 1);
                json_free(fp);
                return -1;
            }
            int rc = layer_spec_parse(v, p->cfg->dir, where, &out->layers[i], err, sizeof err);
            if (rc == 0) {
                char *f = layer_spec_fingerprint(&out->layers[i]);
                json_array_append(fp, f ? json_new_string(f) : json_new_null());
                free(f);
            }
            json_free(v);
            if (rc != 0) {
                error_set(e, 500, "UNKNOWN", "policy resolve: %s", err);
                lua_pop(L, 1);
                json_free(fp);
                return -1;
            }
            out->n_layers = i + 1;
        }
    }
    lua_pop(L, 1);
    lua_getfield(L, t, "platforms");
    if (!lua_isnil(L, -1)) {
        if (!lua_istable(L, -1)) {
            error_set(e, 500, "UNKNOWN", "policy resolve: platforms must be a list of \"os/arch[/variant]\"");
            lua_pop(L, 1);
            json_free(fp);
            return -1;
        }
        size_t n = lua_rawlen(L, -1);
        out->platforms = calloc(n ? n : 1, sizeof *out->platforms);
        json_value *pl = json_new_array();
        for (size_t i = 0; out->platforms && i < n; i++) {
            lua_rawgeti(L, -1, (lua_Integer)i + 1);
            const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
            if (!s || !strchr(s, '/')) {
                lua_pop(L, 2);
                json_free(pl);
                json_free(fp);
                error_set(e, 500, "UNKNOWN", "policy resolve: platforms[%zu] must be \"os/arch[/variant]\"", i + 1);
                return -1;
            }
            out->platforms[i] = strdup(s);
            out->n_platforms = i + 1;
            json_array_append(pl, json_new_string(s));
            lua_pop(L, 1);
        }
        json_array_append(fp, pl);
    }
    lua_pop(L, 1);
    size_t len;
    out->fingerprint = fp ? json_serialize(fp, &len) : NULL;
    json_free(fp);
    return 0;
}

/* Arm the per-call time budget before a hook runs. */
static void arm_budget(lua_State *L) {
    run_ctx *ctx = ctx_of(L);
    clock_gettime(CLOCK_MONOTONIC, &ctx->deadline);
    ctx->deadline.tv_nsec += (long)POLICY_HOOK_BUDGET_MS * 1000000L;
    ctx->deadline.tv_sec += ctx->deadline.tv_nsec / 1000000000L;
    ctx->deadline.tv_nsec %= 1000000000L;
    ctx->tripped = 0;
}

/* Disarm it after the call; returns 1 when it tripped (the state must then
 * be rebuilt: the hook was cut at an arbitrary point). */
static int disarm_budget(lua_State *L) {
    run_ctx *ctx = ctx_of(L);
    ctx->deadline.tv_sec = 0;
    if (!ctx->tripped) return 0;
    lua_sethook(L, budget_hook, LUA_MASKCOUNT, POLICY_COUNT_HOOK_EVERY);
    return 1;
}

static void set_field_string(lua_State *L, const char *k, const char *v) {
    if (!v) return;
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void push_request(lua_State *L, const policy_request *r) {
    lua_newtable(L);
    set_field_string(L, "method", r->method);
    set_field_string(L, "kind", r->kind);
    set_field_string(L, "repository", r->repository);
    set_field_string(L, "reference", r->reference);
    set_field_string(L, "ns", r->ns);
    set_field_string(L, "host", r->host);
    lua_newtable(L);
    set_field_string(L, "ip", r->client_ip);
    set_field_string(L, "user", r->user);
    set_field_string(L, "password", r->password);
    set_field_string(L, "token", r->token);
    lua_setfield(L, -2, "client");
    lua_newtable(L);
    for (size_t i = 0; i < r->n_headers; i++) set_field_string(L, r->headers[i].name, r->headers[i].value);
    lua_setfield(L, -2, "headers");
    /* req.spec: the spec the spec hook named (specs.h), in regfacade.json's shape. */
    if (r->spec && lua_json_push(L, r->spec) == 0) lua_setfield(L, -2, "spec");
}

static void error_set(policy_error *e, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void error_set(policy_error *e, int status, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    e->status = status;
    snprintf(e->code, sizeof e->code, "%s", code);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

static const char *table_string(lua_State *L, int idx, const char *key) {
    lua_getfield(L, idx, key);
    const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    lua_pop(L, 1); /* the string stays alive: the table still references it */
    return s;
}

/* The policy's refusal: nil, "message" or nil, {status=, code=, message=}. */
static void policy_refusal(lua_State *L, int idx, policy_error *e) {
    if (lua_type(L, idx) == LUA_TSTRING) {
        error_set(e, 404, "NAME_UNKNOWN", "%s", lua_tostring(L, idx));
    } else if (lua_istable(L, idx)) {
        lua_getfield(L, idx, "status");
        lua_Integer st = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : 404;
        lua_pop(L, 1);
        const char *code = table_string(L, idx, "code");
        const char *msg = table_string(L, idx, "message");
        if (st < 400 || st > 599) st = 404;
        error_set(e, (int)st, code ? code : "DENIED", "%s", msg ? msg : "refused by policy");
    } else {
        error_set(e, 404, "NAME_UNKNOWN", "refused by policy");
    }
}

int policy_resolve(policy *p, const policy_request *req, policy_resolution *out, policy_error *e) {
    char err[1024];
    memset(out, 0, sizeof *out);
    lua_State *L = acquire(p, err, sizeof err);
    if (!L) {
        error_set(e, 500, "UNKNOWN", "%s", err);
        return -1;
    }
    int rc = -1, broken = 0;
    lua_pushcfunction(L, traceback);
    lua_getfield(L, LUA_REGISTRYINDEX, "regfacade.hooks");
    lua_getfield(L, -1, "resolve");
    if (lua_isnil(L, -1)) {
        if (!p->cfg->default_upstream) {
            error_set(e, 404, "NAME_UNKNOWN", "no resolve hook and no default_upstream for %s", req->repository);
        } else {
            snprintf(out->upstream, sizeof out->upstream, "%s", p->cfg->default_upstream);
            snprintf(out->repository, sizeof out->repository, "%s", req->repository);
            snprintf(out->reference, sizeof out->reference, "%s", req->reference ? req->reference : "");
            rc = 0;
        }
        release(p, L, 0);
        return rc;
    }
    push_request(L, req);
    arm_budget(L);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* resolve(req, spec): the same table as req.spec, when there is one. */
    int nargs = 1;
    if (req->spec) {
        lua_getfield(L, -1, "spec");
        nargs = 2;
    }
    int status = lua_pcall(L, nargs, 2, 1);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    int tripped = ctx_of(L)->tripped;
    metrics_policy_hook("resolve", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9,
                        tripped ? "budget" : status != LUA_OK ? "error" : lua_isnil(L, -2) ? "refused" : "ok");
    broken = disarm_budget(L);
    if (status != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        log_error("policy resolve failed for %s: %s", req->repository, msg ? msg : "(non-string error)");
        char first[512];
        snprintf(first, sizeof first, "%s", msg ? msg : "(non-string error)");
        first[strcspn(first, "\n")] = '\0';
        error_set(e, 500, "UNKNOWN", "policy resolve failed: %s", first);
        broken = broken || status == LUA_ERRMEM;
    } else if (lua_isnil(L, -2)) {
        policy_refusal(L, lua_gettop(L), e);
    } else if (!lua_istable(L, -2)) {
        error_set(e, 500, "UNKNOWN", "policy resolve must return a table or nil, error; got %s",
                  luaL_typename(L, -2));
    } else {
        int t = lua_gettop(L) - 1;
        const char *up = table_string(L, t, "upstream");
        const char *repo = table_string(L, t, "repository");
        const char *ref = table_string(L, t, "reference");
        if (!up) up = p->cfg->default_upstream;
        if (!repo) repo = req->repository;
        if (!ref) ref = req->reference;
        if (!up || !config_find_upstream(p->cfg, up)) {
            error_set(e, 500, "UNKNOWN", "policy resolve returned upstream \"%s\", which is not configured",
                      up ? up : "(none)");
        } else if (!repo || !ref_valid_name(repo)) {
            error_set(e, 500, "UNKNOWN", "policy resolve returned an invalid repository \"%s\"",
                      repo ? repo : "(none)");
        } else if (ref && !ref_valid_tag(ref) && !ref_valid_digest(ref)) {
            error_set(e, 500, "UNKNOWN", "policy resolve returned an invalid reference \"%s\"", ref);
        } else {
            snprintf(out->upstream, sizeof out->upstream, "%s", up);
            snprintf(out->repository, sizeof out->repository, "%s", repo);
            snprintf(out->reference, sizeof out->reference, "%s", ref ? ref : "");
            rc = read_layers(p, L, t, out, e);
            if (rc != 0) policy_resolution_clear(out);
        }
    }
    release(p, L, broken);
    return rc;
}

int policy_spec_lookup(policy *p, const policy_request *req, char *provider, size_t plen, char *id, size_t idlen,
                       policy_error *e) {
    char err[1024];
    lua_State *L = acquire(p, err, sizeof err);
    if (!L) {
        error_set(e, 500, "UNKNOWN", "%s", err);
        return -1;
    }
    lua_pushcfunction(L, traceback);
    lua_getfield(L, LUA_REGISTRYINDEX, "regfacade.hooks");
    lua_getfield(L, -1, "spec");
    if (lua_isnil(L, -1)) {
        release(p, L, 0);
        return 0;
    }
    push_request(L, req);
    arm_budget(L);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int status = lua_pcall(L, 1, 2, 1);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    int tripped = ctx_of(L)->tripped;
    metrics_policy_hook("spec", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9,
                        tripped ? "budget" : status != LUA_OK ? "error"
                                         : lua_isnil(L, -2) && !lua_isnil(L, -1) ? "refused" : "ok");
    int broken = disarm_budget(L);
    int rc = -1;
    if (status != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        log_error("policy spec failed for %s: %s", req->repository, msg ? msg : "(non-string error)");
        char first[512];
        snprintf(first, sizeof first, "%s", msg ? msg : "(non-string error)");
        first[strcspn(first, "\n")] = '\0';
        error_set(e, 500, "UNKNOWN", "policy spec failed: %s", first);
        broken = broken || status == LUA_ERRMEM;
    } else if (lua_isnil(L, -2)) {
        if (lua_isnil(L, -1)) rc = 0; /* no spec: resolve(req) as without specs */
        else policy_refusal(L, lua_gettop(L), e);
    } else if (!lua_istable(L, -2)) {
        error_set(e, 500, "UNKNOWN", "policy spec must return { provider = NAME, id = ID } or nil; got %s",
                  luaL_typename(L, -2));
    } else {
        int t = lua_gettop(L) - 1;
        const char *pv = table_string(L, t, "provider");
        const char *iv = table_string(L, t, "id");
        if (!pv || !*pv || !iv) {
            error_set(e, 500, "UNKNOWN", "policy spec must return { provider = NAME, id = ID }: %s is not a string",
                      !pv || !*pv ? "provider" : "id");
        } else {
            snprintf(provider, plen, "%s", pv);
            snprintf(id, idlen, "%s", iv);
            rc = 1;
        }
    }
    release(p, L, broken);
    return rc;
}

bool policy_has_rewrite(policy *p) {
    char err[256];
    lua_State *L = acquire(p, err, sizeof err);
    if (!L) return false;
    lua_getfield(L, LUA_REGISTRYINDEX, "regfacade.hooks");
    lua_getfield(L, -1, "rewrite");
    bool has = lua_isfunction(L, -1);
    release(p, L, 0);
    return has;
}

int policy_rewrite(policy *p, const policy_request *req, json_value **manifest, json_value **config,
                   const image_layer *stack, size_t n, policy_error *e) {
    char err[1024];
    lua_State *L = acquire(p, err, sizeof err);
    if (!L) {
        error_set(e, 500, "UNKNOWN", "%s", err);
        return -1;
    }
    lua_getfield(L, LUA_REGISTRYINDEX, "regfacade.hooks");
    lua_getfield(L, -1, "rewrite");
    if (lua_isnil(L, -1)) {
        release(p, L, 0);
        return 0;
    }
    int fn = lua_gettop(L);
    push_request(L, req);
    int rq = lua_gettop(L);
    arm_budget(L);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = image_rewrite_run(L, fn, rq, manifest, config, stack, n, err, sizeof err);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    int tripped = ctx_of(L)->tripped;
    metrics_policy_hook("rewrite", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9,
                        tripped ? "budget" : rc != 0 ? "error" : "ok");
    int broken = disarm_budget(L);
    if (rc != 0) {
        log_error("policy rewrite failed for %s: %s", req->repository, err);
        char first[768];
        snprintf(first, sizeof first, "%s", err);
        first[strcspn(first, "\n")] = '\0';
        error_set(e, 500, "UNKNOWN", "policy %s", first);
    }
    release(p, L, broken);
    return rc;
}
