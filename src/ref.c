/*
 * ref: parsers for what arrives on the wire (names, tags, digests, Range,
 * WWW-Authenticate, Docker config.json credentials). Everything here is a
 * pure function: no I/O, no global state; the only allocation is the parsed
 * JSON tree and a scratch buffer in docker_config_lookup, both freed before
 * returning.
 */
#include "regfacade/ref.h"

#include "regfacade/errmsg.h"
#include "regfacade/json.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Character classes by hand: <ctype.h> depends on the locale, the grammars
 * here are ASCII. */
static bool is_lower_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }
static bool is_digit(char c) { return c >= '0' && c <= '9'; }
static bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static bool is_lower_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }
static char to_lower(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c; }

static bool ieq(const char *a, size_t alen, const char *b) {
    size_t blen = strlen(b);
    if (alen != blen) return false;
    for (size_t i = 0; i < alen; i++)
        if (to_lower(a[i]) != to_lower(b[i])) return false;
    return true;
}

/* ---------------------------------------------------------------- names */

bool ref_valid_name(const char *name) {
    if (!name) return false;
    const char *p = name;
    /* Each pass of the loop matches one [a-z0-9]+ run; between runs comes a
     * separator ('.', '_', '__', '-+') or a '/', and both must be followed
     * by another run, so leading, trailing and doubled separators and empty
     * components all fail the run check at the top. */
    for (;;) {
        if (!is_lower_alnum(*p)) return false;
        while (is_lower_alnum(*p)) p++;
        if ((size_t)(p - name) > REF_NAME_MAX) return false;
        switch (*p) {
            case '\0':
                return true;
            case '/':
            case '.':
                p++;
                break;
            case '_':
                p++;
                if (*p == '_') /* "__" is one separator; "___" leaves a '_' that fails the run check */
                    p++;
                break;
            case '-':
                while (*p == '-') p++;
                break;
            default:
                return false;
        }
        if ((size_t)(p - name) > REF_NAME_MAX) return false;
    }
}

/* ----------------------------------------------------------------- tags */

bool ref_valid_tag(const char *tag) {
    if (!tag) return false;
    if (!(is_alpha(tag[0]) || is_digit(tag[0]) || tag[0] == '_')) return false;
    size_t i = 1;
    for (; tag[i]; i++) {
        char c = tag[i];
        if (i >= REF_TAG_MAX) return false;
        if (!(is_alpha(c) || is_digit(c) || c == '_' || c == '.' || c == '-')) return false;
    }
    return true;
}

/* -------------------------------------------------------------- digests */

static bool all_lower_hex(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!is_lower_hex(s[i])) return false;
    return true;
}

bool ref_valid_digest(const char *digest) {
    if (!digest) return false;
    /* algorithm: [a-z0-9]+([+._-][a-z0-9]+)* */
    const char *p = digest;
    for (;;) {
        if (!is_lower_alnum(*p)) return false;
        while (is_lower_alnum(*p)) p++;
        if (*p == '+' || *p == '.' || *p == '_' || *p == '-')
            p++;
        else
            break;
    }
    if (*p != ':') return false;
    size_t alg_len = (size_t)(p - digest);
    const char *enc = p + 1;
    size_t enc_len = 0;
    /* encoded: [a-zA-Z0-9=_-]+ ; bounded so a huge string is not scanned */
    for (; enc[enc_len]; enc_len++) {
        char c = enc[enc_len];
        if (alg_len + 1 + enc_len >= REF_DIGEST_MAX) return false;
        if (!(is_alpha(c) || is_digit(c) || c == '=' || c == '_' || c == '-')) return false;
    }
    if (enc_len == 0) return false;
    /* The registered algorithms have a fixed encoding; anything else is
     * only held to the general grammar. */
    if (alg_len == 6 && memcmp(digest, "sha256", 6) == 0) return enc_len == 64 && all_lower_hex(enc, enc_len);
    if (alg_len == 6 && memcmp(digest, "sha512", 6) == 0) return enc_len == 128 && all_lower_hex(enc, enc_len);
    return true;
}

bool ref_is_sha256_digest(const char *digest) {
    if (!digest || strncmp(digest, "sha256:", 7) != 0) return false;
    const char *hex = digest + 7;
    for (size_t i = 0; i < 64; i++)
        if (!is_lower_hex(hex[i])) /* also stops at the NUL of a short string */
            return false;
    return hex[64] == '\0';
}

/* ---------------------------------------------------------------- Range */

static bool is_ows(char c) { return c == ' ' || c == '\t'; }

/* 1*DIGIT into a uint64; false on no digits or overflow. */
static bool parse_u64(const char **pp, uint64_t *out) {
    const char *p = *pp;
    uint64_t v = 0;
    if (!is_digit(*p)) return false;
    for (; is_digit(*p); p++) {
        uint64_t d = (uint64_t)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) return false;
        v = v * 10 + d;
    }
    *pp = p;
    *out = v;
    return true;
}

range_parse_result range_parse(const char *header, range_spec *spec) {
    if (!header || !spec) return RANGE_NONE;
    const char *p = header;
    while (is_ows(*p)) p++;
    if (*p == '\0') return RANGE_NONE;

    /* range-unit is a token compared case-insensitively (RFC 9110 14.1). */
    const char *unit = p;
    while (*p && *p != '=' && !is_ows(*p)) p++;
    if (!ieq(unit, (size_t)(p - unit), "bytes") || *p != '=') return RANGE_INVALID;
    p++;
    while (is_ows(*p)) /* list elements may be preceded by OWS */
        p++;

    range_spec s = {0};
    if (*p == '-') {
        p++;
        s.kind = RANGE_SUFFIX;
        if (!parse_u64(&p, &s.first)) return RANGE_INVALID;
    } else {
        if (!parse_u64(&p, &s.first)) return RANGE_INVALID;
        if (*p != '-') return RANGE_INVALID;
        p++;
        if (is_digit(*p)) {
            s.kind = RANGE_FROM_TO;
            if (!parse_u64(&p, &s.last)) return RANGE_INVALID;
        } else {
            s.kind = RANGE_FROM;
        }
    }
    while (is_ows(*p)) p++;
    /* Anything left, a ',' of a second range included, is refused: we serve
     * single ranges only and never multipart/byteranges. */
    if (*p != '\0') return RANGE_INVALID;
    *spec = s;
    return RANGE_OK;
}

bool range_resolve(const range_spec *spec, uint64_t size, uint64_t *start, uint64_t *end) {
    if (!spec || !start || !end || size == 0) return false;
    switch (spec->kind) {
        case RANGE_FROM_TO:
            if (spec->last < spec->first || spec->first >= size) return false;
            *start = spec->first;
            *end = spec->last < size - 1 ? spec->last : size - 1;
            return true;
        case RANGE_FROM:
            if (spec->first >= size) return false;
            *start = spec->first;
            *end = size - 1;
            return true;
        case RANGE_SUFFIX:
            if (spec->first == 0) return false;
            /* A suffix longer than the entity means the whole entity. */
            *start = spec->first >= size ? 0 : size - spec->first;
            *end = size - 1;
            return true;
    }
    return false;
}

/* ------------------------------------------------------ WWW-Authenticate */

/* tchar of RFC 9110 5.6.2 */
static bool is_tchar(char c) {
    if (is_alpha(c) || is_digit(c)) return true;
    return c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static bool is_token68_char(char c) {
    return is_alpha(c) || is_digit(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '+' || c == '/';
}

static const char *skip_ows(const char *p) {
    while (is_ows(*p)) p++;
    return p;
}

/* Skip OWS and empty list elements ("a, ,b" is legal list syntax). */
static const char *skip_ows_commas(const char *p) {
    while (is_ows(*p) || *p == ',') p++;
    return p;
}

/* Does p start "token BWS = BWS value"? A token68 such as "abc==" is not
 * one, since '=' cannot start a value. */
static bool starts_param(const char *p) {
    const char *q = p;
    while (is_tchar(*q)) q++;
    if (q == p) return false;
    q = skip_ows(q);
    if (*q != '=') return false;
    q = skip_ows(q + 1);
    return *q == '"' || is_tchar(*q);
}

/* The params we keep, and where each goes. */
typedef struct {
    const char *name;
    char *buf;
    size_t cap;
    bool seen;
} www_slot;

static int www_fail(www_authenticate *out) {
    memset(out, 0, sizeof *out); /* no half-filled result on error */
    return -1;
}

int www_authenticate_parse(const char *header, www_authenticate *out, char *err, size_t errlen) {
    if (!out) {
        errmsg_set(err, errlen, "WWW-Authenticate: no output");
        return -1;
    }
    memset(out, 0, sizeof *out);
    if (!header) {
        errmsg_set(err, errlen, "WWW-Authenticate: missing header");
        return -1;
    }

    const char *p = skip_ows_commas(header);
    const char *scheme = p;
    while (is_tchar(*p)) p++;
    size_t slen = (size_t)(p - scheme);
    /* No token at all, or a token followed by '=' (a bare param list such
     * as realm="x"), means the scheme is missing. */
    if (slen == 0 || *skip_ows(p) == '=') {
        errmsg_set(err, errlen, "WWW-Authenticate: missing auth scheme at byte %zu", (size_t)(scheme - header));
        return www_fail(out);
    }
    if (*p != '\0' && !is_ows(*p) && *p != ',') {
        errmsg_set(err, errlen, "WWW-Authenticate: invalid character in auth scheme at byte %zu", (size_t)(p - header));
        return www_fail(out);
    }
    if (slen >= sizeof out->scheme) {
        errmsg_set(err, errlen, "WWW-Authenticate: auth scheme too long (%zu bytes, max %zu)", slen,
                   sizeof out->scheme - 1);
        return www_fail(out);
    }
    memcpy(out->scheme, scheme, slen);
    out->scheme[slen] = '\0';

    p = skip_ows(p);
    /* A comma straight after the scheme ends this challenge (no params). */
    if (*p == ',' || *p == '\0') return 0;

    /* token68 form ("Negotiate abc==") carries nothing we use: skip it. */
    if (!starts_param(p)) {
        const char *t = p;
        while (is_token68_char(*p)) p++;
        while (*p == '=') p++;
        p = skip_ows(p);
        if (p == t || (*p != '\0' && *p != ',')) {
            errmsg_set(err, errlen, "WWW-Authenticate: expected auth-param or token68 at byte %zu",
                       (size_t)(t - header));
            return www_fail(out);
        }
        return 0;
    }

    www_slot slots[] = {
        {"realm", out->realm, sizeof out->realm, false},
        {"service", out->service, sizeof out->service, false},
        {"scope", out->scope, sizeof out->scope, false},
        {"error", out->error, sizeof out->error, false},
    };
    for (;;) {
        p = skip_ows_commas(p);
        if (*p == '\0') break;
        const char *name = p;
        while (is_tchar(*p)) p++;
        size_t nlen = (size_t)(p - name);
        if (nlen == 0) {
            errmsg_set(err, errlen, "WWW-Authenticate: expected auth-param at byte %zu", (size_t)(name - header));
            return www_fail(out);
        }
        p = skip_ows(p);
        /* "scheme SP ..." without '=' starts the next challenge; only the
         * first challenge is ours. */
        if (*p != '=') break;
        p = skip_ows(p + 1);

        www_slot *slot = NULL;
        for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++)
            if (ieq(name, nlen, slots[i].name)) slot = &slots[i];
        /* The name for messages: a known one spelled our way, else the
         * sender's spelling, bounded so junk cannot flood err. */
        int shown = slot ? (int)strlen(slot->name) : (nlen > 64 ? 64 : (int)nlen);
        const char *shown_name = slot ? slot->name : name;
        if (slot && slot->seen) {
            /* RFC 9110 11.2: a param occurs once per challenge; two realms
             * would leave us guessing where to send credentials. */
            errmsg_set(err, errlen, "WWW-Authenticate: param %.*s given twice", shown, shown_name);
            return www_fail(out);
        }

        size_t vlen = 0;
        if (*p == '"') {
            const char *start = p++;
            for (;;) {
                char c = *p;
                bool escaped = false;
                if (c == '\\') { /* quoted-pair: take the next byte as is */
                    c = *++p;
                    escaped = true;
                }
                if (c == '\0') {
                    errmsg_set(err, errlen,
                               "WWW-Authenticate: param %.*s: unterminated quoted-string starting at byte %zu", shown,
                               shown_name, (size_t)(start - header));
                    return www_fail(out);
                }
                if (c == '"' && !escaped) break;
                /* qdtext and quoted-pair exclude controls other than HTAB. */
                if (((unsigned char)c < 0x20 && c != '\t') || c == 0x7f) {
                    errmsg_set(err, errlen,
                               "WWW-Authenticate: param %.*s: control character in quoted-string at byte %zu", shown,
                               shown_name, (size_t)(p - header));
                    return www_fail(out);
                }
                if (slot) {
                    if (vlen + 1 >= slot->cap) {
                        errmsg_set(err, errlen, "WWW-Authenticate: param %.*s: value too long (max %zu bytes)", shown,
                                   shown_name, slot->cap - 1);
                        return www_fail(out);
                    }
                    slot->buf[vlen] = c;
                }
                vlen++;
                p++;
            }
            p++; /* closing quote */
        } else {
            const char *v = p;
            while (is_tchar(*p)) p++;
            vlen = (size_t)(p - v);
            if (vlen == 0) {
                errmsg_set(err, errlen, "WWW-Authenticate: param %.*s: missing value at byte %zu", shown, shown_name,
                           (size_t)(v - header));
                return www_fail(out);
            }
            if (slot) {
                if (vlen >= slot->cap) {
                    errmsg_set(err, errlen, "WWW-Authenticate: param %.*s: value too long (%zu bytes, max %zu)", shown,
                               shown_name, vlen, slot->cap - 1);
                    return www_fail(out);
                }
                memcpy(slot->buf, v, vlen);
            }
        }
        if (slot) {
            slot->buf[vlen] = '\0';
            slot->seen = true;
        }
        p = skip_ows(p);
        if (*p != '\0' && *p != ',') {
            errmsg_set(err, errlen, "WWW-Authenticate: param %.*s: unexpected character after value at byte %zu", shown,
                       shown_name, (size_t)(p - header));
            return www_fail(out);
        }
    }
    return 0;
}

/* --------------------------------------------------------------- base64 */

static int b64_value(char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

long base64_decode(const char *in, size_t inlen, char *out, size_t outlen) {
    if ((!in && inlen) || !out || outlen == 0) return -1;
    /* Padding is optional, but when present it must complete the last
     * quantum and nothing may follow it. */
    size_t n = inlen;
    size_t pad = 0;
    while (n > 0 && in[n - 1] == '=' && pad < 2) {
        n--;
        pad++;
    }
    if (pad && inlen % 4 != 0) return -1;
    if (n % 4 == 1) /* one leftover sextet cannot encode a byte */
        return -1;
    size_t need = n / 4 * 3 + (n % 4 ? n % 4 - 1 : 0);
    if (need >= outlen || need > (size_t)0x7fffffff) return -1;

    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64_value(in[i]);
        if (v < 0) return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (char)((acc >> bits) & 0xff);
        }
    }
    out[o] = '\0';
    return (long)o;
}

long base64_encode(const unsigned char *in, size_t inlen, char *out, size_t outlen) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if ((!in && inlen) || !out || outlen == 0) return -1;
    if (inlen > ((size_t)0x7fffffff / 4) * 3 - 3) return -1;
    size_t need = (inlen + 2) / 3 * 4;
    if (need >= outlen) return -1;
    size_t o = 0;
    size_t i = 0;
    for (; i + 3 <= inlen; i += 3) {
        uint32_t v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8) | in[i + 2];
        out[o++] = alphabet[(v >> 18) & 63];
        out[o++] = alphabet[(v >> 12) & 63];
        out[o++] = alphabet[(v >> 6) & 63];
        out[o++] = alphabet[v & 63];
    }
    if (i < inlen) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < inlen) v |= (uint32_t)in[i + 1] << 8;
        out[o++] = alphabet[(v >> 18) & 63];
        out[o++] = alphabet[(v >> 12) & 63];
        out[o++] = i + 1 < inlen ? alphabet[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    out[o] = '\0';
    return (long)o;
}

/* ---------------------------------------------------------- hosts, auth */

void registry_host_normalize(const char *in, char *out, size_t outlen) {
    if (!out || outlen == 0) return;
    out[0] = '\0';
    if (!in) return;
    const char *p = in;
    while (is_ows(*p)) p++;
    /* Strip "scheme://" only when it comes before any path. */
    const char *sep = strstr(p, "://");
    if (sep && memchr(p, '/', (size_t)(sep - p)) == NULL) p = sep + 3;
    size_t n = strcspn(p, "/?# \t");
    /* Longer than the buffer: keep a prefix (DNS names are at most 253
     * bytes, so this only truncates junk). */
    if (n >= outlen) n = outlen - 1;
    for (size_t i = 0; i < n; i++) out[i] = to_lower(p[i]);
    out[n] = '\0';
    /* Docker Hub answers under three names; credentials are stored under
     * any of them. */
    if (strcmp(out, "index.docker.io") == 0 || strcmp(out, "registry-1.docker.io") == 0) {
        if (outlen > strlen("docker.io")) memcpy(out, "docker.io", sizeof "docker.io");
    }
}

/* A config key fit to quote in an error message: printable ASCII only,
 * bounded length. */
static void key_for_message(const char *key, size_t klen, char *buf, size_t buflen) {
    size_t o = 0;
    for (size_t i = 0; i < klen && o + 4 < buflen; i++) {
        char c = key[i];
        buf[o++] = (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') ? c : '?';
    }
    if (klen > 0 && o + 4 >= buflen && o < klen) {
        buf[o++] = '.';
        buf[o++] = '.';
        buf[o++] = '.';
    }
    buf[o] = '\0';
}

static bool copy_cred(const char *src, size_t n, char *dst, size_t dstlen) {
    if (!dst || n >= dstlen) return false;
    memcpy(dst, src, n);
    dst[n] = '\0';
    return true;
}

/* Split the base64 "auth" field into user and password. 1 or -1. */
static int decode_auth(const json_value *auth, const char *key, char *user, size_t user_len, char *pass,
                       size_t pass_len, char *err, size_t errlen) {
    size_t cap = auth->len / 4 * 3 + 4;
    char *buf = malloc(cap);
    if (!buf) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"].auth: out of memory", key);
        return -1;
    }
    int rc = -1;
    long n = base64_decode(auth->str, auth->len, buf, cap);
    char *colon = n > 0 ? memchr(buf, ':', (size_t)n) : NULL;
    if (n < 0) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"].auth: not valid base64", key);
    } else if (memchr(buf, '\0', (size_t)n)) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"].auth: decoded value contains a NUL byte", key);
    } else if (!colon) {
        /* Docker writes "user:password"; without the ':' we cannot tell
         * where the user name ends. */
        errmsg_set(err, errlen, "docker config: auths[\"%s\"].auth: decoded value has no ':' between user and password",
                   key);
    } else {
        /* The user name ends at the first ':'; the password may hold more. */
        size_t ulen = (size_t)(colon - buf);
        size_t plen = (size_t)n - ulen - 1;
        if (!copy_cred(buf, ulen, user, user_len))
            errmsg_set(err, errlen, "docker config: auths[\"%s\"].auth: user name too long (%zu bytes)", key, ulen);
        else if (!copy_cred(colon + 1, plen, pass, pass_len))
            errmsg_set(err, errlen, "docker config: auths[\"%s\"].auth: password too long (%zu bytes)", key, plen);
        else
            rc = 1;
    }
    /* The scratch buffer held a password: wipe it before freeing. */
    volatile char *w = buf;
    for (size_t i = 0; i < cap; i++) w[i] = 0;
    free(buf);
    return rc;
}

/* Fill user/pass from one auths entry. 1 found, 0 nothing usable, -1 error. */
static int entry_credentials(const json_value *entry, const char *key, char *user, size_t user_len, char *pass,
                             size_t pass_len, char *err, size_t errlen) {
    if (entry->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"]: not an object", key);
        return -1;
    }
    const json_value *auth = json_object_get(entry, "auth");
    const json_value *uname = json_object_get(entry, "username");
    const json_value *pword = json_object_get(entry, "password");
    const json_value *itok = json_object_get(entry, "identitytoken");

    if (auth && auth->type != JSON_STRING) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"].auth: not a string", key);
        return -1;
    }
    if (uname && uname->type != JSON_STRING) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"].username: not a string", key);
        return -1;
    }
    if (pword && pword->type != JSON_STRING) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"].password: not a string", key);
        return -1;
    }
    if (itok && itok->type != JSON_STRING) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"].identitytoken: not a string", key);
        return -1;
    }
    /* An identity token is an OAuth2 refresh token for the registry's token
     * server, not a password: it wins over "auth" (as in Docker) and goes
     * out under the user name "<token>", which tells the caller so. */
    if (itok && itok->len > 0) {
        if (memchr(itok->str, '\0', itok->len)) {
            errmsg_set(err, errlen, "docker config: auths[\"%s\"].identitytoken: contains a NUL byte", key);
            return -1;
        }
        if (!copy_cred("<token>", 7, user, user_len)) {
            errmsg_set(err, errlen, "docker config: auths[\"%s\"]: user name buffer too small", key);
            return -1;
        }
        if (!copy_cred(itok->str, itok->len, pass, pass_len)) {
            errmsg_set(err, errlen, "docker config: auths[\"%s\"].identitytoken: too long (%zu bytes)", key, itok->len);
            return -1;
        }
        return 1;
    }

    if (auth && auth->len > 0) return decode_auth(auth, key, user, user_len, pass, pass_len, err, errlen);

    if (!uname && !pword) return 0; /* e.g. {} entries left behind by a credential store */
    const char *u = uname ? uname->str : "";
    size_t ulen = uname ? uname->len : 0;
    const char *pw = pword ? pword->str : "";
    size_t plen = pword ? pword->len : 0;
    if (memchr(u, '\0', ulen) || memchr(pw, '\0', plen)) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"]: username or password contains a NUL byte", key);
        return -1;
    }
    if (!copy_cred(u, ulen, user, user_len)) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"].username: too long (%zu bytes)", key, ulen);
        return -1;
    }
    if (!copy_cred(pw, plen, pass, pass_len)) {
        errmsg_set(err, errlen, "docker config: auths[\"%s\"].password: too long (%zu bytes)", key, plen);
        return -1;
    }
    return 1;
}

/* The key of obj naming host: an exact key wins (the last one, as
 * json_object_get would pick); otherwise the first key, in file order,
 * naming the same host. SIZE_MAX when none. */
static size_t find_host_key(const json_value *obj, const char *host) {
    char want[256];
    registry_host_normalize(host, want, sizeof want);
    size_t hostlen = strlen(host);
    size_t match = SIZE_MAX;
    for (size_t i = 0; i < obj->count; i++) {
        if (obj->key_lens[i] == hostlen && memcmp(obj->keys[i], host, hostlen) == 0) match = i;
    }
    for (size_t i = 0; i < obj->count && match == SIZE_MAX && want[0] != '\0'; i++) {
        char have[256];
        if (memchr(obj->keys[i], '\0', obj->key_lens[i])) continue; /* a key with a NUL cannot name a host */
        registry_host_normalize(obj->keys[i], have, sizeof have);
        if (strcmp(have, want) == 0) match = i;
    }
    return match;
}

/* Parse a Docker config looked up for host: 1 with *root an object, 0 for an empty text
 * (the docker CLI reads it as an empty config), -1 with err. */
static int docker_config_parse(const char *json_text, size_t len, const char *host, json_value **root, char *err,
                               size_t errlen) {
    *root = NULL;
    if ((!json_text && len) || !host) {
        errmsg_set(err, errlen, "docker config: invalid arguments");
        return -1;
    }
    size_t k = 0;
    while (k < len && (json_text[k] == ' ' || json_text[k] == '\t' || json_text[k] == '\n' || json_text[k] == '\r'))
        k++;
    if (k == len) return 0;
    char jerr[256];
    jerr[0] = '\0';
    *root = json_parse(json_text, len, JSON_DEFAULT_MAX_DEPTH, jerr, sizeof jerr);
    if (!*root) {
        errmsg_set(err, errlen, "docker config: %s", jerr[0] ? jerr : "invalid JSON");
        return -1;
    }
    if ((*root)->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "docker config: top level is not an object");
        json_free(*root);
        *root = NULL;
        return -1;
    }
    return 1;
}

int docker_config_lookup(const char *json_text, size_t len, const char *host, char *user, size_t user_len, char *pass,
                         size_t pass_len, char *err, size_t errlen) {
    if (user && user_len) user[0] = '\0';
    if (pass && pass_len) pass[0] = '\0';
    json_value *root;
    int rc = !user || !pass || user_len == 0 || pass_len == 0
                 ? (errmsg_set(err, errlen, "docker config: invalid arguments"), -1)
                 : docker_config_parse(json_text, len, host, &root, err, errlen);
    if (rc <= 0) return rc;
    rc = 0;
    const json_value *auths = json_object_get(root, "auths");
    if (!auths) goto out;
    if (auths->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "docker config: \"auths\" is not an object");
        rc = -1;
        goto out;
    }
    size_t match = find_host_key(auths, host);
    if (match == SIZE_MAX) goto out;

    char keymsg[128];
    key_for_message(auths->keys[match], auths->key_lens[match], keymsg, sizeof keymsg);
    rc = entry_credentials(auths->items[match], keymsg, user, user_len, pass, pass_len, err, errlen);
    if (rc != 1) {
        user[0] = '\0';
        pass[0] = '\0';
    }
out:
    json_free(root);
    return rc;
}

/* A helper name fit for "docker-credential-NAME": no path, no control
 * characters, no spaces. */
static bool helper_name_ok(const json_value *v) {
    if (v->len == 0 || v->len > 100 || memchr(v->str, '\0', v->len)) return false;
    for (size_t i = 0; i < v->len; i++) {
        unsigned char c = (unsigned char)v->str[i];
        if (c <= 0x20 || c == 0x7f || c == '/' || c == '\\') return false;
    }
    return true;
}

int docker_config_helper(const char *json_text, size_t len, const char *host, char *helper, size_t helper_len,
                         char *err, size_t errlen) {
    if (helper && helper_len) helper[0] = '\0';
    json_value *root;
    int rc = !helper || helper_len == 0 ? (errmsg_set(err, errlen, "docker config: invalid arguments"), -1)
                                        : docker_config_parse(json_text, len, host, &root, err, errlen);
    if (rc <= 0) return rc;
    rc = 0;
    const json_value *chosen = NULL;
    char where[160] = "credsStore";
    const json_value *helpers = json_object_get(root, "credHelpers");
    if (helpers && helpers->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "docker config: \"credHelpers\" is not an object");
        rc = -1;
        goto out;
    }
    size_t match = helpers ? find_host_key(helpers, host) : SIZE_MAX;
    if (match != SIZE_MAX) {
        char keymsg[128];
        key_for_message(helpers->keys[match], helpers->key_lens[match], keymsg, sizeof keymsg);
        snprintf(where, sizeof where, "credHelpers[\"%s\"]", keymsg);
        chosen = helpers->items[match];
    } else {
        chosen = json_object_get(root, "credsStore");
    }
    if (!chosen) goto out;
    if (chosen->type != JSON_STRING) {
        errmsg_set(err, errlen, "docker config: %s: not a string", where);
        rc = -1;
        goto out;
    }
    /* "" means the file's own auths (as the docker CLI reads it). */
    if (chosen->len == 0) goto out;
    if (!helper_name_ok(chosen)) {
        errmsg_set(err, errlen,
                   "docker config: %s: not a helper name (1 to 100 characters, no '/', spaces "
                   "or control characters)",
                   where);
        rc = -1;
        goto out;
    }
    if (!copy_cred(chosen->str, chosen->len, helper, helper_len)) {
        errmsg_set(err, errlen, "docker config: %s: name too long", where);
        rc = -1;
        goto out;
    }
    rc = 1;
out:
    json_free(root);
    return rc;
}
