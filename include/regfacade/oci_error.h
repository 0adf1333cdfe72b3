/*
 * oci_error: the one place an OCI error body is written:
 * {"errors":[{"code":CODE,"message":MESSAGE,"detail":DETAIL}]}.
 */
#ifndef REGFACADE_OCI_ERROR_H
#define REGFACADE_OCI_ERROR_H

#include <stddef.h>

/* A malloc'd NUL-terminated body (caller frees), NULL on allocation failure.
 * detail may be NULL (then {} is sent). */
char *oci_error_body(const char *code, const char *message, const char *detail, size_t *len);

#endif
