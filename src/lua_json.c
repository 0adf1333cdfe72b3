/*
 * lua_json: JSON trees as Lua values and back, and regfacade.json (see
 * include/regfacade/lua_json.h).
 *
 * Tree -> Lua (lua_json_push) allocates only Lua objects, so a Lua memory
 * error there leaks nothing of ours. Lua -> tree (lua_json_to_tree) is
 * written to raise nothing once it starts building: only raw, allocation
 * free accesses (lua_next, lua_rawget with keys already on the stack,
 * lua_stringtonumber, lua_checkstack, which returns 0 rather than raising),
 * so a partial tree is always freed by us. The Lua functions keep what they
 * malloc in a box userdata with a __gc, so an error raised between two
 * steps leaks nothing either. No statics beyond constant tables.
 */
#include "regfacade/lua_json.h"

#include <lauxlib.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BOX_MT "regfacade.json.box"
#define PATH_MAX_LEN 480

/* ------------------------------------------------------------------------ */
/* Shared pieces                                                            */

void lua_json_push_null(lua_State *L) { lua_pushlightuserdata(L, NULL); }

bool lua_json_is_null(lua_State *L, int idx) {
    return lua_type(L, idx) == LUA_TLIGHTUSERDATA && lua_touserdata(L, idx) == NULL;
}

/* Push the shared array metatable, creating it on first use. */
static void push_array_mt(lua_State *L) {
    if (luaL_newmetatable(L, LUA_JSON_ARRAY_MT)) {
        lua_pushliteral(L, "array");
        lua_setfield(L, -2, "__jsontype");
    }
}

/* The text the encoder writes for the number at idx (buf >= 40 bytes);
 * false for NaN and infinities. */
static bool number_text(lua_State *L, int idx, char *buf, size_t len) {
    if (lua_isinteger(L, idx)) {
        snprintf(buf, len, "%lld", (long long)lua_tointeger(L, idx));
        return true;
    }
    double d = (double)lua_tonumber(L, idx);
    if (!isfinite(d)) return false;
    /* Integral and inside int64: an integer, for Go decoders (see header). */
    if (d == floor(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0) {
        snprintf(buf, len, "%lld", (long long)d);
        return true;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, len, "%.*g", prec, d);
        if (strtod(buf, NULL) == d) break;
    }
    for (char *p = buf; *p; p++)
        if (*p == ',') /* a locale's decimal comma */
            *p = '.';
    return true;
}

/* A box: C memory owned by a Lua value, freed by its __gc if an error
 * unwinds before the function frees it itself. */
typedef struct {
    json_value *tree;
    char *text;
} box;

static int box_gc(lua_State *L) {
    box *b = luaL_checkudata(L, 1, BOX_MT);
    json_free(b->tree);
    free(b->text);
    b->tree = NULL;
    b->text = NULL;
    return 0;
}

static box *new_box(lua_State *L) {
    box *b = lua_newuserdatauv(L, sizeof(*b), 0);
    b->tree = NULL;
    b->text = NULL;
    if (luaL_newmetatable(L, BOX_MT)) {
        lua_pushcfunction(L, box_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return b;
}

/* ------------------------------------------------------------------------ */
/* Tree -> Lua                                                              */

static int push_value(lua_State *L, const json_value *v, int depth);

/* Pushes the Lua number of a JSON number; *canonical tells whether the
 * encoder would write the same text back. */
static void push_number(lua_State *L, const json_value *v, bool *canonical) {
    const char *text = v->str ? v->str : "0";
    if (lua_stringtonumber(L, text) == 0) lua_pushnumber(L, (lua_Number)strtod(text, NULL));
    char buf[64];
    *canonical = number_text(L, -1, buf, sizeof buf) && strcmp(buf, text) == 0;
}

/* Pushes item; when it is a number whose text is not canonical, records
 * the text under key (at key_idx) in the table at nums_idx, creating that
 * table when it is still nil. */
static int push_item(lua_State *L, const json_value *item, int depth, int nums_idx, int key_idx) {
    if (item->type != JSON_NUMBER) return push_value(L, item, depth);
    bool canonical;
    push_number(L, item, &canonical);
    if (!canonical) {
        if (lua_isnil(L, nums_idx)) {
            lua_newtable(L);
            lua_replace(L, nums_idx);
        }
        lua_pushvalue(L, key_idx);
        lua_pushlstring(L, item->str, item->len);
        lua_rawset(L, nums_idx);
    }
    return 0;
}

static int push_array(lua_State *L, const json_value *v, int depth) {
    lua_createtable(L, v->count > INT32_MAX ? 0 : (int)v->count, 0);
    int t = lua_gettop(L);
    lua_pushnil(L); /* t + 1: __jsonnum, when needed */
    for (size_t i = 0; i < v->count; i++) {
        lua_pushinteger(L, (lua_Integer)i + 1);
        if (push_item(L, v->items[i], depth + 1, t + 1, t + 2) != 0) return -1;
        lua_rawset(L, t);
    }
    if (lua_isnil(L, t + 1)) {
        push_array_mt(L);
    } else {
        lua_createtable(L, 0, 2);
        lua_pushliteral(L, "array");
        lua_setfield(L, -2, "__jsontype");
        lua_pushvalue(L, t + 1);
        lua_setfield(L, -2, "__jsonnum");
    }
    lua_setmetatable(L, t);
    lua_settop(L, t);
    return 0;
}

static int push_object(lua_State *L, const json_value *v, int depth) {
    int n = v->count > INT32_MAX ? 0 : (int)v->count;
    lua_createtable(L, 0, n);
    int t = lua_gettop(L);
    lua_pushnil(L); /* t + 1: __jsonnum, when needed */
    bool dup = false;
    for (size_t i = 0; i < v->count; i++) {
        lua_pushlstring(L, v->keys[i], v->key_lens[i]);
        if (lua_rawget(L, t) != LUA_TNIL) dup = true;
        lua_pop(L, 1);
        lua_pushlstring(L, v->keys[i], v->key_lens[i]);
        if (push_item(L, v->items[i], depth + 1, t + 1, t + 2) != 0) return -1;
        lua_rawset(L, t); /* a duplicated key: the last value wins, as in json_object_get */
    }
    /* __jsonorder: each key once, where its last occurrence stands (as
     * json_object_set leaves a duplicated key). */
    lua_createtable(L, n, 0);
    int order = lua_gettop(L);
    if (!dup) {
        for (size_t i = 0; i < v->count; i++) {
            lua_pushlstring(L, v->keys[i], v->key_lens[i]);
            lua_rawseti(L, order, (lua_Integer)i + 1);
        }
    } else {
        lua_createtable(L, 0, n);
        int last = lua_gettop(L);
        for (size_t i = 0; i < v->count; i++) {
            lua_pushlstring(L, v->keys[i], v->key_lens[i]);
            lua_pushinteger(L, (lua_Integer)i);
            lua_rawset(L, last);
        }
        lua_Integer k = 0;
        for (size_t i = 0; i < v->count; i++) {
            lua_pushlstring(L, v->keys[i], v->key_lens[i]);
            lua_rawget(L, last);
            bool is_last = lua_tointeger(L, -1) == (lua_Integer)i;
            lua_pop(L, 1);
            if (is_last) {
                lua_pushlstring(L, v->keys[i], v->key_lens[i]);
                lua_rawseti(L, order, ++k);
            }
        }
        lua_pop(L, 1);
    }
    lua_createtable(L, 0, 3);
    lua_pushliteral(L, "object");
    lua_setfield(L, -2, "__jsontype");
    lua_pushvalue(L, order);
    lua_setfield(L, -2, "__jsonorder");
    if (!lua_isnil(L, t + 1)) {
        lua_pushvalue(L, t + 1);
        lua_setfield(L, -2, "__jsonnum");
    }
    lua_setmetatable(L, t);
    lua_settop(L, t);
    return 0;
}

static int push_value(lua_State *L, const json_value *v, int depth) {
    if (!lua_checkstack(L, 8)) return -1;
    if (!v) {
        lua_json_push_null(L);
        return 0;
    }
    switch (v->type) {
        case JSON_NULL:
            lua_json_push_null(L);
            return 0;
        case JSON_TRUE:
            lua_pushboolean(L, 1);
            return 0;
        case JSON_FALSE:
            lua_pushboolean(L, 0);
            return 0;
        case JSON_STRING:
            lua_pushlstring(L, v->str ? v->str : "", v->str ? v->len : 0);
            return 0;
        case JSON_NUMBER: {
            bool canonical;
            push_number(L, v, &canonical); /* a bare number: nowhere to record its text */
            return 0;
        }
        case JSON_ARRAY:
        case JSON_OBJECT:
            if (depth >= LUA_JSON_MAX_DEPTH) return -1;
            return v->type == JSON_ARRAY ? push_array(L, v, depth) : push_object(L, v, depth);
    }
    return -1;
}

int lua_json_push(lua_State *L, const json_value *v) {
    int top = lua_gettop(L);
    if (push_value(L, v, 0) != 0) {
        lua_settop(L, top);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Lua -> tree                                                              */

typedef struct {
    lua_State *L;
    int k_type, k_order, k_num;               /* stack slots holding "__jsontype", ... */
    const void *seen[LUA_JSON_MAX_DEPTH + 1]; /* the tables being encoded, by depth */
    char path[PATH_MAX_LEN + 16];
    size_t plen;
    char *err;
    size_t errlen;
} enc;

static json_value *enc_fail(enc *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static json_value *enc_fail(enc *e, const char *fmt, ...) {
    if (!e->err || !e->errlen) return NULL;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(e->err, e->errlen, "%s: %s", e->path, msg);
    return NULL;
}

/* Path segments; path_mark/path_reset put it back. */
static void path_index(enc *e, lua_Integer i) {
    if (e->plen < PATH_MAX_LEN) {
        int k = snprintf(e->path + e->plen, sizeof e->path - e->plen, "[%lld]", (long long)i);
        if (k > 0) e->plen += (size_t)k < sizeof e->path - e->plen ? (size_t)k : sizeof e->path - e->plen - 1;
    }
}

static void path_key(enc *e, const char *k, size_t n) {
    if (e->plen >= PATH_MAX_LEN) return;
    bool ident = n > 0 && n < 64 && !(k[0] >= '0' && k[0] <= '9');
    for (size_t i = 0; i < n && ident; i++)
        ident =
            (k[i] >= 'a' && k[i] <= 'z') || (k[i] >= 'A' && k[i] <= 'Z') || (k[i] >= '0' && k[i] <= '9') || k[i] == '_';
    int w;
    size_t room = sizeof e->path - e->plen;
    if (ident) {
        w = snprintf(e->path + e->plen, room, ".%.*s", (int)n, k);
    } else {
        char shown[64];
        size_t m = 0;
        for (size_t i = 0; i < n && m < sizeof shown - 4; i++) {
            unsigned char c = (unsigned char)k[i];
            shown[m++] = (c < 0x20 || c == '"' || c == '\\' || c == 0x7f) ? '?' : (char)c;
        }
        if (m < n) {
            memcpy(shown + m, "...", 3);
            m += 3;
        }
        w = snprintf(e->path + e->plen, room, "[\"%.*s\"]", (int)m, shown);
    }
    if (w > 0) e->plen += (size_t)w < room ? (size_t)w : room - 1;
}

static void path_reset(enc *e, size_t mark) {
    e->plen = mark;
    e->path[mark] = '\0';
}

static json_value *enc_value(enc *e, int idx, int depth, const char *numtext);

/* The recorded source text for the number in a container slot: key at -1
 * on the stack is consumed. NULL when there is none. The text stays alive:
 * the nums table holds it. */
static const char *recorded_text(enc *e, int nums_idx) {
    lua_State *L = e->L;
    if (!lua_istable(L, nums_idx)) {
        lua_pop(L, 1);
        return NULL;
    }
    lua_rawget(L, nums_idx);
    const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    lua_pop(L, 1);
    return s;
}

/* "key 3 (a number)", "a key of type boolean" for the key at idx. */
static void key_describe(lua_State *L, int idx, char *buf, size_t len) {
    if (lua_isinteger(L, idx))
        snprintf(buf, len, "key %lld (a number)", (long long)lua_tointeger(L, idx));
    else if (lua_type(L, idx) == LUA_TNUMBER)
        snprintf(buf, len, "key %.14g (a number)", (double)lua_tonumber(L, idx));
    else if (lua_type(L, idx) == LUA_TSTRING)
        snprintf(buf, len, "key \"%.40s\" (a string)", lua_tostring(L, idx));
    else
        snprintf(buf, len, "a key of type %s", luaL_typename(L, idx));
}

typedef struct {
    const char *s;
    size_t len;
    size_t rank; /* position in __jsonorder, SIZE_MAX when not listed */
    json_value *v;
} entry;

static int bytes_cmp(const char *a, size_t al, const char *b, size_t bl) {
    int c = memcmp(a, b, al < bl ? al : bl);
    return c ? c : (al > bl) - (al < bl);
}

static int entry_by_text(const void *pa, const void *pb) {
    const entry *a = pa, *b = pb;
    int c = bytes_cmp(a->s, a->len, b->s, b->len);
    return c ? c : (a->rank > b->rank) - (a->rank < b->rank);
}

static int entry_by_rank(const void *pa, const void *pb) {
    const entry *a = pa, *b = pb;
    if (a->rank != b->rank) return a->rank < b->rank ? -1 : 1;
    return bytes_cmp(a->s, a->len, b->s, b->len);
}

static void free_entries(entry *es, size_t n) {
    for (size_t i = 0; i < n; i++) json_free(es[i].v);
    free(es);
}

/* Ranks each entry by the first position of its key in the order table at
 * order_idx (not a table: all unlisted). 0, or -1 out of memory. */
static int rank_entries(enc *e, int order_idx, entry *es, size_t n) {
    lua_State *L = e->L;
    for (size_t i = 0; i < n; i++) es[i].rank = SIZE_MAX;
    if (!lua_istable(L, order_idx) || n == 0) return 0;
    size_t m = (size_t)lua_rawlen(L, order_idx);
    if (m == 0) return 0;
    entry *ord = malloc(m * sizeof(*ord));
    if (!ord) return -1;
    size_t k = 0;
    for (size_t i = 0; i < m; i++) {
        lua_rawgeti(L, order_idx, (lua_Integer)i + 1);
        if (lua_type(L, -1) == LUA_TSTRING) {
            ord[k].s = lua_tolstring(L, -1, &ord[k].len); /* anchored by the order table */
            ord[k].rank = i;
            ord[k].v = NULL;
            k++;
        }
        lua_pop(L, 1);
    }
    qsort(ord, k, sizeof(*ord), entry_by_text); /* by key, then first position */
    for (size_t i = 0; i < n; i++) {
        size_t lo = 0, hi = k;
        while (lo < hi) { /* first element >= key */
            size_t mid = lo + (hi - lo) / 2;
            if (bytes_cmp(ord[mid].s, ord[mid].len, es[i].s, es[i].len) < 0)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo < k && bytes_cmp(ord[lo].s, ord[lo].len, es[i].s, es[i].len) == 0) es[i].rank = ord[lo].rank;
    }
    free(ord);
    return 0;
}

static json_value *enc_array(enc *e, int idx, int depth, size_t n, int nums_idx) {
    lua_State *L = e->L;
    json_value *arr = json_new_array();
    if (!arr || (n && !(arr->items = malloc(n * sizeof(*arr->items))))) {
        json_free(arr);
        return enc_fail(e, "out of memory");
    }
    arr->cap = n;
    size_t mark = e->plen;
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        lua_pushinteger(L, (lua_Integer)i + 1);
        const char *numtext = recorded_text(e, nums_idx);
        path_index(e, (lua_Integer)i + 1);
        json_value *item = enc_value(e, lua_gettop(L), depth + 1, numtext);
        path_reset(e, mark);
        lua_pop(L, 1);
        if (!item) {
            json_free(arr);
            return NULL;
        }
        arr->items[arr->count++] = item;
    }
    return arr;
}

static json_value *enc_object(enc *e, int idx, int depth, size_t n, int nums_idx, int order_idx) {
    lua_State *L = e->L;
    entry *es = n ? calloc(n, sizeof(*es)) : NULL;
    if (n && !es) return enc_fail(e, "out of memory");
    size_t k = 0, mark = e->plen;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        int vidx = lua_gettop(L), kidx = vidx - 1;
        if (lua_type(L, kidx) != LUA_TSTRING || k >= n) { /* k >= n: cannot happen, counted before */
            char what[80];
            key_describe(L, kidx, what, sizeof what);
            free_entries(es, k);
            return enc_fail(e,
                            "%s in an object (object keys must be strings; a table is an array only when its "
                            "keys are exactly 1..n)",
                            what);
        }
        es[k].s = lua_tolstring(L, kidx, &es[k].len); /* anchored by the table */
        lua_pushvalue(L, kidx);
        const char *numtext = recorded_text(e, nums_idx);
        path_key(e, es[k].s, es[k].len);
        es[k].v = enc_value(e, vidx, depth + 1, numtext);
        path_reset(e, mark);
        if (!es[k].v) {
            free_entries(es, k);
            return NULL;
        }
        k++;
        lua_pop(L, 1); /* the value; the key stays for lua_next */
    }
    if (rank_entries(e, order_idx, es, k) != 0) {
        free_entries(es, k);
        return enc_fail(e, "out of memory");
    }
    if (k > 1) qsort(es, k, sizeof(*es), entry_by_rank);
    json_value *obj = json_new_object();
    if (!obj) goto oom;
    if (k) {
        obj->items = malloc(k * sizeof(*obj->items));
        obj->keys = malloc(k * sizeof(*obj->keys));
        obj->key_lens = malloc(k * sizeof(*obj->key_lens));
        if (!obj->items || !obj->keys || !obj->key_lens) goto oom;
        obj->cap = k;
    }
    /* Keys of a Lua table are distinct: fill the object directly rather
     * than through json_object_set's per-key search. */
    for (size_t i = 0; i < k; i++) {
        char *key = malloc(es[i].len + 1);
        if (!key) goto oom;
        memcpy(key, es[i].s, es[i].len);
        key[es[i].len] = '\0';
        obj->keys[i] = key;
        obj->key_lens[i] = es[i].len;
        obj->items[i] = es[i].v;
        es[i].v = NULL;
        obj->count = i + 1;
    }
    free(es);
    return obj;
oom:
    json_free(obj);
    free_entries(es, k);
    return enc_fail(e, "out of memory");
}

static json_value *enc_table(enc *e, int idx, int depth) {
    lua_State *L = e->L;
    if (depth >= LUA_JSON_MAX_DEPTH) return enc_fail(e, "nesting deeper than %d", LUA_JSON_MAX_DEPTH);
    const void *p = lua_topointer(L, idx);
    for (int d = 0; d < depth; d++)
        if (e->seen[d] == p) return enc_fail(e, "a table that contains itself (a cycle)");
    e->seen[depth] = p;
    if (!lua_checkstack(L, 12)) return enc_fail(e, "Lua stack exhausted");
    int top = lua_gettop(L);

    /* top+1: metatable or nil; top+2: __jsonnum; top+3: __jsonorder. */
    enum { PLAIN, ARRAY, OBJECT } kind = PLAIN;
    if (!lua_getmetatable(L, idx)) lua_pushnil(L);
    int mt = top + 1;
    if (lua_istable(L, mt)) {
        lua_pushvalue(L, e->k_type);
        if (lua_rawget(L, mt) == LUA_TSTRING) {
            const char *t = lua_tostring(L, -1);
            kind = strcmp(t, "array") == 0 ? ARRAY : strcmp(t, "object") == 0 ? OBJECT : PLAIN;
        }
        lua_pop(L, 1);
        lua_pushvalue(L, e->k_num);
        lua_rawget(L, mt);
        lua_pushvalue(L, e->k_order);
        lua_rawget(L, mt);
    } else {
        lua_pushnil(L);
        lua_pushnil(L);
    }

    /* Count the keys and see whether they are exactly 1..n; describe the
     * first key that is not, for the error an array gets. */
    size_t n = 0;
    bool seq = true;
    char bad[80] = "";
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        n++;
        if (!lua_isinteger(L, -2) || lua_tointeger(L, -2) < 1) {
            if (seq) key_describe(L, -2, bad, sizeof bad);
            seq = false;
        }
        lua_pop(L, 1);
    }
    if (seq) { /* all keys positive integers: a sequence when none exceeds n */
        lua_pushnil(L);
        while (lua_next(L, idx) != 0) {
            lua_pop(L, 1);
            if ((lua_Unsigned)lua_tointeger(L, -1) > (lua_Unsigned)n) {
                seq = false;
                key_describe(L, -1, bad, sizeof bad);
                lua_pop(L, 1);
                break;
            }
        }
    }

    json_value *out;
    if (kind == ARRAY) {
        if (!seq) {
            lua_settop(L, top);
            return enc_fail(e, "an array must hold exactly the keys 1..n; this one has %s among %zu entries", bad, n);
        }
        out = enc_array(e, idx, depth, n, top + 2);
    } else if (kind == PLAIN && seq && n > 0) {
        out = enc_array(e, idx, depth, n, top + 2);
    } else {
        out = enc_object(e, idx, depth, n, top + 2, top + 3);
    }
    lua_settop(L, top);
    return out;
}

static json_value *enc_value(enc *e, int idx, int depth, const char *numtext) {
    lua_State *L = e->L;
    json_value *v = NULL;
    switch (lua_type(L, idx)) {
        case LUA_TNIL:
            return enc_fail(e, "nil cannot be encoded (json.null is JSON null)");
        case LUA_TBOOLEAN:
            v = json_new_bool(lua_toboolean(L, idx));
            break;
        case LUA_TSTRING: {
            size_t n;
            const char *s = lua_tolstring(L, idx, &n);
            v = json_new_stringn(s, n);
            break;
        }
        case LUA_TNUMBER: {
            if (numtext && lua_checkstack(L, 1) && lua_stringtonumber(L, numtext) != 0) {
                /* the value still is what its source text says: keep the text */
                bool same = lua_rawequal(L, -1, idx) && lua_isinteger(L, -1) == lua_isinteger(L, idx);
                lua_pop(L, 1);
                if (same && (v = json_new_number_text(numtext)) != NULL) break;
            }
            char buf[64];
            if (!number_text(L, idx, buf, sizeof buf)) return enc_fail(e, "NaN or infinity cannot be encoded");
            v = json_new_number_text(buf);
            break;
        }
        case LUA_TLIGHTUSERDATA:
            if (lua_touserdata(L, idx) != NULL)
                return enc_fail(e, "a light userdata other than json.null cannot be encoded");
            v = json_new_null();
            break;
        case LUA_TTABLE:
            return enc_table(e, idx, depth);
        default:
            return enc_fail(e, "a %s cannot be encoded", luaL_typename(L, idx));
    }
    return v ? v : enc_fail(e, "out of memory");
}

json_value *lua_json_to_tree_named(lua_State *L, int idx, const char *root, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    enc e;
    memset(&e, 0, sizeof e);
    e.L = L;
    e.err = err;
    e.errlen = errlen;
    snprintf(e.path, sizeof e.path, "%s", root ? root : "$");
    e.plen = strlen(e.path);
    idx = lua_absindex(L, idx);
    int top = lua_gettop(L);
    if (!lua_checkstack(L, 4)) return enc_fail(&e, "Lua stack exhausted");
    lua_pushliteral(L, "__jsontype");
    lua_pushliteral(L, "__jsonorder");
    lua_pushliteral(L, "__jsonnum");
    e.k_type = top + 1;
    e.k_order = top + 2;
    e.k_num = top + 3;
    json_value *v = enc_value(&e, idx, 0, NULL);
    lua_settop(L, top);
    return v;
}

json_value *lua_json_to_tree(lua_State *L, int idx, char *err, size_t errlen) {
    return lua_json_to_tree_named(L, idx, "$", err, errlen);
}

/* ------------------------------------------------------------------------ */
/* The module                                                               */

static int l_decode(lua_State *L) {
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    box *b = new_box(L);
    char err[256];
    b->tree = json_parse(text, len, LUA_JSON_MAX_DEPTH, err, sizeof err);
    if (!b->tree) return luaL_error(L, "json.decode: %s", err[0] ? err : "out of memory");
    if (lua_json_push(L, b->tree) != 0) return luaL_error(L, "json.decode: nesting deeper than %d", LUA_JSON_MAX_DEPTH);
    json_free(b->tree);
    b->tree = NULL;
    return 1;
}

static int l_encode(lua_State *L) {
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    box *b = new_box(L);
    char err[512];
    b->tree = lua_json_to_tree(L, 1, err, sizeof err);
    if (!b->tree) return luaL_error(L, "json.encode: %s", err);
    size_t len;
    b->text = json_serialize(b->tree, &len);
    json_free(b->tree);
    b->tree = NULL;
    if (!b->text) return luaL_error(L, "json.encode: out of memory");
    lua_pushlstring(L, b->text, len);
    free(b->text);
    b->text = NULL;
    return 1;
}

/* json.object([t [, keys]]) */
static int l_object(lua_State *L) {
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 2);
        lua_newtable(L);
        lua_replace(L, 1);
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "object");
    lua_setfield(L, -2, "__jsontype");
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_Integer n = (lua_Integer)lua_rawlen(L, 2);
        lua_createtable(L, n > INT32_MAX ? 0 : (int)n, 0);
        for (lua_Integer i = 1; i <= n; i++) {
            if (lua_rawgeti(L, 2, i) != LUA_TSTRING)
                return luaL_error(L, "json.object: keys[%d] is a %s, expected a string", (int)i, luaL_typename(L, -1));
            lua_rawseti(L, -2, i);
        }
    } else {
        lua_newtable(L);
    }
    lua_setfield(L, -2, "__jsonorder");
    lua_setmetatable(L, 1);
    lua_settop(L, 1);
    return 1;
}

/* json.array([t]) */
static int l_array(lua_State *L) {
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    push_array_mt(L);
    lua_setmetatable(L, 1);
    return 1;
}

int luaopen_regfacade_json(lua_State *L) {
    static const luaL_Reg fns[] = {
        {"decode", l_decode}, {"encode", l_encode}, {"object", l_object}, {"array", l_array}, {NULL, NULL},
    };
    luaL_newlib(L, fns);
    lua_json_push_null(L);
    lua_setfield(L, -2, "null");
    push_array_mt(L);
    lua_pop(L, 1);
    return 1;
}
