/*
 * lua_regfacade: the `regfacade` module a policy requires, for a sandbox
 * state (lua_sandbox.h). Its tables are read-only.
 *
 *   config                  { upstreams = { NAME = { url, host,
 *                             library_prefix, credentials = { SET, ... } } },
 *                             default_upstream, options } (the config file's
 *                             values; read-only: copy what you change)
 *   log(level, message)     a log line "policy FILE:LINE: message" at level
 *                           "debug", "info", "warn" or "error"
 *   digest(s)               "sha256:<hex>" of the string s
 *   crypt_verify(password, hash)
 *                           true when password matches a crypt(3) hash
 *                           (bcrypt $2y$/$2b$/$2a$, sha512crypt $6$,
 *                           sha256crypt $5$, yescrypt $y$: what
 *                           `htpasswd -B` and `mkpasswd` write); false on a
 *                           mismatch or a hash it cannot read. Hooks
 *                           authorize and self_check only (bcrypt costs
 *                           tens of milliseconds).
 *   read_file(path)         the content of a data file the config allows
 *                           (policy.data_files / policy.data_dir)
 *   phase()                 the running hook's name ("authorize", ...) or
 *                           "load"
 *   deny(status, code, message [, { retry_after =, challenge = }])
 *                           a refusal any of authorize, spec, resolve and
 *                           rewrite returns to end its request (lua_deny.h)
 *   json, null              regfacade.json and its null
 *   shared                  regfacade.shared (lua_shared.h)
 *   version                 "X.Y.Z"
 */
#ifndef REGFACADE_LUA_REGFACADE_H
#define REGFACADE_LUA_REGFACADE_H

#include <lua.h>
#include <stdbool.h>
#include <stddef.h>

#include "regfacade/json.h"
#include "regfacade/lua_sandbox.h"
#include "regfacade/lua_shared.h"

typedef struct {
    const json_value *config; /* the object given as regfacade.config (not NULL) */
    shared_dict *shared;      /* regfacade.shared */
} lua_regfacade_host;

/* The modules a sandbox needs for `regfacade`: "regfacade",
 * "regfacade.json", "regfacade.shared". Fills out[0..2], returns 3. host
 * must outlive the states. */
size_t lua_regfacade_modules(lua_regfacade_host *host, lua_sandbox_module out[3]);

/* The module open function (upvalue 1: the host). */
int lua_regfacade_open(lua_State *L);

/* 1 when password matches hash (crypt(3) formats above), 0 when not or
 * when the hash is not one it can read. Thread-safe. */
int regfacade_crypt_verify(const char *password, const char *hash);

#endif
