/*
 * lua_deny: the one refusal every hook can answer with, and the one reader
 * of refusals. `regfacade.deny(status, code, message [, opts])` makes a
 * deny value (a read-only userdata only this code creates); authorize,
 * spec, resolve and rewrite return it and the request ends with that
 * status, that OCI error code and message, and Retry-After /
 * WWW-Authenticate when given:
 *
 *   return regfacade.deny(429, "TOOMANYREQUESTS", "slow down", { retry_after = 30 })
 *   return regfacade.deny(401, "UNAUTHORIZED", "log in", { challenge = 'Basic realm="x"' })
 *
 *   status       an integer from 400 to 599
 *   code         an OCI Distribution error code (oci_error.h); nil: by
 *                status (401 UNAUTHORIZED, 404 NAME_UNKNOWN, 429
 *                TOOMANYREQUESTS, else DENIED)
 *   message      a string (nil: "access denied by policy", for a 401
 *                "authentication required"), at most LUA_DENY_MESSAGE_MAX
 *   opts.retry_after  seconds (an integer, 0..LUA_DENY_RETRY_MAX): Retry-After
 *   opts.challenge    WWW-Authenticate (no control characters, under 500
 *                bytes); a 401 without one gets Basic realm="regfacade"
 *
 * A deny value reads like a table (d.status, d.code, d.message,
 * d.retry_after, d.challenge) and cannot be changed. The older answers
 * (authorize's { status = N, ... }, resolve's and spec's nil, "message"
 * and nil, { status = N, ... }) are read by the same code with the same
 * checks (lua_deny_read).
 *
 * This unit knows nothing of hooks or phases (the `regfacade` module
 * checks where deny may be called); it is linked into the server and into
 * both busted C modules.
 */
#ifndef REGFACADE_LUA_DENY_H
#define REGFACADE_LUA_DENY_H

#include <lua.h>
#include <stddef.h>

#define LUA_DENY_MESSAGE_MAX 1000
#define LUA_DENY_RETRY_MAX 86400         /* a day */
#define LUA_DENY_NO_RETRY LUA_MININTEGER /* lua_deny_fill: no Retry-After */

typedef struct {
    int status;
    char code[32];
    char message[LUA_DENY_MESSAGE_MAX + 1];
    char challenge[512]; /* "" when none */
    long retry_after;    /* seconds; -1 when none */
} lua_deny;

/* Check the parts of a refusal and fill d, defaults applied (code and
 * challenge may be NULL, message NULL for the default, retry_after
 * LUA_DENY_NO_RETRY for none). 0, or -1 with "status 200 is not ..." in err (d untouched). */
int lua_deny_fill(lua_deny *d, lua_Integer status, const char *code, const char *message, const char *challenge,
                  lua_Integer retry_after, char *err, size_t errlen);

/* regfacade.deny(status, code, message [, opts]) as a Lua C function:
 * pushes a deny value, or raises "regfacade.deny: why". */
int lua_deny_new(lua_State *L);

/* The deny value at idx, or NULL when it is something else. */
const lua_deny *lua_deny_get(lua_State *L, int idx);

/* Read a refusal at idx: a deny value; a table { status =, code =,
 * message =, challenge =, retry_after = } (raw reads; status default
 * default_status); a string (the message, with default_status); nil (the
 * default message, with default_status). 0 with d filled, or -1 with err
 * saying what is wrong with it. Raises only on a memory error (run it in
 * protected mode). */
int lua_deny_read(lua_State *L, int idx, int default_status, lua_deny *d, char *err, size_t errlen);

/* Push the deny value d's fields as a plain table (for busted, which
 * copies hook answers as data). */
void lua_deny_push_table(lua_State *L, const lua_deny *d);

#endif
