/* regfacade: command line. serve, check, cache verify|ls|du|rm|gc|warm, tags
 * refresh (cli_cache.h), --version; every command takes
 * --help. Settings outside the config file: flag > environment > file >
 * default (config_apply_overrides). */
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "regfacade/cli_cache.h"
#include "regfacade/config.h"
#include "regfacade/log.h"
#include "regfacade/metrics.h"
#include "regfacade/scrub.h"
#include "regfacade/server.h"
#include "regfacade/store.h"
#include "regfacade/upstream.h"

static const char OPTIONS_HELP[] =
    "  --config FILE        the JSON config (env REGFACADE_CONFIG); serve without one runs the\n"
    "                       embedded default, a Docker Hub mirror on 127.0.0.1:5000 caching in ./cache\n"
    "  --listen ADDR        the registry listener, IPv4 HOST:PORT (env REGFACADE_LISTEN)\n"
    "  --cache-dir DIR      the cache folder (env REGFACADE_CACHE_DIR)\n"
    "  --log-level LEVEL    error, warn, info or debug (env REGFACADE_LOG_LEVEL)\n"
    "  --help               this text\n"
    "A flag wins over its environment variable, which wins over the config file.\n";

static void usage(FILE *f) {
    fprintf(f,
            "usage: regfacade serve [OPTIONS]   run the registry facade\n"
            "       regfacade check [OPTIONS]   validate config and policy as serve would, then exit\n"
            "       regfacade cache verify [OPTIONS]\n"
            "                                  hash every cached blob again, quarantine wrong ones\n"
            "       regfacade cache ls [--json] [OPTIONS]    images and blobs cached\n"
            "       regfacade cache du [--json] [OPTIONS]    how much the cache holds\n"
            "       regfacade cache rm REF|DIGEST [OPTIONS]  remove an image (never a blob in use)\n"
            "       regfacade cache gc [OPTIONS]             tmp leftovers, records of uncached images, strays\n"
            "       regfacade cache warm REF... [--platform OS/ARCH]... [OPTIONS]\n"
            "                                  pull images into the cache\n"
            "       regfacade tags refresh REF [OPTIONS]     forget a tag's resolution\n"
            "       regfacade --version\n"
            "       regfacade COMMAND --help\n"
            "OPTIONS:\n%s",
            OPTIONS_HELP);
}

static const char *cache_help(const char *cmd) {
    static const struct {
        const char *cmd, *text;
    } texts[] = {
        {"cache ls", "List the images (tag resolutions: upstream, repository, tag, digest, the size and last use of "
                     "what of them is cached) and the blobs cached (digest, size, last use, in use).\n"
                     "  --json               the JSON as it is\n"},
        {"cache du", "How much the cache holds: blobs and bytes against cache.max_bytes, tag records, tmp/ and "
                     "quarantine/.\n  --json               the JSON as it is\n"},
        {"cache rm", "Remove an image: REF (NAME:TAG or NAME@DIGEST, named as clients name it, through the "
                     "policy's resolve) or DIGEST; its tag resolutions go, and its blobs that no other cached "
                     "image holds, never one a reader holds open (those are listed; exit 1).\n"
                     "  --json               the JSON as it is\n"},
        {"cache gc", "Remove what nothing needs: tmp/ leftovers (older than an hour while a server runs), tag and "
                     "generated records of images no longer cached, damaged records, stray files in blobs/.\n"
                     "  --json               the JSON as it is\n"},
        {"cache warm", "Pull images into the cache, as a client's pull would: every platform of an index, or "
                       "those named. Prints a line per blob as it is done. Through the running server's admin API, "
                       "or, when none runs, with the config's upstreams and policy, without listening.\n"
                       "  --platform OS/ARCH[/VARIANT]   only this platform (repeatable)\n"
                       "  --json               the progress lines as they are (NDJSON)\n"},
        {"tags refresh", "Forget the resolution of REF's tag, so the next pull asks the upstream.\n"
                         "  --json               the JSON as it is\n"},
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
        if (strcmp(texts[i].cmd, cmd) == 0) return texts[i].text;
    return "";
}

/* Said under every cache command's own text. */
static const char CACHE_HELP_TAIL[] =
    "With no server on the cache folder it works there, under the folder's lock; while a server holds it, "
    "through that server's admin API (the config's \"admin\" section).\n";

/* What the command line and the environment say, and the config path. */
typedef struct {
    const char *path;
    config_overrides ov;
} settings;

static config *load(const settings *st) {
    char err[2048];
    config *c = st->path ? config_load(st->path, err, sizeof err) : config_default(err, sizeof err);
    if (c && config_apply_overrides(c, &st->ov, err, sizeof err) != 0) {
        config_free(c);
        c = NULL;
    }
    if (!c) fprintf(stderr, "regfacade: %s\n", err);
    return c;
}

/* nginx -t: the validation serve runs before it binds (server_check). */
static int cmd_check(const settings *st) {
    config *c = load(st);
    if (!c) return 1;
    char err[2048];
    if (server_check(c, err, sizeof err) != 0) {
        fprintf(stderr, "regfacade: %s\n", err);
        config_free(c);
        return 1;
    }
    printf("%s: ok (%zu upstream%s, policy %s)\n", c->path, c->n_upstreams, c->n_upstreams == 1 ? "" : "s",
           c->policy_file ? c->policy_file : "embedded default");
    /* Where each setting that can come from outside the file came from. */
    printf("  listen %s:%d (%s)\n  cache.dir %s (%s)\n  log_level %s (%s)\n", c->listen_host, c->listen_port,
           c->listen_from, c->cache_dir, c->cache_dir_from, log_level_name(c->log_level), c->log_level_from);
    config_free(c);
    return 0;
}

/* Offline: a server running on the same cache holds its lock (its admin
 * API's POST /cache/verify does the same while it serves). */
static int cmd_cache_verify(const settings *set) {
    config *c = load(set);
    if (!c) return 1;
    char err[2048];
    /* No cap: verifying must not evict anything. */
    store *st = store_open(c->cache_dir, UINT64_MAX, err, sizeof err);
    if (!st) {
        fprintf(stderr, "regfacade cache verify: %s\n", err);
        config_free(c);
        return 1;
    }
    scrub_report rep;
    int rc = scrub_verify_all(st, &rep);
    if (rc != 0) {
        fprintf(stderr, "regfacade cache verify: out of memory\n");
    } else {
        size_t q = 0;
        for (size_t i = 0; i < rep.n_failed; i++) {
            const scrub_failure *f = &rep.failed[i];
            q += f->quarantined;
            printf("%s %s: %s\n", f->quarantined ? "QUARANTINED" : "UNREADABLE", f->digest, f->reason);
        }
        printf("%s: %zu cached blobs (%llu bytes) checked: %zu quarantined (moved to %s/quarantine), %zu unreadable\n",
               c->cache_dir, rep.checked, (unsigned long long)rep.bytes, q, c->cache_dir, rep.n_failed - q);
        rc = rep.n_failed ? 1 : 0;
        scrub_report_clear(&rep);
    }
    store_close(st);
    config_free(c);
    return rc == 0 ? 0 : 1;
}

static int cmd_serve(const settings *st) {
    const char *path = st->path;
    config *c = load(st);
    if (!c) return 1;
    log_level level = c->log_level;
    log_set_level(level);
    /* Signals are taken synchronously by this thread; every other thread
     * inherits the blocked mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* Under a file-size limit (ulimit -f) a write past it fails with EFBIG,
     * an error the spool and the store report, instead of killing the server. */
    signal(SIGXFSZ, SIG_IGN);
    if (upstream_global_init() != 0) {
        fprintf(stderr, "regfacade: libcurl initialization failed\n");
        config_free(c);
        return 1;
    }
    char err[2048];
    server *s = server_start(c, err, sizeof err);
    if (!s) {
        fprintf(stderr, "regfacade: %s\n", err);
        config_free(c);
        upstream_global_cleanup();
        return 1;
    }
    int grace = c->shutdown_grace_seconds; /* the latest configuration's: applied by a reload too */
    log_info("regfacade %s serving on %s:%d (config %s, cache %s)", REGFACADE_VERSION, c->listen_host, c->listen_port,
             c->path, c->cache_dir);
    for (;;) {
        int sig = 0;
        if (sigwait(&set, &sig) != 0) continue;
        if (sig == SIGHUP) {
            /* Reload: a bad new config is rejected and the old one keeps serving. */
            char rerr[2048];
            config *nc = path ? config_load(path, rerr, sizeof rerr) : NULL;
            /* The command line and environment still win over the new file. */
            if (nc && config_apply_overrides(nc, &st->ov, rerr, sizeof rerr) != 0) {
                config_free(nc);
                nc = NULL;
            }
            if (!path) {
                log_warn("SIGHUP: running the embedded default; nothing to reload");
            } else if (!nc) {
                log_error("SIGHUP: reload rejected, still serving the old configuration: %s", rerr);
                metrics_reload(false);
            } else if (server_reload(s, nc, rerr, sizeof rerr) != 0) {
                log_error("SIGHUP: reload rejected, still serving the old configuration: %s", rerr);
                config_free(nc);
                metrics_reload(false);
            } else {
                grace = nc->shutdown_grace_seconds;
                /* Said at the more talkative of the two levels. */
                bool quieter = nc->log_level > level;
                if (!quieter) log_set_level(nc->log_level);
                log_info("SIGHUP: reloaded %s (log_level %s)", nc->path, log_level_name(nc->log_level));
                if (quieter) log_set_level(nc->log_level);
                level = nc->log_level;
                metrics_reload(true);
            }
            continue;
        }
        log_info("signal %d: shutting down", sig);
        break;
    }
    /* Let transfers in flight finish, up to the grace period. */
    server_drain(s, grace);
    server_stop(s);
    config_free(c);
    upstream_global_cleanup();
    return 0;
}

/* One option with its value: "--name VALUE" or "--name=VALUE". */
static int take(int argc, char **argv, int *i, const char *name, const char **out) {
    size_t n = strlen(name);
    if (strcmp(argv[*i], name) == 0) {
        if (*i + 1 >= argc) {
            fprintf(stderr, "regfacade: %s needs a value\n", name);
            return -1;
        }
        *out = argv[++*i];
        return 1;
    }
    if (strncmp(argv[*i], name, n) == 0 && argv[*i][n] == '=') {
        *out = argv[*i] + n + 1;
        return 1;
    }
    return 0;
}

static const char *env_or_null(const char *name) {
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

int main(int argc, char **argv) {
    if (argc >= 2 && (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0)) {
        printf("regfacade %s\n", REGFACADE_VERSION);
        return 0;
    }
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0)) {
        usage(stdout);
        return 0;
    }
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    int first_opt = 2;
    static const char *const subcommands[] = {"cache verify", "cache ls",   "cache du",    "cache rm",
                                              "cache gc",     "cache warm", "tags refresh"};
    char full[64];
    if (strcmp(cmd, "cache") == 0 || strcmp(cmd, "tags") == 0) {
        snprintf(full, sizeof full, "%s %s", cmd, argc >= 3 ? argv[2] : "");
        const char *found = NULL;
        for (size_t k = 0; k < sizeof subcommands / sizeof subcommands[0]; k++)
            if (strcmp(subcommands[k], full) == 0) found = subcommands[k];
        if (!found && argc >= 3 && (strcmp(argv[2], "--help") == 0 || strcmp(argv[2], "-h") == 0)) {
            /* `regfacade cache --help`: the group's subcommands */
            printf("usage: regfacade %s %s [OPTIONS] ...\n(regfacade %s SUBCOMMAND --help for each)\n", cmd,
                   strcmp(cmd, "tags") == 0 ? "refresh" : "verify|ls|du|rm|gc|warm", cmd);
            usage(stdout);
            return 0;
        }
        if (!found) {
            fprintf(stderr, "regfacade %s: unknown or missing subcommand%s%s (%s)\n", cmd, argc >= 3 ? " " : "",
                    argc >= 3 ? argv[2] : "", strcmp(cmd, "tags") == 0 ? "refresh" : "verify, ls, du, rm, gc or warm");
            usage(stderr);
            return 2;
        }
        cmd = found;
        first_opt = 3;
    } else if (strcmp(cmd, "serve") != 0 && strcmp(cmd, "check") != 0) {
        fprintf(stderr, "regfacade: unknown command \"%s\"\n", cmd);
        usage(stderr);
        return 2;
    }
    /* The environment first; flags then replace it. */
    settings st = {.path = env_or_null("REGFACADE_CONFIG")};
    struct {
        const char *flag, *env;
        const char **value, **from;
    } opts[] = {
        {"--listen", "REGFACADE_LISTEN", &st.ov.listen, &st.ov.listen_from},
        {"--cache-dir", "REGFACADE_CACHE_DIR", &st.ov.cache_dir, &st.ov.cache_dir_from},
        {"--log-level", "REGFACADE_LOG_LEVEL", &st.ov.log_level, &st.ov.log_level_from},
    };
    size_t n_opts = sizeof opts / sizeof opts[0];
    /* The cache commands' own: REFs, --json, --platform. */
    const char *args[64], *platforms[16];
    cli_cache_request rq = {.cmd = cmd, .args = args, .platforms = platforms};
    bool takes_json = strncmp(cmd, "cache ", 6) == 0 && strcmp(cmd, "cache verify") != 0;
    takes_json |= strcmp(cmd, "tags refresh") == 0;
    size_t max_args = strcmp(cmd, "cache warm") == 0                                     ? sizeof args / sizeof args[0]
                      : strcmp(cmd, "cache rm") == 0 || strcmp(cmd, "tags refresh") == 0 ? 1
                                                                                         : 0;
    for (size_t k = 0; k < n_opts; k++)
        if ((*opts[k].value = env_or_null(opts[k].env))) *opts[k].from = opts[k].env;
    for (int i = first_opt; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf("usage: regfacade %s%s [OPTIONS]\n%s\nOPTIONS:\n%s", cmd,
                   strcmp(cmd, "cache rm") == 0       ? " REF|DIGEST"
                   : strcmp(cmd, "cache warm") == 0   ? " REF... [--platform OS/ARCH[/VARIANT]]..."
                   : strcmp(cmd, "tags refresh") == 0 ? " REF"
                                                      : "",
                   strcmp(cmd, "serve") == 0   ? "Run the registry facade. SIGHUP reloads the config, SIGTERM drains "
                                                 "and exits.\n"
                   : strcmp(cmd, "check") == 0 ? "Validate the config and its policy as serve would, without "
                                                 "listening; print where each setting came from.\n"
                   : strcmp(cmd, "cache verify") == 0
                       ? "Hash every cached blob and manifest again, offline (not while a server runs on the "
                         "cache); move wrong ones to CACHE/quarantine, list them, exit 1 if any.\n"
                       : cache_help(cmd),
                   OPTIONS_HELP);
            if (strncmp(cmd, "cache ", 6) == 0 && strcmp(cmd, "cache verify") != 0 && strcmp(cmd, "cache warm") != 0)
                printf("%s", CACHE_HELP_TAIL);
            else if (strcmp(cmd, "tags refresh") == 0)
                printf("%s", CACHE_HELP_TAIL);
            return 0;
        }
        if (takes_json && strcmp(argv[i], "--json") == 0) {
            rq.json = true;
            continue;
        }
        const char *plat = NULL;
        int pgot = strcmp(cmd, "cache warm") == 0 ? take(argc, argv, &i, "--platform", &plat) : 0;
        if (pgot < 0) return 2;
        if (pgot == 1) {
            if (rq.n_platforms == sizeof platforms / sizeof platforms[0] || !strchr(plat, '/')) {
                fprintf(stderr, "regfacade cache warm: --platform \"%s\": OS/ARCH[/VARIANT], at most %zu\n", plat,
                        sizeof platforms / sizeof platforms[0]);
                return 2;
            }
            platforms[rq.n_platforms++] = plat;
            continue;
        }
        if (argv[i][0] != '-' && rq.n_args < max_args) {
            args[rq.n_args++] = argv[i];
            continue;
        }
        int got = take(argc, argv, &i, "--config", &st.path);
        for (size_t k = 0; k < n_opts && got == 0; k++)
            if ((got = take(argc, argv, &i, opts[k].flag, opts[k].value)) == 1) *opts[k].from = opts[k].flag;
        if (got < 0) return 2;
        if (got == 0) {
            fprintf(stderr, "regfacade %s: unknown argument \"%s\" (regfacade %s --help)\n", cmd, argv[i], cmd);
            return 2;
        }
    }
    if (strcmp(cmd, "serve") == 0) return cmd_serve(&st);
    if (strcmp(cmd, "cache verify") == 0) return cmd_cache_verify(&st);
    if (strcmp(cmd, "check") != 0) {
        if (max_args && rq.n_args == 0) {
            fprintf(stderr, "regfacade %s: name the image: REF%s (regfacade %s --help)\n", cmd,
                    strcmp(cmd, "cache rm") == 0     ? "|DIGEST"
                    : strcmp(cmd, "cache warm") == 0 ? "..."
                                                     : "",
                    cmd);
            return 2;
        }
        config *c = load(&st);
        if (!c) return 1;
        int rc = cli_cache_run(c, &rq);
        config_free(c);
        return rc;
    }
    if (!st.path) {
        fprintf(stderr, "regfacade check: --config FILE (or REGFACADE_CONFIG) is required\n");
        return 2;
    }
    return cmd_check(&st);
}
