/*
 * lua_deny: regfacade.deny and the one reader of refusals (see
 * include/regfacade/lua_deny.h).
 */
#include "regfacade/lua_deny.h"

#include <lauxlib.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "regfacade/oci_error.h"

/* The metatable's name in the registry: only C code reaches it (a policy
 * has no debug library and getmetatable answers false). */
#define DENY_MT "regfacade.deny"

static const char *default_code(lua_Integer status) {
    switch (status) {
        case 401:
            return "UNAUTHORIZED";
        case 404:
            return "NAME_UNKNOWN";
        case 429:
            return "TOOMANYREQUESTS";
        default:
            return "DENIED";
    }
}

static bool header_value_ok(const char *s) {
    for (const char *q = s; *q; q++)
        if ((unsigned char)*q < 0x20 || *q == 0x7f) return false;
    return true;
}

int lua_deny_fill(lua_deny *d, lua_Integer status, const char *code, const char *message, const char *challenge,
                  lua_Integer retry_after, char *err, size_t errlen) {
    if (status < 400 || status > 599) {
        snprintf(err, errlen, "status %lld is not a refusal (an integer from 400 to 599)", (long long)status);
        return -1;
    }
    const char *known = code ? oci_error_code_known(code) : default_code(status);
    if (!known) {
        snprintf(err, errlen, "code \"%.40s\" is not an OCI error code (one of: %s)", code, oci_error_code_list());
        return -1;
    }
    if (message && strlen(message) > LUA_DENY_MESSAGE_MAX) {
        snprintf(err, errlen, "message is %zu bytes, more than %d", strlen(message), LUA_DENY_MESSAGE_MAX);
        return -1;
    }
    if (challenge && (!*challenge || strlen(challenge) >= sizeof d->challenge - 12 || !header_value_ok(challenge))) {
        snprintf(err, errlen,
                 "challenge must be a WWW-Authenticate value: not empty, under 500 bytes, no control "
                 "characters");
        return -1;
    }
    if (retry_after != LUA_DENY_NO_RETRY && (retry_after < 0 || retry_after > LUA_DENY_RETRY_MAX)) {
        snprintf(err, errlen, "retry_after %lld is not a number of seconds from 0 to %d", (long long)retry_after,
                 LUA_DENY_RETRY_MAX);
        return -1;
    }
    d->status = (int)status;
    snprintf(d->code, sizeof d->code, "%s", known);
    snprintf(d->message, sizeof d->message, "%s",
             message         ? message
             : status == 401 ? "authentication required"
                             : "access denied by policy");
    /* A 401 without a challenge leaves the client nothing to answer. */
    snprintf(d->challenge, sizeof d->challenge, "%s",
             challenge       ? challenge
             : status == 401 ? "Basic realm=\"regfacade\""
                             : "");
    d->retry_after = retry_after == LUA_DENY_NO_RETRY ? -1 : (long)retry_after;
    return 0;
}

/* ---------- the value ---------- */

static int deny_index(lua_State *L) {
    const lua_deny *d = luaL_checkudata(L, 1, DENY_MT);
    const char *k = lua_tostring(L, 2);
    if (!k || lua_type(L, 2) != LUA_TSTRING) return 0;
    if (strcmp(k, "status") == 0)
        lua_pushinteger(L, d->status);
    else if (strcmp(k, "code") == 0)
        lua_pushstring(L, d->code);
    else if (strcmp(k, "message") == 0)
        lua_pushstring(L, d->message);
    else if (strcmp(k, "challenge") == 0 && d->challenge[0])
        lua_pushstring(L, d->challenge);
    else if (strcmp(k, "retry_after") == 0 && d->retry_after >= 0)
        lua_pushinteger(L, d->retry_after);
    else
        return 0;
    return 1;
}

static int deny_newindex(lua_State *L) { return luaL_error(L, "a regfacade.deny value is read-only (make a new one)"); }

static int deny_tostring(lua_State *L) {
    const lua_deny *d = luaL_checkudata(L, 1, DENY_MT);
    lua_pushfstring(L, "regfacade.deny(%d %s: %s)", d->status, d->code, d->message);
    return 1;
}

static void push_metatable(lua_State *L) {
    if (luaL_newmetatable(L, DENY_MT)) {
        static const luaL_Reg mt[] = {
            {"__index", deny_index}, {"__newindex", deny_newindex}, {"__tostring", deny_tostring}, {NULL, NULL}};
        luaL_setfuncs(L, mt, 0);
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable");
    }
}

static const char *const OPT_KEYS[] = {"retry_after", "challenge", NULL};

int lua_deny_new(lua_State *L) {
    char err[600];
    lua_Integer status = 0;
    if (!lua_isinteger(L, 1))
        return luaL_error(L, "regfacade.deny: status must be an integer from 400 to 599, got %s",
                          lua_isnumber(L, 1) ? "a number with a fraction" : luaL_typename(L, 1));
    status = lua_tointeger(L, 1);
    const char *code = luaL_optstring(L, 2, NULL);
    const char *message = luaL_optstring(L, 3, NULL);
    const char *challenge = NULL;
    lua_Integer retry_after = LUA_DENY_NO_RETRY;
    if (!lua_isnoneornil(L, 4)) {
        luaL_checktype(L, 4, LUA_TTABLE);
        lua_pushnil(L);
        while (lua_next(L, 4) != 0) {
            lua_pop(L, 1);
            bool ok = false;
            for (const char *const *k = OPT_KEYS; *k && !ok; k++)
                ok = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), *k) == 0;
            if (!ok)
                return luaL_error(L, "regfacade.deny: unknown option \"%s\" (options: retry_after, challenge)",
                                  lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1));
        }
        lua_getfield(L, 4, "retry_after");
        if (!lua_isnil(L, -1)) {
            if (!lua_isinteger(L, -1))
                return luaL_error(L, "regfacade.deny: retry_after must be an integer number of seconds, got %s",
                                  luaL_typename(L, -1));
            retry_after = lua_tointeger(L, -1);
        }
        lua_getfield(L, 4, "challenge");
        if (!lua_isnil(L, -1)) {
            if (lua_type(L, -1) != LUA_TSTRING)
                return luaL_error(L, "regfacade.deny: challenge must be a string, got %s", luaL_typename(L, -1));
            challenge = lua_tostring(L, -1); /* anchored on the stack */
        }
    }
    lua_deny tmp;
    if (lua_deny_fill(&tmp, status, code, message, challenge, retry_after, err, sizeof err) != 0)
        return luaL_error(L, "regfacade.deny: %s", err);
    lua_deny *d = lua_newuserdatauv(L, sizeof *d, 0);
    *d = tmp;
    push_metatable(L);
    lua_setmetatable(L, -2);
    return 1;
}

const lua_deny *lua_deny_get(lua_State *L, int idx) {
    if (lua_type(L, idx) != LUA_TUSERDATA) return NULL;
    return luaL_testudata(L, idx, DENY_MT);
}

/* t[key] with a raw read: its type, the value left pushed. */
static int raw_field(lua_State *L, int t, const char *key) {
    lua_pushstring(L, key);
    return lua_rawget(L, t);
}

int lua_deny_read(lua_State *L, int idx, int default_status, lua_deny *d, char *err, size_t errlen) {
    idx = lua_absindex(L, idx);
    const lua_deny *v = lua_deny_get(L, idx);
    if (v) {
        *d = *v;
        return 0;
    }
    switch (lua_type(L, idx)) {
        case LUA_TNIL:
        case LUA_TNONE:
            return lua_deny_fill(d, default_status, NULL, NULL, NULL, LUA_DENY_NO_RETRY, err, errlen);
        case LUA_TSTRING:
            return lua_deny_fill(d, default_status, NULL, lua_tostring(L, idx), NULL, LUA_DENY_NO_RETRY, err, errlen);
        case LUA_TTABLE:
            break;
        default:
            snprintf(err, errlen, "a refusal must be regfacade.deny(...), a message or a table, got %s",
                     luaL_typename(L, idx));
            return -1;
    }
    if (!lua_checkstack(L, 6)) {
        snprintf(err, errlen, "Lua stack full");
        return -1;
    }
    int top = lua_gettop(L);
    int rc = -1;
    lua_Integer status = default_status, retry_after = LUA_DENY_NO_RETRY;
    const char *code = NULL, *message = NULL, *challenge = NULL;
    int t = raw_field(L, idx, "status");
    if (t != LUA_TNIL && !lua_isinteger(L, -1)) {
        snprintf(err, errlen, "status must be an integer from 400 to 599, got %s", luaL_typename(L, -1));
        goto out;
    }
    if (t != LUA_TNIL) status = lua_tointeger(L, -1);
    static const char *const strings[] = {"code", "message", "challenge"};
    const char **into[] = {&code, &message, &challenge};
    for (int i = 0; i < 3; i++) {
        t = raw_field(L, idx, strings[i]); /* stays pushed: the string is anchored until out */
        if (t == LUA_TNIL) continue;
        if (t != LUA_TSTRING) {
            snprintf(err, errlen, "%s must be a string, got %s", strings[i], luaL_typename(L, -1));
            goto out;
        }
        *into[i] = lua_tostring(L, -1);
    }
    t = raw_field(L, idx, "retry_after");
    if (t != LUA_TNIL) {
        if (!lua_isinteger(L, -1)) {
            snprintf(err, errlen, "retry_after must be an integer number of seconds, got %s", luaL_typename(L, -1));
            goto out;
        }
        retry_after = lua_tointeger(L, -1);
    }
    rc = lua_deny_fill(d, status, code, message, challenge, retry_after, err, errlen);
out:
    lua_settop(L, top);
    return rc;
}

void lua_deny_push_table(lua_State *L, const lua_deny *d) {
    lua_createtable(L, 0, 6);
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "deny");
    lua_pushinteger(L, d->status);
    lua_setfield(L, -2, "status");
    lua_pushstring(L, d->code);
    lua_setfield(L, -2, "code");
    lua_pushstring(L, d->message);
    lua_setfield(L, -2, "message");
    if (d->challenge[0]) {
        lua_pushstring(L, d->challenge);
        lua_setfield(L, -2, "challenge");
    }
    if (d->retry_after >= 0) {
        lua_pushinteger(L, d->retry_after);
        lua_setfield(L, -2, "retry_after");
    }
}
