/*
 * test_specs: the spec format check (specs_validate, specs_parse) against a
 * config with upstreams, named layers and a file root; spec ids; the
 * scratch images; the pulled provider's URL.
 */
#include "regfacade/specs.h"

#include "regfacade/spec_pulled.h"
#include "unit.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static char dir[256];

static void write_file(const char *name, const char *text) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    if (!f) {
        perror(p);
        exit(2);
    }
    fputs(text, f);
    fclose(f);
}

static specs *make_specs(config **cfg_out) {
    char text[2048], path[512], err[2048];
    snprintf(
        text, sizeof text,
        "{\"cache\":{\"dir\":\"%s/cache\"},"
        "\"upstreams\":{\"local\":{\"url\":\"http://127.0.0.1:5001\"},\"hub\":{\"url\":\"https://example.com\"}},"
        "\"default_upstream\":\"local\","
        "\"layers\":{\"supervisor\":{\"file\":\"%s/roots/sup.tar\"}},"
        "\"specs\":{\"providers\":{\"p\":{\"type\":\"pushed\"},\"f\":{\"type\":\"fixed\",\"file\":\"fixed.json\"}},"
        "\"file_roots\":[\"roots\"],\"max_bytes\":2048,\"max_depth\":8},"
        "\"admin\":{\"listen\":\"127.0.0.1:5999\",\"token_file\":\"token\"}}",
        dir, dir);
    write_file("c.json", text);
    write_file("token", "0123456789abcdef0123\n");
    write_file("fixed.json", "{\"ws-1\":{\"base\":\"local/acme/app:1.0\"}}");
    write_file("roots/sup.tar", "x");
    write_file("roots/ide.tar", "x");
    write_file("outside.tar", "x");
    snprintf(path, sizeof path, "%s/c.json", dir);
    config *c = config_load(path, err, sizeof err);
    if (!c) {
        fprintf(stderr, "config: %s\n", err);
        exit(2);
    }
    specs *sp = NULL;
    if (specs_new(c, &sp, err, sizeof err) != 0 || !sp) {
        fprintf(stderr, "specs_new: %s\n", err);
        exit(2);
    }
    *cfg_out = c;
    return sp;
}

static void test_ids(void) {
    static const char *const good[] = {"a", "ws-123", "A.b_c-d", "0", "not-a-valid-image", "a..b"};
    static const char *const bad[] = {"", ".", "..", ".a", "-a", "_a", "a/b", "a%2Fb", "a b", "a\\b", "é", "a:b"};
    for (size_t i = 0; i < COUNT(good); i++) CHECK(specs_valid_id(good[i]));
    for (size_t i = 0; i < COUNT(bad); i++) CHECK(!specs_valid_id(bad[i]));
    char id[200];
    memset(id, 'x', sizeof id);
    id[SPECS_ID_MAX] = '\0';
    CHECK(specs_valid_id(id));
    id[SPECS_ID_MAX] = 'x';
    id[SPECS_ID_MAX + 1] = '\0';
    CHECK(!specs_valid_id(id));
    CHECK(!specs_valid_id(NULL));
}

static void test_scratch(void) {
    CHECK_STR(specs_scratch_digest("linux/amd64"),
              "sha256:584a3e8bfbef76e0cd02576a494bcf71d3810fc9c43f8853b9379c2946d4bb3b");
    CHECK_STR(specs_scratch_digest("linux/arm64"),
              "sha256:94cc4d9d26e6f72f78cdb5c47e85d88f0b368ef687d161749dbdb98465b5d076");
    CHECK(specs_scratch_digest("linux/s390x") == NULL);
    const char *m, *c;
    CHECK(specs_scratch_image("linux/amd64", &m, &c) == 0);
    char d[DIGEST_STRING_LEN];
    digest_bytes(m, strlen(m), d);
    CHECK_STR(d, specs_scratch_digest("linux/amd64"));
    CHECK(strstr(c, "\"architecture\":\"amd64\"") != NULL);
}

static void test_urls(void) {
    char *u = spec_pulled_url("https://h/specs/{id}", "ws-1");
    CHECK_STR(u, "https://h/specs/ws-1");
    free(u);
    u = spec_pulled_url("https://h/{id}/spec?x={id}", "a");
    CHECK_STR(u, "https://h/a/spec?x=a");
    free(u);
    u = spec_pulled_url("https://h/specs", "ws-1");
    CHECK_STR(u, "https://h/specs/ws-1");
    free(u);
    u = spec_pulled_url("https://h/specs/", "ws-1");
    CHECK_STR(u, "https://h/specs/ws-1");
    free(u);
}

typedef struct {
    const char *text;
    const char *why; /* NULL: valid */
} vcase;

static void test_validate(specs *sp) {
    char ok_file[600], bad_file[600], link_file[600];
    snprintf(ok_file, sizeof ok_file, "{\"base\":\"local/a:1\",\"layers\":[{\"file\":\"%s/roots/ide.tar\"}]}", dir);
    snprintf(bad_file, sizeof bad_file, "{\"base\":\"local/a:1\",\"layers\":[{\"file\":\"%s/outside.tar\"}]}", dir);
    snprintf(link_file, sizeof link_file,
             "{\"base\":\"local/a:1\",\"layers\":[{\"file\":\"%s/roots/../outside.tar\"}]}", dir);
    const vcase cases[] = {
        {"{\"base\":\"local/acme/app:1.0\"}", NULL},
        {"{\"base\":\"hub/library/alpine@sha256:"
         "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"}",
         NULL},
        {"{\"base\":\"local/acme/app\",\"layers\":[\"base\",\"supervisor\",{\"image\":\"hub/ide:1\",\"skip\":1}],"
         "\"env\":{\"A\":\"1\",\"B\":null,\"PATH\":{\"prepend\":\"/x:\"},\"M\":{\"append\":\":/y\"}},"
         "\"labels\":{\"a\":\"b\",\"c\":null},\"annotations\":{\"x\":\"y\"},\"anything\":{\"goes\":[1,null]}}",
         NULL},
        {"{\"base\":null,\"layers\":[\"supervisor\"],\"platform\":\"linux/arm64\"}", NULL},
        {"{\"layers\":[{\"blob\":\"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\","
         "\"size\":1,\"media_type\":\"m\",\"diff_id\":\"sha256:0123456789abcdef0123456789abcdef0123456789abcdef01234"
         "56789abcdef\",\"upstream\":\"hub\"}]}",
         NULL},
        {ok_file, NULL},
        {"[]", "a spec must be a JSON object"},
        {"{\"base\":1}", "base: must be"},
        {"{\"base\":\"zzz/a:1\"}", "\"zzz\" is not a configured upstream (configured: local, hub)"},
        {"{\"base\":\"local/a:Bad Tag\"}", "is not a valid tag"},
        {"{\"base\":\"local/a@sha256:12\"}", "is not a sha256 digest"},
        {"{\"base\":\"local/a:1\",\"layers\":{}}", "layers: must be an array"},
        {"{\"base\":\"local/a:1\",\"layers\":[\"ide\"]}", "layers[0]: \"ide\" is not a layer in the config's layers "
                                                          "(defined: supervisor)"},
        {"{\"base\":\"local/a:1\",\"layers\":[\"base\",\"base\"]}", "layers[1]: \"base\" may appear once"},
        {"{\"base\":\"local/a:1\",\"layers\":[7]}", "layers[0]: a layer is"},
        {"{\"base\":\"local/a:1\",\"layers\":[{\"image\":\"ide:1\"}]}", "layers[0].image: \"ide:1\" must be UPSTREAM/"},
        {"{\"base\":\"local/a:1\",\"layers\":[{\"image\":\"local/a:1\",\"file\":\"/x\"}]}", "exactly one of"},
        {"{\"base\":\"local/a:1\",\"layers\":[{\"file\":\"rel.tar\"}]}", "must be an absolute path"},
        {bad_file, "is not under any of specs.file_roots"},
        {link_file, "is not under any of specs.file_roots"},
        {"{\"base\":\"local/a:1\",\"layers\":[{\"file\":\"/nonexistent/x.tar\"}]}", "No such file"},
        {"{\"layers\":[{\"blob\":\"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\","
         "\"size\":1,\"media_type\":\"m\",\"diff_id\":\"sha256:0123456789abcdef0123456789abcdef0123456789abcdef01234"
         "56789abcdef\"}]}",
         "must name the upstream it comes from"},
        {"{\"layers\":[{\"blob\":\"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\","
         "\"size\":1,\"media_type\":\"m\",\"diff_id\":\"sha256:0123456789abcdef0123456789abcdef0123456789abcdef01234"
         "56789abcdef\",\"upstream\":\"zzz\"}]}",
         "layers[0].upstream: \"zzz\" is not a configured upstream"},
        {"{\"base\":null}", "needs at least one layer"},
        {"{\"base\":null,\"layers\":[\"base\"]}", "\"base\" needs a base image"},
        {"{\"base\":\"local/a:1\",\"platform\":\"linux/amd64\"}", "platform: only for a spec without base"},
        {"{\"layers\":[\"supervisor\"],\"platform\":\"windows/amd64\"}", "platform: must be"},
        {"{\"base\":\"local/a:1\",\"env\":[]}", "env: must be an object"},
        {"{\"base\":\"local/a:1\",\"env\":{\"\":\"x\"}}", "is not a variable name"},
        {"{\"base\":\"local/a:1\",\"env\":{\"A\":1}}", "env.A: must be"},
        {"{\"base\":\"local/a:1\",\"env\":{\"A\":{\"prepend\":\"x\",\"append\":\"y\"}}}", "env.A: must be"},
        {"{\"base\":\"local/a:1\",\"env\":{\"A\":{\"before\":\"x\"}}}", "env.A: must be"},
        {"{\"base\":\"local/a:1\",\"labels\":{\"a\":[]}}", "labels.a: must be a string"},
        {"{\"base\":\"local/a:1\",\"annotations\":\"x\"}", "annotations: must be an object"},
        {"{\"base\":\"local/a:1\",\"base\":\"local/a:2\"}", "base: given twice"},
        {"{\"base\":\"local/a:1\",\"x\":[[[[[[[[[]]]]]]]]]}", "nesting deeper than 8"},
        {"{\"base\":\"local/a:1\"", "invalid JSON"},
    };
    for (size_t i = 0; i < COUNT(cases); i++) {
        char err[1024] = "";
        json_value *v = specs_parse(sp, cases[i].text, strlen(cases[i].text), err, sizeof err);
        if (!cases[i].why) {
            CHECK(v != NULL);
            if (!v) fprintf(stderr, "  case %zu should pass: %s\n", i, err);
        } else {
            CHECK(v == NULL && strstr(err, cases[i].why) != NULL);
            if (v || !strstr(err, cases[i].why))
                fprintf(stderr, "  case %zu: want \"%s\", got \"%s\"\n", i, cases[i].why, v ? "(valid)" : err);
        }
        json_free(v);
    }
    /* the size limit */
    char big[4096];
    int n = snprintf(big, sizeof big, "{\"base\":\"local/a:1\",\"x\":\"");
    memset(big + n, 'y', 2100);
    snprintf(big + n + 2100, sizeof big - (size_t)n - 2100, "\"}");
    char err[512];
    CHECK(specs_parse(sp, big, strlen(big), err, sizeof err) == NULL && strstr(err, "more than specs.max_bytes"));
}

static void test_fixed_lookup(specs *sp) {
    json_value *v = NULL;
    char why[512];
    CHECK(specs_get(sp, "f", "ws-1", &v, why, sizeof why) == SPECS_FOUND);
    CHECK(v && strcmp(json_object_get_string(v, "base"), "local/acme/app:1.0") == 0);
    json_free(v);
    CHECK(specs_get(sp, "f", "ws-2", &v, why, sizeof why) == SPECS_UNKNOWN && strstr(why, "has no spec \"ws-2\""));
    CHECK(specs_get(sp, "f", "a/b", &v, why, sizeof why) == SPECS_UNKNOWN);
    CHECK(specs_get(sp, "nope", "ws-1", &v, why, sizeof why) == SPECS_UNAVAILABLE);
    CHECK(specs_has_provider(sp, "p") && specs_has_provider(sp, "f") && !specs_has_provider(sp, "x"));
    /* pushed specs need specs_start (the store); before it, nothing is pushed */
    CHECK(specs_get(sp, "p", "ws-1", &v, why, sizeof why) == SPECS_UNKNOWN);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/rf-test-specs-%d", (int)getpid());
    mkdir(dir, 0700);
    char roots[300];
    snprintf(roots, sizeof roots, "%s/roots", dir);
    mkdir(roots, 0700);
    config *c = NULL;
    specs *sp = make_specs(&c);
    test_ids();
    test_scratch();
    test_urls();
    test_validate(sp);
    test_fixed_lookup(sp);
    specs_free(sp);
    config_free(c);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return UNIT_DONE("specs");
}
