/* The JSON codec (json.h): parse -> serialize -> parse is a fixed point,
 * clone serializes the same, and serialization is deterministic. */
#include "fuzz.h"

#include "regfacade/json.h"

/* Same tree: types, bytes of strings, numbers and keys (with their lengths:
 * keys and strings may hold NUL), order. */
static int same(const json_value *a, const json_value *b) {
    if (a->type != b->type) return 0;
    switch (a->type) {
        case JSON_NUMBER:
        case JSON_STRING:
            return a->len == b->len && memcmp(a->str, b->str, a->len) == 0;
        case JSON_ARRAY:
        case JSON_OBJECT:
            if (a->count != b->count) return 0;
            for (size_t i = 0; i < a->count; i++) {
                if (a->type == JSON_OBJECT &&
                    (a->key_lens[i] != b->key_lens[i] || memcmp(a->keys[i], b->keys[i], a->key_lens[i]) != 0))
                    return 0;
                if (!same(a->items[i], b->items[i])) return 0;
            }
            return 1;
        default:
            return 1;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[256];
    json_value *v = json_parse((const char *)data, size, JSON_DEFAULT_MAX_DEPTH, err, sizeof err);
    if (!v) {
        FUZZ_ASSERT(memchr(err, 0, sizeof err));
        return 0;
    }
    size_t l1 = 0, l2 = 0, l3 = 0;
    char *s1 = json_serialize(v, &l1);
    FUZZ_ASSERT(s1 && strlen(s1) <= l1);
    json_value *w = json_parse(s1, l1, JSON_DEFAULT_MAX_DEPTH + 1, err, sizeof err);
    if (!w) fprintf(stderr, "re-parse failed: %s\n", err);
    FUZZ_ASSERT(w);
    FUZZ_ASSERT(same(v, w));
    char *s2 = json_serialize(w, &l2);
    FUZZ_ASSERT(s2 && l1 == l2 && memcmp(s1, s2, l1) == 0);
    json_value *c = json_clone(v);
    FUZZ_ASSERT(c && same(v, c));
    char *s3 = json_serialize(c, &l3);
    FUZZ_ASSERT(s3 && l1 == l3 && memcmp(s1, s3, l1) == 0);
    /* Numbers convert consistently. */
    if (v->type == JSON_NUMBER) {
        int64_t i;
        uint64_t u;
        bool si = json_get_int64(v, &i), su = json_get_uint64(v, &u);
        if (si && su) FUZZ_ASSERT(i >= 0 && (uint64_t)i == u);
    }
    free(s1);
    free(s2);
    free(s3);
    json_free(v);
    json_free(w);
    json_free(c);
    return 0;
}
