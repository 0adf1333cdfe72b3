#include "regfacade/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static log_level min_level = LOG_INFO;

void log_set_level(log_level min) { min_level = min; }

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
    if (level < min_level) return;
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_fields(level, msg, NULL);
}

void log_fields(log_level level, const char *msg, const char *fields) {
    static const char *names[] = {"debug", "info", "warn", "error"};
    if (level < min_level) return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char line[8192];
    size_t n = (size_t)snprintf(line, sizeof line,
                                "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"level\":\"%s\",\"msg\":\"",
                                tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                                tm.tm_sec, ts.tv_nsec / 1000000, names[level]);
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
