/*
 * lua_core: the busted module regfacade.core (src/lua_core.c): the
 * server's assembly code callable from Lua. Its one C entry beside the
 * module loader is the stack reader, shared with regfacade.policy
 * (lua_policy_module.c), so both read a spec's layer stack alike.
 */
#ifndef REGFACADE_LUA_CORE_H
#define REGFACADE_LUA_CORE_H

#include <lua.h>
#include <stddef.h>

#include "regfacade/image.h"

/* The stack at idx (an array of "base" or layer tables, as
 * core.assemble takes it) as image layers, *n of them. What they point to
 * is owned by a userdata pushed on L's stack (freed when it is collected):
 * keep it there while the layers are used. Raises "regfacade.core: ..."
 * for a malformed stack. */
const image_layer *lua_core_stack(lua_State *L, int idx, size_t *n);

#endif
