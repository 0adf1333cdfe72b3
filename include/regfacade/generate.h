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
/* "os/arch[/variant]" of an image config (linux/amd64 where it says none),
 * the platform an added layer stack is resolved for. */
void generate_platform_of_config(const json_value *cfg, char *out, size_t outlen);
/* The same of an index entry's platform ("unknown" for what it omits). */
void generate_platform_of_entry(const json_value *entry, char *out, size_t outlen);
bool generate_needed(const generate_env *env, const policy_resolution *res);

/* Build (or find) the image for res on top of base (fetched from u,
 * res->repository). 0 with *out filled (free with manifest_clear); -1 with
 * e filled: nothing half-built is remembered. */
int generate_image(const generate_env *env, const policy_request *req, const policy_resolution *res, upstream *u,
                   const manifest *base, manifest *out, fetch_error *e);

/* One image's assembly, the part that depends on nothing but its inputs:
 * image_assemble on base (its bytes base_bytes) and its config cfg with the
 * resolved stack, the policy's rewrite hook, then image_finish; an image
 * left as it was keeps the upstream's own bytes (*unchanged, no config
 * written); what names the image in messages ("REPO for PLATFORM"). 0 with the malloc'd manifest and config bytes and their
 * digests; -1 with e (the policy's refusal as it gave it; *failed when it
 * is not a refusal but a failure: the hook's error, a bad image). generate_image
 * runs it for every image it builds, and the busted module regfacade.policy
 * for specs, so both give the same digests. */
int generate_assemble(policy *pol, const policy_request *req, const char *what, const json_value *base,
                      const char *base_bytes, size_t base_len, const json_value *cfg, const image_layer *stack,
                      size_t n, char **manifest, size_t *manifest_len, char manifest_digest[80], char **config,
                      size_t *config_len, char config_digest[80], bool *unchanged, bool *failed, fetch_error *e);

#endif
