# regfacade: `make` builds build/regfacade, `make test` runs every test,
# `make run` starts the embedded default (a mirror on 127.0.0.1:5000).
# Missing Debian packages are installed first (apt-get, via sudo when not root).

VERSION := 0.1.0
CC ?= cc
SANITIZE ?=
# `make test SANITIZE=1`: everything (regfacade, unit tests) built with
# AddressSanitizer + UndefinedBehaviorSanitizer into its own folder, and the
# whole suite run against that build (the integration harness fails a test
# whose regfacade log holds a sanitizer report).
ifeq ($(SANITIZE),1)
  BUILD ?= build-asan
  # Leaks are reported too (the suite ran clean with them on); set
  # ASAN_OPTIONS=detect_leaks=0 in the environment to silence them.
  export ASAN_OPTIONS ?= detect_leaks=1
  export UBSAN_OPTIONS ?= print_stacktrace=1:halt_on_error=1
endif
BUILD ?= build

BUILD_PKGS := gcc make pkg-config libmicrohttpd-dev libcurl4-openssl-dev libssl-dev \
              zlib1g-dev liblua5.4-dev lua5.4 lua-cjson libarchive-dev libhiredis-dev
TEST_PKGS  := lua-busted docker-registry skopeo containerd runc podman umoci busybox-static \
              apache2-utils python3 python3-pytest python3-cryptography python3-jwt openssl curl zstd \
              python3-yaml binutils docker.io systemd prometheus kubectl=kubernetes-client \
              clang-format lua-check procps redis-server haproxy
# redis-server, haproxy: the cluster tests (3 replicas sharing one Redis behind a
# round-robin front).
# procps: /bin/kill, which the systemd unit's ExecReload names (systemd-analyze verify
# checks it; Debian's minimal root has no procps).
# `make bench` (bench/bench.py): the peers and load tools it runs side by side.
BENCH_PKGS := nginx wrk docker-registry skopeo containerd curl python3

# pkg-config's answers, asked only once the packages are in. $(BUILD)/pkg.mk
# is made (ensure-packages first, then pkg-config) before anything else, and
# make then reads this Makefile again with it: on a machine that had none of
# the packages, the first `make`, `make test`, `make run` or `make bench`
# compiles with the right flags (and every $(shell ...) here sees them too).
PKG_MODULES := lua5.4 libmicrohttpd libcurl libarchive hiredis
.DEFAULT_GOAL := all
ifneq ($(filter-out clean,$(or $(MAKECMDGOALS),all)),)
include $(BUILD)/pkg.mk
endif
PKG_LIBS = $(PKG_MODULE_LIBS) -lcrypto -lcrypt -lz -lpthread -lm

$(BUILD)/pkg.mk: Makefile tools/ensure-packages
	@./tools/ensure-packages $(BUILD_PKGS)
	@mkdir -p $(@D)
	@cflags=$$(pkg-config --cflags $(PKG_MODULES)) && libs=$$(pkg-config --libs $(PKG_MODULES)) || { \
	  echo "Makefile: pkg-config --cflags/--libs $(PKG_MODULES) failed (packages: $(BUILD_PKGS))" >&2; exit 1; }; \
	printf 'PKG_CFLAGS := %s\nPKG_MODULE_LIBS := %s\n' "$$cflags" "$$libs" > $@.tmp && mv $@.tmp $@

CFLAGS ?= -O2 -g
CFLAGS += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wno-unused-parameter -Wno-format-truncation \
          -Iinclude -I$(BUILD) $(PKG_CFLAGS) -DREGFACADE_VERSION=\"$(VERSION)\"
LDFLAGS ?=
ifeq ($(SANITIZE),1)
  CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  LDFLAGS += -fsanitize=address,undefined
endif

SRCS := $(wildcard src/*.c)
OBJS := $(patsubst src/%.c,$(BUILD)/obj/%.o,$(SRCS)) $(BUILD)/obj/lua_embedded.o
LIB_OBJS := $(filter-out $(BUILD)/obj/main.o,$(OBJS))
# testing.lua is for busted only (it needs the regfacade.core module).
LUA_FILES := $(sort $(filter-out lua/regfacade/testing.lua,$(wildcard lua/regfacade/*.lua)))
UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRCS))

# Under SANITIZE=1 the busted modules (regfacade.core, regfacade.sandbox) are
# ASan builds: the lua5.4 interpreter must load the sanitizer runtimes first.
ifeq ($(SANITIZE),1)
  LUA_MODULE_PRELOAD := $(shell $(CC) -print-file-name=libasan.so) $(shell $(CC) -print-file-name=libubsan.so)
  BUSTED_PRELOAD := LD_PRELOAD="$(LUA_MODULE_PRELOAD)" ASAN_OPTIONS=detect_leaks=0
endif
BUSTED := $(BUSTED_PRELOAD) REGFACADE_BUILD=$(BUILD) LUA_PATH_5_4="lua/?.lua;lua/?/init.lua;spec/?.lua;/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;;" lua5.4 /usr/bin/busted --ignore-lua

.PHONY: all deps test-deps test test-unit test-lua test-integration run clean bench install

# `make install [PREFIX=/usr/local] [DESTDIR=]`: the binary, the Lua library
# and the busted C modules where Lua 5.4 finds them under PREFIX, the
# regfacade-busted wrapper (busted on Lua 5.4 with those paths) and the man
# page. Debian's lua5.4 looks in /usr/local/share/lua/5.4 and
# /usr/local/lib/lua/5.4 by itself; regfacade-busted works for any PREFIX.
PREFIX ?= /usr/local
DESTDIR ?=
INSTALL_LUADIR := $(PREFIX)/share/lua/5.4
INSTALL_LUACDIR := $(PREFIX)/lib/lua/5.4

all: deps $(BUILD)/regfacade

# Install what is missing, and only that (a fresh Debian 12 machine has none of it).
deps:
	@./tools/ensure-packages $(BUILD_PKGS)

test-deps:
	@./tools/ensure-packages $(BUILD_PKGS) $(TEST_PKGS)

$(BUILD)/regfacade: $(OBJS)
	$(CC) $(LDFLAGS) -o $@ $(OBJS) $(PKG_LIBS)

# -MMD -MP: each object depends on the headers it includes, as the compiler
# saw them ($(BUILD)/obj/*.d, read below), not on every header.
DEPFLAGS = -MMD -MP
$(BUILD)/obj/%.o: src/%.c | $(BUILD)/obj
	$(CC) $(CFLAGS) $(DEPFLAGS) -c -o $@ $<

$(BUILD)/obj/lua_embedded.o: $(BUILD)/lua_embedded.c | $(BUILD)/obj
	$(CC) $(CFLAGS) -c -o $@ $<

$(BUILD)/lua_embedded.c: $(LUA_FILES) $(BUILD)/embed
	$(BUILD)/embed $@ $(LUA_FILES)

$(BUILD)/embed: tools/embed.c | $(BUILD)/obj
	$(CC) -std=c11 -Wall -Wextra -Werror -O2 -o $@ $<

$(BUILD)/obj $(BUILD)/tests:
	mkdir -p $@

$(BUILD)/tests/%: tests/unit/%.c $(LIB_OBJS) | $(BUILD)/tests
	$(CC) $(CFLAGS) $(DEPFLAGS) -Itests/unit $(LDFLAGS) -o $@ $< $(LIB_OBJS) $(PKG_LIBS)

test: test-deps lint $(BUILD)/regfacade test-unit test-fuzz-regressions test-lua test-integration

# `make lint`: the C files as .clang-format lays them out (clang-format 14,
# Debian 12's; `make format` rewrites them so) and the Lua as .luacheckrc
# wants it. Part of make test.
LINT_C := $(sort $(wildcard src/*.c include/regfacade/*.h tests/unit/*.c tests/unit/*.h fuzz/*.c fuzz/*.h tools/*.c))
.PHONY: lint format
lint: test-deps
	@clang-format --dry-run --Werror $(LINT_C) || { echo "make lint: C files not laid out as .clang-format says: make format" >&2; exit 1; }
	@luacheck --quiet --no-color lua examples spec || { echo "make lint: luacheck found problems (above)" >&2; exit 1; }
format:
	clang-format -i $(LINT_C)

test-unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do $$t; done

test-lua:
	$(BUSTED)

# The OCI distribution-spec conformance suite (a prebuilt binary this
# repository does not hold): spec/integration/test_conformance.py runs its pull
# workflow when it is there, and is skipped, saying so, when it is not.
OCI_CONFORMANCE ?= ../shared/tools/oci-conformance/conformance.test

test-integration: $(BUILD)/regfacade
	@[ -x "$(OCI_CONFORMANCE)" ] || echo "test-integration: no OCI conformance suite at $(OCI_CONFORMANCE) (OCI_CONFORMANCE=...): its tests are skipped"
	cd spec/integration && REGFACADE_BIN=$(abspath $(BUILD)/regfacade) REGFACADE_BUILD_DIR=$(abspath $(BUILD)) \
	  REGFACADE_LUA_PRELOAD="$(LUA_MODULE_PRELOAD)" \
	  OCI_CONFORMANCE_SUITE=$(if $(wildcard $(OCI_CONFORMANCE)),$(abspath $(OCI_CONFORMANCE))) \
	  /usr/bin/python3 -m pytest -q -p no:cacheprovider .

# `make run [LISTEN=127.0.0.1:5000] [CACHE=./cache]`: the embedded default.
run: all
	$(BUILD)/regfacade serve $(if $(LISTEN),--listen $(LISTEN)) $(if $(CACHE),--cache-dir $(CACHE))

example-layers: ; ./examples/workspace/build.sh  # examples/workspace: supervisor layer and images (offline)

# Side-by-side benchmark on loopback (regfacade, distribution as a pull-through
# cache, nginx, the upstream itself); writes bench/RESULTS.md. Run by hand.
# BENCH_ARGS=--quick: fewer and shorter runs (a smoke test).
bench: all
	@./tools/ensure-packages $(BENCH_PKGS)
	/usr/bin/python3 bench/bench.py --regfacade $(CURDIR)/$(BUILD)/regfacade --out bench/RESULTS.md $(BENCH_ARGS)

install: all lua-core lua-sandbox lua-policy
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(INSTALL_LUADIR)/regfacade $(DESTDIR)$(INSTALL_LUACDIR)/regfacade \
	  $(DESTDIR)$(PREFIX)/share/man/man1
	install -m 0755 $(BUILD)/regfacade $(DESTDIR)$(PREFIX)/bin/regfacade
	install -m 0644 lua/regfacade/*.lua $(DESTDIR)$(INSTALL_LUADIR)/regfacade/
	install -m 0755 $(LUA_CORE_SO) $(LUA_SANDBOX_SO) $(LUA_POLICY_SO) $(DESTDIR)$(INSTALL_LUACDIR)/regfacade/
	sed -e 's|@LUADIR@|$(INSTALL_LUADIR)|g' -e 's|@LUACDIR@|$(INSTALL_LUACDIR)|g' tools/regfacade-busted.in \
	  > $(DESTDIR)$(PREFIX)/bin/regfacade-busted.tmp
	chmod 0755 $(DESTDIR)$(PREFIX)/bin/regfacade-busted.tmp
	mv $(DESTDIR)$(PREFIX)/bin/regfacade-busted.tmp $(DESTDIR)$(PREFIX)/bin/regfacade-busted
	install -m 0644 docs/man/regfacade.1 $(DESTDIR)$(PREFIX)/share/man/man1/regfacade.1
	@echo "installed under $(DESTDIR)$(PREFIX): bin/regfacade, bin/regfacade-busted, $(INSTALL_LUADIR)/regfacade, $(INSTALL_LUACDIR)/regfacade"

clean:
	rm -rf $(BUILD)

# `make fuzz` (libFuzzer, clang) and test-fuzz-regressions (part of `make test`).
-include $(wildcard $(BUILD)/obj/*.d $(BUILD)/pic/*.d $(BUILD)/tests/*.d)

include fuzz/fuzz.mk

include mk/lua_core.mk
include mk/lua_sandbox.mk
include mk/lua_policy.mk
