/*
 * guard: per-client protections that libmicrohttpd does not give by itself.
 *
 * - Header deadline (slowloris): a connection must deliver a complete
 *   request (headers, and a body if it sends one) within header_timeout_s
 *   of being accepted, and again within header_timeout_s of its previous
 *   response finishing (which also bounds
 *   how long an idle keep-alive connection is kept). libmicrohttpd's own
 *   timeout is an idle timeout, reset by every byte, so a client trickling
 *   one header byte at a time would otherwise hold its thread forever. A
 *   watchdog thread shuts the socket down when the deadline passes (the
 *   connection's own socket, no second descriptor: see guard_conn_open).
 * - Idle connections near the limit: from max_connections - max/32 open
 *   connections on (a reserve for bursts, at least one), the connection
 *   that has waited longest for a request (at least a second) is closed for
 *   each new one, so idle connections (a flood of them, or many keep-alive
 *   clients) never lock everyone else out. Only connections busy with
 *   requests fill the listener (guard_get_load).
 * - Request rate per client IP: a token bucket (requests_per_second, burst).
 *   An empty bucket means 429 TOOMANYREQUESTS with Retry-After.
 *
 * Each listener has its own guard (mhd_glue.h wires it into libmicrohttpd).
 *
 * Thread-safe. Every function takes NULL for g (or a NULL conn) and then
 * does nothing / allows everything.
 */
#ifndef REGFACADE_GUARD_H
#define REGFACADE_GUARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

typedef struct guard guard;
typedef struct guard_conn guard_conn;

typedef struct {
    unsigned header_timeout_s;    /* 0: no header deadline */
    unsigned requests_per_second; /* 0: no rate limit */
    unsigned burst;               /* bucket size; 0: 2 x requests_per_second */
    size_t max_tracked_ips;       /* rate-limit table size; 0: 65536 */
    unsigned max_connections;     /* the listener's connection limit; 0: never close idle connections */
    const char *listener;         /* for log lines: "registry", "blobserve", "admin", "metrics"; NULL: "http" */
    const char *limit_name;       /* what sets max_connections, for log lines ("limits.max_connections") */
} guard_options;

typedef struct {
    uint64_t header_timeouts; /* connections cut for slow headers */
    uint64_t rate_limited;    /* requests answered 429 */
    uint64_t idle_reclaimed;  /* idle connections closed at max_connections */
} guard_stats;

/* The connections open now, and how many of them wait for a request
 * (neither busy with one nor being closed). */
typedef struct {
    size_t open;
    size_t idle;
} guard_load;

/* NULL with err on failure (thread creation). Starts the watchdog thread. */
guard *guard_new(const guard_options *o, char *err, size_t errlen);
/* Stops the watchdog; connections still registered are forgotten. */
void guard_free(guard *g);

/* A new connection on socket fd, from libmicrohttpd's
 * MHD_CONNECTION_NOTIFY_STARTED; guard_conn_close must come from its
 * MHD_CONNECTION_NOTIFY_CLOSED, which libmicrohttpd calls before it closes
 * the socket (the guard keeps fd itself, no dup). Arms the header deadline;
 * may close the longest-idle other connection (max_connections). NULL on
 * failure (then the connection is simply not watched). */
guard_conn *guard_conn_open(guard *g, int fd);
/* The request is in (headers and any body): disarm. */
void guard_conn_headers_done(guard *g, guard_conn *c);
/* Response finished, connection kept alive: arm for the next request. */
void guard_conn_request_done(guard *g, guard_conn *c);
/* Connection closed: forget it (frees c). */
void guard_conn_close(guard *g, guard_conn *c);

/* Take one token for the client address. true: go on; false: refuse, with
 * *retry_after_s (>= 1) set. */
bool guard_rate_allow(guard *g, const struct sockaddr *peer, unsigned *retry_after_s);

guard_stats guard_get_stats(guard *g);
guard_load guard_get_load(guard *g);

#endif
