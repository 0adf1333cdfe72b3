#include "regfacade/mhd_glue.h"

#include <pthread.h>
#include <stdio.h>
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
