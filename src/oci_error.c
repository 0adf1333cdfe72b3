#include "regfacade/oci_error.h"

#include <stdlib.h>
#include <string.h>

#include "regfacade/json.h"

char *oci_error_body(const char *code, const char *message, const char *detail, size_t *len) {
    json_value *err = json_new_object();
    json_value *list = json_new_array();
    json_value *root = json_new_object();
    if (!err || !list || !root || json_object_set(err, "code", json_new_string(code)) != 0 ||
        json_object_set(err, "message", json_new_string(message)) != 0 ||
        json_object_set(err, "detail", detail ? json_new_string(detail) : json_new_object()) != 0) {
        json_free(err);
        json_free(list);
        json_free(root);
        return NULL;
    }
    if (json_array_append(list, err) != 0) {
        json_free(list);
        json_free(root);
        return NULL;
    }
    if (json_object_set(root, "errors", list) != 0) {
        json_free(root);
        return NULL;
    }
    char *out = json_serialize(root, len);
    json_free(root);
    return out;
}

static const char *const CODES[] = {"BLOB_UNKNOWN",     "BLOB_UPLOAD_INVALID",   "BLOB_UPLOAD_UNKNOWN",
                                    "DIGEST_INVALID",   "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID",
                                    "MANIFEST_UNKNOWN", "NAME_INVALID",          "NAME_UNKNOWN",
                                    "SIZE_INVALID",     "UNAUTHORIZED",          "DENIED",
                                    "UNSUPPORTED",      "TOOMANYREQUESTS",       NULL};

const char *oci_error_code_known(const char *code) {
    for (const char *const *k = CODES; code && *k; k++)
        if (strcmp(code, *k) == 0) return *k;
    return NULL;
}

const char *oci_error_code_list(void) {
    return "BLOB_UNKNOWN, BLOB_UPLOAD_INVALID, BLOB_UPLOAD_UNKNOWN, DIGEST_INVALID, MANIFEST_BLOB_UNKNOWN, "
           "MANIFEST_INVALID, MANIFEST_UNKNOWN, NAME_INVALID, NAME_UNKNOWN, SIZE_INVALID, UNAUTHORIZED, DENIED, "
           "UNSUPPORTED, TOOMANYREQUESTS";
}
