/* Names, tags, digests, host normalization and base64 (ref.h). */
#include "fuzz.h"

#include "regfacade/ref.h"

static int lower_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *s = fuzz_cstr(data, size);
    size_t n = strlen(s);

    if (ref_valid_name(s)) {
        FUZZ_ASSERT(n >= 1 && n <= REF_NAME_MAX);
        FUZZ_ASSERT((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= '0' && s[0] <= '9'));
        FUZZ_ASSERT(strstr(s, "..") == NULL && strstr(s, "//") == NULL && s[n - 1] != '/');
        for (size_t i = 0; i < n; i++) FUZZ_ASSERT(!(s[i] >= 'A' && s[i] <= 'Z'));
    }
    if (ref_valid_tag(s)) {
        FUZZ_ASSERT(n >= 1 && n <= REF_TAG_MAX);
        FUZZ_ASSERT(strchr(s, '/') == NULL && strchr(s, ':') == NULL);
    }
    bool dg = ref_valid_digest(s);
    if (dg) {
        FUZZ_ASSERT(n <= REF_DIGEST_MAX && strchr(s, ':') != NULL && strchr(s, '/') == NULL);
    }
    if (ref_is_sha256_digest(s)) {
        FUZZ_ASSERT(dg && n == 71 && memcmp(s, "sha256:", 7) == 0);
        for (size_t i = 7; i < n; i++) FUZZ_ASSERT(lower_hex(s[i]));
    }

    char host[256], tiny[4];
    registry_host_normalize(s, host, sizeof host);
    FUZZ_ASSERT(strlen(host) < sizeof host);
    registry_host_normalize(s, tiny, sizeof tiny);
    FUZZ_ASSERT(strlen(tiny) < sizeof tiny);

    /* base64: whatever decodes re-encodes to something that decodes to the
     * same bytes. */
    size_t cap = size + 4;
    char *dec = malloc(cap), *enc = malloc(2 * cap + 8), *dec2 = malloc(cap);
    if (!dec || !enc || !dec2) abort();
    long dl = base64_decode(s, n, dec, cap);
    if (dl >= 0) {
        FUZZ_ASSERT((size_t)dl < cap);
        long el = base64_encode((const unsigned char *)dec, (size_t)dl, enc, 2 * cap + 8);
        FUZZ_ASSERT(el >= 0 && (size_t)el == strlen(enc));
        long dl2 = base64_decode(enc, (size_t)el, dec2, cap);
        FUZZ_ASSERT(dl2 == dl && memcmp(dec, dec2, (size_t)dl) == 0);
    }
    (void)base64_decode(s, n, dec, 1);
    (void)base64_encode((const unsigned char *)s, n, enc, 3);
    free(dec);
    free(enc);
    free(dec2);
    free(s);
    return 0;
}
