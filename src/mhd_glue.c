#include "regfacade/mhd_glue.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "regfacade/log.h"

size_t mhd_glue_keep_url(void *cls, struct MHD_Connection *conn, char *s) {
    (void)cls;
    (void)conn;
    return strlen(s);
}

void mhd_glue_log(void *listener_name, const char *fmt, va_list ap) {
    const char *who = listener_name ? listener_name : "http";
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    msg[strcspn(msg, "\n")] = '\0';
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static char last[1024];
    static time_t last_at;
    static unsigned repeats;
    time_t now = time(NULL);
    pthread_mutex_lock(&lock);
    if (now == last_at && strcmp(msg, last) == 0) {
        repeats++;
        pthread_mutex_unlock(&lock);
        return;
    }
    unsigned n = repeats;
    char prev[1024];
    snprintf(prev, sizeof prev, "%s", last);
    snprintf(last, sizeof last, "%s", msg);
    last_at = now;
    repeats = 0;
    pthread_mutex_unlock(&lock);
    if (n) log_warn("%s: libmicrohttpd: %s (%u more times)", who, prev, n);
    log_warn("%s: libmicrohttpd: %s", who, msg);
}

/* ---------- a guarded listener ---------- */

struct mhd_glue_listener {
    guard *g;
    unsigned limit;
    const char *name;
    MHD_AccessHandlerCallback handler;
    void *handler_cls;
    MHD_RequestCompletedCallback completed;
    void *completed_cls;
};

mhd_glue_listener *mhd_glue_listener_new(const guard_options *go, MHD_AccessHandlerCallback handler, void *handler_cls,
                                         MHD_RequestCompletedCallback completed, void *completed_cls, char *err,
                                         size_t errlen) {
    mhd_glue_listener *l = calloc(1, sizeof *l);
    if (!l) {
        snprintf(err, errlen, "%s listener: out of memory", go->listener ? go->listener : "http");
        return NULL;
    }
    if (!(l->g = guard_new(go, err, errlen))) {
        free(l);
        return NULL;
    }
    l->limit = go->max_connections;
    l->name = go->listener ? go->listener : "http";
    l->handler = handler;
    l->handler_cls = handler_cls;
    l->completed = completed;
    l->completed_cls = completed_cls;
    return l;
}

void mhd_glue_listener_free(mhd_glue_listener *l) {
    if (!l) return;
    guard_free(l->g);
    free(l);
}

guard *mhd_glue_listener_guard(const mhd_glue_listener *l) { return l ? l->g : NULL; }

unsigned int mhd_glue_connection_limit(const mhd_glue_listener *l) { return l->limit; }

const char *mhd_glue_listener_name(const mhd_glue_listener *l) { return l->name; }

static guard_conn *conn_guard(struct MHD_Connection *conn) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

void mhd_glue_notify_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                                enum MHD_ConnectionNotificationCode toe) {
    mhd_glue_listener *l = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        *socket_context = ci ? guard_conn_open(l->g, ci->connect_fd) : NULL;
    } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
        guard_conn_close(l->g, *socket_context);
        *socket_context = NULL;
    }
}

enum MHD_Result mhd_glue_access(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                const char *version, const char *upload_data, size_t *upload_data_size,
                                void **con_cls) {
    mhd_glue_listener *l = cls;
    /* Not the headers-only first call and no body data: the whole request
     * is in, so the header deadline no longer applies (a trickled body is
     * cut by it like trickled headers) and the connection is busy, not idle.
     * A resumed connection comes here again: harmless. */
    if (*con_cls != NULL && *upload_data_size == 0) guard_conn_headers_done(l->g, conn_guard(conn));
    return l->handler(l->handler_cls, conn, url, method, version, upload_data, upload_data_size, con_cls);
}

void mhd_glue_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe) {
    mhd_glue_listener *l = cls;
    if (l->completed) l->completed(l->completed_cls, conn, con_cls, toe);
    /* Kept alive: the next request's headers have a deadline again. */
    guard_conn_request_done(l->g, conn_guard(conn));
}
