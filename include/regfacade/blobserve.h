/*
 * blobserve: files from inside images, served over HTTP on a second
 * listener (an IDE's web assets, straight out of its image, with no
 * container running).
 *
 *   GET /<repository>:<tag>/<path>
 *   GET /<repository>@sha256:<hex>/<path>
 *
 * The repository ends at the first ':' or '@' (neither can occur in a
 * repository name); a URL with neither is refused (400). The image is
 * resolved with the policy's resolve hook exactly as the registry listener
 * resolves a manifest request, its manifest comes through manifest_get, its
 * layers through the same store and single-flight fetch as registry blobs.
 * Each layer is unpacked once into a content-addressed extraction cache
 * (blobserve_cache.h) and a path resolves through the layers in order, with
 * whiteouts and confined links (blobserve_fs.h). See docs/blobserve.md.
 *
 * The listener is event-driven (epoll, one thread per CPU): a request whose
 * image is resolved and whose layers are extracted is answered at once; any
 * other is suspended while a thread of its own resolves, downloads and
 * extracts, then resumed.
 *
 * Config section (config.c keeps it raw in config->blobserve):
 *   "blobserve": {
 *     "listen": "127.0.0.1:5080",
 *     "repositories": ["ide/web"],       or "any_repository": true
 *     "platform": "linux/amd64",
 *     "cache": { "dir": "<cache.dir>/blobserve", "max_bytes": 2147483648 },
 *     "prepull": ["ide/web:1.2"],
 *     "wait_for_prepull": false,
 *     "tag_max_age_seconds": 60,
 *     "max_replace_file_bytes": 16777216,
 *     "inline_max_bytes": 16384,
 *     "replacements": { "ide/web": [ { "path": "/index.html",
 *                                      "search": "…", "replacement": "…" } ] }
 *   }
 */
#ifndef REGFACADE_BLOBSERVE_H
#define REGFACADE_BLOBSERVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "regfacade/config.h"
#include "regfacade/fetch.h"
#include "regfacade/generation.h"
#include "regfacade/policy.h"
#include "regfacade/store.h"
#include "regfacade/upstream.h"

/* One find-and-replace edit of one file, applied at extraction. */
typedef struct {
    char *path; /* in the image, normalized: "index.html", "ide/out/index.html" */
    char *search;
    size_t search_len;
    char *replacement;
    size_t replacement_len;
} blobserve_replacement;

/* The edits of one repository (as named in the URL). */
typedef struct {
    char *repository;
    blobserve_replacement *items;
    size_t n;
    char variant[17]; /* 16 hex of sha256 over the edits: part of the extraction key */
} blobserve_repo_edits;

typedef struct {
    char *listen_host; /* IPv4 literal */
    int listen_port;
    bool any_repository; /* default false: only "repositories" */
    char **repositories;
    size_t n_repositories;
    char *platform_os;        /* "linux" */
    char *platform_arch;      /* "amd64" */
    char *platform_variant;   /* NULL unless given ("linux/arm64/v8") */
    char *cache_dir;          /* absolute; default <cache.dir>/blobserve */
    uint64_t cache_max_bytes; /* default 2 GiB */
    char **prepull;           /* "repo:tag" or "repo@sha256:..." */
    size_t n_prepull;
    bool wait_for_prepull;           /* default false */
    long tag_max_age_s;              /* Cache-Control max-age for tag URLs; default 60 */
    uint64_t max_replace_file_bytes; /* a file to edit may be at most this big; default 16 MiB */
    uint64_t inline_max_bytes;       /* bodies up to this size are sent with the headers in one
                                        write; larger ones by sendfile. Default 16 KiB, 0: always sendfile */
    blobserve_repo_edits *edits;
    size_t n_edits;
} blobserve_config;

/* Validate c->blobserve. 0 with *out NULL when the section is absent, 0
 * with *out set (free with blobserve_config_free), or -1 with
 * "FILE: blobserve.KEY: why" in err. */
int blobserve_config_parse(const config *c, blobserve_config **out, char *err, size_t errlen);
void blobserve_config_free(blobserve_config *bc);

/* Is repository (as named in the URL) allowed? */
bool blobserve_config_allows(const blobserve_config *bc, const char *repository);
/* The edits for repository, or NULL. */
const blobserve_repo_edits *blobserve_config_edits(const blobserve_config *bc, const char *repository);

/* blobserve works on the server's current configuration generation
 * (generation.h), taken when a piece of work starts (resolving an image,
 * downloading and extracting its layers, one pre-pull attempt). */
typedef generation blobserve_generation;
typedef generation_env blobserve_env;

typedef struct blobserve blobserve;

/* Open the extraction cache, start the listener and the pre-pull thread.
 * Takes ownership of bc (also on failure). NULL with err on failure. */
blobserve *blobserve_start(const blobserve_env *env, blobserve_config *bc, char *err, size_t errlen);
/* The server's configuration was replaced (a reload): images resolved on
 * the old one are resolved again on the next request, and pre-pulls that
 * failed are tried again at once. NULL is fine. */
void blobserve_reloaded(blobserve *b);
/* Stop the listener and the pre-pull thread, wait for requests in flight,
 * free everything. NULL is fine. */
void blobserve_stop(blobserve *b);

#endif
