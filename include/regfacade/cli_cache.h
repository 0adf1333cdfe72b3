/*
 * cli_cache: the cache commands of the command line (regfacade cache
 * ls|du|rm|gc|warm, tags refresh). Each works offline on a stopped
 * server's cache folder, under the folder's lock (store_open), or, when a
 * server holds that lock, through that server's admin API (admin.listen,
 * the bearer token of admin.token_file): the same operations
 * (cachectl.h), the same JSON, printed as a table or as it is (--json).
 * Offline, cache warm builds the upstream clients and the policy as serve
 * would (server_offline) and pulls without listening.
 */
#ifndef REGFACADE_CLI_CACHE_H
#define REGFACADE_CLI_CACHE_H

#include <stdbool.h>
#include <stddef.h>

#include "regfacade/config.h"

typedef struct {
    const char *cmd;         /* "cache ls", "cache du", "cache rm", "cache gc", "cache warm", "tags refresh" */
    const char *const *args; /* REF... */
    size_t n_args;
    const char *const *platforms; /* cache warm --platform */
    size_t n_platforms;
    bool json; /* --json: the JSON as it is */
} cli_cache_request;

/* Run it; the process exit status (0 done, 1 failed or refused, 2 usage). */
int cli_cache_run(const config *c, const cli_cache_request *rq);

#endif
