/* regfacade: command line. serve, check, --version. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "regfacade/config.h"
#include "regfacade/log.h"
#include "regfacade/metrics.h"
#include "regfacade/server.h"
#include "regfacade/upstream.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: regfacade serve [--config FILE]   run the registry facade\n"
            "       regfacade check --config FILE     validate config and policy\n"
            "       regfacade --version\n"
            "Without --config, serve runs the embedded default: a Docker Hub mirror on\n"
            "127.0.0.1:5000 caching in ./cache.\n");
}

static config *load(const char *path) {
    char err[2048];
    config *c = path ? config_load(path, err, sizeof err) : config_default(err, sizeof err);
    if (!c) fprintf(stderr, "regfacade: %s\n", err);
    return c;
}

/* nginx -t: the validation serve runs before it binds (server_check). */
static int cmd_check(const char *path) {
    config *c = load(path);
    if (!c) return 1;
    char err[2048];
    if (server_check(c, err, sizeof err) != 0) {
        fprintf(stderr, "regfacade: %s\n", err);
        config_free(c);
        return 1;
    }
    printf("%s: ok (%zu upstream%s, policy %s)\n", c->path, c->n_upstreams, c->n_upstreams == 1 ? "" : "s",
           c->policy_file ? c->policy_file : "embedded default");
    config_free(c);
    return 0;
}

static int cmd_serve(const char *path) {
    config *c = load(path);
    if (!c) return 1;
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
    log_info("regfacade %s serving on %s:%d (config %s, cache %s)", REGFACADE_VERSION, c->listen_host,
             c->listen_port, c->path, c->cache_dir);
    for (;;) {
        int sig = 0;
        if (sigwait(&set, &sig) != 0) continue;
        if (sig == SIGHUP) {
            /* Reload: a bad new config is rejected and the old one keeps serving. */
            char rerr[2048];
            config *nc = path ? config_load(path, rerr, sizeof rerr) : NULL;
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
                log_info("SIGHUP: reloaded %s", nc->path);
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

int main(int argc, char **argv) {
    if (argc >= 2 && (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0)) {
        printf("regfacade %s\n", REGFACADE_VERSION);
        return 0;
    }
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        usage(stdout);
        return 0;
    }
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    const char *cfg = NULL;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) {
            cfg = argv[++i];
        } else if (strncmp(argv[i], "--config=", 9) == 0) {
            cfg = argv[i] + 9;
        } else {
            fprintf(stderr, "regfacade %s: unknown argument \"%s\"\n", cmd, argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (strcmp(cmd, "serve") == 0) return cmd_serve(cfg);
    if (strcmp(cmd, "check") == 0) {
        if (!cfg) {
            fprintf(stderr, "regfacade check: --config FILE is required\n");
            return 2;
        }
        return cmd_check(cfg);
    }
    fprintf(stderr, "regfacade: unknown command \"%s\"\n", cmd);
    usage(stderr);
    return 2;
}
