/* The manifest rewrite (image.h): image_assemble + image_finish on an
 * upstream manifest and config with a layer stack.
 * Input: MANIFEST-JSON NUL CONFIG-JSON NUL STACK, where each STACK byte is
 * one stack entry: b % 5 == 0 stands for "base", anything else is an added
 * layer whose media type, size and digests derive from b (b % 5 == 4 gives
 * a malformed digest, which must be refused, not crash).
 * Invariants on success: the manifest's layers and the config's diff_ids
 * have the same length; the output re-parses to the same bytes; the config
 * descriptor names the config bytes; assembling twice gives identical
 * bytes (determinism). */
#include "fuzz.h"

#include "regfacade/digest.h"
#include "regfacade/image.h"
#include "regfacade/json.h"

static const char *const media_types[] = {
    IMAGE_MT_OCI_LAYER_GZIP,       IMAGE_MT_OCI_LAYER_TAR,     IMAGE_MT_OCI_LAYER_ZSTD, IMAGE_MT_DOCKER_LAYER_GZIP,
    IMAGE_MT_DOCKER_LAYER_FOREIGN, IMAGE_MT_OCI_LAYER_ND_GZIP, "application/x-unknown",
};

typedef struct {
    char digest[80];
    char diff_id[80];
} layer_names;

static int build(const json_value *m, const json_value *c, const image_layer *stack, size_t n, char **mb, size_t *ml,
                 char **cb, size_t *cl, char md[80], char cd[80]) {
    json_value *om = NULL, *oc = NULL;
    char err[512];
    if (image_assemble(m, c, stack, n, &om, &oc, err, sizeof err) != 0) {
        FUZZ_ASSERT(!om && !oc && memchr(err, 0, sizeof err));
        return -1;
    }
    FUZZ_ASSERT(om && oc);
    int rc = image_finish(om, oc, cb, cl, cd, mb, ml, md, err, sizeof err);
    json_free(om);
    json_free(oc);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *rest, *rest2;
    size_t rest_size, rest2_size;
    size_t ml0 = fuzz_split(data, size, &rest, &rest_size);
    size_t cl0 = fuzz_split(rest, rest_size, &rest2, &rest2_size);
    if (rest2_size > 64) rest2_size = 64;
    char err[256];
    json_value *m = json_parse((const char *)data, ml0, JSON_DEFAULT_MAX_DEPTH, err, sizeof err);
    json_value *c = json_parse((const char *)rest, cl0, JSON_DEFAULT_MAX_DEPTH, err, sizeof err);
    if (!m || !c) {
        json_free(m);
        json_free(c);
        return 0;
    }
    image_layer stack[64];
    layer_names names[64];
    memset(stack, 0, sizeof stack);
    for (size_t i = 0; i < rest2_size; i++) {
        uint8_t b = rest2[i];
        if (b % 5 == 0) {
            stack[i].is_base = true;
            continue;
        }
        if (b % 5 == 4)
            snprintf(names[i].digest, sizeof names[i].digest, "sha256:%02x", b);
        else
            snprintf(names[i].digest, sizeof names[i].digest, "sha256:%064x", b);
        snprintf(names[i].diff_id, sizeof names[i].diff_id, "sha256:%064x", (unsigned)b + 1000);
        stack[i].media_type = media_types[b % (sizeof media_types / sizeof media_types[0])];
        stack[i].digest = names[i].digest;
        stack[i].diff_id = names[i].diff_id;
        stack[i].size = (uint64_t)b * 1000003u;
        stack[i].created_by = (b & 0x40) ? "RUN fuzz" : NULL;
        stack[i].comment = (b & 0x80) ? "fuzz" : NULL;
    }
    char *mb = NULL, *cb = NULL, *mb2 = NULL, *cb2 = NULL;
    size_t ml = 0, cl = 0, ml2 = 0, cl2 = 0;
    char md[80], cd[80], md2[80], cd2[80];
    if (build(m, c, stack, rest2_size, &mb, &ml, &cb, &cl, md, cd) == 0) {
        json_value *om = json_parse(mb, ml, JSON_DEFAULT_MAX_DEPTH + 2, err, sizeof err);
        json_value *oc = json_parse(cb, cl, JSON_DEFAULT_MAX_DEPTH + 2, err, sizeof err);
        FUZZ_ASSERT(om && oc);
        size_t l1, l2;
        char *s1 = json_serialize(om, &l1), *s2 = json_serialize(oc, &l2);
        FUZZ_ASSERT(s1 && s2 && l1 == ml && l2 == cl && memcmp(s1, mb, ml) == 0 && memcmp(s2, cb, cl) == 0);
        free(s1);
        free(s2);
        const json_value *layers = json_object_get(om, "layers");
        const json_value *rootfs = json_object_get(oc, "rootfs");
        const json_value *diff_ids = json_object_get(rootfs, "diff_ids");
        FUZZ_ASSERT(layers && layers->type == JSON_ARRAY && diff_ids && diff_ids->type == JSON_ARRAY);
        FUZZ_ASSERT(layers->count == diff_ids->count);
        const json_value *desc = json_object_get(om, "config");
        char want[DIGEST_STRING_LEN];
        FUZZ_ASSERT(digest_bytes(cb, cl, want) == 0);
        FUZZ_ASSERT(json_object_get_string(desc, "digest") &&
                    strcmp(json_object_get_string(desc, "digest"), want) == 0);
        FUZZ_ASSERT(strcmp(cd, want) == 0);
        uint64_t sz;
        FUZZ_ASSERT(json_get_uint64(json_object_get(desc, "size"), &sz) && sz == cl);
        json_free(om);
        json_free(oc);
        /* Deterministic: a second run gives the same bytes. */
        FUZZ_ASSERT(build(m, c, stack, rest2_size, &mb2, &ml2, &cb2, &cl2, md2, cd2) == 0);
        FUZZ_ASSERT(ml == ml2 && cl == cl2 && memcmp(mb, mb2, ml) == 0 && memcmp(cb, cb2, cl) == 0);
        FUZZ_ASSERT(strcmp(md, md2) == 0);
    }
    free(mb);
    free(cb);
    free(mb2);
    free(cb2);
    json_free(m);
    json_free(c);
    return 0;
}
