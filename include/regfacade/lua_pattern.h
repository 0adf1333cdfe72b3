/*
 * lua_pattern: Lua 5.4's string pattern functions (string.find,
 * string.match, string.gmatch, string.gsub) for the policy sandbox, with
 * a budget. The stock ones match inside one C call where the count hook
 * never fires: a backtracking pattern on request data (a User-Agent, a
 * path) could run for minutes, or forever, on a server thread. These
 * count their matching steps and hand them to lua_sandbox_steps() every
 * LUA_PATTERN_CHECK_EVERY steps, which stops the call once it is past its
 * instruction or time budget, exactly like a Lua loop (one step counts as
 * one instruction of policy.hook_instructions).
 *
 * Same pattern language, results and error messages as Lua 5.4's
 * lstrlib.c (character classes, sets, the four quantifiers, anchors,
 * captures and position captures, %b, %f, back-references, gsub's
 * string/table/function replacements), written for regfacade; plain
 * string.find (no specials, or plain = true) searches with memmem. A
 * pattern nests at most 200 levels deep ("pattern too complex").
 */
#ifndef REGFACADE_LUA_PATTERN_H
#define REGFACADE_LUA_PATTERN_H

#include <lua.h>

#define LUA_PATTERN_CHECK_EVERY 1024

/* Replace find, match, gmatch and gsub in the string library table at
 * idx (a sandbox state's, before it is frozen). */
void lua_pattern_install(lua_State *L, int idx);

#endif
