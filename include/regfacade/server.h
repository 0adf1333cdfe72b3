/*
 * server: the OCI distribution pull API over libmicrohttpd.
 *
 * One thread per connection (a handler may block on an upstream fetch or a
 * spool being written without holding up anyone else). Routing, request
 * validation, OCI error bodies and response headers live here; what to
 * serve comes from the policy (resolve), manifest (manifests and tags) and
 * fetch/store (blobs).
 */
#ifndef REGFACADE_SERVER_H
#define REGFACADE_SERVER_H

#include "regfacade/config.h"
#include "regfacade/generation.h"

typedef struct server server;

/* Validate everything serve would build from c, without binding,
 * dropping privileges or opening the cache: the module-owned sections
 * (metrics, tls, blobserve, specs, admin), the user, and a configuration
 * generation (upstream clients, policy, named layers). `regfacade check`
 * runs this and nothing else; server_start runs it first, so the two agree.
 * 0, or -1 with "FILE: KEY: why" in err. */
int server_check(const config *c, char *err, size_t errlen);

/* Build everything the config names (store, upstream clients, policy) and
 * start listening. NULL with err on failure (server_check's first). */
server *server_start(const config *c, char *err, size_t errlen);
/* What cache warm needs on a stopped server's cache, without listening:
 * the upstream clients, the policy and a fetcher over st, which it takes
 * over (server_stop closes it, also on failure); ge filled for cachectl.
 * NULL with err on failure. */
server *server_offline(const config *c, store *st, generation_env *ge, char *err, size_t errlen);
/* Replace the configuration (upstreams, credentials, policy, layers, the
 * per-request limits) without dropping a connection: requests in flight
 * finish on the old one. Takes ownership of c on success; on failure (a key
 * applied only at start changed: err names it; or the new policy does not
 * load) nothing changes and err says why. */
int server_reload(server *s, config *c, char *err, size_t errlen);

/* Stop accepting connections and wait up to seconds for the open ones to
 * finish (idle keep-alive connections count until the client closes them
 * or client_timeout_seconds passes). Returns how many were left. */
int server_drain(server *s, int seconds);

/* Stop accepting, let requests in flight finish, free everything. */
void server_stop(server *s);

#endif
