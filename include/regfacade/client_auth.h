/*
 * client_auth: the credentials a client sends in its Authorization header,
 * parsed for the policy's authorize hook (req.client.user/password/token).
 *
 *   Basic <base64(user ":" password)>   RFC 7617: user without ':', both
 *                                        without control characters
 *   Bearer <token68>                     RFC 6750
 *
 * The scheme is case-insensitive. Anything else (another scheme, bad
 * base64, control characters, oversize values) is CLIENT_AUTH_INVALID and
 * carries no credentials: the request then counts as anonymous. Pure: no
 * I/O, no allocation. Credentials are secrets: never log them, and wipe
 * them with client_credentials_wipe() when the request is done.
 */
#ifndef REGFACADE_CLIENT_AUTH_H
#define REGFACADE_CLIENT_AUTH_H

#include <stddef.h>

#define CLIENT_AUTH_USER_MAX 256
#define CLIENT_AUTH_PASSWORD_MAX 1024
#define CLIENT_AUTH_TOKEN_MAX 8192

typedef enum {
    CLIENT_AUTH_NONE,    /* no header (or empty) */
    CLIENT_AUTH_BASIC,   /* user and password set */
    CLIENT_AUTH_BEARER,  /* token set */
    CLIENT_AUTH_INVALID, /* present but unusable; nothing set */
} client_auth_kind;

typedef struct {
    client_auth_kind kind;
    char user[CLIENT_AUTH_USER_MAX];         /* "" unless BASIC */
    char password[CLIENT_AUTH_PASSWORD_MAX]; /* "" unless BASIC */
    char token[CLIENT_AUTH_TOKEN_MAX];       /* "" unless BEARER */
} client_credentials;

/* Parse header (NULL is fine) into out; returns out->kind. */
client_auth_kind client_auth_parse(const char *header, client_credentials *out);
/* Zero the secrets (not optimized away). */
void client_credentials_wipe(client_credentials *c);

#endif
