#include "regfacade/client_auth.h"

#include <stdbool.h>
#include <string.h>

#include "regfacade/ref.h"

static bool is_ows(char c) { return c == ' ' || c == '\t'; }

static bool scheme_is(const char *p, size_t n, const char *want) {
    if (strlen(want) != n) return false;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
        if (c != want[i]) return false;
    }
    return true;
}

/* token68 = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=" */
static bool is_token68(const char *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        char c = p[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
            c == '_' || c == '~' || c == '+' || c == '/')
            i++;
        else
            break;
    }
    if (i == 0) return false;
    while (i < n && p[i] == '=') i++;
    return i == n;
}

static bool has_ctl(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f) return true;
    }
    return false;
}

static client_auth_kind invalid(client_credentials *out, char *scratch, size_t scratch_len) {
    if (scratch) explicit_bzero(scratch, scratch_len);
    client_credentials_wipe(out);
    out->kind = CLIENT_AUTH_INVALID;
    return out->kind;
}

client_auth_kind client_auth_parse(const char *header, client_credentials *out) {
    client_credentials_wipe(out);
    out->kind = CLIENT_AUTH_NONE;
    if (!header) return out->kind;
    const char *p = header;
    while (is_ows(*p)) p++;
    if (!*p) return out->kind;
    size_t slen = strcspn(p, " \t");
    const char *scheme = p;
    p += slen;
    if (!is_ows(*p)) return invalid(out, NULL, 0);
    while (is_ows(*p)) p++;
    size_t vlen = strlen(p);
    while (vlen > 0 && is_ows(p[vlen - 1])) vlen--;
    if (vlen == 0 || !is_token68(p, vlen)) return invalid(out, NULL, 0);

    if (scheme_is(scheme, slen, "bearer")) {
        if (vlen >= sizeof out->token) return invalid(out, NULL, 0);
        memcpy(out->token, p, vlen);
        out->token[vlen] = '\0';
        out->kind = CLIENT_AUTH_BEARER;
        return out->kind;
    }
    if (scheme_is(scheme, slen, "basic")) {
        char plain[CLIENT_AUTH_USER_MAX + CLIENT_AUTH_PASSWORD_MAX + 2];
        long n = base64_decode(p, vlen, plain, sizeof plain);
        if (n < 0) return invalid(out, plain, sizeof plain);
        const char *colon = memchr(plain, ':', (size_t)n);
        if (!colon || has_ctl(plain, (size_t)n)) return invalid(out, plain, sizeof plain);
        size_t ulen = (size_t)(colon - plain), plen = (size_t)n - ulen - 1;
        if (ulen == 0 || ulen >= sizeof out->user || plen >= sizeof out->password)
            return invalid(out, plain, sizeof plain);
        memcpy(out->user, plain, ulen);
        out->user[ulen] = '\0';
        memcpy(out->password, colon + 1, plen);
        out->password[plen] = '\0';
        explicit_bzero(plain, sizeof plain);
        out->kind = CLIENT_AUTH_BASIC;
        return out->kind;
    }
    return invalid(out, NULL, 0);
}

void client_credentials_wipe(client_credentials *c) {
    explicit_bzero(c->user, sizeof c->user);
    explicit_bzero(c->password, sizeof c->password);
    explicit_bzero(c->token, sizeof c->token);
    c->kind = CLIENT_AUTH_NONE;
}
