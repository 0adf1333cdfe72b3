/*
 * generate: the images regfacade assembles. Given the policy's decision and
 * the upstream (base) manifest, build the new image for every platform
 * (image_assemble, then the policy's rewrite hook, then image_finish),
 * store config, manifests and index content-addressed, and remember the
 * decision key -> digest, so that HEAD, GET by tag and GET by digest agree
 * and a restart serves the same digest. Deterministic: the same base, the
 * same decision and the same policy give byte-identical output.
 */
#ifndef REGFACADE_GENERATE_H
#define REGFACADE_GENERATE_H

#include <stdbool.h>

#include "regfacade/layers.h"
#include "regfacade/manifest.h"
#include "regfacade/policy.h"

typedef struct {
    const config *cfg;
    store *st;
    fetcher *fetches;
    policy *pol;
    layer_env layers;
} generate_env;

/* The link scope (store.h) of images generated for name (the repository
 * as the client asked for it) from (u, repository): what generate_image
 * links an image's parts to, and what a request under that name may be
 * served from besides the upstream repository itself. */
void generate_scope(store_scope *out, const upstream *u, const char *repository, const char *name);

/* Does this decision change the upstream image at all? */
bool generate_needed(const generate_env *env, const policy_resolution *res);

/* Build (or find) the image for res on top of base (fetched from u,
 * res->repository). 0 with *out filled (free with manifest_clear); -1 with
 * e filled: nothing half-built is remembered. */
int generate_image(const generate_env *env, const policy_request *req, const policy_resolution *res, upstream *u,
                   const manifest *base, manifest *out, fetch_error *e);

#endif
