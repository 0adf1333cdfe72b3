/*
 * json: an order-preserving JSON document model (see include/regfacade/json.h).
 *
 * Parsing is a recursive descent bounded by max_depth (and by JSON_HARD_DEPTH,
 * so a caller passing a huge limit cannot blow the stack). Every buffer grows
 * geometrically, and each string is scanned twice at most (find the closing
 * quote, then decode into an exactly bounded buffer), so parsing is linear in
 * the input size. No global state.
 */
#include "regfacade/json.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Hard cap on nesting, whatever the caller asks for: parse, clone, serialize
 * and free recurse once per level. */
#define JSON_HARD_DEPTH 1024

/* ------------------------------------------------------------------------ */
/* Values                                                                   */

static json_value *new_value(json_type t) {
    json_value *v = calloc(1, sizeof(*v));
    if (v) v->type = t;
    return v;
}

void json_free(json_value *v) {
    if (!v) return;
    free(v->str);
    for (size_t i = 0; i < v->count; i++) {
        json_free(v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->key_lens);
    free(v);
}

/* Make room for one more item (geometric growth). */
static int reserve_one(json_value *c) {
    if (c->count < c->cap) return 0;
    size_t ncap = c->cap ? c->cap * 2 : 4;
    if (ncap < c->cap || ncap > SIZE_MAX / sizeof(void *)) return -1;
    json_value **items = realloc(c->items, ncap * sizeof(*items));
    if (!items) return -1;
    c->items = items;
    if (c->type == JSON_OBJECT) {
        char **keys = realloc(c->keys, ncap * sizeof(*keys));
        if (!keys) return -1;
        c->keys = keys;
        size_t *kl = realloc(c->key_lens, ncap * sizeof(*kl));
        if (!kl) return -1;
        c->key_lens = kl;
    }
    c->cap = ncap;
    return 0;
}

static char *memdup0(const char *s, size_t len) {
    if (len == SIZE_MAX) return NULL;
    char *p = malloc(len + 1);
    if (!p) return NULL;
    if (len) memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

/* ------------------------------------------------------------------------ */
/* Number grammar                                                           */

/* Length of the valid JSON number at s[0..len), or 0 if there is none.
 * On 0, *bad is the offset of the offending byte. Consumes the longest valid
 * number; the caller decides whether what follows is acceptable. */
static size_t scan_number(const char *s, size_t len, size_t *bad) {
    size_t i = 0;
    if (i < len && s[i] == '-') i++;
    if (i >= len) {
        *bad = i;
        return 0;
    }
    if (s[i] == '0') {
        i++;
        if (i < len && s[i] >= '0' && s[i] <= '9') {
            *bad = i; /* leading zero */
            return 0;
        }
    } else if (s[i] >= '1' && s[i] <= '9') {
        while (i < len && s[i] >= '0' && s[i] <= '9') i++;
    } else {
        *bad = i;
        return 0;
    }
    if (i < len && s[i] == '.') {
        i++;
        if (i >= len || s[i] < '0' || s[i] > '9') {
            *bad = i;
            return 0;
        }
        while (i < len && s[i] >= '0' && s[i] <= '9') i++;
    }
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < len && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= len || s[i] < '0' || s[i] > '9') {
            *bad = i;
            return 0;
        }
        while (i < len && s[i] >= '0' && s[i] <= '9') i++;
    }
    return i;
}

/* ------------------------------------------------------------------------ */
/* UTF-8                                                                    */

/* Length of the valid UTF-8 sequence starting at s[0] (s[0] >= 0x80), or 0.
 * Rejects overlongs, surrogates and code points above U+10FFFF. */
static size_t utf8_seq(const unsigned char *s, size_t avail) {
    unsigned char c = s[0];
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        return 0;
    }
    if (avail < n) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return n;
}

static size_t utf8_put(char *out, uint32_t cp) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* ------------------------------------------------------------------------ */
/* Parser                                                                   */

typedef struct {
    const unsigned char *buf;
    size_t len;
    size_t pos;
    int max_depth;
    bool unique_keys; /* json_parse_strict: a key twice in an object fails */
    bool failed;
    char what[160]; /* the first failure, and where */
    size_t at;
} parser;

static void fail(parser *p, size_t at, const char *fmt, ...) {
    if (p->failed) return;
    p->failed = true;
    p->at = at;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->what, sizeof(p->what), fmt, ap);
    va_end(ap);
}

static void skip_ws(parser *p) {
    while (p->pos < p->len) {
        unsigned char c = p->buf[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int hex4(const unsigned char *s, uint32_t *out) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (uint32_t)(c - 'A' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

/* Parse a string starting at the opening quote; returns a malloc'd decoded
 * copy and its length. */
static char *parse_string(parser *p, size_t *outlen) {
    size_t start = p->pos; /* the opening quote */
    size_t i = start + 1;
    const unsigned char *b = p->buf;

    /* Pass 1: find the closing quote and whether anything needs decoding. */
    bool plain = true;
    for (;;) {
        if (i >= p->len) {
            fail(p, start, "unterminated string");
            return NULL;
        }
        unsigned char c = b[i];
        if (c == '"') break;
        if (c == '\\') {
            plain = false;
            i += 2;
            continue;
        }
        if (c < 0x20 || c >= 0x80) plain = false;
        i++;
    }
    size_t end = i; /* closing quote */
    size_t span = end - (start + 1);

    char *out = malloc(span + 1);
    if (!out) {
        fail(p, start, "out of memory");
        return NULL;
    }
    if (plain) {
        memcpy(out, b + start + 1, span);
        out[span] = '\0';
        *outlen = span;
        p->pos = end + 1;
        return out;
    }

    /* Pass 2: validate and decode; output never exceeds the input span. */
    size_t o = 0;
    i = start + 1;
    while (i < end) {
        unsigned char c = b[i];
        if (c < 0x20) {
            fail(p, i, "control character in string");
            goto bad;
        }
        if (c < 0x80 && c != '\\') {
            /* copy a run of plain ASCII */
            size_t j = i + 1;
            while (j < end && b[j] >= 0x20 && b[j] < 0x80 && b[j] != '\\') j++;
            memcpy(out + o, b + i, j - i);
            o += j - i;
            i = j;
            continue;
        }
        if (c >= 0x80) {
            size_t n = utf8_seq(b + i, end - i);
            if (!n) {
                fail(p, i, "invalid UTF-8");
                goto bad;
            }
            memcpy(out + o, b + i, n);
            o += n;
            i += n;
            continue;
        }
        /* backslash escape; pass 1 guarantees i + 1 < end + 1 */
        if (i + 1 >= end) {
            fail(p, i, "invalid escape");
            goto bad;
        }
        unsigned char e = b[i + 1];
        switch (e) {
            case '"':
                out[o++] = '"';
                i += 2;
                continue;
            case '\\':
                out[o++] = '\\';
                i += 2;
                continue;
            case '/':
                out[o++] = '/';
                i += 2;
                continue;
            case 'b':
                out[o++] = '\b';
                i += 2;
                continue;
            case 'f':
                out[o++] = '\f';
                i += 2;
                continue;
            case 'n':
                out[o++] = '\n';
                i += 2;
                continue;
            case 'r':
                out[o++] = '\r';
                i += 2;
                continue;
            case 't':
                out[o++] = '\t';
                i += 2;
                continue;
            case 'u':
                break;
            default:
                fail(p, i, "invalid escape");
                goto bad;
        }
        uint32_t cp;
        if (end - i < 6 || hex4(b + i + 2, &cp) != 0) {
            fail(p, i, "invalid \\u escape");
            goto bad;
        }
        if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail(p, i, "lone surrogate");
            goto bad;
        }
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            uint32_t lo;
            if (end - i < 12 || b[i + 6] != '\\' || b[i + 7] != 'u' || hex4(b + i + 8, &lo) != 0 || lo < 0xDC00 ||
                lo > 0xDFFF) {
                fail(p, i, "lone surrogate");
                goto bad;
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            i += 12;
        } else {
            i += 6;
        }
        o += utf8_put(out + o, cp);
    }
    out[o] = '\0';
    *outlen = o;
    p->pos = end + 1;
    return out;
bad:
    free(out);
    return NULL;
}

static json_value *parse_value(parser *p, int depth);

static json_value *parse_array(parser *p, int depth) {
    json_value *arr = new_value(JSON_ARRAY);
    if (!arr) {
        fail(p, p->pos, "out of memory");
        return NULL;
    }
    p->pos++; /* '[' */
    skip_ws(p);
    if (p->pos < p->len && p->buf[p->pos] == ']') {
        p->pos++;
        return arr;
    }
    for (;;) {
        json_value *item = parse_value(p, depth);
        if (!item) goto bad;
        if (reserve_one(arr) != 0) {
            json_free(item);
            fail(p, p->pos, "out of memory");
            goto bad;
        }
        arr->items[arr->count++] = item;
        skip_ws(p);
        if (p->pos >= p->len) {
            fail(p, p->pos, "unexpected end of input");
            goto bad;
        }
        unsigned char c = p->buf[p->pos];
        if (c == ',') {
            p->pos++;
            continue;
        }
        if (c == ']') {
            p->pos++;
            return arr;
        }
        fail(p, p->pos, "expected ',' or ']'");
        goto bad;
    }
bad:
    json_free(arr);
    return NULL;
}

static json_value *parse_object(parser *p, int depth) {
    json_value *obj = new_value(JSON_OBJECT);
    if (!obj) {
        fail(p, p->pos, "out of memory");
        return NULL;
    }
    p->pos++; /* '{' */
    skip_ws(p);
    if (p->pos < p->len && p->buf[p->pos] == '}') {
        p->pos++;
        return obj;
    }
    for (;;) {
        skip_ws(p);
        if (p->pos >= p->len) {
            fail(p, p->pos, "unexpected end of input");
            goto bad;
        }
        if (p->buf[p->pos] != '"') {
            fail(p, p->pos, "expected string key");
            goto bad;
        }
        size_t klen, kpos = p->pos;
        char *key = parse_string(p, &klen);
        if (!key) goto bad;
        if (p->unique_keys)
            for (size_t i = 0; i < obj->count; i++)
                if (obj->key_lens[i] == klen && memcmp(obj->keys[i], key, klen) == 0) {
                    fail(p, kpos, "duplicate key \"%.100s\" (each key may occur once in an object)", key);
                    free(key);
                    goto bad;
                }
        skip_ws(p);
        if (p->pos >= p->len || p->buf[p->pos] != ':') {
            free(key);
            fail(p, p->pos, p->pos >= p->len ? "unexpected end of input" : "expected ':'");
            goto bad;
        }
        p->pos++;
        json_value *item = parse_value(p, depth);
        if (!item) {
            free(key);
            goto bad;
        }
        if (reserve_one(obj) != 0) {
            free(key);
            json_free(item);
            fail(p, p->pos, "out of memory");
            goto bad;
        }
        obj->keys[obj->count] = key;
        obj->key_lens[obj->count] = klen;
        obj->items[obj->count++] = item;
        skip_ws(p);
        if (p->pos >= p->len) {
            fail(p, p->pos, "unexpected end of input");
            goto bad;
        }
        unsigned char c = p->buf[p->pos];
        if (c == ',') {
            p->pos++;
            continue;
        }
        if (c == '}') {
            p->pos++;
            return obj;
        }
        fail(p, p->pos, "expected ',' or '}'");
        goto bad;
    }
bad:
    json_free(obj);
    return NULL;
}

static json_value *parse_literal(parser *p, const char *lit, json_type t) {
    size_t n = strlen(lit);
    for (size_t k = 0; k < n; k++) {
        if (p->pos + k >= p->len) {
            fail(p, p->pos + k, "unexpected end of input");
            return NULL;
        }
        if (p->buf[p->pos + k] != (unsigned char)lit[k]) {
            fail(p, p->pos + k, "invalid literal");
            return NULL;
        }
    }
    json_value *v = new_value(t);
    if (!v) {
        fail(p, p->pos, "out of memory");
        return NULL;
    }
    p->pos += n;
    return v;
}

static json_value *parse_value(parser *p, int depth) {
    skip_ws(p);
    if (p->pos >= p->len) {
        fail(p, p->pos, "unexpected end of input");
        return NULL;
    }
    unsigned char c = p->buf[p->pos];
    switch (c) {
        case '{':
        case '[':
            if (depth >= p->max_depth) {
                fail(p, p->pos, "nesting deeper than %d", p->max_depth);
                return NULL;
            }
            return c == '{' ? parse_object(p, depth + 1) : parse_array(p, depth + 1);
        case '"': {
            size_t slen;
            char *s = parse_string(p, &slen);
            if (!s) return NULL;
            json_value *v = new_value(JSON_STRING);
            if (!v) {
                free(s);
                fail(p, p->pos, "out of memory");
                return NULL;
            }
            v->str = s;
            v->len = slen;
            return v;
        }
        case 't':
            return parse_literal(p, "true", JSON_TRUE);
        case 'f':
            return parse_literal(p, "false", JSON_FALSE);
        case 'n':
            return parse_literal(p, "null", JSON_NULL);
        default:
            break;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        size_t bad = 0;
        const char *s = (const char *)p->buf + p->pos;
        size_t n = scan_number(s, p->len - p->pos, &bad);
        if (!n) {
            fail(p, p->pos + bad, "invalid number");
            return NULL;
        }
        json_value *v = new_value(JSON_NUMBER);
        if (!v || !(v->str = memdup0(s, n))) {
            free(v);
            fail(p, p->pos, "out of memory");
            return NULL;
        }
        v->len = n;
        p->pos += n;
        return v;
    }
    if (c < 0x20 || c >= 0x7F)
        fail(p, p->pos, "unexpected byte 0x%02x", c);
    else
        fail(p, p->pos, "unexpected character '%c'", c);
    return NULL;
}

static json_value *run_parser(parser *p) {
    if (p->max_depth > JSON_HARD_DEPTH) p->max_depth = JSON_HARD_DEPTH;
    json_value *v = parse_value(p, 0);
    if (!v) return NULL;
    skip_ws(p);
    if (p->pos < p->len) {
        fail(p, p->pos, "trailing garbage");
        json_free(v);
        return NULL;
    }
    return v;
}

json_value *json_parse(const char *buf, size_t len, int max_depth, char *err, size_t errlen) {
    parser p = {
        .buf = (const unsigned char *)buf,
        .len = buf ? len : 0,
        .max_depth = max_depth > 0 ? max_depth : JSON_DEFAULT_MAX_DEPTH,
    };
    if (err && errlen) err[0] = '\0';
    json_value *v = run_parser(&p);
    if (!v && err && errlen) snprintf(err, errlen, "json: %s at byte %zu", p.what, p.at);
    return v;
}

json_value *json_parse_strict(const char *buf, size_t len, int max_depth, json_error *e) {
    parser p = {
        .buf = (const unsigned char *)buf,
        .len = buf ? len : 0,
        .max_depth = max_depth > 0 ? max_depth : JSON_DEFAULT_MAX_DEPTH,
        .unique_keys = true,
    };
    json_value *v = run_parser(&p);
    if (v || !e) return v;
    snprintf(e->message, sizeof(e->message), "%s", p.what);
    e->offset = p.at;
    e->line = 1;
    e->column = 1;
    for (size_t i = 0; i < p.at && i < p.len; i++) {
        if (p.buf[i] == '\n') {
            e->line++;
            e->column = 1;
        } else if ((p.buf[i] & 0xC0) != 0x80) { /* not a UTF-8 continuation byte */
            e->column++;
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Serializer                                                               */

typedef struct {
    char *p;
    size_t len, cap;
    bool oom;
} sbuf;

static bool sb_grow(sbuf *b, size_t need) {
    if (b->oom) return false;
    if (need <= b->cap - b->len) return true;
    if (need > SIZE_MAX - b->len - 1) {
        b->oom = true;
        return false;
    }
    size_t want = b->len + need + 1;
    size_t ncap = b->cap ? b->cap : 256;
    while (ncap < want) {
        if (ncap > SIZE_MAX / 2) {
            ncap = want;
            break;
        }
        ncap *= 2;
    }
    char *np = realloc(b->p, ncap);
    if (!np) {
        b->oom = true;
        return false;
    }
    b->p = np;
    b->cap = ncap;
    return true;
}

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (n && sb_grow(b, n)) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    }
}

static void sb_putc(sbuf *b, char c) {
    if (sb_grow(b, 1)) b->p[b->len++] = c;
}

/* Go encoding/json escaping without HTML escaping; invalid UTF-8 (only
 * possible in programmatically built strings) becomes U+FFFD as in Go. */
static void put_string(sbuf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *u = (const unsigned char *)s;
    sb_putc(b, '"');
    size_t run = 0; /* start of pending verbatim run */
    size_t i = 0;
    while (i < n) {
        unsigned char c = u[i];
        if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0x80) {
            size_t k = utf8_seq(u + i, n - i);
            if (k) {
                i += k;
                continue;
            }
            sb_put(b, s + run, i - run);
            sb_put(b, "\\ufffd", 6);
            i++;
            run = i;
            continue;
        }
        sb_put(b, s + run, i - run);
        switch (c) {
            case '"':
                sb_put(b, "\\\"", 2);
                break;
            case '\\':
                sb_put(b, "\\\\", 2);
                break;
            case '\n':
                sb_put(b, "\\n", 2);
                break;
            case '\r':
                sb_put(b, "\\r", 2);
                break;
            case '\t':
                sb_put(b, "\\t", 2);
                break;
            case '\b':
                sb_put(b, "\\b", 2);
                break;
            case '\f':
                sb_put(b, "\\f", 2);
                break;
            default: {
                char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 0xF]};
                sb_put(b, esc, 6);
            }
        }
        i++;
        run = i;
    }
    sb_put(b, s + run, n - run);
    sb_putc(b, '"');
}

static void put_value(sbuf *b, const json_value *v) {
    if (b->oom) return;
    if (!v) {
        sb_put(b, "null", 4);
        return;
    }
    switch (v->type) {
        case JSON_NULL:
            sb_put(b, "null", 4);
            break;
        case JSON_FALSE:
            sb_put(b, "false", 5);
            break;
        case JSON_TRUE:
            sb_put(b, "true", 4);
            break;
        case JSON_NUMBER:
            if (v->str && v->len)
                sb_put(b, v->str, v->len);
            else
                sb_putc(b, '0');
            break;
        case JSON_STRING:
            put_string(b, v->str ? v->str : "", v->str ? v->len : 0);
            break;
        case JSON_ARRAY:
            sb_putc(b, '[');
            for (size_t i = 0; i < v->count; i++) {
                if (i) sb_putc(b, ',');
                put_value(b, v->items[i]);
            }
            sb_putc(b, ']');
            break;
        case JSON_OBJECT:
            sb_putc(b, '{');
            for (size_t i = 0; i < v->count; i++) {
                if (i) sb_putc(b, ',');
                put_string(b, v->keys[i], v->key_lens[i]);
                sb_putc(b, ':');
                put_value(b, v->items[i]);
            }
            sb_putc(b, '}');
            break;
    }
}

char *json_serialize(const json_value *v, size_t *len) {
    sbuf b = {0};
    put_value(&b, v);
    if (!sb_grow(&b, 1)) { /* room for the NUL */
        free(b.p);
        return NULL;
    }
    b.p[b.len] = '\0';
    if (len) *len = b.len;
    return b.p;
}

/* ------------------------------------------------------------------------ */
/* Clone                                                                    */

json_value *json_clone(const json_value *v) {
    if (!v) return NULL;
    json_value *c = new_value(v->type);
    if (!c) return NULL;
    if (v->type == JSON_NUMBER || v->type == JSON_STRING) {
        c->str = memdup0(v->str ? v->str : "", v->str ? v->len : 0);
        if (!c->str) {
            free(c);
            return NULL;
        }
        c->len = v->str ? v->len : 0;
        return c;
    }
    if (v->type != JSON_ARRAY && v->type != JSON_OBJECT) return c;
    if (v->count) {
        if (v->count > SIZE_MAX / sizeof(void *)) goto bad;
        c->items = malloc(v->count * sizeof(*c->items));
        if (!c->items) goto bad;
        if (v->type == JSON_OBJECT) {
            c->keys = malloc(v->count * sizeof(*c->keys));
            c->key_lens = malloc(v->count * sizeof(*c->key_lens));
            if (!c->keys || !c->key_lens) goto bad;
        }
        c->cap = v->count;
    }
    for (size_t i = 0; i < v->count; i++) {
        json_value *item = json_clone(v->items[i]);
        if (!item) goto bad;
        if (v->type == JSON_OBJECT) {
            char *k = memdup0(v->keys[i], v->key_lens[i]);
            if (!k) {
                json_free(item);
                goto bad;
            }
            c->keys[i] = k;
            c->key_lens[i] = v->key_lens[i];
        }
        c->items[i] = item;
        c->count = i + 1;
    }
    return c;
bad:
    json_free(c);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Lookups                                                                  */

/* Index of the last occurrence of key, or SIZE_MAX. */
static size_t find_key(const json_value *obj, const char *key, size_t klen) {
    for (size_t i = obj->count; i-- > 0;)
        if (obj->key_lens[i] == klen && memcmp(obj->keys[i], key, klen) == 0) return i;
    return SIZE_MAX;
}

json_value *json_object_get(const json_value *obj, const char *key) {
    if (!obj || obj->type != JSON_OBJECT || !key) return NULL;
    size_t i = find_key(obj, key, strlen(key));
    return i == SIZE_MAX ? NULL : obj->items[i];
}

const char *json_object_get_string(const json_value *obj, const char *key) {
    json_value *v = json_object_get(obj, key);
    return v && v->type == JSON_STRING ? v->str : NULL;
}

json_value *json_array_get(const json_value *arr, size_t index) {
    if (!arr || arr->type != JSON_ARRAY || index >= arr->count) return NULL;
    return arr->items[index];
}

/* ------------------------------------------------------------------------ */
/* Numbers                                                                  */

/* Integer text only: -?(0|[1-9][0-9]*). Sets *neg and the magnitude; false
 * on anything else or when the magnitude exceeds UINT64_MAX. */
static bool int_text(const json_value *v, bool *neg, uint64_t *mag) {
    if (!v || v->type != JSON_NUMBER || !v->str || v->len == 0) return false;
    const char *s = v->str;
    size_t n = v->len, i = 0;
    *neg = false;
    if (s[0] == '-') {
        *neg = true;
        i = 1;
    }
    if (i >= n) return false;
    if (s[i] == '0' && n - i > 1) return false;
    uint64_t m = 0;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return false;
        unsigned d = (unsigned)(s[i] - '0');
        if (m > (UINT64_MAX - d) / 10) return false;
        m = m * 10 + d;
    }
    *mag = m;
    return true;
}

bool json_get_int64(const json_value *v, int64_t *out) {
    bool neg;
    uint64_t m;
    if (!int_text(v, &neg, &m)) return false;
    int64_t r;
    if (neg) {
        if (m > (uint64_t)INT64_MAX + 1) return false;
        r = m == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)m;
    } else {
        if (m > (uint64_t)INT64_MAX) return false;
        r = (int64_t)m;
    }
    if (out) *out = r;
    return true;
}

bool json_get_uint64(const json_value *v, uint64_t *out) {
    bool neg;
    uint64_t m;
    if (!int_text(v, &neg, &m)) return false;
    if (neg && m != 0) return false;
    if (out) *out = m;
    return true;
}

/* ------------------------------------------------------------------------ */
/* Constructors                                                             */

json_value *json_new_null(void) { return new_value(JSON_NULL); }

json_value *json_new_bool(bool b) { return new_value(b ? JSON_TRUE : JSON_FALSE); }

json_value *json_new_stringn(const char *s, size_t len) {
    if (!s && len) return NULL;
    json_value *v = new_value(JSON_STRING);
    if (!v) return NULL;
    v->str = memdup0(s ? s : "", len);
    if (!v->str) {
        free(v);
        return NULL;
    }
    v->len = len;
    return v;
}

json_value *json_new_string(const char *s) { return s ? json_new_stringn(s, strlen(s)) : NULL; }

static json_value *number_from(const char *text, size_t n) {
    json_value *v = new_value(JSON_NUMBER);
    if (!v) return NULL;
    v->str = memdup0(text, n);
    if (!v->str) {
        free(v);
        return NULL;
    }
    v->len = n;
    return v;
}

json_value *json_new_int64(int64_t n) {
    char tmp[32];
    int k = snprintf(tmp, sizeof(tmp), "%" PRId64, n);
    return number_from(tmp, (size_t)k);
}

json_value *json_new_uint64(uint64_t n) {
    char tmp[32];
    int k = snprintf(tmp, sizeof(tmp), "%" PRIu64, n);
    return number_from(tmp, (size_t)k);
}

json_value *json_new_number_text(const char *text) {
    if (!text) return NULL;
    size_t n = strlen(text), bad = 0;
    if (n == 0 || scan_number(text, n, &bad) != n) return NULL;
    return number_from(text, n);
}

json_value *json_new_array(void) { return new_value(JSON_ARRAY); }

json_value *json_new_object(void) { return new_value(JSON_OBJECT); }

/* ------------------------------------------------------------------------ */
/* Mutators                                                                 */

int json_array_append(json_value *arr, json_value *item) {
    if (!arr || arr->type != JSON_ARRAY) return json_array_insert(NULL, 0, item);
    return json_array_insert(arr, arr->count, item);
}

int json_array_insert(json_value *arr, size_t index, json_value *item) {
    if (!item) return -1;
    if (!arr || arr->type != JSON_ARRAY || item == arr || index > arr->count || reserve_one(arr) != 0) {
        json_free(item);
        return -1;
    }
    memmove(arr->items + index + 1, arr->items + index, (arr->count - index) * sizeof(*arr->items));
    arr->items[index] = item;
    arr->count++;
    return 0;
}

/* Drop the entry at index i (frees key and value). */
static void remove_at(json_value *obj, size_t i) {
    free(obj->keys[i]);
    json_free(obj->items[i]);
    size_t tail = obj->count - i - 1;
    memmove(obj->keys + i, obj->keys + i + 1, tail * sizeof(*obj->keys));
    memmove(obj->key_lens + i, obj->key_lens + i + 1, tail * sizeof(*obj->key_lens));
    memmove(obj->items + i, obj->items + i + 1, tail * sizeof(*obj->items));
    obj->count--;
}

/* Replacing a duplicated key keeps the position of the last occurrence (the
 * one lookups see) and drops the earlier ones, so every reader of the output
 * sees the value that was set. */
int json_object_set(json_value *obj, const char *key, json_value *item) {
    if (!item) return -1;
    if (!obj || obj->type != JSON_OBJECT || !key || item == obj) {
        json_free(item);
        return -1;
    }
    size_t klen = strlen(key);
    size_t i = find_key(obj, key, klen);
    if (i != SIZE_MAX) {
        json_free(obj->items[i]);
        obj->items[i] = item;
        for (size_t j = i; j-- > 0;)
            if (obj->key_lens[j] == klen && memcmp(obj->keys[j], key, klen) == 0) remove_at(obj, j);
        return 0;
    }
    char *k = memdup0(key, klen);
    if (!k || reserve_one(obj) != 0) {
        free(k);
        json_free(item);
        return -1;
    }
    obj->keys[obj->count] = k;
    obj->key_lens[obj->count] = klen;
    obj->items[obj->count++] = item;
    return 0;
}

/* Removes every occurrence of a duplicated key, so the key is really gone. */
int json_object_remove(json_value *obj, const char *key) {
    if (!obj || obj->type != JSON_OBJECT || !key) return 0;
    size_t klen = strlen(key);
    int removed = 0;
    for (size_t j = obj->count; j-- > 0;)
        if (obj->key_lens[j] == klen && memcmp(obj->keys[j], key, klen) == 0) {
            remove_at(obj, j);
            removed = 1;
        }
    return removed;
}
