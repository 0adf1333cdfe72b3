/*
 * lua_sandbox_module: `regfacade.sandbox`, a Lua C module for busted
 * (build/lua/regfacade/sandbox.so, mk/lua_sandbox.mk): it builds the very
 * sandbox the server runs policies in (lua_sandbox.c, lua_regfacade.c,
 * lua_shared.c), as a separate Lua state, so specs can attack it and run
 * policies under the real limits.
 *
 *   local sandbox = require "regfacade.sandbox"
 *   local sb = sandbox.new{
 *       source = "return { resolve = function(req) ... end }",  -- or
 *       file = "examples/mirror.lua",
 *       config = { upstreams = {...}, default_upstream = ..., options = {...} },
 *       memory_bytes =, hook_instructions =, hook_time_ms =,
 *       data_files = { ... }, data_dir =, base_dir =, shared_bytes = }
 *     -> sb, or raises "sandbox.new: <why>" (a load error names file:line)
 *   sb:call(hook, arg1, ...)   runs policy[hook](...) in that hook's phase,
 *                              under the budget; arguments and results are
 *                              copied as JSON values (strings, numbers,
 *                              booleans, tables, json.null)
 *     -> true, results...  |  false, outcome, message
 *        outcome: "error", "time", "instructions", "memory"
 *   sb:run(code [, phase])     runs a chunk of code in phase (default
 *                              "resolve"); same returns as call
 *   sb:broken()                true once a call was stopped by a budget
 *   sb:memory()                bytes the state holds, and its cap
 *   sb:close()
 *   sandbox.shared([cap_bytes])  a new regfacade.shared dictionary (the C
 *                                one) usable from busted directly
 *   sandbox.crypt_verify(password, hash)  regfacade.crypt_verify, callable
 *                                from busted (no hook check there)
 *   sandbox.deny(status, code, message [, opts])  regfacade.deny (lua_deny.h)
 *   sandbox.refusal(v [, default_status])  v read as the server reads a
 *                                hook's refusal: { deny = true, status =,
 *                                code =, message = [, challenge =,
 *                                retry_after =] }, or nil, why
 *   sandbox.is_deny(v)           true for a deny value (or sb:call's copy)
 * A deny value a hook returns comes out of sb:call as its fields (the
 * table sandbox.refusal gives).
 * Unknown option keys are errors.
 */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "regfacade/json.h"
#include "regfacade/lua_deny.h"
#include "regfacade/lua_json.h"
#include "regfacade/lua_regfacade.h"
#include "regfacade/lua_sandbox.h"
#include "regfacade/lua_shared.h"

int luaopen_regfacade_sandbox(lua_State *L);

#define SANDBOX_MT "regfacade.sandbox.instance"

typedef struct {
    lua_State *S;
    json_value *config;
    shared_dict *shared;
    lua_regfacade_host host;
    lua_sandbox_module modules[3];
} instance;

static void instance_clear(instance *in) {
    if (in->S) lua_sandbox_close(in->S);
    in->S = NULL;
    json_free(in->config);
    in->config = NULL;
    shared_dict_free(in->shared);
    in->shared = NULL;
}

static int l_gc(lua_State *L) {
    instance_clear(luaL_checkudata(L, 1, SANDBOX_MT));
    return 0;
}

static instance *check(lua_State *L) {
    instance *in = luaL_checkudata(L, 1, SANDBOX_MT);
    if (!in->S) luaL_error(L, "sandbox: closed");
    return in;
}

static const char *const NEW_KEYS[] = {
    "source",   "file",         "config", "memory_bytes", "hook_instructions", "hook_time_ms", "data_files", "data_dir",
    "base_dir", "shared_bytes", NULL};

static lua_Integer opt_int(lua_State *L, const char *k, lua_Integer dflt) {
    lua_getfield(L, 1, k);
    lua_Integer v = lua_isnil(L, -1) ? dflt : luaL_checkinteger(L, -1);
    lua_pop(L, 1);
    return v;
}

static const char *opt_str(lua_State *L, const char *k) {
    lua_getfield(L, 1, k);
    const char *v = lua_isnil(L, -1) ? NULL : luaL_checkstring(L, -1);
    lua_pop(L, 1); /* anchored in the options table */
    return v;
}

/* Copies the value at idx of `from` into `to` as JSON. 0, or -1 with err. */
static int copy_value(lua_State *from, int idx, lua_State *to, char *err, size_t errlen) {
    if (lua_isnoneornil(from, idx)) {
        lua_pushnil(to);
        return 0;
    }
    const lua_deny *d = lua_deny_get(from, idx);
    if (d) {
        /* A refusal comes out as its fields (sandbox.refusal reads them). */
        lua_deny_push_table(to, d);
        return 0;
    }
    json_value *v = lua_json_to_tree(from, idx, err, errlen);
    if (!v) return -1;
    int rc = lua_json_push(to, v);
    json_free(v);
    if (rc != 0) snprintf(err, errlen, "nested too deeply");
    return rc;
}

static int l_new(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 1) != 0) {
        lua_pop(L, 1);
        bool ok = false;
        for (const char *const *k = NEW_KEYS; *k && !ok; k++)
            ok = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), *k) == 0;
        if (!ok)
            return luaL_error(L, "sandbox.new: unknown option \"%s\"", lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
    }
    instance *in = lua_newuserdatauv(L, sizeof *in, 0);
    memset(in, 0, sizeof *in);
    luaL_setmetatable(L, SANDBOX_MT);
    int self = lua_gettop(L);

    char err[2048];
    lua_getfield(L, 1, "config");
    if (lua_isnil(L, -1)) {
        in->config = json_new_object();
    } else {
        in->config = lua_json_to_tree(L, -1, err, sizeof err);
        if (!in->config) return luaL_error(L, "sandbox.new: config: %s", err);
    }
    lua_pop(L, 1);
    if (!json_object_get(in->config, "upstreams")) json_object_set(in->config, "upstreams", json_new_object());
    if (!json_object_get(in->config, "options")) json_object_set(in->config, "options", json_new_object());
    in->shared = shared_dict_new((size_t)opt_int(L, "shared_bytes", SHARED_DEFAULT_BYTES));
    in->host = (lua_regfacade_host){.config = in->config, .shared = in->shared};
    size_t nm = lua_regfacade_modules(&in->host, in->modules);

    const char *file = opt_str(L, "file");
    const char *source = opt_str(L, "source");
    if (!file == !source) return luaL_error(L, "sandbox.new: give exactly one of source and file");
    char dir[4096] = ".";
    if (file) {
        snprintf(dir, sizeof dir, "%s", file);
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = '\0';
        else
            snprintf(dir, sizeof dir, ".");
    }
    const char *files[64];
    size_t n_files = 0;
    lua_getfield(L, 1, "data_files");
    if (!lua_isnil(L, -1)) {
        luaL_checktype(L, -1, LUA_TTABLE);
        for (lua_Integer i = 1; i <= (lua_Integer)lua_rawlen(L, -1) && n_files < 64; i++) {
            lua_rawgeti(L, -1, i);
            files[n_files++] = luaL_checkstring(L, -1);
            lua_pop(L, 1); /* anchored in the list */
        }
    }
    lua_pop(L, 1);
    lua_sandbox_options o = {
        .memory_bytes = (size_t)opt_int(L, "memory_bytes", SB_DEFAULT_MEMORY_BYTES),
        .instructions = (uint64_t)opt_int(L, "hook_instructions", SB_DEFAULT_INSTRUCTIONS),
        .time_ms = (unsigned)opt_int(L, "hook_time_ms", SB_DEFAULT_TIME_MS),
        .module_dir = dir,
        .base_dir = opt_str(L, "base_dir"),
        .data_files = files,
        .n_data_files = n_files,
        .data_dir = opt_str(L, "data_dir"),
        .modules = in->modules,
        .n_modules = nm,
    };
    in->S = lua_sandbox_new(&o, err, sizeof err);
    if (!in->S) return luaL_error(L, "sandbox.new: %s", err);

    size_t len = 0;
    char *text = NULL;
    char chunk[4200];
    if (file) {
        FILE *f = fopen(file, "rb");
        if (!f) return luaL_error(L, "sandbox.new: cannot open %s", file);
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) luaL_addlstring(&b, buf, n);
        fclose(f);
        luaL_pushresult(&b);
        snprintf(chunk, sizeof chunk, "@%s", file);
    } else {
        lua_pushstring(L, source);
        snprintf(chunk, sizeof chunk, "=(policy source)");
    }
    text = (char *)lua_tolstring(L, -1, &len);
    if (lua_sandbox_load(in->S, text, len, chunk, err, sizeof err) != SB_OK)
        return luaL_error(L, "sandbox.new: %s", err);
    if (!lua_istable(in->S, -1)) return luaL_error(L, "sandbox.new: the policy must return a table of hooks");
    lua_sandbox_freeze(in->S, -1, false);
    lua_setfield(in->S, LUA_REGISTRYINDEX, "regfacade.sandbox.policy");
    lua_settop(in->S, 0);
    lua_pushvalue(L, self);
    return 1;
}

static const char *outcome_name(lua_sandbox_outcome o) {
    switch (o) {
        case SB_TIME:
            return "time";
        case SB_INSTRUCTIONS:
            return "instructions";
        case SB_MEMORY:
            return "memory";
        default:
            return "error";
    }
}

static lua_sandbox_phase phase_named(lua_State *L, const char *name) {
    for (int p = SB_PHASE_LOAD; p < SB_PHASE_COUNT; p++)
        if (strcmp(lua_sandbox_phase_name((lua_sandbox_phase)p), name) == 0) return (lua_sandbox_phase)p;
    luaL_error(L, "sandbox: unknown hook or phase \"%s\"", name);
    return SB_PHASE_NONE;
}

/* Runs the function and its n arguments on S's stack; pushes the answer
 * onto L. */
static int finish_call(lua_State *L, instance *in, lua_sandbox_phase ph, int nargs) {
    char err[1024], trace[4096];
    int base = lua_gettop(in->S) - nargs - 1;
    lua_sandbox_outcome o = lua_sandbox_call(in->S, ph, nargs, LUA_MULTRET, err, sizeof err, trace, sizeof trace);
    if (o != SB_OK) {
        lua_pushboolean(L, 0);
        lua_pushstring(L, outcome_name(o));
        lua_pushstring(L, trace);
        lua_settop(in->S, base);
        return 3;
    }
    int nres = lua_gettop(in->S) - base;
    lua_pushboolean(L, 1);
    for (int i = 1; i <= nres; i++) {
        if (copy_value(in->S, base + i, L, err, sizeof err) != 0) {
            lua_settop(in->S, base);
            return luaL_error(L, "sandbox: result %d: %s", i, err);
        }
    }
    lua_settop(in->S, base);
    return nres + 1;
}

static int l_call(lua_State *L) {
    instance *in = check(L);
    const char *hook = luaL_checkstring(L, 2);
    lua_sandbox_phase ph = phase_named(L, hook);
    int nargs = lua_gettop(L) - 2;
    lua_settop(in->S, 0);
    lua_getfield(in->S, LUA_REGISTRYINDEX, "regfacade.sandbox.policy");
    lua_getfield(in->S, -1, hook);
    lua_remove(in->S, -2);
    if (!lua_isfunction(in->S, -1)) {
        lua_settop(in->S, 0);
        return luaL_error(L, "sandbox: the policy has no %s hook", hook);
    }
    char err[512];
    for (int i = 0; i < nargs; i++) {
        if (copy_value(L, 3 + i, in->S, err, sizeof err) != 0) {
            lua_settop(in->S, 0);
            return luaL_error(L, "sandbox: argument %d: %s", i + 1, err);
        }
    }
    return finish_call(L, in, ph, nargs);
}

static int l_run(lua_State *L) {
    instance *in = check(L);
    size_t len;
    const char *code = luaL_checklstring(L, 2, &len);
    lua_sandbox_phase ph = phase_named(L, luaL_optstring(L, 3, "resolve"));
    lua_settop(in->S, 0);
    if (luaL_loadbufferx(in->S, code, len, "=(sandbox:run)", "t") != LUA_OK) {
        lua_pushboolean(L, 0);
        lua_pushliteral(L, "error");
        lua_pushstring(L, lua_tostring(in->S, -1));
        lua_settop(in->S, 0);
        return 3;
    }
    return finish_call(L, in, ph, 0);
}

static int l_broken(lua_State *L) {
    lua_pushboolean(L, lua_sandbox_broken(check(L)->S));
    return 1;
}

static int l_memory(lua_State *L) {
    size_t cap;
    size_t used = lua_sandbox_memory(check(L)->S, &cap);
    lua_pushinteger(L, (lua_Integer)used);
    lua_pushinteger(L, (lua_Integer)cap);
    return 2;
}

#define SHARED_MT "regfacade.sandbox.shared"

static int l_shared_gc(lua_State *L) {
    shared_dict **d = luaL_checkudata(L, 1, SHARED_MT);
    shared_dict_free(*d);
    *d = NULL;
    return 0;
}

/* sandbox.shared([cap]): the module table, keeping its dictionary alive
 * through a userdata stored in it. */
static int l_shared(lua_State *L) {
    lua_Integer cap = luaL_optinteger(L, 1, SHARED_DEFAULT_BYTES);
    shared_dict **box = lua_newuserdatauv(L, sizeof *box, 0);
    *box = NULL;
    if (luaL_newmetatable(L, SHARED_MT)) {
        lua_pushcfunction(L, l_shared_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    if (!(*box = shared_dict_new((size_t)cap))) return luaL_error(L, "sandbox.shared: out of memory");
    lua_pushlightuserdata(L, *box);
    lua_pushcclosure(L, lua_shared_open, 1);
    lua_call(L, 0, 1);
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "_dict");
    return 1;
}

static int l_crypt_verify(lua_State *L) {
    const char *pw = luaL_checkstring(L, 1);
    const char *hash = luaL_checkstring(L, 2);
    lua_pushboolean(L, regfacade_crypt_verify(pw, hash));
    return 1;
}

/* sandbox.refusal(v): how the server reads v as a hook's refusal (a deny
 * value, or a table / message of the older forms, default_status when they
 * give none): { status =, code =, message = [, challenge =, retry_after =] },
 * or nil and why it is malformed. */
static int l_refusal(lua_State *L) {
    lua_Integer dflt = luaL_optinteger(L, 2, 404);
    lua_settop(L, 1);
    if (lua_istable(L, 1) && lua_getfield(L, 1, "deny") == LUA_TBOOLEAN) {
        /* already read (sb:call's copy of a deny value) */
        lua_settop(L, 1);
        return 1;
    }
    lua_settop(L, 1);
    lua_deny d;
    char err[700];
    if (lua_deny_read(L, 1, (int)dflt, &d, err, sizeof err) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_deny_push_table(L, &d);
    return 1;
}

static int l_is_deny(lua_State *L) {
    lua_pushboolean(L, lua_deny_get(L, 1) != NULL ||
                           (lua_istable(L, 1) && lua_getfield(L, 1, "deny") == LUA_TBOOLEAN && lua_toboolean(L, -1)));
    return 1;
}

static int l_close(lua_State *L) {
    instance_clear(luaL_checkudata(L, 1, SANDBOX_MT));
    return 0;
}

int luaopen_regfacade_sandbox(lua_State *L) {
    static const luaL_Reg methods[] = {{"call", l_call},     {"run", l_run},     {"broken", l_broken},
                                       {"memory", l_memory}, {"close", l_close}, {NULL, NULL}};
    if (luaL_newmetatable(L, SANDBOX_MT)) {
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    static const luaL_Reg fns[] = {{"new", l_new},
                                   {"shared", l_shared},
                                   {"crypt_verify", l_crypt_verify},
                                   {"deny", lua_deny_new},
                                   {"refusal", l_refusal},
                                   {"is_deny", l_is_deny},
                                   {NULL, NULL}};
    luaL_newlib(L, fns);
    return 1;
}
