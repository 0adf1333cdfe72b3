/*
 * cachectl: the operator's view of the cache and what it may do to it
 * (regfacade cache ls|du|rm|gc|warm, tags refresh; the admin API's /cache
 * and /tags endpoints). Every operation but warm works on a store alone,
 * so the same code runs in the server (admin API) and offline on a stopped
 * server's cache folder (under its lock); each answers JSON, which the
 * admin API sends as it is and the command line prints as a table.
 *
 * A REF is NAME:TAG, NAME@sha256:HEX or NAME (":latest"), named as a
 * client names it: the policy's spec and resolve hooks map it to (upstream,
 * repository, reference) as they do a client's manifest request (sp: the
 * image specs, NULL offline: then a spec hook naming a provider fails). A bare sha256:HEX
 * names cached bytes directly.
 */
#ifndef REGFACADE_CACHECTL_H
#define REGFACADE_CACHECTL_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "regfacade/generation.h"
#include "regfacade/policy.h"
#include "regfacade/specs.h"
#include "regfacade/store.h"

/* What an operation answers: an HTTP status (200, 400 bad input, 404
 * nothing of that name, 409 something in use, 500) and a body (malloc'd,
 * JSON; on an error an OCI error body; NULL only when out of memory). */
typedef struct {
    int status;
    char *body;
    size_t len;
} cachectl_answer;
void cachectl_answer_clear(cachectl_answer *a);

/* cache ls: {"images":[{"upstream","repository","tag","digest","media_type",
 * "resolved","size","blobs","missing","last_used"}], "blobs":[{"digest",
 * "size","last_used","in_use"}]}: every tag resolution held, with the size
 * and latest use of what of its image is cached, and every cached blob,
 * least recently used first (times in seconds since the epoch). */
void cachectl_list(store *st, cachectl_answer *out);
/* cache du: {"dir","blobs","bytes","max_bytes","tag_records","tmp_files",
 * "tmp_bytes","quarantine_files","quarantine_bytes"}. max_bytes is the
 * configured cap (the store's own is not, offline). */
void cachectl_usage(store *st, uint64_t max_bytes, cachectl_answer *out);
/* cache rm REF|DIGEST: the tag resolution REF names (pol resolves it; NULL
 * only for a bare digest) goes, and so do every other resolution to the
 * same manifest and the manifest's blobs (an index's children, configs,
 * layers) that no other resolution's image holds, never one a reader holds
 * open. {"ref","digest","tags":[{"upstream","repository","tag"}],
 * "removed":[{"digest","size"}],"in_use":[digest...],"bytes"}; 404 when
 * nothing of REF is cached, 409 when something stayed because it is in use. */
void cachectl_remove(store *st, specs *sp, policy *pol, const char *ref, cachectl_answer *out);
/* cache gc (store_gc): {"tmp_files","tmp_bytes","tag_records",
 * "generated_records","damaged_records","stray_files","stray_bytes"}. */
void cachectl_gc(store *st, time_t tmp_min_age, cachectl_answer *out);
/* tags refresh REF: forget the resolution of REF's tag, so the next pull
 * asks the upstream. {"ref","upstream","repository","tag","forgotten"}. */
void cachectl_tag_forget(store *st, specs *sp, policy *pol, const char *ref, cachectl_answer *out);

/* cache warm: pull images into the cache as a client's pull would (the
 * policy's resolve, manifest_get, the single-flight blob fetch), every
 * platform of an index or those named ("linux/amd64", "linux/arm64/v8"),
 * and the layers resolve adds from other images and blobs (layers_resolve,
 * per platform), so an assembled image is made from cached parts.
 * start resolves every REF and fetches their manifests (an error there is
 * the answer, and nothing more is done); next then fetches one blob per
 * call and gives its progress line. Holds the current generation until
 * freed. */
typedef struct cachectl_warm cachectl_warm;
cachectl_warm *cachectl_warm_start(const generation_env *env, specs *sp, const char *const *refs, size_t n_refs,
                                   const char *const *platforms, size_t n_platforms, cachectl_answer *err);
/* The next line of NDJSON progress (malloc'd, ending in "\n"):
 * {"ref","digest","size","state":"fetched"|"cached"|"failed","error"?},
 * and last {"done":true,"blobs","fetched","cached","failed","bytes"}.
 * NULL once that was given (or out of memory). */
char *cachectl_warm_next(cachectl_warm *w, size_t *len);
void cachectl_warm_free(cachectl_warm *w);

/* Split REF: name and reference (tag or digest); a bare digest gives "" as
 * name. 0, or -1 with err saying why. */
int cachectl_ref_split(const char *ref, char *name, size_t nlen, char *reference, size_t rlen, char *err,
                       size_t errlen);

#endif
