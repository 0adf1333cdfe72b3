/*
 * image_rewrite: the rewrite hook on an assembled image (see
 * include/regfacade/image_rewrite.h).
 *
 * All Lua work happens in one C function run under lua_pcall, with the
 * trees it builds kept in a context the caller's frame owns, so an error
 * anywhere (the hook's, a conversion's, a memory error) frees everything
 * and leaves the caller's trees as they were.
 */
#include "regfacade/image_rewrite.h"

#include <lauxlib.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "regfacade/lua_deny.h"
#include "regfacade/lua_json.h"

typedef struct {
    const json_value *manifest, *config;
    const image_layer *stack;
    size_t n;
    json_value *new_manifest, *new_config; /* built inside the protected call */
    bool in_hook;                          /* the hook is running */
    bool denied;                           /* the hook returned regfacade.deny(...): in deny */
    lua_deny deny;
} rewrite_ctx;

static void set_string(lua_State *L, const char *k, const char *v) {
    if (!v) return;
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

/* img.layers: the final layers, from the assembled manifest and config,
 * each marked with whether it came from the base. */
static void push_layers(lua_State *L, const rewrite_ctx *c) {
    const json_value *layers = json_object_get(c->manifest, "layers");
    const json_value *diff_ids = json_object_get(json_object_get(c->config, "rootfs"), "diff_ids");
    size_t count = layers && layers->type == JSON_ARRAY ? layers->count : 0;
    size_t added = 0;
    bool has_base = false;
    for (size_t i = 0; i < c->n; i++) {
        if (c->stack[i].is_base)
            has_base = true;
        else
            added++;
    }
    size_t n_base = has_base && count >= added ? count - added : 0;

    lua_createtable(L, count > 0x7fffffff ? 0 : (int)count, 0);
    size_t at = 0;
    for (size_t i = 0; i < c->n && at < count; i++) {
        size_t run = c->stack[i].is_base ? n_base : 1;
        for (size_t k = 0; k < run && at < count; k++, at++) {
            const json_value *d = layers->items[at];
            lua_createtable(L, 0, 5);
            set_string(L, "media_type", json_object_get_string(d, "mediaType"));
            set_string(L, "digest", json_object_get_string(d, "digest"));
            uint64_t size = 0;
            if (json_get_uint64(json_object_get(d, "size"), &size)) {
                lua_pushinteger(L, (lua_Integer)size);
                lua_setfield(L, -2, "size");
            }
            const json_value *id = json_array_get(diff_ids, at);
            set_string(L, "diff_id", id && id->type == JSON_STRING ? id->str : NULL);
            lua_pushboolean(L, c->stack[i].is_base);
            lua_setfield(L, -2, "base");
            /* Where an added layer came from (image.h), so a hook can apply
             * an added image's env modifiers (image.apply_env_modifiers). */
            if (!c->stack[i].is_base) {
                set_string(L, "source", c->stack[i].source);
                set_string(L, "name", c->stack[i].name);
                if (c->stack[i].source_config) {
                    if (lua_json_push(L, c->stack[i].source_config) != 0)
                        luaL_error(L, "rewrite: the config of layer source %s nests deeper than %d",
                                   c->stack[i].name ? c->stack[i].name : "?", LUA_JSON_MAX_DEPTH);
                    lua_setfield(L, -2, "config");
                }
            }
            lua_rawseti(L, -2, (lua_Integer)at + 1);
        }
    }
    luaL_setmetatable(L, LUA_JSON_ARRAY_MT);
}

/* img.<field> (img at idx) as a new tree, kept in *out. */
static void take_back(lua_State *L, int img, const char *field, json_value **out) {
    char root[32], err[512];
    lua_getfield(L, img, field);
    if (!lua_istable(L, -1)) luaL_error(L, "rewrite: img.%s is a %s, expected a table", field, luaL_typename(L, -1));
    snprintf(root, sizeof root, "img.%s", field);
    *out = lua_json_to_tree_named(L, -1, root, err, sizeof err);
    if (!*out) luaL_error(L, "rewrite: %s", err);
    lua_pop(L, 1);
}

/* Protected: (fn, req, ctx) -> nothing; results in ctx. */
static int rewrite_protected(lua_State *L) {
    rewrite_ctx *c = lua_touserdata(L, 3);
    lua_settop(L, 2);
    /* Make sure the array metatable exists before img.layers names it. */
    if (luaL_newmetatable(L, LUA_JSON_ARRAY_MT)) {
        lua_pushliteral(L, "array");
        lua_setfield(L, -2, "__jsontype");
    }
    lua_pop(L, 1);

    lua_createtable(L, 0, 3); /* 3: img */
    if (lua_json_push(L, c->manifest) != 0)
        return luaL_error(L, "rewrite: the manifest nests deeper than %d", LUA_JSON_MAX_DEPTH);
    lua_setfield(L, 3, "manifest");
    if (lua_json_push(L, c->config) != 0)
        return luaL_error(L, "rewrite: the config nests deeper than %d", LUA_JSON_MAX_DEPTH);
    lua_setfield(L, 3, "config");
    push_layers(L, c);
    lua_setfield(L, 3, "layers");

    lua_pushvalue(L, 1);
    lua_pushvalue(L, 3);
    lua_pushvalue(L, 2);
    c->in_hook = true; /* an error raised now is the hook's own */
    lua_call(L, 2, 1);
    c->in_hook = false;

    int img = 3;
    const lua_deny *d = lua_deny_get(L, -1);
    if (d) {
        /* The hook refused: the request ends with its refusal. */
        c->deny = *d;
        c->denied = true;
        return 0;
    }
    if (lua_istable(L, -1))
        img = lua_gettop(L);
    else if (!lua_isnil(L, -1))
        return luaL_error(L, "rewrite: the hook returned a %s; return nothing (edit img) or a table like img",
                          luaL_typename(L, -1));
    take_back(L, img, "manifest", &c->new_manifest);
    take_back(L, img, "config", &c->new_config);
    return 0;
}

int image_rewrite_run(lua_State *L, int rewrite_fn_index, int req_index, json_value **manifest, json_value **config,
                      const image_layer *stack, size_t n, lua_deny *denied, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    if (!manifest || !*manifest || !config || !*config) {
        snprintf(err, errlen, "rewrite: no manifest or config");
        return -1;
    }
    if (lua_isnoneornil(L, rewrite_fn_index)) return 0;
    if (!lua_checkstack(L, 6)) {
        snprintf(err, errlen, "rewrite: Lua stack exhausted");
        return -1;
    }
    int top = lua_gettop(L);
    rewrite_fn_index = lua_absindex(L, rewrite_fn_index);
    if (req_index) req_index = lua_absindex(L, req_index);

    rewrite_ctx c = {.manifest = *manifest, .config = *config, .stack = stack, .n = n};
    lua_pushcfunction(L, rewrite_protected);
    lua_pushvalue(L, rewrite_fn_index);
    if (req_index)
        lua_pushvalue(L, req_index);
    else
        lua_pushnil(L);
    lua_pushlightuserdata(L, &c);
    int status = lua_pcall(L, 3, 0, 0);
    if (status != LUA_OK) {
        const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        if (status == LUA_ERRMEM)
            snprintf(err, errlen, "%s: out of memory", c.in_hook ? "rewrite hook" : "rewrite");
        else if (!c.in_hook)
            snprintf(err, errlen, "%s", msg ? msg : "rewrite: failed");
        else if (msg)
            snprintf(err, errlen, "rewrite hook: %s", msg);
        else
            snprintf(err, errlen, "rewrite hook: raised a %s value", luaL_typename(L, -1));
        lua_settop(L, top);
        json_free(c.new_manifest);
        json_free(c.new_config);
        return -1;
    }
    lua_settop(L, top);
    if (c.denied) {
        if (!denied) {
            snprintf(err, errlen, "rewrite hook: refused (%d %s: %s)", c.deny.status, c.deny.code, c.deny.message);
            return -1;
        }
        *denied = c.deny;
        return 1;
    }

    /* The hook may change anything, but the image must stay whole. */
    const json_value *layers = json_object_get(c.new_manifest, "layers");
    const json_value *diff_ids = json_object_get(json_object_get(c.new_config, "rootfs"), "diff_ids");
    const char *why = NULL;
    if (!layers || layers->type != JSON_ARRAY)
        why = "img.manifest.layers is missing or not an array";
    else if (!diff_ids || diff_ids->type != JSON_ARRAY)
        why = "img.config.rootfs.diff_ids is missing or not an array";
    if (why || layers->count != diff_ids->count) {
        if (why)
            snprintf(err, errlen, "rewrite: %s", why);
        else
            snprintf(err, errlen, "rewrite: img.manifest has %zu layers but img.config.rootfs.diff_ids has %zu",
                     layers->count, diff_ids->count);
        json_free(c.new_manifest);
        json_free(c.new_config);
        return -1;
    }
    json_free(*manifest);
    json_free(*config);
    *manifest = c.new_manifest;
    *config = c.new_config;
    return 0;
}
