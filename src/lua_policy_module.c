/*
 * lua_policy_module: `regfacade.policy`, a Lua C module for busted
 * (build/lua/regfacade/policy.so, mk/lua_policy.mk) that runs a policy
 * through the server's own code: the config is loaded by config.c, the
 * policy compiled and checked by policy_new (its sandboxed states, budgets,
 * phase checks, self_check), and every hook's answer read and validated by
 * policy_authorize, policy_spec_lookup, policy_resolve and policy_rewrite,
 * the functions the server calls. The assembly is generate_assemble, the
 * one generate_image runs, so digests are the ones `serve` produces.
 * regfacade.testing (testing.policy) is its front door.
 *
 *   local P = require "regfacade.policy"
 *   local pol = P.new{ file = "policy.lua",
 *                      config = { upstreams = {...}, ... } or "config.json",
 *                      options = {...} }       -- policy.options (replaces)
 *     -> pol, or raises "regfacade.policy: <why>" (config and load errors
 *        as the server gives them: FILE:LINE)
 *   pol:authorize(req)  -> { allowed = true [, credentials =] }
 *                        | { allowed = false, status =, code =, message =
 *                            [, challenge =, retry_after =] }
 *   pol:spec(req)       -> { provider =, id = } | false | refusal
 *   pol:resolve(req)    -> { upstream =, repository =, reference =,
 *                            credentials =, layers = { {kind=, ...} },
 *                            platforms =, fingerprint = } | refusal
 *   pol:assemble(req, base_manifest_text, base_config_text, stack)
 *                       -> { manifest_text =, config_text =,
 *                            manifest_digest =, config_digest =,
 *                            unchanged = } | refusal
 *   pol:log(req, res)   runs the log hook (its errors are logged)
 *   pol:close()         frees it now (else when collected). Policies alive
 *                       at once share regfacade.shared, as the server's
 *                       generations do (one dictionary per process)
 * A refusal is { allowed = false, status =, code =, message =, ... }; an
 * answer the server would give as a policy failure (a Lua error, a budget,
 * a malformed answer, a resolve naming an upstream or credential set the
 * config lacks) has failed = true as well.
 *
 * req is a table as testing.request makes it (method, kind, repository,
 * reference, ns, host, client = { ip, user, password, token }, headers,
 * ctx, credentials, spec). Like the server, hooks share req.ctx and
 * authorize's credential set: each call writes them back into req.ctx and
 * req.credentials.
 */
#include <lauxlib.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "regfacade/config.h"
#include "regfacade/generate.h"
#include "regfacade/json.h"
#include "regfacade/lua_core.h"
#include "regfacade/lua_json.h"
#include "regfacade/policy.h"

int luaopen_regfacade_policy(lua_State *L);

#define POLICY_MT "regfacade.policy.instance"
#define REQUEST_MT "regfacade.policy.request"

typedef struct {
    config *cfg;
    policy *pol;
} instance;

static int l_gc(lua_State *L) {
    instance *in = luaL_checkudata(L, 1, POLICY_MT);
    policy_free(in->pol);
    config_free(in->cfg);
    in->pol = NULL;
    in->cfg = NULL;
    return 0;
}

static int l_close(lua_State *L) { return l_gc(L); }

static instance *check(lua_State *L) {
    instance *in = luaL_checkudata(L, 1, POLICY_MT);
    if (!in->pol) luaL_error(L, "regfacade.policy: closed");
    return in;
}

/* The Lua value at idx as a JSON tree (raises). */
static json_value *tree_of(lua_State *L, int idx, const char *what) {
    char err[512];
    json_value *v = lua_json_to_tree(L, idx, err, sizeof err);
    if (!v) luaL_error(L, "regfacade.policy: %s: %s", what, err);
    return v;
}

/* The whole file as a JSON tree (raises, naming FILE:LINE:COLUMN). */
static json_value *tree_of_file(lua_State *L, const char *path) {
    size_t len = 0;
    char *text = config_read_file(path, 4u << 20, &len);
    if (!text) luaL_error(L, "regfacade.policy: %s: cannot read", path);
    json_error je;
    json_value *v = json_parse_strict(text, len, 32, &je);
    free(text);
    if (!v) luaL_error(L, "regfacade.policy: %s:%u:%u: %s", path, je.line, je.column, je.message);
    return v;
}

/* root.key, an object (created when absent). NULL when it is not one. */
static json_value *object_member(json_value *root, const char *key) {
    json_value *v = json_object_get(root, key);
    if (!v) {
        v = json_new_object();
        if (!v || json_object_set(root, key, v) != 0) return NULL;
    }
    return v->type == JSON_OBJECT ? v : NULL;
}

/* P.new{ file =, config =, options = } */
static int l_new(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    static const char *const keys[] = {"file", "config", "options", NULL};
    lua_pushnil(L);
    while (lua_next(L, 1) != 0) {
        lua_pop(L, 1);
        bool ok = false;
        for (const char *const *k = keys; *k && !ok; k++)
            ok = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), *k) == 0;
        if (!ok)
            return luaL_error(L, "regfacade.policy.new: unknown option \"%s\" (known: file, config, options)",
                              lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1));
    }
    lua_getfield(L, 1, "file");
    const char *file = luaL_checkstring(L, -1);
    char policy_abs[PATH_MAX];
    if (!realpath(file, policy_abs)) return luaL_error(L, "regfacade.policy: %s: cannot open", file);

    /* The config document: a file (its folder is where relative paths
     * resolve), a table (the policy's folder is), or the default mirror. */
    char cfg_abs[PATH_MAX], dir[PATH_MAX];
    json_value *root;
    lua_getfield(L, 1, "config");
    if (lua_type(L, -1) == LUA_TSTRING) {
        if (!realpath(lua_tostring(L, -1), cfg_abs))
            return luaL_error(L, "regfacade.policy: %s: cannot open", lua_tostring(L, -1));
        root = tree_of_file(L, cfg_abs);
        snprintf(dir, sizeof dir, "%s", cfg_abs);
    } else {
        if (lua_isnil(L, -1)) {
            lua_newtable(L);
            lua_replace(L, -2);
        }
        luaL_checktype(L, -1, LUA_TTABLE);
        root = tree_of(L, -1, "config");
        snprintf(cfg_abs, sizeof cfg_abs, "%s (testing.policy config)", policy_abs);
        snprintf(dir, sizeof dir, "%s", policy_abs);
    }
    lua_pop(L, 1);
    if (root->type != JSON_OBJECT) {
        json_free(root);
        return luaL_error(L, "regfacade.policy: config must be an object");
    }
    /* What a spec need not say: where the (unused) cache would be, and an
     * upstream when it names none (Docker Hub, as the embedded default). */
    json_value *cache = object_member(root, "cache");
    if (cache && !json_object_get(cache, "dir")) json_object_set(cache, "dir", json_new_string("/nonexistent/cache"));
    if (!json_object_get(root, "upstreams")) {
        json_value *ups = object_member(root, "upstreams");
        json_value *hub = json_new_object();
        json_object_set(hub, "url", json_new_string("https://registry-1.docker.io"));
        json_object_set(ups, "hub", hub);
        if (!json_object_get(root, "default_upstream"))
            json_object_set(root, "default_upstream", json_new_string("hub"));
    }
    json_value *pol = object_member(root, "policy");
    if (!cache || !pol) {
        json_free(root);
        return luaL_error(L, "regfacade.policy: config: cache and policy must be objects");
    }
    json_object_set(pol, "file", json_new_string(policy_abs));
    lua_getfield(L, 1, "options");
    if (!lua_isnil(L, -1)) {
        luaL_checktype(L, -1, LUA_TTABLE);
        char err[512];
        json_value *opts = lua_json_to_tree(L, -1, err, sizeof err);
        if (!opts) {
            json_free(root);
            return luaL_error(L, "regfacade.policy: options: %s", err);
        }
        json_object_set(pol, "options", opts);
    }
    lua_pop(L, 1);

    instance *in = lua_newuserdatauv(L, sizeof *in, 0);
    memset(in, 0, sizeof *in);
    luaL_setmetatable(L, POLICY_MT);
    char err[2048];
    in->cfg = config_load_tree(root, cfg_abs, cfg_abs, dirname(dir), err, sizeof err);
    json_free(root);
    if (!in->cfg) return luaL_error(L, "regfacade.policy: %s", err);
    in->pol = policy_new(in->cfg, err, sizeof err);
    if (!in->pol) return luaL_error(L, "regfacade.policy: %s", err);
    return 1;
}

/* ---------- requests ---------- */

/* What a policy_request points into, freed by the userdata's __gc. */
typedef struct {
    policy_request r;
    policy_state state;
    policy_header *headers;
    json_value *spec;
} request_box;

static int request_gc(lua_State *L) {
    request_box *b = luaL_checkudata(L, 1, REQUEST_MT);
    policy_state_clear(&b->state);
    free(b->headers);
    json_free(b->spec);
    b->headers = NULL;
    b->spec = NULL;
    return 0;
}

/* t[k] as a string anchored in t, or NULL. */
static const char *field(lua_State *L, int t, const char *k) {
    lua_getfield(L, t, k);
    const char *s = NULL;
    if (lua_type(L, -1) == LUA_TSTRING)
        s = lua_tostring(L, -1);
    else if (!lua_isnil(L, -1))
        luaL_error(L, "regfacade.policy: req.%s must be a string, got %s", k, luaL_typename(L, -1));
    lua_pop(L, 1);
    return s;
}

/* The req table at idx as a policy_request; the box is pushed (keep it
 * on the stack for the call). */
static request_box *read_request(lua_State *L, int idx) {
    idx = lua_absindex(L, idx);
    luaL_checktype(L, idx, LUA_TTABLE);
    request_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    memset(b, 0, sizeof *b);
    if (luaL_newmetatable(L, REQUEST_MT)) {
        lua_pushcfunction(L, request_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    policy_request *r = &b->r;
    r->method = field(L, idx, "method");
    r->kind = field(L, idx, "kind");
    r->repository = field(L, idx, "repository");
    r->reference = field(L, idx, "reference");
    r->ns = field(L, idx, "ns");
    r->host = field(L, idx, "host");
    if (!r->method) r->method = "GET";
    if (!r->kind) r->kind = "manifest";
    if (lua_getfield(L, idx, "client") == LUA_TTABLE) {
        int c = lua_gettop(L);
        r->client_ip = field(L, c, "ip");
        r->user = field(L, c, "user");
        r->password = field(L, c, "password");
        r->token = field(L, c, "token");
    }
    lua_pop(L, 1); /* anchored in req */
    if (!r->client_ip) r->client_ip = "127.0.0.1";
    if (lua_getfield(L, idx, "headers") == LUA_TTABLE) {
        int h = lua_gettop(L);
        size_t n = 0;
        for (lua_pushnil(L); lua_next(L, h) != 0; lua_pop(L, 1)) n++;
        b->headers = calloc(n ? n : 1, sizeof *b->headers);
        if (!b->headers) luaL_error(L, "regfacade.policy: out of memory");
        for (lua_pushnil(L); lua_next(L, h) != 0; lua_pop(L, 1)) {
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "regfacade.policy: req.headers must map names to strings");
            b->headers[r->n_headers].name = lua_tostring(L, -2);
            b->headers[r->n_headers++].value = lua_tostring(L, -1);
        }
        r->headers = b->headers;
    }
    lua_pop(L, 1);
    if (lua_getfield(L, idx, "ctx") == LUA_TTABLE) {
        lua_pushnil(L);
        if (lua_next(L, -2) != 0) {
            lua_pop(L, 2);
            b->state.ctx = tree_of(L, -1, "req.ctx");
        }
    }
    lua_pop(L, 1);
    /* req.target given (raw: not built): where resolve sent the request,
     * as the server gives it to rewrite and log. */
    lua_pushliteral(L, "target");
    if (lua_rawget(L, idx) == LUA_TTABLE) {
        int t = lua_gettop(L);
        r->target_upstream = field(L, t, "upstream");
        r->target_repository = field(L, t, "repository");
    }
    lua_pop(L, 1); /* anchored in req */
    const char *creds = field(L, idx, "credentials");
    if (creds) snprintf(b->state.credentials, sizeof b->state.credentials, "%s", creds);
    if (lua_getfield(L, idx, "spec") == LUA_TTABLE) {
        b->spec = tree_of(L, -1, "req.spec");
        r->spec = b->spec;
    }
    lua_pop(L, 1);
    r->state = &b->state;
    return b;
}

/* req.ctx and req.credentials as the hook left them (the next hook sees
 * them, as in the server). */
static void write_back(lua_State *L, int req, const request_box *b) {
    if (!b->state.ctx || lua_json_push(L, b->state.ctx) != 0) lua_newtable(L);
    lua_setfield(L, req, "ctx");
    if (b->state.credentials[0])
        lua_pushstring(L, b->state.credentials);
    else
        lua_pushnil(L);
    lua_setfield(L, req, "credentials");
}

static void set_str(lua_State *L, const char *k, const char *v) {
    if (!v || !*v) return;
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

/* A refusal or failure as the client would get it. */
static int push_refusal(lua_State *L, const policy_error *e) {
    lua_createtable(L, 0, 8);
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "allowed");
    lua_pushinteger(L, e->status);
    lua_setfield(L, -2, "status");
    set_str(L, "code", e->code);
    set_str(L, "message", e->message);
    set_str(L, "challenge", e->challenge);
    if (e->retry_after[0]) {
        lua_pushinteger(L, strtol(e->retry_after, NULL, 10));
        lua_setfield(L, -2, "retry_after");
    }
    if (e->failed) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "failed");
    }
    return 1;
}

static int l_authorize(lua_State *L) {
    instance *in = check(L);
    lua_settop(L, 2);
    request_box *b = read_request(L, 2);
    policy_error e;
    memset(&e, 0, sizeof e);
    int rc = policy_authorize(in->pol, &b->r, &e);
    write_back(L, 2, b);
    if (rc != 0) return push_refusal(L, &e);
    lua_createtable(L, 0, 2);
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "allowed");
    set_str(L, "credentials", b->state.credentials);
    return 1;
}

static int l_spec(lua_State *L) {
    instance *in = check(L);
    lua_settop(L, 2);
    request_box *b = read_request(L, 2);
    policy_error e;
    memset(&e, 0, sizeof e);
    char provider[256], id[512];
    int rc = policy_spec_lookup(in->pol, &b->r, provider, sizeof provider, id, sizeof id, &e);
    write_back(L, 2, b);
    if (rc < 0) return push_refusal(L, &e);
    if (rc == 0) {
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_createtable(L, 0, 2);
    set_str(L, "provider", provider);
    set_str(L, "id", id);
    return 1;
}

static const char *const KIND_NAMES[] = {"base", "named", "file", "image", "blob"};

static void push_layer_spec(lua_State *L, const layer_spec *s) {
    lua_createtable(L, 0, 8);
    set_str(L, "kind", KIND_NAMES[s->kind]);
    set_str(L, "name", s->name);
    set_str(L, "file", s->file);
    set_str(L, "image", s->image);
    if (s->kind == LAYER_IMAGE) {
        lua_pushinteger(L, s->skip);
        lua_setfield(L, -2, "skip");
    }
    set_str(L, "digest", s->digest);
    if (s->kind == LAYER_BLOB) {
        lua_pushinteger(L, (lua_Integer)s->size);
        lua_setfield(L, -2, "size");
    }
    set_str(L, "media_type", s->media_type);
    set_str(L, "diff_id", s->diff_id);
    set_str(L, "upstream", s->upstream);
    set_str(L, "repository", s->repository);
    if (s->urls && lua_json_push(L, s->urls) == 0) lua_setfield(L, -2, "urls");
    set_str(L, "created_by", s->created_by);
    set_str(L, "comment", s->comment);
    if (s->n_platforms) {
        lua_createtable(L, (int)s->n_platforms, 0);
        for (size_t i = 0; i < s->n_platforms; i++) {
            lua_pushstring(L, s->platforms[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        lua_setfield(L, -2, "platforms");
    }
}

static int l_resolve(lua_State *L) {
    instance *in = check(L);
    lua_settop(L, 2);
    request_box *b = read_request(L, 2);
    policy_error e;
    memset(&e, 0, sizeof e);
    policy_resolution res;
    int rc = policy_resolve(in->pol, &b->r, &res, &e);
    write_back(L, 2, b);
    if (rc != 0) return push_refusal(L, &e);
    lua_createtable(L, 0, 8);
    char *at = strchr(res.upstream, '@');
    if (at) {
        set_str(L, "credentials", at + 1);
        *at = '\0';
    }
    set_str(L, "upstream", res.upstream);
    set_str(L, "repository", res.repository);
    lua_pushstring(L, res.reference); /* "" for tags lists */
    lua_setfield(L, -2, "reference");
    set_str(L, "fingerprint", res.fingerprint);
    if (res.has_layers) {
        lua_createtable(L, (int)res.n_layers, 0);
        for (size_t i = 0; i < res.n_layers; i++) {
            push_layer_spec(L, &res.layers[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        lua_setfield(L, -2, "layers");
    }
    if (res.platforms) {
        lua_createtable(L, (int)res.n_platforms, 0);
        for (size_t i = 0; i < res.n_platforms; i++) {
            lua_pushstring(L, res.platforms[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        lua_setfield(L, -2, "platforms");
    }
    policy_resolution_clear(&res);
    return 1;
}

/* Owns the base documents and the assembled bytes of one l_assemble. */
#define ASSEMBLY_MT "regfacade.policy.assembly"
typedef struct {
    json_value *base, *cfg;
    char *manifest, *config;
} assembly;

static int assembly_gc(lua_State *L) {
    assembly *a = luaL_checkudata(L, 1, ASSEMBLY_MT);
    json_free(a->base);
    json_free(a->cfg);
    free(a->manifest);
    free(a->config);
    memset(a, 0, sizeof *a);
    return 0;
}

static json_value *parse_text(lua_State *L, const char *text, size_t len, const char *what) {
    char err[256];
    json_value *v = json_parse(text, len, JSON_DEFAULT_MAX_DEPTH, err, sizeof err);
    if (!v) luaL_error(L, "regfacade.policy: %s: %s", what, err);
    return v;
}

/* pol:assemble(req, base_manifest_text, base_config_text, stack) */
static int l_assemble(lua_State *L) {
    instance *in = check(L);
    lua_settop(L, 5);
    size_t mlen, clen;
    const char *mtext = luaL_checklstring(L, 3, &mlen);
    const char *ctext = luaL_checklstring(L, 4, &clen);
    request_box *b = read_request(L, 2);              /* 6 */
    assembly *a = lua_newuserdatauv(L, sizeof *a, 0); /* 7 */
    memset(a, 0, sizeof *a);
    if (luaL_newmetatable(L, ASSEMBLY_MT)) {
        lua_pushcfunction(L, assembly_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    a->base = parse_text(L, mtext, mlen, "base manifest");
    a->cfg = parse_text(L, ctext, clen, "base config");
    size_t n;
    const image_layer *stack = lua_core_stack(L, 5, &n); /* 8: owns the layers */
    fetch_error e;
    memset(&e, 0, sizeof e);
    size_t ml = 0, cl = 0;
    char md[80] = "", cd[80] = "";
    bool unchanged = false, failed = false;
    int rc = generate_assemble(in->pol, &b->r, b->r.repository ? b->r.repository : "the image", a->base, mtext, mlen,
                               a->cfg, stack, n, &a->manifest, &ml, md, &a->config, &cl, cd, &unchanged, &failed, &e);
    write_back(L, 2, b);
    if (rc != 0) {
        policy_error pe;
        policy_error_set(&pe, e.http_status, e.code ? e.code : "UNKNOWN", "%s", e.message);
        snprintf(pe.challenge, sizeof pe.challenge, "%s", e.challenge);
        snprintf(pe.retry_after, sizeof pe.retry_after, "%s", e.retry_after);
        pe.failed = failed;
        return push_refusal(L, &pe);
    }
    lua_createtable(L, 0, 5);
    lua_pushlstring(L, a->manifest, ml);
    lua_setfield(L, -2, "manifest_text");
    if (unchanged) {
        /* the upstream's own config, named by the base manifest */
        lua_pushvalue(L, 4);
        lua_setfield(L, -2, "config_text");
        set_str(L, "config_digest", json_object_get_string(json_object_get(a->base, "config"), "digest"));
    } else {
        lua_pushlstring(L, a->config, cl);
        lua_setfield(L, -2, "config_text");
        set_str(L, "config_digest", cd);
    }
    set_str(L, "manifest_digest", md);
    lua_pushboolean(L, unchanged);
    lua_setfield(L, -2, "unchanged");
    return 1;
}

/* pol:log(req, res): res = { status =, bytes =, completed =, upstream = } */
static int l_log(lua_State *L) {
    instance *in = check(L);
    lua_settop(L, 3);
    request_box *b = read_request(L, 2);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    policy_log_entry *le = policy_log_begin(in->pol, &b->r, &t0);
    if (!le) return luaL_error(L, "regfacade.policy: the policy has no log hook");
    unsigned status = 200;
    lua_Integer bytes = 0;
    bool completed = true;
    const char *upstream = NULL;
    if (lua_istable(L, 3)) {
        lua_getfield(L, 3, "status");
        status = (unsigned)luaL_optinteger(L, -1, 200);
        lua_getfield(L, 3, "bytes");
        bytes = luaL_optinteger(L, -1, 0);
        lua_getfield(L, 3, "completed");
        completed = lua_isnil(L, -1) || lua_toboolean(L, -1);
        lua_pop(L, 3);
        upstream = field(L, 3, "upstream");
    }
    policy_log_end(le, status, (uint64_t)bytes, completed, upstream);
    return 0;
}

int luaopen_regfacade_policy(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"authorize", l_authorize}, {"spec", l_spec}, {"resolve", l_resolve}, {"assemble", l_assemble}, {"log", l_log},
        {"close", l_close},         {NULL, NULL}};
    if (luaL_newmetatable(L, POLICY_MT)) {
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    static const luaL_Reg fns[] = {{"new", l_new}, {NULL, NULL}};
    luaL_newlib(L, fns);
    return 1;
}
