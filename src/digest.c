#include "regfacade/digest.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct digest_ctx {
    EVP_MD_CTX *md;
};

digest_ctx *digest_new(void) {
    digest_ctx *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->md = EVP_MD_CTX_new();
    if (!d->md || EVP_DigestInit_ex(d->md, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(d->md);
        free(d);
        return NULL;
    }
    return d;
}

int digest_update(digest_ctx *d, const void *data, size_t len) {
    return EVP_DigestUpdate(d->md, data, len) == 1 ? 0 : -1;
}

int digest_final(digest_ctx *d, char out[DIGEST_STRING_LEN]) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_DigestFinal_ex(d->md, md, &n) != 1 || n != 32) return -1;
    memcpy(out, "sha256:", 7);
    for (unsigned i = 0; i < n; i++) snprintf(out + 7 + 2 * i, 3, "%02x", md[i]);
    return 0;
}

int digest_reset(digest_ctx *d) { return EVP_DigestInit_ex(d->md, EVP_sha256(), NULL) == 1 ? 0 : -1; }

void digest_free(digest_ctx *d) {
    if (!d) return;
    EVP_MD_CTX_free(d->md);
    free(d);
}

int digest_bytes(const void *data, size_t len, char out[DIGEST_STRING_LEN]) {
    digest_ctx *d = digest_new();
    if (!d) return -1;
    int rc = digest_update(d, data, len) == 0 && digest_final(d, out) == 0 ? 0 : -1;
    digest_free(d);
    return rc;
}
