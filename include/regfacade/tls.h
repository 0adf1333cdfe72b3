/*
 * tls: the "tls" config section (serving HTTPS to clients).
 *
 *   "tls": { "cert_file": "tls/server.crt",        PEM: leaf first, then intermediates
 *            "key_file": "tls/server.key",         PEM private key (PKCS#1, PKCS#8 or SEC1)
 *            "key_password_file": "tls/key.pass",  optional: the key's passphrase
 *            "min_version": "1.2" }                "1.2" (default) or "1.3"
 *
 * Relative paths resolve against the config file's folder. Files are read
 * once, at load (before any privilege drop), and checked with OpenSSL: the
 * certificate parses, the key parses (with its passphrase) and matches the
 * certificate. libmicrohttpd serves with GnuTLS from the in-memory copies.
 * Unknown keys are errors. The key and its passphrase never appear in a
 * message and are wiped when freed.
 */
#ifndef REGFACADE_TLS_H
#define REGFACADE_TLS_H

#include <stddef.h>

#include "regfacade/config.h"

typedef struct {
    char *cert_file; /* absolute paths, for messages */
    char *key_file;
    char *cert_pem;         /* NUL-terminated file contents */
    char *key_pem;          /* secret */
    char *key_password;     /* secret; NULL when the key is not encrypted */
    const char *priorities; /* GnuTLS priority string for min_version */
    char subject[256];      /* leaf certificate subject, for the start log line */
    char not_after[64];     /* leaf certificate expiry, for the start log line */
    int expired;            /* 1 when the leaf certificate has expired (a warning) */
} tls_config;

/* Parse c->tls. 0 with *out NULL when the section is absent; 0 with *out
 * set (caller frees with tls_config_free) when valid; -1 with
 * "FILE: tls.KEY: why" in err. */
int tls_config_load(const config *c, tls_config **out, char *err, size_t errlen);
void tls_config_free(tls_config *t);

#endif
