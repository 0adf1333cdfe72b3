# regfacade.sandbox as a Lua C module for busted: build/lua/regfacade/sandbox.so,
# the server's own policy sandbox (src/lua_sandbox.c, lua_regfacade.c,
# lua_shared.c) loadable by `require "regfacade.sandbox"` (lua/regfacade/testing.lua
# puts build/lua/?.so on package.cpath). Same conventions as mk/lua_core.mk:
# objects again with -fPIC in $(BUILD)/pic/, liblua not linked (the interpreter
# provides it). Include after BUILD and CFLAGS are set. Target: lua-sandbox.
ifeq ($(strip $(BUILD)),)
$(error mk/lua_sandbox.mk: include it after BUILD is set)
endif
LUA_SANDBOX_SAVED_GOAL := $(.DEFAULT_GOAL)

LUA_SANDBOX_SRCS := src/lua_sandbox_module.c src/lua_sandbox.c src/lua_pattern.c src/lua_regfacade.c src/lua_shared.c \
                    src/lua_deny.c src/oci_error.c \
                    src/lua_json.c src/json.c src/digest.c src/log.c
LUA_SANDBOX_OBJS := $(patsubst src/%.c,$(BUILD)/pic/%.o,$(LUA_SANDBOX_SRCS)) $(BUILD)/pic/lua_embedded.o
LUA_SANDBOX_SO := $(BUILD)/lua/regfacade/sandbox.so

.PHONY: lua-sandbox
lua-sandbox: $(LUA_SANDBOX_SO)

# busted specs load the module: build it first.
test-lua: $(LUA_SANDBOX_SO)

$(LUA_SANDBOX_SO): $(LUA_SANDBOX_OBJS)
	@mkdir -p $(dir $@)
	$(CC) -shared $(LDFLAGS) -o $@ $(LUA_SANDBOX_OBJS) -lcrypto -lcrypt

$(BUILD)/pic/lua_embedded.o: $(BUILD)/lua_embedded.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fPIC -c -o $@ $<

.DEFAULT_GOAL := $(LUA_SANDBOX_SAVED_GOAL)
