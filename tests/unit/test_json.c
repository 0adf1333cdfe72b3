/* Unit tests for src/json.c. */
#include "regfacade/json.h"
#include "unit.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static char errbuf[256];

static json_value *parse(const char *s) {
    return json_parse(s, strlen(s), JSON_DEFAULT_MAX_DEPTH, errbuf, sizeof(errbuf));
}

/* serialize(parse(in)) == want (want NULL means == in). */
static int roundtrip_is(const char *in, const char *want) {
    json_value *v = parse(in);
    if (!v) {
        fprintf(stderr, "parse failed: %s (%s)\n", errbuf, in);
        return 0;
    }
    size_t n = 0;
    char *out = json_serialize(v, &n);
    json_free(v);
    if (!out) return 0;
    if (!want) want = in;
    int ok = n == strlen(want) && memcmp(out, want, n) == 0;
    if (!ok) fprintf(stderr, "roundtrip mismatch:\n in: %s\nout: %s\nwant: %s\n", in, out, want);
    free(out);
    return ok;
}

/* Parse must fail, and the message must contain frag. */
static int fails_with(const char *in, size_t len, const char *frag) {
    errbuf[0] = '\0';
    json_value *v = json_parse(in, len, JSON_DEFAULT_MAX_DEPTH, errbuf, sizeof(errbuf));
    if (v) {
        json_free(v);
        fprintf(stderr, "unexpectedly parsed: %.*s\n", (int)len, in);
        return 0;
    }
    if (strncmp(errbuf, "json: ", 6) != 0 || !strstr(errbuf, frag) || !strstr(errbuf, " at byte ")) {
        fprintf(stderr, "error \"%s\" lacks \"%s\"\n", errbuf, frag);
        return 0;
    }
    return 1;
}

static char *ser(const json_value *v) { return json_serialize(v, NULL); }

static const char DOCKER_MANIFEST[] =
    "{\"schemaVersion\":2,"
    "\"mediaType\":\"application/vnd.docker.distribution.manifest.v2+json\","
    "\"config\":{\"mediaType\":\"application/vnd.docker.container.image.v1+json\","
    "\"size\":7023,"
    "\"digest\":\"sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7\"},"
    "\"layers\":["
    "{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"size\":32654,"
    "\"digest\":\"sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f\"},"
    "{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"size\":16724,"
    "\"digest\":\"sha256:3c3a4604a545cdc127456d94e421cd355bca5b528f4a9c1905b15da2eb4a4c6b\"},"
    "{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"size\":9007199254740993,"
    "\"digest\":\"sha256:ec4b8955958665577945c89419d1af06b5f7636b4ac3da7f12184802ad867736\","
    "\"urls\":[\"https://example.com/a?x=1&y=<2>\"]}]}";

static const char OCI_CONFIG[] =
    "{\"created\":\"2024-01-02T03:04:05.123456789Z\",\"author\":\"Jo \\\"J\\\" <jo@example.com>\","
    "\"architecture\":\"amd64\",\"os\":\"linux\","
    "\"config\":{\"User\":\"1000:1000\",\"ExposedPorts\":{\"8080/tcp\":{}},\"Env\":[],"
    "\"Entrypoint\":[\"/bin/sh\",\"-c\"],\"Cmd\":[\"echo hi && sleep 1\\n\"],"
    "\"Volumes\":{\"/data\":{}},\"WorkingDir\":\"/srv\","
    "\"Labels\":{\"org.opencontainers.image.title\":\"caf\xc3\xa9 \xe2\x98\x95\"},"
    "\"StopSignal\":\"SIGTERM\",\"Healthcheck\":null,\"ArgsEscaped\":true},"
    "\"container_config\":{\"Hostname\":\"\",\"Tty\":false,\"Cmd\":[\"/bin/sh\",\"-c\",\"#(nop) ADD file:abc in / \"],"
    "\"Image\":\"sha256:0123\",\"OnBuild\":null},"
    "\"rootfs\":{\"type\":\"layers\",\"diff_ids\":["
    "\"sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef\","
    "\"sha256:e7b8ba5eabe5d5e9c1b1b6d2fd2e9e5b9ffb7d6f2b0fcbb6a7c4e0b6bcb9e2f1\"]},"
    "\"history\":["
    "{\"created\":\"2024-01-01T00:00:00Z\",\"created_by\":\"/bin/sh -c #(nop) ADD file:abc in / \"},"
    "{\"created\":\"2024-01-01T00:00:01Z\",\"created_by\":\"/bin/sh -c #(nop)  CMD "
    "[\\\"sh\\\"]\",\"empty_layer\":true},"
    "{\"created\":\"2024-01-01T00:00:02Z\",\"created_by\":\"RUN /bin/sh -c apk add --no-cache curl # buildkit\","
    "\"comment\":\"buildkit.dockerfile.v0\"}],"
    "\"size\":9007199254740993,\"weird\":[1e400,-0.0,18446744073709551615,0.1E-5,-12.5e+3,[],{},[[]]]}";

static void test_roundtrip_documents(void) {
    CHECK(roundtrip_is(DOCKER_MANIFEST, NULL));
    CHECK(roundtrip_is(OCI_CONFIG, NULL));

    json_value *m = parse(DOCKER_MANIFEST);
    CHECK(m != NULL);
    json_value *layers = json_object_get(m, "layers");
    CHECK(layers && layers->type == JSON_ARRAY && layers->count == 3);
    json_value *big = json_object_get(json_array_get(layers, 2), "size");
    CHECK_STR(big ? big->str : NULL, "9007199254740993");
    int64_t i64 = 0;
    CHECK(json_get_int64(big, &i64) && i64 == INT64_C(9007199254740993));
    CHECK_STR(json_object_get_string(json_object_get(m, "config"), "mediaType"),
              "application/vnd.docker.container.image.v1+json");
    CHECK(json_object_get_string(m, "schemaVersion") == NULL); /* a number */
    CHECK(json_array_get(layers, 3) == NULL);
    CHECK(json_array_get(m, 0) == NULL);
    CHECK(json_object_get(layers, "x") == NULL);

    json_value *c = parse(OCI_CONFIG);
    CHECK(c != NULL);
    json_value *env = json_object_get(json_object_get(c, "config"), "Env");
    CHECK(env && env->type == JSON_ARRAY && env->count == 0);
    json_value *hist = json_object_get(c, "history");
    CHECK(hist && hist->count == 3);
    CHECK(json_object_get(json_array_get(hist, 1), "empty_layer")->type == JSON_TRUE);
    CHECK(json_object_get(json_object_get(json_object_get(c, "config"), "ExposedPorts"), "8080/tcp")->type ==
          JSON_OBJECT);
    CHECK(c->count > 4 && strcmp(c->keys[0], "created") == 0 && strcmp(c->keys[4], "config") == 0 &&
          strcmp(c->keys[5], "container_config") == 0);
    CHECK_STR(json_object_get_string(c, "author"), "Jo \"J\" <jo@example.com>");
    json_free(m);
    json_free(c);

    /* whitespace is allowed around and inside, and dropped on output */
    CHECK(roundtrip_is(" \t\r\n{ \"a\" : [ 1 , 2 ] , \"b\" : { } , \"c\" : [ ] }\n\n ",
                       "{\"a\":[1,2],\"b\":{},\"c\":[]}"));
}

static void test_numbers_text(void) {
    CHECK(roundtrip_is("[18446744073709551615,1e400,-0.0,-0,0,1E+2,2.50,123456789012345678901234567890]", NULL));
    json_value *v = parse("1e400");
    CHECK(v && v->type == JSON_NUMBER && strcmp(v->str, "1e400") == 0 && v->len == 5);
    json_free(v);
}

static void test_escapes(void) {
    /* input escapes decode; output uses Go style minus HTML escaping */
    json_value *v = parse("\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\\u0001\\u001f\\u0041\\u00e9\\u20ac<>&\"");
    CHECK(v && v->type == JSON_STRING);
    CHECK_STR(v ? v->str : NULL, "a\"b\\c/d\b\f\n\r\t\x01\x1f"
                                 "A\xc3\xa9\xe2\x82\xac<>&");
    char *s = ser(v);
    CHECK_STR(s, "\"a\\\"b\\\\c/d\\b\\f\\n\\r\\t\\u0001\\u001fA\xc3\xa9\xe2\x82\xac<>&\"");
    free(s);
    json_free(v);

    /* \u0000 gives an embedded NUL; len counts it */
    v = parse("\"x\\u0000y\"");
    CHECK(v && v->len == 3 && v->str[1] == '\0' && v->str[2] == 'y');
    s = ser(v);
    CHECK_STR(s, "\"x\\u0000y\"");
    free(s);
    json_free(v);

    /* U+2028/U+2029 and DEL stay verbatim; uppercase hex input ok */
    CHECK(roundtrip_is("\"\\u2028\\u2029\\u007F\\u00AB\"", "\"\xe2\x80\xa8\xe2\x80\xa9\x7f\xc2\xab\""));
    CHECK(roundtrip_is("\"\xe2\x80\xa8<&>\"", NULL));

    /* escaped keys */
    v = parse("{\"k\\n\\u00e9\":1}");
    CHECK(v && v->count == 1 && v->key_lens[0] == 4 && memcmp(v->keys[0], "k\n\xc3\xa9", 4) == 0);
    CHECK(json_object_get(v, "k\n\xc3\xa9") != NULL);
    json_free(v);

    /* constructed strings with control chars and invalid UTF-8 */
    v = json_new_stringn("\x7f\x02\xff"
                         "ok\xc3",
                         6);
    s = ser(v);
    CHECK_STR(s, "\"\x7f\\u0002\\ufffdok\\ufffd\"");
    free(s);
    json_free(v);
}

static void test_surrogates(void) {
    json_value *v = parse("\"\\ud83d\\ude00|\\uD834\\uDD1E|\\udbff\\udfff\"");
    CHECK(v != NULL);
    CHECK_STR(v ? v->str : NULL, "\xf0\x9f\x98\x80|\xf0\x9d\x84\x9e|\xf4\x8f\xbf\xbf");
    json_free(v);
    CHECK(roundtrip_is("\"\xf0\x9f\x98\x80\"", NULL));
    CHECK(fails_with("\"\\ud83d\"", 8, "lone surrogate at byte 1"));
    CHECK(fails_with("\"\\ude00\"", 8, "lone surrogate"));
    CHECK(fails_with("\"\\ud83dx\\ude00\"", 15, "lone surrogate"));
    CHECK(fails_with("\"\\ud83d\\u0041\"", 14, "lone surrogate"));
    CHECK(fails_with("\"\\ud83d\\ud83d\"", 14, "lone surrogate"));
}

static void test_errors(void) {
    /* each error class; offsets are 0-based byte positions */
    CHECK(fails_with("", 0, "unexpected end of input at byte 0"));
    CHECK(fails_with("   ", 3, "unexpected end of input at byte 3"));
    CHECK(fails_with("{\"a\":1} x", 9, "trailing garbage at byte 8"));
    CHECK(fails_with("[1]]", 4, "trailing garbage at byte 3"));
    CHECK(fails_with("1 2", 3, "trailing garbage at byte 2"));
    CHECK(fails_with("\"ab", 3, "unterminated string at byte 0"));
    CHECK(fails_with("\"a\\\"", 4, "unterminated string"));
    CHECK(fails_with("\"a\nb\"", 5, "control character in string at byte 2"));
    CHECK(fails_with("\"a\tb\"", 5, "control character in string"));
    CHECK(fails_with("{\"a\x01\":1}", 8, "control character in string at byte 3"));
    CHECK(fails_with("\"\xff\"", 3, "invalid UTF-8 at byte 1"));
    CHECK(fails_with("\"ab\xc3\"", 5, "invalid UTF-8 at byte 3"));
    CHECK(fails_with("\"\xc0\xaf\"", 4, "invalid UTF-8"));         /* overlong */
    CHECK(fails_with("\"\xe0\x80\xaf\"", 5, "invalid UTF-8"));     /* overlong */
    CHECK(fails_with("\"\xed\xa0\x80\"", 5, "invalid UTF-8"));     /* encoded surrogate */
    CHECK(fails_with("\"\xf4\x90\x80\x80\"", 6, "invalid UTF-8")); /* > U+10FFFF */
    CHECK(fails_with("\"\x80\"", 3, "invalid UTF-8"));
    CHECK(fails_with("\xc3\xa9", 2, "unexpected byte 0xc3 at byte 0"));
    CHECK(fails_with("\"\\x\"", 4, "invalid escape at byte 1"));
    CHECK(fails_with("\"\\u12g4\"", 8, "invalid \\u escape"));
    CHECK(fails_with("\"\\u12\"", 6, "invalid \\u escape"));
    CHECK(fails_with("01", 2, "invalid number at byte 1"));
    CHECK(fails_with("-", 1, "invalid number"));
    CHECK(fails_with("1.", 2, "invalid number at byte 2"));
    CHECK(fails_with("1.e5", 4, "invalid number"));
    CHECK(fails_with("1e", 2, "invalid number"));
    CHECK(fails_with("1e+", 3, "invalid number"));
    CHECK(fails_with("+1", 2, "unexpected character '+'"));
    CHECK(fails_with(".5", 2, "unexpected character"));
    CHECK(fails_with("[1,]", 4, "unexpected character ']' at byte 3"));
    CHECK(fails_with("[1 2]", 5, "expected ',' or ']' at byte 3"));
    CHECK(fails_with("{\"a\":1,}", 8, "expected string key at byte 7"));
    CHECK(fails_with("{\"a\" 1}", 7, "expected ':' at byte 5"));
    CHECK(fails_with("{\"a\":1 \"b\":2}", 13, "expected ',' or '}'"));
    CHECK(fails_with("{a:1}", 5, "expected string key at byte 1"));
    CHECK(fails_with("[1,2", 4, "unexpected end of input at byte 4"));
    CHECK(fails_with("{\"a\":", 5, "unexpected end of input"));
    CHECK(fails_with("tru", 3, "unexpected end of input"));
    CHECK(fails_with("nul1", 4, "invalid literal at byte 3"));
    CHECK(fails_with("truex", 5, "trailing garbage"));
    CHECK(fails_with("NaN", 3, "unexpected character"));
    CHECK(fails_with("[1]\0", 4, "trailing garbage at byte 3"));
    /* NULL err buffer is fine */
    CHECK(json_parse("[", 1, 0, NULL, 0) == NULL);
    CHECK(json_parse(NULL, 0, 0, errbuf, sizeof(errbuf)) == NULL);
    /* tiny err buffer truncates safely */
    char tiny[8];
    CHECK(json_parse("x", 1, 0, tiny, sizeof(tiny)) == NULL && strlen(tiny) == 7);
}

static char *nest(int depth, int objects) {
    size_t n = (size_t)depth;
    char *s = malloc(n * 6 + 8);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (objects) {
            memcpy(s + o, "{\"k\":", 5);
            o += 5;
        } else {
            s[o++] = '[';
        }
    }
    s[o++] = '7';
    for (size_t i = 0; i < n; i++) s[o++] = objects ? '}' : ']';
    s[o] = '\0';
    return s;
}

static void test_depth(void) {
    for (int objects = 0; objects < 2; objects++) {
        int limits[] = {1, 5, JSON_DEFAULT_MAX_DEPTH, 200};
        for (size_t k = 0; k < sizeof(limits) / sizeof(limits[0]); k++) {
            int lim = limits[k];
            char *ok = nest(lim, objects), *bad = nest(lim + 1, objects);
            json_value *v = json_parse(ok, strlen(ok), lim, errbuf, sizeof(errbuf));
            CHECK(v != NULL);
            char *out = ser(v);
            CHECK_STR(out, ok);
            free(out);
            json_free(v);
            v = json_parse(bad, strlen(bad), lim, errbuf, sizeof(errbuf));
            CHECK(v == NULL);
            char want[96];
            snprintf(want, sizeof(want), "json: nesting deeper than %d at byte %d", lim, objects ? lim * 5 : lim);
            CHECK_STR(errbuf, want);
            free(ok);
            free(bad);
        }
    }
    /* max_depth <= 0 means the default */
    char *ok = nest(JSON_DEFAULT_MAX_DEPTH, 0), *bad = nest(JSON_DEFAULT_MAX_DEPTH + 1, 0);
    json_value *v = json_parse(ok, strlen(ok), 0, errbuf, sizeof(errbuf));
    CHECK(v != NULL);
    json_free(v);
    CHECK(json_parse(bad, strlen(bad), 0, errbuf, sizeof(errbuf)) == NULL);
    CHECK(strstr(errbuf, "deeper than 64") != NULL);
    free(ok);
    free(bad);
    /* scalars need no depth; a hostile limit is capped */
    v = json_parse("1", 1, 1, errbuf, sizeof(errbuf));
    CHECK(v != NULL);
    json_free(v);
    char *huge = nest(100000, 0);
    CHECK(json_parse(huge, strlen(huge), 1 << 30, errbuf, sizeof(errbuf)) == NULL);
    CHECK(strstr(errbuf, "nesting deeper than") != NULL);
    free(huge);
}

static void test_duplicates(void) {
    json_value *v = parse("{\"a\":1,\"b\":2,\"a\":3}");
    CHECK(v && v->count == 3);
    CHECK_STR(json_object_get(v, "a")->str, "3");
    char *s = ser(v);
    CHECK_STR(s, "{\"a\":1,\"b\":2,\"a\":3}");
    free(s);
    /* set replaces the visible (last) one in place and drops the shadowed one */
    CHECK(json_object_set(v, "a", json_new_int64(4)) == 0);
    s = ser(v);
    CHECK_STR(s, "{\"b\":2,\"a\":4}");
    free(s);
    json_free(v);
    v = parse("{\"a\":1,\"b\":2,\"a\":3}");
    CHECK(json_object_remove(v, "a") == 1);
    CHECK(json_object_get(v, "a") == NULL);
    s = ser(v);
    CHECK_STR(s, "{\"b\":2}");
    free(s);
    json_free(v);
}

static void test_mutators(void) {
    json_value *o = json_new_object();
    CHECK(json_object_set(o, "schemaVersion", json_new_int64(2)) == 0);
    CHECK(json_object_set(o, "mediaType", json_new_string("x")) == 0);
    CHECK(json_object_set(o, "layers", json_new_array()) == 0);
    CHECK(json_object_set(o, "annotations", json_new_object()) == 0);
    char *s = ser(o);
    CHECK_STR(s, "{\"schemaVersion\":2,\"mediaType\":\"x\",\"layers\":[],\"annotations\":{}}");
    free(s);

    /* replace keeps position; new key appends */
    CHECK(json_object_set(o, "mediaType", json_new_string("application/vnd.oci.image.manifest.v1+json")) == 0);
    CHECK(json_object_set(o, "subject", json_new_null()) == 0);
    s = ser(o);
    CHECK_STR(s, "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\","
                 "\"layers\":[],\"annotations\":{},\"subject\":null}");
    free(s);

    /* array append / insert at front, middle, end; bad index */
    json_value *layers = json_object_get(o, "layers");
    CHECK(json_array_append(layers, json_new_string("b")) == 0);
    CHECK(json_array_insert(layers, 0, json_new_string("a")) == 0);
    CHECK(json_array_insert(layers, 2, json_new_string("d")) == 0);
    CHECK(json_array_insert(layers, 2, json_new_string("c")) == 0);
    CHECK(json_array_insert(layers, 9, json_new_string("zz")) == -1); /* freed: ASan checks */
    for (int i = 0; i < 100; i++) CHECK(json_array_append(layers, json_new_bool(i & 1)) == 0);
    CHECK(layers->count == 104);
    CHECK_STR(json_array_get(layers, 0)->str, "a");
    CHECK_STR(json_array_get(layers, 3)->str, "d");
    CHECK(json_array_get(layers, 5)->type == JSON_TRUE);

    /* wrong container types fail and free the item */
    CHECK(json_array_append(o, json_new_null()) == -1);
    CHECK(json_object_set(layers, "k", json_new_null()) == -1);
    CHECK(json_object_set(o, "k", NULL) == -1);
    CHECK(json_array_append(layers, NULL) == -1);

    /* remove */
    CHECK(json_object_remove(o, "annotations") == 1);
    CHECK(json_object_remove(o, "annotations") == 0);
    CHECK(json_object_remove(layers, "x") == 0);
    CHECK(json_object_get(o, "annotations") == NULL);
    CHECK(o->count == 4 && strcmp(o->keys[3], "subject") == 0);

    /* clone is deep and serializes identically */
    json_value *c = json_clone(o);
    char *a = ser(o), *b = ser(c);
    CHECK(a && b && strcmp(a, b) == 0);
    free(b);
    CHECK(json_object_set(c, "schemaVersion", json_new_uint64(UINT64_MAX)) == 0);
    b = ser(c);
    CHECK(strncmp(b, "{\"schemaVersion\":18446744073709551615,", 38) == 0);
    char *a2 = ser(o);
    CHECK_STR(a2, a);
    free(a);
    free(a2);
    free(b);
    json_free(c);
    json_free(o);

    json_value *d = parse(OCI_CONFIG);
    c = json_clone(d);
    a = ser(d);
    b = ser(c);
    CHECK_STR(a, OCI_CONFIG);
    CHECK_STR(b, OCI_CONFIG);
    free(a);
    free(b);
    json_free(c);
    json_free(d);

    /* object keys with embedded NUL survive clone */
    d = parse("{\"a\\u0000b\":\"x\\u0000y\"}");
    c = json_clone(d);
    CHECK(c && c->key_lens[0] == 3 && c->items[0]->len == 3);
    a = ser(c);
    CHECK_STR(a, "{\"a\\u0000b\":\"x\\u0000y\"}");
    free(a);
    json_free(c);
    json_free(d);

    json_free(NULL);
    CHECK(json_clone(NULL) == NULL);
    s = ser(NULL); /* a NULL tree serializes as null */
    CHECK_STR(s, "null");
    free(s);
}

/* json_parse_strict: duplicate keys fail, errors carry line and column. */
static void test_strict(void) {
    json_error e;
    const char *dup = "{\n  \"listen\": \"a\",\n  \"cache\": {\"dir\": \"x\"},\n  \"listen\": \"b\"\n}";
    CHECK(json_parse_strict(dup, strlen(dup), 8, &e) == NULL);
    CHECK(e.line == 4 && e.column == 3);
    CHECK(strstr(e.message, "duplicate key \"listen\"") != NULL);
    /* nested, and after a multi-byte character on the same line */
    const char *utf = "{\"caf\xc3\xa9\": {\"k\": 1, \"k\": 2}}";
    CHECK(json_parse_strict(utf, strlen(utf), 8, &e) == NULL);
    CHECK(e.line == 1 && e.column == 19 && e.offset == 19); /* é is two bytes, one column */
    /* the same key in two objects, and keys that differ after a NUL, are fine */
    const char *ok = "{\"a\": {\"k\": 1}, \"b\": {\"k\": 2}, \"x\\u0000y\": 1, \"x\": 2}";
    json_value *v = json_parse_strict(ok, strlen(ok), 8, &e);
    CHECK(v && v->count == 4);
    json_free(v);
    /* other errors: the same messages as json_parse, located */
    CHECK(json_parse_strict("{\n\"a\" 1}", 9, 8, &e) == NULL);
    CHECK(e.line == 2 && e.column == 5 && strcmp(e.message, "expected ':'") == 0);
    CHECK(json_parse_strict("[1]\n  x", 7, 8, &e) == NULL);
    CHECK(e.line == 2 && e.column == 3 && strcmp(e.message, "trailing garbage") == 0);
}

static void test_int_edges(void) {
    struct {
        const char *text;
        int i_ok;
        int64_t i;
        int u_ok;
        uint64_t u;
    } cases[] = {
        {"0", 1, 0, 1, 0},
        {"-0", 1, 0, 1, 0},
        {"42", 1, 42, 1, 42},
        {"-42", 1, -42, 0, 0},
        {"9223372036854775807", 1, INT64_MAX, 1, (uint64_t)INT64_MAX},
        {"9223372036854775808", 0, 0, 1, (uint64_t)INT64_MAX + 1},
        {"-9223372036854775808", 1, INT64_MIN, 0, 0},
        {"-9223372036854775809", 0, 0, 0, 0},
        {"18446744073709551615", 0, 0, 1, UINT64_MAX},
        {"18446744073709551616", 0, 0, 0, 0},
        {"99999999999999999999999", 0, 0, 0, 0},
        {"1.0", 0, 0, 0, 0},
        {"1e3", 0, 0, 0, 0},
        {"1E0", 0, 0, 0, 0},
        {"-0.0", 0, 0, 0, 0},
    };
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        json_value *v = json_new_number_text(cases[k].text);
        CHECK(v != NULL);
        int64_t i = 7;
        uint64_t u = 7;
        bool iok = json_get_int64(v, &i), uok = json_get_uint64(v, &u);
        if (iok != (bool)cases[k].i_ok || (iok && i != cases[k].i) || uok != (bool)cases[k].u_ok ||
            (uok && u != cases[k].u))
            fprintf(stderr, "int edge case %s wrong\n", cases[k].text);
        CHECK(iok == (bool)cases[k].i_ok);
        CHECK(!iok || i == cases[k].i);
        CHECK(uok == (bool)cases[k].u_ok);
        CHECK(!uok || u == cases[k].u);
        json_free(v);
    }
    int64_t i;
    uint64_t u;
    json_value *s = json_new_string("5");
    CHECK(!json_get_int64(s, &i) && !json_get_uint64(s, &u));
    json_free(s);
    CHECK(!json_get_int64(NULL, &i));

    /* constructors produce the exact decimal text */
    json_value *v = json_new_int64(INT64_MIN);
    CHECK_STR(v->str, "-9223372036854775808");
    CHECK(json_get_int64(v, &i) && i == INT64_MIN);
    json_free(v);
    v = json_new_uint64(UINT64_MAX);
    CHECK_STR(v->str, "18446744073709551615");
    CHECK(v->len == 20 && json_get_uint64(v, &u) && u == UINT64_MAX);
    json_free(v);

    /* number_text validates the grammar */
    const char *good[] = {"0", "-0", "1e400", "-0.0", "1.5E+10", "2e-3", "123456789012345678901234567890"};
    const char *bad[] = {"",     "-",  "01", "+1",  "1.",       ".5",  "1e",    "1e+",
                         "0x10", "1 ", " 1", "NaN", "Infinity", "--1", "1.2.3", "1e5.0"};
    for (size_t k = 0; k < sizeof(good) / sizeof(good[0]); k++) {
        v = json_new_number_text(good[k]);
        CHECK(v && v->type == JSON_NUMBER && strcmp(v->str, good[k]) == 0);
        json_free(v);
    }
    for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
        v = json_new_number_text(bad[k]);
        if (v) fprintf(stderr, "number_text accepted \"%s\"\n", bad[k]);
        CHECK(v == NULL);
        json_free(v);
    }
    CHECK(json_new_number_text(NULL) == NULL);
}

/* parse -> serialize -> parse -> serialize is a fixed point. */
static void test_fixed_point(void) {
    const char *inputs[] = {
        "null",
        " true ",
        "false",
        "0",
        "-0.0e-0",
        "\"\"",
        "[]",
        "{}",
        "[[],{},[{}]]",
        "{\"a\":{\"b\":{\"c\":[1,2,{\"d\":null}]}}}",
        "  [ 1 ,\t\"two\" ,\n{ \"three\" : 3.0 } ]  ",
        "\"\\u00e9\\u4e2d\\ud83d\\ude00\\/\\\"\\\\\"",
        "\"\\u0000\\u0001\\u001f\\u007f\\u0080\\u2028\\u2029\\ufeff\\uffff\"",
        "{\"\":\"\",\"\\n\":\"\\r\\t\\b\\f\"}",
        "{\"x\":1,\"x\":2,\"x\":[3]}",
        "[1e400,-1E-400,18446744073709551615,-9223372036854775809,0.000000000000000000001]",
        "{\"html\":\"<script>alert('&amp;')</script>\"}",
        "[\"\xe2\x82\xac\xf0\x90\x8d\x88\xc2\xa9\xef\xbf\xbd\"]",
        "{\"a\" :[ true,false ,null ] ,\"b\": {\"c\" :\"d\"}}",
        "[[[[[[[[[[\"deep\"]]]]]]]]]]",
        DOCKER_MANIFEST,
        OCI_CONFIG,
    };
    for (size_t k = 0; k < sizeof(inputs) / sizeof(inputs[0]); k++) {
        json_value *v1 = parse(inputs[k]);
        CHECK(v1 != NULL);
        if (!v1) {
            fprintf(stderr, "fixed point input %zu: %s\n", k, errbuf);
            continue;
        }
        size_t n1, n2;
        char *s1 = json_serialize(v1, &n1);
        json_value *v2 = s1 ? json_parse(s1, n1, JSON_DEFAULT_MAX_DEPTH, errbuf, sizeof(errbuf)) : NULL;
        CHECK(v2 != NULL);
        char *s2 = v2 ? json_serialize(v2, &n2) : NULL;
        CHECK(s1 && s2 && n1 == n2 && memcmp(s1, s2, n1) == 0);
        CHECK(s1 && strlen(s1) == n1); /* NULs are always escaped */
        free(s1);
        free(s2);
        json_free(v1);
        json_free(v2);
    }
}

/* A ~4 MiB manifest parses (linear time: this would crawl if quadratic). */
static void test_large(void) {
    const char *layer = "{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"size\":123456789,"
                        "\"digest\":\"sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f\","
                        "\"annotations\":{\"k\":\"v\\u00e9\\n\"}},";
    size_t ll = strlen(layer), n = (4u << 20) / ll;
    size_t cap = n * ll + 64;
    char *buf = malloc(cap);
    size_t o = 0;
    memcpy(buf, "{\"layers\":[", 11);
    o = 11;
    for (size_t i = 0; i < n; i++) {
        memcpy(buf + o, layer, ll);
        o += ll;
    }
    o--; /* drop last comma */
    memcpy(buf + o, "],\"big\":\"", 9);
    o += 9;
    buf[o++] = '"';
    buf[o++] = '}';
    json_value *v = json_parse(buf, o, JSON_DEFAULT_MAX_DEPTH, errbuf, sizeof(errbuf));
    CHECK(v != NULL);
    CHECK(v && json_object_get(v, "layers")->count == n);
    size_t sl = 0;
    char *s = json_serialize(v, &sl);
    json_value *v2 = s ? json_parse(s, sl, JSON_DEFAULT_MAX_DEPTH, errbuf, sizeof(errbuf)) : NULL;
    size_t sl2 = 0;
    char *s2 = v2 ? json_serialize(v2, &sl2) : NULL;
    CHECK(s2 && sl == sl2 && memcmp(s, s2, sl) == 0);
    free(s);
    free(s2);
    json_free(v);
    json_free(v2);
    free(buf);
}

int main(void) {
    test_roundtrip_documents();
    test_numbers_text();
    test_escapes();
    test_surrogates();
    test_errors();
    test_depth();
    test_duplicates();
    test_strict();
    test_mutators();
    test_int_edges();
    test_fixed_point();
    test_large();
    return UNIT_DONE("json");
}
