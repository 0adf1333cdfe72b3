/*
 * upstream_answer: the one mapping from what an upstream said (or why it
 * said nothing) to what the client is told, and whether asking again may
 * help. Manifests, blobs, tag lists and blobserve all go through it, so one
 * upstream answer never becomes two different client answers:
 *
 *   upstream                          client                                retried
 *   404                               404 MANIFEST_UNKNOWN, BLOB_UNKNOWN     no
 *                                         or NAME_UNKNOWN (tags)
 *   401, 403, token refused           403 DENIED                             no
 *   429                               429 TOOMANYREQUESTS + its Retry-After  only with a Retry-After
 *   5xx                               502 UNKNOWN                            yes
 *   any other status                  502 UNKNOWN                            no
 *   timeout                           504 UNKNOWN                            yes
 *   connect (DNS too), TLS, broken    502 UNKNOWN                            yes
 *   bad challenge, internal, aborted  502 UNKNOWN                            no
 *
 * Retries are paced by upstream_retry_delay() (upstream_client.retries and
 * retry_budget_seconds). The answer is a fetch_error (fetch.h): status, OCI
 * code, Retry-After and a message naming the upstream and what was asked.
 */
#ifndef REGFACADE_UPSTREAM_ANSWER_H
#define REGFACADE_UPSTREAM_ANSWER_H

#include <stdbool.h>

#include "regfacade/fetch.h"
#include "regfacade/log.h"
#include "regfacade/upstream.h"

/* What was asked: it names the 404's code and the retry metric. */
typedef enum { UPSTREAM_WHAT_MANIFEST, UPSTREAM_WHAT_BLOB, UPSTREAM_WHAT_TAGS } upstream_what;

/* How one request ended. */
typedef enum {
    UPSTREAM_ANSWER_OK,     /* a 2xx answer, in resp */
    UPSTREAM_ANSWER_STATUS, /* another final HTTP answer (resp->status); e is the client's answer */
    UPSTREAM_ANSWER_FAILED, /* no HTTP answer (transport, auth or internal failure); e likewise */
} upstream_answer;

/* Map one attempt. subject names what was asked, for messages ("manifest
 * acme/app:v1", "blob sha256:... of acme/app", "the tags of acme/app");
 * err is upstream_perform()'s message. For a 2xx answer returns
 * UPSTREAM_ANSWER_OK and leaves e alone; otherwise fills e and sets
 * *retry (may be NULL) when asking again may help. */
upstream_answer upstream_answer_map(upstream_what what, const char *upstream, const char *subject, upstream_result r,
                                    const upstream_response *resp, const char *err, fetch_error *e, bool *retry);

/* One request, asked again after transient failures as upstream_client
 * says (backoff, Retry-After, retries, budget), each retry logged at warn
 * and counted. quick: a stand-in answer is at hand (a stale tag), so no
 * retry is waited for. The request's on_headers must drop any body an
 * earlier attempt delivered. On anything but UPSTREAM_ANSWER_OK, e holds the
 * client's answer (with " (gave up: ...)" when the retries ran out). */
upstream_answer upstream_ask(upstream *u, const upstream_request *req, upstream_response *resp, upstream_what what,
                             const char *subject, bool quick, fetch_error *e);

/* The Retry-After to send with the client answer e: the upstream's for a
 * 429 or 503 (UPSTREAM_ANSWER_RETRY_AFTER_S seconds when it gave none), NULL
 * for any other status. */
#define UPSTREAM_ANSWER_RETRY_AFTER_S "10"
const char *upstream_answer_retry_after(const fetch_error *e);

/* The level to log a client answer of this status at: an upstream's 404 is
 * a normal answer (info); other refusals warn; failures are errors. */
log_level upstream_answer_log_level(int http_status);

#endif
