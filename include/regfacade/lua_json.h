/*
 * lua_json: JSON trees (json.h) as Lua values and back, and the
 * `regfacade.json` module built on them. There is one codec: decode is
 * json_parse() + lua_json_push(), encode is lua_json_to_tree() +
 * json_serialize(), so a policy, a busted spec and the server see the same
 * bytes for the same values.
 *
 * The Lua shape of a JSON value:
 *   object  a table whose metatable is its own { __jsontype = "object",
 *           __jsonorder = { keys in document order } [, __jsonnum = ...] }
 *   array   a table 1..n whose metatable is the shared LUA_JSON_ARRAY_MT
 *           ({ __jsontype = "array" }), or its own one with __jsonnum
 *   string  a string (may hold NUL bytes); true/false a boolean
 *   number  an integer when the text is an integer that fits int64, else a
 *           float
 *   null    json.null: a light userdata holding NULL (one identity
 *           everywhere, so `v == json.null` works across modules)
 * The metatables carry no metamethods: the tables behave as plain tables
 * (busted's assert.same compares them with plain ones).
 *
 * __jsonnum (key or index -> source text) records the numbers whose source
 * text differs from what the encoder would write for their Lua value
 * ("1e3", "-0", "1.50", integers beyond int64): while the value is
 * unchanged, it is written back with its source text, so an unchanged
 * document round-trips byte for byte.
 *
 * Encoding rules (json.encode, lua_json_to_tree):
 *   - a table marked "object": keys listed in __jsonorder first, in that
 *     order (those still present), then the other keys sorted bytewise;
 *   - a table marked "array": must hold exactly the keys 1..n (n may be 0);
 *   - an unmarked table: an array when it is a non-empty sequence 1..n and
 *     nothing else, else an object with its keys sorted bytewise (so an
 *     empty unmarked table is {}: use json.array() for []);
 *   - object keys must be strings: another key type is an error naming it;
 *   - integers as %lld; floats: integral ones inside the int64 range as
 *     integers (Go decoders reject "1.0" for an integer field, and Lua's
 *     `/` yields floats), others as the shortest text that reads back to
 *     the same double; NaN and infinities are errors;
 *   - nesting deeper than LUA_JSON_MAX_DEPTH and cycles are errors;
 *   - functions, threads, full userdata and light userdata other than
 *     json.null are errors. Errors name where: "$.config.Env[2]: ...".
 *   Strings are written as json_serialize() writes them (invalid UTF-8
 *   becomes U+FFFD).
 */
#ifndef REGFACADE_LUA_JSON_H
#define REGFACADE_LUA_JSON_H

#include <lua.h>
#include <stdbool.h>
#include <stddef.h>

#include "regfacade/json.h"

/* Nesting limit for decode, encode and both conversions (the same count as
 * json_parse's max_depth: a document of 64 nested containers passes). */
#define LUA_JSON_MAX_DEPTH 64

/* Registry name of the shared array metatable. */
#define LUA_JSON_ARRAY_MT "regfacade.json.array"

/* require "regfacade.json": a table with
 *   decode(text)         -> value; raises "json.decode: json: <why> at byte N"
 *   encode(value)        -> compact text; raises "json.encode: $.path: <why>"
 *   null                 JSON null
 *   object([t [, keys]]) -> t (a new table when nil) marked as an object,
 *                          keys (an array of strings) its key order
 *   array([t])           -> t (a new table when nil) marked as an array */
int luaopen_regfacade_json(lua_State *L);

/* Push json.null. */
void lua_json_push_null(lua_State *L);

/* True when the value at idx is json.null. */
bool lua_json_is_null(lua_State *L, int idx);

/* Push the Lua value of a tree (shape above). Returns 0 with one value
 * pushed; -1 with nothing pushed when the tree nests deeper than
 * LUA_JSON_MAX_DEPTH or the Lua stack cannot grow. Like any Lua API call it
 * may raise a memory error: call it in protected mode. The tree stays the
 * caller's. */
int lua_json_push(lua_State *L, const json_value *v);

/* A new tree (caller frees with json_free) for the Lua value at idx, by the
 * encoding rules above; NULL with "$.path: why" in err. It raises nothing
 * once it has started building (so it never leaks a partial tree), but it
 * interns three key strings first, which can raise a memory error: call it
 * in protected mode. Only raw accesses: metamethods are not run. */
json_value *lua_json_to_tree(lua_State *L, int idx, char *err, size_t errlen);

/* Same, with root naming the value in error paths instead of "$" (e.g.
 * "img.config" gives "img.config.config.Env[2]: ..."). */
json_value *lua_json_to_tree_named(lua_State *L, int idx, const char *root, char *err, size_t errlen);

#endif
