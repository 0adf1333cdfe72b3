/*
 * policy: the Lua 5.4 policy, compiled when the config loads, run per
 * request on a pool of sandboxed Lua states (lua_sandbox.h); one thread
 * uses a state at a time.
 *
 * A policy is a module that returns a table of optional hooks:
 *   self_check()       once per compiled generation, before it serves
 *   authorize(req)     every request (ping included), before resolve
 *   spec(req)          which image spec (specs.h) a request is made from
 *   resolve(req[, spec]) manifests, blobs, tags: where the image comes from
 *   rewrite(img, req)  an assembled image's last edit
 *   log(req, res)      after the response went out (errors only logged)
 * (docs/policy.md has the arguments and answers of each.)
 *
 * This unit loads the policy (reporting "FILE:LINE: why" before any
 * traffic), builds the sandboxed states (`require "regfacade"`, the
 * embedded library, cjson, data files), runs every hook under pcall with a
 * traceback and the per-call budget (policy.hook_time_ms,
 * policy.hook_instructions, policy.memory_bytes), and turns whatever goes
 * wrong into an OCI error for that request, a log line with the policy's
 * file and line, and a metric. A state that overran its budget is closed
 * and rebuilt.
 *
 * Generations: a policy object serves one compiled generation at a time.
 * policy_reload() (and, with policy.watch, a change of the policy file seen
 * at most once a second) compiles a new one, runs its self_check, and swaps
 * it in; calls in flight finish on the old one, whose states are closed
 * when released. A generation that fails to compile or check is rejected
 * and the old one keeps serving.
 */
#ifndef REGFACADE_POLICY_H
#define REGFACADE_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "regfacade/config.h"
#include "regfacade/layers.h"

typedef struct policy policy;

typedef struct {
    const char *name; /* lowercase */
    const char *value;
} policy_header;

#define POLICY_CREDENTIALS_MAX 64

/* What one request's hooks share, owned by the request: zero it when the
 * request starts, policy_state_clear() when it ends. */
typedef struct {
    json_value *ctx;                          /* req.ctx as the last hook left it; NULL: empty */
    char credentials[POLICY_CREDENTIALS_MAX]; /* the credential set authorize named; "" none */
} policy_state;

void policy_state_clear(policy_state *s);

typedef struct {
    const char *method;     /* "GET", "HEAD" */
    const char *kind;       /* "manifest", "blob", "tags", "ping" */
    const char *repository; /* as requested (after a /NAME/v2/ prefix became /v2/NAME/); NULL for ping */
    /* Where the request goes once resolve answered (its upstream, without a
     * credential set, and repository), for the hooks after it: req.target.
     * NULL before: req.target is then regfacade.mirror's mapping of the
     * name as asked (built when a hook reads it). */
    const char *target_upstream;
    const char *target_repository;
    const char *reference; /* tag or digest (the digest for blobs); NULL for tags and ping */
    const char *ns;        /* ?ns= value or NULL */
    const char *host;      /* Host header or NULL */
    const char *client_ip;
    const char *user; /* Basic credentials, or NULL */
    const char *password;
    const char *token;            /* Bearer token, or NULL */
    const policy_header *headers; /* without Authorization and Cookie */
    size_t n_headers;
    /* The image spec named by the spec hook (specs.h), or NULL: resolve's
     * second argument, and req.spec in every hook. Borrowed. */
    const json_value *spec;
    policy_state *state; /* NULL: each hook gets an empty ctx, and no credential set is kept */
} policy_request;

/* How a request ends when a hook refuses it or fails. The reply carries
 * Retry-After and WWW-Authenticate when they are set. */
typedef struct {
    int status;    /* HTTP status for the client */
    char code[32]; /* OCI error code */
    char message[1024];
    char challenge[512];  /* WWW-Authenticate value ("" none; a 401 always has one) */
    char retry_after[16]; /* Retry-After in seconds ("" none) */
    bool failed;          /* the policy failed (an error, a budget, a malformed answer), not a refusal it made */
} policy_error;

/* Fill e (printf-style message; no challenge, no Retry-After, not failed): the one
 * constructor every module that answers with a policy_error uses. */
void policy_error_set(policy_error *e, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

typedef struct {
    char upstream[128]; /* a configured upstream, or "NAME@SET" for one of its credential sets */
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
    /* `referrers`: descriptors the policy attaches to the referrers answer
     * of a digest (a JSON array of objects with mediaType, digest, size;
     * NULL when not given). Only the referrers endpoint uses them. */
    json_value *referrers;
} policy_resolution;

void policy_resolution_clear(policy_resolution *r);

/* Compile and check the policy named by c (or the embedded default): the
 * "policy" section's limits, the source, the hooks' types, self_check.
 * NULL with "FILE:LINE: why" in err. */
policy *policy_new(const config *c, char *err, size_t errlen);
/* Drop the owner's reference (states, generations and the policy go once
 * the log entries still running on it are done). */
void policy_free(policy *p);

/* Compile the policy file again as a new generation, run its self_check
 * and swap it in (unchanged text: nothing to do). 0 on success; -1 with
 * err (the running generation keeps serving). */
int policy_reload(policy *p, char *err, size_t errlen);

/* A sha256 hex of the running generation's source and the options: part
 * of every generated image's key, so a changed policy gives new images.
 * Valid until policy_free. */
const char *policy_fingerprint(const policy *p);

/* Every hook below that may refuse reads the refusal with one reader
 * (lua_deny.h): regfacade.deny(status, code, message, { retry_after =,
 * challenge = }), and the older forms of each hook, with the same checks;
 * a malformed refusal is the policy's error (500, logged).
 *
 * Run authorize. 0: allowed (req->state->credentials may be set); -1: e
 * filled: a refusal (401 with e->challenge, 403, 429 with e->retry_after,
 * ...) or a policy failure (500). Without an authorize hook every request
 * is allowed. */
int policy_authorize(policy *p, const policy_request *req, policy_error *e);

/* Run resolve. 0: out filled and validated (the upstream exists, the
 * repository and reference are valid); -1: e filled (a refusal by the
 * policy, or a policy failure as 500). Without a resolve hook, the request
 * maps to default_upstream unchanged. A credential set (authorize's, or
 * resolve's `credentials`) makes out->upstream "NAME@SET". */
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
 * 0 on success (or when there is no rewrite hook); -1 with e filled (the
 * hook's refusal, or a policy failure as 500). */
int policy_rewrite(policy *p, const policy_request *req, json_value **manifest, json_value **config,
                   const image_layer *stack, size_t n, policy_error *e);

/* The log hook, after the response: begin copies what the hook will see
 * (the request without password or token, and req->state's ctx) and
 * returns NULL when the policy has no log hook; end runs it (errors are
 * only logged) and frees the entry. start: when the request began
 * (CLOCK_MONOTONIC), for res.duration. */
typedef struct policy_log_entry policy_log_entry;
policy_log_entry *policy_log_begin(policy *p, const policy_request *req, const struct timespec *start);
void policy_log_end(policy_log_entry *e, unsigned status, uint64_t bytes, bool completed, const char *upstream);

#endif
