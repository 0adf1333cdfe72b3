/*
 * json: an order-preserving JSON document model.
 *
 * Manifests and image configs must survive a parse/serialize round trip with
 * their meaning intact: object key order is kept, numbers keep their original
 * text (so 64-bit sizes stay exact), empty arrays stay arrays, unknown fields
 * survive. Serialization is compact and deterministic, so the same tree gives
 * the same bytes in every process.
 *
 * Ownership: every json_value is owned by its parent; json_free() on the root
 * frees the whole tree. Strings handed in are copied.
 */
#ifndef REGFACADE_JSON_H
#define REGFACADE_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    JSON_NULL,
    JSON_FALSE,
    JSON_TRUE,
    JSON_NUMBER, /* str holds the number's source text, e.g. "12345678901234567890" */
    JSON_STRING, /* str holds the decoded UTF-8 text (may contain NUL; use len) */
    JSON_ARRAY,
    JSON_OBJECT,
} json_type;

typedef struct json_value json_value;
struct json_value {
    json_type type;
    char *str;          /* NUMBER, STRING: NUL-terminated copy */
    size_t len;         /* NUMBER, STRING: byte length of str */
    size_t count;       /* ARRAY, OBJECT: number of items */
    size_t cap;         /* ARRAY, OBJECT: allocated slots */
    json_value **items; /* ARRAY, OBJECT: values in order */
    char **keys;        /* OBJECT: keys in order (NUL-terminated, decoded) */
    size_t *key_lens;   /* OBJECT: byte length of each key */
};

/* Default and hard limits for parsing untrusted input. */
#define JSON_DEFAULT_MAX_DEPTH 64

/* Parse len bytes. Returns NULL on error and writes "what, at byte N" into
 * err. Rejects trailing garbage, invalid UTF-8 escapes, nesting deeper than
 * max_depth, and duplicate keys are kept as-is (last one wins on lookup). */
json_value *json_parse(const char *buf, size_t len, int max_depth, char *err, size_t errlen);

/* Where and why json_parse_strict failed. */
typedef struct {
    char message[160]; /* "duplicate key \"listen\"", "expected ',' or '}'" */
    size_t offset;     /* in bytes from the start */
    unsigned line;     /* 1-based */
    unsigned column;   /* 1-based, in characters (UTF-8 sequences count once) */
} json_error;

/* For files people write (the config): as json_parse, and a key that occurs
 * twice in one object is an error too (instead of the last one winning). On
 * error *e says what and where; format it as "FILE:LINE:COLUMN: message". */
json_value *json_parse_strict(const char *buf, size_t len, int max_depth, json_error *e);

/* Free a tree (NULL is fine). */
void json_free(json_value *v);

/* Compact serialization: no whitespace, keys in stored order, strings escaped
 * the way Go's encoding/json does minus HTML escaping ("\"", "\\", control
 * characters as \n \r \t \b \f or \u00XX; everything else verbatim UTF-8),
 * numbers as their stored text. Returns a malloc'd NUL-terminated buffer
 * (caller frees) and its length in *len; NULL on allocation failure. */
char *json_serialize(const json_value *v, size_t *len);

/* Deep copy; NULL on allocation failure. */
json_value *json_clone(const json_value *v);

/* Lookups (return NULL when v is not of the right type or the key is
 * missing). */
json_value *json_object_get(const json_value *obj, const char *key);
const char *json_object_get_string(const json_value *obj, const char *key); /* NULL unless STRING */
json_value *json_array_get(const json_value *arr, size_t index);

/* Number conversion: true and *out set when v is a NUMBER holding an exact
 * integer that fits. */
bool json_get_int64(const json_value *v, int64_t *out);
bool json_get_uint64(const json_value *v, uint64_t *out);

/* Constructors; NULL on allocation failure. */
json_value *json_new_null(void);
json_value *json_new_bool(bool b);
json_value *json_new_string(const char *s);
json_value *json_new_stringn(const char *s, size_t len);
json_value *json_new_int64(int64_t n);
json_value *json_new_uint64(uint64_t n);
/* A number from its literal text; NULL if text is not a valid JSON number. */
json_value *json_new_number_text(const char *text);
json_value *json_new_array(void);
json_value *json_new_object(void);

/* Mutators: take ownership of item (also on failure, where item is freed).
 * Return 0 on success, -1 on allocation failure or wrong container type. */
int json_array_append(json_value *arr, json_value *item);
int json_array_insert(json_value *arr, size_t index, json_value *item);
/* Replace the value of key in place (keeping its position) or append it. */
int json_object_set(json_value *obj, const char *key, json_value *item);
/* Remove key; returns 1 if removed, 0 if absent. */
int json_object_remove(json_value *obj, const char *key);

#endif
