# regfacade.policy as a Lua C module for busted: build/lua/regfacade/policy.so,
# the server's own config loader, policy dispatcher and assembly
# (lua_policy_module.c over config.c, policy.c, generate.c and what they
# link), loadable by `require "regfacade.policy"` (testing.policy).
# Same conventions as mk/lua_core.mk: objects again with -fPIC in
# $(BUILD)/pic/, liblua not linked (the interpreter provides it). Include
# after BUILD, CFLAGS and LIB_OBJS are set. Target: lua-policy.
ifeq ($(strip $(BUILD)),)
$(error mk/lua_policy.mk: include it after BUILD is set)
endif
LUA_POLICY_SAVED_GOAL := $(.DEFAULT_GOAL)

# Every server object but main: the policy code reaches most of them
# (layers, fetch, metrics, specs).
LUA_POLICY_OBJS := $(patsubst $(BUILD)/obj/%.o,$(BUILD)/pic/%.o,$(LIB_OBJS))
LUA_POLICY_SO := $(BUILD)/lua/regfacade/policy.so

.PHONY: lua-policy
lua-policy: $(LUA_POLICY_SO)

# busted specs load the module: build it first.
test-lua: $(LUA_POLICY_SO)

$(LUA_POLICY_SO): $(LUA_POLICY_OBJS)
	@mkdir -p $(dir $@)
	$(CC) -shared $(LDFLAGS) -o $@ $(LUA_POLICY_OBJS) $(filter-out -llua5.4,$(PKG_LIBS))

.DEFAULT_GOAL := $(LUA_POLICY_SAVED_GOAL)
