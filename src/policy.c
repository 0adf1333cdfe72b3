/*
 * policy: the hook dispatcher and loader over lua_sandbox (the locked-down
 * states and their budgets) and lua_regfacade (the `regfacade` module).
 * See include/regfacade/policy.h.
 *
 * Every hook call is one protected C function (a *_fn below) run by
 * lua_sandbox_call: it builds req, calls the hook and reads its answer
 * with raw accesses, so no Lua API call of ours runs unprotected (a memory
 * error anywhere is a failed request, never a panic).
 */
#include "regfacade/policy.h"

#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "regfacade/digest.h"
#include "regfacade/image_rewrite.h"
#include "regfacade/log.h"
#include "regfacade/lua_deny.h"
#include "regfacade/lua_json.h"
#include "regfacade/lua_regfacade.h"
#include "regfacade/lua_sandbox.h"
#include "regfacade/lua_shared.h"
#include "regfacade/metrics.h"
#include "regfacade/ref.h"

#define POLICY_SOURCE_MAX (4u * 1024 * 1024)
#define POLICY_IDLE_DEFAULT 64
#define POLICY_WATCH_NS 1000000000LL /* the policy file is looked at at most once a second */

typedef enum { H_SELF_CHECK, H_AUTHORIZE, H_SPEC, H_RESOLVE, H_REWRITE, H_LOG, H_COUNT } hook_id;
static const char *const HOOKS[H_COUNT] = {"self_check", "authorize", "spec", "resolve", "rewrite", "log"};
static const lua_sandbox_phase PHASE_OF[H_COUNT] = {SB_PHASE_SELF_CHECK, SB_PHASE_AUTHORIZE, SB_PHASE_SPEC,
                                                    SB_PHASE_RESOLVE,    SB_PHASE_REWRITE,   SB_PHASE_LOG};

/* Registry keys (addresses). */
static const char HOOKS_KEY = 'H';
static const char HOOKFN_KEY = 'F'; /* { [h + 1] = hook function }: the hooks without a lookup by name */
static const char REQ_MT_KEY = 'M'; /* req's metatable */
/* lua_sandbox_user(L): [0] the running call's req table (lua_topointer),
 * [1] its policy_request. */

/* One compiled version of the policy. Its states are tagged by living in
 * its pool; a state in use holds a reference. */
typedef struct generation {
    unsigned long id;
    char *source; /* the text every state of this generation runs; NULL: the embedded default */
    size_t len;
    char fingerprint[65];
    bool has[H_COUNT];
    bool has_stat;
    struct timespec mtime;
    off_t size;
    ino_t ino;
    lua_State **idle;
    size_t n_idle;
    int refs;                /* 1 while current, plus one per state in use */
    struct generation *next; /* every generation, kept until policy_free (fingerprints stay valid) */
} generation;

typedef struct {
    unsigned time_ms;
    uint64_t instructions;
    size_t memory_bytes;
    size_t shared_bytes;
    size_t max_idle;
    bool watch;
    char *data_dir;
    char **data_files;
    size_t n_data_files;
} policy_limits;

struct policy {
    const config *cfg;
    policy_limits lim;
    json_value *view; /* regfacade.config */
    lua_regfacade_host host;
    lua_sandbox_module modules[3];
    lua_sandbox_options sbo;
    char *module_dir;
    pthread_mutex_t lock;        /* pools, refs, generation refs, watch state; cur changes under it */
    pthread_mutex_t reload_lock; /* one reload at a time */
    /* The current generation: written under lock, read without it on the
     * per-request fast paths (is there such a hook? the fingerprint). A
     * generation struct lives until policy_free, so a stale read is safe. */
    _Atomic(generation *) cur;
    generation *all;
    unsigned long next_id;
    int refs;                      /* the owner, plus one per log entry */
    _Atomic int64_t next_check_ns; /* the watch's next look; claimed by CAS */
    bool has_rejected;
    struct timespec rejected_mtime;
    off_t rejected_size;
    ino_t rejected_ino;
};

void policy_error_set(policy_error *e, int status, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    e->status = status;
    snprintf(e->code, sizeof e->code, "%s", code);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    e->challenge[0] = '\0';
    e->retry_after[0] = '\0';
    e->failed = false;
    va_end(ap);
}

/* strlcpy (snprintf "%s" costs more, and this runs per request). */
static void copy_str(char *dst, size_t size, const char *src) {
    size_t n = strlen(src);
    if (n >= size) n = size - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double seconds_since(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
}

void policy_state_clear(policy_state *s) {
    if (!s) return;
    json_free(s->ctx);
    s->ctx = NULL;
    s->credentials[0] = '\0';
}

void policy_resolution_clear(policy_resolution *r) {
    for (size_t i = 0; i < r->n_layers; i++) layer_spec_clear(&r->layers[i]);
    free(r->layers);
    for (size_t i = 0; i < r->n_platforms; i++) free(r->platforms[i]);
    free(r->platforms);
    free(r->fingerprint);
    json_free(r->referrers);
    r->layers = NULL;
    r->platforms = NULL;
    r->fingerprint = NULL;
    r->referrers = NULL;
    r->n_layers = r->n_platforms = 0;
    r->has_layers = false;
}

/* ---------- config: the "policy" section's limits ---------- */

static int limit_u64(const json_value *sec, const char *key, uint64_t min, uint64_t max, uint64_t *out, char *err,
                     size_t errlen) {
    json_value *v = sec ? json_object_get(sec, key) : NULL;
    if (!v) return 0;
    uint64_t n;
    if (config_value_uint(v, key, &n) != 0 || n < min || n > max) {
        snprintf(err, errlen, "policy.%s: must be %s from %llu to %llu", key,
                 strstr(key, "_bytes") ? "a size (bytes, or a string such as \"4MiB\")" : "an integer",
                 (unsigned long long)min, (unsigned long long)max);
        return -1;
    }
    *out = n;
    return 0;
}

static char *path_in(const char *dir, const char *p) {
    if (p[0] == '/' || !dir) return strdup(p);
    size_t n = strlen(dir) + strlen(p) + 2;
    char *out = malloc(n);
    if (out) snprintf(out, n, "%s/%s", dir, p);
    return out;
}

static void limits_clear(policy_limits *l) {
    free(l->data_dir);
    for (size_t i = 0; i < l->n_data_files; i++) free(l->data_files[i]);
    free(l->data_files);
    memset(l, 0, sizeof *l);
}

static int limits_parse(const config *c, policy_limits *l, char *err, size_t errlen) {
    const json_value *sec = c->policy_section;
    memset(l, 0, sizeof *l);
    uint64_t v = SB_DEFAULT_TIME_MS;
    if (limit_u64(sec, "hook_time_ms", 1, 60000, &v, err, errlen) != 0) return -1;
    l->time_ms = (unsigned)v;
    l->instructions = SB_DEFAULT_INSTRUCTIONS;
    if (limit_u64(sec, "hook_instructions", 10000, 100000000000ULL, &l->instructions, err, errlen) != 0) return -1;
    v = SB_DEFAULT_MEMORY_BYTES;
    if (limit_u64(sec, "memory_bytes", 1024 * 1024, 16ULL * 1024 * 1024 * 1024, &v, err, errlen) != 0) return -1;
    l->memory_bytes = (size_t)v;
    v = SHARED_DEFAULT_BYTES;
    if (limit_u64(sec, "shared_bytes", 4096, 16ULL * 1024 * 1024 * 1024, &v, err, errlen) != 0) return -1;
    l->shared_bytes = (size_t)v;
    v = POLICY_IDLE_DEFAULT;
    if (limit_u64(sec, "idle_states", 1, 65536, &v, err, errlen) != 0) return -1;
    l->max_idle = (size_t)v;
    l->watch = true;
    json_value *w = sec ? json_object_get(sec, "watch") : NULL;
    if (w) {
        if (w->type != JSON_TRUE && w->type != JSON_FALSE) {
            snprintf(err, errlen, "policy.watch: must be true or false");
            return -1;
        }
        l->watch = w->type == JSON_TRUE;
    }
    json_value *dd = sec ? json_object_get(sec, "data_dir") : NULL;
    if (dd) {
        if (dd->type != JSON_STRING || dd->len == 0 || strlen(dd->str) != dd->len) {
            snprintf(err, errlen, "policy.data_dir: must be a non-empty string (a folder)");
            return -1;
        }
        l->data_dir = path_in(c->dir, dd->str);
        struct stat st;
        if (!l->data_dir || stat(l->data_dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
            snprintf(err, errlen, "policy.data_dir: %s is not a folder", l->data_dir ? l->data_dir : dd->str);
            return -1;
        }
    }
    json_value *df = sec ? json_object_get(sec, "data_files") : NULL;
    if (df) {
        if (df->type != JSON_ARRAY || df->count > 1024) {
            snprintf(err, errlen, "policy.data_files: must be an array of file paths");
            return -1;
        }
        l->data_files = calloc(df->count ? df->count : 1, sizeof *l->data_files);
        if (!l->data_files) {
            snprintf(err, errlen, "policy.data_files: out of memory");
            return -1;
        }
        for (size_t i = 0; i < df->count; i++) {
            json_value *f = df->items[i];
            if (f->type != JSON_STRING || f->len == 0 || strlen(f->str) != f->len) {
                snprintf(err, errlen, "policy.data_files[%zu]: must be a non-empty string", i);
                return -1;
            }
            if (!(l->data_files[i] = path_in(c->dir, f->str))) {
                snprintf(err, errlen, "policy.data_files: out of memory");
                return -1;
            }
            l->n_data_files = i + 1;
        }
    }
    return 0;
}

/* regfacade.config: upstreams (without the credential-set entries, which
 * are listed under their upstream), default_upstream, options. */
static json_value *config_view(const config *c) {
    json_value *root = json_new_object(), *ups = json_new_object();
    if (!root || !ups) {
        json_free(root);
        json_free(ups);
        return NULL;
    }
    int bad = 0;
    for (size_t i = 0; i < c->n_upstreams; i++) {
        const config_upstream *u = &c->upstreams[i];
        if (strchr(u->name, '@')) continue;
        json_value *o = json_new_object(), *sets = json_new_array();
        if (!o || !sets) {
            json_free(o);
            json_free(sets);
            bad = 1;
            continue;
        }
        bad |= json_object_set(o, "url", json_new_string(u->url));
        bad |= json_object_set(o, "host", json_new_string(u->host));
        bad |= json_object_set(o, "library_prefix", json_new_bool(u->library_prefix));
        size_t nl = strlen(u->name);
        for (size_t j = 0; j < c->n_upstreams; j++) {
            const char *n = c->upstreams[j].name;
            if (strncmp(n, u->name, nl) == 0 && n[nl] == '@')
                bad |= json_array_append(sets, json_new_string(n + nl + 1));
        }
        bad |= json_object_set(o, "credentials", sets);
        bad |= json_object_set(ups, u->name, o);
    }
    bad |= json_object_set(root, "upstreams", ups);
    if (c->default_upstream) bad |= json_object_set(root, "default_upstream", json_new_string(c->default_upstream));
    bad |= json_object_set(root, "options", json_clone(c->policy_options));
    if (bad) {
        json_free(root);
        return NULL;
    }
    return root;
}

/* ---------- generations and states ---------- */

static const char *policy_what(const policy *p) {
    return p->cfg->policy_file ? p->cfg->policy_file : "(embedded default policy)";
}

static int read_source(const char *path, char **out, size_t *len, struct stat *st, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "policy %s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fileno(f), st) != 0 || st->st_size > (off_t)POLICY_SOURCE_MAX) {
        fclose(f);
        snprintf(err, errlen, "policy %s: larger than %u bytes", path, POLICY_SOURCE_MAX);
        return -1;
    }
    char *buf = malloc((size_t)st->st_size + 1);
    size_t n = buf ? fread(buf, 1, (size_t)st->st_size, f) : 0;
    int bad = !buf || ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        snprintf(err, errlen, "policy %s: cannot read", path);
        return -1;
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return 0;
}

static int fingerprint(const policy *p, const generation *g, char out[65]) {
    digest_ctx *d = digest_new();
    if (!d) return -1;
    if (g->source)
        digest_update(d, g->source, g->len);
    else
        digest_update(d, "embedded:" REGFACADE_VERSION, strlen("embedded:" REGFACADE_VERSION));
    size_t olen = 0;
    char *opts = json_serialize(p->cfg->policy_options, &olen);
    if (opts) digest_update(d, opts, olen);
    free(opts);
    char full[DIGEST_STRING_LEN];
    int rc = digest_final(d, full);
    digest_free(d);
    if (rc == 0) snprintf(out, 65, "%s", full + 7);
    return rc;
}

/* Runs protected, on the table the policy returned (argument 2): checks
 * the hooks' types, records which exist (record), freezes the table and
 * keeps it at registry[&HOOKS_KEY]. */
typedef struct {
    policy *p;
    generation *g;
    bool record;
    char err[512];
} inspect_ctx;

static int inspect_fn(lua_State *L) {
    inspect_ctx *ic = lua_touserdata(L, 1);
    const char *what = policy_what(ic->p);
    if (!lua_istable(L, 2)) {
        snprintf(ic->err, sizeof ic->err, "policy %s: the module must return a table of hooks, got %s", what,
                 luaL_typename(L, 2));
        return 0;
    }
    lua_sandbox_contents(L, 2); /* 3: a module table is frozen by require already */
    for (int h = 0; h < H_COUNT; h++) {
        lua_pushstring(L, HOOKS[h]);
        int type = lua_rawget(L, 3);
        lua_pop(L, 1);
        if (type != LUA_TNIL && type != LUA_TFUNCTION) {
            snprintf(ic->err, sizeof ic->err, "policy %s: hook \"%s\" must be a function, got %s", what, HOOKS[h],
                     lua_typename(L, type));
            return 0;
        }
        if (ic->record) ic->g->has[h] = type == LUA_TFUNCTION;
    }
    if (ic->record) {
        /* A function under a name that is no hook is most likely a typo. */
        lua_pushnil(L);
        while (lua_next(L, 3) != 0) {
            bool fn = lua_type(L, -1) == LUA_TFUNCTION;
            lua_pop(L, 1);
            if (!fn || lua_type(L, -1) != LUA_TSTRING) continue;
            const char *k = lua_tostring(L, -1);
            bool known = false;
            for (int h = 0; h < H_COUNT && !known; h++) known = strcmp(k, HOOKS[h]) == 0;
            if (!known)
                log_warn("policy %s: \"%s\" is a function but not a hook (hooks: self_check, authorize, spec, "
                         "resolve, rewrite, log); regfacade never calls it",
                         what, k);
        }
    }
    /* The functions, by hook number, for the calls. */
    lua_createtable(L, H_COUNT, 0);
    for (int h = 0; h < H_COUNT; h++) {
        lua_pushstring(L, HOOKS[h]);
        lua_rawget(L, 3);
        lua_rawseti(L, -2, h + 1);
    }
    lua_rawsetp(L, LUA_REGISTRYINDEX, &HOOKFN_KEY);
    /* The hooks table is read-only: no request can swap a hook for the next. */
    lua_sandbox_freeze(L, 2, false);
    lua_pushvalue(L, 2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &HOOKS_KEY);
    return 0;
}

/* A new state running generation g: the policy loaded and inspected.
 * record: fill g->has (the generation's first state). */
static lua_State *state_new(policy *p, generation *g, bool record, char *err, size_t errlen) {
    lua_State *L = lua_sandbox_new(&p->sbo, err, errlen);
    if (!L) return NULL;
    static const char DEFAULT_SRC[] = "return require 'regfacade.default'";
    char chunk[4200];
    const char *src = DEFAULT_SRC;
    size_t len = sizeof DEFAULT_SRC - 1;
    if (g->source) {
        /* Relative to the config's folder when inside it: Lua shortens long
         * chunk names in messages, and "policy.lua:12:" reads better. */
        const char *name = p->cfg->policy_file;
        size_t dl = p->cfg->dir ? strlen(p->cfg->dir) : 0;
        if (dl && strncmp(name, p->cfg->dir, dl) == 0 && name[dl] == '/') name += dl + 1;
        snprintf(chunk, sizeof chunk, "@%s", name);
        src = g->source;
        len = g->len;
    } else {
        snprintf(chunk, sizeof chunk, "=(embedded default policy)");
    }
    char msg[2048];
    if (lua_sandbox_load(L, src, len, chunk, msg, sizeof msg) != SB_OK) {
        snprintf(err, errlen, "policy %s: %s", policy_what(p), msg);
        lua_sandbox_close(L);
        return NULL;
    }
    inspect_ctx ic = {.p = p, .g = g, .record = record};
    lua_pushcfunction(L, inspect_fn);
    lua_pushlightuserdata(L, &ic);
    lua_pushvalue(L, -3);
    if (lua_sandbox_call(L, SB_PHASE_LOAD, 2, 0, msg, sizeof msg, NULL, 0) != SB_OK) {
        snprintf(err, errlen, "policy %s: %s", policy_what(p), msg);
        lua_sandbox_close(L);
        return NULL;
    }
    lua_settop(L, 0);
    if (ic.err[0]) {
        snprintf(err, errlen, "%s", ic.err);
        lua_sandbox_close(L);
        return NULL;
    }
    return L;
}

/* Frees what a generation holds once nothing runs on it (not the struct:
 * its fingerprint may still be read). */
static void generation_drop(generation *g) {
    for (size_t i = 0; i < g->n_idle; i++) lua_sandbox_close(g->idle[i]);
    g->n_idle = 0;
    free(g->idle);
    g->idle = NULL;
    free(g->source);
    g->source = NULL;
}

static int self_check_fn(lua_State *L);

/* Read, compile and check a new generation: its first state is built and
 * self_check runs on it. NULL with err. */
static generation *generation_build(policy *p, char *err, size_t errlen) {
    generation *g = calloc(1, sizeof *g);
    if (!g || !(g->idle = calloc(p->lim.max_idle, sizeof *g->idle))) {
        free(g);
        snprintf(err, errlen, "policy: out of memory");
        return NULL;
    }
    if (p->cfg->policy_file) {
        struct stat st;
        if (read_source(p->cfg->policy_file, &g->source, &g->len, &st, err, errlen) != 0) {
            generation_drop(g);
            free(g);
            return NULL;
        }
        g->has_stat = true;
        g->mtime = st.st_mtim;
        g->size = st.st_size;
        g->ino = st.st_ino;
    }
    if (fingerprint(p, g, g->fingerprint) != 0) {
        snprintf(err, errlen, "policy: cannot compute its fingerprint");
        generation_drop(g);
        free(g);
        return NULL;
    }
    lua_State *L = state_new(p, g, true, err, errlen);
    if (!L) {
        generation_drop(g);
        free(g);
        return NULL;
    }
    if (g->has[H_SELF_CHECK]) {
        char first[512], trace[2048];
        char why[512] = "";
        lua_pushcfunction(L, self_check_fn);
        lua_pushlightuserdata(L, why);
        lua_sandbox_outcome o =
            lua_sandbox_call(L, SB_PHASE_SELF_CHECK, 1, 0, first, sizeof first, trace, sizeof trace);
        if (o != SB_OK || why[0]) {
            snprintf(err, errlen, "policy %s: self_check failed: %s", policy_what(p), o != SB_OK ? trace : why);
            lua_sandbox_close(L);
            generation_drop(g);
            free(g);
            return NULL;
        }
    }
    g->idle[g->n_idle++] = L;
    g->refs = 1;
    return g;
}

static void watch(policy *p);

/* A state of the current generation for hook h. 1: *gout and *Lout set;
 * 0: the generation has no such hook (nothing taken); -1: err. */
static int acquire(policy *p, hook_id h, generation **gout, lua_State **Lout, char *err, size_t errlen) {
    watch(p);
    /* No such hook in the current generation: nothing to take (no lock). */
    if (!atomic_load_explicit(&p->cur, memory_order_acquire)->has[h]) return 0;
    pthread_mutex_lock(&p->lock);
    generation *g = atomic_load(&p->cur);
    if (!g->has[h]) { /* a reload in between */
        pthread_mutex_unlock(&p->lock);
        return 0;
    }
    g->refs++;
    lua_State *L = g->n_idle ? g->idle[--g->n_idle] : NULL;
    pthread_mutex_unlock(&p->lock);
    if (!L) {
        /* Built outside the lock: other threads keep going meanwhile. */
        L = state_new(p, g, false, err, errlen);
        if (!L) {
            pthread_mutex_lock(&p->lock);
            bool drop = --g->refs == 0;
            pthread_mutex_unlock(&p->lock);
            if (drop) generation_drop(g);
            return -1;
        }
    }
    *gout = g;
    *Lout = L;
    return 1;
}

/* Give a state back: kept for reuse when it is healthy and of the current
 * generation; closed otherwise (a state stopped by a budget may hold
 * anything; an old generation's is no longer wanted). */
static void release(policy *p, generation *g, lua_State *L) {
    bool keep = false;
    pthread_mutex_lock(&p->lock);
    if (!lua_sandbox_broken(L) && g == atomic_load(&p->cur) && g->n_idle < p->lim.max_idle) {
        g->idle[g->n_idle++] = L;
        keep = true;
    }
    bool drop = --g->refs == 0;
    pthread_mutex_unlock(&p->lock);
    if (!keep) lua_sandbox_close(L);
    if (drop) generation_drop(g);
}

static bool same_file(const struct stat *st, const struct timespec *m, off_t size, ino_t ino) {
    return st->st_mtim.tv_sec == m->tv_sec && st->st_mtim.tv_nsec == m->tv_nsec && st->st_size == size &&
           st->st_ino == ino;
}

static int reload(policy *p, const char *why, char *err, size_t errlen) {
    pthread_mutex_lock(&p->reload_lock);
    generation *ng = generation_build(p, err, errlen);
    if (!ng) {
        struct stat st;
        pthread_mutex_lock(&p->lock);
        unsigned long serving = atomic_load(&p->cur)->id;
        if (p->cfg->policy_file && stat(p->cfg->policy_file, &st) == 0) {
            p->has_rejected = true;
            p->rejected_mtime = st.st_mtim;
            p->rejected_size = st.st_size;
            p->rejected_ino = st.st_ino;
        }
        pthread_mutex_unlock(&p->lock);
        log_error("policy reload rejected (%s), still serving generation %lu: %s", why, serving, err);
        pthread_mutex_unlock(&p->reload_lock);
        return -1;
    }
    pthread_mutex_lock(&p->lock);
    generation *old = atomic_load(&p->cur);
    p->has_rejected = false;
    if (old->len == ng->len &&
        (old->source == ng->source || (old->source && ng->source && memcmp(old->source, ng->source, ng->len) == 0))) {
        /* The same text (touched, or saved unchanged): keep serving. */
        old->has_stat = ng->has_stat;
        old->mtime = ng->mtime;
        old->size = ng->size;
        old->ino = ng->ino;
        pthread_mutex_unlock(&p->lock);
        generation_drop(ng);
        free(ng);
        pthread_mutex_unlock(&p->reload_lock);
        return 0;
    }
    ng->id = ++p->next_id;
    ng->next = p->all;
    p->all = ng;
    atomic_store_explicit(&p->cur, ng, memory_order_release);
    /* The old generation's idle states go; those in use are closed when
     * their calls release them. */
    lua_State **idle = old->idle;
    size_t n_idle = old->n_idle;
    old->idle = NULL;
    old->n_idle = 0;
    bool drop = --old->refs == 0;
    pthread_mutex_unlock(&p->lock);
    for (size_t i = 0; i < n_idle; i++) lua_sandbox_close(idle[i]);
    free(idle);
    if (drop) generation_drop(old);
    log_info("policy %s: generation %lu serving (%s); generation %lu retired", policy_what(p), ng->id, why, old->id);
    pthread_mutex_unlock(&p->reload_lock);
    return 0;
}

int policy_reload(policy *p, char *err, size_t errlen) { return reload(p, "reload requested", err, errlen); }

/* policy.watch: a changed policy file (mtime, size or inode) is compiled
 * as a new generation; looked at at most once a second, by whichever
 * request comes first (the others go on meanwhile). */
static void watch(policy *p) {
    if (!p->lim.watch || !p->cfg->policy_file) return;
    int64_t now = mono_ns();
    int64_t next = atomic_load_explicit(&p->next_check_ns, memory_order_relaxed);
    /* One request per second looks (the one that wins the CAS); the others
     * go on without a lock. */
    if (now < next || !atomic_compare_exchange_strong(&p->next_check_ns, &next, now + POLICY_WATCH_NS)) return;
    pthread_mutex_lock(&p->lock);
    generation *g = atomic_load(&p->cur);
    struct timespec m = g->mtime;
    off_t size = g->size;
    ino_t ino = g->ino;
    bool rej = p->has_rejected;
    struct timespec rm = p->rejected_mtime;
    off_t rsize = p->rejected_size;
    ino_t rino = p->rejected_ino;
    pthread_mutex_unlock(&p->lock);
    struct stat st;
    if (stat(p->cfg->policy_file, &st) == 0 && !same_file(&st, &m, size, ino) &&
        !(rej && same_file(&st, &rm, rsize, rino))) {
        char err[2048];
        reload(p, "the policy file changed", err, sizeof err);
    }
}

/* ---------- new / free ---------- */

static void policy_destroy(policy *p) {
    for (generation *g = p->all, *n; g; g = n) {
        n = g->next;
        generation_drop(g);
        free(g);
    }
    json_free(p->view);
    shared_dict_release(p->host.shared);
    limits_clear(&p->lim);
    free(p->module_dir);
    pthread_mutex_destroy(&p->lock);
    pthread_mutex_destroy(&p->reload_lock);
    free(p);
}

policy *policy_new(const config *c, char *err, size_t errlen) {
    policy *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errlen, "policy: out of memory");
        return NULL;
    }
    p->cfg = c;
    p->refs = 1;
    pthread_mutex_init(&p->lock, NULL);
    pthread_mutex_init(&p->reload_lock, NULL);
    char lerr[512];
    if (limits_parse(c, &p->lim, lerr, sizeof lerr) != 0) {
        snprintf(err, errlen, "%s: %s", c->path ? c->path : "config", lerr);
        policy_destroy(p);
        return NULL;
    }
    p->view = config_view(c);
    p->host.config = p->view;
    p->host.shared = shared_dict_acquire(p->lim.shared_bytes);
    if (!p->view || !p->host.shared) {
        snprintf(err, errlen, "policy: out of memory");
        policy_destroy(p);
        return NULL;
    }
    if (c->policy_file) {
        /* The policy's own folder holds its helper modules. */
        p->module_dir = strdup(c->policy_file);
        char *slash = p->module_dir ? strrchr(p->module_dir, '/') : NULL;
        if (slash)
            *slash = '\0';
        else if (p->module_dir)
            snprintf(p->module_dir, strlen(p->module_dir) + 1, ".");
    }
    size_t nm = lua_regfacade_modules(&p->host, p->modules);
    p->sbo = (lua_sandbox_options){.memory_bytes = p->lim.memory_bytes,
                                   .instructions = p->lim.instructions,
                                   .time_ms = p->lim.time_ms,
                                   .module_dir = p->module_dir,
                                   .base_dir = c->dir,
                                   .data_files = (const char *const *)p->lim.data_files,
                                   .n_data_files = p->lim.n_data_files,
                                   .data_dir = p->lim.data_dir,
                                   .modules = p->modules,
                                   .n_modules = nm};
    generation *g = generation_build(p, err, errlen);
    if (!g) {
        policy_destroy(p);
        return NULL;
    }
    g->id = ++p->next_id;
    p->all = g;
    atomic_store(&p->cur, g);
    atomic_store(&p->next_check_ns, mono_ns() + POLICY_WATCH_NS);
    return p;
}

static void policy_unref(policy *p) {
    pthread_mutex_lock(&p->lock);
    bool last = --p->refs == 0;
    pthread_mutex_unlock(&p->lock);
    if (last) policy_destroy(p);
}

void policy_free(policy *p) {
    if (p) policy_unref(p);
}

const char *policy_fingerprint(const policy *p) {
    return atomic_load_explicit(&((policy *)p)->cur, memory_order_acquire)->fingerprint;
}

bool policy_has_rewrite(policy *p) {
    watch(p);
    return atomic_load_explicit(&p->cur, memory_order_acquire)->has[H_REWRITE];
}

/* ---------- requests as Lua values ---------- */

static void set_field_string(lua_State *L, int t, const char *k, const char *v) {
    if (!v) return;
    lua_pushstring(L, v);
    lua_setfield(L, t, k);
}

/* req.headers, req.client and req.ctx, built on first use (most hooks
 * read few of them; building them for every call costs): from the
 * request when t is the running call's req, else (a req kept from an
 * earlier call) empty. Each is stored in t, so it is built once. */
static void build_headers(lua_State *L, const policy_request *r) {
    size_t n = r ? r->n_headers : 0;
    lua_createtable(L, 0, (int)(n < 64 ? n : 64));
    for (size_t i = 0; i < n; i++) {
        char name[128];
        size_t k = 0;
        for (const char *q = r->headers[i].name; *q && k + 1 < sizeof name; q++)
            name[k++] = (char)(*q >= 'A' && *q <= 'Z' ? *q + 32 : *q);
        name[k] = '\0';
        if (r->headers[i].value) {
            lua_pushstring(L, r->headers[i].value);
            lua_setfield(L, -2, name);
        }
    }
}

static void build_client(lua_State *L, const policy_request *r) {
    lua_createtable(L, 0, 4);
    if (!r) return;
    set_field_string(L, lua_gettop(L), "ip", r->client_ip);
    set_field_string(L, lua_gettop(L), "user", r->user);
    set_field_string(L, lua_gettop(L), "password", r->password); /* NULL in a log entry */
    set_field_string(L, lua_gettop(L), "token", r->token);
}

static void build_ctx(lua_State *L, const policy_request *r) {
    if (!r || !r->state || !r->state->ctx || lua_json_push(L, r->state->ctx) != 0) lua_newtable(L);
}

/* req.target: where the request goes, { upstream =, repository = }. Once
 * resolve answered (rewrite, log), its answer; before (authorize, spec,
 * resolve), where regfacade.mirror's mapping sends the name as asked (the
 * one mapping, in Lua: ?ns=, a leading upstream name, default_upstream,
 * library/), or false when it maps nowhere. Req is at 1. */
static void build_target(lua_State *L, const policy_request *r) {
    if (r && r->target_upstream && r->target_repository) {
        lua_createtable(L, 0, 2);
        set_field_string(L, lua_gettop(L), "upstream", r->target_upstream);
        set_field_string(L, lua_gettop(L), "repository", r->target_repository);
        return;
    }
    int top = lua_gettop(L);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "regfacade.mirror");
    if (!r || !r->repository || lua_pcall(L, 1, 1, 0) != LUA_OK || lua_getfield(L, -1, "resolve") != LUA_TFUNCTION) {
        lua_settop(L, top);
        lua_pushboolean(L, 0);
        return;
    }
    lua_pushvalue(L, 1);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK || !lua_istable(L, -1)) {
        lua_settop(L, top);
        lua_pushboolean(L, 0);
        return;
    }
    int ans = lua_gettop(L);
    lua_createtable(L, 0, 2);
    lua_getfield(L, ans, "upstream");
    lua_setfield(L, -2, "upstream");
    lua_getfield(L, ans, "repository");
    lua_setfield(L, -2, "repository");
    lua_replace(L, top + 1);
    lua_settop(L, top + 1);
}

static int req_index(lua_State *L) {
    if (lua_type(L, 2) != LUA_TSTRING) return 0;
    const char *k = lua_tostring(L, 2);
    if (k[0] != 'h' && k[0] != 'c' && k[0] != 't') return 0; /* ns, spec, ...: absent, and asked often */
    void (*build)(lua_State *, const policy_request *) = strcmp(k, "headers") == 0  ? build_headers
                                                         : strcmp(k, "client") == 0 ? build_client
                                                         : strcmp(k, "ctx") == 0    ? build_ctx
                                                         : strcmp(k, "target") == 0 ? build_target
                                                                                    : NULL;
    if (!build) return 0;
    void **cur = lua_sandbox_user(L);
    const policy_request *r = cur[0] == lua_topointer(L, 1) ? cur[1] : NULL;
    build(L, r);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, -2);
    lua_rawset(L, 1);
    return 1;
}

/* Push req (client, headers and ctx come on first use, req_index). A log
 * entry's request has no password or token. */
static void push_request(lua_State *L, const policy_request *r) {
    luaL_checkstack(L, 8, "policy request");
    lua_createtable(L, 0, 8);
    int t = lua_gettop(L);
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &REQ_MT_KEY) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_createtable(L, 0, 2);
        lua_pushcfunction(L, req_index);
        lua_setfield(L, -2, "__index");
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable");
        lua_pushvalue(L, -1);
        lua_rawsetp(L, LUA_REGISTRYINDEX, &REQ_MT_KEY);
    }
    lua_setmetatable(L, t);
    void **cur = lua_sandbox_user(L);
    cur[0] = (void *)lua_topointer(L, t);
    cur[1] = (void *)r;
    set_field_string(L, t, "method", r->method);
    set_field_string(L, t, "kind", r->kind);
    set_field_string(L, t, "repository", r->repository);
    set_field_string(L, t, "reference", r->reference);
    set_field_string(L, t, "ns", r->ns);
    set_field_string(L, t, "host", r->host);
    if (r->state && r->state->credentials[0]) set_field_string(L, t, "credentials", r->state->credentials);
    /* req.spec: the spec the spec hook named (specs.h), in regfacade.json's shape. */
    if (r->spec && lua_json_push(L, r->spec) == 0) lua_setfield(L, t, "spec");
}

/* What every protected hook function shares. */
typedef struct {
    policy *p;
    const policy_request *req;
    policy_error *e;
    int rc;       /* -1: e filled (a refusal or a bad answer) */
    bool refused; /* the policy said no (metrics "refused") */
    bool invalid; /* the answer was malformed (logged like an error) */
} hook_call;

static void invalid_answer(hook_call *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void invalid_answer(hook_call *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    c->e->status = 500;
    snprintf(c->e->code, sizeof c->e->code, "UNKNOWN");
    vsnprintf(c->e->message, sizeof c->e->message, fmt, ap);
    c->e->challenge[0] = '\0';
    c->e->retry_after[0] = '\0';
    c->e->failed = true;
    va_end(ap);
    c->rc = -1;
    c->invalid = true;
}

/* req.ctx after a hook, kept for the next one (as JSON: the next hook may
 * run on another state). */
static void save_ctx(lua_State *L, int req, hook_call *c, const char *hook) {
    policy_state *st = c->req->state;
    if (!st) return;
    lua_pushliteral(L, "ctx");
    int type = lua_rawget(L, req);
    if (type == LUA_TNIL) {
        /* never looked at (it is built on first use): unchanged */
    } else if (type != LUA_TTABLE) {
        invalid_answer(c, "the policy's %s hook set req.ctx to a %s (it must stay a table)", hook,
                       luaL_typename(L, -1));
    } else {
        lua_pushnil(L);
        if (lua_next(L, -2) == 0) {
            json_free(st->ctx);
            st->ctx = NULL;
        } else {
            lua_pop(L, 2);
            char err[300];
            json_value *v = lua_json_to_tree_named(L, -1, "req.ctx", err, sizeof err);
            if (!v) {
                invalid_answer(c, "the policy's %s hook left a value in req.ctx that is not JSON data: %s", hook, err);
            } else {
                json_free(st->ctx);
                st->ctx = v;
            }
        }
    }
    lua_settop(L, req);
}

/* t[key] as a string (raw access; anchored in t), NULL when absent or not
 * a string. */
static const char *raw_string(lua_State *L, int t, const char *key) {
    lua_pushstring(L, key);
    lua_rawget(L, t);
    const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    lua_pop(L, 1);
    return s;
}

static int raw_type(lua_State *L, int t, const char *key) {
    lua_pushstring(L, key);
    int type = lua_rawget(L, t);
    lua_pop(L, 1);
    return type;
}

static bool name_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n >= POLICY_CREDENTIALS_MAX) return false;
    for (const char *q = s; *q; q++)
        if (!((*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z') || (*q >= '0' && *q <= '9') || *q == '_' ||
              *q == '-' || *q == '.'))
            return false;
    return true;
}

/* The request ends as d says (a refusal, counted as "refused"). */
static void refused_with(hook_call *c, const lua_deny *d) {
    c->rc = -1;
    c->refused = true;
    policy_error_set(c->e, d->status, d->code, "%s", d->message);
    snprintf(c->e->challenge, sizeof c->e->challenge, "%s", d->challenge);
    if (d->retry_after >= 0) snprintf(c->e->retry_after, sizeof c->e->retry_after, "%ld", d->retry_after);
}

/* The one reader of a hook's refusal at idx (lua_deny_read: a deny value,
 * or the hook's older forms, default_status when they give none). A
 * malformed refusal is the policy's bug: 500, logged. message, when not
 * NULL, stands in for a table refusal that carries none. */
static void refuse(hook_call *c, lua_State *L, int idx, int default_status, const char *hook, const char *message) {
    lua_deny d;
    char err[700];
    if (lua_deny_read(L, idx, default_status, &d, err, sizeof err) != 0) {
        invalid_answer(c, "%s returned a malformed refusal: %s", hook, err);
        return;
    }
    if (message && lua_type(L, idx) == LUA_TTABLE && raw_type(L, idx, "message") == LUA_TNIL)
        snprintf(d.message, sizeof d.message, "%s", message);
    refused_with(c, &d);
}

/* Answers at 2 and 3 read with raw accesses: a frozen table (a module's,
 * or regfacade.config's) is replaced by the table holding its contents. */
static void answers_readable(lua_State *L) {
    for (int i = 2; i <= 3; i++) {
        if (lua_type(L, i) != LUA_TTABLE) continue;
        lua_sandbox_contents(L, i);
        lua_replace(L, i);
    }
}

/* Pushes hooks[name] (a function: the generation has it). */
static void push_hook(lua_State *L, hook_id h) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &HOOKFN_KEY);
    lua_rawgeti(L, -1, h + 1);
    lua_remove(L, -2);
    lua_sandbox_note_function(L, -1);
}

/* "(at FILE:LINE)" from a Lua message "FILE:LINE: why", or "". */
static void location_of(const char *msg, char *out, size_t outlen) {
    out[0] = '\0';
    const char *c1 = strchr(msg, ':');
    if (!c1 || c1 == msg) return;
    const char *d = c1 + 1;
    size_t nd = strspn(d, "0123456789");
    if (nd == 0 || d[nd] != ':') return;
    snprintf(out, outlen, " at %.*s", (int)(d + nd - msg), msg);
}

/* Run protected function fn (argument: c) in a state of the current
 * generation for hook h. 0: fn ran (c->rc says what it decided); 1: the
 * generation has no such hook (fn did not run); -1: the call failed
 * (error, budget, memory): c->e filled, logged, counted. */
static int run_hook(policy *p, hook_id h, lua_CFunction fn, hook_call *c) {
    generation *g;
    lua_State *L;
    char err[1024];
    int a = acquire(p, h, &g, &L, err, sizeof err);
    if (a == 0) return 1;
    if (a < 0) {
        log_error("policy %s: cannot build a Lua state for hook %s: %s", policy_what(p), HOOKS[h], err);
        policy_error_set(c->e, 500, "UNKNOWN", "the policy cannot run (details in the server log)");
        c->e->failed = true;
        metrics_policy_hook(HOOKS[h], 0, "error");
        return -1;
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char first[512], trace[4096];
    lua_pushcfunction(L, fn);
    lua_pushlightuserdata(L, c);
    lua_sandbox_outcome o = lua_sandbox_call(L, PHASE_OF[h], 1, 0, first, sizeof first, trace, sizeof trace);
    double secs = seconds_since(&t0);
    const char *outcome = o == SB_TIME || o == SB_INSTRUCTIONS || o == SB_MEMORY ? "budget"
                          : o != SB_OK || c->invalid                             ? "error"
                          : c->refused                                           ? "refused"
                                                                                 : "ok";
    metrics_policy_hook(HOOKS[h], secs, outcome);
    const policy_request *r = c->req;
    const char *what = r && r->repository ? r->repository : r && r->kind ? r->kind : "-";
    int rc = 0;
    if (o != SB_OK) {
        bool broken = lua_sandbox_broken(L);
        log_error("policy %s hook failed for %s %s (generation %lu)%s: %s", HOOKS[h], r && r->kind ? r->kind : "-",
                  what, g->id, broken ? "; its Lua state is closed and rebuilt" : "", trace);
        char where[300];
        location_of(first, where, sizeof where);
        const char *why = o == SB_TIME           ? " exceeded its time budget"
                          : o == SB_INSTRUCTIONS ? " exceeded its instruction budget"
                          : o == SB_MEMORY       ? " exceeded its memory cap"
                                                 : " failed";
        policy_error_set(c->e, 500, "UNKNOWN", "the policy's %s hook%s%s (details in the server log)", HOOKS[h], why,
                         where);
        c->e->failed = true;
        rc = -1;
    } else if (c->invalid) {
        /* A malformed answer is the policy's bug: loud, like a Lua error. */
        log_error("policy %s hook for %s %s (generation %lu): %s", HOOKS[h], r && r->kind ? r->kind : "-", what, g->id,
                  c->e->message);
    }
    release(p, g, L);
    return rc;
}

/* ---------- self_check ---------- */

static int self_check_fn(lua_State *L) {
    char *why = lua_touserdata(L, 1);
    lua_settop(L, 0);
    push_hook(L, H_SELF_CHECK);
    lua_call(L, 0, 2);
    if (lua_type(L, 1) == LUA_TBOOLEAN && lua_toboolean(L, 1)) return 0;
    const char *msg = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : NULL;
    snprintf(why, 512, "self_check returned %s%s%s (expected true)", luaL_typename(L, 1), msg ? ", " : "",
             msg ? msg : "");
    return 0;
}

/* ---------- authorize ---------- */

static int authorize_fn(lua_State *L) {
    hook_call *c = lua_touserdata(L, 1);
    lua_settop(L, 0);
    push_request(L, c->req); /* 1 */
    push_hook(L, H_AUTHORIZE);
    lua_pushvalue(L, 1);
    lua_call(L, 1, 2); /* 1: req, 2: answer, 3: message */
    answers_readable(L);
    int ans = 2;
    const char *msg = lua_type(L, 3) == LUA_TSTRING ? lua_tostring(L, 3) : NULL;
    int type = lua_type(L, ans);
    if (lua_deny_get(L, ans)) {
        refuse(c, L, ans, 403, "authorize", NULL);
    } else if (type == LUA_TBOOLEAN && lua_toboolean(L, ans)) {
        c->rc = 0;
    } else if (type == LUA_TSTRING && strcmp(lua_tostring(L, ans), "allow") == 0) {
        c->rc = 0;
    } else if (type == LUA_TNIL || type == LUA_TBOOLEAN ||
               (type == LUA_TSTRING && strcmp(lua_tostring(L, ans), "deny") == 0)) {
        /* false, nil or "deny", and a message or a deny value: 403 unless it says otherwise. */
        if (!msg && !lua_deny_get(L, 3)) {
            lua_pushnil(L); /* anything else second is no message */
            lua_replace(L, 3);
        }
        refuse(c, L, 3, 403, "authorize", NULL);
    } else if (type == LUA_TTABLE && raw_type(L, ans, "status") == LUA_TNIL) {
        const char *creds = raw_string(L, ans, "credentials");
        if (raw_type(L, ans, "credentials") != LUA_TNIL && (!creds || !name_ok(creds))) {
            invalid_answer(c,
                           "authorize returned credentials that are not a credential set name "
                           "([A-Za-z0-9._-], 1 to %d characters)",
                           POLICY_CREDENTIALS_MAX - 1);
        } else {
            c->rc = 0;
            if (creds && c->req->state)
                snprintf(c->req->state->credentials, sizeof c->req->state->credentials, "%s", creds);
        }
    } else if (type == LUA_TTABLE) {
        refuse(c, L, ans, 403, "authorize", msg); /* { status = N, code =, message =, challenge = } */
    } else {
        invalid_answer(c,
                       "authorize must return true, false, \"allow\", \"deny\", regfacade.deny(...) or a table; "
                       "got %s",
                       luaL_typename(L, ans));
    }
    lua_settop(L, 1);
    save_ctx(L, 1, c, "authorize");
    return 0;
}

int policy_authorize(policy *p, const policy_request *req, policy_error *e) {
    hook_call c = {.p = p, .req = req, .e = e};
    int r = run_hook(p, H_AUTHORIZE, authorize_fn, &c);
    if (r == 1) return 0; /* no authorize hook: everyone may pull */
    if (r < 0) return -1;
    return c.rc;
}

/* ---------- spec ---------- */

typedef struct {
    hook_call c;
    char *provider, *id;
    size_t plen, idlen;
    int found;
} spec_call;

static int spec_fn(lua_State *L) {
    spec_call *s = lua_touserdata(L, 1);
    hook_call *c = &s->c;
    lua_settop(L, 0);
    push_request(L, c->req); /* 1 */
    push_hook(L, H_SPEC);
    lua_pushvalue(L, 1);
    lua_call(L, 1, 2); /* 2: answer, 3: error */
    answers_readable(L);
    if (lua_deny_get(L, 2)) {
        refuse(c, L, 2, 404, "spec", NULL);
    } else if (lua_isnil(L, 2)) {
        if (lua_isnil(L, 3))
            s->found = 0; /* no spec: resolve(req) as without specs */
        else
            refuse(c, L, 3, 404, "spec", NULL);
    } else if (!lua_istable(L, 2)) {
        invalid_answer(c, "spec must return { provider = NAME, id = ID } or nil; got %s", luaL_typename(L, 2));
    } else {
        const char *pv = raw_string(L, 2, "provider");
        const char *iv = raw_string(L, 2, "id");
        if (!pv || !*pv || !iv) {
            invalid_answer(c, "spec must return { provider = NAME, id = ID }: %s is not a string",
                           !pv || !*pv ? "provider" : "id");
        } else {
            snprintf(s->provider, s->plen, "%s", pv);
            snprintf(s->id, s->idlen, "%s", iv);
            s->found = 1;
        }
    }
    lua_settop(L, 1);
    save_ctx(L, 1, c, "spec");
    return 0;
}

int policy_spec_lookup(policy *p, const policy_request *req, char *provider, size_t plen, char *id, size_t idlen,
                       policy_error *e) {
    spec_call s = {.c = {.p = p, .req = req, .e = e}, .provider = provider, .id = id, .plen = plen, .idlen = idlen};
    int r = run_hook(p, H_SPEC, spec_fn, &s.c);
    if (r == 1) return 0;
    if (r < 0 || s.c.rc < 0) return -1;
    return s.found;
}

/* ---------- resolve ---------- */

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* A Lua value from a resolve answer as JSON: strings, integers, booleans,
 * arrays (sequences) and string-keyed tables (keys sorted, so the same
 * answer gives the same text). Raw accesses only. NULL with err. */
static json_value *table_to_json(lua_State *L, int idx, int depth, char *err, size_t errlen);

static json_value *lua_to_json(lua_State *L, int idx, int depth, char *err, size_t errlen) {
    idx = lua_absindex(L, idx);
    if (depth > 16) {
        snprintf(err, errlen, "nested too deeply");
        return NULL;
    }
    switch (lua_type(L, idx)) {
        case LUA_TSTRING: {
            size_t n;
            const char *s = lua_tolstring(L, idx, &n);
            return json_new_stringn(s, n);
        }
        case LUA_TBOOLEAN:
            return json_new_bool(lua_toboolean(L, idx));
        case LUA_TNUMBER:
            if (lua_isinteger(L, idx)) return json_new_int64((int64_t)lua_tointeger(L, idx));
            snprintf(err, errlen, "a number that is not an integer");
            return NULL;
        case LUA_TTABLE:
            break;
        default:
            snprintf(err, errlen, "a %s value", luaL_typename(L, idx));
            return NULL;
    }
    lua_sandbox_contents(L, idx);
    json_value *out = table_to_json(L, lua_gettop(L), depth, err, errlen);
    lua_pop(L, 1);
    return out;
}

static json_value *table_to_json(lua_State *L, int idx, int depth, char *err, size_t errlen) {
    lua_Integer len = (lua_Integer)lua_rawlen(L, idx);
    if (len > 0) {
        json_value *arr = json_new_array();
        for (lua_Integer i = 1; arr && i <= len; i++) {
            lua_rawgeti(L, idx, i);
            json_value *item = lua_to_json(L, -1, depth + 1, err, errlen);
            lua_pop(L, 1);
            if (!item || json_array_append(arr, item) != 0) {
                json_free(arr);
                return NULL;
            }
        }
        return arr;
    }
    size_t n = 0, cap = 8;
    char **keys = malloc(cap * sizeof *keys);
    lua_pushnil(L);
    while (keys && lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            snprintf(err, errlen, "a table with a %s key", luaL_typename(L, -1));
            lua_pop(L, 1);
            for (size_t i = 0; i < n; i++) free(keys[i]);
            free(keys);
            return NULL;
        }
        if (n == cap) {
            char **nk = realloc(keys, (cap *= 2) * sizeof *nk);
            if (!nk) {
                lua_pop(L, 1);
                break;
            }
            keys = nk;
        }
        keys[n++] = strdup(lua_tostring(L, -1));
    }
    json_value *obj = keys ? json_new_object() : NULL;
    if (keys) qsort(keys, n, sizeof *keys, cmp_str);
    for (size_t i = 0; i < n; i++) {
        if (obj && keys[i]) {
            lua_pushstring(L, keys[i]);
            lua_rawget(L, idx);
            json_value *v = lua_to_json(L, -1, depth + 1, err, errlen);
            lua_pop(L, 1);
            if (!v || json_object_set(obj, keys[i], v) != 0) {
                json_free(obj);
                obj = NULL;
            }
        }
        free(keys[i]);
    }
    free(keys);
    return obj;
}

/* The `layers` and `platforms` of a resolve answer (table at t). 0, or -1
 * with the call's error set. */
static int read_layers(hook_call *c, lua_State *L, int t, policy_resolution *out) {
    lua_pushliteral(L, "layers");
    int lt = lua_rawget(L, t);
    if (lt != LUA_TNIL && lt != LUA_TTABLE) {
        invalid_answer(c, "resolve: layers must be a list, got %s", luaL_typename(L, -1));
        lua_pop(L, 1);
        return -1;
    }
    char err[600];
    json_value *fp = json_new_array();
    if (!fp) {
        invalid_answer(c, "resolve: out of memory");
        lua_pop(L, 1);
        return -1;
    }
    if (lt == LUA_TTABLE) {
        /* A list taken from regfacade.config (frozen: a proxy whose raw
         * length is 0) is read through its contents, not as empty. */
        lua_sandbox_contents(L, -1);
        lua_replace(L, -2);
        size_t n = lua_rawlen(L, -1);
        out->has_layers = true;
        out->layers = calloc(n ? n : 1, sizeof *out->layers);
        if (!out->layers) {
            invalid_answer(c, "resolve: out of memory");
            lua_pop(L, 1);
            json_free(fp);
            return -1;
        }
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, -1, (lua_Integer)i + 1);
            err[0] = '\0';
            json_value *v = lua_to_json(L, -1, 0, err, sizeof err);
            lua_pop(L, 1);
            char where[64];
            snprintf(where, sizeof where, "layers[%zu]", i + 1);
            if (!v) {
                invalid_answer(c, "resolve: %s: %s", where, err[0] ? err : "out of memory");
                lua_pop(L, 1);
                json_free(fp);
                return -1;
            }
            int rc = layer_spec_parse(v, c->p->cfg->dir, where, &out->layers[i], err, sizeof err);
            if (rc == 0) {
                char *f = layer_spec_fingerprint(&out->layers[i]);
                json_array_append(fp, f ? json_new_string(f) : json_new_null());
                free(f);
            }
            json_free(v);
            if (rc != 0) {
                invalid_answer(c, "resolve: %s", err);
                lua_pop(L, 1);
                json_free(fp);
                return -1;
            }
            out->n_layers = i + 1;
        }
    }
    lua_pop(L, 1);
    lua_pushliteral(L, "platforms");
    int pt = lua_rawget(L, t);
    if (pt != LUA_TNIL) {
        if (pt != LUA_TTABLE) {
            invalid_answer(c, "resolve: platforms must be a list of \"os/arch[/variant]\"");
            lua_pop(L, 1);
            json_free(fp);
            return -1;
        }
        lua_sandbox_contents(L, -1); /* as for layers: a frozen list reads through its contents */
        lua_replace(L, -2);
        size_t n = lua_rawlen(L, -1);
        out->platforms = calloc(n ? n : 1, sizeof *out->platforms);
        json_value *pl = json_new_array();
        for (size_t i = 0; out->platforms && i < n; i++) {
            lua_rawgeti(L, -1, (lua_Integer)i + 1);
            const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
            if (!s || !strchr(s, '/')) {
                lua_pop(L, 2);
                json_free(pl);
                json_free(fp);
                invalid_answer(c, "resolve: platforms[%zu] must be \"os/arch[/variant]\"", i + 1);
                return -1;
            }
            out->platforms[i] = strdup(s);
            out->n_platforms = i + 1;
            json_array_append(pl, json_new_string(s));
            lua_pop(L, 1);
        }
        json_array_append(fp, pl);
    }
    lua_pop(L, 1);
    size_t len;
    out->fingerprint = json_serialize(fp, &len);
    json_free(fp);
    return 0;
}

/* The `referrers` of a resolve answer (table at t), when present: a list of
 * descriptors. 0, or -1 with the call's error set. */
static int read_referrers(hook_call *c, lua_State *L, int t, policy_resolution *out) {
    lua_pushliteral(L, "referrers");
    int ty = lua_rawget(L, t);
    if (ty == LUA_TNIL) {
        lua_pop(L, 1);
        return 0;
    }
    char err[300];
    json_value *v = ty == LUA_TTABLE ? lua_json_to_tree_named(L, -1, "resolve.referrers", err, sizeof err) : NULL;
    lua_pop(L, 1);
    if (!v || (v->type != JSON_ARRAY && !(v->type == JSON_OBJECT && v->count == 0))) {
        invalid_answer(c, "resolve: referrers must be a list of descriptors%s%s", v ? "" : ": ", v ? "" : err);
        json_free(v);
        return -1;
    }
    for (size_t i = 0; v->type == JSON_ARRAY && i < v->count; i++) {
        const json_value *d = v->items[i];
        const char *mt = json_object_get_string(d, "mediaType"), *dg = json_object_get_string(d, "digest");
        uint64_t size;
        if (d->type != JSON_OBJECT || !mt || !strchr(mt, '/') || !dg || !ref_valid_digest(dg) ||
            !json_get_uint64(json_object_get(d, "size"), &size)) {
            invalid_answer(c, "resolve: referrers[%zu] must be a descriptor (mediaType, digest, size)", i + 1);
            json_free(v);
            return -1;
        }
    }
    if (v->type != JSON_ARRAY) { /* {} is how an empty Lua table reads */
        json_free(v);
        v = json_new_array();
    }
    out->referrers = v;
    return 0;
}

/* upstream "NAME" with credential set SET -> "NAME@SET" (a configured
 * credential set of that upstream). 0, or -1 with e. */
static int apply_credentials(const policy *p, const char *set, char *upstream, size_t len, policy_error *e) {
    if (!set || !*set) return 0;
    char name[256];
    snprintf(name, sizeof name, "%s@%s", upstream, set);
    if (strlen(name) >= len || !config_find_upstream(p->cfg, name)) {
        policy_error_set(e, 500, "UNKNOWN",
                         "the policy chose credential set \"%s\", which upstream \"%s\" does not have "
                         "(upstreams.%s.credentials)",
                         set, upstream, upstream);
        e->failed = true;
        return -1;
    }
    snprintf(upstream, len, "%s", name);
    return 0;
}

typedef struct {
    hook_call c;
    policy_resolution *out;
} resolve_call;

static int resolve_fn(lua_State *L) {
    resolve_call *rc = lua_touserdata(L, 1);
    hook_call *c = &rc->c;
    const policy_request *req = c->req;
    policy_resolution *out = rc->out;
    lua_settop(L, 0);
    push_request(L, req); /* 1 */
    push_hook(L, H_RESOLVE);
    lua_pushvalue(L, 1);
    int nargs = 1;
    if (req->spec) {
        /* resolve(req, spec): the same table as req.spec. */
        lua_pushliteral(L, "spec");
        lua_rawget(L, 1);
        nargs = 2;
    }
    lua_call(L, nargs, 2); /* 2: answer, 3: error */
    answers_readable(L);
    if (lua_deny_get(L, 2)) {
        refuse(c, L, 2, 404, "resolve", NULL);
    } else if (lua_isnil(L, 2)) {
        refuse(c, L, 3, 404, "resolve", NULL);
    } else if (!lua_istable(L, 2)) {
        invalid_answer(c, "resolve must return a table, or nil and an error; got %s", luaL_typename(L, 2));
    } else {
        const config *cfg = c->p->cfg;
        /* One pass over the answer (strings stay anchored in it). */
        const char *up = NULL, *repo = NULL, *ref = NULL, *creds = NULL;
        bool creds_bad = false, more = false, has_referrers = false;
        lua_pushnil(L);
        while (lua_next(L, 2) != 0) {
            if (lua_type(L, -2) == LUA_TSTRING) {
                const char *k = lua_tostring(L, -2);
                const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
                if (strcmp(k, "upstream") == 0)
                    up = v;
                else if (strcmp(k, "repository") == 0)
                    repo = v;
                else if (strcmp(k, "reference") == 0)
                    ref = v;
                else if (strcmp(k, "credentials") == 0) {
                    creds = v;
                    creds_bad = !v || !name_ok(v);
                } else if (strcmp(k, "layers") == 0 || strcmp(k, "platforms") == 0)
                    more = true;
                else if (strcmp(k, "referrers") == 0)
                    has_referrers = true;
            }
            lua_pop(L, 1);
        }
        if (!up) up = cfg->default_upstream;
        if (!repo) repo = req->repository;
        if (!ref) ref = req->reference;
        if (!creds && req->state && req->state->credentials[0]) creds = req->state->credentials;
        if (up && strchr(up, '@')) {
            invalid_answer(c,
                           "resolve returned upstream \"%s\": name the upstream, and the credential set with "
                           "credentials = SET",
                           up);
        } else if (!up || !config_find_upstream(cfg, up)) {
            invalid_answer(c, "resolve returned upstream \"%s\", which is not configured", up ? up : "(none)");
        } else if (creds_bad) {
            invalid_answer(c, "resolve returned credentials that are not a credential set name");
        } else if (!repo || !ref_valid_name(repo)) {
            invalid_answer(c, "resolve returned an invalid repository \"%s\"", repo ? repo : "(none)");
        } else if (ref && !ref_valid_tag(ref) && !ref_valid_digest(ref)) {
            invalid_answer(c, "resolve returned an invalid reference \"%s\"", ref);
        } else {
            copy_str(out->upstream, sizeof out->upstream, up);
            copy_str(out->repository, sizeof out->repository, repo);
            copy_str(out->reference, sizeof out->reference, ref ? ref : "");
            if (apply_credentials(c->p, creds, out->upstream, sizeof out->upstream, c->e) != 0) {
                c->rc = -1;
                c->invalid = true;
            } else if (has_referrers && read_referrers(c, L, 2, out) != 0) {
                /* the call's error is set */
            } else if (!more) {
                /* The common answer (where from, nothing added): the
                 * fingerprint of an empty decision, without building it. */
                out->fingerprint = strdup("[]");
                if (out->fingerprint)
                    c->rc = 0;
                else
                    invalid_answer(c, "resolve: out of memory");
            } else if (read_layers(c, L, 2, out) == 0) {
                c->rc = 0;
            }
        }
    }
    lua_settop(L, 1);
    save_ctx(L, 1, c, "resolve");
    return 0;
}

int policy_resolve(policy *p, const policy_request *req, policy_resolution *out, policy_error *e) {
    memset(out, 0, sizeof *out);
    resolve_call rc = {.c = {.p = p, .req = req, .e = e}, .out = out};
    int r = run_hook(p, H_RESOLVE, resolve_fn, &rc.c);
    if (r == 1) {
        /* No resolve hook: default_upstream, unchanged. */
        if (!p->cfg->default_upstream) {
            policy_error_set(e, 404, "NAME_UNKNOWN", "no resolve hook and no default_upstream for %s",
                             req->repository ? req->repository : "-");
            return -1;
        }
        snprintf(out->upstream, sizeof out->upstream, "%s", p->cfg->default_upstream);
        snprintf(out->repository, sizeof out->repository, "%s", req->repository ? req->repository : "");
        snprintf(out->reference, sizeof out->reference, "%s", req->reference ? req->reference : "");
        return apply_credentials(p, req->state ? req->state->credentials : NULL, out->upstream, sizeof out->upstream,
                                 e);
    }
    if (r < 0 || rc.c.rc < 0) {
        policy_resolution_clear(out);
        return -1;
    }
    return 0;
}

/* ---------- rewrite ---------- */

typedef struct {
    hook_call c;
    json_value **manifest, **config;
    const image_layer *stack;
    size_t n;
} rewrite_call;

static int rewrite_fn(lua_State *L) {
    rewrite_call *w = lua_touserdata(L, 1);
    hook_call *c = &w->c;
    lua_settop(L, 0);
    push_request(L, c->req); /* 1 */
    push_hook(L, H_REWRITE); /* 2 */
    char err[1024];
    /* image_rewrite_run calls the hook under its own pcall; a budget trip
     * there still ends this call as tripped (lua_sandbox_call sees it). */
    lua_deny denied;
    int rc = image_rewrite_run(L, 2, 1, w->manifest, w->config, w->stack, w->n, &denied, err, sizeof err);
    if (rc == 1) {
        refused_with(c, &denied);
    } else if (rc != 0) {
        char first[768];
        snprintf(first, sizeof first, "%s", err);
        first[strcspn(first, "\n")] = '\0';
        invalid_answer(c, "%s", first);
    } else {
        c->rc = 0;
    }
    lua_settop(L, 1);
    save_ctx(L, 1, c, "rewrite");
    return 0;
}

int policy_rewrite(policy *p, const policy_request *req, json_value **manifest, json_value **config,
                   const image_layer *stack, size_t n, policy_error *e) {
    rewrite_call w = {
        .c = {.p = p, .req = req, .e = e}, .manifest = manifest, .config = config, .stack = stack, .n = n};
    int r = run_hook(p, H_REWRITE, rewrite_fn, &w.c);
    if (r == 1) return 0;
    if (r < 0 || w.c.rc < 0) return -1;
    return 0;
}

/* ---------- log ---------- */

struct policy_log_entry {
    policy *p;
    policy_request req;
    policy_state state;
    policy_header *headers;
    struct timespec start;
    char *strings[10]; /* what req points into */
};

static const char *keep(policy_log_entry *e, int i, const char *s) {
    if (!s) return NULL;
    e->strings[i] = strdup(s);
    return e->strings[i];
}

policy_log_entry *policy_log_begin(policy *p, const policy_request *req, const struct timespec *start) {
    if (!p || !req) return NULL;
    if (!atomic_load_explicit(&p->cur, memory_order_acquire)->has[H_LOG]) return NULL;
    pthread_mutex_lock(&p->lock);
    p->refs++;
    pthread_mutex_unlock(&p->lock);
    policy_log_entry *e = calloc(1, sizeof *e);
    if (!e) {
        policy_unref(p);
        return NULL;
    }
    e->p = p;
    if (start)
        e->start = *start;
    else
        clock_gettime(CLOCK_MONOTONIC, &e->start);
    e->req.method = keep(e, 0, req->method);
    e->req.kind = keep(e, 1, req->kind);
    e->req.repository = keep(e, 2, req->repository);
    e->req.reference = keep(e, 3, req->reference);
    e->req.ns = keep(e, 4, req->ns);
    e->req.host = keep(e, 5, req->host);
    e->req.client_ip = keep(e, 6, req->client_ip);
    e->req.user = keep(e, 7, req->user);
    e->req.target_upstream = keep(e, 8, req->target_upstream);
    e->req.target_repository = keep(e, 9, req->target_repository);
    if (req->n_headers) {
        e->headers = calloc(req->n_headers, sizeof *e->headers);
        for (size_t i = 0; e->headers && i < req->n_headers; i++) {
            e->headers[i].name = strdup(req->headers[i].name);
            e->headers[i].value = strdup(req->headers[i].value ? req->headers[i].value : "");
            e->req.n_headers = i + 1;
        }
        e->req.headers = e->headers;
    }
    if (req->state) {
        e->state.ctx = req->state->ctx ? json_clone(req->state->ctx) : NULL;
        snprintf(e->state.credentials, sizeof e->state.credentials, "%s", req->state->credentials);
    }
    e->req.state = &e->state;
    return e;
}

typedef struct {
    hook_call c;
    unsigned status;
    uint64_t bytes;
    bool completed;
    double duration;
    const char *upstream;
} log_call;

static int log_fn(lua_State *L) {
    log_call *l = lua_touserdata(L, 1);
    lua_settop(L, 0);
    push_hook(L, H_LOG);
    push_request(L, l->c.req);
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, (lua_Integer)l->status);
    lua_setfield(L, -2, "status");
    lua_pushinteger(L, (lua_Integer)l->bytes);
    lua_setfield(L, -2, "bytes");
    lua_pushboolean(L, l->completed);
    lua_setfield(L, -2, "completed");
    lua_pushnumber(L, l->duration);
    lua_setfield(L, -2, "duration");
    if (l->upstream && *l->upstream) {
        lua_pushstring(L, l->upstream);
        lua_setfield(L, -2, "upstream");
    }
    lua_call(L, 2, 0);
    l->c.rc = 0;
    return 0;
}

void policy_log_end(policy_log_entry *e, unsigned status, uint64_t bytes, bool completed, const char *upstream) {
    if (!e) return;
    policy_error err;
    log_call l = {.c = {.p = e->p, .req = &e->req, .e = &err},
                  .status = status,
                  .bytes = bytes,
                  .completed = completed,
                  .duration = seconds_since(&e->start),
                  .upstream = upstream};
    run_hook(e->p, H_LOG, log_fn, &l.c); /* errors are logged there; nothing else to do */
    for (int i = 0; i < 10; i++) free(e->strings[i]);
    for (size_t i = 0; i < e->req.n_headers; i++) {
        free((char *)e->headers[i].name);
        free((char *)e->headers[i].value);
    }
    free(e->headers);
    policy_state_clear(&e->state);
    policy *p = e->p;
    free(e);
    policy_unref(p);
}
