#include "regfacade/lua_regfacade.h"

#include <crypt.h>
#include <lauxlib.h>
#include <openssl/crypto.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "regfacade/digest.h"
#include "regfacade/log.h"
#include "regfacade/lua_deny.h"
#include "regfacade/lua_json.h"

#ifndef REGFACADE_VERSION
#define REGFACADE_VERSION "0.0.0"
#endif

/* Plain tables (no JSON metatables: the config is frozen, and a frozen
 * table cannot keep another metatable). */
static void push_plain(lua_State *L, const json_value *v, int depth) {
    luaL_checkstack(L, 4, "regfacade.config");
    if (depth > 32) {
        lua_pushnil(L);
        return;
    }
    switch (v->type) {
        case JSON_NULL:
            lua_json_push_null(L);
            break;
        case JSON_TRUE:
            lua_pushboolean(L, 1);
            break;
        case JSON_FALSE:
            lua_pushboolean(L, 0);
            break;
        case JSON_NUMBER: {
            int64_t i;
            if (json_get_int64(v, &i))
                lua_pushinteger(L, (lua_Integer)i);
            else
                lua_pushnumber(L, strtod(v->str, NULL));
            break;
        }
        case JSON_STRING:
            lua_pushlstring(L, v->str, v->len);
            break;
        case JSON_ARRAY:
            lua_createtable(L, (int)v->count, 0);
            for (size_t i = 0; i < v->count; i++) {
                push_plain(L, v->items[i], depth + 1);
                lua_rawseti(L, -2, (lua_Integer)i + 1);
            }
            break;
        case JSON_OBJECT:
            lua_createtable(L, 0, (int)v->count);
            for (size_t i = 0; i < v->count; i++) {
                lua_pushlstring(L, v->keys[i], v->key_lens[i]);
                push_plain(L, v->items[i], depth + 1);
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
    log_level lv;
    if (strcmp(level, "error") == 0)
        lv = LOG_ERROR;
    else if (strcmp(level, "warn") == 0)
        lv = LOG_WARN;
    else if (strcmp(level, "info") == 0)
        lv = LOG_INFO;
    else if (strcmp(level, "debug") == 0)
        lv = LOG_DEBUG;
    else
        return luaL_error(L, "regfacade.log: level must be \"debug\", \"info\", \"warn\" or \"error\", got \"%s\"",
                          level);
    log_msg(lv, "policy %s: %s", where, msg);
    return 0;
}

static int l_digest(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    char out[DIGEST_STRING_LEN];
    if (digest_bytes(s, len, out) != 0) return luaL_error(L, "regfacade.digest: sha256 failed");
    lua_pushstring(L, out);
    return 1;
}

int regfacade_crypt_verify(const char *password, const char *hash) {
    size_t hl = strlen(hash);
    if (hl < 3 || hash[0] != '$') return 0; /* no DES or other legacy forms */
    struct crypt_data *data = calloc(1, sizeof *data);
    if (!data) return 0;
    const char *out = crypt_rn(password, hash, data, (int)sizeof *data);
    int ok = out && out[0] != '*' && strlen(out) == hl && CRYPTO_memcmp(out, hash, hl) == 0;
    explicit_bzero(data, sizeof *data);
    free(data);
    return ok;
}

static int l_crypt_verify(lua_State *L) {
    lua_sandbox_check_phase(L, "regfacade.crypt_verify",
                            SB_PHASE_BIT(SB_PHASE_AUTHORIZE) | SB_PHASE_BIT(SB_PHASE_SELF_CHECK));
    size_t pl, hl;
    const char *password = luaL_checklstring(L, 1, &pl);
    const char *hash = luaL_checklstring(L, 2, &hl);
    if (strlen(password) != pl || strlen(hash) != hl) {
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_pushboolean(L, regfacade_crypt_verify(password, hash));
    return 1;
}

static int l_phase(lua_State *L) {
    lua_pushstring(L, lua_sandbox_phase_name(lua_sandbox_current_phase(L)));
    return 1;
}

/* regfacade.deny: where a hook can end its request (and in top-level code,
 * which may keep a refusal it returns often). */
static int l_deny(lua_State *L) {
    lua_sandbox_check_phase(L, "regfacade.deny",
                            SB_PHASE_BIT(SB_PHASE_LOAD) | SB_PHASE_BIT(SB_PHASE_SELF_CHECK) |
                                SB_PHASE_BIT(SB_PHASE_AUTHORIZE) | SB_PHASE_BIT(SB_PHASE_SPEC) |
                                SB_PHASE_BIT(SB_PHASE_RESOLVE) | SB_PHASE_BIT(SB_PHASE_REWRITE));
    return lua_deny_new(L);
}

static void require_into(lua_State *L, int t, const char *module, const char *field) {
    lua_getglobal(L, "require");
    lua_pushstring(L, module);
    lua_call(L, 1, 1);
    lua_setfield(L, t, field);
}

int lua_regfacade_open(lua_State *L) {
    lua_regfacade_host *h = lua_touserdata(L, lua_upvalueindex(1));
    lua_newtable(L);
    int t = lua_gettop(L);
    push_plain(L, h->config, 0);
    lua_sandbox_freeze(L, -1, true);
    lua_setfield(L, t, "config");
    static const luaL_Reg fns[] = {{"log", l_log},
                                   {"digest", l_digest},
                                   {"crypt_verify", l_crypt_verify},
                                   {"read_file", lua_sandbox_read_file},
                                   {"phase", l_phase},
                                   {"deny", l_deny},
                                   {NULL, NULL}};
    luaL_setfuncs(L, fns, 0);
    require_into(L, t, "regfacade.json", "json");
    lua_json_push_null(L);
    lua_setfield(L, t, "null");
    require_into(L, t, "regfacade.shared", "shared");
    lua_pushstring(L, REGFACADE_VERSION);
    lua_setfield(L, t, "version");
    return 1;
}

size_t lua_regfacade_modules(lua_regfacade_host *host, lua_sandbox_module out[3]) {
    out[0] = (lua_sandbox_module){"regfacade", lua_regfacade_open, host};
    out[1] = (lua_sandbox_module){"regfacade.json", luaopen_regfacade_json, NULL};
    out[2] = (lua_sandbox_module){"regfacade.shared", lua_shared_open, host->shared};
    return 3;
}
