/* WWW-Authenticate challenges (ref.h). */
#include "fuzz.h"

#include "regfacade/ref.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *h = fuzz_cstr(data, size);
    www_authenticate w;
    char err[256];
    memset(&w, 0x5a, sizeof w);
    int rc = www_authenticate_parse(h, &w, err, sizeof err);
    FUZZ_ASSERT(rc == 0 || rc == -1);
    if (rc == 0) {
        FUZZ_ASSERT(memchr(w.scheme, 0, sizeof w.scheme) && memchr(w.realm, 0, sizeof w.realm));
        FUZZ_ASSERT(memchr(w.service, 0, sizeof w.service) && memchr(w.scope, 0, sizeof w.scope));
        FUZZ_ASSERT(memchr(w.error, 0, sizeof w.error));
        FUZZ_ASSERT(w.scheme[0] != '\0');
    } else {
        FUZZ_ASSERT(memchr(err, 0, sizeof err));
    }
    char tiny[2];
    (void)www_authenticate_parse(h, &w, tiny, sizeof tiny);
    (void)www_authenticate_parse(h, &w, NULL, 0);
    free(h);
    return 0;
}
