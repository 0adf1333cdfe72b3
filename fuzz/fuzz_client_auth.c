/* The client's Authorization header (client_auth.h). */
#include "fuzz.h"

#include "regfacade/client_auth.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *h = fuzz_cstr(data, size);
    static client_credentials c;
    client_auth_kind k = client_auth_parse(h, &c);
    FUZZ_ASSERT(k == c.kind);
    FUZZ_ASSERT(memchr(c.user, 0, sizeof c.user) && memchr(c.password, 0, sizeof c.password) &&
                memchr(c.token, 0, sizeof c.token));
    switch (k) {
        case CLIENT_AUTH_BASIC:
            FUZZ_ASSERT(c.user[0] && !strchr(c.user, ':') && !c.token[0]);
            for (const char *p = c.user; *p; p++) FUZZ_ASSERT((unsigned char)*p >= 0x20 && *p != 0x7f);
            for (const char *p = c.password; *p; p++) FUZZ_ASSERT((unsigned char)*p >= 0x20 && *p != 0x7f);
            break;
        case CLIENT_AUTH_BEARER:
            FUZZ_ASSERT(c.token[0] && !c.user[0] && !c.password[0]);
            FUZZ_ASSERT(strspn(c.token, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=") ==
                        strlen(c.token));
            break;
        default:
            FUZZ_ASSERT(!c.user[0] && !c.password[0] && !c.token[0]);
    }
    client_credentials_wipe(&c);
    FUZZ_ASSERT(c.kind == CLIENT_AUTH_NONE && !c.user[0] && !c.password[0] && !c.token[0]);
    free(h);
    return 0;
}
