/*
 * log: one JSON object per line on stderr. Messages never carry secrets:
 * callers pass names and URLs, never credentials or tokens.
 */
#ifndef REGFACADE_LOG_H
#define REGFACADE_LOG_H

#include <stddef.h>

typedef enum { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR } log_level;

/* Lines below min are dropped (config log_level, --log-level). */
void log_set_level(log_level min);
/* "debug", "info", "warn", "error": 0 with *out; -1 for anything else. */
int log_level_parse(const char *s, log_level *out);
const char *log_level_name(log_level l);
/* printf-style message, emitted as {"time":...,"level":...,"msg":...}. */
void log_msg(log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

/* Append s to out as a JSON string body (escaped, without quotes); returns
 * the new length, never writing past outlen-1. */
size_t log_json_escape(char *out, size_t outlen, size_t used, const char *s);

/* Like log_msg, with extra members appended to the object: fields is a
 * JSON object body without braces ("\"status\":200,\"path\":\"/v2/\""), its
 * strings already escaped with log_json_escape. The access log uses it. */
void log_fields(log_level level, const char *msg, const char *fields);
/* log_fields whatever the level: the access log, which has its own switch
 * (metrics.access_log). */
void log_fields_always(log_level level, const char *msg, const char *fields);

#endif
