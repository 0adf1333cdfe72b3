/*
 * digest: streaming sha256 (OpenSSL EVP) in the OCI "sha256:<hex>" form.
 */
#ifndef REGFACADE_DIGEST_H
#define REGFACADE_DIGEST_H

#include <stddef.h>

#define DIGEST_STRING_LEN 72 /* "sha256:" + 64 hex + NUL */

typedef struct digest_ctx digest_ctx;

/* NULL on allocation failure. */
digest_ctx *digest_new(void);
int digest_update(digest_ctx *d, const void *data, size_t len);
/* Writes "sha256:<hex>" into out (DIGEST_STRING_LEN bytes); the context
 * may be reused after digest_reset. */
int digest_final(digest_ctx *d, char out[DIGEST_STRING_LEN]);
int digest_reset(digest_ctx *d);
void digest_free(digest_ctx *d);

/* One-shot sha256 of a buffer. 0 on success. */
int digest_bytes(const void *data, size_t len, char out[DIGEST_STRING_LEN]);

#endif
