/* Unit tests for src/image.c: assembling an image from a base image and
 * added layers, on realistic Docker schema2 and OCI manifests and configs
 * (the same documents as spec/fixtures/). */
#include "regfacade/image.h"
#include "unit.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "regfacade/digest.h"
#include "regfacade/image_rewrite.h"
#include "regfacade/json.h"
#include "regfacade/lua_json.h"

int luaopen_regfacade_core(lua_State *L); /* src/lua_core.c */

static const char DOCKER_MANIFEST[] =
    "{\n   \"schemaVersion\": 2,\n   \"mediaType\": \"application/vnd.docker.distribution.manifest.v2"
    "+json\",\n   \"config\": {\n      \"mediaType\": \"application/vnd.docker.container.image.v1+jso"
    "n\",\n      \"size\": 2290,\n      \"digest\": \"sha256:4488842b5789a9092662cf04e47b4ec6d51fabc9"
    "86088e8a7bb237ea1c77dd2c\"\n   },\n   \"layers\": [\n      {\n         \"mediaType\": \"applicat"
    "ion/vnd.docker.image.rootfs.diff.tar.gzip\",\n         \"size\": 29126484,\n         \"digest\":"
    " \"sha256:737e03815f474c871e848556b18f626393e2ab439d2d58db67bff18f8ced89a3\"\n      },\n      {\n"
    "         \"mediaType\": \"application/vnd.docker.image.rootfs.diff.tar.gzip\",\n         \"size\""
    ": 9007199254740993,\n         \"digest\": \"sha256:59c7e34161540ada857db726490bc6d42aa57240704ef"
    "a0e0921f2d62bcb2ee7\"\n      }\n   ]\n}\n";

static const char DOCKER_CONFIG[] =
    "{\"architecture\":\"amd64\",\"config\":{\"Hostname\":\"\",\"Domainname\":\"\",\"User\":\"\",\"At"
    "tachStdin\":false,\"AttachStdout\":false,\"AttachStderr\":false,\"Tty\":false,\"OpenStdin\":fals"
    "e,\"StdinOnce\":false,\"Env\":[\"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/b"
    "in\",\"LANG=C.UTF-8\"],\"Cmd\":[\"bash\"],\"Image\":\"sha256:a8a0ea1e2c2fa4ad1d7d5e50cd2d6e4fe4d"
    "1a54d8e2eb1d3b0a3b91f1c8ee6e2\",\"Volumes\":null,\"WorkingDir\":\"\",\"Entrypoint\":null,\"OnBui"
    "ld\":null,\"Labels\":null},\"container\":\"6e3a6c5bbe6c7b0a8f8d4ee1d5ee5f2b2ad2c2fb6c7f2c0bd7e6a"
    "9a2c1f6d3e4\",\"container_config\":{\"Hostname\":\"6e3a6c5bbe6c\",\"Domainname\":\"\",\"User\":\""
    "\",\"AttachStdin\":false,\"AttachStdout\":false,\"AttachStderr\":false,\"Tty\":false,\"OpenStdin"
    "\":false,\"StdinOnce\":false,\"Env\":[\"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/"
    "sbin:/bin\",\"LANG=C.UTF-8\"],\"Cmd\":[\"/bin/sh\",\"-c\",\"#(nop) \",\"ENV LANG=C.UTF-8\"],\"Im"
    "age\":\"sha256:a8a0ea1e2c2fa4ad1d7d5e50cd2d6e4fe4d1a54d8e2eb1d3b0a3b91f1c8ee6e2\",\"Volumes\":nu"
    "ll,\"WorkingDir\":\"\",\"Entrypoint\":null,\"OnBuild\":null,\"Labels\":{}},\"created\":\"2023-11"
    "-21T05:21:24.536066751Z\",\"docker_version\":\"20.10.23\",\"history\":[{\"created\":\"2023-11-21"
    "T05:21:23.905254262Z\",\"created_by\":\"/bin/sh -c #(nop) ADD file:39d17d28c5de0bd629e5b7c819022"
    "8e5a445d61d668e189b7523e90e68f78244 in / \"},{\"created\":\"2023-11-21T05:21:24.248398734Z\",\"c"
    "reated_by\":\"/bin/sh -c #(nop)  CMD [\\\"bash\\\"]\",\"empty_layer\":true},{\"created\":\"2023-"
    "11-21T05:21:24.536066751Z\",\"created_by\":\"/bin/sh -c apt-get update \\u0026\\u0026 apt-get in"
    "stall -y --no-install-recommends curl \\u0026\\u0026 rm -rf /var/lib/apt/lists/*\"},{\"created\""
    ":\"2023-11-21T05:21:24.536066751Z\",\"created_by\":\"/bin/sh -c #(nop)  ENV LANG=C.UTF-8\",\"emp"
    "ty_layer\":true}],\"os\":\"linux\",\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:fd1cd6"
    "22bad2c9d0dc0f1c8345f3aa56c14659fe4d192d9a8be61c220daa7862\",\"sha256:e4e56067a63f2e105b01b3310e"
    "114309c2028b9ca886c498a910cf06e1935405\"]}}";

static const char OCI_MANIFEST[] =
    "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\""
    "mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:c026327a274b4b603f1"
    "70c41ee6b81c2e58d776d5f95886e439d089b9beefccf\",\"size\":2143},\"layers\":[{\"mediaType\":\"appl"
    "ication/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:e0d6bb544be39d5c916044680de3704f2e"
    "9a3ccb0a8ec554fd03c0b85441e43f\",\"size\":3348520},{\"mediaType\":\"application/vnd.oci.image.la"
    "yer.v1.tar+gzip\",\"digest\":\"sha256:7a5f4e7f5047d1466af0d4e8a1599cb69c99a540e01b0869ac4f275a3b"
    "22742c\",\"size\":9007199254740993},{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+zstd"
    "\",\"digest\":\"sha256:51024354d55eebdfe1930cb00acb397abdbb0691d28d04e252766713df36b2c4\",\"size"
    "\":1204,\"annotations\":{\"org.example.layer\":\"app\"}}],\"annotations\":{\"org.opencontainers."
    "image.base.name\":\"docker.io/library/alpine:3.19\",\"org.opencontainers.image.created\":\"2024-"
    "03-01T10:00:00Z\"}}";

static const char OCI_CONFIG[] =
    "{\"created\":\"2024-03-01T10:00:00.123456789Z\",\"architecture\":\"arm64\",\"variant\":\"v8\",\""
    "os\":\"linux\",\"config\":{\"User\":\"app\",\"ExposedPorts\":{\"8080/tcp\":{}},\"Env\":[\"PATH=/"
    "usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\",\"APP_HOME=/srv\"],\"Entrypoint\":"
    "[\"/usr/local/bin/app\"],\"Cmd\":[\"--serve\"],\"Volumes\":{\"/data\":{}},\"WorkingDir\":\"/srv\""
    ",\"Labels\":{\"org.opencontainers.image.source\":\"https://example.org/app\",\"org.opencontainer"
    "s.image.version\":\"1.2\"},\"StopSignal\":\"SIGTERM\",\"ArgsEscaped\":true},\"rootfs\":{\"type\""
    ":\"layers\",\"diff_ids\":[\"sha256:d152a0615eca35d596351189843886665e28205abc9dda6d7f0388c805309"
    "40a\",\"sha256:1994534bffbd9d549d2bd69dbe2c6bf10c8141bd26226fc0361d34c993e41232\",\"sha256:c06fb"
    "b5d582e9b228c8ed958812b7d01695b8018afce9eb8ea463bd07e40a06f\"]},\"history\":[{\"created\":\"2024"
    "-02-14T18:02:21.421212232Z\",\"created_by\":\"ARG VERSION=1.2\",\"comment\":\"buildkit.dockerfil"
    "e.v0\",\"empty_layer\":true},{\"created\":\"2024-01-27T00:30:48.624602109Z\",\"created_by\":\"/b"
    "in/sh -c #(nop) ADD file:37a76ec18f9887751cd8473744917d08b7431fc4085097bb6a09d81b41775473 in / \""
    "},{\"created\":\"2024-03-01T10:00:00.123456789Z\",\"created_by\":\"ENV APP_HOME=/srv\",\"comment"
    "\":\"buildkit.dockerfile.v0\",\"empty_layer\":true},{\"created\":\"2024-03-01T10:00:00.123456789"
    "Z\",\"created_by\":\"RUN /bin/sh -c apk add --no-cache ca-certificates # buildkit\",\"comment\":"
    "\"buildkit.dockerfile.v0\"},{\"created\":\"2024-03-01T10:00:00.123456789Z\",\"created_by\":\"COP"
    "Y app /usr/local/bin/app # buildkit\",\"comment\":\"buildkit.dockerfile.v0\"},{\"created\":\"202"
    "4-03-01T10:00:00.123456789Z\",\"created_by\":\"CMD [\\\"--serve\\\"]\",\"comment\":\"buildkit.do"
    "ckerfile.v0\",\"empty_layer\":true}],\"moby.buildkit.buildinfo.v1\":\"eyJmcm9udGVuZCI6ImRvY2tlcm"
    "ZpbGUudjAifQ==\",\"x-vendor\":{\"build\":[],\"ratio\":0.25,\"scale\":1e3,\"big\":184467440737095"
    "51615,\"none\":null}}";

#define A_DIGEST "sha256:5a1e4967cd63ac149e9633d57db4086c51c3c1a252be8439051377da51a60383"
#define A_DIFF "sha256:5c4c9922186948c261a70cd8959d29f58bc42833ce1cef8f81ad5f1db794d92e"
#define B_DIGEST "sha256:9f3221069ae120ef9617ed53586b8acb4b6cb4d1a8f2a0d7ac7f7c4c3857c023"
#define B_DIFF "sha256:b585073364968c3feadf7c6293ab6c54c5217ef36b51affd52824c7effc7e294"
#define C_DIGEST "sha256:8477e8d62a1f593db37652226d63bd67ff7bbcff9e7b3057332a19f340dae106"
#define C_DIFF "sha256:576d6ec7a92f0f219a6a37097aafc3b28ec9224c50cdd2711b69a2118a9c799b"

#define DOCKER_CREATED "2023-11-21T05:21:24.536066751Z"
#define OCI_CREATED "2024-03-01T10:00:00.123456789Z"

static const image_layer BASE = {.is_base = true};
static const image_layer LAYER_A = {
    .media_type = IMAGE_MT_OCI_LAYER_GZIP, .digest = A_DIGEST, .size = 1234, .diff_id = A_DIFF};
static const image_layer LAYER_B = {.media_type = IMAGE_MT_DOCKER_LAYER_GZIP,
                                    .digest = B_DIGEST,
                                    .size = 5678,
                                    .diff_id = B_DIFF,
                                    .created_by = "COPY supervisor /.supervisor/",
                                    .comment = "regfacade: supervisor"};

static char errbuf[512];

static json_value *parse(const char *s) {
    json_value *v = json_parse(s, strlen(s), JSON_DEFAULT_MAX_DEPTH, errbuf, sizeof errbuf);
    if (!v) fprintf(stderr, "parse failed: %s\n", errbuf);
    return v;
}

static char *ser(const json_value *v) { return v ? json_serialize(v, NULL) : NULL; }

/* The compact text of a fixture. */
static char *compact(const char *s) {
    json_value *v = parse(s);
    char *out = ser(v);
    json_free(v);
    return out;
}

/* s with the first occurrence of old replaced by new (malloc'd); NULL when
 * old does not occur. */
static char *replace(const char *s, const char *old, const char *new_) {
    const char *at = s ? strstr(s, old) : NULL;
    if (!at) return NULL;
    size_t a = (size_t)(at - s), o = strlen(old), n = strlen(new_), t = strlen(s);
    char *r = malloc(t - o + n + 1);
    memcpy(r, s, a);
    memcpy(r + a, new_, n);
    memcpy(r + a + n, at + o, t - a - o + 1);
    return r;
}

/* replace() that takes ownership of s. */
static char *replace_own(char *s, const char *old, const char *new_) {
    char *r = replace(s, old, new_);
    free(s);
    return r;
}

/* Text of a member of a fixture (e.g. its "history" array). */
static char *member_text(const char *doc, const char *k1, const char *k2) {
    json_value *v = parse(doc);
    json_value *m = json_object_get(v, k1);
    if (k2) m = json_object_get(m, k2);
    char *out = ser(m);
    json_free(v);
    return out;
}

typedef struct {
    json_value *m, *c;
    char *mtext, *ctext;
} result;

static void result_free(result *r) {
    json_free(r->m);
    json_free(r->c);
    free(r->mtext);
    free(r->ctext);
    memset(r, 0, sizeof *r);
}

/* Assemble from fixture texts; texts of the (unfinished) outputs in r. */
static int run(const char *man, const char *cfg, const image_layer *stack, size_t n, result *r) {
    memset(r, 0, sizeof *r);
    json_value *bm = parse(man), *bc = parse(cfg);
    errbuf[0] = '\0';
    int rc = image_assemble(bm, bc, stack, n, &r->m, &r->c, errbuf, sizeof errbuf);
    if (rc == 0) {
        r->mtext = ser(r->m);
        r->ctext = ser(r->c);
    }
    json_free(bm);
    json_free(bc);
    return rc;
}

/* Assembly must fail with exactly want. */
static int fails(const char *man, const char *cfg, const image_layer *stack, size_t n, const char *want) {
    result r;
    int rc = run(man, cfg, stack, n, &r);
    int ok = rc == -1 && r.m == NULL && r.c == NULL && strcmp(errbuf, want) == 0;
    if (!ok) fprintf(stderr, "want error \"%s\", got rc %d \"%s\"\n", want, rc, errbuf);
    result_free(&r);
    return ok;
}

static int eq(const char *got, const char *want) {
    int ok = got && want && strcmp(got, want) == 0;
    if (!ok) fprintf(stderr, "got:  %s\nwant: %s\n", got ? got : "(null)", want ? want : "(null)");
    return ok;
}

/* Number of history entries that are not empty_layer ones. */
static size_t non_empty_history(const json_value *cfg) {
    const json_value *h = json_object_get(cfg, "history");
    size_t n = 0;
    for (size_t i = 0; h && i < h->count; i++) {
        const json_value *e = json_object_get(h->items[i], "empty_layer");
        n += !(e && e->type == JSON_TRUE);
    }
    return n;
}

static size_t layer_count(const json_value *m) {
    const json_value *l = json_object_get(m, "layers");
    return l ? l->count : SIZE_MAX;
}

static size_t diff_id_count(const json_value *c) {
    const json_value *d = json_object_get(json_object_get(c, "rootfs"), "diff_ids");
    return d ? d->count : SIZE_MAX;
}

/* ------------------------------------------------------------------------ */

static void test_media_types(void) {
    const char *D = IMAGE_MT_DOCKER_MANIFEST, *O = IMAGE_MT_OCI_MANIFEST;
    /* into Docker */
    CHECK_STR(image_layer_media_type_for(D, IMAGE_MT_OCI_LAYER_GZIP), IMAGE_MT_DOCKER_LAYER_GZIP);
    CHECK_STR(image_layer_media_type_for(D, IMAGE_MT_OCI_LAYER_TAR), IMAGE_MT_DOCKER_LAYER_TAR);
    CHECK_STR(image_layer_media_type_for(D, IMAGE_MT_OCI_LAYER_ZSTD), IMAGE_MT_OCI_LAYER_ZSTD);
    CHECK_STR(image_layer_media_type_for(D, IMAGE_MT_OCI_LAYER_ND_TAR), IMAGE_MT_DOCKER_LAYER_FOREIGN);
    CHECK_STR(image_layer_media_type_for(D, IMAGE_MT_OCI_LAYER_ND_GZIP), IMAGE_MT_DOCKER_LAYER_FOREIGN);
    CHECK_STR(image_layer_media_type_for(D, IMAGE_MT_OCI_LAYER_ND_ZSTD), IMAGE_MT_DOCKER_LAYER_FOREIGN);
    CHECK_STR(image_layer_media_type_for(D, IMAGE_MT_DOCKER_LAYER_GZIP), IMAGE_MT_DOCKER_LAYER_GZIP);
    CHECK_STR(image_layer_media_type_for(D, IMAGE_MT_DOCKER_LAYER_TAR), IMAGE_MT_DOCKER_LAYER_TAR);
    CHECK_STR(image_layer_media_type_for(D, IMAGE_MT_DOCKER_LAYER_FOREIGN), IMAGE_MT_DOCKER_LAYER_FOREIGN);
    CHECK_STR(image_layer_media_type_for(IMAGE_MT_DOCKER_LIST, IMAGE_MT_OCI_LAYER_GZIP), IMAGE_MT_DOCKER_LAYER_GZIP);
    /* into OCI (a manifest without mediaType is OCI) */
    CHECK_STR(image_layer_media_type_for(O, IMAGE_MT_DOCKER_LAYER_GZIP), IMAGE_MT_OCI_LAYER_GZIP);
    CHECK_STR(image_layer_media_type_for(O, IMAGE_MT_DOCKER_LAYER_TAR), IMAGE_MT_OCI_LAYER_TAR);
    CHECK_STR(image_layer_media_type_for(O, IMAGE_MT_DOCKER_LAYER_FOREIGN), IMAGE_MT_OCI_LAYER_ND_GZIP);
    CHECK_STR(image_layer_media_type_for(NULL, IMAGE_MT_DOCKER_LAYER_GZIP), IMAGE_MT_OCI_LAYER_GZIP);
    CHECK_STR(image_layer_media_type_for(IMAGE_MT_OCI_INDEX, IMAGE_MT_DOCKER_LAYER_TAR), IMAGE_MT_OCI_LAYER_TAR);
    CHECK_STR(image_layer_media_type_for(O, IMAGE_MT_OCI_LAYER_ZSTD), IMAGE_MT_OCI_LAYER_ZSTD);
    CHECK_STR(image_layer_media_type_for(O, IMAGE_MT_OCI_LAYER_ND_TAR), IMAGE_MT_OCI_LAYER_ND_TAR);
    /* unknown types and unknown manifest types pass through, as the same pointer */
    const char *odd = "application/vnd.example.layer.v1.tar+lz4";
    CHECK(image_layer_media_type_for(D, odd) == odd);
    CHECK(image_layer_media_type_for(O, odd) == odd);
    const char *gz = IMAGE_MT_DOCKER_LAYER_GZIP;
    CHECK(image_layer_media_type_for("application/json", gz) == gz);
    CHECK(image_layer_media_type_for(D, NULL) == NULL);
}

/* Append to a Docker image: the new descriptor gets Docker's type and the
 * base's key order; everything outside the three changed arrays keeps its
 * bytes. */
static void test_docker_append(void) {
    image_layer stack[] = {BASE, LAYER_A};
    result r;
    CHECK(run(DOCKER_MANIFEST, DOCKER_CONFIG, stack, 2, &r) == 0);

    char *base_m = compact(DOCKER_MANIFEST);
    char *want_m = replace(base_m, "\"}]}",
                           "\"},{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"size\":1234,"
                           "\"digest\":\"" A_DIGEST "\"}]}");
    CHECK(eq(r.mtext, want_m));

    char *base_c = compact(DOCKER_CONFIG);
    char *hist = member_text(DOCKER_CONFIG, "history", NULL);
    char *new_hist = replace(hist, "\"empty_layer\":true}]",
                             "\"empty_layer\":true},{\"created\":\"" DOCKER_CREATED "\",\"created_by\":"
                             "\"regfacade: added layer " A_DIGEST "\"}]");
    char *want_c = replace(base_c, hist, new_hist);
    want_c = replace_own(want_c, "e4e56067a63f2e105b01b3310e114309c2028b9ca886c498a910cf06e1935405\"]",
                         "e4e56067a63f2e105b01b3310e114309c2028b9ca886c498a910cf06e1935405\",\"" A_DIFF "\"]");
    CHECK(eq(r.ctext, want_c));
    CHECK(layer_count(r.m) == 3 && diff_id_count(r.c) == 3 && non_empty_history(r.c) == 3);
    /* the unknown Docker fields are still there, in place */
    CHECK(strstr(r.ctext, "\"container_config\":{\"Hostname\":\"6e3a6c5bbe6c\"") != NULL);
    CHECK(strstr(r.ctext, "\"Labels\":null},\"container\":") != NULL);
    free(base_m);
    free(want_m);
    free(base_c);
    free(hist);
    free(new_hist);
    free(want_c);
    result_free(&r);
}

/* Prepend to an OCI image: OCI's key order (mediaType, digest, size), the
 * added history entry first, the base's block after it. */
static void test_oci_prepend(void) {
    image_layer stack[] = {LAYER_B, BASE};
    result r;
    CHECK(run(OCI_MANIFEST, OCI_CONFIG, stack, 2, &r) == 0);
    char *base_m = compact(OCI_MANIFEST);
    char *want_m = replace(base_m, "\"layers\":[",
                           "\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\","
                           "\"digest\":\"" B_DIGEST "\",\"size\":5678},");
    CHECK(eq(r.mtext, want_m));

    char *base_c = compact(OCI_CONFIG);
    char *want_c = replace(base_c, "\"history\":[",
                           "\"history\":[{\"created\":\"" OCI_CREATED "\",\"created_by\":\"COPY supervisor "
                           "/.supervisor/\",\"comment\":\"regfacade: supervisor\"},");
    want_c = replace_own(want_c, "\"diff_ids\":[", "\"diff_ids\":[\"" B_DIFF "\",");
    CHECK(eq(r.ctext, want_c));
    CHECK(layer_count(r.m) == 4 && diff_id_count(r.c) == 4 && non_empty_history(r.c) == 4);
    free(base_m);
    free(want_m);
    free(base_c);
    free(want_c);
    result_free(&r);
}

/* Layers before and after the base, with urls and annotations; the base's
 * history stays one block between them. */
static void test_interleave(void) {
    json_value *urls = parse("[\"https://layers.example.org/c.tar.gz\"]");
    json_value *ann = parse("{\"org.example.role\":\"ide\",\"a\":\"1\"}");
    image_layer c = {.media_type = IMAGE_MT_OCI_LAYER_ZSTD,
                     .digest = C_DIGEST,
                     .size = 42,
                     .diff_id = C_DIFF,
                     .urls = urls,
                     .annotations = ann};
    image_layer stack[] = {LAYER_A, BASE, c};
    result r;
    CHECK(run(OCI_MANIFEST, OCI_CONFIG, stack, 3, &r) == 0);
    json_value *layers = json_object_get(r.m, "layers");
    CHECK(layers && layers->count == 5);
    CHECK_STR(json_object_get_string(json_array_get(layers, 0), "digest"), A_DIGEST);
    CHECK_STR(json_object_get_string(json_array_get(layers, 4), "digest"), C_DIGEST);
    char *last = ser(json_array_get(layers, 4));
    CHECK(eq(last, "{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+zstd\",\"digest\":\"" C_DIGEST
                   "\",\"size\":42,\"urls\":[\"https://layers.example.org/c.tar.gz\"],"
                   "\"annotations\":{\"org.example.role\":\"ide\",\"a\":\"1\"}}"));
    free(last);
    json_value *ids = json_object_get(json_object_get(r.c, "rootfs"), "diff_ids");
    CHECK(ids && ids->count == 5);
    CHECK_STR(json_array_get(ids, 0)->str, A_DIFF);
    CHECK_STR(json_array_get(ids, 4)->str, C_DIFF);
    json_value *h = json_object_get(r.c, "history");
    CHECK(h && h->count == 8);
    CHECK_STR(json_object_get_string(json_array_get(h, 0), "created_by"), "regfacade: added layer " A_DIGEST);
    CHECK_STR(json_object_get_string(json_array_get(h, 1), "created_by"), "ARG VERSION=1.2");
    CHECK_STR(json_object_get_string(json_array_get(h, 6), "created_by"), "CMD [\"--serve\"]");
    CHECK_STR(json_object_get_string(json_array_get(h, 7), "created_by"), "regfacade: added layer " C_DIGEST);
    CHECK(non_empty_history(r.c) == 5);
    /* the base's own layers are untouched copies: the zstd one keeps its annotations */
    char *third = ser(json_array_get(layers, 3));
    CHECK(eq(third, "{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+zstd\",\"digest\":\"sha256:"
                    "51024354d55eebdfe1930cb00acb397abdbb0691d28d04e252766713df36b2c4\",\"size\":1204,"
                    "\"annotations\":{\"org.example.layer\":\"app\"}}"));
    free(third);
    json_free(urls);
    json_free(ann);
    result_free(&r);
}

/* Without "base": only the listed layers, the base's empty_layer history
 * entries first. */
static void test_no_base(void) {
    image_layer stack[] = {LAYER_A, LAYER_B};
    result r;
    CHECK(run(OCI_MANIFEST, OCI_CONFIG, stack, 2, &r) == 0);
    char *base_m = compact(OCI_MANIFEST);
    char *base_layers = member_text(OCI_MANIFEST, "layers", NULL);
    char *want_m = replace(base_m, base_layers,
                           "[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"" A_DIGEST
                           "\",\"size\":1234},{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\","
                           "\"digest\":\"" B_DIGEST "\",\"size\":5678}]");
    CHECK(eq(r.mtext, want_m));
    char *h = member_text(r.ctext, "history", NULL);
    CHECK(eq(h, "[{\"created\":\"2024-02-14T18:02:21.421212232Z\",\"created_by\":\"ARG VERSION=1.2\",\"comment\":"
                "\"buildkit.dockerfile.v0\",\"empty_layer\":true},{\"created\":\"" OCI_CREATED
                "\",\"created_by\":\"ENV APP_HOME=/srv\",\"comment\":\"buildkit.dockerfile.v0\",\"empty_layer\":"
                "true},{\"created\":\"" OCI_CREATED "\",\"created_by\":\"CMD [\\\"--serve\\\"]\",\"comment\":"
                "\"buildkit.dockerfile.v0\",\"empty_layer\":true},{\"created\":\"" OCI_CREATED
                "\",\"created_by\":\"regfacade: added layer " A_DIGEST "\"},{\"created\":\"" OCI_CREATED
                "\",\"created_by\":\"COPY supervisor /.supervisor/\",\"comment\":\"regfacade: supervisor\"}]"));
    char *ids = member_text(r.ctext, "rootfs", "diff_ids");
    CHECK(eq(ids, "[\"" A_DIFF "\",\"" B_DIFF "\"]"));
    CHECK(non_empty_history(r.c) == 2 && layer_count(r.m) == 2);
    free(base_m);
    free(base_layers);
    free(want_m);
    free(h);
    free(ids);
    result_free(&r);

    /* An empty stack: empty arrays stay arrays. */
    CHECK(run(DOCKER_MANIFEST, DOCKER_CONFIG, NULL, 0, &r) == 0);
    CHECK(strstr(r.mtext, "\"layers\":[]}") != NULL);
    CHECK(strstr(r.ctext, "\"diff_ids\":[]}") != NULL);
    CHECK(non_empty_history(r.c) == 0 && json_object_get(r.c, "history")->count == 2);
    result_free(&r);

    /* Only "base": the same layers, diff_ids and history. */
    image_layer only[] = {BASE};
    CHECK(run(OCI_MANIFEST, OCI_CONFIG, only, 1, &r) == 0);
    char *cm = compact(OCI_MANIFEST), *cc = compact(OCI_CONFIG);
    CHECK(eq(r.mtext, cm));
    CHECK(eq(r.ctext, cc));
    free(cm);
    free(cc);
    result_free(&r);
}

/* Media types are converted both ways for added layers only. */
static void test_conversion_in_manifests(void) {
    image_layer oci_nd = {.media_type = IMAGE_MT_OCI_LAYER_ND_GZIP, .digest = C_DIGEST, .size = 1, .diff_id = C_DIFF};
    image_layer oci_zstd = {.media_type = IMAGE_MT_OCI_LAYER_ZSTD, .digest = B_DIGEST, .size = 2, .diff_id = B_DIFF};
    image_layer oci_tar = {.media_type = IMAGE_MT_OCI_LAYER_TAR, .digest = A_DIGEST, .size = 3, .diff_id = A_DIFF};
    image_layer stack[] = {BASE, oci_nd, oci_zstd, oci_tar};
    result r;
    CHECK(run(DOCKER_MANIFEST, DOCKER_CONFIG, stack, 4, &r) == 0);
    json_value *l = json_object_get(r.m, "layers");
    CHECK_STR(json_object_get_string(json_array_get(l, 0), "mediaType"), IMAGE_MT_DOCKER_LAYER_GZIP);
    CHECK_STR(json_object_get_string(json_array_get(l, 2), "mediaType"), IMAGE_MT_DOCKER_LAYER_FOREIGN);
    CHECK_STR(json_object_get_string(json_array_get(l, 3), "mediaType"), IMAGE_MT_OCI_LAYER_ZSTD);
    CHECK_STR(json_object_get_string(json_array_get(l, 4), "mediaType"), IMAGE_MT_DOCKER_LAYER_TAR);
    result_free(&r);

    image_layer d_gz = {.media_type = IMAGE_MT_DOCKER_LAYER_GZIP, .digest = A_DIGEST, .size = 1, .diff_id = A_DIFF};
    image_layer d_tar = {.media_type = IMAGE_MT_DOCKER_LAYER_TAR, .digest = B_DIGEST, .size = 2, .diff_id = B_DIFF};
    image_layer d_foreign = {
        .media_type = IMAGE_MT_DOCKER_LAYER_FOREIGN, .digest = C_DIGEST, .size = 3, .diff_id = C_DIFF};
    image_layer stack2[] = {d_gz, d_tar, BASE, d_foreign};
    CHECK(run(OCI_MANIFEST, OCI_CONFIG, stack2, 4, &r) == 0);
    l = json_object_get(r.m, "layers");
    CHECK_STR(json_object_get_string(json_array_get(l, 0), "mediaType"), IMAGE_MT_OCI_LAYER_GZIP);
    CHECK_STR(json_object_get_string(json_array_get(l, 1), "mediaType"), IMAGE_MT_OCI_LAYER_TAR);
    CHECK_STR(json_object_get_string(json_array_get(l, 4), "mediaType"), IMAGE_MT_OCI_LAYER_ZSTD); /* base's own */
    CHECK_STR(json_object_get_string(json_array_get(l, 5), "mediaType"), IMAGE_MT_OCI_LAYER_ND_GZIP);
    result_free(&r);

    /* an OCI manifest without mediaType is OCI; it stays without one */
    const char *bare = "{\"schemaVersion\":2,\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\","
                       "\"size\":2,\"digest\":\"" C_DIGEST "\"},\"layers\":[]}";
    const char *cfg = "{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}";
    image_layer one[] = {d_gz};
    CHECK(run(bare, cfg, one, 1, &r) == 0);
    CHECK(eq(r.mtext, "{\"schemaVersion\":2,\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\","
                      "\"size\":2,\"digest\":\"" C_DIGEST "\"},\"layers\":[{\"mediaType\":\"application/vnd.oci.image."
                      "layer.v1.tar+gzip\",\"size\":1,\"digest\":\"" A_DIGEST "\"}]}"));
    /* no history in the base: none is added */
    CHECK(eq(r.ctext, "{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"" A_DIFF "\"]}}"));
    result_free(&r);
}

/* History: null means none; without "created" the entry has none; a base
 * whose history does not line up keeps it as a block. */
static void test_history_edges(void) {
    const char *man = "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\","
                      "\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"" C_DIGEST
                      "\",\"size\":2},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\","
                      "\"digest\":\"" B_DIGEST "\",\"size\":10},{\"mediaType\":\"application/vnd.oci.image.layer.v1."
                      "tar+gzip\",\"digest\":\"" C_DIGEST "\",\"size\":11}]}";
    const char *null_hist =
        "{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"" B_DIFF "\",\"" C_DIFF "\"]},\"history\":null}";
    image_layer stack[] = {BASE, LAYER_A};
    result r;
    CHECK(run(man, null_hist, stack, 2, &r) == 0);
    CHECK(strstr(r.ctext, "\"history\":null}") != NULL);
    result_free(&r);

    /* one non-empty entry for two layers, and no "created" */
    const char *short_hist = "{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"" B_DIFF "\",\"" C_DIFF
                             "\"]},\"history\":[{\"created_by\":\"ADD rootfs.tar /\"},{\"created_by\":\"CMD sh\","
                             "\"empty_layer\":true}]}";
    CHECK(run(man, short_hist, stack, 2, &r) == 0);
    char *h = member_text(r.ctext, "history", NULL);
    CHECK(eq(h, "[{\"created_by\":\"ADD rootfs.tar /\"},{\"created_by\":\"CMD sh\",\"empty_layer\":true},"
                "{\"created_by\":\"regfacade: added layer " A_DIGEST "\"}]"));
    free(h);
    result_free(&r);

    /* an empty history array gets the added entries only */
    const char *empty_hist =
        "{\"created\":\"2020-01-01T00:00:00Z\",\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"" B_DIFF "\",\"" C_DIFF
        "\"]},\"history\":[]}";
    image_layer pre[] = {LAYER_A, BASE};
    CHECK(run(man, empty_hist, pre, 2, &r) == 0);
    h = member_text(r.ctext, "history", NULL);
    CHECK(eq(h, "[{\"created\":\"2020-01-01T00:00:00Z\",\"created_by\":\"regfacade: added layer " A_DIGEST "\"}]"));
    free(h);
    result_free(&r);
}

/* Sizes: the base's exact text survives; added sizes go up to 2^63-1. */
static void test_sizes(void) {
    image_layer big = {
        .media_type = IMAGE_MT_OCI_LAYER_GZIP, .digest = A_DIGEST, .size = (uint64_t)INT64_MAX, .diff_id = A_DIFF};
    image_layer stack[] = {BASE, big};
    result r;
    CHECK(run(DOCKER_MANIFEST, DOCKER_CONFIG, stack, 2, &r) == 0);
    CHECK(strstr(r.mtext, "\"size\":9007199254740993,") != NULL);
    CHECK(strstr(r.mtext, "\"size\":9223372036854775807,") != NULL);
    result_free(&r);
    big.size = (uint64_t)INT64_MAX + 1;
    image_layer stack2[] = {BASE, big};
    CHECK(fails(DOCKER_MANIFEST, DOCKER_CONFIG, stack2, 2,
                "stack[2] (layer " A_DIGEST "): size 9223372036854775808 is larger than 2^63-1"));
}

/* Finishing: digests and sizes are right, deterministic, and follow the
 * inputs; the inputs never change. */
static void test_finish_and_determinism(void) {
    image_layer stack[] = {LAYER_A, BASE, LAYER_B};
    json_value *bm = parse(OCI_MANIFEST), *bc = parse(OCI_CONFIG);
    char *bm_before = ser(bm), *bc_before = ser(bc);
    char *mb[2] = {0}, *cb[2] = {0};
    size_t ml[2], cl[2];
    char md[2][80], cd[2][80];
    for (int i = 0; i < 2; i++) {
        json_value *m = NULL, *c = NULL;
        CHECK(image_assemble(bm, bc, stack, 3, &m, &c, errbuf, sizeof errbuf) == 0);
        CHECK(image_finish(m, c, &cb[i], &cl[i], cd[i], &mb[i], &ml[i], md[i], errbuf, sizeof errbuf) == 0);
        json_free(m);
        json_free(c);
    }
    CHECK(ml[0] == ml[1] && cl[0] == cl[1] && memcmp(mb[0], mb[1], ml[0]) == 0 && memcmp(cb[0], cb[1], cl[0]) == 0);
    CHECK_STR(md[0], md[1]);
    CHECK_STR(cd[0], cd[1]);
    char want[DIGEST_STRING_LEN];
    CHECK(digest_bytes(cb[0], cl[0], want) == 0);
    CHECK_STR(cd[0], want);
    CHECK(digest_bytes(mb[0], ml[0], want) == 0);
    CHECK_STR(md[0], want);
    /* the config descriptor names the new config, in its own key order */
    char desc[256];
    snprintf(desc, sizeof desc,
             "\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"%s\",\"size\":%zu}",
             cd[0], cl[0]);
    CHECK(strstr(mb[0], desc) != NULL);
    CHECK(strlen(mb[0]) == ml[0] && strlen(cb[0]) == cl[0]);
    /* the inputs are untouched */
    char *bm_after = ser(bm), *bc_after = ser(bc);
    CHECK(eq(bm_after, bm_before));
    CHECK(eq(bc_after, bc_before));

    /* another order, another digest */
    image_layer other[] = {LAYER_B, BASE, LAYER_A};
    json_value *m = NULL, *c = NULL;
    char *mb2 = NULL, *cb2 = NULL;
    size_t ml2, cl2;
    char md2[80], cd2[80];
    CHECK(image_assemble(bm, bc, other, 3, &m, &c, errbuf, sizeof errbuf) == 0);
    CHECK(image_finish(m, c, &cb2, &cl2, cd2, &mb2, &ml2, md2, errbuf, sizeof errbuf) == 0);
    CHECK(strcmp(md2, md[0]) != 0 && strcmp(cd2, cd[0]) != 0);
    json_free(m);
    json_free(c);
    free(mb2);
    free(cb2);

    /* a config edit (as the rewrite hook makes) changes both digests */
    CHECK(image_assemble(bm, bc, stack, 3, &m, &c, errbuf, sizeof errbuf) == 0);
    json_object_set(json_object_get(c, "config"), "User", json_new_string("root"));
    CHECK(image_finish(m, c, &cb2, &cl2, cd2, &mb2, &ml2, md2, errbuf, sizeof errbuf) == 0);
    CHECK(strcmp(cd2, cd[0]) != 0 && strcmp(md2, md[0]) != 0);
    json_free(m);
    json_free(c);
    free(mb2);
    free(cb2);

    for (int i = 0; i < 2; i++) {
        free(mb[i]);
        free(cb[i]);
    }
    free(bm_before);
    free(bc_before);
    free(bm_after);
    free(bc_after);
    json_free(bm);
    json_free(bc);

    /* urls and data of the old config go; other descriptor fields stay */
    m = parse("{\"schemaVersion\":2,\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\","
              "\"size\":1,\"digest\":\"" C_DIGEST "\",\"urls\":[\"https://x\"],\"data\":\"e30=\","
              "\"annotations\":{\"k\":\"v\"}},\"layers\":[]}");
    c = parse("{}");
    CHECK(image_finish(m, c, &cb2, &cl2, cd2, &mb2, &ml2, md2, errbuf, sizeof errbuf) == 0);
    CHECK(eq(mb2, "{\"schemaVersion\":2,\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\","
                  "\"size\":2,\"digest\":\"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a\","
                  "\"annotations\":{\"k\":\"v\"}},\"layers\":[]}"));
    free(mb2);
    free(cb2);
    json_free(m);
    json_free(c);
}

static void test_finish_errors(void) {
    char *mb, *cb;
    size_t ml, cl;
    char md[80], cd[80];
    json_value *c = parse("{}");
    json_value *m = parse("{\"schemaVersion\":2,\"layers\":[]}");
    CHECK(image_finish(m, c, &cb, &cl, cd, &mb, &ml, md, errbuf, sizeof errbuf) == -1);
    CHECK_STR(errbuf, "manifest: config is missing or not an object");
    CHECK(mb == NULL && cb == NULL);
    json_free(m);
    m = parse("[]");
    CHECK(image_finish(m, c, &cb, &cl, cd, &mb, &ml, md, errbuf, sizeof errbuf) == -1);
    CHECK_STR(errbuf, "manifest: not a JSON object");
    json_free(m);
    m = parse("{\"config\":{}}");
    json_value *arr = parse("[]");
    CHECK(image_finish(m, arr, &cb, &cl, cd, &mb, &ml, md, errbuf, sizeof errbuf) == -1);
    CHECK_STR(errbuf, "config: not a JSON object");
    CHECK(image_finish(NULL, c, &cb, &cl, cd, &mb, &ml, md, errbuf, sizeof errbuf) == -1);
    CHECK_STR(errbuf, "image_finish: missing argument");
    json_free(arr);
    json_free(m);
    json_free(c);
}

#define MAN_PREFIX                                                                                  \
    "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":" \
    "{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"" C_DIGEST "\",\"size\":2},"
#define ONE_LAYER                                                                                       \
    "\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"" B_DIGEST \
    "\",\"size\":10}]}"
#define CFG_ONE "{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"" B_DIFF "\"]}}"

static void test_errors(void) {
    image_layer base[] = {BASE};
    const char *good = MAN_PREFIX ONE_LAYER;
    /* the base manifest */
    CHECK(fails("[]", CFG_ONE, base, 1, "base manifest: not a JSON object"));
    CHECK(fails("{\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[]}", CFG_ONE, base, 1,
                "base manifest: mediaType application/vnd.oci.image.index.v1+json is an index; assemble each "
                "platform's manifest"));
    CHECK(fails("{\"mediaType\":\"application/vnd.docker.distribution.manifest.list.v2+json\",\"manifests\":[]}",
                CFG_ONE, base, 1,
                "base manifest: mediaType application/vnd.docker.distribution.manifest.list.v2+json is an index; "
                "assemble each platform's manifest"));
    CHECK(fails("{\"schemaVersion\":2,\"manifests\":[]}", CFG_ONE, base, 1,
                "base manifest: mediaType (none, but it has \"manifests\") is an index; assemble each platform's "
                "manifest"));
    CHECK(fails("{\"mediaType\":\"application/vnd.docker.distribution.manifest.v1+prettyjws\"}", CFG_ONE, base, 1,
                "base manifest: mediaType \"application/vnd.docker.distribution.manifest.v1+prettyjws\" is not an "
                "image manifest type (want application/vnd.oci.image.manifest.v1+json or "
                "application/vnd.docker.distribution.manifest.v2+json)"));
    CHECK(fails("{\"mediaType\":2}", CFG_ONE, base, 1, "base manifest: mediaType is not a string"));
    CHECK(fails(MAN_PREFIX "\"layers\":{}}", CFG_ONE, base, 1, "base manifest: layers is missing or not an array"));
    CHECK(fails("{\"schemaVersion\":2}", CFG_ONE, base, 1, "base manifest: layers is missing or not an array"));
    CHECK(fails(MAN_PREFIX "\"layers\":[\"x\"]}", CFG_ONE, base, 1, "base manifest: layers[0] is not an object"));
    CHECK(fails(MAN_PREFIX "\"layers\":[{\"digest\":\"" B_DIGEST "\",\"size\":1}]}", CFG_ONE, base, 1,
                "base manifest: layers[0].mediaType is missing or not a string"));
    CHECK(fails(MAN_PREFIX "\"layers\":[{\"mediaType\":\"x\",\"digest\":\"sha256:abc\",\"size\":1}]}", CFG_ONE, base, 1,
                "base manifest: layers[0].digest is missing or not a valid digest"));
    const char *bad_sizes[] = {"-1", "1.5", "\"10\"", "9223372036854775808", "null"};
    for (size_t i = 0; i < 5; i++) {
        char man[1024];
        snprintf(man, sizeof man,
                 MAN_PREFIX "\"layers\":[{\"mediaType\":\"x\",\"digest\":\"" B_DIGEST "\",\"size\":%s}]}",
                 bad_sizes[i]);
        CHECK(
            fails(man, CFG_ONE, base, 1, "base manifest: layers[0].size is missing or not an integer in [0, 2^63-1]"));
    }
    CHECK(fails("{\"schemaVersion\":2," ONE_LAYER, CFG_ONE, base, 1,
                "base manifest: config is missing or not an object"));
    /* the base config */
    CHECK(fails(good, "[]", base, 1, "base config: not a JSON object"));
    CHECK(fails(good, "{}", base, 1, "base config: rootfs is missing or not an object"));
    CHECK(fails(good, "{\"rootfs\":{\"type\":\"layers\"}}", base, 1,
                "base config: rootfs.diff_ids is missing or not an array"));
    CHECK(fails(good, "{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}", base, 1,
                "base config has 0 diff_ids for 1 layers"));
    CHECK(fails(DOCKER_MANIFEST, CFG_ONE, base, 1, "base config has 1 diff_ids for 2 layers"));
    CHECK(fails(good, "{\"rootfs\":{\"diff_ids\":[7]}}", base, 1,
                "base config: rootfs.diff_ids[0] is not a digest string"));
    CHECK(fails(good, "{\"rootfs\":{\"diff_ids\":[\"" B_DIFF "\"]},\"history\":{}}", base, 1,
                "base config: history is not an array"));
    CHECK(fails(good, "{\"rootfs\":{\"diff_ids\":[\"" B_DIFF "\"]},\"history\":[{},3]}", base, 1,
                "base config: history[1] is not an object"));
    /* the stack */
    image_layer l = LAYER_A;
    l.media_type = NULL;
    image_layer s1[] = {BASE, l};
    CHECK(fails(good, CFG_ONE, s1, 2, "stack[2]: media_type is missing"));
    l = LAYER_A;
    l.media_type = "";
    image_layer s1b[] = {l};
    CHECK(fails(good, CFG_ONE, s1b, 1, "stack[1]: media_type is missing"));
    l = LAYER_A;
    l.digest = "sha256:ABC";
    image_layer s2[] = {l};
    CHECK(fails(good, CFG_ONE, s2, 1, "stack[1]: digest \"sha256:ABC\" is not a valid digest"));
    l = LAYER_A;
    l.digest = NULL;
    image_layer s2b[] = {l};
    CHECK(fails(good, CFG_ONE, s2b, 1, "stack[1]: digest \"(none)\" is not a valid digest"));
    l = LAYER_A;
    l.diff_id = "sha256:x";
    image_layer s3[] = {BASE, l};
    CHECK(fails(good, CFG_ONE, s3, 2, "stack[2] (layer " A_DIGEST "): diff_id \"sha256:x\" is not a valid digest"));
    json_value *obj = parse("{\"a\":1}"), *arr = parse("[\"u\",2]"), *strs = parse("[\"u\"]");
    l = LAYER_A;
    l.urls = obj;
    image_layer s4[] = {l};
    CHECK(fails(good, CFG_ONE, s4, 1, "stack[1] (layer " A_DIGEST "): urls is not an array"));
    l.urls = arr;
    image_layer s5[] = {l};
    CHECK(fails(good, CFG_ONE, s5, 1, "stack[1] (layer " A_DIGEST "): urls[1] is not a string"));
    l.urls = strs;
    l.annotations = strs;
    image_layer s6[] = {l};
    CHECK(fails(good, CFG_ONE, s6, 1, "stack[1] (layer " A_DIGEST "): annotations is not an object"));
    l.annotations = obj;
    image_layer s7[] = {l};
    CHECK(fails(good, CFG_ONE, s7, 1, "stack[1] (layer " A_DIGEST "): annotations[\"a\"] is not a string"));
    json_free(obj);
    json_free(arr);
    json_free(strs);
    image_layer twice[] = {BASE, LAYER_A, BASE};
    CHECK(fails(good, CFG_ONE, twice, 3, "stack[3]: \"base\" appears twice (first at stack[1])"));
    /* arguments */
    json_value *m = parse(good), *c = parse(CFG_ONE), *om = (json_value *)1, *oc = (json_value *)1;
    CHECK(image_assemble(m, c, NULL, 1, &om, &oc, errbuf, sizeof errbuf) == -1);
    CHECK_STR(errbuf, "image_assemble: missing argument");
    CHECK(om == NULL && oc == NULL);
    CHECK(image_assemble(m, c, base, 1, NULL, &oc, errbuf, sizeof errbuf) == -1);
    CHECK(image_assemble(NULL, c, base, 1, &om, &oc, errbuf, sizeof errbuf) == -1);
    CHECK_STR(errbuf, "base manifest: not a JSON object");
    CHECK(image_assemble(m, NULL, base, 1, &om, &oc, errbuf, sizeof errbuf) == -1);
    CHECK_STR(errbuf, "base config: not a JSON object");
    /* a NULL err buffer is fine */
    CHECK(image_assemble(m, NULL, base, 1, &om, &oc, NULL, 0) == -1);
    json_free(m);
    json_free(c);
}

/* Duplicated keys in the base: the replaced member keeps the last
 * occurrence's place, as json_object_set does. */
static void test_duplicate_keys(void) {
    const char *man = MAN_PREFIX "\"layers\":[],\"annotations\":{}," ONE_LAYER;
    image_layer stack[] = {BASE, LAYER_A};
    result r;
    CHECK(run(man, CFG_ONE, stack, 2, &r) == 0);
    CHECK(layer_count(r.m) == 2);
    CHECK(strstr(r.mtext, "\"annotations\":{},\"layers\":[{") != NULL);
    CHECK(strstr(r.mtext, "\"layers\":[]") == NULL);
    result_free(&r);
}

/* ------------------------------------------------------------------------ */
/* The rewrite step, driven from C as the server drives it                  */

/* A Lua allocator with a cap, to make every allocation fail in turn. */
typedef struct {
    size_t used, limit;
} budget;

static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    budget *b = ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        free(ptr);
        b->used -= old;
        return NULL;
    }
    if (nsize > old && b->used + (nsize - old) > b->limit) return NULL;
    void *p = realloc(ptr, nsize);
    if (p) b->used = b->used - old + nsize;
    return p;
}

static const char *HOOK = "return function(img, req)\n"
                          "  img.config.config.User = req and req.user or 'nobody'\n"
                          "  img.config.config.Env[#img.config.config.Env + 1] = 'N=' .. #img.layers\n"
                          "  img.manifest.annotations = img.manifest.annotations or {}\n"
                          "  img.manifest.annotations['org.example.base'] = tostring(img.layers[2].base)\n"
                          "end\n";

static void test_rewrite_from_c(void) {
    image_layer stack[] = {BASE, LAYER_A};
    json_value *bm = parse(OCI_MANIFEST), *bc = parse(OCI_CONFIG), *m = NULL, *c = NULL;
    CHECK(image_assemble(bm, bc, stack, 2, &m, &c, errbuf, sizeof errbuf) == 0);
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    CHECK(luaL_dostring(L, HOOK) == LUA_OK); /* 1: the hook */
    lua_newtable(L);                         /* 2: req */
    lua_pushstring(L, "root");
    lua_setfield(L, -2, "user");
    int top = lua_gettop(L);

    json_value *m0 = m, *c0 = c;
    CHECK(image_rewrite_run(L, 1, 2, &m, &c, stack, 2, NULL, errbuf, sizeof errbuf) == 0);
    CHECK(lua_gettop(L) == top);
    CHECK(m != m0 && c != c0); /* new trees; the old ones were freed */
    CHECK_STR(json_object_get_string(json_object_get(c, "config"), "User"), "root");
    json_value *env = json_object_get(json_object_get(c, "config"), "Env");
    CHECK(env && env->count == 3);
    CHECK_STR(json_array_get(env, 2)->str, "N=4");
    CHECK_STR(json_object_get_string(json_object_get(m, "annotations"), "org.example.base"), "true");
    /* relative indexes and no req */
    CHECK(image_rewrite_run(L, -2, 0, &m, &c, stack, 2, NULL, errbuf, sizeof errbuf) == 0);
    CHECK_STR(json_object_get_string(json_object_get(c, "config"), "User"), "nobody");
    CHECK(lua_gettop(L) == top);

    /* a failing hook leaves the trees and the stack as they were */
    CHECK(luaL_dostring(L, "return function() error('boom', 0) end") == LUA_OK);
    m0 = m;
    c0 = c;
    char *before = ser(c);
    CHECK(image_rewrite_run(L, -1, 2, &m, &c, stack, 2, NULL, errbuf, sizeof errbuf) == -1);
    CHECK_STR(errbuf, "rewrite hook: boom");
    CHECK(m == m0 && c == c0 && lua_gettop(L) == top + 1);
    char *after = ser(c);
    CHECK(eq(after, before));
    free(before);
    free(after);
    lua_pop(L, 1);
    /* nil: nothing to do */
    lua_pushnil(L);
    CHECK(image_rewrite_run(L, -1, 0, &m, &c, stack, 2, NULL, errbuf, sizeof errbuf) == 0 && m == m0 && c == c0);
    lua_pop(L, 1);
    CHECK(image_rewrite_run(L, 1, 2, NULL, &c, stack, 2, NULL, errbuf, sizeof errbuf) == -1);
    CHECK_STR(errbuf, "rewrite: no manifest or config");

    /* lua_json_push and lua_json_to_tree are inverse on a real config */
    CHECK(lua_json_push(L, bc) == 0);
    json_value *back = lua_json_to_tree(L, -1, errbuf, sizeof errbuf);
    char *t1 = ser(back), *t2 = ser(bc);
    CHECK(eq(t1, t2));
    free(t1);
    free(t2);
    json_free(back);
    lua_pop(L, 1);
    lua_close(L);
    json_free(m);
    json_free(c);
    json_free(bm);
    json_free(bc);
}

/* Every allocation of the rewrite step and of the Lua module failing in
 * turn: each run fails cleanly or succeeds; nothing leaks (run under ASan)
 * and the state is still usable. */
static void test_rewrite_out_of_memory(void) {
    image_layer stack[] = {LAYER_A, BASE};
    json_value *bm = parse(DOCKER_MANIFEST), *bc = parse(DOCKER_CONFIG);
    budget b = {0, SIZE_MAX};
    lua_State *L = lua_newstate(limited_alloc, &b);
    luaL_openlibs(L);
    luaL_requiref(L, "regfacade.core", luaopen_regfacade_core, 0);
    lua_setglobal(L, "core");
    CHECK(luaL_dostring(L, HOOK) == LUA_OK);
    int hook = lua_gettop(L);

    int failures = 0, successes = 0;
    for (size_t extra = 0; extra < 400000 && successes < 3; extra += extra < 20000 ? 97 : 4999) {
        json_value *m = NULL, *c = NULL;
        CHECK(image_assemble(bm, bc, stack, 2, &m, &c, errbuf, sizeof errbuf) == 0);
        json_value *m0 = m, *c0 = c;
        lua_gc(L, LUA_GCCOLLECT);
        b.limit = b.used + extra;
        int rc = image_rewrite_run(L, hook, 0, &m, &c, stack, 2, NULL, errbuf, sizeof errbuf);
        b.limit = SIZE_MAX;
        if (rc == 0) {
            successes++;
            CHECK_STR(json_object_get_string(json_object_get(c, "config"), "User"), "nobody");
        } else {
            failures++;
            if (!(m == m0 && c == c0 && strstr(errbuf, "out of memory") != NULL))
                fprintf(stderr, "extra %zu: %s\n", extra, errbuf);
            CHECK(m == m0 && c == c0 && strstr(errbuf, "out of memory") != NULL);
        }
        CHECK(lua_gettop(L) == hook);
        json_free(m);
        json_free(c);
    }
    CHECK(failures > 10 && successes == 3);

    /* the module: assemble_rewrite and json with the same squeeze */
    CHECK(luaL_loadstring(L, "local M, C, hook = ...\n"
                             "local l = { media_type = 'application/vnd.oci.image.layer.v1.tar+gzip',\n"
                             "  digest = '" A_DIGEST "', size = 1, diff_id = '" A_DIFF "',\n"
                             "  urls = { 'https://x' }, annotations = { a = 'b' } }\n"
                             "local m = core.assemble_rewrite(M, C, { l, 'base' }, hook, { user = 'u' })\n"
                             "return core.json.encode(core.json.decode(m))") == LUA_OK);
    int chunk = lua_gettop(L);
    failures = successes = 0;
    for (size_t extra = 0; extra < 400000 && successes < 3; extra += extra < 20000 ? 89 : 4999) {
        lua_gc(L, LUA_GCCOLLECT);
        lua_pushvalue(L, chunk);
        lua_pushstring(L, DOCKER_MANIFEST);
        lua_pushstring(L, DOCKER_CONFIG);
        lua_pushvalue(L, hook);
        b.limit = b.used + extra;
        int st = lua_pcall(L, 3, 1, 0);
        b.limit = SIZE_MAX;
        if (st == LUA_OK)
            successes++;
        else
            failures++;
        lua_pop(L, 1);
        CHECK(lua_gettop(L) == chunk);
    }
    CHECK(failures > 10 && successes == 3);
    lua_close(L);
    CHECK(b.used == 0);
    json_free(bm);
    json_free(bc);
}

int main(void) {
    test_media_types();
    test_docker_append();
    test_oci_prepend();
    test_interleave();
    test_no_base();
    test_conversion_in_manifests();
    test_history_edges();
    test_sizes();
    test_finish_and_determinism();
    test_finish_errors();
    test_errors();
    test_duplicate_keys();
    test_rewrite_from_c();
    test_rewrite_out_of_memory();
    return UNIT_DONE("image");
}
