/*
 * config: the one JSON configuration file, validated strictly (unknown keys
 * are errors, every field has a default, relative paths resolve against the
 * config file's folder). Secrets are read from files at load time and never
 * appear in messages. A config is immutable once loaded; a reload builds a
 * new one.
 */
#ifndef REGFACADE_CONFIG_H
#define REGFACADE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "regfacade/json.h"
#include "regfacade/log.h"

typedef struct {
    char *name;                    /* key in "upstreams" */
    char *url;                     /* base URL, no trailing slash */
    char *host;                    /* "host" or "host:port" of url, lowercase */
    char *username;                /* NULL: anonymous (or from docker_config) */
    char *password;                /* read from password_file or docker_config; never logged */
    char *identity_token;          /* an OAuth2 refresh token (docker_config "identitytoken"); never logged */
    char *credential_helper;       /* absolute path of a docker-credential-helpers program; NULL: none */
    char *credential_server_url;   /* what the helper is asked about ("host:port", Docker Hub's URL) */
    long credential_cache_seconds; /* how long a helper's answer is reused */
    char *ca_file;                 /* NULL: system CAs */
    bool tls_verify;               /* default true */
    bool library_prefix;           /* default: true for Docker Hub hosts */
    char **mirrors;                /* more base URLs tried in order when one fails; NULL when none */
    size_t n_mirrors;
} config_upstream;

typedef struct {
    char *path;        /* the file it was read from ("(embedded default)" otherwise) */
    char *listen_host; /* "127.0.0.1" */
    int listen_port;   /* 5000 */
    char *cache_dir;   /* absolute */
    uint64_t cache_max_bytes;
    uint64_t scrub_bytes_per_second; /* background re-hashing of cached blobs; default 8 MiB/s, 0: off */
    long tag_ttl_seconds;            /* default 60 */
    long stale_max_seconds;          /* a known tag resolution is served this long past its last confirmation when the
                               upstream fails; default 86400, 0: never served stale */
    char *policy_file;               /* NULL: the embedded default mirror policy */
    json_value *policy_options;      /* an object, never NULL */
    config_upstream *upstreams;
    size_t n_upstreams;
    char *default_upstream;            /* NULL when unset and more than one upstream */
    char *docker_config;               /* NULL when unset */
    uint64_t manifest_max_bytes;       /* default 4 MiB */
    uint64_t verify_before_send_bytes; /* blobs up to this size are verified before the first byte; default 1 MiB */
    uint64_t blob_max_bytes;           /* largest blob fetched without a descriptor's size; default 10 GiB */
    long upstream_connect_timeout_ms;  /* default 10000 */
    long upstream_low_speed_time_s;    /* default 30 */
    long upstream_low_speed_limit;     /* bytes/s, default 1024 */
    int upstream_retries;              /* default 3 */
    long upstream_retry_budget_s;      /* total time retries of one request may take, default 30 */
    unsigned upstream_max_concurrent_fetches; /* blob transfers at once; more wait for a slot; default 64 */
    long credential_helper_timeout_ms;        /* one credential helper run, default 10000 */
    long credential_cache_seconds;            /* default for upstreams.NAME.credential_cache_seconds, 300 */
    unsigned max_connections;                 /* default 1024 */
    unsigned client_timeout_s;                /* idle client timeout, default 300 */
    /* Client-facing limits (docs/security.md). */
    unsigned header_max_bytes;    /* per-connection memory for request line + headers, default 64 KiB */
    unsigned url_max_bytes;       /* request path, default 4096 */
    unsigned connections_per_ip;  /* concurrent connections per client IP, 0 (default): no limit */
    unsigned requests_per_second; /* per client IP, 0 (default): no limit */
    unsigned request_burst;       /* token bucket size, 0 (default): 2 x requests_per_second */
    unsigned header_timeout_s;    /* complete request headers within this, default 30; 0: off */
    char *user;                   /* drop privileges to this user after binding; NULL: stay */
    int shutdown_grace_seconds;   /* SIGTERM: how long transfers in flight may finish, default 30 */
    char *dir;                    /* the config file's folder (relative paths resolve here) */
    log_level log_level;          /* "log_level": lines below it are dropped; default info */
    /* Where listen, cache.dir and log_level came from: "default", "file",
     * or the flag or environment variable (config_apply_overrides). */
    const char *listen_from, *cache_dir_from, *log_level_from;
    /* Sections owned and validated by their own modules (NULL when absent):
     * each module parses its section with its own *_config_parse(). */
    json_value *metrics;        /* metrics.c */
    json_value *tls;            /* server TLS */
    json_value *blobserve;      /* blobserve.c */
    json_value *admin;          /* admin API (spec providers) */
    json_value *specs;          /* spec providers */
    json_value *cluster;        /* shared state on Redis (cluster.c) */
    json_value *layers;         /* named layer sources (layers.c) */
    json_value *policy_section; /* the whole "policy" object: its limits are policy.c's to parse */
} config;

/* Load and validate. NULL on error with "FILE: KEY: why" in err. */
config *config_load(const char *path, char *err, size_t errlen);
/* The same from a parsed document: name is what messages say ("FILE"),
 * path what c->path becomes, dir where relative paths resolve (the busted
 * module regfacade.policy builds a config this way). */
config *config_load_tree(const json_value *root, const char *name, const char *path, const char *dir, char *err,
                         size_t errlen);
/* The embedded default: a Docker Hub mirror on 127.0.0.1:5000 caching in
 * ./cache. */
config *config_default(char *err, size_t errlen);
void config_free(config *c);

const config_upstream *config_find_upstream(const config *c, const char *name);

/* Settings given outside the file, which win over it: the command line
 * (--listen, --cache-dir, --log-level) over the environment (REGFACADE_LISTEN,
 * REGFACADE_CACHE_DIR, REGFACADE_LOG_LEVEL). NULL members: not given; each
 * *_from names where the value came from ("--listen", "REGFACADE_LISTEN"). */
typedef struct {
    const char *listen, *listen_from;
    const char *cache_dir, *cache_dir_from; /* relative: to the working folder */
    const char *log_level, *log_level_from;
} config_overrides;
/* Apply o to c (after config_load or config_default; again after each
 * reload). 0, or -1 with "--listen: why" in err and c unchanged. */
int config_apply_overrides(config *c, const config_overrides *o, char *err, size_t errlen);

/* A byte size: a JSON integer, or a string of an integer with an optional
 * suffix, B, KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (of 1024), no
 * space: "20GiB", "512MiB", "1048576". 0 with *out; -1 otherwise (not a
 * number, an unknown suffix, over 2^63). */
int config_value_size(const json_value *v, uint64_t *out);
/* A config value read as an unsigned integer: sizes (with suffixes) for
 * keys ending in "_bytes", plain integers otherwise. */
int config_value_uint(const json_value *v, const char *key, uint64_t *out);

/* A whole small file, NUL-terminated; NULL with errno set (EFBIG: over
 * max bytes). A failed read leaves nothing of the file in memory (config
 * files name secrets). */
char *config_read_file(const char *path, size_t max, size_t *len);

/* A listener's "HOST:PORT": HOST an IPv4 address (names are not resolved:
 * what check accepts is what serve binds), PORT 1..65535. 0 with *host
 * (malloc'd) and *port; -1 with why ("... must be HOST:PORT", ...). */
int config_parse_listen(const char *s, char **host, int *port, char *why, size_t whylen);

/* The first key of obj that is not in allowed (NULL-terminated), or NULL;
 * list gets the allowed keys, comma-separated, for the message. Every
 * config section's parser uses it: unknown keys are errors everywhere. */
const char *config_unknown_key(const json_value *obj, const char *const *allowed, char *list, size_t listlen);

/* Parsing one section owned by a module (blobserve, specs, ...): errors read
 * "FILE: SECTION.WHAT: why". */
typedef struct {
    const config *c;
    const char *section; /* "blobserve" */
    char *err;
    size_t errlen;
} config_section;

/* Write "FILE: SECTION.<message>" into the error buffer ("FILE: SECTION<message>"
 * for a message starting with ':', about the whole section); returns -1. */
int config_section_fail(config_section *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* -1 (with the error written) when obj has a key outside allowed. where is
 * the path inside the section ("" for its top). */
int config_section_check_keys(config_section *s, const json_value *obj, const char *where, const char *const *allowed);

#endif
