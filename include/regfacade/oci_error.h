/*
 * oci_error: the one place an OCI error body is written:
 * {"errors":[{"code":CODE,"message":MESSAGE,"detail":DETAIL}]}, and the
 * one list of the error codes the OCI Distribution spec defines.
 */
#ifndef REGFACADE_OCI_ERROR_H
#define REGFACADE_OCI_ERROR_H

#include <stddef.h>

/* A malloc'd NUL-terminated body (caller frees), NULL on allocation failure.
 * detail may be NULL (then {} is sent). */
char *oci_error_body(const char *code, const char *message, const char *detail, size_t *len);

/* The static copy of code when it is one of the OCI Distribution error
 * codes (BLOB_UNKNOWN ... TOOMANYREQUESTS), else NULL. */
const char *oci_error_code_known(const char *code);

/* The codes as one ", "-separated line, for error messages. */
const char *oci_error_code_list(void);

#endif
