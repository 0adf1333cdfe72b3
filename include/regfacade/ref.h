/*
 * ref: parsers for what arrives on the wire, all pure functions with no I/O:
 * repository names, tags and digests (OCI distribution-spec grammar), the
 * Range header (RFC 9110 single ranges), WWW-Authenticate challenges and
 * Docker config.json credentials.
 */
#ifndef REGFACADE_REF_H
#define REGFACADE_REF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define REF_NAME_MAX 255 /* host plus name limit of clients; we cap the name */
#define REF_TAG_MAX 128
#define REF_DIGEST_MAX 160

/* name: [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*
 * at most REF_NAME_MAX bytes. */
bool ref_valid_name(const char *name);
/* tag: [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127} */
bool ref_valid_tag(const char *tag);
/* digest grammar: algorithm ":" encoded, where
 * algorithm: [a-z0-9]+([+._-][a-z0-9]+)*, encoded: [a-zA-Z0-9=_-]+ ;
 * sha256 must be 64 lowercase hex and sha512 128 lowercase hex. */
bool ref_valid_digest(const char *digest);
/* true for "sha256:" + 64 lowercase hex (the only algorithm we fetch). */
bool ref_is_sha256_digest(const char *digest);

/* Range header. Only one range of the "bytes" unit is supported. */
typedef enum {
    RANGE_NONE,    /* no header (or empty) */
    RANGE_OK,      /* spec holds a single range */
    RANGE_INVALID, /* syntax error, unknown unit, or several ranges */
} range_parse_result;

typedef struct {
    enum { RANGE_FROM_TO, RANGE_FROM, RANGE_SUFFIX } kind;
    uint64_t first; /* FROM_TO, FROM: first byte; SUFFIX: suffix length */
    uint64_t last;  /* FROM_TO: last byte (inclusive) */
} range_spec;

range_parse_result range_parse(const char *header, range_spec *spec);

/* Resolve a parsed range against the entity size: on success returns true and
 * sets [*start, *end] (inclusive, clipped to size-1). Returns false when the
 * range is unsatisfiable (first >= size, suffix of 0, FROM_TO with last <
 * first, or size 0) and the answer must be 416. */
bool range_resolve(const range_spec *spec, uint64_t size, uint64_t *start, uint64_t *end);

/* WWW-Authenticate: scheme and auth-params (quoted or token values). Only
 * the first challenge is parsed. Unknown params are ignored. */
typedef struct {
    char scheme[16]; /* "Bearer", "Basic" (as sent; compare case-insensitively) */
    char realm[1024];
    char service[256];
    char scope[1024];
    char error[64];
} www_authenticate;

/* 0 on success, -1 on a malformed header (err says why). */
int www_authenticate_parse(const char *header, www_authenticate *out, char *err, size_t errlen);

/* Docker config.json credentials for a registry host.
 * Looks in "auths": keys may be a bare host ("ghcr.io"), host:port, or a URL
 * ("https://index.docker.io/v1/"); docker.io, index.docker.io and
 * registry-1.docker.io count as one host. An entry's "auth" is base64 of
 * "user:password"; "username"/"password" fields are used when "auth" is
 * absent; a non-empty "identitytoken" wins over both and is returned as the
 * password with the user "<token>" (an OAuth2 refresh token: the caller
 * must use it only in the token realm's refresh grant). Returns 1 found, 0
 * not found, -1 malformed (err says what and where). */
int docker_config_lookup(const char *json_text, size_t len, const char *host, char *user, size_t user_len, char *pass,
                         size_t pass_len, char *err, size_t errlen);

/* The credential helper a Docker config names for a registry host, as the
 * docker CLI picks it: "credHelpers" (keys matched as for "auths") first,
 * then "credsStore"; an empty name means none (the file's auths). helper
 * gets the NAME of docker-credential-NAME. Returns 1 found, 0 none, -1
 * malformed (err says what and where). */
int docker_config_helper(const char *json_text, size_t len, const char *host, char *helper, size_t helper_len,
                         char *err, size_t errlen);

/* Normalize a registry host for comparisons: lowercase, strip scheme and
 * path, and map docker.io/index.docker.io/registry-1.docker.io to
 * "docker.io". out must hold at least 256 bytes. */
void registry_host_normalize(const char *in, char *out, size_t outlen);

/* Base64 (standard alphabet, padding optional on decode). Return output
 * length, or -1 on invalid input / too small buffer. Output NUL-terminated. */
long base64_decode(const char *in, size_t inlen, char *out, size_t outlen);
long base64_encode(const unsigned char *in, size_t inlen, char *out, size_t outlen);

#endif
