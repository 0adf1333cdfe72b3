/*
 * policy: the Lua 5.4 policy, compiled when the config loads, run per
 * request on a pool of Lua states (one thread uses a state at a time).
 *
 * A policy is a module that returns a table of optional hooks. This unit
 * loads it (reporting file:line on a syntax or type error before any
 * traffic), provides `require "regfacade"` (config, log) and the embedded
 * library (regfacade.mirror, regfacade.image, ...), and runs hooks under
 * pcall with a traceback. A hook error fails that request closed.
 */
#ifndef REGFACADE_POLICY_H
#define REGFACADE_POLICY_H

#include <stdbool.h>
#include <stddef.h>

#include "regfacade/config.h"
#include "regfacade/layers.h"

typedef struct policy policy;

typedef struct {
    const char *name;  /* lowercase */
    const char *value;
} policy_header;

typedef struct {
    const char *method;     /* "GET", "HEAD" */
    const char *kind;       /* "manifest", "blob", "tags", "ping" */
    const char *repository; /* as requested (after a /NAME/v2/ prefix became /v2/NAME/) */
    const char *reference;  /* tag or digest; NULL for blobs' digest is in reference too; NULL for tags/ping */
    const char *ns;         /* ?ns= value or NULL */
    const char *host;       /* Host header or NULL */
    const char *client_ip;
    const char *user;       /* Basic credentials, or NULL */
    const char *password;
    const char *token;      /* Bearer token, or NULL */
    const policy_header *headers;
    size_t n_headers;
    /* The image spec named by the spec hook (specs.h), or NULL: resolve's
     * second argument, and req.spec in every hook. Borrowed. */
    const json_value *spec;
} policy_request;

typedef struct {
    int status;        /* HTTP status for the client */
    char code[32];     /* OCI error code */
    char message[1024];
} policy_error;

typedef struct {
    char upstream[128];
    char repository[256];
    char reference[192];
    /* The layer stack, when resolve returned `layers` (else has_layers is
     * false and the upstream image is served as it is). */
    bool has_layers;
    layer_spec *layers;
    size_t n_layers;
    /* `platforms`: for an index, the platforms to keep (NULL: all). */
    char **platforms;
    size_t n_platforms;
    /* Canonical text of the decision (layers and platforms), for keys. */
    char *fingerprint;
} policy_resolution;

void policy_resolution_clear(policy_resolution *r);

/* Compile and check the policy named by c (or the embedded default).
 * NULL with "FILE:LINE: why" in err. */
policy *policy_new(const config *c, char *err, size_t errlen);
void policy_free(policy *p);

/* A sha256 hex of the policy's source and options: part of every generated
 * image's key, so a changed policy gives new images. */
const char *policy_fingerprint(const policy *p);

/* Run resolve. 0: out filled and validated (the upstream exists, the
 * repository and reference are valid); -1: e filled (a refusal by the
 * policy, or a policy failure as 500). Without a resolve hook, the request
 * maps to default_upstream unchanged. */
int policy_resolve(policy *p, const policy_request *req, policy_resolution *out, policy_error *e);

/* Run the spec hook: which spec (provider and id) a request's image is
 * made from. 1: provider and id filled; 0: no spec (no spec hook, or it
 * returned nil); -1: e filled (the policy's refusal, `nil, err`, or a
 * policy failure as 500). The core then looks the spec up (specs.h) and
 * passes it to policy_resolve in req->spec. */
int policy_spec_lookup(policy *p, const policy_request *req, char *provider, size_t plen, char *id, size_t idlen,
                       policy_error *e);

/* True when the policy has a rewrite hook. */
bool policy_has_rewrite(policy *p);

/* Run the rewrite hook on an assembled image: *manifest and *config are
 * replaced by the hook's result. stack describes the layers (img.layers).
 * 0 on success (or when there is no rewrite hook); -1 with e filled. */
int policy_rewrite(policy *p, const policy_request *req, json_value **manifest, json_value **config,
                   const image_layer *stack, size_t n, policy_error *e);

#endif
