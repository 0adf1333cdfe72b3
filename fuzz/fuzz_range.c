/* The Range header and its resolution against a size (ref.h). Input: the
 * header text; the first 8 bytes also give the entity size. */
#include "fuzz.h"

#include "regfacade/ref.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *h = fuzz_cstr(data, size);
    uint64_t sizes[4] = {0, 1, 1000, UINT64_MAX};
    if (size >= 8) memcpy(&sizes[0], data, 8);
    range_spec spec;
    range_parse_result r = range_parse(h, &spec);
    FUZZ_ASSERT(r == RANGE_NONE || r == RANGE_OK || r == RANGE_INVALID);
    if (r == RANGE_OK) {
        for (int i = 0; i < 4; i++) {
            uint64_t start = 7, end = 7;
            if (range_resolve(&spec, sizes[i], &start, &end)) {
                FUZZ_ASSERT(sizes[i] > 0);
                if (spec.kind == RANGE_FROM_TO) FUZZ_ASSERT(spec.first <= spec.last);
                FUZZ_ASSERT(start <= end && end < sizes[i]);
                if (spec.kind != RANGE_SUFFIX) FUZZ_ASSERT(start == spec.first);
            }
        }
    }
    (void)range_parse(NULL, &spec);
    free(h);
    return 0;
}
