/* credentials: helper output parsing, helper runs (scripts written here),
 * finding helpers, the kept answer and its refusal. */
#include "regfacade/credentials.h"

#include "unit.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static char dir[256];

static void parse(void) {
    credential cr;
    char err[256];
    const char *ok = "{\"ServerURL\":\"h\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}";
    CHECK(credentials_parse_helper_output(ok, strlen(ok), &cr, err, sizeof err) == 0);
    CHECK_STR(cr.username, "alice");
    CHECK_STR(cr.secret, "s3cret");
    CHECK(!cr.identity_token);
    credential_clear(&cr);
    CHECK(cr.username == NULL && cr.secret == NULL);

    const char *tok = "{\"Username\":\"<token>\",\"Secret\":\"refresh-1\"}";
    CHECK(credentials_parse_helper_output(tok, strlen(tok), &cr, err, sizeof err) == 0);
    CHECK(cr.identity_token);
    CHECK_STR(cr.secret, "refresh-1");
    credential_clear(&cr);

    /* Nothing stored: anonymous. */
    const char *none = "{\"Username\":\"\",\"Secret\":\"\"}";
    CHECK(credentials_parse_helper_output(none, strlen(none), &cr, err, sizeof err) == 0);
    CHECK(cr.username == NULL);

    static const struct {
        const char *out, *err_part;
    } bad[] = {
        {"hunter2", "not JSON"},
        {"", "not JSON"},
        {"[\"hunter2\"]", "not a JSON object"},
        {"{\"Username\":\"a\"}", "no \"Secret\" string"},
        {"{\"Username\":\"a\",\"Secret\":5}", "no \"Secret\" string"},
        {"{\"Username\":[],\"Secret\":\"hunter2\"}", "\"Username\" is not a string"},
        {"{\"Username\":\"a\\n\",\"Secret\":\"hunter2\"}", "control characters"},
        {"{\"Username\":\"\",\"Secret\":\"hunter2\"}", "no \"Username\""},
        {"{\"Username\":\"a:b\",\"Secret\":\"hunter2\"}", "holds a ':'"},
        {"{\"Username\":\"<token>\",\"Secret\":\"\"}", "empty \"Secret\""},
    };
    for (size_t i = 0; i < COUNT(bad); i++) {
        err[0] = '\0';
        int rc = credentials_parse_helper_output(bad[i].out, strlen(bad[i].out), &cr, err, sizeof err);
        if (rc != -1 || !strstr(err, bad[i].err_part))
            fprintf(stderr, "parse(%s) = %d, err \"%s\", want \"%s\"\n", bad[i].out, rc, err, bad[i].err_part);
        CHECK(rc == -1);
        CHECK(strstr(err, bad[i].err_part) != NULL);
        CHECK(strstr(err, "hunter2") == NULL); /* never quoted */
        CHECK(cr.username == NULL && cr.secret == NULL);
    }
}

/* Write an executable script dir/NAME; returns its path (static buffer). */
static const char *script(const char *name, const char *body) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return path;
    fprintf(f, "#!/bin/sh\n%s\n", body);
    fclose(f);
    CHECK(chmod(path, 0755) == 0);
    return path;
}

static void run(void) {
    credential cr;
    char err[512], p[512];

    /* stdin is the server URL; the environment is minimal; argv[1] is get. */
    setenv("RF_UNIT_LEAK", "must-not-reach-helper", 1);
    setenv("HOME", "/nonexistent-home", 1); /* the user's home is passed, not this */
    snprintf(p, sizeof p, "%s",
             script("docker-credential-good", "[ \"$1\" = get ] || exit 9\n"
                                              "read -r url || true\n"
                                              "[ -z \"$RF_UNIT_LEAK\" ] || exit 8\n"
                                              "[ \"$HOME\" = \"$(getent passwd $(id -u) | cut -d: -f6)\" ] || exit 7\n"
                                              "printf '{\"ServerURL\":\"%s\",\"Username\":\"u\",\"Secret\":\"pw-%s\"}' "
                                              "\"$url\" \"$url\""));
    CHECK(credentials_run_helper(p, "reg.example:5000", 5000, &cr, err, sizeof err) == 0);
    CHECK_STR(cr.username, "u");
    CHECK_STR(cr.secret, "pw-reg.example:5000");
    credential_clear(&cr);
    unsetenv("RF_UNIT_LEAK");

    snprintf(p, sizeof p, "%s",
             script("docker-credential-none", "echo 'credentials not found in native keychain'; exit 1"));
    CHECK(credentials_run_helper(p, "h", 5000, &cr, err, sizeof err) == 0);
    CHECK(cr.username == NULL);

    snprintf(p, sizeof p, "%s", script("docker-credential-fails", "echo 'token expired for h' >&2; exit 3"));
    CHECK(credentials_run_helper(p, "h", 5000, &cr, err, sizeof err) == -1);
    CHECK(strstr(err, "exited with status 3: token expired for h") != NULL);

    /* A failing helper's JSON-looking output is not shown. */
    snprintf(p, sizeof p, "%s", script("docker-credential-failjson", "echo '{\"Secret\":\"hunter2\"}'; exit 1"));
    CHECK(credentials_run_helper(p, "h", 5000, &cr, err, sizeof err) == -1);
    CHECK(strstr(err, "exited with status 1") != NULL);
    CHECK(strstr(err, "hunter2") == NULL);

    snprintf(p, sizeof p, "%s", script("docker-credential-garbage", "echo 'hunter2 is the password'"));
    CHECK(credentials_run_helper(p, "h", 5000, &cr, err, sizeof err) == -1);
    CHECK(strstr(err, "not JSON") != NULL);
    CHECK(strstr(err, "hunter2") == NULL);

    /* A hang: killed at the limit, together with what it started. */
    snprintf(p, sizeof p, "%s", script("docker-credential-hang", "sleep 600 & echo $! > \"$0.pid\"; wait"));
    CHECK(credentials_run_helper(p, "h", 300, &cr, err, sizeof err) == -1);
    CHECK(strstr(err, "gave no answer within 300 ms (killed)") != NULL);
    char pidfile[600];
    snprintf(pidfile, sizeof pidfile, "%s.pid", p);
    FILE *pf = fopen(pidfile, "r");
    long child = 0;
    CHECK(pf && fscanf(pf, "%ld", &child) == 1);
    if (pf) fclose(pf);
    /* The sleep was in the helper's group: gone (or a zombie of init). */
    for (int i = 0; i < 200 && child > 0 && kill((pid_t)child, 0) == 0; i++) usleep(10000);
    char stat_path[64], state = '?';
    snprintf(stat_path, sizeof stat_path, "/proc/%ld/stat", child);
    FILE *sf = fopen(stat_path, "r");
    if (sf) {
        CHECK(fscanf(sf, "%*d %*s %c", &state) == 1);
        fclose(sf);
    }
    CHECK(!sf || state == 'Z');

    /* Too much output. */
    snprintf(p, sizeof p, "%s", script("docker-credential-big", "yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"));
    CHECK(credentials_run_helper(p, "h", 5000, &cr, err, sizeof err) == -1);
    CHECK(strstr(err, "printed more than") != NULL);

    snprintf(p, sizeof p, "%s", script("docker-credential-signal", "kill -9 $$"));
    CHECK(credentials_run_helper(p, "h", 5000, &cr, err, sizeof err) == -1);
    CHECK(strstr(err, "killed by signal 9") != NULL);

    snprintf(p, sizeof p, "%s/no-such-helper", dir);
    CHECK(credentials_run_helper(p, "h", 5000, &cr, err, sizeof err) == -1);
    CHECK(strstr(err, "cannot start it") != NULL);
}

static void find(void) {
    char out[600], err[600];
    CHECK(credentials_find_helper("good", NULL, dir, out, sizeof out, err, sizeof err) == 0);
    char want[600];
    snprintf(want, sizeof want, "%s/docker-credential-good", dir);
    CHECK_STR(out, want);
    char path[700];
    snprintf(path, sizeof path, "/nonexistent:%s", dir);
    CHECK(credentials_find_helper("good", NULL, path, out, sizeof out, err, sizeof err) == 0);
    CHECK(credentials_find_helper("missing", NULL, dir, out, sizeof out, err, sizeof err) == -1);
    CHECK(strstr(err, "docker-credential-missing: not found on PATH") != NULL);
    /* A path: absolute, or relative to the config's folder. */
    CHECK(credentials_find_helper(want, NULL, NULL, out, sizeof out, err, sizeof err) == 0);
    CHECK(credentials_find_helper("./docker-credential-good", dir, NULL, out, sizeof out, err, sizeof err) == 0);
    /* Not executable, or not a file. */
    char plain[600];
    snprintf(plain, sizeof plain, "%s/docker-credential-plain", dir);
    FILE *f = fopen(plain, "w");
    CHECK(f != NULL);
    if (f) fclose(f);
    CHECK(credentials_find_helper(plain, NULL, NULL, out, sizeof out, err, sizeof err) == -1);
    CHECK(strstr(err, "not executable") != NULL);
    CHECK(credentials_find_helper("plain", NULL, dir, out, sizeof out, err, sizeof err) == -1);
    CHECK(strstr(err, "not executable") != NULL);
    CHECK(credentials_find_helper(dir, NULL, NULL, out, sizeof out, err, sizeof err) == -1);
    CHECK(strstr(err, "not a regular file") != NULL);

    credentials_server_url("registry-1.docker.io", out, sizeof out);
    CHECK_STR(out, "https://index.docker.io/v1/");
    credentials_server_url("127.0.0.1:5000", out, sizeof out);
    CHECK_STR(out, "127.0.0.1:5000");
}

typedef struct {
    credentials *c;
    int rc;
    char user[64];
} getter;

static void *get_thread(void *ud) {
    getter *g = ud;
    credential cr;
    char err[256];
    g->rc = credentials_get(g->c, &cr, err, sizeof err);
    snprintf(g->user, sizeof g->user, "%s", cr.username ? cr.username : "");
    credential_clear(&cr);
    return NULL;
}

static int count_lines(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    int n = 0, ch;
    while ((ch = fgetc(f)) != EOF) n += ch == '\n';
    fclose(f);
    return n;
}

static void source(void) {
    char err[512], log[600], body[1400];
    credential cr;
    snprintf(log, sizeof log, "%s/counted.log", dir);
    /* Each run logs a line and answers user N (N = runs so far); it is slow
     * enough that concurrent callers overlap. */
    snprintf(body, sizeof body,
             "echo run >> '%s'\nsleep 0.3\nn=$(wc -l < '%s')\n"
             "printf '{\"Username\":\"user%%s\",\"Secret\":\"pw\"}' $n",
             log, log);
    char helper[600];
    snprintf(helper, sizeof helper, "%s", script("docker-credential-counted", body));
    credentials_options o = {.kind = CREDENTIALS_HELPER, .helper = helper, .server_url = "h", .cache_seconds = 300};
    credentials *c = credentials_new(&o, err, sizeof err);
    CHECK(c != NULL);
    if (!c) return;
    CHECK(strstr(credentials_account(c), "credential helper ") == credentials_account(c));

    /* Four callers at once: one run. */
    pthread_t t[4];
    getter g[4];
    for (int i = 0; i < 4; i++) {
        g[i] = (getter){.c = c};
        CHECK(pthread_create(&t[i], NULL, get_thread, &g[i]) == 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        CHECK(g[i].rc == 0);
        CHECK_STR(g[i].user, "user1");
    }
    CHECK(count_lines(log) == 1);
    /* Kept: no second run. */
    CHECK(credentials_get(c, &cr, err, sizeof err) == 0);
    CHECK_STR(cr.username, "user1");
    CHECK(count_lines(log) == 1);
    /* Refused: asked again. A stale refusal (an older answer) changes nothing. */
    credential old = cr;
    CHECK(credentials_refused(c, &cr));
    CHECK(credentials_get(c, &cr, err, sizeof err) == 0);
    CHECK_STR(cr.username, "user2");
    CHECK(count_lines(log) == 2);
    CHECK(credentials_refused(c, &old));
    credential_clear(&old);
    credential_clear(&cr);
    CHECK(credentials_get(c, &cr, err, sizeof err) == 0);
    CHECK_STR(cr.username, "user2");
    CHECK(count_lines(log) == 2);
    credential_clear(&cr);
    credentials_free(c);

    /* cache_seconds 0: asked for every use. */
    o.cache_seconds = 0;
    c = credentials_new(&o, err, sizeof err);
    CHECK(c != NULL);
    CHECK(credentials_get(c, &cr, err, sizeof err) == 0);
    credential_clear(&cr);
    CHECK(credentials_get(c, &cr, err, sizeof err) == 0);
    CHECK_STR(cr.username, "user4");
    credential_clear(&cr);
    credentials_free(c);

    /* A failing helper: an error naming it, nothing kept. */
    credentials_options f = {.kind = CREDENTIALS_HELPER,
                             .helper = script("docker-credential-f", "exit 2"),
                             .server_url = "reg:1",
                             .cache_seconds = 300};
    c = credentials_new(&f, err, sizeof err);
    CHECK(c != NULL);
    CHECK(credentials_get(c, &cr, err, sizeof err) == -1);
    CHECK(strstr(err, "docker-credential-f (asked about reg:1): exited with status 2") != NULL);
    credentials_free(c);

    /* Static and identity token sources. */
    credentials_options s = {.kind = CREDENTIALS_STATIC, .username = "bob", .secret = "pw"};
    c = credentials_new(&s, err, sizeof err);
    CHECK(c && credentials_get(c, &cr, err, sizeof err) == 0);
    CHECK_STR(cr.username, "bob");
    CHECK(!cr.identity_token);
    CHECK(!credentials_refused(c, &cr)); /* asking again cannot help */
    CHECK_STR(credentials_account(c), "user bob");
    CHECK_STR(credentials_static_username(c), "bob");
    credential_clear(&cr);
    credentials_free(c);
    credentials_options it = {.kind = CREDENTIALS_IDENTITY_TOKEN, .secret = "rt"};
    c = credentials_new(&it, err, sizeof err);
    CHECK(c && credentials_get(c, &cr, err, sizeof err) == 0);
    CHECK(cr.identity_token);
    CHECK_STR(cr.secret, "rt");
    CHECK(credentials_static_username(c) == NULL);
    CHECK_STR(credentials_account(c), "identity token");
    credential_clear(&cr);
    credentials_free(c);
    credentials_options bad = {.kind = CREDENTIALS_HELPER, .helper = "relative", .server_url = "h"};
    CHECK(credentials_new(&bad, err, sizeof err) == NULL);
    credentials_options badu = {.kind = CREDENTIALS_STATIC, .username = "a:b", .secret = "x"};
    CHECK(credentials_new(&badu, err, sizeof err) == NULL);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN); /* as regfacade does */
    snprintf(dir, sizeof dir, "/tmp/rf-unit-creds-XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    parse();
    run();
    find();
    source();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return UNIT_DONE("credentials");
}
