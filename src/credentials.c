/*
 * credentials: static accounts, identity tokens and credential helpers
 * (docker-credential-helpers protocol), with the helper's answer cached.
 *
 * A helper is started with posix_spawn (no shell, no fork of this threaded
 * process: glibc uses a vfork-like clone), in a process group of its own so
 * that a timeout kills whatever it started too, with every descriptor but
 * its three pipes closed and the signals this process ignores reset.
 */
#include "regfacade/credentials.h"

#include "regfacade/errmsg.h"
#include "regfacade/clock.h"
#include "regfacade/json.h"
#include "regfacade/log.h"
#include "regfacade/ref.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HELPER_STDERR_MAX 4096 /* bytes of a helper's stderr kept for the message */
#define HELPER_EXCERPT_MAX 200 /* bytes of a helper's own error message shown */
#define HELPER_NOT_FOUND "credentials not found in native keychain"

struct credentials {
    credentials_kind kind;
    char *username; /* STATIC */
    char *secret;   /* STATIC, IDENTITY_TOKEN */
    char *helper;
    char *server_url;
    long timeout_ms;
    long cache_seconds;
    char *account;

    /* HELPER: the kept answer and the run in flight (guarded by mu) */
    pthread_mutex_t mu;
    pthread_cond_t done;
    bool running;  /* a run is in flight; others wait for it */
    uint64_t runs; /* runs finished */
    int last_rc;   /* of the last run */
    char last_err[768];
    bool have; /* kept holds an answer */
    credential kept;
    int64_t expires_ms; /* kept is reused until then */
    uint64_t serial;    /* answers handed out so far */
};

void credential_clear(credential *cr) {
    if (!cr) return;
    free(cr->username);
    secret_free(cr->secret);
    memset(cr, 0, sizeof *cr);
}

static int credential_copy(credential *dst, const credential *src) {
    memset(dst, 0, sizeof *dst);
    dst->identity_token = src->identity_token;
    dst->serial = src->serial;
    if (src->username && !(dst->username = strdup(src->username))) return -1;
    if (src->secret && !(dst->secret = strdup(src->secret))) {
        credential_clear(dst);
        return -1;
    }
    return 0;
}

static bool has_ctl(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) return true;
    return false;
}

/* ------------------------------------------------------------------ */
/* the helper's answer */

int credentials_parse_helper_output(const char *out, size_t len, credential *cr, char *err, size_t errlen) {
    memset(cr, 0, sizeof *cr);
    char jerr[160] = "";
    json_value *root = json_parse(out ? out : "", out ? len : 0, 8, jerr, sizeof jerr);
    int rc = -1;
    if (!root) {
        errmsg_set(err, errlen, "its output is not JSON (%s)", jerr);
        return -1;
    }
    const json_value *user = json_object_get(root, "Username");
    const json_value *secret = json_object_get(root, "Secret");
    if (root->type != JSON_OBJECT) {
        errmsg_set(err, errlen, "its output is not a JSON object");
    } else if (!secret || secret->type != JSON_STRING) {
        errmsg_set(err, errlen, "its output has no \"Secret\" string");
    } else if (user && user->type != JSON_STRING) {
        errmsg_set(err, errlen, "its output's \"Username\" is not a string");
    } else if (has_ctl(secret->str, secret->len) || (user && has_ctl(user->str, user->len))) {
        errmsg_set(err, errlen, "its output's \"Username\" or \"Secret\" holds control characters");
    } else if (secret->len > CREDENTIALS_SECRET_MAX || (user && user->len > CREDENTIALS_USERNAME_MAX)) {
        errmsg_set(err, errlen, "its output's \"Username\" or \"Secret\" is too long (at most %d and %d bytes)",
                   CREDENTIALS_USERNAME_MAX, CREDENTIALS_SECRET_MAX);
    } else if ((!user || user->len == 0) && secret->len == 0) {
        rc = 0; /* nothing stored for this server: anonymous */
    } else if (!user || user->len == 0) {
        errmsg_set(err, errlen, "its output has a \"Secret\" but no \"Username\"");
    } else if (strchr(user->str, ':')) {
        errmsg_set(err, errlen, "its output's \"Username\" holds a ':' (not usable for HTTP Basic)");
    } else {
        cr->identity_token = strcmp(user->str, CREDENTIALS_TOKEN_USERNAME) == 0;
        if (cr->identity_token && secret->len == 0) {
            errmsg_set(err, errlen, "its output names an identity token (\"<token>\") with an empty \"Secret\"");
        } else if (!(cr->username = strdup(user->str)) || !(cr->secret = strdup(secret->str))) {
            credential_clear(cr);
            errmsg_set(err, errlen, "out of memory");
        } else {
            rc = 0;
        }
    }
    if (secret && secret->type == JSON_STRING) explicit_bzero(secret->str, secret->len);
    json_free(root);
    return rc;
}

/* A helper's own error message fit for a log line: its first line,
 * printable ASCII, bounded; "" when it might be its JSON answer. */
static void helper_excerpt(const char *s, size_t n, char *out, size_t outlen) {
    out[0] = '\0';
    while (n > 0 && (*s == ' ' || *s == '\n' || *s == '\r' || *s == '\t')) s++, n--;
    size_t line = 0;
    while (line < n && s[line] != '\n' && s[line] != '\r') line++;
    if (line == 0 || memchr(s, '{', line)) return;
    size_t o = 0;
    for (size_t i = 0; i < line && o + 4 < outlen && o < HELPER_EXCERPT_MAX; i++)
        out[o++] = (s[i] >= 0x20 && s[i] < 0x7f && s[i] != '"' && s[i] != '\\') ? s[i] : '?';
    if (o < line && o + 4 < outlen) out[o++] = '.', out[o++] = '.', out[o++] = '.';
    out[o] = '\0';
}

static bool is_not_found(const char *s, size_t n) {
    while (n > 0 && (*s == ' ' || *s == '\n' || *s == '\r' || *s == '\t')) s++, n--;
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == '\t')) n--;
    return n == strlen(HELPER_NOT_FOUND) && memcmp(s, HELPER_NOT_FOUND, n) == 0;
}

/* Append when it fits in cap; true when it did. Not realloc: the old
 * buffer may hold a secret and is wiped before it is freed. */
static bool buf_add(char **buf, size_t *len, size_t cap, const char *data, size_t n) {
    if (*len + n > cap) return false;
    char *nb = malloc(*len + n + 1);
    if (!nb) return false;
    if (*buf) {
        memcpy(nb, *buf, *len);
        explicit_bzero(*buf, *len);
        free(*buf);
    }
    memcpy(nb + *len, data, n);
    *buf = nb;
    *len += n;
    nb[*len] = '\0';
    return true;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

int credentials_run_helper(const char *helper, const char *server_url, long timeout_ms, credential *cr, char *err,
                           size_t errlen) {
    memset(cr, 0, sizeof *cr);
    if (timeout_ms <= 0) timeout_ms = CREDENTIALS_DEFAULT_TIMEOUT_MS;
    int in[2] = {-1, -1}, out[2] = {-1, -1}, ep[2] = {-1, -1};
    char *obuf = NULL, *ebuf = NULL;
    size_t olen = 0, elen = 0;
    pid_t pid = -1;
    int rc = -1, status = 0, e = 0;
    bool fa_ok = false, at_ok = false, timed_out = false, too_big = false;
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    sigset_t none, reset;
    /* Dispositions this process sets to "ignore" survive exec: undo them. */
    static const int sigs[] = {SIGPIPE, SIGXFSZ, SIGHUP, SIGINT, SIGTERM, SIGQUIT, SIGUSR1, SIGUSR2, SIGCHLD};
    /* A minimal environment: where programs are and whose home it is (the
     * home of the user regfacade runs as, which after a privilege drop is
     * not the HOME it was started with). */
    char pathv[4096], homev[PATH_MAX + 8], pwbuf[4096];
    struct passwd pw, *pwp = NULL;
    const char *path = getenv("PATH"), *home = getenv("HOME");
    if (getpwuid_r(geteuid(), &pw, pwbuf, sizeof pwbuf, &pwp) == 0 && pwp && pwp->pw_dir && *pwp->pw_dir)
        home = pwp->pw_dir;
    snprintf(pathv, sizeof pathv, "PATH=%s", path && *path ? path : "/usr/local/bin:/usr/bin:/bin");
    snprintf(homev, sizeof homev, "HOME=%s", home && *home ? home : "/");
    char *envp[] = {pathv, homev, NULL};
    char *argv[] = {(char *)helper, (char *)"get", NULL};

    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0 || pipe2(ep, O_CLOEXEC) != 0) {
        errmsg_set(err, errlen, "cannot create pipes: %s", strerror(errno));
        goto out;
    }
    if ((e = posix_spawn_file_actions_init(&fa)) == 0) fa_ok = true;
    if (!e) e = posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    if (!e) e = posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    if (!e) e = posix_spawn_file_actions_adddup2(&fa, ep[1], 2);
    /* Nothing else of this process (listening sockets, cache files) reaches the helper. */
    if (!e) e = posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    if (!e && (e = posix_spawnattr_init(&at)) == 0) at_ok = true;
    sigemptyset(&none);
    sigemptyset(&reset);
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) sigaddset(&reset, sigs[i]);
    /* Its own process group: a timeout kills whatever it started too. */
    if (!e) e = posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    if (!e) e = posix_spawnattr_setpgroup(&at, 0);
    if (!e) e = posix_spawnattr_setsigmask(&at, &none);
    if (!e) e = posix_spawnattr_setsigdefault(&at, &reset);
    if (e) {
        errmsg_set(err, errlen, "cannot prepare its start: %s", strerror(e));
        goto out;
    }
    e = posix_spawn(&pid, helper, &fa, &at, argv, envp);
    if (e) {
        pid = -1;
        errmsg_set(err, errlen, "cannot start it: %s", strerror(e));
        goto out;
    }
    close_fd(&in[0]);
    close_fd(&out[1]);
    close_fd(&ep[1]);

    int64_t deadline = clock_monotonic_ms() + timeout_ms;
    /* The server URL is far below PIPE_BUF: this write does not block. A
     * helper that exits without reading gives EPIPE (SIGPIPE is ignored). */
    size_t ul = strlen(server_url);
    ssize_t w;
    do w = write(in[1], server_url, ul);
    while (w < 0 && errno == EINTR);
    close_fd(&in[1]);

    while (out[0] >= 0 || ep[0] >= 0) {
        int64_t left = deadline - clock_monotonic_ms();
        if (left <= 0) {
            timed_out = true;
            break;
        }
        struct pollfd pf[2] = {{.fd = out[0], .events = POLLIN}, {.fd = ep[0], .events = POLLIN}};
        int n = poll(pf, 2, (int)(left > 1000 ? 1000 : left));
        if (n < 0 && errno != EINTR) {
            errmsg_set(err, errlen, "cannot wait for its output: %s", strerror(errno));
            goto kill;
        }
        char chunk[8192];
        for (int i = 0; i < 2 && n > 0; i++) {
            if (pf[i].fd < 0 || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t r = read(pf[i].fd, chunk, sizeof chunk);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                close_fd(i == 0 ? &out[0] : &ep[0]);
            } else if (i == 0) {
                if (!buf_add(&obuf, &olen, CREDENTIALS_HELPER_OUTPUT_MAX, chunk, (size_t)r)) {
                    too_big = true;
                    break;
                }
            } else {
                size_t keep = elen + (size_t)r > HELPER_STDERR_MAX ? HELPER_STDERR_MAX - elen : (size_t)r;
                if (keep) (void)buf_add(&ebuf, &elen, HELPER_STDERR_MAX, chunk, keep);
            }
            explicit_bzero(chunk, sizeof chunk);
        }
        if (too_big) break;
    }
    while (!timed_out && !too_big) {
        pid_t wr = waitpid(pid, &status, WNOHANG);
        if (wr == pid) break;
        if (wr < 0 && errno != EINTR) {
            errmsg_set(err, errlen, "cannot wait for it: %s", strerror(errno));
            goto kill;
        }
        if (clock_monotonic_ms() >= deadline) {
            timed_out = true;
            break;
        }
        sleep_ms(5); /* its output is closed: it is about to exit */
    }
    if (timed_out) {
        errmsg_set(err, errlen, "gave no answer within %ld ms (killed)", timeout_ms);
        goto kill;
    }
    if (too_big) {
        errmsg_set(err, errlen, "printed more than %d bytes (killed)", CREDENTIALS_HELPER_OUTPUT_MAX);
        goto kill;
    }
    pid = -1; /* reaped */
    if (WIFSIGNALED(status)) {
        errmsg_set(err, errlen, "was killed by signal %d", WTERMSIG(status));
    } else if (WIFEXITED(status) && WEXITSTATUS(status) != 0) {
        if (is_not_found(obuf ? obuf : "", olen)) {
            rc = 0; /* no credentials for this server: anonymous */
        } else {
            char ex[HELPER_EXCERPT_MAX + 8];
            helper_excerpt(obuf ? obuf : "", olen, ex, sizeof ex);
            if (!ex[0]) helper_excerpt(ebuf ? ebuf : "", elen, ex, sizeof ex);
            errmsg_set(err, errlen, "exited with status %d%s%s", WEXITSTATUS(status), ex[0] ? ": " : "", ex);
        }
    } else {
        char perr[256];
        rc = credentials_parse_helper_output(obuf ? obuf : "", olen, cr, perr, sizeof perr);
        if (rc != 0) errmsg_set(err, errlen, "%s", perr);
    }
    goto out;

kill:
    if (pid > 0) {
        kill(-pid, SIGKILL); /* the group: whatever it started goes too */
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        pid = -1;
    }
    rc = -1;
out:
    if (fa_ok) posix_spawn_file_actions_destroy(&fa);
    if (at_ok) posix_spawnattr_destroy(&at);
    close_fd(&in[0]);
    close_fd(&in[1]);
    close_fd(&out[0]);
    close_fd(&out[1]);
    close_fd(&ep[0]);
    close_fd(&ep[1]);
    if (obuf) {
        explicit_bzero(obuf, olen);
        free(obuf);
    }
    if (ebuf) {
        explicit_bzero(ebuf, elen);
        free(ebuf);
    }
    if (rc != 0) credential_clear(cr);
    return rc;
}

/* ------------------------------------------------------------------ */
/* finding a helper */

static int check_program(const char *path, char *err, size_t errlen) {
    struct stat st;
    if (stat(path, &st) != 0) {
        errmsg_set(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        errmsg_set(err, errlen, "%s: not a regular file", path);
        return -1;
    }
    if (access(path, X_OK) != 0) {
        errmsg_set(err, errlen, "%s: not executable: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

int credentials_find_helper(const char *name, const char *dir, const char *path_env, char *out, size_t outlen,
                            char *err, size_t errlen) {
    if (!name || !*name || has_ctl(name, strlen(name))) {
        errmsg_set(err, errlen, "a credential helper name must be non-empty, without control characters");
        return -1;
    }
    if (strchr(name, '/')) {
        int n = name[0] == '/' || !dir ? snprintf(out, outlen, "%s", name) : snprintf(out, outlen, "%s/%s", dir, name);
        if (n < 0 || (size_t)n >= outlen) {
            errmsg_set(err, errlen, "credential helper path too long");
            return -1;
        }
        return check_program(out, err, errlen);
    }
    if (!path_env) path_env = getenv("PATH");
    if (!path_env || !*path_env) path_env = "/usr/local/bin:/usr/bin:/bin";
    char first_err[512] = "";
    for (const char *p = path_env;;) {
        size_t n = strcspn(p, ":");
        /* An empty PATH entry is the current folder: not taken for a program
         * that gets credentials. */
        if (n > 0) {
            int w = snprintf(out, outlen, "%.*s/docker-credential-%s", (int)n, p, name);
            if (w > 0 && (size_t)w < outlen) {
                char e[512];
                if (check_program(out, e, sizeof e) == 0) return 0;
                if (!first_err[0] && errno != ENOENT) snprintf(first_err, sizeof first_err, "%s", e);
            }
        }
        if (!p[n]) break;
        p += n + 1;
    }
    if (first_err[0])
        errmsg_set(err, errlen, "docker-credential-%s: %s", name, first_err);
    else
        errmsg_set(err, errlen, "docker-credential-%s: not found on PATH (%s)", name, path_env);
    return -1;
}

void credentials_server_url(const char *host, char *out, size_t outlen) {
    char norm[256];
    registry_host_normalize(host ? host : "", norm, sizeof norm);
    if (strcmp(norm, "docker.io") == 0 || strcmp(norm, "registry-1.docker.io:443") == 0)
        snprintf(out, outlen, "https://index.docker.io/v1/");
    else
        snprintf(out, outlen, "%s", norm);
}

/* ------------------------------------------------------------------ */
/* the source */

credentials *credentials_new(const credentials_options *o, char *err, size_t errlen) {
    if (!o) {
        errmsg_set(err, errlen, "credentials: no options");
        return NULL;
    }
    switch (o->kind) {
        case CREDENTIALS_NONE:
            break;
        case CREDENTIALS_STATIC:
            if (!o->username || !*o->username || strchr(o->username, ':') ||
                has_ctl(o->username, strlen(o->username))) {
                errmsg_set(err, errlen,
                           "credentials: a user name must be non-empty, without ':' or control characters");
                return NULL;
            }
            break;
        case CREDENTIALS_IDENTITY_TOKEN:
            if (!o->secret || !*o->secret || has_ctl(o->secret, strlen(o->secret))) {
                errmsg_set(err, errlen, "credentials: an identity token must be non-empty, without control characters");
                return NULL;
            }
            break;
        case CREDENTIALS_HELPER:
            if (!o->helper || o->helper[0] != '/' || !o->server_url || !*o->server_url ||
                has_ctl(o->server_url, strlen(o->server_url)) || o->timeout_ms < 0 || o->cache_seconds < 0) {
                errmsg_set(err, errlen, "credentials: a helper needs an absolute path, a server URL and limits >= 0");
                return NULL;
            }
            break;
        default:
            errmsg_set(err, errlen, "credentials: unknown kind");
            return NULL;
    }
    credentials *c = calloc(1, sizeof *c);
    if (!c) {
        errmsg_set(err, errlen, "credentials: out of memory");
        return NULL;
    }
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->done, NULL);
    c->kind = o->kind;
    c->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : CREDENTIALS_DEFAULT_TIMEOUT_MS;
    c->cache_seconds = o->cache_seconds;
    bool ok = true;
    char acct[PATH_MAX + 64];
    switch (o->kind) {
        case CREDENTIALS_NONE:
            snprintf(acct, sizeof acct, "anonymous");
            break;
        case CREDENTIALS_STATIC:
            ok = (c->username = strdup(o->username)) && (c->secret = strdup(o->secret ? o->secret : ""));
            snprintf(acct, sizeof acct, "user %s", o->username);
            break;
        case CREDENTIALS_IDENTITY_TOKEN:
            ok = (c->secret = strdup(o->secret)) != NULL;
            snprintf(acct, sizeof acct, "identity token");
            break;
        case CREDENTIALS_HELPER:
            ok = (c->helper = strdup(o->helper)) && (c->server_url = strdup(o->server_url));
            snprintf(acct, sizeof acct, "credential helper %s", o->helper);
            break;
    }
    if (!ok || !(c->account = strdup(acct))) {
        credentials_free(c);
        errmsg_set(err, errlen, "credentials: out of memory");
        return NULL;
    }
    return c;
}

void credentials_free(credentials *c) {
    if (!c) return;
    free(c->username);
    secret_free(c->secret);
    free(c->helper);
    free(c->server_url);
    free(c->account);
    credential_clear(&c->kept);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->done);
    free(c);
}

credentials_kind credentials_get_kind(const credentials *c) { return c ? c->kind : CREDENTIALS_NONE; }

const char *credentials_account(const credentials *c) { return c ? c->account : "anonymous"; }

const char *credentials_static_username(const credentials *c) {
    return c && c->kind == CREDENTIALS_STATIC ? c->username : NULL;
}

/* Ask the helper (the caller holds no lock and set running); keep the answer. */
static int helper_run_and_keep(credentials *c, credential *out, char *err, size_t errlen) {
    credential got;
    char why[512], msg[sizeof c->last_err];
    int rc = credentials_run_helper(c->helper, c->server_url, c->timeout_ms, &got, why, sizeof why);
    pthread_mutex_lock(&c->mu);
    c->running = false;
    c->runs++;
    if (rc == 0) {
        credential_clear(&c->kept);
        c->kept = got;
        c->kept.serial = ++c->serial;
        c->have = true;
        c->expires_ms = clock_monotonic_ms() + c->cache_seconds * 1000;
        if (credential_copy(out, &c->kept) != 0) {
            rc = -1;
            snprintf(why, sizeof why, "out of memory");
        }
    }
    c->last_rc = rc;
    if (rc != 0)
        snprintf(c->last_err, sizeof c->last_err, "credential helper %s (asked about %s): %s", c->helper, c->server_url,
                 why);
    snprintf(msg, sizeof msg, "%s", c->last_err);
    pthread_cond_broadcast(&c->done);
    pthread_mutex_unlock(&c->mu);
    if (rc != 0) {
        errmsg_set(err, errlen, "%s", msg);
        log_warn("%s", msg);
    } else if (!out->username) {
        log_info("credential helper %s has no credentials for %s: anonymous", c->helper, c->server_url);
    } else {
        log_info("credential helper %s answered for %s (%s%s, kept %ld s)", c->helper, c->server_url,
                 out->identity_token ? "an identity token" : "user ", out->identity_token ? "" : out->username,
                 c->cache_seconds);
    }
    return rc;
}

int credentials_get(credentials *c, credential *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (!c || c->kind == CREDENTIALS_NONE) return 0;
    if (c->kind == CREDENTIALS_STATIC || c->kind == CREDENTIALS_IDENTITY_TOKEN) {
        credential s = {.username = c->username ? c->username : (char *)CREDENTIALS_TOKEN_USERNAME,
                        .secret = c->secret,
                        .identity_token = c->kind == CREDENTIALS_IDENTITY_TOKEN};
        if (credential_copy(out, &s) != 0) {
            errmsg_set(err, errlen, "credentials: out of memory");
            return -1;
        }
        return 0;
    }
    pthread_mutex_lock(&c->mu);
    for (;;) {
        if (c->have && clock_monotonic_ms() < c->expires_ms) {
            int rc = credential_copy(out, &c->kept);
            pthread_mutex_unlock(&c->mu);
            if (rc != 0) errmsg_set(err, errlen, "credentials: out of memory");
            return rc;
        }
        if (!c->running) break;
        /* Someone is asking the helper: take that run's answer. */
        uint64_t runs = c->runs;
        while (c->running && c->runs == runs) pthread_cond_wait(&c->done, &c->mu);
        if (c->runs != runs) {
            int rc = c->last_rc;
            if (rc == 0 && c->have)
                rc = credential_copy(out, &c->kept);
            else if (rc == 0)
                continue; /* refused meanwhile: ask again */
            if (rc != 0) errmsg_set(err, errlen, "%s", c->last_rc ? c->last_err : "credentials: out of memory");
            pthread_mutex_unlock(&c->mu);
            return rc;
        }
    }
    c->running = true;
    pthread_mutex_unlock(&c->mu);
    return helper_run_and_keep(c, out, err, errlen);
}

bool credentials_refused(credentials *c, const credential *used) {
    if (!c || c->kind != CREDENTIALS_HELPER) return false;
    pthread_mutex_lock(&c->mu);
    if (c->have && (!used || c->kept.serial == used->serial)) {
        c->have = false;
        credential_clear(&c->kept);
    }
    pthread_mutex_unlock(&c->mu);
    return true;
}
