#include "regfacade/lua_sandbox.h"

#include <dlfcn.h>
#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <lualib.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/log.h"
#include "regfacade/lua_embedded.h"
#include "regfacade/lua_pattern.h"

/* Registry keys: the addresses of these statics (their values are never
 * used). */
static const char SB_KEY = 'S';     /* registry[&SB_KEY] = ctx (light userdata): "this is a sandbox" */
static const char LOADED_KEY = 'L'; /* the sandbox's own package.loaded */
static const char FROZEN_KEY = 'F'; /* marks a frozen table's metatable */
static const char NOTED_KEY = 'N';  /* the function lua_sandbox_note_function noted */

typedef struct {
    /* allocator */
    size_t used, cap;
    /* limits */
    uint64_t instr_limit;
    unsigned time_ms;
    /* the running call */
    bool armed;
    lua_sandbox_phase phase;
    struct timespec deadline;
    uint64_t instr;
    lua_sandbox_outcome tripped;
    bool broken;
    char where[200];        /* the last source position the count hook saw */
    const char *stack_base; /* an address on the C stack where the running call began */
    char defined[200];      /* where the function the call runs was defined */
    void *user[2];          /* lua_sandbox_user */
    /* require and io */
    char *module_dir, *base_dir, *data_dir;
    char **data_files;
    size_t n_data_files;
    lua_sandbox_module *modules;
    size_t n_modules;
} sb_ctx;

static sb_ctx *ctx_of(lua_State *L) { return *(sb_ctx **)lua_getextraspace(L); }

/* The ctx when L is a sandbox state; NULL in any other state (busted's own
 * interpreter loading a module that calls lua_sandbox_check_phase). */
static sb_ctx *sandbox_of(lua_State *L) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &SB_KEY);
    sb_ctx *c = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return c;
}

static const char *const PHASE_NAMES[SB_PHASE_COUNT] = {"none", "load",    "self_check", "authorize",
                                                        "spec", "resolve", "rewrite",    "log"};

const char *lua_sandbox_phase_name(lua_sandbox_phase p) { return p >= 0 && p < SB_PHASE_COUNT ? PHASE_NAMES[p] : "?"; }

/* ---------- allocator ---------- */

/* The state's allocator: realloc with a byte count and a cap. A refused
 * allocation makes Lua collect garbage and try again before it raises a
 * memory error, so a state near its cap keeps working while it has
 * garbage to free. */
static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    sb_ctx *c = ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        if (ptr) {
            free(ptr);
            c->used -= old;
        }
        return NULL;
    }
    if (nsize > old && c->cap && c->used - old + nsize > c->cap) return NULL;
    void *n = realloc(ptr, nsize);
    if (n) c->used = c->used - old + nsize;
    return n;
}

static int sb_panic(lua_State *L) {
    const char *msg = lua_tostring(L, -1);
    log_error("policy: unprotected Lua error (a bug in regfacade): %s", msg ? msg : "?");
    abort();
    return 0;
}

/* ---------- budget ---------- */

static bool past(const struct timespec *now, const struct timespec *deadline) {
    return now->tv_sec > deadline->tv_sec || (now->tv_sec == deadline->tv_sec && now->tv_nsec > deadline->tv_nsec);
}

static void sb_hook(lua_State *L, lua_Debug *ar);

static void trip_message(lua_State *L, sb_ctx *c, lua_Debug *ar) {
    char where[256] = "";
    if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0)
        snprintf(where, sizeof where, "%s:%d: ", ar->short_src, ar->currentline);
    if (c->tripped == SB_INSTRUCTIONS)
        lua_pushfstring(L, "%spolicy %s exceeded its instruction budget (%I instructions, policy.hook_instructions)",
                        where, lua_sandbox_phase_name(c->phase), (lua_Integer)c->instr_limit);
    else
        lua_pushfstring(L, "%spolicy %s exceeded its time budget (%d ms, policy.hook_time_ms)", where,
                        lua_sandbox_phase_name(c->phase), (int)c->time_ms);
}

/* Stop the running call: from now on on every line and instruction, in
 * this thread, so the script's own pcall only catches the error for it to
 * be raised again at the next instruction. ar: where (NULL: unknown). */
static void trip(lua_State *L, sb_ctx *c, lua_Debug *ar) {
    lua_sethook(L, sb_hook, LUA_MASKCOUNT | LUA_MASKLINE, 1);
    if (ar)
        trip_message(L, c, ar);
    else
        lua_pushfstring(L, "policy %s exceeded its %s budget", lua_sandbox_phase_name(c->phase),
                        c->tripped == SB_INSTRUCTIONS ? "instruction" : "time");
    lua_error(L);
}

/* Over the instruction or time budget now? Sets c->tripped. */
static bool over_budget(sb_ctx *c) {
    if (c->instr_limit && c->instr > c->instr_limit) {
        c->tripped = SB_INSTRUCTIONS;
        return true;
    }
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (c->time_ms && past(&now, &c->deadline)) {
        c->tripped = SB_TIME;
        return true;
    }
    return false;
}

void lua_sandbox_check_cstack(lua_State *L) {
    sb_ctx *c = ctx_of(L);
    char here;
    if (!c || !c->armed || !c->stack_base) return;
    /* Stacks grow down on every target this builds for. */
    ptrdiff_t used = c->stack_base - &here;
    if (used > (ptrdiff_t)LUA_SANDBOX_C_STACK_BYTES)
        luaL_error(L, "C stack overflow: string functions nested too deeply (more than %d KiB of C stack)",
                   LUA_SANDBOX_C_STACK_BYTES / 1024);
}

void lua_sandbox_steps(lua_State *L, unsigned n) {
    sb_ctx *c = ctx_of(L);
    if (!c || !c->armed) return;
    if (c->tripped == SB_OK) {
        c->instr += n;
        if (!over_budget(c)) return;
    }
    /* The position is the Lua code that called the C function counting. */
    lua_Debug ar;
    trip(L, c, lua_getstack(L, 1, &ar) ? &ar : NULL);
}

/* Installed for the state's life (threads created by coroutine.create copy
 * it); does something only while a call is armed. */
static void sb_hook(lua_State *L, lua_Debug *ar) {
    sb_ctx *c = ctx_of(L);
    if (!c || !c->armed) return;
    if (c->tripped == SB_OK) {
        c->instr += SB_COUNT_EVERY;
        if (!over_budget(c)) {
            /* Remembered for memory errors, which carry no position. */
            if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0)
                snprintf(c->where, sizeof c->where, "%s:%d", ar->short_src, ar->currentline);
            return;
        }
    }
    trip(L, c, ar);
}

static void arm(sb_ctx *c, lua_sandbox_phase ph, const char *stack_base) {
    /* (the noted function is replaced by the next call's note) */
    c->armed = true;
    c->stack_base = stack_base;
    c->phase = ph;
    c->instr = 0;
    c->tripped = SB_OK;
    c->where[0] = '\0';
    c->defined[0] = '\0';
    clock_gettime(CLOCK_MONOTONIC, &c->deadline);
    c->deadline.tv_nsec += (long)(c->time_ms % 1000) * 1000000L;
    c->deadline.tv_sec += c->time_ms / 1000 + c->deadline.tv_nsec / 1000000000L;
    c->deadline.tv_nsec %= 1000000000L;
}

static void disarm(sb_ctx *c) {
    c->armed = false;
    c->phase = SB_PHASE_NONE;
}

/* Message handler: the message and a traceback. Calls no metamethod (a
 * tripped budget makes any Lua code raise again). */
static int sb_traceback(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static void first_line(char *out, size_t outlen, const char *msg) {
    if (!out || !outlen) return;
    snprintf(out, outlen, "%s", msg);
    out[strcspn(out, "\n")] = '\0';
}

static void noted_position(lua_State *L, sb_ctx *c);

lua_sandbox_outcome lua_sandbox_call(lua_State *L, lua_sandbox_phase ph, int nargs, int nresults, char *err,
                                     size_t errlen, char *trace, size_t tracelen) {
    sb_ctx *c = ctx_of(L);
    int fn = lua_gettop(L) - nargs;
    if (err && errlen) err[0] = '\0';
    if (trace && tracelen) trace[0] = '\0';
    if (c->broken) {
        lua_settop(L, fn - 1);
        first_line(err, errlen, "policy: this Lua state was stopped before and cannot run again");
        if (trace && tracelen)
            snprintf(trace, tracelen, "policy: this Lua state was stopped before and cannot run again");
        return SB_ERROR;
    }
    if (!lua_checkstack(L, 4)) {
        lua_settop(L, fn - 1);
        first_line(err, errlen, "policy: Lua stack full");
        return SB_MEMORY;
    }
    lua_pushcfunction(L, sb_traceback);
    lua_insert(L, fn);
    lua_sandbox_phase outer = c->phase;
    bool was_armed = c->armed;
    char stack_mark; /* where this call's C stack begins (lua_sandbox_check_cstack) */
    if (!was_armed)
        arm(c, ph, &stack_mark);
    else
        c->phase = ph; /* a nested call (a hook calling back into C calling Lua): same budget */
    int st = lua_pcall(L, nargs, nresults, fn);
    lua_sandbox_outcome out = SB_OK;
    if (c->tripped != SB_OK)
        out = c->tripped;
    else if (st == LUA_ERRMEM)
        out = SB_MEMORY;
    else if (st != LUA_OK)
        out = SB_ERROR;
    if (!was_armed)
        disarm(c);
    else
        c->phase = outer;
    if (out == SB_OK) {
        lua_remove(L, fn);
        return SB_OK;
    }
    if (st == LUA_OK) lua_pop(L, nresults < 0 ? 0 : nresults); /* tripped, yet returned: not trusted */
    if (out == SB_TIME || out == SB_INSTRUCTIONS || out == SB_MEMORY) c->broken = true;
    const char *msg = st == LUA_OK ? NULL : lua_tostring(L, -1);
    char buf[512];
    if (out == SB_MEMORY) {
        if (!c->where[0]) noted_position(L, c);
        if (c->cap && c->where[0])
            snprintf(buf, sizeof buf,
                     "%s: policy %s exceeded its memory cap (%zu bytes, policy.memory_bytes) "
                     "(at or after this line)",
                     c->where, lua_sandbox_phase_name(ph), c->cap);
        else if (c->cap && c->defined[0])
            snprintf(buf, sizeof buf,
                     "%s: policy %s exceeded its memory cap (%zu bytes, policy.memory_bytes) "
                     "(in the function defined at this line)",
                     c->defined, lua_sandbox_phase_name(ph), c->cap);
        else if (c->cap)
            snprintf(buf, sizeof buf, "policy %s exceeded its memory cap (%zu bytes, policy.memory_bytes)",
                     lua_sandbox_phase_name(ph), c->cap);
        else
            snprintf(buf, sizeof buf, "policy %s: out of memory", lua_sandbox_phase_name(ph));
        msg = buf;
    } else if (!msg) {
        snprintf(buf, sizeof buf, "policy %s failed (no message)", lua_sandbox_phase_name(ph));
        msg = buf;
    }
    first_line(err, errlen, msg);
    if (trace && tracelen) snprintf(trace, tracelen, "%s", msg);
    lua_settop(L, fn - 1);
    return out;
}

bool lua_sandbox_broken(lua_State *L) { return ctx_of(L)->broken; }

void **lua_sandbox_user(lua_State *L) { return ctx_of(L)->user; }

void lua_sandbox_note_function(lua_State *L, int idx) {
    /* Only kept: its position is looked up when a memory error needs it. */
    lua_pushvalue(L, idx);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &NOTED_KEY);
}

/* c->defined from the noted function (after a memory error: the stack is
 * unwound, the registry is intact). */
static void noted_position(lua_State *L, sb_ctx *c) {
    lua_Debug ar;
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &NOTED_KEY) != LUA_TFUNCTION) {
        lua_pop(L, 1);
        return;
    }
    if (lua_getinfo(L, ">S", &ar) && ar.linedefined > 0) /* pops the function */
        snprintf(c->defined, sizeof c->defined, "%s:%d", ar.short_src, ar.linedefined);
}

lua_sandbox_phase lua_sandbox_current_phase(lua_State *L) {
    sb_ctx *c = sandbox_of(L);
    return c && c->armed ? c->phase : SB_PHASE_NONE;
}

void lua_sandbox_check_phase(lua_State *L, const char *fname, unsigned mask) {
    sb_ctx *c = sandbox_of(L);
    if (!c || !c->armed || c->phase == SB_PHASE_NONE) return;
    if (mask & SB_PHASE_BIT(c->phase)) return;
    char list[160] = "";
    for (int p = SB_PHASE_LOAD; p < SB_PHASE_COUNT; p++) {
        if (!(mask & SB_PHASE_BIT(p))) continue;
        if (list[0]) strncat(list, ", ", sizeof list - strlen(list) - 1);
        strncat(list, PHASE_NAMES[p], sizeof list - strlen(list) - 1);
    }
    luaL_error(L, "%s cannot be called in %s%s (only in: %s)", fname, c->phase == SB_PHASE_LOAD ? "" : "hook ",
               c->phase == SB_PHASE_LOAD ? "the policy's top-level code" : PHASE_NAMES[c->phase], list);
}

size_t lua_sandbox_memory(lua_State *L, size_t *cap) {
    sb_ctx *c = ctx_of(L);
    if (cap) *cap = c->cap;
    return c->used;
}

/* ---------- frozen tables ---------- */

static int ro_newindex(lua_State *L) {
    bool global = lua_toboolean(L, lua_upvalueindex(1));
    const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : luaL_typename(L, 2);
    if (global)
        return luaL_error(L,
                          "assignment to global '%s': globals are read-only in a policy (use a local, req.ctx "
                          "or regfacade.shared)",
                          k);
    return luaL_error(L, "attempt to change a read-only table (field '%s')", k);
}

static int strict_index(lua_State *L) {
    const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : luaL_typename(L, 2);
    return luaL_error(L, "undefined global '%s'", k);
}

/* lua_next as a lua_CFunction for __pairs. */
static int next_fn(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 2);
    if (lua_next(L, 1)) return 2;
    lua_pushnil(L);
    return 1;
}

static int ro_pairs_fn(lua_State *L) {
    lua_pushcfunction(L, next_fn);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushnil(L);
    return 3;
}

static int ro_len(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)luaL_len(L, lua_upvalueindex(1)));
    return 1;
}

static void freeze(lua_State *L, int idx, bool deep, bool global) {
    idx = lua_absindex(L, idx);
    luaL_checkstack(L, 8, "freeze");
    if (lua_getmetatable(L, idx)) {
        lua_pop(L, 1);
        return;
    }
    lua_newtable(L); /* shadow */
    int sh = lua_gettop(L);
    if (global) {
        lua_createtable(L, 0, 1);
        lua_pushcfunction(L, strict_index);
        lua_setfield(L, -2, "__index");
        lua_setmetatable(L, sh);
    }
    lua_createtable(L, 0, 6); /* the metatable, set first so a cycle back to this table stops */
    lua_pushvalue(L, sh);
    lua_setfield(L, -2, "__index");
    lua_pushboolean(L, global);
    lua_pushcclosure(L, ro_newindex, 1);
    lua_setfield(L, -2, "__newindex");
    lua_pushvalue(L, sh);
    lua_pushcclosure(L, ro_pairs_fn, 1);
    lua_setfield(L, -2, "__pairs");
    lua_pushvalue(L, sh);
    lua_pushcclosure(L, ro_len, 1);
    lua_setfield(L, -2, "__len");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_pushboolean(L, 1);
    lua_rawsetp(L, -2, &FROZEN_KEY);
    lua_setmetatable(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        if (deep && lua_type(L, -1) == LUA_TTABLE) freeze(L, -1, true, false);
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, sh); /* shadow[k] = v */
        lua_pushvalue(L, -1);
        lua_pushnil(L);
        lua_rawset(L, idx); /* t[k] = nil: allowed while traversing */
    }
    lua_pop(L, 1); /* shadow */
}

void lua_sandbox_freeze(lua_State *L, int idx, bool deep) { freeze(L, idx, deep, false); }

void lua_sandbox_contents(lua_State *L, int idx) {
    idx = lua_absindex(L, idx);
    if (lua_type(L, idx) == LUA_TTABLE && lua_getmetatable(L, idx)) {
        if (lua_rawgetp(L, -1, &FROZEN_KEY) == LUA_TBOOLEAN) {
            lua_pop(L, 1);
            lua_pushliteral(L, "__index");
            lua_rawget(L, -2);
            lua_remove(L, -2);
            return;
        }
        lua_pop(L, 2);
    }
    lua_pushvalue(L, idx);
}

bool lua_sandbox_is_frozen(lua_State *L, int idx) {
    if (!lua_getmetatable(L, idx)) return false;
    bool f = lua_rawgetp(L, -1, &FROZEN_KEY) == LUA_TBOOLEAN;
    lua_pop(L, 2);
    return f;
}

/* ---------- replaced base functions ---------- */

static int sb_rawset(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checkany(L, 2);
    luaL_checkany(L, 3);
    if (lua_sandbox_is_frozen(L, 1)) return luaL_error(L, "rawset: the table is read-only");
    lua_settop(L, 3);
    lua_rawset(L, 1);
    return 1;
}

static int sb_setmetatable(lua_State *L) {
    int t = lua_type(L, 2);
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_argexpected(L, t == LUA_TNIL || t == LUA_TTABLE, 2, "nil or table");
    if (luaL_getmetafield(L, 1, "__metatable") != LUA_TNIL) return luaL_error(L, "cannot change a protected metatable");
    if (t == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        if (lua_rawget(L, 2) != LUA_TNIL)
            return luaL_error(L, "setmetatable: __gc metamethods are not allowed in a policy (a finalizer runs "
                                 "outside any time budget)");
        lua_pop(L, 1);
    }
    lua_settop(L, 2);
    lua_setmetatable(L, 1);
    return 1;
}

static int sb_collectgarbage(lua_State *L) {
    const char *opt = luaL_optstring(L, 1, "collect");
    if (strcmp(opt, "count") != 0)
        return luaL_error(L, "collectgarbage(\"%s\") is not allowed in a policy (only \"count\")", opt);
    int k = lua_gc(L, LUA_GCCOUNT, 0), b = lua_gc(L, LUA_GCCOUNTB, 0);
    lua_pushnumber(L, (lua_Number)k + ((lua_Number)b / 1024));
    return 1;
}

static int sb_print(lua_State *L) {
    int n = lua_gettop(L);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = 1; i <= n; i++) {
        size_t l;
        const char *s = luaL_tolstring(L, i, &l);
        if (i > 1) luaL_addchar(&b, '\t');
        luaL_addvalue(&b);
        (void)s;
    }
    luaL_pushresult(&b);
    lua_Debug ar;
    char where[256] = "?";
    if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "Sl", &ar))
        snprintf(where, sizeof where, "%s:%d", ar.short_src, ar.currentline);
    log_msg(LOG_INFO, "policy %s: print: %s", where, lua_tostring(L, -1));
    return 0;
}

/* load(chunk [, chunkname [, mode [, env]]]): text only. */
static int sb_load(lua_State *L) {
    const char *mode = luaL_optstring(L, 3, "t");
    if (strcmp(mode, "t") != 0) {
        luaL_pushfail(L);
        lua_pushfstring(L, "load: mode \"%s\" is not allowed in a policy (text chunks only: \"t\")", mode);
        return 2;
    }
    int env = !lua_isnone(L, 4) ? 4 : 0;
    size_t len;
    const char *s;
    if (lua_type(L, 1) == LUA_TSTRING) {
        s = lua_tolstring(L, 1, &len);
        lua_pushvalue(L, 1);
    } else {
        luaL_checktype(L, 1, LUA_TFUNCTION);
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        for (;;) {
            lua_pushvalue(L, 1);
            lua_call(L, 0, 1);
            if (lua_isnil(L, -1)) {
                lua_pop(L, 1);
                break;
            }
            if (lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "reader function must return a string");
            if (lua_rawlen(L, -1) == 0) {
                lua_pop(L, 1);
                break;
            }
            luaL_addvalue(&b);
        }
        luaL_pushresult(&b);
        s = lua_tolstring(L, -1, &len);
    }
    const char *name = luaL_optstring(L, 2, lua_type(L, 1) == LUA_TSTRING ? s : "=(load)");
    int st = luaL_loadbufferx(L, s, len, name, "t");
    if (st != LUA_OK) {
        luaL_pushfail(L);
        lua_insert(L, -2);
        return 2;
    }
    if (env) {
        lua_pushvalue(L, env);
        if (!lua_setupvalue(L, -2, 1)) lua_pop(L, 1);
    }
    return 1;
}

static int sb_str_rep(lua_State *L) {
    sb_ctx *c = lua_touserdata(L, lua_upvalueindex(1));
    size_t l, lsep;
    luaL_checklstring(L, 1, &l);
    lua_Integer n = luaL_checkinteger(L, 2);
    luaL_optlstring(L, 3, "", &lsep);
    /* A result larger than the whole cap can never be made: refused here,
     * with the caller's line (a memory error would carry none). Smaller
     * ones are up to the allocator (and the garbage it can free). */
    if (n > 0 && c->cap) {
        size_t unit = l + lsep;
        if (unit > 0 && (lua_Unsigned)n > c->cap / unit)
            return luaL_error(L,
                              "string.rep: a result of about %I x %I bytes is larger than the policy's memory "
                              "cap (policy.memory_bytes)",
                              n, (lua_Integer)unit);
    }
    lua_pushvalue(L, lua_upvalueindex(2));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

/* ---------- data files: io.open and regfacade.read_file ---------- */

/* The real path of an allowed data file, or -1 with a message pushed. */
static int data_path(lua_State *L, sb_ctx *c, const char *path, char real[PATH_MAX]) {
    char full[PATH_MAX];
    if (path[0] != '/' && c->base_dir)
        snprintf(full, sizeof full, "%s/%s", c->base_dir, path);
    else
        snprintf(full, sizeof full, "%s", path);
    bool allowed = false;
    if (realpath(full, real)) {
        for (size_t i = 0; i < c->n_data_files && !allowed; i++) allowed = strcmp(real, c->data_files[i]) == 0;
        if (!allowed && c->data_dir) {
            size_t n = strlen(c->data_dir);
            allowed = strncmp(real, c->data_dir, n) == 0 && real[n] == '/';
        }
        struct stat st;
        if (allowed && (stat(real, &st) != 0 || !S_ISREG(st.st_mode))) {
            lua_pushfstring(L, "%s: not a regular file", path);
            return -1;
        }
    }
    if (!allowed) {
        /* The same answer whether or not the file exists: no probing. */
        lua_pushfstring(L, "%s: not a data file this policy may read (config policy.data_files, policy.data_dir)",
                        path);
        return -1;
    }
    return 0;
}

static int sb_fclose(lua_State *L) {
    luaL_Stream *p = (luaL_Stream *)luaL_checkudata(L, 1, LUA_FILEHANDLE);
    int res = fclose(p->f);
    return luaL_fileresult(L, res == 0, NULL);
}

/* io.open(path [, "r" | "rb"]) on an allowed data file. */
static int sb_io_open(lua_State *L) {
    sb_ctx *c = lua_touserdata(L, lua_upvalueindex(1));
    const char *path = luaL_checkstring(L, 1);
    const char *mode = luaL_optstring(L, 2, "r");
    if (strcmp(mode, "r") != 0 && strcmp(mode, "rb") != 0)
        return luaL_error(L, "io.open: mode \"%s\" is not allowed in a policy (data files are read-only: \"r\")", mode);
    char real[PATH_MAX];
    if (data_path(L, c, path, real) != 0) {
        luaL_pushfail(L);
        lua_insert(L, -2);
        return 2;
    }
    luaL_Stream *p = (luaL_Stream *)lua_newuserdatauv(L, sizeof(luaL_Stream), 0);
    p->closef = NULL;
    luaL_setmetatable(L, LUA_FILEHANDLE);
    p->f = fopen(real, "rb");
    if (!p->f) return luaL_fileresult(L, 0, path);
    p->closef = sb_fclose;
    return 1;
}

#define SB_READ_FILE_MAX (64u * 1024 * 1024)

int lua_sandbox_read_file(lua_State *L) {
    sb_ctx *c = sandbox_of(L);
    const char *path = luaL_checkstring(L, 1);
    if (!c) return luaL_error(L, "regfacade.read_file: not in a policy sandbox");
    char real[PATH_MAX];
    if (data_path(L, c, path, real) != 0) {
        luaL_where(L, 1);
        lua_insert(L, -2);
        lua_concat(L, 2);
        return lua_error(L);
    }
    FILE *f = fopen(real, "rb");
    if (!f) return luaL_error(L, "regfacade.read_file: %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || (uint64_t)st.st_size > SB_READ_FILE_MAX ||
        (c->cap && (size_t)st.st_size > c->cap)) {
        fclose(f);
        return luaL_error(L, "regfacade.read_file: %s is larger than the policy's memory cap (or 64 MiB)", path);
    }
    /* The buffer is a userdata: a memory error leaks nothing but the FILE,
     * closed before anything can raise. */
    size_t size = (size_t)st.st_size;
    char *buf = size ? lua_newuserdatauv(L, size, 0) : NULL;
    size_t n = size ? fread(buf, 1, size, f) : 0;
    int bad = ferror(f);
    fclose(f);
    if (bad) return luaL_error(L, "regfacade.read_file: %s: read error", path);
    lua_pushlstring(L, buf ? buf : "", n);
    return 1;
}

/* ---------- require ---------- */

static bool module_name_ok(const char *name) {
    if (!*name || name[0] == '.' || strstr(name, "..")) return false;
    for (const char *p = name; *p; p++) {
        char ch = *p;
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
              ch == '.' || ch == '-'))
            return false;
    }
    return name[strlen(name) - 1] != '.';
}

/* cjson: Debian's lua-cjson for 5.4, found once per process on the
 * default C path (absolute entries only) and opened with dlopen; the
 * function pointers never change after (a static that is immutable once
 * set: no per-state data). */
static pthread_once_t cjson_once = PTHREAD_ONCE_INIT;
static lua_CFunction cjson_open, cjson_safe_open;

static void cjson_find(void) {
    const char *path = LUA_CPATH_DEFAULT;
    while (*path) {
        size_t n = strcspn(path, ";");
        char tmpl[PATH_MAX], file[PATH_MAX];
        if (n > 0 && n < sizeof tmpl && path[0] == '/') {
            memcpy(tmpl, path, n);
            tmpl[n] = '\0';
            char *q = strchr(tmpl, '?');
            if (q) {
                *q = '\0';
                snprintf(file, sizeof file, "%scjson%s", tmpl, q + 1);
                if (access(file, R_OK) == 0) {
                    void *h = dlopen(file, RTLD_NOW | RTLD_LOCAL);
                    if (h) {
                        cjson_open = (lua_CFunction)dlsym(h, "luaopen_cjson");
                        cjson_safe_open = (lua_CFunction)dlsym(h, "luaopen_cjson_safe");
                        if (cjson_open) return;
                    }
                }
            }
        }
        path += n;
        if (*path == ';') path++;
    }
}

/* cjson in a policy: the module as lua-cjson makes it, with its depth
 * limits fixed (SB_CJSON_MAX_DEPTH both ways: a policy that raised them
 * could have one deeply nested header overflow a server thread's C stack,
 * since cjson recurses per level) and decode refusing texts over
 * SB_CJSON_MAX_BYTES (cjson is for request data and small documents;
 * image documents go through regfacade.json). The setters of the depth
 * limits answer their value and refuse a new one; cjson.new() gives an
 * instance limited the same way. */
#define SB_CJSON_MAX_DEPTH 64
#define SB_CJSON_MAX_BYTES (1024 * 1024)

/* upvalues: the module's decode, safe (a boolean) */
static int cjson_decode_bounded(lua_State *L) {
    size_t n = 0;
    if (lua_type(L, 1) == LUA_TSTRING && (lua_tolstring(L, 1, &n), n > SB_CJSON_MAX_BYTES)) {
        lua_pushfstring(L,
                        "cjson.decode: the text is %I bytes, more than the policy sandbox allows (%d; use "
                        "regfacade.json for large documents)",
                        (lua_Integer)n, SB_CJSON_MAX_BYTES);
        if (!lua_toboolean(L, lua_upvalueindex(2))) {
            luaL_where(L, 1); /* the policy's file and line first */
            lua_insert(L, -2);
            lua_concat(L, 2);
            return lua_error(L);
        }
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

/* upvalues: the module's setter, its name */
static int cjson_fixed(lua_State *L) {
    if (!lua_isnoneornil(L, 1))
        return luaL_error(L,
                          "cjson.%s: fixed at %d by the policy sandbox (a deeper document could exhaust the C "
                          "stack)",
                          lua_tostring(L, lua_upvalueindex(2)), SB_CJSON_MAX_DEPTH);
    lua_settop(L, 0);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_call(L, 0, LUA_MULTRET);
    return lua_gettop(L);
}

static int cjson_new_bounded(lua_State *L);

/* Replace the cjson instance on top of the stack with its sandboxed face. */
static void cjson_limit(lua_State *L, bool safe) {
    int raw = lua_gettop(L);
    static const char *const depths[] = {"decode_max_depth", "encode_max_depth"};
    for (int i = 0; i < 2; i++) {
        lua_getfield(L, raw, depths[i]);
        lua_pushinteger(L, SB_CJSON_MAX_DEPTH);
        lua_call(L, 1, 0);
    }
    lua_createtable(L, 0, 16);
    int t = lua_gettop(L);
    static const char *const kept[] = {"encode",
                                       "null",
                                       "_NAME",
                                       "_VERSION",
                                       "encode_sparse_array",
                                       "encode_number_precision",
                                       "encode_keep_buffer",
                                       "encode_invalid_numbers",
                                       "decode_invalid_numbers",
                                       NULL};
    for (const char *const *k = kept; *k; k++) {
        lua_getfield(L, raw, *k);
        lua_setfield(L, t, *k);
    }
    lua_getfield(L, raw, "decode");
    lua_pushboolean(L, safe);
    lua_pushcclosure(L, cjson_decode_bounded, 2);
    lua_setfield(L, t, "decode");
    for (int i = 0; i < 2; i++) {
        lua_getfield(L, raw, depths[i]);
        lua_pushstring(L, depths[i]);
        lua_pushcclosure(L, cjson_fixed, 2);
        lua_setfield(L, t, depths[i]);
    }
    lua_getfield(L, raw, "new");
    lua_pushboolean(L, safe);
    lua_pushcclosure(L, cjson_new_bounded, 2);
    lua_setfield(L, t, "new");
    lua_replace(L, raw);
}

/* upvalues: the module's new, safe */
static int cjson_new_bounded(lua_State *L) {
    lua_settop(L, 0);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_call(L, 0, 1);
    cjson_limit(L, lua_toboolean(L, lua_upvalueindex(2)));
    return 1;
}

/* Calls the open function at the top of the stack with the module name
 * and a second argument; leaves one value. */
static void call_loader(lua_State *L, const char *name, const char *extra) {
    lua_pushstring(L, name);
    lua_pushstring(L, extra);
    lua_call(L, 2, 1);
}

static int sb_require(lua_State *L) {
    sb_ctx *c = lua_touserdata(L, lua_upvalueindex(1));
    const char *name = luaL_checkstring(L, 1);
    lua_settop(L, 1);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &LOADED_KEY); /* 2 */
    if (lua_getfield(L, 2, name) != LUA_TNIL) return 1;
    lua_pop(L, 1);
    bool found = false;
    for (size_t i = 0; i < c->n_modules && !found; i++) {
        if (strcmp(c->modules[i].name, name) == 0) {
            lua_pushlightuserdata(L, c->modules[i].ud);
            lua_pushcclosure(L, c->modules[i].open, 1);
            call_loader(L, name, ":host:");
            found = true;
        }
    }
    for (const embedded_module *m = embedded_lua_modules; !found && m->module; m++) {
        if (strcmp(m->module, name) == 0) {
            if (luaL_loadbufferx(L, m->source, m->len, m->chunkname, "t") != LUA_OK) return lua_error(L);
            call_loader(L, name, m->chunkname + 1);
            found = true;
        }
    }
    if (!found && (strcmp(name, "cjson") == 0 || strcmp(name, "cjson.safe") == 0)) {
        pthread_once(&cjson_once, cjson_find);
        lua_CFunction f = strcmp(name, "cjson") == 0 ? cjson_open : cjson_safe_open;
        if (!f) return luaL_error(L, "module '%s' not found: lua-cjson is not installed (Debian's lua-cjson)", name);
        lua_pushcfunction(L, f);
        call_loader(L, name, "cjson");
        if (lua_type(L, -1) != LUA_TTABLE) return luaL_error(L, "module '%s': lua-cjson did not return a table", name);
        cjson_limit(L, f == cjson_safe_open);
        found = true;
    }
    if (!found && c->module_dir && module_name_ok(name)) {
        char path[PATH_MAX];
        int n = snprintf(path, sizeof path, "%s/", c->module_dir);
        for (const char *p = name; *p && n < (int)sizeof path - 5; p++) path[n++] = *p == '.' ? '/' : *p;
        snprintf(path + n, sizeof path - (size_t)n, ".lua");
        if (access(path, R_OK) == 0) {
            if (luaL_loadfilex(L, path, "t") != LUA_OK) return lua_error(L);
            call_loader(L, name, path);
            found = true;
        }
    }
    if (!found)
        return luaL_error(L,
                          "module '%s' not found (a policy may require the regfacade modules, cjson, and NAME.lua "
                          "files in its own folder)",
                          name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushboolean(L, 1);
    }
    /* What a module returns is shared by every request this state serves:
     * read-only, so no request can leave something behind for the next. */
    if (lua_type(L, -1) == LUA_TTABLE) freeze(L, -1, false, false);
    lua_pushvalue(L, -1);
    lua_setfield(L, 2, name);
    return 1;
}

/* ---------- state ---------- */

static char *dup_real(const char *path) {
    char real[PATH_MAX];
    return strdup(realpath(path, real) ? real : path);
}

static void ctx_free(sb_ctx *c) {
    if (!c) return;
    free(c->module_dir);
    free(c->base_dir);
    free(c->data_dir);
    for (size_t i = 0; i < c->n_data_files; i++) free(c->data_files[i]);
    free(c->data_files);
    for (size_t i = 0; i < c->n_modules; i++) free((char *)c->modules[i].name);
    free(c->modules);
    free(c);
}

static sb_ctx *ctx_new(const lua_sandbox_options *o) {
    sb_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->cap = o->memory_bytes;
    c->instr_limit = o->instructions;
    c->time_ms = o->time_ms;
    bool ok = true;
    if (o->module_dir) ok = ok && (c->module_dir = strdup(o->module_dir));
    if (o->base_dir) ok = ok && (c->base_dir = strdup(o->base_dir));
    if (o->data_dir) ok = ok && (c->data_dir = dup_real(o->data_dir));
    if (ok && o->n_data_files) {
        ok = (c->data_files = calloc(o->n_data_files, sizeof *c->data_files)) != NULL;
        for (size_t i = 0; ok && i < o->n_data_files; i++) {
            char full[PATH_MAX];
            const char *p = o->data_files[i];
            if (p[0] != '/' && o->base_dir)
                snprintf(full, sizeof full, "%s/%s", o->base_dir, p);
            else
                snprintf(full, sizeof full, "%s", p);
            ok = (c->data_files[i] = dup_real(full)) != NULL;
            c->n_data_files = i + 1;
        }
    }
    if (ok && o->n_modules) {
        ok = (c->modules = calloc(o->n_modules, sizeof *c->modules)) != NULL;
        for (size_t i = 0; ok && i < o->n_modules; i++) {
            c->modules[i] = o->modules[i];
            ok = (c->modules[i].name = strdup(o->modules[i].name)) != NULL;
            c->n_modules = i + 1;
        }
    }
    if (!ok) {
        ctx_free(c);
        return NULL;
    }
    return c;
}

static const char *const BASE_ALLOWED[] = {"assert", "error",  "ipairs",       "next",     "pairs", "pcall",
                                           "xpcall", "select", "tonumber",     "tostring", "type",  "rawequal",
                                           "rawget", "rawlen", "getmetatable", "_VERSION", NULL};

/* Runs in protected mode: builds the frozen environment. Upvalue-free;
 * argument 1 is the ctx. */
static int sb_setup(lua_State *L) {
    sb_ctx *c = lua_touserdata(L, 1);
    lua_pushlightuserdata(L, c);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &SB_KEY);
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &LOADED_KEY);

    static const luaL_Reg libs[] = {
        {LUA_GNAME, luaopen_base},        {LUA_COLIBNAME, luaopen_coroutine}, {LUA_TABLIBNAME, luaopen_table},
        {LUA_STRLIBNAME, luaopen_string}, {LUA_MATHLIBNAME, luaopen_math},    {LUA_UTF8LIBNAME, luaopen_utf8},
        {LUA_OSLIBNAME, luaopen_os},      {LUA_IOLIBNAME, luaopen_io},        {NULL, NULL}};
    for (const luaL_Reg *l = libs; l->name; l++) {
        luaL_requiref(L, l->name, l->func, 1);
        lua_pop(L, 1);
    }
    lua_pushglobaltable(L);
    int g = lua_gettop(L);
    lua_newtable(L); /* the sandbox environment */
    int env = lua_gettop(L);
    for (const char *const *n = BASE_ALLOWED; *n; n++) {
        lua_getfield(L, g, *n);
        lua_setfield(L, env, *n);
    }
    static const luaL_Reg replaced[] = {{"rawset", sb_rawset},
                                        {"setmetatable", sb_setmetatable},
                                        {"collectgarbage", sb_collectgarbage},
                                        {"print", sb_print},
                                        {"load", sb_load},
                                        {NULL, NULL}};
    for (const luaL_Reg *r = replaced; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, env, r->name);
    }
    lua_pushlightuserdata(L, c);
    lua_pushcclosure(L, sb_require, 1);
    lua_setfield(L, env, "require");

    /* string: no dump; rep bounded by the memory left; the pattern
     * functions count their steps against the budget (lua_pattern.h). */
    lua_getfield(L, g, LUA_STRLIBNAME);
    int str = lua_gettop(L);
    lua_pattern_install(L, str);
    lua_pushnil(L);
    lua_setfield(L, str, "dump");
    lua_pushlightuserdata(L, c);
    lua_getfield(L, str, "rep");
    lua_pushcclosure(L, sb_str_rep, 2);
    lua_setfield(L, str, "rep");
    /* The strings' metatable ({ __index = string }) is protected. */
    lua_pushliteral(L, "");
    if (lua_getmetatable(L, -1)) {
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable");
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_setfield(L, env, LUA_STRLIBNAME);

    static const char *const shared_libs[] = {LUA_TABLIBNAME, LUA_MATHLIBNAME, LUA_UTF8LIBNAME, LUA_COLIBNAME, NULL};
    for (const char *const *n = shared_libs; *n; n++) {
        lua_getfield(L, g, *n);
        lua_setfield(L, env, *n);
    }

    /* os: time only. */
    lua_getfield(L, g, LUA_OSLIBNAME);
    lua_createtable(L, 0, 4);
    static const char *const os_allowed[] = {"time", "clock", "date", "difftime", NULL};
    for (const char *const *n = os_allowed; *n; n++) {
        lua_getfield(L, -2, *n);
        lua_setfield(L, -2, *n);
    }
    lua_setfield(L, env, LUA_OSLIBNAME);
    lua_pop(L, 1);

    /* io: open (data files, read-only) and type. Open files' methods are
     * the standard ones; their metatable is protected. */
    lua_getfield(L, g, LUA_IOLIBNAME);
    lua_createtable(L, 0, 2);
    lua_getfield(L, -2, "type");
    lua_setfield(L, -2, "type");
    lua_pushlightuserdata(L, c);
    lua_pushcclosure(L, sb_io_open, 1);
    lua_setfield(L, -2, "open");
    lua_setfield(L, env, LUA_IOLIBNAME);
    lua_pop(L, 1);
    if (luaL_getmetatable(L, LUA_FILEHANDLE) == LUA_TTABLE) {
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable");
    }
    lua_pop(L, 1);

    lua_pushvalue(L, env);
    lua_setfield(L, env, LUA_GNAME);

    /* Freeze the libraries, then the environment itself. */
    static const char *const frozen[] = {LUA_STRLIBNAME, LUA_TABLIBNAME, LUA_MATHLIBNAME, LUA_UTF8LIBNAME,
                                         LUA_COLIBNAME,  LUA_OSLIBNAME,  LUA_IOLIBNAME,   NULL};
    for (const char *const *n = frozen; *n; n++) {
        lua_getfield(L, env, *n);
        freeze(L, -1, false, false);
        lua_pop(L, 1);
    }
    freeze(L, env, false, true);

    /* The environment is the globals table: every chunk (load, require,
     * the policy) gets it. The stock globals and package.loaded become
     * unreachable garbage. */
    lua_pushvalue(L, env);
    lua_rawseti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_newtable(L);
    lua_setfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_settop(L, 0);
    return 0;
}

lua_State *lua_sandbox_new(const lua_sandbox_options *o, char *err, size_t errlen) {
    /* cjson is part of what a policy gets: without it nothing starts. */
    pthread_once(&cjson_once, cjson_find);
    if (!cjson_open || !cjson_safe_open) {
        snprintf(err, errlen,
                 "policy: lua-cjson is not installed: the policy sandbox provides `require \"cjson\"` "
                 "and needs Debian's lua-cjson (the Lua 5.4 build, %s; `make deps` installs it)",
                 "lua/5.4/cjson.so on Lua's C path");
        return NULL;
    }
    sb_ctx *c = ctx_new(o);
    lua_State *L = c ? lua_newstate(sb_alloc, c) : NULL;
    if (!L) {
        ctx_free(c);
        snprintf(err, errlen, "policy: out of memory creating a Lua state");
        return NULL;
    }
    lua_atpanic(L, sb_panic);
    *(sb_ctx **)lua_getextraspace(L) = c;
    lua_gc(L, LUA_GCGEN, 0, 0);
    lua_pushcfunction(L, sb_setup);
    lua_pushlightuserdata(L, c);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        snprintf(err, errlen, "policy: cannot set up a Lua state: %s (policy.memory_bytes is %zu)",
                 lua_tostring(L, -1) ? lua_tostring(L, -1) : "?", c->cap);
        lua_close(L);
        ctx_free(c);
        return NULL;
    }
    /* For the state's life; it acts only while a call is armed. */
    lua_sethook(L, sb_hook, LUA_MASKCOUNT, SB_COUNT_EVERY);
    return L;
}

void lua_sandbox_close(lua_State *L) {
    if (!L) return;
    sb_ctx *c = ctx_of(L);
    lua_close(L);
    ctx_free(c);
}

lua_sandbox_outcome lua_sandbox_load(lua_State *L, const char *src, size_t len, const char *chunkname, char *err,
                                     size_t errlen) {
    int st = luaL_loadbufferx(L, src, len, chunkname, "t");
    if (st != LUA_OK) {
        first_line(err, errlen, lua_tostring(L, -1) ? lua_tostring(L, -1) : "cannot load the policy");
        lua_pop(L, 1);
        return st == LUA_ERRMEM ? SB_MEMORY : SB_ERROR;
    }
    char trace[2048];
    lua_sandbox_outcome out = lua_sandbox_call(L, SB_PHASE_LOAD, 0, 1, err, errlen, trace, sizeof trace);
    if (out != SB_OK && err && errlen) snprintf(err, errlen, "%s", trace);
    return out;
}
