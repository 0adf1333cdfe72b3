/*
 * manifest: getting a manifest by tag or digest from the cache or an
 * upstream, verified and stored content-addressed.
 *
 * A tag is resolved with HEAD where the upstream allows it (Docker Hub does
 * not count a HEAD as a pull), then the manifest is fetched by digest only
 * when it is not cached. Tag resolutions are cached for the configured TTL;
 * when the upstream fails, a known resolution is served stale with a
 * warning. Every manifest is checked: size cap, JSON, a supported media
 * type (schema1 is refused), and its digest.
 */
#ifndef REGFACADE_MANIFEST_H
#define REGFACADE_MANIFEST_H

#include <stdbool.h>
#include <stddef.h>

#include "regfacade/config.h"
#include "regfacade/fetch.h"
#include "regfacade/store.h"
#include "regfacade/upstream.h"

#define MT_OCI_MANIFEST "application/vnd.oci.image.manifest.v1+json"
#define MT_OCI_INDEX "application/vnd.oci.image.index.v1+json"
#define MT_DOCKER_MANIFEST "application/vnd.docker.distribution.manifest.v2+json"
#define MT_DOCKER_LIST "application/vnd.docker.distribution.manifest.list.v2+json"
#define MT_DOCKER_SCHEMA1 "application/vnd.docker.distribution.manifest.v1+json"
#define MT_DOCKER_SCHEMA1_SIGNED "application/vnd.docker.distribution.manifest.v1+prettyjws"

/* The Accept header regfacade sends upstream: every type it serves. */
#define MANIFEST_ACCEPT_ALL MT_OCI_INDEX ", " MT_OCI_MANIFEST ", " MT_DOCKER_LIST ", " MT_DOCKER_MANIFEST

typedef struct {
    char *data; /* malloc'd bytes, exactly as the upstream served them */
    size_t len;
    char digest[80];
    char media_type[128];
    char warning[512];  /* non-empty when served stale: the Warning header value */
    const char *source; /* where the bytes came from, for metrics: "cache", "upstream" or "generated" */
} manifest;

typedef struct {
    store *st;
    const config *cfg;
    /* The scope of images generated for the request's name (store.h), or
     * NULL: manifests linked there are served too. */
    const store_scope *generated;
} manifest_env;

/* Link manifest bytes (digest) and every digest they reference (config,
 * layers, an index's manifests) to sc, the manifest last. 0, or -1 with
 * err (not JSON, or the store failed). */
int manifest_link(store *st, const store_scope *sc, const char *digest, const char *data, size_t len, char *err,
                  size_t errlen);

/* Get (upstream u, repository, reference). 0 with *out filled (free with
 * manifest_clear); -1 with e filled.
 *
 * Isolated: a digest is answered from the cache only when it is linked to
 * (u, repository) or to env->generated (store.h); a manifest cached for
 * another scope is served after the upstream confirms it with a HEAD (then
 * linked), else the upstream's answer (404 MANIFEST_UNKNOWN, 403 DENIED) is
 * returned. A manifest fetched or confirmed from (u, repository) is linked
 * there with everything it references.
 *
 * Coalesced: while one call asks the upstream for a (u, repository,
 * reference), the same calls from other threads wait for it and get a copy
 * of its result (the same bytes, or the same error), so N clients of a
 * cold tag cause one HEAD and one GET upstream. Answers from the cache are
 * not coalesced. Upstream requests are retried per upstream_retry_delay().
 * When the upstream fails (5xx, transport errors) or rate-limits (429) a
 * tag resolution, the last known one is served with a Warning: 299 header
 * if it was confirmed at most cache.stale_max_seconds ago (0: never); with
 * such a fallback at hand, failed requests are not retried. */
int manifest_get(const manifest_env *env, upstream *u, const char *repository, const char *reference, manifest *out,
                 fetch_error *e);

typedef struct {
    unsigned long started;   /* upstream resolutions run */
    unsigned long coalesced; /* calls that waited for one already running */
} manifest_flight_stats;
void manifest_get_flight_stats(manifest_flight_stats *out);
void manifest_clear(manifest *m);

/* Media type of manifest bytes: the mediaType field, else inferred from the
 * shape (manifests -> OCI index, else OCI manifest). 0 on success; -1 with
 * e filled (invalid JSON: 502 MANIFEST_INVALID; schema1: 415 UNSUPPORTED). */
int manifest_media_type(const char *data, size_t len, const char *content_type, char *out, size_t outlen,
                        fetch_error *e);

/* True when a client's Accept header admits media type mt. NULL or empty
 * Accept, and "*\/\*", admit everything. */
bool manifest_accepts(const char *accept, const char *mt);
/* True when the client's Accept names only schema1 types. */
bool manifest_accepts_only_schema1(const char *accept);

#endif
