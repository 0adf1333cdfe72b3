/*
 * mhd_glue: the libmicrohttpd callbacks every listener of ours installs the
 * same way (the registry, blobserve, the admin API, the metrics listener),
 * and the guard (guard.h) each of them runs against idle-connection floods.
 */
#ifndef REGFACADE_MHD_GLUE_H
#define REGFACADE_MHD_GLUE_H

#include <microhttpd.h>
#include <stdarg.h>
#include <stddef.h>

#include "regfacade/guard.h"

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

/* ---------- a guarded listener ----------
 *
 * Every listener gets its own guard (guard.h): header deadline, idle
 * connections closed near its connection limit, and (registry only) a rate
 * limit. The glue wraps the listener's access handler and completion
 * callback to tell the guard when a request is in and when its response is
 * done, and installs MHD_OPTION_NOTIFY_CONNECTION to register each
 * connection's socket. Every access handler of ours takes the headers on
 * the first call (*con_cls NULL), the body in calls with data, and answers
 * on a call with neither: that call is when the request is in.
 *
 *     l = mhd_glue_listener_new(&go, handler, cls, completed, cls, err, len);
 *     d = MHD_start_daemon(flags, 0, NULL, NULL, MHD_GLUE_GUARDED(l), ...more options..., MHD_OPTION_END);
 *     ...
 *     MHD_stop_daemon(d);
 *     mhd_glue_listener_free(l);
 */
typedef struct mhd_glue_listener mhd_glue_listener;

/* go->max_connections is also the daemon's MHD_OPTION_CONNECTION_LIMIT
 * (MHD_GLUE_GUARDED), so the two never disagree; go->listener and
 * go->limit_name must outlive the listener (string literals). completed may
 * be NULL. NULL with err on failure. */
mhd_glue_listener *mhd_glue_listener_new(const guard_options *go, MHD_AccessHandlerCallback handler, void *handler_cls,
                                         MHD_RequestCompletedCallback completed, void *completed_cls, char *err,
                                         size_t errlen);
/* After MHD_stop_daemon (its callbacks use l). NULL: nothing. */
void mhd_glue_listener_free(mhd_glue_listener *l);
/* The listener's guard (owned by l): rate limit and load for readiness. */
guard *mhd_glue_listener_guard(const mhd_glue_listener *l);

enum MHD_Result mhd_glue_access(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                const char *version, const char *upload_data, size_t *upload_data_size, void **con_cls);
void mhd_glue_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe);
void mhd_glue_notify_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                                enum MHD_ConnectionNotificationCode toe);
unsigned int mhd_glue_connection_limit(const mhd_glue_listener *l);
const char *mhd_glue_listener_name(const mhd_glue_listener *l);

/* MHD_start_daemon's access handler and the options that wire l's guard
 * in, after the logger (libmicrohttpd wants MHD_OPTION_EXTERNAL_LOGGER
 * first; mhd_glue_log with the listener's name):
 * MHD_start_daemon(flags, port, NULL, NULL, MHD_GLUE_GUARDED(l), ...).
 * The listener installs no logger, MHD_OPTION_NOTIFY_COMPLETED,
 * NOTIFY_CONNECTION or CONNECTION_LIMIT of its own. */
#define MHD_GLUE_GUARDED(l)                                                                                    \
    mhd_glue_access, (void *)(l), MHD_OPTION_EXTERNAL_LOGGER, mhd_glue_log, (void *)mhd_glue_listener_name(l), \
        MHD_OPTION_NOTIFY_CONNECTION, mhd_glue_notify_connection, (void *)(l), MHD_OPTION_NOTIFY_COMPLETED,    \
        mhd_glue_completed, (void *)(l), MHD_OPTION_CONNECTION_LIMIT, mhd_glue_connection_limit(l)

#endif
