/*
 * specs: image specs from outside. An orchestrator tells regfacade what a
 * workspace image is made of (a base image, layers, env, labels), and the
 * policy turns that data into its resolve answer. Lua hooks stay free of
 * I/O: this unit fetches, stores and validates specs; the policy only says
 * which names use which provider (the `spec(req)` hook) and receives the
 * spec as a plain table (`resolve(req, spec)`, and `req.spec` in rewrite).
 *
 * Providers, named in config "specs.providers", each of one type:
 *   pulled  GET <url with {id}> from an HTTP(S) service (spec_pulled.h):
 *           TTL and size-bounded cache, one look-up per id at a time,
 *           retries, timeouts, TLS with an optional client certificate;
 *   pushed  PUT/GET/DELETE /specs/<id> on the admin listener (admin.h),
 *           kept under <cache.dir>/specs/ across restarts;
 *   fixed   a JSON file mapping ids to specs, reloaded when it changes.
 *
 * The spec format (docs/specs.md) is checked here, the same way for every
 * provider, before a spec is stored, cached or handed to the policy:
 *   { "base": "UPSTREAM/REPOSITORY[:TAG|@sha256:HEX]" | null,
 *     "platform": "linux/amd64" | "linux/arm64"      (only without base),
 *     "layers": [ "base" | "NAME" | {file} | {image, skip} | {blob, ...} ],
 *     "env": { "NAME": "value" | null | {"prepend": s} | {"append": s} },
 *     "labels": { "KEY": "value" | null },
 *     "annotations": { "KEY": "value" | null },
 *     ...free-form fields, passed through to the policy... }
 *
 * An image without base is built on an empty base ("scratch"): an OCI
 * manifest with no layers and a config with only os/architecture, an empty
 * rootfs and history, and "created" 1970-01-01T00:00:00Z. Its digest per
 * platform is fixed (specs_scratch_digest, and regfacade.specs.SCRATCH in
 * Lua); the core keeps it in the store.
 */
#ifndef REGFACADE_SPECS_H
#define REGFACADE_SPECS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "regfacade/config.h"
#include "regfacade/digest.h"
#include "regfacade/json.h"
#include "regfacade/policy.h"
#include "regfacade/generation.h"
#include "regfacade/store.h"

/* Limits (every one has a config key; see docs/specs.md). */
#define SPECS_DEFAULT_MAX_BYTES (64 * 1024) /* specs.max_bytes: one spec's JSON text */
#define SPECS_DEFAULT_MAX_DEPTH 16          /* specs.max_depth: JSON nesting */
#define SPECS_HARD_MAX_DEPTH 64             /* what the Lua conversion takes */
#define SPECS_ID_MAX 128                    /* ids: [A-Za-z0-9][A-Za-z0-9._-]{0,127} */
#define SPECS_MAX_LAYERS 128                /* entries of a spec's "layers" */

typedef struct specs specs;

typedef enum {
    SPECS_FOUND = 0,   /* *out set */
    SPECS_UNKNOWN,     /* no spec with this id: 404 */
    SPECS_UNAVAILABLE, /* the provider could not answer (down, timeout, refused): 503, asked again next time */
    SPECS_BAD_ANSWER,  /* the provider answered something that is not a valid spec: 502 */
} specs_result;

/* True for a valid spec id: 1..SPECS_ID_MAX characters of [A-Za-z0-9._-],
 * starting with a letter or digit (so no '/', no "..", no '%'). */
bool specs_valid_id(const char *id);

/* Parse the "specs" and "admin" sections of c (reads the admin token file,
 * loads fixed files). *out is NULL when both are absent. 0, or -1 with
 * "FILE: specs.KEY: why" in err. Call before dropping privileges: secrets
 * are read here. */
int specs_new(const config *c, specs **out, char *err, size_t errlen);
/* After the store is open: load the pushed specs kept in <cache.dir>/specs/
 * (invalid ones are logged and left out), store the scratch images, start
 * the admin listener (ge: the server's generations, for its cache
 * endpoints). NULL sp is fine. 0, or -1 with err. */
int specs_start(specs *sp, store *st, const generation_env *ge, char *err, size_t errlen);
/* Stop the admin listener, free everything. NULL is fine. */
void specs_free(specs *sp);

/* A reload's new configuration: specs are checked against its upstreams
 * and named layers from now on. It must live until the next
 * specs_set_config has returned (no check uses the old one after that) or
 * specs_free; the "specs" and "admin" sections themselves cannot change on
 * reload. */
void specs_set_config(specs *sp, const config *c);

/* Check the sections without starting anything (regfacade check). */
int specs_check_config(const config *c, char *err, size_t errlen);

/* Is provider configured? */
bool specs_has_provider(const specs *sp, const char *provider);

/* Look a spec up. SPECS_FOUND: *out is a new tree the caller frees. Else
 * why says what happened, naming the provider and the id. */
specs_result specs_get(specs *sp, const char *provider, const char *id, json_value **out, char *why, size_t whylen);

/* Check a spec tree against the format and the configuration (upstreams,
 * named layers, specs.file_roots). 0, or -1 with "KEY: why" in err. */
int specs_validate(const specs *sp, const json_value *spec, char *err, size_t errlen);

/* Parse and check spec text (size, depth, format). A new tree, or NULL
 * with err. */
json_value *specs_parse(const specs *sp, const char *text, size_t len, char *err, size_t errlen);

/* ---- the pushed provider, for the admin API ---- */

typedef enum {
    SPECS_PUSH_CREATED,     /* 201 */
    SPECS_PUSH_REPLACED,    /* 200 */
    SPECS_PUSH_INVALID,     /* 400: msg says why; nothing stored */
    SPECS_PUSH_TOO_MANY,    /* 507: the provider's max_specs reached */
    SPECS_PUSH_FAILED,      /* 500: disk error; nothing changed */
    SPECS_PUSH_NO_PROVIDER, /* 404: no pushed provider configured */
    SPECS_PUSH_UNAVAILABLE, /* 503: a cluster's Redis is unreachable; nothing changed */
} specs_push_result;

/* Validate and store a pushed spec (in a cluster: Redis first, so every
 * replica serves it at once; then the file, then memory). digest gets the
 * sha256 of the stored text. */
specs_push_result specs_push(specs *sp, const char *id, const char *text, size_t len, char digest[DIGEST_STRING_LEN],
                             char *msg, size_t msglen);
/* A pushed spec's stored text (malloc'd, caller frees), or NULL when
 * unknown. In a cluster, Redis answers (and this replica's copy follows
 * it); while Redis is unreachable, this replica's copy. */
char *specs_pushed_text(specs *sp, const char *id, size_t *len);
/* Remove a pushed spec (in a cluster, from Redis first): 1 removed, 0
 * unknown, -1 disk error (msg), -2 the cluster's Redis is unreachable
 * (msg; nothing changed). */
int specs_pushed_delete(specs *sp, const char *id, char *msg, size_t msglen);
/* {"ids":[...]} of the pushed specs, sorted (malloc'd). */
char *specs_pushed_list(specs *sp, size_t *len);
/* The spec body limit (specs.max_bytes), for the admin API's uploads. */
size_t specs_max_bytes(const specs *sp);

/* ---- request glue (server.c) ---- */

/* What run_resolve does with specs: run the policy's spec hook; when it
 * names a spec, look it up and set req->spec (a tree stored in *spec_out,
 * which the caller frees when the request is done, after the rewrite
 * hook); then policy_resolve. The resolution's fingerprint gets the spec's
 * digest (the rewrite hook may use the spec, so the generated image
 * depends on it), and a scratch base is put back into the store if it was
 * evicted. 0, or -1 with e set: an unknown id is 404 (MANIFEST_UNKNOWN,
 * BLOB_UNKNOWN or NAME_UNKNOWN by req->kind), an unavailable provider 503
 * UNAVAILABLE, a bad answer 502. sp may be NULL (then a spec hook naming a
 * provider is a 500). */
int specs_resolve(specs *sp, policy *pol, policy_request *req, policy_resolution *out, json_value **spec_out,
                  policy_error *e);

/* The scratch image's manifest digest for "linux/amd64" or "linux/arm64";
 * NULL for any other platform. */
const char *specs_scratch_digest(const char *platform);
/* Its manifest and config text (static), for tests. */
int specs_scratch_image(const char *platform, const char **manifest, const char **config);

#endif
