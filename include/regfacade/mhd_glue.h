/*
 * mhd_glue: the libmicrohttpd callbacks every listener of ours installs the
 * same way (the registry, the admin API, blobserve).
 */
#ifndef REGFACADE_MHD_GLUE_H
#define REGFACADE_MHD_GLUE_H

#include <microhttpd.h>
#include <stdarg.h>
#include <stddef.h>

/* The flags of a listener with a thread per connection (the registry, the
 * admin API). MHD_USE_POLL: without it libmicrohttpd waits with select(),
 * which cannot watch a descriptor numbered FD_SETSIZE (1024) or more, so
 * every connection past about a thousand open descriptors would be refused
 * whatever limits.max_connections says. */
#define MHD_GLUE_THREAD_PER_CONNECTION \
    (MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_USE_ERROR_LOG)

/* MHD_OPTION_UNESCAPE_CALLBACK: keep the URL as sent, so that no '%2F'
 * becomes a '/' or ".." behind a parser's back: the registry and admin
 * parsers refuse a '%' (names and ids never need one), blobserve decodes
 * paths itself and refuses an encoded '/'. */
size_t mhd_glue_keep_url(void *cls, struct MHD_Connection *conn, char *s);

/* MHD_OPTION_EXTERNAL_LOGGER with cls = the listener's name ("admin"): one
 * warning line per message, first line only. A connection flood makes
 * libmicrohttpd say the same thing once per refused connection, so the same
 * message within a second is counted, not repeated. */
void mhd_glue_log(void *listener_name, const char *fmt, va_list ap);

#endif
