/*
 * errmsg: the two small things every module that reports errors or holds
 * secrets needs, once: writing a message into a caller's error buffer, and
 * wiping a secret before its memory is given back.
 */
#ifndef REGFACADE_ERRMSG_H
#define REGFACADE_ERRMSG_H

#include <stddef.h>

/* printf into err (errlen bytes, always NUL-terminated); nothing when err is
 * NULL or errlen 0. */
void errmsg_set(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Zero n bytes at p in a way the compiler may not drop (buffers that held a
 * password or a token). */
void secret_wipe(void *p, size_t n);
/* secret_wipe the string s, then free it; NULL is fine. */
void secret_free(char *s);

#endif
