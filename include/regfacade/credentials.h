/*
 * credentials: the account an upstream client signs in with, handed out on
 * demand.
 *
 * A source is one of: nothing (anonymous); a user name and password (from
 * the config or a Docker config's "auths"); an identity token (an OAuth2
 * refresh token, Docker config "identitytoken", used only in the refresh
 * grant at the token realm, never sent as Basic); or a credential helper,
 * a program speaking the docker-credential-helpers protocol (`NAME get`,
 * the server URL on stdin, {"ServerURL","Username","Secret"} JSON on
 * stdout; a Username of "<token>" makes the Secret an identity token; a
 * non-zero exit printing "credentials not found in native keychain" means
 * anonymous).
 *
 * A helper runs without a shell, in its own process group, with a minimal
 * environment (this process's PATH, and HOME the home of the user it runs
 * as), its stdin the server URL,
 * within a time limit (then its group is killed) and with bounded output.
 * Its answer is kept for cache_seconds (helpers say nothing about a
 * lifetime); credentials_refused() drops it when the upstream refused it,
 * so the next credentials_get() asks again. Concurrent callers share one
 * run. Secrets never appear in messages: errors name the helper, the
 * server URL and what went wrong.
 *
 * Thread safety: a credentials object may be used from many threads.
 */
#ifndef REGFACADE_CREDENTIALS_H
#define REGFACADE_CREDENTIALS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CREDENTIALS_HELPER_OUTPUT_MAX (256 * 1024) /* bytes a helper may print */
#define CREDENTIALS_SECRET_MAX (128 * 1024)        /* longest password or token taken */
#define CREDENTIALS_USERNAME_MAX 1024
#define CREDENTIALS_DEFAULT_TIMEOUT_MS 10000L
#define CREDENTIALS_DEFAULT_CACHE_SECONDS 300L
#define CREDENTIALS_TOKEN_USERNAME "<token>" /* the user name that marks an identity token */

typedef enum {
    CREDENTIALS_NONE,           /* anonymous */
    CREDENTIALS_STATIC,         /* username + password */
    CREDENTIALS_IDENTITY_TOKEN, /* an OAuth2 refresh token */
    CREDENTIALS_HELPER,         /* a docker-credential-helpers program */
} credentials_kind;

typedef struct {
    credentials_kind kind;
    const char *username;   /* STATIC */
    const char *secret;     /* STATIC: the password; IDENTITY_TOKEN: the refresh token */
    const char *helper;     /* HELPER: absolute path of the program */
    const char *server_url; /* HELPER: what the helper is asked about (its stdin) */
    long timeout_ms;        /* HELPER: limit on one run; 0: CREDENTIALS_DEFAULT_TIMEOUT_MS */
    long cache_seconds;     /* HELPER: how long an answer is reused; 0: asked for every use */
} credentials_options;

typedef struct credentials credentials;

/* One answer, owned by the caller: free with credential_clear(). */
typedef struct {
    char *username;      /* NULL: anonymous */
    char *secret;        /* the password or the refresh token; NULL when anonymous */
    bool identity_token; /* secret is a refresh token: only for the token realm's refresh grant */
    uint64_t serial;     /* which answer of the source this is (credentials_refused) */
} credential;

/* NULL on bad options (err says which). Copies every string. */
credentials *credentials_new(const credentials_options *o, char *err, size_t errlen);
void credentials_free(credentials *c);

credentials_kind credentials_get_kind(const credentials *c);

/* A stable name of the account for keys and messages, never a secret:
 * "user NAME", "identity token", "credential helper PATH" or "anonymous". */
const char *credentials_account(const credentials *c);

/* STATIC: the user name; NULL for every other kind. */
const char *credentials_static_username(const credentials *c);

/* The credentials to use now. 0 with *out filled (out->username NULL:
 * anonymous, also when a helper has none for this server); -1 when a helper
 * failed, hung or printed something unusable (err names the helper and
 * says why; a log line says the same). */
int credentials_get(credentials *c, credential *out, char *err, size_t errlen) __attribute__((warn_unused_result));

/* The upstream refused `used`: forget it when it is still the kept answer.
 * True when asking again may give other credentials (a helper). */
bool credentials_refused(credentials *c, const credential *used);

/* Wipe and free what *cr holds; *cr becomes anonymous. */
void credential_clear(credential *cr);

/* ---- the pieces, for unit tests ---- */

/* Parse a helper's stdout after a zero exit into *out. 0 on success, -1
 * with err saying what is wrong (never quoting the output). */
int credentials_parse_helper_output(const char *out, size_t len, credential *cr, char *err, size_t errlen);

/* Run `helper get` once: 0 with *cr filled (anonymous when the helper has
 * no credentials for server_url), -1 with err. */
int credentials_run_helper(const char *helper, const char *server_url, long timeout_ms, credential *cr, char *err,
                           size_t errlen);

/* The absolute path of a helper: name "NAME" is "docker-credential-NAME" on
 * PATH (path_env, this process's PATH when NULL); a name with a '/' is a
 * path, relative ones against dir. The program must be an executable
 * regular file; it is not run. 0 with out filled, -1 with err. */
int credentials_find_helper(const char *name, const char *dir, const char *path_env, char *out, size_t outlen,
                            char *err, size_t errlen);

/* The server URL a helper is asked about for a registry host: Docker Hub's
 * "https://index.docker.io/v1/" for its hosts, else the host (with port),
 * as `docker login` stores them. */
void credentials_server_url(const char *host, char *out, size_t outlen);

#endif
