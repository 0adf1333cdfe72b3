/*
 * generation: a configuration generation as the modules beside the
 * registry listener use it (blobserve, the admin API's cache warm): the
 * server's current one, taken when a piece of work starts and given back
 * when it ends, so a SIGHUP reload (upstreams, credentials, policy) reaches
 * them as it reaches the registry listener.
 */
#ifndef REGFACADE_GENERATION_H
#define REGFACADE_GENERATION_H

#include "regfacade/config.h"
#include "regfacade/fetch.h"
#include "regfacade/layers.h"
#include "regfacade/policy.h"
#include "regfacade/store.h"
#include "regfacade/upstream.h"

typedef struct {
    const config *cfg;
    policy *pol;
    upstream **ups;          /* parallel to cfg->upstreams */
    const layer_env *layers; /* the generation's layer catalog, for resolve's added layers */
    void *handle;            /* the server's, for release */
} generation;

/* What such a module borrows from the registry server (all outlive it). */
typedef struct {
    const config *cfg; /* the configuration started with */
    store *st;
    fetcher *fetches;
    /* Take the current generation (never fails) and give it back. */
    void (*acquire)(void *ud, generation *out);
    void (*release)(void *ud, generation *g);
    void *ud;
} generation_env;

#endif
