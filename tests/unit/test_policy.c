/* Unit tests of the policy runtime without a server: regfacade.shared's C
 * dictionary (TTL, LRU cap, atomic incr under threads), crypt_verify, and
 * policy.c driven through its public face (hooks, answers, budgets, state
 * rebuilt, reload good/broken/good, credential sets, ctx between hooks). */
#include <crypt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/config.h"
#include "regfacade/lua_regfacade.h"
#include "regfacade/lua_shared.h"
#include "regfacade/policy.h"
#include "unit.h"

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---------- shared dictionary ---------- */

static void test_shared_basics(void) {
    shared_dict *d = shared_dict_new(64 * 1024);
    shared_value v = {.type = SHARED_STR, .s = "hello", .len = 5}, out;
    char buf[16];
    CHECK(shared_dict_set(d, "k", 1, &v, 0) == SHARED_OK);
    CHECK(shared_dict_get(d, "k", 1, &out, buf, sizeof buf) == SHARED_OK);
    CHECK(out.type == SHARED_STR && out.len == 5 && memcmp(out.s, "hello", 5) == 0);
    CHECK(shared_dict_get(d, "k", 1, &out, buf, 2) == SHARED_TOO_LARGE && out.len == 5);
    CHECK(shared_dict_get(d, "nope", 4, &out, buf, sizeof buf) == SHARED_NOT_FOUND);
    CHECK(shared_dict_add(d, "k", 1, &v, 0) == SHARED_EXISTS);
    shared_value one = {.type = SHARED_INT, .i = 1}, zero = {.type = SHARED_INT, .i = 0};
    CHECK(shared_dict_incr(d, "n", 1, &one, NULL, 0, &out) == SHARED_NOT_FOUND);
    CHECK(shared_dict_incr(d, "n", 1, &one, &zero, 0, &out) == SHARED_OK && out.i == 1);
    CHECK(shared_dict_incr(d, "k", 1, &one, NULL, 0, &out) == SHARED_NOT_NUMBER);
    shared_value half = {.type = SHARED_NUM, .n = 0.5};
    CHECK(shared_dict_incr(d, "n", 1, &half, NULL, 0, &out) == SHARED_OK && out.type == SHARED_NUM && out.n == 1.5);
    shared_value max = {.type = SHARED_INT, .i = INT64_MAX};
    shared_dict_set(d, "max", 3, &max, 0);
    CHECK(shared_dict_incr(d, "max", 3, &one, NULL, 0, &out) == SHARED_OVERFLOW);
    /* TTL */
    CHECK(shared_dict_set(d, "t", 1, &v, 0.05) == SHARED_OK);
    double left = -1;
    CHECK(shared_dict_ttl(d, "t", 1, &left) == SHARED_OK && left > 0 && left <= 0.05);
    sleep_ms(80);
    CHECK(shared_dict_get(d, "t", 1, &out, buf, sizeof buf) == SHARED_NOT_FOUND);
    CHECK(shared_dict_add(d, "t", 1, &v, 0) == SHARED_OK);
    CHECK(shared_dict_delete(d, "t", 1) == SHARED_OK);
    CHECK(shared_dict_get(d, "t", 1, &out, buf, sizeof buf) == SHARED_NOT_FOUND);
    shared_dict_free(d);
}

static void test_shared_cap_lru(void) {
    shared_dict *d = shared_dict_new(8192);
    char key[32], val[100];
    memset(val, 'v', sizeof val);
    shared_value v = {.type = SHARED_STR, .s = val, .len = sizeof val};
    for (int i = 0; i < 1000; i++) {
        int n = snprintf(key, sizeof key, "key%d", i);
        CHECK(shared_dict_set(d, key, (size_t)n, &v, 0) == SHARED_OK);
        if (i == 10) { /* touch key0: it becomes recently used */
            shared_value out;
            char buf[128];
            shared_dict_get(d, "key0", 4, &out, buf, sizeof buf);
        }
    }
    size_t cap, count;
    size_t used = shared_dict_used(d, &cap, &count);
    CHECK(used <= cap && cap == 8192 && count > 10);
    shared_value out;
    char buf[128];
    CHECK(shared_dict_get(d, "key999", 6, &out, buf, sizeof buf) == SHARED_OK);
    CHECK(shared_dict_get(d, "key1", 4, &out, buf, sizeof buf) == SHARED_NOT_FOUND);
    char big[9000];
    shared_value b = {.type = SHARED_STR, .s = big, .len = sizeof big};
    CHECK(shared_dict_set(d, "big", 3, &b, 0) == SHARED_TOO_LARGE);
    shared_dict_free(d);
}

typedef struct {
    shared_dict *d;
    int n;
} incr_job;

static void *incr_worker(void *arg) {
    incr_job *j = arg;
    shared_value one = {.type = SHARED_INT, .i = 1}, zero = {.type = SHARED_INT, .i = 0}, out;
    for (int i = 0; i < j->n; i++) {
        shared_dict_incr(j->d, "hits", 4, &one, &zero, 0, &out);
        shared_value v = {.type = SHARED_INT, .i = i};
        char key[32];
        int kl = snprintf(key, sizeof key, "k%d", i % 97);
        shared_dict_set(j->d, key, (size_t)kl, &v, 0.001 * (i % 5));
        shared_dict_add(j->d, "once", 4, &v, 0);
    }
    return NULL;
}

static void test_shared_threads(void) {
    shared_dict *d = shared_dict_new(1024 * 1024);
    pthread_t t[8];
    incr_job j = {d, 20000};
    for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, incr_worker, &j);
    for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    shared_value out;
    char buf[16];
    CHECK(shared_dict_get(d, "hits", 4, &out, buf, sizeof buf) == SHARED_OK && out.i == 8 * 20000);
    shared_dict_free(d);
    /* the process dictionary is one, refcounted */
    shared_dict *a = shared_dict_acquire(4096), *b = shared_dict_acquire(8192);
    CHECK(a == b);
    size_t cap;
    shared_dict_used(a, &cap, NULL);
    CHECK(cap == 8192);
    shared_dict_release(a);
    shared_dict_release(b);
}

static void test_crypt_verify(void) {
    char setting[CRYPT_GENSALT_OUTPUT_SIZE];
    CHECK(crypt_gensalt_rn("$2b$", 4, NULL, 0, setting, sizeof setting) != NULL);
    struct crypt_data data;
    memset(&data, 0, sizeof data);
    const char *hash = crypt_r("pw-1", setting, &data);
    CHECK(hash && hash[0] == '$');
    char h[256];
    snprintf(h, sizeof h, "%s", hash);
    CHECK(regfacade_crypt_verify("pw-1", h) == 1);
    CHECK(regfacade_crypt_verify("pw-2", h) == 0);
    CHECK(regfacade_crypt_verify("pw-1", "") == 0);
    CHECK(regfacade_crypt_verify("pw-1", "ab") == 0); /* DES: refused */
    CHECK(regfacade_crypt_verify("pw-1", "$2y$05$garbage") == 0);
    /* htpasswd -B writes $2y$ */
    CHECK(regfacade_crypt_verify("alice-password", "$2y$05$xf80luoU5Ww6OhlO6p4KcutiF9PCRUvaxAQbJg9YYmhuMdC8j7dK2") ==
          1);
}

/* ---------- policy.c ---------- */

static char dir[256];

static void write_file(const char *name, const char *text) {
    char p[512], tmp[520];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", p);
    FILE *f = fopen(tmp, "w");
    fputs(text, f);
    fclose(f);
    rename(tmp, p);
}

static config *load_config(const char *policy_extra) {
    char text[2048];
    snprintf(text, sizeof text,
             "{\"cache\":{\"dir\":\"cache\"},\"upstreams\":{\"up\":{\"url\":\"http://127.0.0.1:9\","
             "\"credentials\":{\"team\":{\"username\":\"u\",\"password_file\":\"secret\"}}}},"
             "\"policy\":{\"file\":\"policy.lua\"%s}}",
             policy_extra);
    write_file("config.json", text);
    char p[512], err[1024];
    snprintf(p, sizeof p, "%s/config.json", dir);
    config *c = config_load(p, err, sizeof err);
    if (!c) fprintf(stderr, "config: %s\n", err);
    return c;
}

static const char *POLICY_V1 =
    "local rf = require 'regfacade'\n"
    "return {\n"
    "  authorize = function(req)\n"
    "    if req.repository == 'deny/x' then return false, 'no' end\n"
    "    if req.repository == 'auth/x' then return { status = 401, challenge = 'Bearer realm=\"r\"' } end\n"
    "    if req.client.token == 'team-token' then req.ctx.who = 'team' return { credentials = 'team' } end\n"
    "    req.ctx.who = 'anyone'\n"
    "    return true\n"
    "  end,\n"
    "  resolve = function(req)\n"
    "    if req.repository == 'loop/x' then while true do end end\n"
    "    if req.repository == 'mem/x' then local t = {} for i = 1, 1e9 do t[i] = string.rep('m', 2000) .. i end end\n"
    "    if req.repository == 'bad/x' then return { upstream = 'nowhere' } end\n"
    "    return { upstream = 'up', repository = 'v1/' .. req.ctx.who }\n"
    "  end,\n"
    "}\n";

static void test_policy_hooks(void) {
    write_file("secret", "pw\n");
    write_file("policy.lua", POLICY_V1);
    config *c = load_config(",\"hook_instructions\":100000,\"memory_bytes\":4194304");
    CHECK(c != NULL);
    if (!c) return;
    char err[2048];
    policy *p = policy_new(c, err, sizeof err);
    CHECK(p != NULL);
    if (!p) {
        fprintf(stderr, "%s\n", err);
        config_free(c);
        return;
    }
    policy_state st = {0};
    policy_request req = {.method = "GET",
                          .kind = "manifest",
                          .repository = "acme/app",
                          .reference = "v1",
                          .client_ip = "127.0.0.1",
                          .state = &st};
    policy_error e;
    policy_resolution res;
    CHECK(policy_authorize(p, &req, &e) == 0);
    CHECK(st.ctx != NULL && st.credentials[0] == '\0');
    CHECK(policy_resolve(p, &req, &res, &e) == 0);
    CHECK_STR(res.upstream, "up");
    CHECK_STR(res.repository, "v1/anyone"); /* ctx from authorize reached resolve */
    policy_resolution_clear(&res);
    policy_state_clear(&st);

    req.token = "team-token";
    CHECK(policy_authorize(p, &req, &e) == 0);
    CHECK_STR(st.credentials, "team");
    CHECK(policy_resolve(p, &req, &res, &e) == 0);
    CHECK_STR(res.upstream, "up@team");
    policy_resolution_clear(&res);
    policy_state_clear(&st);
    req.token = NULL;

    req.repository = "deny/x";
    CHECK(policy_authorize(p, &req, &e) == -1 && e.status == 403 && strcmp(e.code, "DENIED") == 0 &&
          strcmp(e.message, "no") == 0);
    req.repository = "auth/x";
    CHECK(policy_authorize(p, &req, &e) == -1 && e.status == 401 && strcmp(e.challenge, "Bearer realm=\"r\"") == 0);
    req.repository = "bad/x";
    policy_authorize(p, &req, &e);
    CHECK(policy_resolve(p, &req, &res, &e) == -1 && e.status == 500 && strstr(e.message, "nowhere"));
    /* budgets: the request fails, the next one is served by a rebuilt state */
    req.repository = "loop/x";
    CHECK(policy_resolve(p, &req, &res, &e) == -1 && e.status == 500 && strstr(e.message, "instruction budget") &&
          strstr(e.message, "policy.lua:11"));
    req.repository = "mem/x";
    CHECK(policy_resolve(p, &req, &res, &e) == -1 && e.status == 500 && strstr(e.message, "memory cap"));
    req.repository = "acme/app";
    policy_state_clear(&st);
    CHECK(policy_authorize(p, &req, &e) == 0);
    CHECK(policy_resolve(p, &req, &res, &e) == 0);
    policy_resolution_clear(&res);
    policy_state_clear(&st);
    CHECK(!policy_has_rewrite(p));

    /* reload: good -> broken (rejected) -> good */
    char fp1[65];
    snprintf(fp1, sizeof fp1, "%s", policy_fingerprint(p));
    write_file("policy.lua", "return { resolve = function(req) return { upstream = 'up' } end\n");
    CHECK(policy_reload(p, err, sizeof err) == -1 && strstr(err, "policy.lua:"));
    CHECK_STR(policy_fingerprint(p), fp1);
    CHECK(policy_authorize(p, &req, &e) == 0);
    CHECK(policy_resolve(p, &req, &res, &e) == 0); /* still generation 1 */
    CHECK_STR(res.repository, "v1/anyone");
    policy_resolution_clear(&res);
    policy_state_clear(&st);
    write_file("policy.lua", "return { resolve = function(req) return { upstream = 'up', repository = 'v2' } end,\n"
                             "  rewrite = function(img, req) end }\n");
    CHECK(policy_reload(p, err, sizeof err) == 0);
    CHECK(strcmp(policy_fingerprint(p), fp1) != 0);
    CHECK(policy_resolve(p, &req, &res, &e) == 0);
    CHECK_STR(res.repository, "v2");
    CHECK(policy_has_rewrite(p));
    policy_resolution_clear(&res);
    /* self_check refusing: rejected */
    write_file("policy.lua", "return { self_check = function() return false, 'not ready' end }\n");
    CHECK(policy_reload(p, err, sizeof err) == -1 && strstr(err, "not ready"));
    CHECK(policy_resolve(p, &req, &res, &e) == 0);
    CHECK_STR(res.repository, "v2");
    policy_resolution_clear(&res);
    policy_state_clear(&st);
    policy_free(p);
    config_free(c);
}

static void test_policy_watch(void) {
    write_file("policy.lua", "return { resolve = function(req) return { upstream = 'up', repository = 'w1' } end }\n");
    config *c = load_config("");
    char err[1024];
    policy *p = c ? policy_new(c, err, sizeof err) : NULL;
    CHECK(p != NULL);
    if (!p) {
        config_free(c);
        return;
    }
    policy_request req = {.method = "GET", .kind = "manifest", .repository = "a/b", .reference = "v1"};
    policy_resolution res;
    policy_error e;
    write_file("policy.lua", "return { resolve = function(req) return { upstream = 'up', repository = 'w2' } end }\n");
    sleep_ms(1100);
    CHECK(policy_resolve(p, &req, &res, &e) == 0);
    CHECK_STR(res.repository, "w2");
    policy_resolution_clear(&res);
    policy_free(p);
    config_free(c);
}

static void test_policy_config_errors(void) {
    write_file("policy.lua", "return {}\n");
    char err[1024];
    const char *bad[] = {",\"hook_time_ms\":0", ",\"memory_bytes\":1", ",\"watch\":1", ",\"data_dir\":\"missing\"",
                         ",\"data_files\":[1]"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        config *c = load_config(bad[i]);
        CHECK(c != NULL);
        if (!c) continue;
        policy *p = policy_new(c, err, sizeof err);
        CHECK(p == NULL && strstr(err, "policy."));
        policy_free(p);
        config_free(c);
    }
}

int main(void) {
    test_shared_basics();
    test_shared_cap_lru();
    test_shared_threads();
    test_crypt_verify();
    snprintf(dir, sizeof dir, "/tmp/rf-test-policy-XXXXXX");
    if (!mkdtemp(dir)) return 1;
    test_policy_hooks();
    test_policy_watch();
    test_policy_config_errors();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "cleanup of %s failed\n", dir);
    return UNIT_DONE("policy");
}
