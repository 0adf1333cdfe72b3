#include "regfacade/log.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* Set at start and on SIGHUP while other threads log: atomic. */
static _Atomic int min_level = LOG_INFO;

void log_set_level(log_level min) { atomic_store_explicit(&min_level, (int)min, memory_order_relaxed); }

static bool below_level(log_level level) { return (int)level < atomic_load_explicit(&min_level, memory_order_relaxed); }

int log_level_parse(const char *s, log_level *out) {
    static const char *const names[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++)
        if (s && strcmp(s, names[i]) == 0) {
            *out = (log_level)i;
            return 0;
        }
    return -1;
}

const char *log_level_name(log_level l) {
    static const char *const names[] = {"debug", "info", "warn", "error"};
    return (unsigned)l < 4 ? names[l] : "?";
}

size_t log_json_escape(char *out, size_t outlen, size_t used, const char *s) {
    static const char hex[] = "0123456789abcdef";
    for (; *s && used + 7 < outlen; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[used++] = '\\';
            out[used++] = (char)c;
        } else if (c == '\n') {
            out[used++] = '\\';
            out[used++] = 'n';
        } else if (c < 0x20) {
            used += (size_t)snprintf(out + used, outlen - used, "\\u00%c%c", hex[c >> 4], hex[c & 15]);
        } else {
            out[used++] = (char)c;
        }
    }
    if (used < outlen) out[used] = '\0';
    return used;
}

void log_msg(log_level level, const char *fmt, ...) {
    if (below_level(level)) return;
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_fields(level, msg, NULL);
}

void log_fields(log_level level, const char *msg, const char *fields) {
    if (below_level(level)) return;
    log_fields_always(level, msg, fields);
}

void log_fields_always(log_level level, const char *msg, const char *fields) {
    static const char *names[] = {"debug", "info", "warn", "error"};
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char line[8192];
    size_t n = (size_t)snprintf(line, sizeof line,
                                "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"level\":\"%s\",\"msg\":\"",
                                tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                                ts.tv_nsec / 1000000, names[level]);
    n = log_json_escape(line, sizeof line - 8, n, msg);
    line[n++] = '"';
    if (fields && *fields) {
        size_t fl = strlen(fields);
        /* Cut a too-long fields text whole rather than mid-member. */
        if (n + 1 + fl + 3 < sizeof line) {
            line[n++] = ',';
            memcpy(line + n, fields, fl);
            n += fl;
        }
    }
    line[n++] = '}';
    line[n++] = '\n';
    /* One fwrite per line so concurrent threads do not interleave. */
    fwrite(line, 1, n, stderr);
}
