#include "regfacade/errmsg.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void errmsg_set(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    if (n < 0) err[0] = '\0';
}

void secret_wipe(void *p, size_t n) {
    if (p) explicit_bzero(p, n);
}

void secret_free(char *s) {
    if (!s) return;
    secret_wipe(s, strlen(s));
    free(s);
}
