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

typedef struct {
    char *name;          /* key in "upstreams" */
    char *url;           /* base URL, no trailing slash */
    char *host;          /* "host" or "host:port" of url, lowercase */
    char *username;      /* NULL: anonymous (or from docker_config) */
    char *password;      /* read from password_file or docker_config; never logged */
    char *ca_file;       /* NULL: system CAs */
    bool tls_verify;     /* default true */
    bool library_prefix; /* default: true for Docker Hub hosts */
} config_upstream;

typedef struct {
    char *path;             /* the file it was read from ("(embedded default)" otherwise) */
    char *listen_host;      /* "127.0.0.1" */
    int listen_port;        /* 5000 */
    char *cache_dir;        /* absolute */
    uint64_t cache_max_bytes;
    long tag_ttl_seconds;   /* default 60 */
    char *policy_file;      /* NULL: the embedded default mirror policy */
    json_value *policy_options; /* an object, never NULL */
    config_upstream *upstreams;
    size_t n_upstreams;
    char *default_upstream; /* NULL when unset and more than one upstream */
    char *docker_config;    /* NULL when unset */
    uint64_t manifest_max_bytes;    /* default 4 MiB */
    uint64_t verify_before_send_bytes; /* blobs up to this size are verified before the first byte; default 1 MiB */
    long upstream_connect_timeout_ms;  /* default 10000 */
    long upstream_low_speed_time_s;    /* default 30 */
    long upstream_low_speed_limit;     /* bytes/s, default 1024 */
    int upstream_retries;              /* default 3 */
    unsigned max_connections;          /* default 1024 */
    unsigned client_timeout_s;         /* idle client timeout, default 300 */
    char *dir;                         /* the config file's folder (relative paths resolve here) */
    /* Sections owned and validated by their own modules (NULL when absent):
     * each module parses its section with its own *_config_parse(). */
    json_value *metrics;    /* metrics.c */
    json_value *tls;        /* server TLS */
    json_value *blobserve;  /* blobserve.c */
    json_value *admin;      /* admin API (spec providers) */
    json_value *specs;      /* spec providers */
    json_value *layers;     /* named layer sources (layers.c) */
} config;

/* Load and validate. NULL on error with "FILE: KEY: why" in err. */
config *config_load(const char *path, char *err, size_t errlen);
/* The embedded default: a Docker Hub mirror on 127.0.0.1:5000 caching in
 * ./cache. */
config *config_default(char *err, size_t errlen);
void config_free(config *c);

const config_upstream *config_find_upstream(const config *c, const char *name);

#endif
