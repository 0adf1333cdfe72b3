# Fuzzing (included by the top-level Makefile).
#
#   make fuzz                    each target for FUZZ_SECONDS (default 30) with
#                                clang -fsanitize=fuzzer,address,undefined on
#                                fuzz/corpus/<target>/ (new finds go to
#                                $(BUILD)/fuzz/new/<target>/; `make fuzz-merge`
#                                folds them into the kept corpus)
#   make fuzz FUZZ_TARGETS=fuzz_json FUZZ_SECONDS=600
#   make test-fuzz-regressions   (part of `make test`) every kept input,
#                                fuzz/regressions/<target>/ and the corpus, fed
#                                once to each target built with $(CC) plus
#                                fuzz/driver.c under ASan/UBSan: no libFuzzer,
#                                no clang needed
#
# A crash stops `make fuzz` with the input saved as
# $(BUILD)/fuzz/crash-<target>-<sha1>. Fix the bug, then keep the input:
#   cp $(BUILD)/fuzz/crash-fuzz_json-... fuzz/regressions/fuzz_json/<what-it-was>

FUZZ_CC ?= clang
FUZZ_SECONDS ?= 30
FUZZ_TARGETS ?= fuzz_ref fuzz_range fuzz_www_authenticate fuzz_docker_config fuzz_json fuzz_client_auth \
                fuzz_image
FUZZ_PKGS := clang libclang-rt-14-dev

# What each target links (sources compiled into it; no libmicrohttpd, curl, Lua).
FUZZ_SRCS_fuzz_ref := src/ref.c src/json.c src/errmsg.c
FUZZ_SRCS_fuzz_range := src/ref.c src/json.c src/errmsg.c
FUZZ_SRCS_fuzz_www_authenticate := src/ref.c src/json.c src/errmsg.c
FUZZ_SRCS_fuzz_docker_config := src/ref.c src/json.c src/errmsg.c
FUZZ_SRCS_fuzz_json := src/json.c
FUZZ_SRCS_fuzz_client_auth := src/client_auth.c src/ref.c src/json.c src/errmsg.c
FUZZ_SRCS_fuzz_image := src/image.c src/json.c src/ref.c src/digest.c src/errmsg.c
FUZZ_LIBS := -lcrypto

FUZZ_COMMON := -std=c11 -D_GNU_SOURCE -g -Iinclude -Ifuzz -fno-omit-frame-pointer
FUZZ_FLAGS := $(FUZZ_COMMON) -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
# The regression build: the same sources, any compiler, a main() driver.
REGR_FLAGS := $(FUZZ_COMMON) -O1 -fsanitize=address,undefined -fno-sanitize-recover=undefined

FUZZ_HDRS := $(wildcard include/regfacade/*.h) fuzz/fuzz.h

.PHONY: fuzz fuzz-deps fuzz-build fuzz-merge test-fuzz-regressions

fuzz-deps:
	@./tools/ensure-packages $(FUZZ_PKGS)

# One pair of rules per target (explicit, so no .SECONDEXPANSION leaks into
# the makefiles included after this one).
define FUZZ_RULES
$(BUILD)/fuzz/$(1): fuzz/$(1).c $(FUZZ_SRCS_$(1)) $(FUZZ_HDRS)
	@mkdir -p $(BUILD)/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $$@ fuzz/$(1).c $(FUZZ_SRCS_$(1)) $(FUZZ_LIBS)

$(BUILD)/fuzz-regress/$(1): fuzz/$(1).c fuzz/driver.c $(FUZZ_SRCS_$(1)) $(FUZZ_HDRS)
	@mkdir -p $(BUILD)/fuzz-regress
	$(CC) $(REGR_FLAGS) -o $$@ fuzz/$(1).c fuzz/driver.c $(FUZZ_SRCS_$(1)) $(FUZZ_LIBS)
endef
$(foreach t,$(FUZZ_TARGETS),$(eval $(call FUZZ_RULES,$(t))))

fuzz-build: fuzz-deps $(addprefix $(BUILD)/fuzz/,$(FUZZ_TARGETS))

fuzz: fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(BUILD)/fuzz/new/$$t fuzz/corpus/$$t fuzz/regressions/$$t; \
	  dict=""; [ -f fuzz/dict/$$t.dict ] && dict="-dict=fuzz/dict/$$t.dict"; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS)s"; \
	  $(BUILD)/fuzz/$$t -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
	    -print_final_stats=1 -artifact_prefix=$(BUILD)/fuzz/crash-$$t- $$dict \
	    $(BUILD)/fuzz/new/$$t fuzz/corpus/$$t fuzz/regressions/$$t 2>$(BUILD)/fuzz/$$t.log || { \
	      tail -60 $(BUILD)/fuzz/$$t.log; \
	      echo "fuzz: $$t found a crash: $$(ls -t $(BUILD)/fuzz/crash-$$t-* 2>/dev/null | head -1)"; \
	      echo "      fix it, then keep the input in fuzz/regressions/$$t/"; exit 1; }; \
	  grep -E "stat::number_of_executed_units|stat::new_units_added" $(BUILD)/fuzz/$$t.log | tr '\n' ' '; echo; \
	done

# Minimize the kept corpus together with what the last runs found. The
# hand-written seeds (seed-*, from fuzz/seeds.py) are always kept.
fuzz-merge: fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
	  rm -rf $(BUILD)/fuzz/merged/$$t; mkdir -p $(BUILD)/fuzz/new/$$t $(BUILD)/fuzz/merged/$$t; \
	  cp fuzz/corpus/$$t/seed-* $(BUILD)/fuzz/merged/$$t/ 2>/dev/null || true; \
	  $(BUILD)/fuzz/$$t -merge=1 $(BUILD)/fuzz/merged/$$t fuzz/corpus/$$t $(BUILD)/fuzz/new/$$t 2>/dev/null; \
	  rm -rf fuzz/corpus/$$t && mv $(BUILD)/fuzz/merged/$$t fuzz/corpus/$$t; \
	  echo "fuzz-merge: $$t: $$(ls fuzz/corpus/$$t | wc -l) inputs"; \
	done

test-fuzz-regressions: $(addprefix $(BUILD)/fuzz-regress/,$(FUZZ_TARGETS))
	@set -e; for t in $(FUZZ_TARGETS); do \
	  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    $(BUILD)/fuzz-regress/$$t fuzz/regressions/$$t fuzz/corpus/$$t 2>$(BUILD)/fuzz-regress/$$t.log || { \
	      tail -40 $(BUILD)/fuzz-regress/$$t.log; echo "test-fuzz-regressions: $$t failed"; exit 1; }; \
	done
