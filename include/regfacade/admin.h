/*
 * admin: the admin API, on its own listener, for orchestrators.
 *
 *   PUT    /specs/<id>   store a spec (body: the spec JSON) -> 201 created, 200 replaced
 *   GET    /specs/<id>   the stored spec                    -> 200, 404
 *   DELETE /specs/<id>   forget it                          -> 204, 404
 *   GET    /specs        {"ids":[...]}                      -> 200
 *   POST   /cache/verify hash every cached blob again, quarantining wrong ones
 *                        -> 200 {"checked","bytes","failed":[{"digest","reason","quarantined"}]}
 *   GET    /cache        what is cached: images (tag resolutions) and blobs (cachectl_list)
 *   GET    /cache/du     how much: blobs, bytes, cap, records, tmp/, quarantine/ (cachectl_usage)
 *   POST   /cache/rm     {"ref": REF|DIGEST} remove an image, never a blob in use
 *                        -> 200, 404 nothing cached, 409 something in use stayed (cachectl_remove)
 *   POST   /cache/gc     tmp/ leftovers (older than an hour), records of uncached images, strays
 *   POST   /cache/warm   {"refs": [REF...], "platforms": ["linux/amd64"...]} pull into the cache
 *                        -> 200 application/x-ndjson, a progress line per blob, then {"done":true,...}
 *   POST   /tags/refresh {"ref": REF} forget the tag's resolution: the next pull asks the upstream
 * REFs are named as clients name them and go through the policy's resolve.
 *
 * Every request needs "Authorization: Bearer <token>", the token being the
 * content of admin.token_file (read once at start, surrounding whitespace
 * trimmed, at least 16 characters); a missing or wrong token is 401. Bodies
 * larger than specs.max_bytes are refused with 413 as soon as that is
 * known (Content-Length, or the bytes received so far); invalid JSON, JSON
 * nested deeper than specs.max_depth, a spec that does not pass
 * specs_validate, or an id that is not [A-Za-z0-9][A-Za-z0-9._-]{0,127}
 * are 400. Errors are {"errors":[{"code","message","detail"}]} with codes
 * UNAUTHORIZED, ID_INVALID, SPEC_INVALID, SPEC_UNKNOWN, TOO_LARGE,
 * TOO_MANY_SPECS, UNSUPPORTED, UNKNOWN.
 *
 * Config section (config.c keeps it raw in config->admin):
 *   "admin": { "listen": "127.0.0.1:5090", "token_file": "/run/secrets/regfacade-admin" }
 * Plain HTTP: bind it to loopback or a private address.
 */
#ifndef REGFACADE_ADMIN_H
#define REGFACADE_ADMIN_H

#include <stddef.h>

#include "regfacade/config.h"
#include "regfacade/generation.h"
#include "regfacade/store.h"

typedef struct specs specs;

typedef struct {
    char *listen_host; /* IPv4 literal */
    int listen_port;
    char *token; /* never logged */
    size_t token_len;
} admin_config;

/* Validate c->admin. 0 with *out NULL when absent; 0 with *out set (free
 * with admin_config_free); -1 with "FILE: admin.KEY: why" in err. Reads
 * the token file. */
int admin_config_parse(const config *c, admin_config **out, char *err, size_t errlen);
void admin_config_free(admin_config *ac);

typedef struct admin_server admin_server;

/* Start the listener. Takes ownership of ac (also on failure); sp and st
 * must outlive the server. NULL with err on failure. */
admin_server *admin_start(const config *c, admin_config *ac, specs *sp, store *st, const generation_env *ge, char *err,
                          size_t errlen);
/* Stop accepting, wait for requests in flight, free. NULL is fine. */
void admin_stop(admin_server *a);

#endif
