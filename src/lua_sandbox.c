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

/* Registry keys: the addresses of these statics (their values are never
 * used). */
static const char SB_KEY = 'S';      /* registry[&SB_KEY] = ctx (light userdata): "this is a sandbox" */
static const char LOADED_KEY = 'L';  /* the sandbox's own package.loaded */
static const char FROZEN_KEY = 'F';  /* marks a frozen table's metatable */

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
    char where[200]; /* the last source position the count hook saw */
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

static const char *const PHASE_NAMES[SB_PHASE_COUNT] = {"none", "load", "self_check", "authorize",
                                                        "resolve", "rewrite", "log"};

const char *lua_sandbox_phase_name(lua_sandbox_phase p) {
    return p >= 0 && p < SB_PHASE_COUNT ? PHASE_NAMES[p] : "?";
}

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

/* Installed for the state's life (threads created by coroutine.create copy
 * it); does something only while a call is armed. */
static void sb_hook(lua_State *L, lua_Debug *ar) {
    sb_ctx *c = ctx_of(L);
    if (!c || !c->armed) return;
    if (c->tripped == SB_OK) {
        c->instr += SB_COUNT_EVERY;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (c->instr_limit && c->instr > c->instr_limit) {
            c->tripped = SB_INSTRUCTIONS;
        } else if (c->time_ms && past(&now, &c->deadline)) {
            c->tripped = SB_TIME;
        } else {
            /* Remembered for memory errors, which carry no position. */
            if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0)
                snprintf(c->where, sizeof c->where, "%s:%d", ar->short_src, ar->currentline);
            return;
        }
    }
    /* From now on on every line and instruction, in this thread: the
     * script's own pcall only catches the error for it to be raised again
     * at the next instruction. */
    lua_sethook(L, sb_hook, LUA_MASKCOUNT | LUA_MASKLINE, 1);
    trip_message(L, c, ar);
    lua_error(L);
}

static void arm(sb_ctx *c, lua_sandbox_phase ph) {
    c->armed = true;
    c->phase = ph;
    c->instr = 0;
    c->tripped = SB_OK;
    c->where[0] = '\0';
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

lua_sandbox_outcome lua_sandbox_call(lua_State *L, lua_sandbox_phase ph, int nargs, int nresults, char *err,
                                     size_t errlen, char *trace, size_t tracelen) {
    sb_ctx *c = ctx_of(L);
    int fn = lua_gettop(L) - nargs;
    if (err && errlen) err[0] = '\0';
    if (trace && tracelen) trace[0] = '\0';
    if (c->broken) {
        lua_settop(L, fn - 1);
        first_line(err, errlen, "policy: this Lua state was stopped before and cannot run again");
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
    if (!was_armed) arm(c, ph);
    else c->phase = ph; /* a nested call (a hook calling back into C calling Lua): same budget */
    int st = lua_pcall(L, nargs, nresults, fn);
    lua_sandbox_outcome out = SB_OK;
    if (c->tripped != SB_OK) out = c->tripped;
    else if (st == LUA_ERRMEM) out = SB_MEMORY;
    else if (st != LUA_OK) out = SB_ERROR;
    if (!was_armed) disarm(c);
    else c->phase = outer;
    if (out == SB_OK) {
        lua_remove(L, fn);
        return SB_OK;
    }
    if (st == LUA_OK) lua_pop(L, nresults < 0 ? 0 : nresults); /* tripped, yet returned: not trusted */
    if (out == SB_TIME || out == SB_INSTRUCTIONS || out == SB_MEMORY) c->broken = true;
    const char *msg = st == LUA_OK ? NULL : lua_tostring(L, -1);
    char buf[512];
    if (out == SB_MEMORY) {
        if (c->cap)
            snprintf(buf, sizeof buf, "%s%spolicy %s exceeded its memory cap (%zu bytes, policy.memory_bytes)",
                     c->where[0] ? c->where : "", c->where[0] ? ": (near) " : "", lua_sandbox_phase_name(ph),
                     c->cap);
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
        return luaL_error(L, "assignment to global '%s': globals are read-only in a policy (use a local, req.ctx "
                             "or regfacade.shared)", k);
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

bool lua_sandbox_is_frozen(lua_State *L, int idx) {
    if (!lua_getmetatable(L, idx)) return false;
    bool f = lua_rawgetp(L, -1, &FROZEN_KEY) == LUA_TBOOLEAN;
    lua_pop(L, 2);
    return f;
}
