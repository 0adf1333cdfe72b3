/*
 * test_ref: tables of good and bad names, tags, digests, Range headers,
 * WWW-Authenticate challenges, Docker config.json files and base64 strings.
 */
#include "regfacade/ref.h"

#include "unit.h"

#include <stdint.h>
#include <stdlib.h>

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* A string of n copies of c (caller frees). */
static char *repeat(char c, size_t n) {
    char *s = malloc(n + 1);
    if (!s) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

static void test_names(void) {
    static const char *const good[] = {
        "a",
        "0",
        "alpine",
        "library/alpine",
        "a/b/c/d/e",
        "a.b",
        "a_b",
        "a__b",
        "a-b",
        "a--b",
        "a---------b",
        "foo.bar_baz__qux-quux",
        "ghcr.io/owner/repo",
        "a0/b1/c2",
        "my-registry.example.com/team/app",
        "x.y.z",
        "0a.1b",
        "a-b-c/d_e_f/g__h",
    };
    static const char *const bad[] = {
        "",      "A",      "Alpine", "library/Alpine",
        "a___b", "a.-b",   "a-.b",   "a..b",
        "a._b",  "a_.b",   ".a",     "a.",
        "_a",    "a_",     "-a",     "a-",
        "__a",   "a__",    "/a",     "a/",
        "a//b",  "a/.b",   "a/b.",   "a b",
        "a:b",   "a@b",    "a+b",    "a\tb",
        "a/b/",  "a.b/-c", "é",      "a/_/b",
        "a$",
    };
    for (size_t i = 0; i < COUNT(good); i++) {
        if (!ref_valid_name(good[i])) fprintf(stderr, "name should be valid: \"%s\"\n", good[i]);
        CHECK(ref_valid_name(good[i]));
    }
    for (size_t i = 0; i < COUNT(bad); i++) {
        if (ref_valid_name(bad[i])) fprintf(stderr, "name should be invalid: \"%s\"\n", bad[i]);
        CHECK(!ref_valid_name(bad[i]));
    }
    CHECK(!ref_valid_name(NULL));

    /* Length edge: 255 bytes pass, 256 do not, with or without slashes. */
    char *n255 = repeat('a', 255);
    char *n256 = repeat('a', 256);
    char *n5000 = repeat('a', 5000);
    CHECK(ref_valid_name(n255));
    CHECK(!ref_valid_name(n256));
    CHECK(!ref_valid_name(n5000));
    n255[100] = '/';
    n256[100] = '/';
    CHECK(ref_valid_name(n255));
    CHECK(!ref_valid_name(n256));
    /* The limit counts separators too: 254 letters and a '-' run at the end
     * of the limit. */
    n256[100] = 'a';
    n256[254] = '-';
    CHECK(!ref_valid_name(n256));
    n255[100] = 'a';
    n255[253] = '-';
    CHECK(ref_valid_name(n255));
    free(n255);
    free(n256);
    free(n5000);
}

static void test_tags(void) {
    static const char *const good[] = {
        "latest",         "1",  "_",   "_x",  "v1.2.3", "1.0-rc.1", "A", "Z9", "a_b-c.d", "3.19",
        "sha256-abc.sig", "__", "x--", "x..",
    };
    static const char *const bad[] = {
        "", ".a", "-a", "a/b", "a:b", "a b", "a@b", "a+b", "é", "a\n", ":latest",
    };
    for (size_t i = 0; i < COUNT(good); i++) {
        if (!ref_valid_tag(good[i])) fprintf(stderr, "tag should be valid: \"%s\"\n", good[i]);
        CHECK(ref_valid_tag(good[i]));
    }
    for (size_t i = 0; i < COUNT(bad); i++) {
        if (ref_valid_tag(bad[i])) fprintf(stderr, "tag should be invalid: \"%s\"\n", bad[i]);
        CHECK(!ref_valid_tag(bad[i]));
    }
    CHECK(!ref_valid_tag(NULL));
    char *t128 = repeat('t', 128);
    char *t129 = repeat('t', 129);
    CHECK(ref_valid_tag(t128));
    CHECK(!ref_valid_tag(t129));
    t128[0] = '_';
    CHECK(ref_valid_tag(t128));
    t128[0] = '.';
    CHECK(!ref_valid_tag(t128));
    free(t128);
    free(t129);
}

static void test_digests(void) {
    const char *hex64 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    char sha256[80], sha256_upper[80], sha256_short[80], sha256_long[80], sha512[140], sha512_short[140],
        sha512_upper[140];
    snprintf(sha256, sizeof sha256, "sha256:%s", hex64);
    snprintf(sha256_upper, sizeof sha256_upper, "sha256:%s", hex64);
    sha256_upper[7] = 'E';
    snprintf(sha256_short, sizeof sha256_short, "sha256:%.63s", hex64);
    snprintf(sha256_long, sizeof sha256_long, "sha256:%s0", hex64);
    snprintf(sha512, sizeof sha512, "sha512:%s%s", hex64, hex64);
    snprintf(sha512_short, sizeof sha512_short, "sha512:%s%.63s", hex64, hex64);
    snprintf(sha512_upper, sizeof sha512_upper, "sha512:%s%s", hex64, hex64);
    sha512_upper[100] = 'A';

    CHECK(ref_valid_digest(sha256));
    CHECK(ref_valid_digest(sha512));
    CHECK(!ref_valid_digest(sha256_upper));
    CHECK(!ref_valid_digest(sha256_short));
    CHECK(!ref_valid_digest(sha256_long));
    CHECK(!ref_valid_digest(sha512_short));
    CHECK(!ref_valid_digest(sha512_upper));
    CHECK(!ref_valid_digest(hex64)); /* no algorithm */

    /* Other algorithms are held to the general grammar only. */
    static const char *const good[] = {
        "md5:abc",   "blake3:ABC=", "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
        "a.b_c-d:x", "x:-_=",       "sha384:0123",
    };
    static const char *const bad[] = {
        "",         ":",       "sha256:", ":abc",   "sha256",   "SHA256:abc", "md5:",  "md5:ab/c",
        "md5:ab+c", "md5:a b", "+md5:x",  "md5+:x", "md5++x:y", "md5..sha:x", "a:b:c", "md5:ab.c",
    };
    for (size_t i = 0; i < COUNT(good); i++) {
        if (!ref_valid_digest(good[i])) fprintf(stderr, "digest should be valid: \"%s\"\n", good[i]);
        CHECK(ref_valid_digest(good[i]));
    }
    for (size_t i = 0; i < COUNT(bad); i++) {
        if (ref_valid_digest(bad[i])) fprintf(stderr, "digest should be invalid: \"%s\"\n", bad[i]);
        CHECK(!ref_valid_digest(bad[i]));
    }
    CHECK(!ref_valid_digest(NULL));

    /* REF_DIGEST_MAX bounds the whole string. */
    char *longd = repeat('a', REF_DIGEST_MAX + 1);
    longd[3] = ':';
    CHECK(!ref_valid_digest(longd));
    longd[REF_DIGEST_MAX] = '\0';
    CHECK(ref_valid_digest(longd));
    free(longd);

    CHECK(ref_is_sha256_digest(sha256));
    CHECK(!ref_is_sha256_digest(sha256_upper));
    CHECK(!ref_is_sha256_digest(sha256_short));
    CHECK(!ref_is_sha256_digest(sha256_long));
    CHECK(!ref_is_sha256_digest(sha512));
    CHECK(!ref_is_sha256_digest("sha256:"));
    CHECK(!ref_is_sha256_digest(""));
    CHECK(!ref_is_sha256_digest(NULL));
    CHECK(!ref_is_sha256_digest("md5:abc"));
}

static void test_range_parse(void) {
    static const struct {
        const char *header;
        range_parse_result want;
        int kind;
        uint64_t first, last;
    } cases[] = {
        {"bytes=0-499", RANGE_OK, RANGE_FROM_TO, 0, 499},
        {"bytes=500-", RANGE_OK, RANGE_FROM, 500, 0},
        {"bytes=-500", RANGE_OK, RANGE_SUFFIX, 500, 0},
        {"bytes=5-2", RANGE_OK, RANGE_FROM_TO, 5, 2},
        {"bytes=0-0", RANGE_OK, RANGE_FROM_TO, 0, 0},
        {"bytes=-0", RANGE_OK, RANGE_SUFFIX, 0, 0},
        {"  bytes=0-499  ", RANGE_OK, RANGE_FROM_TO, 0, 499},
        {"\tbytes= 10-20\t", RANGE_OK, RANGE_FROM_TO, 10, 20},
        {"BYTES=1-2", RANGE_OK, RANGE_FROM_TO, 1, 2},
        {"Bytes=7-", RANGE_OK, RANGE_FROM, 7, 0},
        {"bytes=18446744073709551615-", RANGE_OK, RANGE_FROM, UINT64_MAX, 0},
        {"bytes=0-18446744073709551615", RANGE_OK, RANGE_FROM_TO, 0, UINT64_MAX},
        {"bytes=007-010", RANGE_OK, RANGE_FROM_TO, 7, 10},
        {NULL, RANGE_NONE, 0, 0, 0},
        {"", RANGE_NONE, 0, 0, 0},
        {"   ", RANGE_NONE, 0, 0, 0},
        {"bytes=", RANGE_INVALID, 0, 0, 0},
        {"bytes=-", RANGE_INVALID, 0, 0, 0},
        {"bytes=abc-", RANGE_INVALID, 0, 0, 0},
        {"bytes=0-abc", RANGE_INVALID, 0, 0, 0},
        {"bytes=-abc", RANGE_INVALID, 0, 0, 0},
        {"bytes=0", RANGE_INVALID, 0, 0, 0},
        {"bytes=0-1-2", RANGE_INVALID, 0, 0, 0},
        {"bytes=--5", RANGE_INVALID, 0, 0, 0},
        {"bytes=+1-2", RANGE_INVALID, 0, 0, 0},
        {"bytes=1 - 2", RANGE_INVALID, 0, 0, 0},
        {"bytes 0-1", RANGE_INVALID, 0, 0, 0},
        {"bytes", RANGE_INVALID, 0, 0, 0},
        {"=0-1", RANGE_INVALID, 0, 0, 0},
        {"items=0-1", RANGE_INVALID, 0, 0, 0},
        {"bytesx=0-1", RANGE_INVALID, 0, 0, 0},
        {"byte=0-1", RANGE_INVALID, 0, 0, 0},
        {"bytes=0-1,2-3", RANGE_INVALID, 0, 0, 0},
        {"bytes=0-1, 5-6", RANGE_INVALID, 0, 0, 0},
        {"bytes=0-1,", RANGE_INVALID, 0, 0, 0},
        {"bytes=-5,-6", RANGE_INVALID, 0, 0, 0},
        {"bytes=99999999999999999999-", RANGE_INVALID, 0, 0, 0},
        {"bytes=18446744073709551616-", RANGE_INVALID, 0, 0, 0},
        {"bytes=0-18446744073709551616", RANGE_INVALID, 0, 0, 0},
        {"bytes=-18446744073709551616", RANGE_INVALID, 0, 0, 0},
    };
    for (size_t i = 0; i < COUNT(cases); i++) {
        range_spec s = {RANGE_FROM_TO, 12345, 67890};
        range_parse_result r = range_parse(cases[i].header, &s);
        if (r != cases[i].want)
            fprintf(stderr, "range_parse(\"%s\") = %d, want %d\n", cases[i].header ? cases[i].header : "(null)", (int)r,
                    (int)cases[i].want);
        CHECK(r == cases[i].want);
        if (cases[i].want == RANGE_OK && r == RANGE_OK) {
            CHECK((int)s.kind == cases[i].kind);
            CHECK(s.first == cases[i].first);
            if (cases[i].kind == RANGE_FROM_TO) CHECK(s.last == cases[i].last);
        } else if (r != RANGE_OK) {
            /* spec is left alone when nothing was parsed */
            CHECK(s.first == 12345 && s.last == 67890);
        }
    }
}

static void test_range_resolve(void) {
    static const struct {
        int kind;
        uint64_t first, last, size;
        bool ok;
        uint64_t start, end;
    } cases[] = {
        {RANGE_FROM_TO, 0, 499, 1000, true, 0, 499},
        {RANGE_FROM_TO, 0, 999, 1000, true, 0, 999},
        {RANGE_FROM_TO, 0, 5000, 1000, true, 0, 999}, /* clipped */
        {RANGE_FROM_TO, 999, 999, 1000, true, 999, 999},
        {RANGE_FROM_TO, 1000, 1000, 1000, false, 0, 0}, /* first >= size */
        {RANGE_FROM_TO, 5, 2, 1000, false, 0, 0},       /* last < first */
        {RANGE_FROM_TO, 0, UINT64_MAX, 10, true, 0, 9},
        {RANGE_FROM_TO, 0, 0, 0, false, 0, 0}, /* empty entity */
        {RANGE_FROM, 500, 0, 1000, true, 500, 999},
        {RANGE_FROM, 0, 0, 1000, true, 0, 999},
        {RANGE_FROM, 999, 0, 1000, true, 999, 999},
        {RANGE_FROM, 1000, 0, 1000, false, 0, 0},
        {RANGE_FROM, UINT64_MAX, 0, 1000, false, 0, 0},
        {RANGE_FROM, 0, 0, 0, false, 0, 0},
        {RANGE_SUFFIX, 500, 0, 1000, true, 500, 999},
        {RANGE_SUFFIX, 1, 0, 1000, true, 999, 999},
        {RANGE_SUFFIX, 1000, 0, 1000, true, 0, 999},
        {RANGE_SUFFIX, 5000, 0, 1000, true, 0, 999}, /* whole entity */
        {RANGE_SUFFIX, UINT64_MAX, 0, 1, true, 0, 0},
        {RANGE_SUFFIX, 0, 0, 1000, false, 0, 0}, /* suffix of 0 */
        {RANGE_SUFFIX, 10, 0, 0, false, 0, 0},
        {RANGE_FROM_TO, UINT64_MAX - 1, UINT64_MAX, UINT64_MAX, true, UINT64_MAX - 1, UINT64_MAX - 1},
    };
    for (size_t i = 0; i < COUNT(cases); i++) {
        range_spec s;
        memset(&s, 0, sizeof s);
        s.kind = cases[i].kind;
        s.first = cases[i].first;
        s.last = cases[i].last;
        uint64_t start = 77, end = 77;
        bool ok = range_resolve(&s, cases[i].size, &start, &end);
        if (ok != cases[i].ok) fprintf(stderr, "range_resolve case %zu: got %d\n", i, (int)ok);
        CHECK(ok == cases[i].ok);
        if (ok && cases[i].ok) {
            CHECK(start == cases[i].start);
            CHECK(end == cases[i].end);
        }
    }

    /* Parse and resolve together: the 416 path of "bytes=5-2". */
    range_spec s;
    uint64_t a, b;
    CHECK(range_parse("bytes=5-2", &s) == RANGE_OK);
    CHECK(!range_resolve(&s, 100, &a, &b));
    CHECK(range_parse("bytes=-500", &s) == RANGE_OK);
    CHECK(range_resolve(&s, 300, &a, &b) && a == 0 && b == 299);
    CHECK(!range_resolve(NULL, 300, &a, &b));
}

static void test_www_authenticate(void) {
    www_authenticate w;
    char err[256];

    CHECK(www_authenticate_parse("Bearer realm=\"https://auth.docker.io/token\","
                                 "service=\"registry.docker.io\","
                                 "scope=\"repository:library/alpine:pull\"",
                                 &w, err, sizeof err) == 0);
    CHECK_STR(w.scheme, "Bearer");
    CHECK_STR(w.realm, "https://auth.docker.io/token");
    CHECK_STR(w.service, "registry.docker.io");
    CHECK_STR(w.scope, "repository:library/alpine:pull");
    CHECK_STR(w.error, "");

    CHECK(www_authenticate_parse("Basic realm=\"x\"", &w, err, sizeof err) == 0);
    CHECK_STR(w.scheme, "Basic");
    CHECK_STR(w.realm, "x");
    CHECK_STR(w.service, "");

    /* Spaces after commas, around '=', token values, mixed-case names. */
    CHECK(www_authenticate_parse("  bearer  Realm = \"https://h/t\" ,  SERVICE=svc.io,   scope=\"a b\", "
                                 "Error=insufficient_scope",
                                 &w, err, sizeof err) == 0);
    CHECK_STR(w.scheme, "bearer");
    CHECK_STR(w.realm, "https://h/t");
    CHECK_STR(w.service, "svc.io");
    CHECK_STR(w.scope, "a b");
    CHECK_STR(w.error, "insufficient_scope");

    /* Quoted-pair escapes, unknown params ignored (including a long one). */
    CHECK(www_authenticate_parse("Bearer realm=\"a\\\"b\\\\c\\d\",error_description=\"x, y=\\\"z\\\"\","
                                 "service=s",
                                 &w, err, sizeof err) == 0);
    CHECK_STR(w.realm, "a\"b\\cd");
    CHECK_STR(w.service, "s");
    {
        char hdr[3000];
        char *big = repeat('q', 2000);
        snprintf(hdr, sizeof hdr, "Bearer realm=\"r\",description=\"%s\",scope=\"s\"", big);
        CHECK(www_authenticate_parse(hdr, &w, err, sizeof err) == 0);
        CHECK_STR(w.scope, "s");
        free(big);
    }

    /* Only the first challenge counts. */
    CHECK(www_authenticate_parse("Basic realm=\"first\", Bearer realm=\"second\",service=x", &w, err, sizeof err) == 0);
    CHECK_STR(w.scheme, "Basic");
    CHECK_STR(w.realm, "first");
    CHECK_STR(w.service, "");
    CHECK(www_authenticate_parse("Bearer, Basic realm=\"x\"", &w, err, sizeof err) == 0);
    CHECK_STR(w.scheme, "Bearer");
    CHECK_STR(w.realm, "");
    CHECK(www_authenticate_parse("Negotiate abc123==, Basic realm=\"x\"", &w, err, sizeof err) == 0);
    CHECK_STR(w.scheme, "Negotiate");
    CHECK_STR(w.realm, "");
    CHECK(www_authenticate_parse("Basic", &w, err, sizeof err) == 0);
    CHECK_STR(w.scheme, "Basic");
    CHECK(www_authenticate_parse("Bearer realm=\"\"", &w, err, sizeof err) == 0);
    CHECK_STR(w.realm, "");
    CHECK(www_authenticate_parse("Bearer realm=\"r\",", &w, err, sizeof err) == 0);
    CHECK_STR(w.realm, "r");

    /* Values exactly at the field limit pass; one more byte fails. */
    {
        char hdr[1200];
        char *v = repeat('r', sizeof w.realm - 1);
        snprintf(hdr, sizeof hdr, "Bearer realm=\"%s\"", v);
        CHECK(www_authenticate_parse(hdr, &w, err, sizeof err) == 0);
        CHECK(strlen(w.realm) == sizeof w.realm - 1);
        free(v);
        v = repeat('r', sizeof w.realm);
        snprintf(hdr, sizeof hdr, "Bearer realm=\"%s\"", v);
        CHECK(www_authenticate_parse(hdr, &w, err, sizeof err) == -1);
        CHECK(strstr(err, "realm") != NULL && strstr(err, "too long") != NULL);
        CHECK_STR(w.realm, ""); /* nothing half-filled on error */
        free(v);
        v = repeat('s', sizeof w.service);
        snprintf(hdr, sizeof hdr, "Bearer service=%s", v);
        CHECK(www_authenticate_parse(hdr, &w, err, sizeof err) == -1);
        CHECK(strstr(err, "service") != NULL && strstr(err, "too long") != NULL);
        free(v);
        v = repeat('e', sizeof w.error);
        snprintf(hdr, sizeof hdr, "Bearer error=\"%s\"", v);
        CHECK(www_authenticate_parse(hdr, &w, err, sizeof err) == -1);
        CHECK(strstr(err, "error") != NULL && strstr(err, "too long") != NULL);
        free(v);
        v = repeat('s', sizeof w.scope);
        snprintf(hdr, sizeof hdr, "Bearer realm=\"x\", SCOPE=\"%s\"", v);
        CHECK(www_authenticate_parse(hdr, &w, err, sizeof err) == -1);
        CHECK(strstr(err, "scope") != NULL && strstr(err, "too long") != NULL);
        free(v);
    }

    static const struct {
        const char *header;
        const char *err_part;
    } bad[] = {
        {"", "missing auth scheme"},
        {"   ", "missing auth scheme"},
        {"realm=\"x\"", "missing auth scheme"},
        {"=x", "missing auth scheme"},
        {"\"Bearer\" realm=x", "missing auth scheme"},
        {"Bearer realm=\"https://auth", "unterminated"},
        {"Bearer realm=\"x\\", "unterminated"},
        {"Bearer realm=\"x\",service=\"y", "service: unterminated"},
        {"Bearer realm=\"x\"y", "unexpected"},
        {"Bearer realm=\"a\nb\"", "control character"},
        {"Bearer realm=x, service=", "service: missing value"},
        {"Bearer realm=\"a\",realm=\"b\"", "realm given twice"},
        {"Bearer realm=\"a\", REALM=\"b\"", "realm given twice"},
        {"Bearer realm=\"x\", =y", "expected auth-param"},
        {"Bearer @@@", "expected auth-param or token68"},
        {"Bearer; realm=x", "invalid character"},
        {"Averyveryverylongscheme realm=x", "scheme too long"},
    };
    for (size_t i = 0; i < COUNT(bad); i++) {
        err[0] = '\0';
        int rc = www_authenticate_parse(bad[i].header, &w, err, sizeof err);
        if (rc != -1 || !strstr(err, bad[i].err_part))
            fprintf(stderr, "www_authenticate_parse(\"%s\") = %d, err \"%s\", want \"%s\"\n", bad[i].header, rc, err,
                    bad[i].err_part);
        CHECK(rc == -1);
        CHECK(strstr(err, bad[i].err_part) != NULL);
        CHECK_STR(w.scheme, "");
    }
    CHECK(www_authenticate_parse(NULL, &w, err, sizeof err) == -1);
    CHECK(www_authenticate_parse("Basic realm=x", NULL, err, sizeof err) == -1);
    /* No err buffer is fine. */
    CHECK(www_authenticate_parse("realm=x", &w, NULL, 0) == -1);
    /* A tiny err buffer truncates, never overflows. */
    char tiny[8];
    CHECK(www_authenticate_parse("realm=x", &w, tiny, sizeof tiny) == -1);
    CHECK(strlen(tiny) == sizeof tiny - 1);
}

static void test_base64(void) {
    static const struct {
        const char *plain, *enc;
    } vec[] = {
        /* RFC 4648 section 10 */
        {"", ""},
        {"f", "Zg=="},
        {"fo", "Zm8="},
        {"foo", "Zm9v"},
        {"foob", "Zm9vYg=="},
        {"fooba", "Zm9vYmE="},
        {"foobar", "Zm9vYmFy"},
        {"user:pa:ss", "dXNlcjpwYTpzcw=="},
    };
    char buf[64];
    for (size_t i = 0; i < COUNT(vec); i++) {
        size_t pl = strlen(vec[i].plain);
        long n = base64_encode((const unsigned char *)vec[i].plain, pl, buf, sizeof buf);
        CHECK(n == (long)strlen(vec[i].enc));
        CHECK_STR(buf, vec[i].enc);
        n = base64_decode(vec[i].enc, strlen(vec[i].enc), buf, sizeof buf);
        CHECK(n == (long)pl);
        CHECK_STR(buf, vec[i].plain);
    }
    /* Padding is optional on decode. */
    CHECK(base64_decode("Zg", 2, buf, sizeof buf) == 1 && strcmp(buf, "f") == 0);
    CHECK(base64_decode("Zm8", 3, buf, sizeof buf) == 2 && strcmp(buf, "fo") == 0);
    CHECK(base64_decode("Zm9vYg", 6, buf, sizeof buf) == 4 && strcmp(buf, "foob") == 0);
    /* inlen is honoured: bytes past it are not read. */
    CHECK(base64_decode("Zm9v!!!!", 4, buf, sizeof buf) == 3 && strcmp(buf, "foo") == 0);

    static const char *const bad[] = {
        "Z", "Zm9vY", "Z===", "Zg=", "Zm8=x", "Zg==Zg==", "Zm9v!", "Zm 9v", "Zm9v\n", "====", "Zm-_", "=Zg=",
    };
    for (size_t i = 0; i < COUNT(bad); i++) {
        long n = base64_decode(bad[i], strlen(bad[i]), buf, sizeof buf);
        if (n != -1) fprintf(stderr, "base64_decode(\"%s\") = %ld, want -1\n", bad[i], n);
        CHECK(n == -1);
    }

    /* Buffers: the output needs room for the NUL as well. */
    CHECK(base64_decode("Zm9v", 4, buf, 4) == 3);
    CHECK(base64_decode("Zm9v", 4, buf, 3) == -1);
    CHECK(base64_decode("", 0, buf, 1) == 0 && buf[0] == '\0');
    CHECK(base64_decode("Zm9v", 4, buf, 0) == -1);
    CHECK(base64_encode((const unsigned char *)"foo", 3, buf, 5) == 4);
    CHECK(base64_encode((const unsigned char *)"foo", 3, buf, 4) == -1);
    CHECK(base64_encode((const unsigned char *)"f", 1, buf, 4) == -1);

    /* Round trips over every byte value and every length mod 3. */
    unsigned char raw[256];
    for (int i = 0; i < 256; i++) raw[i] = (unsigned char)(255 - i);
    char enc[400], dec[300];
    for (size_t len = 0; len <= 256; len += (len < 10 ? 1 : 37)) {
        long e = base64_encode(raw, len, enc, sizeof enc);
        CHECK(e == (long)((len + 2) / 3 * 4));
        long d = base64_decode(enc, (size_t)e, dec, sizeof dec);
        CHECK(d == (long)len);
        CHECK(d >= 0 && memcmp(dec, raw, len) == 0);
        /* and without padding */
        size_t unpadded = (size_t)e;
        while (unpadded > 0 && enc[unpadded - 1] == '=') unpadded--;
        d = base64_decode(enc, unpadded, dec, sizeof dec);
        CHECK(d == (long)len && memcmp(dec, raw, len) == 0);
    }
}

static void test_host_normalize(void) {
    static const struct {
        const char *in, *want;
    } cases[] = {
        {"ghcr.io", "ghcr.io"},
        {"GHCR.IO", "ghcr.io"},
        {"https://ghcr.io", "ghcr.io"},
        {"https://ghcr.io/v2/", "ghcr.io"},
        {"http://LocalHost:5000/", "localhost:5000"},
        {"localhost:5000", "localhost:5000"},
        {"docker.io", "docker.io"},
        {"index.docker.io", "docker.io"},
        {"registry-1.docker.io", "docker.io"},
        {"https://index.docker.io/v1/", "docker.io"},
        {"index.docker.io/v1/", "docker.io"},
        {"https://Registry-1.Docker.IO/v2/", "docker.io"},
        {"quay.io/org/repo", "quay.io"},
        {"registry.example.com:443", "registry.example.com:443"},
        {"[::1]:5000", "[::1]:5000"},
        {"", ""},
        {"docker.io.evil.com", "docker.io.evil.com"},
        {"notindex.docker.io", "notindex.docker.io"},
    };
    char out[256];
    for (size_t i = 0; i < COUNT(cases); i++) {
        registry_host_normalize(cases[i].in, out, sizeof out);
        CHECK_STR(out, cases[i].want);
    }
    registry_host_normalize(NULL, out, sizeof out);
    CHECK_STR(out, "");
    /* A too-small buffer truncates but stays terminated. */
    char small[5];
    registry_host_normalize("example.com", small, sizeof small);
    CHECK_STR(small, "exam");
    char *huge = repeat('h', 1000);
    registry_host_normalize(huge, out, sizeof out);
    CHECK(strlen(out) == sizeof out - 1);
    free(huge);
}

/* docker_config_lookup on a NUL-terminated text. */
static int lookup(const char *json, const char *host, char *user, char *pass, char *err) {
    return docker_config_lookup(json, strlen(json), host, user, 256, pass, 256, err, 256);
}

static void test_docker_config(void) {
    char user[256], pass[256], err[256];
    char b64[256], json[2048];

    /* A password holding ':' survives: only the first ':' splits. */
    const char *cred = "alice:s3cr:et:";
    CHECK(base64_encode((const unsigned char *)cred, strlen(cred), b64, sizeof b64) > 0);
    snprintf(json, sizeof json,
             "{\"auths\":{\"ghcr.io\":{\"auth\":\"%s\"},"
             "\"https://index.docker.io/v1/\":{\"auth\":\"Ym9iOmh1Yg==\"},"
             "\"localhost:5000\":{\"username\":\"u5\",\"password\":\"p5\"},"
             "\"http://registry.example.com:8443/v2/\":{\"auth\":\"ZXg6ZXhw\"},"
             "\"credsonly.io\":{}},"
             "\"credsStore\":\"desktop\"}",
             b64);

    CHECK(lookup(json, "ghcr.io", user, pass, err) == 1);
    CHECK_STR(user, "alice");
    CHECK_STR(pass, "s3cr:et:");
    CHECK(lookup(json, "GHCR.io", user, pass, err) == 1);
    CHECK_STR(user, "alice");

    /* Docker Hub under any of its names. */
    static const char *const hub[] = {"docker.io", "index.docker.io", "registry-1.docker.io",
                                      "https://registry-1.docker.io"};
    for (size_t i = 0; i < COUNT(hub); i++) {
        CHECK(lookup(json, hub[i], user, pass, err) == 1);
        CHECK_STR(user, "bob");
        CHECK_STR(pass, "hub");
    }

    CHECK(lookup(json, "localhost:5000", user, pass, err) == 1);
    CHECK_STR(user, "u5");
    CHECK_STR(pass, "p5");
    CHECK(lookup(json, "localhost", user, pass, err) == 0); /* port matters */
    CHECK(lookup(json, "localhost:5001", user, pass, err) == 0);
    CHECK(lookup(json, "registry.example.com:8443", user, pass, err) == 1);
    CHECK_STR(user, "ex");
    CHECK_STR(pass, "exp");
    CHECK(lookup(json, "quay.io", user, pass, err) == 0);
    CHECK_STR(user, "");
    CHECK_STR(pass, "");
    CHECK(lookup(json, "credsonly.io", user, pass, err) == 0);

    /* An exact key wins over an earlier key naming the same host. */
    CHECK(lookup("{\"auths\":{\"https://index.docker.io/v1/\":{\"auth\":\"YTpi\"},"
                 "\"docker.io\":{\"auth\":\"Yzpk\"}}}",
                 "docker.io", user, pass, err) == 1);
    CHECK_STR(user, "c");
    CHECK(lookup("{\"auths\":{\"https://index.docker.io/v1/\":{\"auth\":\"YTpi\"},"
                 "\"docker.io\":{\"auth\":\"Yzpk\"}}}",
                 "index.docker.io", user, pass, err) == 1);
    CHECK_STR(user, "a");

    /* "auth" beats username/password; a username alone gives an empty
     * password. */
    CHECK(lookup("{\"auths\":{\"h\":{\"auth\":\"YTpi\",\"username\":\"x\",\"password\":\"y\"}}}", "h", user, pass,
                 err) == 1);
    CHECK_STR(user, "a");
    CHECK_STR(pass, "b");
    CHECK(lookup("{\"auths\":{\"h\":{\"auth\":\"\",\"username\":\"x\",\"password\":\"y\"}}}", "h", user, pass, err) ==
          1);
    CHECK_STR(user, "x");
    CHECK_STR(pass, "y");
    CHECK(lookup("{\"auths\":{\"h\":{\"username\":\"x\"}}}", "h", user, pass, err) == 1);
    CHECK_STR(user, "x");
    CHECK_STR(pass, "");
    /* Unpadded base64 is accepted (padding optional). */
    CHECK(lookup("{\"auths\":{\"h\":{\"auth\":\"dTpwdw\"}}}", "h", user, pass, err) == 1);
    CHECK_STR(user, "u");
    CHECK_STR(pass, "pw");
    /* Empty password after the colon. */
    CHECK(lookup("{\"auths\":{\"h\":{\"auth\":\"dTo=\"}}}", "h", user, pass, err) == 1);
    CHECK_STR(user, "u");
    CHECK_STR(pass, "");

    /* No auths, empty file, empty auths: not found. */
    CHECK(lookup("{}", "h", user, pass, err) == 0);
    CHECK(lookup("", "h", user, pass, err) == 0);
    CHECK(lookup(" \n", "h", user, pass, err) == 0);
    CHECK(lookup("{\"auths\":{}}", "h", user, pass, err) == 0);
    CHECK(lookup("{\"credHelpers\":{\"h\":\"x\"}}", "h", user, pass, err) == 0);
    /* An empty identitytoken (as some tools write) is no token. */
    CHECK(lookup("{\"auths\":{\"h\":{\"auth\":\"YTpi\",\"identitytoken\":\"\"}}}", "h", user, pass, err) == 1);
    CHECK_STR(pass, "b");
    /* An identity token wins over "auth" and comes back under "<token>". */
    CHECK(lookup("{\"auths\":{\"h\":{\"identitytoken\":\"tok\",\"auth\":\"dTo=\"}}}", "h", user, pass, err) == 1);
    CHECK_STR(user, "<token>");
    CHECK_STR(pass, "tok");
    CHECK(lookup("{\"auths\":{\"h\":{\"identitytoken\":\"r1\"}}}", "h", user, pass, err) == 1);
    CHECK_STR(user, "<token>");
    CHECK_STR(pass, "r1");
    /* A broken entry for another host does not spoil this lookup. */
    CHECK(lookup("{\"auths\":{\"other\":{\"auth\":\"!!!\"},\"h\":{\"auth\":\"YTpi\"}}}", "h", user, pass, err) == 1);

    static const struct {
        const char *json, *host, *err_part;
    } bad[] = {
        {"{\"auths\":{\"ghcr.io\":{\"auth\":\"not base64!\"}}}", "ghcr.io",
         "docker config: auths[\"ghcr.io\"].auth: not valid base64"},
        {"{\"auths\":{\"ghcr.io\":{\"auth\":\"Zm9v\"}}}", "ghcr.io",
         "auths[\"ghcr.io\"].auth: decoded value has no ':'"},
        {"{\"auths\":{\"https://index.docker.io/v1/\":{\"auth\":\"Z\"}}}", "docker.io",
         "auths[\"https://index.docker.io/v1/\"].auth: not valid base64"},
        {"{\"auths\":{\"h\":{\"auth\":\"AGE6Yg==\"}}}", "h", "auths[\"h\"].auth: decoded value contains a NUL"},
        {"{\"auths\":{\"h\":{\"auth\":5}}}", "h", "auths[\"h\"].auth: not a string"},
        {"{\"auths\":{\"h\":{\"username\":[]}}}", "h", "auths[\"h\"].username: not a string"},
        {"{\"auths\":{\"h\":{\"password\":null}}}", "h", "auths[\"h\"].password: not a string"},
        {"{\"auths\":{\"h\":\"YTpi\"}}", "h", "auths[\"h\"]: not an object"},
        {"{\"auths\":{\"h\":{\"identitytoken\":null}}}", "h", "auths[\"h\"].identitytoken: not a string"},
        {"{\"auths\":[]}", "h", "docker config: \"auths\" is not an object"},
        {"{\"auths\":\"x\"}", "h", "\"auths\" is not an object"},
        {"[]", "h", "top level is not an object"},
        {"{\"auths\":", "h", "docker config: "},
        {"{\"auths\":{}} x", "h", "docker config: "},
    };
    for (size_t i = 0; i < COUNT(bad); i++) {
        err[0] = '\0';
        strcpy(user, "junk");
        strcpy(pass, "junk");
        int rc = lookup(bad[i].json, bad[i].host, user, pass, err);
        if (rc != -1 || !strstr(err, bad[i].err_part))
            fprintf(stderr, "docker_config_lookup(%s) = %d, err \"%s\", want \"%s\"\n", bad[i].json, rc, err,
                    bad[i].err_part);
        CHECK(rc == -1);
        CHECK(strstr(err, bad[i].err_part) != NULL);
        CHECK_STR(user, "");
        CHECK_STR(pass, "");
    }

    /* Output buffers too small for the credentials: an error, not a cut. */
    const char *cfg = "{\"auths\":{\"h\":{\"auth\":\"YWxpY2U6cGFzc3dvcmQ=\"}}}"; /* alice:password */
    char u6[6], p8[8], p9[9];
    CHECK(docker_config_lookup(cfg, strlen(cfg), "h", u6, sizeof u6, p9, sizeof p9, err, sizeof err) == 1);
    CHECK_STR(u6, "alice");
    CHECK_STR(p9, "password");
    CHECK(docker_config_lookup(cfg, strlen(cfg), "h", u6, 5, p9, sizeof p9, err, sizeof err) == -1);
    CHECK(strstr(err, "user name too long") != NULL);
    CHECK(docker_config_lookup(cfg, strlen(cfg), "h", u6, sizeof u6, p8, sizeof p8, err, sizeof err) == -1);
    CHECK(strstr(err, "password too long") != NULL);
    CHECK_STR(u6, "");

    /* len is honoured: the text need not be NUL-terminated. */
    char raw[64];
    const char *cfg2 = "{\"auths\":{\"h\":{\"auth\":\"YTpi\"}}}";
    memcpy(raw, cfg2, strlen(cfg2));
    memset(raw + strlen(cfg2), 'X', sizeof raw - strlen(cfg2));
    CHECK(docker_config_lookup(raw, strlen(cfg2), "h", user, sizeof user, pass, sizeof pass, err, sizeof err) == 1);
    CHECK_STR(user, "a");

    /* A key with a quote or control character is shown safely. */
    CHECK(lookup("{\"auths\":{\"h\\\"\\n\":{\"auth\":\"!\"}}}", "h\"\n", user, pass, err) == -1);
    CHECK(strstr(err, "auths[\"h??\"].auth: not valid base64") != NULL);

    CHECK(docker_config_lookup("{}", 2, NULL, user, sizeof user, pass, sizeof pass, err, sizeof err) == -1);
    CHECK(docker_config_lookup("{}", 2, "h", user, 0, pass, sizeof pass, NULL, 0) == -1);
}

static void test_docker_config_helper(void) {
    char helper[64], err[256];
    const char *cfg = "{\"auths\":{\"a.io\":{}},\"credsStore\":\"store\","
                      "\"credHelpers\":{\"gcr.io\":\"gcloud\",\"https://index.docker.io/v1/\":\"hub\","
                      "\"plain.io\":\"\"}}";
    CHECK(docker_config_helper(cfg, strlen(cfg), "gcr.io", helper, sizeof helper, err, sizeof err) == 1);
    CHECK_STR(helper, "gcloud");
    CHECK(docker_config_helper(cfg, strlen(cfg), "GCR.io", helper, sizeof helper, err, sizeof err) == 1);
    CHECK_STR(helper, "gcloud");
    CHECK(docker_config_helper(cfg, strlen(cfg), "registry-1.docker.io", helper, sizeof helper, err, sizeof err) == 1);
    CHECK_STR(helper, "hub");
    /* Any other host: the store. */
    CHECK(docker_config_helper(cfg, strlen(cfg), "a.io", helper, sizeof helper, err, sizeof err) == 1);
    CHECK_STR(helper, "store");
    /* An empty name in credHelpers: the file's auths, not the store. */
    CHECK(docker_config_helper(cfg, strlen(cfg), "plain.io", helper, sizeof helper, err, sizeof err) == 0);
    CHECK_STR(helper, "");
    CHECK(docker_config_helper("{\"auths\":{}}", 12, "a.io", helper, sizeof helper, err, sizeof err) == 0);
    CHECK(docker_config_helper("", 0, "a.io", helper, sizeof helper, err, sizeof err) == 0);
    CHECK(docker_config_helper("{\"credsStore\":\"\"}", 17, "a.io", helper, sizeof helper, err, sizeof err) == 0);

    static const struct {
        const char *json, *err_part;
    } bad[] = {
        {"{\"credsStore\":5}", "docker config: credsStore: not a string"},
        {"{\"credsStore\":\"../evil\"}", "credsStore: not a helper name"},
        {"{\"credsStore\":\"a b\"}", "credsStore: not a helper name"},
        {"{\"credHelpers\":[]}", "\"credHelpers\" is not an object"},
        {"{\"credHelpers\":{\"h\":null}}", "credHelpers[\"h\"]: not a string"},
        {"{\"credHelpers\":{\"h\":\"/bin/sh\"}}", "credHelpers[\"h\"]: not a helper name"},
        {"[]", "top level is not an object"},
        {"{", "docker config: "},
    };
    for (size_t i = 0; i < COUNT(bad); i++) {
        err[0] = '\0';
        strcpy(helper, "junk");
        int rc = docker_config_helper(bad[i].json, strlen(bad[i].json), "h", helper, sizeof helper, err, sizeof err);
        if (rc != -1 || !strstr(err, bad[i].err_part))
            fprintf(stderr, "docker_config_helper(%s) = %d, err \"%s\", want \"%s\"\n", bad[i].json, rc, err,
                    bad[i].err_part);
        CHECK(rc == -1);
        CHECK(strstr(err, bad[i].err_part) != NULL);
        CHECK_STR(helper, "");
    }
    char small[4];
    CHECK(docker_config_helper(cfg, strlen(cfg), "gcr.io", small, sizeof small, err, sizeof err) == -1);
    CHECK(strstr(err, "name too long") != NULL);
}

int main(void) {
    test_names();
    test_tags();
    test_digests();
    test_range_parse();
    test_range_resolve();
    test_www_authenticate();
    test_base64();
    test_host_normalize();
    test_docker_config();
    test_docker_config_helper();
    return UNIT_DONE("ref");
}
