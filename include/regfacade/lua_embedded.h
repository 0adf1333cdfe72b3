/*
 * lua_embedded: the Lua library (lua/regfacade/NAME.lua) compiled into the
 * binary by tools/embed.c, so regfacade runs from any folder.
 */
#ifndef REGFACADE_LUA_EMBEDDED_H
#define REGFACADE_LUA_EMBEDDED_H

#include <stddef.h>

typedef struct {
    const char *module;    /* "regfacade.mirror" */
    const char *chunkname; /* "@lua/regfacade/mirror.lua", for tracebacks */
    const char *source;
    size_t len;
} embedded_module;

/* Terminated by an entry whose module is NULL. */
extern const embedded_module embedded_lua_modules[];

#endif
