/*
 * lua_pattern: Lua's pattern matching with a step budget (see
 * include/regfacade/lua_pattern.h). A backtracking matcher over the
 * subject and the pattern; every call of match(), every character a
 * greedy repetition scans and every character %b walks is one step.
 * Raising out of it (a budget trip, a malformed pattern) is safe at any
 * point: it holds nothing but stack memory.
 */
#include "regfacade/lua_pattern.h"

#include <ctype.h>
#include <limits.h>
#include <lauxlib.h>
#include <stddef.h>
#include <string.h>

#include "regfacade/lua_sandbox.h"

#define MAX_CAPTURES 32
#define MAX_DEPTH 200 /* nested match() calls: the C stack a pattern may use */
#define CAP_UNFINISHED (-1)
#define CAP_POSITION (-2)
#define ESC '%'
#define SPECIALS "^$*+?.([%-"

#define uc(c) ((unsigned char)(c))

typedef struct {
    const char *src_init, *src_end, *p_end;
    lua_State *L;
    int depth_left;
    int level;      /* captures open or closed so far */
    unsigned steps; /* not yet handed to the sandbox */
    struct {
        const char *init;
        ptrdiff_t len;
    } capture[MAX_CAPTURES];
} mstate;

static void steps(mstate *ms, size_t n) {
    size_t total = ms->steps + n;
    if (total < LUA_PATTERN_CHECK_EVERY) {
        ms->steps = (unsigned)total;
        return;
    }
    ms->steps = 0;
    lua_sandbox_steps(ms->L, total > UINT_MAX ? UINT_MAX : (unsigned)total); /* may raise: over budget */
}

static const char *match(mstate *ms, const char *s, const char *p);

static int capture_index(mstate *ms, int c) {
    int l = c - '1';
    if (l < 0 || l >= ms->level || ms->capture[l].len == CAP_UNFINISHED)
        return luaL_error(ms->L, "invalid capture index %%%d", l + 1);
    return l;
}

static int open_capture(mstate *ms) {
    for (int l = ms->level - 1; l >= 0; l--)
        if (ms->capture[l].len == CAP_UNFINISHED) return l;
    return luaL_error(ms->L, "invalid pattern capture");
}

/* The end of the single-character class starting at p. */
static const char *class_end(mstate *ms, const char *p) {
    char c = *p++;
    if (c == ESC) {
        if (p == ms->p_end) luaL_error(ms->L, "malformed pattern (ends with '%%')");
        return p + 1;
    }
    if (c == '[') {
        if (*p == '^') p++;
        /* The first character of a set is part of it, even a ']'. */
        do {
            if (p == ms->p_end) luaL_error(ms->L, "malformed pattern (missing ']')");
            if (*p++ == ESC && p < ms->p_end) p++;
        } while (*p != ']');
        return p + 1;
    }
    return p;
}

static int class_matches(int c, int cl) {
    int r;
    switch (tolower(cl)) {
        case 'a':
            r = isalpha(c);
            break;
        case 'c':
            r = iscntrl(c);
            break;
        case 'd':
            r = isdigit(c);
            break;
        case 'g':
            r = isgraph(c);
            break;
        case 'l':
            r = islower(c);
            break;
        case 'p':
            r = ispunct(c);
            break;
        case 's':
            r = isspace(c);
            break;
        case 'u':
            r = isupper(c);
            break;
        case 'w':
            r = isalnum(c);
            break;
        case 'x':
            r = isxdigit(c);
            break;
        default:
            return cl == c;
    }
    return isupper(cl) ? !r : r != 0;
}

/* c against the set [...] from p ('[') to last (its ']'). */
static int set_matches(int c, const char *p, const char *last) {
    int yes = 1;
    if (p[1] == '^') {
        yes = 0;
        p++;
    }
    while (++p < last) {
        if (*p == ESC) {
            p++;
            if (class_matches(c, uc(*p))) return yes;
        } else if (p[1] == '-' && p + 2 < last) {
            p += 2;
            if (uc(p[-2]) <= c && c <= uc(*p)) return yes;
        } else if (uc(*p) == c) {
            return yes;
        }
    }
    return !yes;
}

static int single_matches(mstate *ms, const char *s, const char *p, const char *ep) {
    if (s >= ms->src_end) return 0;
    int c = uc(*s);
    switch (*p) {
        case '.':
            return 1;
        case ESC:
            return class_matches(c, uc(p[1]));
        case '[':
            return set_matches(c, p, ep - 1);
        default:
            return uc(*p) == c;
    }
}

static const char *balance(mstate *ms, const char *s, const char *p) {
    if (p >= ms->p_end - 1) luaL_error(ms->L, "malformed pattern (missing arguments to '%%b')");
    if (s >= ms->src_end || *s != *p) return NULL;
    char open = p[0], close = p[1];
    int depth = 1;
    const char *start = s;
    while (++s < ms->src_end) {
        if (*s == close) {
            if (--depth == 0) {
                steps(ms, (size_t)(s - start));
                return s + 1;
            }
        } else if (*s == open) {
            depth++;
        }
    }
    steps(ms, (size_t)(s - start));
    return NULL;
}

/* Greedy: as many as match, then back off one at a time. */
static const char *greedy(mstate *ms, const char *s, const char *p, const char *ep) {
    ptrdiff_t n = 0;
    while (single_matches(ms, s + n, p, ep)) n++;
    steps(ms, (size_t)n);
    for (; n >= 0; n--) {
        const char *r = match(ms, s + n, ep + 1);
        if (r) return r;
    }
    return NULL;
}

/* Lazy: as few as will do. */
static const char *lazy(mstate *ms, const char *s, const char *p, const char *ep) {
    for (;;) {
        const char *r = match(ms, s, ep + 1);
        if (r) return r;
        if (!single_matches(ms, s, p, ep)) return NULL;
        s++;
    }
}

static const char *capture_start(mstate *ms, const char *s, const char *p, ptrdiff_t what) {
    if (ms->level >= MAX_CAPTURES) luaL_error(ms->L, "too many captures");
    ms->capture[ms->level].init = s;
    ms->capture[ms->level].len = what;
    ms->level++;
    const char *r = match(ms, s, p);
    if (!r) ms->level--;
    return r;
}

static const char *capture_end(mstate *ms, const char *s, const char *p) {
    int l = open_capture(ms);
    ms->capture[l].len = s - ms->capture[l].init;
    const char *r = match(ms, s, p);
    if (!r) ms->capture[l].len = CAP_UNFINISHED;
    return r;
}

static const char *backref(mstate *ms, const char *s, int c) {
    int l = capture_index(ms, c);
    ptrdiff_t len = ms->capture[l].len;
    if (len >= 0 && ms->src_end - s >= len && memcmp(ms->capture[l].init, s, (size_t)len) == 0) return s + len;
    return NULL;
}

static const char *match(mstate *ms, const char *s, const char *p) {
    if (ms->depth_left-- == 0) luaL_error(ms->L, "pattern too complex");
    steps(ms, 1);
    while (s && p != ms->p_end) {
        if (*p == '(') {
            s = p[1] == ')' ? capture_start(ms, s, p + 2, CAP_POSITION) : capture_start(ms, s, p + 1, CAP_UNFINISHED);
            break;
        }
        if (*p == ')') {
            s = capture_end(ms, s, p + 1);
            break;
        }
        if (*p == '$' && p + 1 == ms->p_end) {
            if (s != ms->src_end) s = NULL;
            break;
        }
        if (*p == ESC && p[1] == 'b') {
            s = balance(ms, s, p + 2);
            p += 4;
            continue;
        }
        if (*p == ESC && p[1] == 'f') {
            p += 2;
            if (*p != '[') luaL_error(ms->L, "missing '[' after '%%f' in pattern");
            const char *ep = class_end(ms, p);
            int before = s == ms->src_init ? '\0' : uc(s[-1]);
            int at = s < ms->src_end ? uc(*s) : '\0';
            if (!set_matches(before, p, ep - 1) && set_matches(at, p, ep - 1)) {
                p = ep;
                continue;
            }
            s = NULL;
            break;
        }
        if (*p == ESC && isdigit(uc(p[1]))) {
            s = backref(ms, s, uc(p[1]));
            p += 2;
            continue;
        }
        /* A single-character class, maybe with a quantifier. */
        const char *ep = class_end(ms, p);
        if (!single_matches(ms, s, p, ep)) {
            if (*ep == '*' || *ep == '?' || *ep == '-') { /* zero of them is fine */
                p = ep + 1;
                continue;
            }
            s = NULL;
            break;
        }
        if (*ep == '?') {
            const char *r = match(ms, s + 1, ep + 1);
            if (r) {
                s = r;
                break;
            }
            p = ep + 1;
            continue;
        }
        if (*ep == '+') {
            s = greedy(ms, s + 1, p, ep);
            break;
        }
        if (*ep == '*') {
            s = greedy(ms, s, p, ep);
            break;
        }
        if (*ep == '-') {
            s = lazy(ms, s, p, ep);
            break;
        }
        s++;
        p = ep;
    }
    ms->depth_left++;
    return s;
}

/* Capture i: its length (CAP_POSITION: its position was pushed) and start. */
static ptrdiff_t capture_get(mstate *ms, int i, const char *s, const char *e, const char **cap) {
    if (i >= ms->level) {
        if (i != 0) luaL_error(ms->L, "invalid capture index %%%d", i + 1);
        *cap = s; /* no captures: the whole match */
        return e - s;
    }
    ptrdiff_t len = ms->capture[i].len;
    *cap = ms->capture[i].init;
    if (len == CAP_UNFINISHED) luaL_error(ms->L, "unfinished capture");
    if (len == CAP_POSITION) lua_pushinteger(ms->L, (ms->capture[i].init - ms->src_init) + 1);
    return len;
}

static void capture_push(mstate *ms, int i, const char *s, const char *e) {
    const char *cap;
    ptrdiff_t len = capture_get(ms, i, s, e, &cap);
    if (len != CAP_POSITION) lua_pushlstring(ms->L, cap, (size_t)len);
}

static int captures_push(mstate *ms, const char *s, const char *e) {
    int n = ms->level == 0 && s ? 1 : ms->level;
    luaL_checkstack(ms->L, n, "too many captures");
    for (int i = 0; i < n; i++) capture_push(ms, i, s, e);
    return n;
}

static void state_init(mstate *ms, lua_State *L, const char *s, size_t ls, const char *p, size_t lp) {
    ms->L = L;
    ms->src_init = s;
    ms->src_end = s + ls;
    ms->p_end = p + lp;
    ms->steps = 0;
    ms->level = 0;
    ms->depth_left = MAX_DEPTH;
}

static void state_restart(mstate *ms) {
    ms->level = 0;
    ms->depth_left = MAX_DEPTH;
}

/* Hand the steps not yet counted to the sandbox (they are few). */
static void state_flush(mstate *ms) {
    if (ms->steps) lua_sandbox_steps(ms->L, ms->steps);
    ms->steps = 0;
}

/* A 1-based start position (negative: from the end) as an offset. */
static size_t start_offset(lua_Integer pos, size_t len) {
    if (pos > 0) return (size_t)pos - 1;
    if (pos == 0 || pos < -(lua_Integer)len) return 0;
    return len + (size_t)pos;
}

static int has_specials(const char *p, size_t lp) {
    for (size_t i = 0; i < lp; i++)
        if (p[i] && strchr(SPECIALS, p[i])) return 1;
    return 0;
}

static int find_or_match(lua_State *L, int find) {
    size_t ls, lp;
    const char *s = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    size_t init = start_offset(luaL_optinteger(L, 3, 1), ls);
    if (init > ls) {
        luaL_pushfail(L);
        return 1;
    }
    if (find && (lua_toboolean(L, 4) || !has_specials(p, lp))) {
        const char *at = lp == 0 ? s + init : memmem(s + init, ls - init, p, lp);
        if (at) {
            lua_pushinteger(L, (at - s) + 1);
            lua_pushinteger(L, (lua_Integer)((at - s) + (ptrdiff_t)lp));
            return 2;
        }
        luaL_pushfail(L);
        return 1;
    }
    mstate ms;
    const char *from = s + init;
    int anchor = *p == '^';
    if (anchor) {
        p++;
        lp--;
    }
    state_init(&ms, L, s, ls, p, lp);
    do {
        state_restart(&ms);
        const char *e = match(&ms, from, p);
        if (e) {
            state_flush(&ms);
            if (!find) return captures_push(&ms, from, e);
            lua_pushinteger(L, (from - s) + 1);
            lua_pushinteger(L, e - s);
            return captures_push(&ms, NULL, NULL) + 2;
        }
    } while (from++ < ms.src_end && !anchor);
    state_flush(&ms);
    luaL_pushfail(L);
    return 1;
}

static int l_find(lua_State *L) { return find_or_match(L, 1); }

static int l_match(lua_State *L) { return find_or_match(L, 0); }

typedef struct {
    const char *src, *p, *last;
    mstate ms;
} gmatch_state;

static int gmatch_next(lua_State *L) {
    gmatch_state *g = lua_touserdata(L, lua_upvalueindex(3));
    g->ms.L = L; /* the loop may run in another coroutine than gmatch did */
    for (const char *src = g->src; src <= g->ms.src_end; src++) {
        state_restart(&g->ms);
        const char *e = match(&g->ms, src, g->p);
        if (e && e != g->last) {
            g->src = g->last = e;
            state_flush(&g->ms);
            return captures_push(&g->ms, src, e);
        }
    }
    state_flush(&g->ms);
    return 0;
}

static int l_gmatch(lua_State *L) {
    size_t ls, lp;
    const char *s = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    size_t init = start_offset(luaL_optinteger(L, 3, 1), ls);
    lua_settop(L, 2); /* the subject and the pattern stay alive as upvalues */
    gmatch_state *g = lua_newuserdatauv(L, sizeof *g, 0);
    if (init > ls) init = ls + 1; /* past the end: no match */
    state_init(&g->ms, L, s, ls, p, lp);
    g->src = s + init;
    g->p = p;
    g->last = NULL;
    lua_pushcclosure(L, gmatch_next, 3);
    return 1;
}

/* The replacement string (argument 3) for the match s..e, %0-%9 and %%. */
static void replace_string(mstate *ms, luaL_Buffer *b, const char *s, const char *e) {
    lua_State *L = ms->L;
    size_t len;
    const char *r = lua_tolstring(L, 3, &len);
    const char *end = r + len, *esc;
    while ((esc = memchr(r, ESC, (size_t)(end - r))) != NULL) {
        luaL_addlstring(b, r, (size_t)(esc - r));
        char c = esc + 1 < end ? esc[1] : '\0';
        if (c == ESC) {
            luaL_addchar(b, ESC);
        } else if (c == '0') {
            luaL_addlstring(b, s, (size_t)(e - s));
        } else if (isdigit(uc(c))) {
            const char *cap;
            ptrdiff_t n = capture_get(ms, c - '1', s, e, &cap);
            if (n == CAP_POSITION)
                luaL_addvalue(b); /* the position capture_get pushed */
            else
                luaL_addlstring(b, cap, (size_t)n);
        } else {
            luaL_error(L, "invalid use of '%c' in replacement string", ESC);
        }
        r = esc + 2;
    }
    luaL_addlstring(b, r, (size_t)(end - r));
}

/* Add the replacement of s..e; 1 when it changed something. */
static int replace(mstate *ms, luaL_Buffer *b, const char *s, const char *e, int kind) {
    lua_State *L = ms->L;
    if (kind == LUA_TFUNCTION) {
        lua_pushvalue(L, 3);
        int n = captures_push(ms, s, e);
        state_flush(ms); /* the function runs under the count hook */
        lua_call(L, n, 1);
    } else if (kind == LUA_TTABLE) {
        capture_push(ms, 0, s, e);
        lua_gettable(L, 3);
    } else {
        replace_string(ms, b, s, e);
        return 1;
    }
    if (!lua_toboolean(L, -1)) { /* nil or false: keep the match */
        lua_pop(L, 1);
        luaL_addlstring(b, s, (size_t)(e - s));
        return 0;
    }
    if (!lua_isstring(L, -1)) return luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
    luaL_addvalue(b);
    return 1;
}

static int l_gsub(lua_State *L) {
    lua_sandbox_check_cstack(L); /* a replacement function may call gsub again, and again */
    size_t ls, lp;
    const char *src = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    const char *last = NULL;
    int kind = lua_type(L, 3);
    lua_Integer max = luaL_optinteger(L, 4, (lua_Integer)ls + 1);
    luaL_argexpected(L, kind == LUA_TNUMBER || kind == LUA_TSTRING || kind == LUA_TFUNCTION || kind == LUA_TTABLE, 3,
                     "string/function/table");
    int anchor = *p == '^';
    if (anchor) {
        p++;
        lp--;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    mstate ms;
    state_init(&ms, L, src, ls, p, lp);
    lua_Integer n = 0;
    int changed = 0;
    while (n < max) {
        state_restart(&ms);
        const char *e = match(&ms, src, p);
        if (e && e != last) {
            n++;
            changed |= replace(&ms, &b, src, e, kind);
            src = last = e;
        } else if (src < ms.src_end) {
            luaL_addchar(&b, *src++);
        } else {
            break;
        }
        if (anchor) break;
    }
    state_flush(&ms);
    if (!changed) {
        lua_pushvalue(L, 1);
    } else {
        luaL_addlstring(&b, src, (size_t)(ms.src_end - src));
        luaL_pushresult(&b);
    }
    lua_pushinteger(L, n);
    return 2;
}

void lua_pattern_install(lua_State *L, int idx) {
    static const luaL_Reg fns[] = {
        {"find", l_find}, {"match", l_match}, {"gmatch", l_gmatch}, {"gsub", l_gsub}, {NULL, NULL}};
    lua_pushvalue(L, idx);
    luaL_setfuncs(L, fns, 0);
    lua_pop(L, 1);
}
