/*
 * cluster: the state replicas share through Redis (docs/cluster.md).
 *
 * With a "cluster" section, every replica keeps in Redis what the others
 * must agree on: tag resolutions (with the tag TTL, as a Redis PX, so that
 * no wall clocks are compared across nodes), the records of generated
 * images (digest -> the name, tag and base they were made for, so that a
 * replica that never generated a digest generates it again, byte-identical)
 * and pushed image specs. Keys are "<namespace>:v1:..."; values are small
 * (no blob bytes ever).
 *
 * Degraded, never wrong: every call is bounded by cluster.timeout_ms (a
 * pooled connection is waited for at most that long, and a command's reply
 * too). When Redis does not answer, a circuit breaker opens: calls return
 * CLUSTER_DOWN at once without touching the network, the caller acts as a
 * lone replica (its cache and the upstreams), one log line says so, and a
 * background thread probes Redis every cluster.retry_ms and closes the
 * breaker (one more log line) when it answers again.
 * Thread-safe. Without the section, no cluster exists (NULL) and every
 * call returns CLUSTER_OFF.
 */
#ifndef REGFACADE_CLUSTER_H
#define REGFACADE_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>

#include "regfacade/config.h"

typedef struct cluster cluster;

/* What a call found. Below CLUSTER_MISS: Redis was not asked (or did not
 * answer); act alone. */
typedef enum {
    CLUSTER_OFF = 0, /* no cluster configured */
    CLUSTER_DOWN,    /* configured, Redis unreachable, slow or busy: degraded */
    CLUSTER_MISS,    /* Redis answered: no such record (a write: not written) */
    CLUSTER_HIT,     /* Redis answered: found (a write: done) */
} cluster_result;

/* Check the "cluster" section of c without connecting (regfacade check).
 * 0, or -1 with "FILE: cluster.KEY: why" in err. */
int cluster_check_config(const config *c, char *err, size_t errlen);

/* Parse the section and start the background connection keeper (the first
 * connection is tried at once; Redis down at start is degraded, not an
 * error). *out is NULL without the section. 0, or -1 with err. */
int cluster_start(const config *c, cluster **out, char *err, size_t errlen);
/* Stop the keeper, close every connection, free. NULL is fine. Call after
 * every thread that uses cl has stopped. */
void cluster_stop(cluster *cl);

/* True while Redis answers (the breaker is closed). */
bool cluster_up(cluster *cl);
/* A sentence for /readyz when degraded ("" and false otherwise). */
bool cluster_degraded_detail(cluster *cl, char *out, size_t outlen);

/* ---- tag resolutions: (upstream, repository, tag) -> digest, media type ---- */

/* HIT: digest and media type filled, *left_ms the record's remaining TTL. */
cluster_result cluster_tag_get(cluster *cl, const char *upstream, const char *repository, const char *tag, char *digest,
                               size_t dlen, char *media_type, size_t mtlen, long *left_ms);
/* Publish a resolution this replica just made, unless another replica's is
 * there (SET NX PX ttl_ms). HIT: digest and media_type now hold the
 * cluster's resolution (this one, or the other replica's, which the caller
 * serves instead) and *left_ms its remaining TTL. */
cluster_result cluster_tag_claim(cluster *cl, const char *upstream, const char *repository, const char *tag,
                                 long ttl_ms, char *digest, size_t dlen, char *media_type, size_t mtlen, long *left_ms);

/* Forget a resolution (tags refresh): HIT deleted, MISS was not there. */
cluster_result cluster_tag_forget(cluster *cl, const char *upstream, const char *repository, const char *tag);

/* ---- generated images: digest -> (repository -> tag, base digest) ---- */

/* Remember that digest was generated for repository:tag on the base
 * manifest base_digest (kept cluster.record_ttl_seconds after the last
 * generation). */
cluster_result cluster_made_add(cluster *cl, const char *digest, const char *repository, const char *tag,
                                const char *base_digest);
/* HIT: tag and base filled. */
cluster_result cluster_made_get(cluster *cl, const char *digest, const char *repository, char *tag, size_t tlen,
                                char *base, size_t blen);

/* ---- links (store.h): (scope, digest) -> the link record's text ---- */

/* Publish a link (text: "" or "UPSTREAM\nREPOSITORY\n", as the store's
 * record), kept cluster.record_ttl_seconds after it was last written. */
cluster_result cluster_link_put(cluster *cl, const char *scope_hex, const char *digest, const char *text);
/* HIT: text (NUL-terminated) filled. */
cluster_result cluster_link_get(cluster *cl, const char *scope_hex, const char *digest, char *text, size_t tlen);

/* ---- pushed image specs: (provider, id) -> the stored spec text ---- */

/* HIT: written; *replaced says whether a spec was there (pushed to any
 * replica). */
cluster_result cluster_spec_put(cluster *cl, const char *provider, const char *id, const char *text, size_t len,
                                bool *replaced);
/* HIT: *text malloc'd (caller frees), NUL-terminated, *len its length. */
cluster_result cluster_spec_get(cluster *cl, const char *provider, const char *id, size_t max, char **text,
                                size_t *len);
/* HIT: deleted; MISS: was not there. */
cluster_result cluster_spec_del(cluster *cl, const char *provider, const char *id);

#endif
