/*
 * lua_sandbox: a locked-down Lua 5.4 state for policy code, and the run
 * context (phase, deadline, instruction count, memory) each hook call runs
 * under. It knows nothing of requests or of the config: policy.c (the hook
 * dispatcher and loader) and the busted module regfacade.sandbox
 * (lua_sandbox_module.c) build on it.
 *
 * What a sandbox state gives policy code:
 *   globals   an allow-list (assert error ipairs next pairs pcall xpcall
 *             select tonumber tostring type rawequal rawget rawlen rawset
 *             getmetatable setmetatable require load print collectgarbage
 *             _VERSION _G string table math utf8 coroutine os io), frozen:
 *             assigning a global is an error, and so is reading one that
 *             does not exist ("undefined global 'x'");
 *   frozen    string, table, math, utf8, coroutine, os, io, and every table
 *             a module returns through require, are read-only in place
 *             (writes raise; pairs, ipairs and # work; their metatables are
 *             protected);
 *   require   package.preload-style modules given in the options, the
 *             embedded lua/regfacade/NAME.lua modules, cjson and cjson.safe
 *             (Debian's lua-cjson, required: lua_sandbox_new fails without
 *             it; nesting fixed at 64 levels, decode refuses texts over
 *             1 MiB) and NAME.lua from module_dir (text chunks only).
 *             There is no `package` table, no C loader;
 *   load      text chunks only (mode "t"); the default environment is the
 *             frozen global one;
 *   io        io.open(path [, "r"|"rb"]) for the data files the options
 *             allow (data_files, or any file under data_dir), io.type;
 *   os        os.time, os.clock, os.date, os.difftime;
 *   others    collectgarbage("count") only; setmetatable refuses a
 *             metatable with __gc (a finalizer runs with hooks off, out of
 *             any budget); rawset refuses frozen tables; print writes a log
 *             line; string.rep refuses a result larger than the memory left.
 *   Removed:  debug, dofile, loadfile, string.dump, package (loadlib,
 *             cpath, searchers), os.execute/exit/getenv/remove/rename/
 *             tmpname/setlocale, io.popen/lines/read/write/input/output.
 *
 * Limits: every state has its own allocator, capped at memory_bytes (an
 * allocation past the cap fails: a Lua memory error). A count hook is
 * installed for the state's life (coroutines inherit it); between
 * lua_sandbox_call's start and end it stops the call once it has run
 * `instructions` VM instructions or `time_ms` of wall time. Once tripped it
 * fires on every line, so a script's own pcall cannot swallow it. A state
 * whose call was stopped (budget or memory) is "broken": close it.
 *
 * States are not thread-safe: one thread uses a state at a time. All
 * per-state data lives in the state (lua_getextraspace), none in statics.
 */
#ifndef REGFACADE_LUA_SANDBOX_H
#define REGFACADE_LUA_SANDBOX_H

#include <lua.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The phase a call runs in: what Lua functions check ("X cannot be called
 * in hook Y"). */
typedef enum {
    SB_PHASE_NONE = 0, /* no call running (busted, or C code) */
    SB_PHASE_LOAD,     /* the policy's top-level code */
    SB_PHASE_SELF_CHECK,
    SB_PHASE_AUTHORIZE,
    SB_PHASE_SPEC,
    SB_PHASE_RESOLVE,
    SB_PHASE_REWRITE,
    SB_PHASE_LOG,
    SB_PHASE_COUNT
} lua_sandbox_phase;

#define SB_PHASE_BIT(p) (1u << (p))
#define SB_PHASES_HOOKS                                                                                   \
    (SB_PHASE_BIT(SB_PHASE_SELF_CHECK) | SB_PHASE_BIT(SB_PHASE_AUTHORIZE) | SB_PHASE_BIT(SB_PHASE_SPEC) | \
     SB_PHASE_BIT(SB_PHASE_RESOLVE) | SB_PHASE_BIT(SB_PHASE_REWRITE) | SB_PHASE_BIT(SB_PHASE_LOG))
#define SB_PHASES_ALL (SB_PHASES_HOOKS | SB_PHASE_BIT(SB_PHASE_LOAD))

/* How a call ended. */
typedef enum {
    SB_OK = 0,
    SB_ERROR,        /* the code raised an error */
    SB_TIME,         /* stopped: wall-time budget */
    SB_INSTRUCTIONS, /* stopped: instruction budget */
    SB_MEMORY,       /* a memory error (the cap, or the machine) */
} lua_sandbox_outcome;

/* A module require() finds before any other: open is called with the
 * module name as its argument and ud as upvalue 1 (a light userdata). */
typedef struct {
    const char *name;
    lua_CFunction open;
    void *ud;
} lua_sandbox_module;

typedef struct {
    size_t memory_bytes;           /* allocation cap of the state; 0: none */
    uint64_t instructions;         /* per call; 0: none */
    unsigned time_ms;              /* per call; 0: none */
    const char *module_dir;        /* require("a.b") may load module_dir/a/b.lua; NULL: none */
    const char *base_dir;          /* relative io.open paths resolve here; NULL: the working folder */
    const char *const *data_files; /* files io.open may read (any path; compared after realpath) */
    size_t n_data_files;
    const char *data_dir; /* io.open may read any file below it; NULL: none */
    const lua_sandbox_module *modules;
    size_t n_modules;
} lua_sandbox_options;

/* Defaults of the limits (config keys policy.memory_bytes,
 * policy.hook_instructions, policy.hook_time_ms). */
#define SB_DEFAULT_MEMORY_BYTES (64u * 1024 * 1024)
#define SB_DEFAULT_INSTRUCTIONS 10000000u
#define SB_DEFAULT_TIME_MS 250u
/* The count hook fires every this many instructions. */
#define SB_COUNT_EVERY 1000

/* A new locked-down state (the options are copied). NULL with err (also
 * when lua-cjson is not installed). */
lua_State *lua_sandbox_new(const lua_sandbox_options *o, char *err, size_t errlen);
void lua_sandbox_close(lua_State *L);

/* Compile src as a text chunk called chunkname ("@path" for files) and run
 * it in phase LOAD under the budget. SB_OK with its first result pushed;
 * otherwise nothing pushed and "chunk:line: why" (and a traceback) in err. */
lua_sandbox_outcome lua_sandbox_load(lua_State *L, const char *src, size_t len, const char *chunkname, char *err,
                                     size_t errlen);

/* Call the function below the nargs arguments on top of the stack in phase
 * ph, under pcall with a traceback and the per-call budget. SB_OK with
 * nresults pushed; otherwise nothing pushed, the message's first line in
 * err and the whole message with its traceback in trace (either may be
 * NULL). The function and arguments are always popped. */
lua_sandbox_outcome lua_sandbox_call(lua_State *L, lua_sandbox_phase ph, int nargs, int nresults, char *err,
                                     size_t errlen, char *trace, size_t tracelen);

/* C stack a running call may use below where it began: C functions that
 * call back into Lua (gsub with a function, nested without end) stop there
 * with a Lua error instead of overflowing the thread's stack (a server
 * thread has 512 KiB; a sanitizer build's frames are several times
 * larger). */
#define LUA_SANDBOX_C_STACK_BYTES (192 * 1024)
/* Raise a Lua error when the running call uses more C stack than that. */
void lua_sandbox_check_cstack(lua_State *L);

/* Count n steps of C work (pattern matching, lua_pattern.h) as n
 * instructions of the running call; raises, as the count hook does, once
 * the call is past its instruction or time budget. Nothing outside calls. */
void lua_sandbox_steps(lua_State *L, unsigned n);

/* Note the Lua function at idx as the one the running call is about to
 * run: a memory error, which carries no position, is reported at its
 * definition when no closer position is known. */
void lua_sandbox_note_function(lua_State *L, int idx);

/* Two pointers the embedder may keep in the state for its own use (the
 * dispatcher keeps the running call's request there). Never NULL. */
void **lua_sandbox_user(lua_State *L);

/* True once a call was stopped by a budget or a memory error: the state
 * may hold anything and must be closed, not reused. */
bool lua_sandbox_broken(lua_State *L);

/* The phase of the running call (SB_PHASE_NONE outside calls). */
lua_sandbox_phase lua_sandbox_current_phase(lua_State *L);
const char *lua_sandbox_phase_name(lua_sandbox_phase p);

/* Raise "FNAME cannot be called in hook PHASE (only in: ...)" unless the
 * running phase is in mask. No check outside calls (SB_PHASE_NONE), and in
 * a state that is not a sandbox (busted's own interpreter). */
void lua_sandbox_check_phase(lua_State *L, const char *fname, unsigned mask);

/* Make the table at idx read-only in place (its contents move to a hidden
 * table; reads, pairs, ipairs and # go through). deep: nested tables too.
 * A table that has a metatable already is left as it is. */
void lua_sandbox_freeze(lua_State *L, int idx, bool deep);
/* True when the table at idx was frozen by lua_sandbox_freeze. */
bool lua_sandbox_is_frozen(lua_State *L, int idx);
/* Push the table that holds the contents of the table at idx: its hidden
 * table when frozen, else the table itself (for raw reads by C code). */
void lua_sandbox_contents(lua_State *L, int idx);

/* Bytes the state's allocator holds now, and its cap. */
size_t lua_sandbox_memory(lua_State *L, size_t *cap);

/* regfacade.read_file(path) as a Lua C function: the whole content of an
 * allowed data file (the io.open rules), or raises. */
int lua_sandbox_read_file(lua_State *L);

#endif
