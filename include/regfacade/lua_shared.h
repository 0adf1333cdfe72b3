/*
 * lua_shared: `regfacade.shared`, one dictionary shared by every Lua state
 * of the process (all threads, all policy generations, across reloads):
 * counters, rate limits, caches of verified credentials. Like OpenResty's
 * ngx.shared.DICT: string keys; string, number or boolean values; a TTL
 * per entry; a byte cap (policy.shared_bytes) with least-recently-used
 * eviction; atomic add and incr.
 *
 * The real work is plain C (shared_dict_*), usable and tested without Lua;
 * lua_shared_open() binds it as a module.
 *
 * Lua (each function also works with method syntax, shared:get(k)):
 *   shared.get(key)                  -> value | nil
 *   shared.set(key, value [, ttl])   -> true  (value nil deletes; evicts
 *                                       least recently used entries when full)
 *   shared.add(key, value [, ttl])   -> true | false, "exists"
 *   shared.incr(key, delta [, init [, init_ttl]])
 *                                    -> new value | nil, "not found"
 *   shared.delete(key)               -> true
 *   shared.ttl(key)                  -> seconds left | 0 (no expiry) | nil (absent)
 *   shared.capacity(), shared.used() -> bytes
 * ttl is in seconds (fractions allowed), 0 or nil: no expiry. Keys are
 * 1..250 bytes. set, add, incr and delete cannot be called while a policy
 * loads (every Lua state runs that code; only hooks may write).
 */
#ifndef REGFACADE_LUA_SHARED_H
#define REGFACADE_LUA_SHARED_H

#include <lua.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SHARED_KEY_MAX 250
#define SHARED_DEFAULT_BYTES (16u * 1024 * 1024)

typedef struct shared_dict shared_dict;

typedef enum { SHARED_NONE = 0, SHARED_BOOL, SHARED_INT, SHARED_NUM, SHARED_STR } shared_type;

typedef struct {
    shared_type type;
    bool b;
    int64_t i;
    double n;
    const char *s; /* SHARED_STR: input only (get copies into a buffer) */
    size_t len;
} shared_value;

typedef enum {
    SHARED_OK = 0,
    SHARED_NOT_FOUND,
    SHARED_EXISTS,     /* add: a live entry has the key */
    SHARED_NOT_NUMBER, /* incr on a string or boolean */
    SHARED_TOO_LARGE,  /* the entry alone is larger than the cap */
    SHARED_OVERFLOW,   /* incr: integer overflow */
    SHARED_NO_MEMORY,
} shared_result;

shared_dict *shared_dict_new(size_t cap_bytes);
void shared_dict_free(shared_dict *d);

/* The process's dictionary, created on first use; released by the last
 * holder. A later acquire with another cap changes the cap (entries are
 * evicted as needed on the next write). */
shared_dict *shared_dict_acquire(size_t cap_bytes);
void shared_dict_release(shared_dict *d);

/* get: SHARED_OK with *out set; a string value is copied into buf (cap
 * bytes) and out->s points at buf, out->len its length; when it does not
 * fit, SHARED_TOO_LARGE with out->len the length needed. */
shared_result shared_dict_get(shared_dict *d, const char *key, size_t klen, shared_value *out, char *buf, size_t cap);
shared_result shared_dict_set(shared_dict *d, const char *key, size_t klen, const shared_value *v, double ttl);
shared_result shared_dict_add(shared_dict *d, const char *key, size_t klen, const shared_value *v, double ttl);
/* incr: integer when the value and delta are integers, else float. With
 * init (not NULL) an absent key starts at *init (with init_ttl). */
shared_result shared_dict_incr(shared_dict *d, const char *key, size_t klen, const shared_value *delta,
                               const shared_value *init, double init_ttl, shared_value *out);
shared_result shared_dict_delete(shared_dict *d, const char *key, size_t klen);
/* Seconds left (0: no expiry); SHARED_NOT_FOUND when absent or expired. */
shared_result shared_dict_ttl(shared_dict *d, const char *key, size_t klen, double *left);
size_t shared_dict_used(shared_dict *d, size_t *cap, size_t *count);

/* The module: a module open function for lua_sandbox_module (upvalue 1:
 * the shared_dict as a light userdata). Returns the module table. */
int lua_shared_open(lua_State *L);

#endif
