# regfacade.core as a Lua C module for busted: build/lua/regfacade/core.so,
# found by `require "regfacade.core"` with package.cpath "build/lua/?.so"
# (lua/regfacade/testing.lua adds it). Not build/regfacade/core.so: that
# path is taken by the server binary build/regfacade.
#
# Included by the Makefile (`include mk/lua_core.mk`); uses its CC, CFLAGS
# (SANITIZE=1 included), LDFLAGS and BUILD. Objects are compiled again with
# -fPIC into $(BUILD)/pic/. liblua is NOT linked: the interpreter that
# loads the module provides the Lua symbols. Target: lua-core.

# Include it after BUILD and CFLAGS are set (e.g. at the end of the
# Makefile): rule targets are expanded when read. It never becomes the
# default goal.
ifeq ($(strip $(BUILD)),)
$(error mk/lua_core.mk: include it after BUILD is set)
endif
LUA_CORE_SAVED_GOAL := $(.DEFAULT_GOAL)

LUA_CORE_SRCS := src/errmsg.c src/lua_core.c src/lua_json.c src/image_rewrite.c src/image.c src/json.c src/digest.c src/ref.c \
                 src/lua_deny.c src/oci_error.c
LUA_CORE_OBJS := $(patsubst src/%.c,$(BUILD)/pic/%.o,$(LUA_CORE_SRCS))
LUA_CORE_SO := $(BUILD)/lua/regfacade/core.so

.PHONY: lua-core
lua-core: $(LUA_CORE_SO)

# busted specs load the module: build it first.
test-lua: $(LUA_CORE_SO)

$(LUA_CORE_SO): $(LUA_CORE_OBJS)
	@mkdir -p $(dir $@)
	$(CC) -shared $(LDFLAGS) -o $@ $(LUA_CORE_OBJS) -lcrypto

$(BUILD)/pic/%.o: src/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -fPIC -c -o $@ $<

.DEFAULT_GOAL := $(LUA_CORE_SAVED_GOAL)
