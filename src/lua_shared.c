#include "regfacade/lua_shared.h"

#include <lauxlib.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "regfacade/lua_sandbox.h"

typedef struct entry {
    struct entry *next;                /* bucket chain */
    struct entry *lru_prev, *lru_next; /* most recently used first */
    uint64_t hash;
    int64_t expires; /* CLOCK_MONOTONIC ns; 0: never */
    shared_type type;
    bool b;
    int64_t i;
    double n;
    size_t klen, vlen;
    char data[]; /* key, then a string value */
} entry;

struct shared_dict {
    pthread_mutex_t lock;
    entry **buckets;
    size_t n_buckets, count;
    size_t used, cap; /* bytes: sizeof(entry) + key + value per entry */
    entry *lru_head, *lru_tail;
    int refs; /* shared_dict_acquire holders */
};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t hash_key(const char *k, size_t n) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)k[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static size_t entry_size(size_t klen, size_t vlen) { return sizeof(entry) + klen + vlen; }

shared_dict *shared_dict_new(size_t cap_bytes) {
    shared_dict *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->n_buckets = 64;
    d->buckets = calloc(d->n_buckets, sizeof *d->buckets);
    if (!d->buckets) {
        free(d);
        return NULL;
    }
    d->cap = cap_bytes;
    pthread_mutex_init(&d->lock, NULL);
    return d;
}

void shared_dict_free(shared_dict *d) {
    if (!d) return;
    for (entry *e = d->lru_head, *n; e; e = n) {
        n = e->lru_next;
        free(e);
    }
    free(d->buckets);
    pthread_mutex_destroy(&d->lock);
    free(d);
}

/* One dictionary per process, so counters survive policy reloads (every
 * generation and every config generation get the same one). */
static pthread_mutex_t process_lock = PTHREAD_MUTEX_INITIALIZER;
static shared_dict *process_dict;

shared_dict *shared_dict_acquire(size_t cap_bytes) {
    pthread_mutex_lock(&process_lock);
    if (!process_dict) process_dict = shared_dict_new(cap_bytes);
    shared_dict *d = process_dict;
    if (d) {
        d->refs++;
        pthread_mutex_lock(&d->lock);
        d->cap = cap_bytes;
        pthread_mutex_unlock(&d->lock);
    }
    pthread_mutex_unlock(&process_lock);
    return d;
}

void shared_dict_release(shared_dict *d) {
    if (!d) return;
    pthread_mutex_lock(&process_lock);
    if (--d->refs == 0) {
        if (d == process_dict) process_dict = NULL;
        shared_dict_free(d);
    }
    pthread_mutex_unlock(&process_lock);
}

/* ---------- internals (lock held) ---------- */

static void lru_unlink(shared_dict *d, entry *e) {
    if (e->lru_prev)
        e->lru_prev->lru_next = e->lru_next;
    else
        d->lru_head = e->lru_next;
    if (e->lru_next)
        e->lru_next->lru_prev = e->lru_prev;
    else
        d->lru_tail = e->lru_prev;
    e->lru_prev = e->lru_next = NULL;
}

static void lru_front(shared_dict *d, entry *e) {
    e->lru_prev = NULL;
    e->lru_next = d->lru_head;
    if (d->lru_head) d->lru_head->lru_prev = e;
    d->lru_head = e;
    if (!d->lru_tail) d->lru_tail = e;
}

static void remove_entry(shared_dict *d, entry *e) {
    entry **pp = &d->buckets[e->hash & (d->n_buckets - 1)];
    while (*pp && *pp != e) pp = &(*pp)->next;
    if (*pp) *pp = e->next;
    lru_unlink(d, e);
    d->used -= entry_size(e->klen, e->vlen);
    d->count--;
    free(e);
}

static bool expired(const entry *e, int64_t now) { return e->expires && e->expires <= now; }

/* The live entry for key (an expired one is removed on the way). */
static entry *find(shared_dict *d, const char *key, size_t klen, uint64_t h, int64_t now) {
    for (entry *e = d->buckets[h & (d->n_buckets - 1)]; e; e = e->next) {
        if (e->hash == h && e->klen == klen && memcmp(e->data, key, klen) == 0) {
            if (expired(e, now)) {
                remove_entry(d, e);
                return NULL;
            }
            return e;
        }
    }
    return NULL;
}

static void grow(shared_dict *d) {
    if (d->count < d->n_buckets * 2 || d->n_buckets >= (1u << 24)) return;
    size_t nb = d->n_buckets * 2;
    entry **b = calloc(nb, sizeof *b);
    if (!b) return; /* longer chains, still correct */
    for (size_t i = 0; i < d->n_buckets; i++) {
        for (entry *e = d->buckets[i], *n; e; e = n) {
            n = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
        }
    }
    free(d->buckets);
    d->buckets = b;
    d->n_buckets = nb;
}

/* Make room for need bytes: expired entries first, then the least
 * recently used. */
static void make_room(shared_dict *d, size_t need, int64_t now) {
    if (d->used + need <= d->cap) return;
    for (entry *e = d->lru_tail, *p; e && d->used + need > d->cap; e = p) {
        p = e->lru_prev;
        if (expired(e, now)) remove_entry(d, e);
    }
    while (d->lru_tail && d->used + need > d->cap) remove_entry(d, d->lru_tail);
}

static int64_t expiry(double ttl, int64_t now) {
    if (!(ttl > 0)) return 0;
    if (ttl > 1e9) ttl = 1e9;
    return now + (int64_t)(ttl * 1e9);
}

static shared_result store(shared_dict *d, const char *key, size_t klen, uint64_t h, const shared_value *v, double ttl,
                           int64_t now, entry *old) {
    size_t vlen = v->type == SHARED_STR ? v->len : 0;
    size_t need = entry_size(klen, vlen);
    if (need > d->cap) return SHARED_TOO_LARGE;
    if (old) remove_entry(d, old);
    make_room(d, need, now);
    entry *e = malloc(need);
    if (!e) return SHARED_NO_MEMORY;
    memset(e, 0, sizeof *e);
    e->hash = h;
    e->expires = expiry(ttl, now);
    e->type = v->type;
    e->b = v->b;
    e->i = v->i;
    e->n = v->n;
    e->klen = klen;
    e->vlen = vlen;
    memcpy(e->data, key, klen);
    if (vlen) memcpy(e->data + klen, v->s, vlen);
    size_t bi = h & (d->n_buckets - 1);
    e->next = d->buckets[bi];
    d->buckets[bi] = e;
    lru_front(d, e);
    d->used += need;
    d->count++;
    grow(d);
    return SHARED_OK;
}

/* ---------- the C API ---------- */

shared_result shared_dict_get(shared_dict *d, const char *key, size_t klen, shared_value *out, char *buf, size_t cap) {
    memset(out, 0, sizeof *out);
    uint64_t h = hash_key(key, klen);
    pthread_mutex_lock(&d->lock);
    entry *e = find(d, key, klen, h, now_ns());
    shared_result r = SHARED_NOT_FOUND;
    if (e) {
        r = SHARED_OK;
        out->type = e->type;
        out->b = e->b;
        out->i = e->i;
        out->n = e->n;
        out->len = e->vlen;
        if (e->type == SHARED_STR) {
            if (e->vlen > cap)
                r = SHARED_TOO_LARGE;
            else {
                memcpy(buf, e->data + e->klen, e->vlen);
                out->s = buf;
            }
        }
        lru_unlink(d, e);
        lru_front(d, e);
    }
    pthread_mutex_unlock(&d->lock);
    return r;
}

shared_result shared_dict_set(shared_dict *d, const char *key, size_t klen, const shared_value *v, double ttl) {
    if (v->type == SHARED_NONE) return shared_dict_delete(d, key, klen);
    uint64_t h = hash_key(key, klen);
    int64_t now = now_ns();
    pthread_mutex_lock(&d->lock);
    entry *old = find(d, key, klen, h, now);
    shared_result r = store(d, key, klen, h, v, ttl, now, old);
    pthread_mutex_unlock(&d->lock);
    return r;
}

shared_result shared_dict_add(shared_dict *d, const char *key, size_t klen, const shared_value *v, double ttl) {
    uint64_t h = hash_key(key, klen);
    int64_t now = now_ns();
    pthread_mutex_lock(&d->lock);
    shared_result r = find(d, key, klen, h, now) ? SHARED_EXISTS : store(d, key, klen, h, v, ttl, now, NULL);
    pthread_mutex_unlock(&d->lock);
    return r;
}

static bool add_values(const shared_value *a, const shared_value *b, shared_value *out) {
    memset(out, 0, sizeof *out);
    if (a->type == SHARED_INT && b->type == SHARED_INT) {
        out->type = SHARED_INT;
        return !__builtin_add_overflow(a->i, b->i, &out->i);
    }
    out->type = SHARED_NUM;
    out->n = (a->type == SHARED_INT ? (double)a->i : a->n) + (b->type == SHARED_INT ? (double)b->i : b->n);
    return true;
}

shared_result shared_dict_incr(shared_dict *d, const char *key, size_t klen, const shared_value *delta,
                               const shared_value *init, double init_ttl, shared_value *out) {
    memset(out, 0, sizeof *out);
    if (delta->type != SHARED_INT && delta->type != SHARED_NUM) return SHARED_NOT_NUMBER;
    uint64_t h = hash_key(key, klen);
    int64_t now = now_ns();
    pthread_mutex_lock(&d->lock);
    entry *e = find(d, key, klen, h, now);
    shared_result r = SHARED_OK;
    if (e) {
        shared_value cur = {.type = e->type, .i = e->i, .n = e->n};
        if (e->type != SHARED_INT && e->type != SHARED_NUM)
            r = SHARED_NOT_NUMBER;
        else if (!add_values(&cur, delta, out))
            r = SHARED_OVERFLOW;
        else {
            e->type = out->type;
            e->i = out->i;
            e->n = out->n;
            lru_unlink(d, e);
            lru_front(d, e);
        }
    } else if (!init) {
        r = SHARED_NOT_FOUND;
    } else if (init->type != SHARED_INT && init->type != SHARED_NUM) {
        r = SHARED_NOT_NUMBER;
    } else if (!add_values(init, delta, out)) {
        r = SHARED_OVERFLOW;
    } else {
        r = store(d, key, klen, h, out, init_ttl, now, NULL);
    }
    pthread_mutex_unlock(&d->lock);
    return r;
}

shared_result shared_dict_delete(shared_dict *d, const char *key, size_t klen) {
    uint64_t h = hash_key(key, klen);
    pthread_mutex_lock(&d->lock);
    entry *e = find(d, key, klen, h, now_ns());
    if (e) remove_entry(d, e);
    pthread_mutex_unlock(&d->lock);
    return SHARED_OK;
}

shared_result shared_dict_ttl(shared_dict *d, const char *key, size_t klen, double *left) {
    uint64_t h = hash_key(key, klen);
    int64_t now = now_ns();
    pthread_mutex_lock(&d->lock);
    entry *e = find(d, key, klen, h, now);
    if (e) *left = e->expires ? (double)(e->expires - now) / 1e9 : 0;
    pthread_mutex_unlock(&d->lock);
    return e ? SHARED_OK : SHARED_NOT_FOUND;
}

size_t shared_dict_used(shared_dict *d, size_t *cap, size_t *count) {
    pthread_mutex_lock(&d->lock);
    size_t u = d->used;
    if (cap) *cap = d->cap;
    if (count) *count = d->count;
    pthread_mutex_unlock(&d->lock);
    return u;
}

/* ---------- Lua ---------- */

#define WRITERS (SB_PHASES_HOOKS)

/* The dictionary, and the index of the first real argument (2 when called
 * with method syntax on the module table). */
static shared_dict *self(lua_State *L, int *arg) {
    *arg = lua_rawequal(L, 1, lua_upvalueindex(2)) ? 2 : 1;
    return lua_touserdata(L, lua_upvalueindex(1));
}

static const char *check_key(lua_State *L, int i, size_t *len, const char *fn) {
    const char *k = lua_type(L, i) == LUA_TSTRING ? lua_tolstring(L, i, len) : NULL;
    if (!k || *len == 0 || *len > SHARED_KEY_MAX)
        luaL_error(L, "regfacade.shared.%s: the key must be a string of 1 to %d bytes", fn, SHARED_KEY_MAX);
    return k;
}

static void check_value(lua_State *L, int i, shared_value *v, const char *fn, const char *what) {
    memset(v, 0, sizeof *v);
    switch (lua_type(L, i)) {
        case LUA_TNIL:
        case LUA_TNONE:
            v->type = SHARED_NONE;
            break;
        case LUA_TBOOLEAN:
            v->type = SHARED_BOOL;
            v->b = lua_toboolean(L, i);
            break;
        case LUA_TNUMBER:
            if (lua_isinteger(L, i)) {
                v->type = SHARED_INT;
                v->i = (int64_t)lua_tointeger(L, i);
            } else {
                v->type = SHARED_NUM;
                v->n = (double)lua_tonumber(L, i);
            }
            break;
        case LUA_TSTRING:
            v->type = SHARED_STR;
            v->s = lua_tolstring(L, i, &v->len);
            break;
        default:
            luaL_error(L, "regfacade.shared.%s: %s must be a string, number or boolean, got %s", fn, what,
                       luaL_typename(L, i));
    }
}

static double check_ttl(lua_State *L, int i, const char *fn) {
    if (lua_isnoneornil(L, i)) return 0;
    lua_Number t = luaL_checknumber(L, i);
    if (!(t >= 0) || isinf(t)) luaL_error(L, "regfacade.shared.%s: ttl must be a number of seconds >= 0", fn);
    return (double)t;
}

static void push_value(lua_State *L, const shared_value *v) {
    switch (v->type) {
        case SHARED_BOOL:
            lua_pushboolean(L, v->b);
            break;
        case SHARED_INT:
            lua_pushinteger(L, (lua_Integer)v->i);
            break;
        case SHARED_NUM:
            lua_pushnumber(L, (lua_Number)v->n);
            break;
        case SHARED_STR:
            lua_pushlstring(L, v->s, v->len);
            break;
        default:
            lua_pushnil(L);
    }
}

static int fail_result(lua_State *L, shared_result r, const char *fn) {
    switch (r) {
        case SHARED_TOO_LARGE:
            return luaL_error(
                L, "regfacade.shared.%s: the entry is larger than the whole dictionary (policy.shared_bytes)", fn);
        case SHARED_NO_MEMORY:
            return luaL_error(L, "regfacade.shared.%s: out of memory", fn);
        case SHARED_NOT_NUMBER:
            return luaL_error(L, "regfacade.shared.%s: the value is not a number", fn);
        case SHARED_OVERFLOW:
            return luaL_error(L, "regfacade.shared.%s: integer overflow", fn);
        default:
            return luaL_error(L, "regfacade.shared.%s: failed", fn);
    }
}

static int l_get(lua_State *L) {
    int a;
    shared_dict *d = self(L, &a);
    size_t klen;
    const char *k = check_key(L, a, &klen, "get");
    char small[1024];
    shared_value v;
    shared_result r = shared_dict_get(d, k, klen, &v, small, sizeof small);
    while (r == SHARED_TOO_LARGE) {
        /* A bigger buffer, allocated with no lock held (a memory error
         * must not leave the dictionary locked). */
        size_t need = v.len;
        char *big = lua_newuserdatauv(L, need, 0);
        r = shared_dict_get(d, k, klen, &v, big, need);
    }
    if (r != SHARED_OK) {
        lua_pushnil(L);
        return 1;
    }
    push_value(L, &v);
    return 1;
}

static int l_set(lua_State *L) {
    int a;
    shared_dict *d = self(L, &a);
    lua_sandbox_check_phase(L, "regfacade.shared.set", WRITERS);
    size_t klen;
    const char *k = check_key(L, a, &klen, "set");
    shared_value v;
    check_value(L, a + 1, &v, "set", "the value");
    shared_result r = shared_dict_set(d, k, klen, &v, check_ttl(L, a + 2, "set"));
    if (r != SHARED_OK) return fail_result(L, r, "set");
    lua_pushboolean(L, 1);
    return 1;
}

static int l_add(lua_State *L) {
    int a;
    shared_dict *d = self(L, &a);
    lua_sandbox_check_phase(L, "regfacade.shared.add", WRITERS);
    size_t klen;
    const char *k = check_key(L, a, &klen, "add");
    shared_value v;
    check_value(L, a + 1, &v, "add", "the value");
    if (v.type == SHARED_NONE) return luaL_error(L, "regfacade.shared.add: the value must not be nil");
    shared_result r = shared_dict_add(d, k, klen, &v, check_ttl(L, a + 2, "add"));
    if (r == SHARED_EXISTS) {
        lua_pushboolean(L, 0);
        lua_pushliteral(L, "exists");
        return 2;
    }
    if (r != SHARED_OK) return fail_result(L, r, "add");
    lua_pushboolean(L, 1);
    return 1;
}

static int l_incr(lua_State *L) {
    int a;
    shared_dict *d = self(L, &a);
    lua_sandbox_check_phase(L, "regfacade.shared.incr", WRITERS);
    size_t klen;
    const char *k = check_key(L, a, &klen, "incr");
    shared_value delta, init, out;
    if (lua_type(L, a + 1) != LUA_TNUMBER) return luaL_error(L, "regfacade.shared.incr: delta must be a number");
    check_value(L, a + 1, &delta, "incr", "delta");
    bool has_init = !lua_isnoneornil(L, a + 2);
    if (has_init) {
        if (lua_type(L, a + 2) != LUA_TNUMBER) return luaL_error(L, "regfacade.shared.incr: init must be a number");
        check_value(L, a + 2, &init, "incr", "init");
    }
    shared_result r = shared_dict_incr(d, k, klen, &delta, has_init ? &init : NULL, check_ttl(L, a + 3, "incr"), &out);
    if (r == SHARED_NOT_FOUND) {
        lua_pushnil(L);
        lua_pushliteral(L, "not found");
        return 2;
    }
    if (r != SHARED_OK) return fail_result(L, r, "incr");
    push_value(L, &out);
    return 1;
}

static int l_delete(lua_State *L) {
    int a;
    shared_dict *d = self(L, &a);
    lua_sandbox_check_phase(L, "regfacade.shared.delete", WRITERS);
    size_t klen;
    const char *k = check_key(L, a, &klen, "delete");
    shared_dict_delete(d, k, klen);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_ttl(lua_State *L) {
    int a;
    shared_dict *d = self(L, &a);
    size_t klen;
    const char *k = check_key(L, a, &klen, "ttl");
    double left;
    if (shared_dict_ttl(d, k, klen, &left) != SHARED_OK) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushnumber(L, (lua_Number)left);
    return 1;
}

static int l_capacity(lua_State *L) {
    int a;
    shared_dict *d = self(L, &a);
    size_t cap;
    shared_dict_used(d, &cap, NULL);
    lua_pushinteger(L, (lua_Integer)cap);
    return 1;
}

static int l_used(lua_State *L) {
    int a;
    shared_dict *d = self(L, &a);
    lua_pushinteger(L, (lua_Integer)shared_dict_used(d, NULL, NULL));
    return 1;
}

int lua_shared_open(lua_State *L) {
    void *d = lua_touserdata(L, lua_upvalueindex(1));
    if (!d) return luaL_error(L, "regfacade.shared: no dictionary");
    static const luaL_Reg fns[] = {{"get", l_get},           {"set", l_set},       {"add", l_add},
                                   {"incr", l_incr},         {"delete", l_delete}, {"ttl", l_ttl},
                                   {"capacity", l_capacity}, {"used", l_used},     {NULL, NULL}};
    lua_createtable(L, 0, 8);
    int t = lua_gettop(L);
    for (const luaL_Reg *f = fns; f->name; f++) {
        lua_pushlightuserdata(L, d);
        lua_pushvalue(L, t);
        lua_pushcclosure(L, f->func, 2);
        lua_setfield(L, t, f->name);
    }
    return 1;
}
