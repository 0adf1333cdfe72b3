/*
 * Shared by the fuzz targets: the libFuzzer entry point, and small helpers.
 * Each target is built twice: with clang -fsanitize=fuzzer,address,undefined
 * for `make fuzz`, and with any C compiler plus driver.c (a main() that
 * feeds files) for the regression run in `make test`.
 */
#ifndef REGFACADE_FUZZ_H
#define REGFACADE_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A failed invariant is a crash: libFuzzer saves the input. */
#define FUZZ_ASSERT(cond)                                                                \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                     \
        }                                                                                \
    } while (0)

/* A NUL-terminated copy (the parsers take C strings). */
static inline char *fuzz_cstr(const uint8_t *data, size_t size) {
    char *s = malloc(size + 1);
    if (!s) abort();
    if (size) memcpy(s, data, size);
    s[size] = '\0';
    return s;
}

/* Split data at the first NUL byte: *rest and *rest_size get what follows it
 * (empty when there is no NUL). Returns the length of the first part. */
static inline size_t fuzz_split(const uint8_t *data, size_t size, const uint8_t **rest, size_t *rest_size) {
    const uint8_t *z = memchr(data, 0, size);
    if (!z) {
        *rest = data + size;
        *rest_size = 0;
        return size;
    }
    *rest = z + 1;
    *rest_size = size - (size_t)(z - data) - 1;
    return (size_t)(z - data);
}

#endif
