/*
 * lua_core: `regfacade.core`, the server's own assembly code as a Lua C
 * module, so busted specs test a policy against exactly what the server
 * runs (image_assemble, image_rewrite_run, image_finish), not a copy in Lua.
 * Built as build/lua/regfacade/core.so (mk/lua_core.mk); it also compiles
 * into the server binary, where it only defines luaopen_regfacade_core.
 *
 *   core.assemble(base_manifest_text, base_config_text, stack)
 *     -> manifest_text, config_text, manifest_digest, config_digest
 *   core.assemble_rewrite(base_manifest_text, base_config_text, stack, rewrite_fn, req)
 *     -> the same, with rewrite_fn(img, req) run between assembly and
 *        finishing (image_rewrite.h); rewrite_fn may be nil. When it
 *        returns regfacade.deny(...): nil, { deny = true, status =, code =,
 *        message = [, retry_after =, challenge =] }
 *   core.digest(text) -> "sha256:<hex>"
 *   core.json         -> regfacade.json (also put in package.loaded when
 *                        no "regfacade.json" is loaded yet)
 *
 * stack is an array of "base" or layer tables
 *   { media_type =, digest =, size =, diff_id =,            (required)
 *     urls = {...}, annotations = {...}, created_by =, comment =,
 *     source =, name =, config = {...} }   (the last three: img.layers only)
 * Unknown keys are errors. Errors are raised as "regfacade.core: ...".
 */
#include <lauxlib.h>
#include <lua.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "regfacade/digest.h"
#include "regfacade/image.h"
#include "regfacade/image_rewrite.h"
#include "regfacade/json.h"
#include "regfacade/lua_core.h"
#include "regfacade/lua_json.h"

/* Only Lua's loader calls it, so it has no header. */
int luaopen_regfacade_core(lua_State *L);

#define SCRATCH_MT "regfacade.core.scratch"

/* Everything one call mallocs, owned by a userdata whose __gc frees it, so
 * an error raised at any point leaks nothing. */
typedef struct {
    json_value *base_manifest, *base_config, *manifest, *config;
    image_layer *layers;
    size_t n;
    json_value **owned; /* urls and annotations trees the layers point to */
    size_t n_owned;
    char *manifest_bytes, *config_bytes;
} scratch;

static void scratch_clear(scratch *s) {
    json_free(s->base_manifest);
    json_free(s->base_config);
    json_free(s->manifest);
    json_free(s->config);
    for (size_t i = 0; i < s->n_owned; i++) json_free(s->owned[i]);
    free(s->owned);
    free(s->layers);
    free(s->manifest_bytes);
    free(s->config_bytes);
    memset(s, 0, sizeof(*s));
}

static int scratch_gc(lua_State *L) {
    scratch_clear(luaL_checkudata(L, 1, SCRATCH_MT));
    return 0;
}

static scratch *scratch_new(lua_State *L) {
    scratch *s = lua_newuserdatauv(L, sizeof(*s), 0);
    memset(s, 0, sizeof(*s));
    if (luaL_newmetatable(L, SCRATCH_MT)) {
        lua_pushcfunction(L, scratch_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return s;
}

static const char *const LAYER_KEYS[] = {"media_type", "digest",  "size",   "diff_id", "urls",   "annotations",
                                         "created_by", "comment", "source", "name",    "config", NULL};

/* The string at t[k] (NULL when absent). Raw access, so the string stays
 * anchored in t after the pop. */
static const char *field_string(lua_State *L, int t, const char *k, lua_Integer i, bool required) {
    lua_pushstring(L, k);
    int type = lua_rawget(L, t);
    const char *s = NULL;
    if (type == LUA_TSTRING)
        s = lua_tostring(L, -1);
    else if (type != LUA_TNIL)
        luaL_error(L, "regfacade.core: stack[%d].%s is a %s, expected a string", (int)i, k, luaL_typename(L, -1));
    else if (required)
        luaL_error(L, "regfacade.core: stack[%d].%s is missing, expected a string", (int)i, k);
    lua_pop(L, 1);
    return s;
}

/* Reads stack entry i (a table at t) into l. */
static void read_layer(lua_State *L, int t, lua_Integer i, scratch *s, image_layer *l) {
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        lua_pop(L, 1);
        bool known = false;
        if (lua_type(L, -1) == LUA_TSTRING)
            for (const char *const *k = LAYER_KEYS; *k && !known; k++) known = strcmp(lua_tostring(L, -1), *k) == 0;
        if (!known) {
            const char *name = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1);
            luaL_error(L,
                       "regfacade.core: stack[%d]: unknown key \"%s\" (known: media_type, digest, size, diff_id, "
                       "urls, annotations, created_by, comment, source, name, config)",
                       (int)i, name);
        }
    }
    l->media_type = field_string(L, t, "media_type", i, true);
    l->digest = field_string(L, t, "digest", i, true);
    l->diff_id = field_string(L, t, "diff_id", i, true);
    l->created_by = field_string(L, t, "created_by", i, false);
    l->comment = field_string(L, t, "comment", i, false);
    l->source = field_string(L, t, "source", i, false);
    l->name = field_string(L, t, "name", i, false);

    lua_getfield(L, t, "size");
    int isnum = 0;
    lua_Integer size = lua_tointegerx(L, -1, &isnum);
    if (!isnum || lua_type(L, -1) != LUA_TNUMBER || size < 0)
        luaL_error(L, "regfacade.core: stack[%d].size is %s, expected a non-negative integer", (int)i,
                   lua_isnil(L, -1) ? "missing" : luaL_tolstring(L, -1, NULL));
    l->size = (uint64_t)size;
    lua_pop(L, 1);

    static const char *const trees[] = {"urls", "annotations", "config"};
    for (int k = 0; k < 3; k++) {
        lua_getfield(L, t, trees[k]);
        if (!lua_isnil(L, -1)) {
            char root[64], err[512];
            snprintf(root, sizeof root, "stack[%d].%s", (int)i, trees[k]);
            json_value *v = lua_json_to_tree_named(L, -1, root, err, sizeof err);
            if (!v) luaL_error(L, "regfacade.core: %s", err);
            s->owned[s->n_owned++] = v;
            if (k == 0)
                l->urls = v;
            else if (k == 1)
                l->annotations = v;
            else
                l->source_config = v;
        }
        lua_pop(L, 1);
    }
}

/* The stack at index idx into s->layers. */
static void read_stack(lua_State *L, int idx, scratch *s) {
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
    if (n > 0) {
        s->layers = calloc((size_t)n, sizeof(*s->layers));
        s->owned = calloc((size_t)n * 3, sizeof(*s->owned));
        if (!s->layers || !s->owned) luaL_error(L, "regfacade.core: out of memory");
    }
    s->n = (size_t)n;
    for (lua_Integer i = 1; i <= n; i++) {
        int type = lua_rawgeti(L, idx, i);
        image_layer *l = &s->layers[i - 1];
        if (type == LUA_TSTRING && strcmp(lua_tostring(L, -1), "base") == 0)
            l->is_base = true;
        else if (type == LUA_TTABLE)
            read_layer(L, lua_gettop(L), i, s, l);
        else if (type == LUA_TSTRING)
            luaL_error(L, "regfacade.core: stack[%d] is \"%s\"; the only string entry is \"base\"", (int)i,
                       lua_tostring(L, -1));
        else
            luaL_error(L, "regfacade.core: stack[%d] is a %s, expected \"base\" or a layer table", (int)i,
                       luaL_typename(L, -1));
        lua_pop(L, 1); /* the entry stays anchored in the stack table */
    }
}

const image_layer *lua_core_stack(lua_State *L, int idx, size_t *n) {
    idx = lua_absindex(L, idx);
    scratch *s = scratch_new(L);
    read_stack(L, idx, s);
    *n = s->n;
    return s->layers;
}

static json_value *parse_arg(lua_State *L, int idx, const char *what) {
    size_t len;
    const char *text = luaL_checklstring(L, idx, &len);
    char err[256];
    json_value *v = json_parse(text, len, JSON_DEFAULT_MAX_DEPTH, err, sizeof err);
    if (!v) luaL_error(L, "regfacade.core: %s: %s", what, err[0] ? err : "out of memory");
    return v;
}

/* assemble / assemble_rewrite: arguments 1-3 (and 4, 5 with rewrite). */
static int assemble(lua_State *L, bool rewrite) {
    lua_settop(L, rewrite ? 5 : 3);
    if (rewrite && !lua_isnil(L, 4)) luaL_checktype(L, 4, LUA_TFUNCTION);
    scratch *s = scratch_new(L);
    s->base_manifest = parse_arg(L, 1, "base manifest");
    s->base_config = parse_arg(L, 2, "base config");
    read_stack(L, 3, s);

    char err[1024];
    if (image_assemble(s->base_manifest, s->base_config, s->layers, s->n, &s->manifest, &s->config, err, sizeof err) !=
        0)
        return luaL_error(L, "regfacade.core: %s", err);
    lua_deny denied;
    int rc =
        rewrite ? image_rewrite_run(L, 4, 5, &s->manifest, &s->config, s->layers, s->n, &denied, err, sizeof err) : 0;
    if (rc < 0) return luaL_error(L, "regfacade.core: %s", err);
    if (rc == 1) {
        /* The rewrite hook refused: nil and the refusal, as data. */
        scratch_clear(s);
        lua_pushnil(L);
        lua_deny_push_table(L, &denied);
        return 2;
    }
    size_t mlen, clen;
    char mdigest[80], cdigest[80];
    if (image_finish(s->manifest, s->config, &s->config_bytes, &clen, cdigest, &s->manifest_bytes, &mlen, mdigest, err,
                     sizeof err) != 0)
        return luaL_error(L, "regfacade.core: %s", err);
    lua_pushlstring(L, s->manifest_bytes, mlen);
    lua_pushlstring(L, s->config_bytes, clen);
    lua_pushstring(L, mdigest);
    lua_pushstring(L, cdigest);
    scratch_clear(s);
    return 4;
}

static int l_assemble(lua_State *L) { return assemble(L, false); }

static int l_assemble_rewrite(lua_State *L) { return assemble(L, true); }

static int l_digest(lua_State *L) {
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    char out[DIGEST_STRING_LEN];
    if (digest_bytes(text, len, out) != 0) return luaL_error(L, "regfacade.core: digest failed");
    lua_pushstring(L, out);
    return 1;
}

int luaopen_regfacade_core(lua_State *L) {
    static const luaL_Reg fns[] = {
        {"assemble", l_assemble},
        {"assemble_rewrite", l_assemble_rewrite},
        {"digest", l_digest},
        {NULL, NULL},
    };
    luaL_newlib(L, fns);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    if (lua_getfield(L, -1, "regfacade.json") == LUA_TTABLE) {
        lua_remove(L, -2);
    } else {
        lua_pop(L, 1);
        luaopen_regfacade_json(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, "regfacade.json");
        lua_remove(L, -2);
    }
    lua_setfield(L, -2, "json");
    return 1;
}
