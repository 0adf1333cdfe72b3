/* guard: the per-IP token bucket, the header deadline and idle connections
 * closed near the limit (guard.h). */
#include "regfacade/guard.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "unit.h"

static struct sockaddr_in addr(const char *ip) {
    struct sockaddr_in sa = {.sin_family = AF_INET};
    inet_pton(AF_INET, ip, &sa.sin_addr);
    return sa;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* 1 when the peer of fd has shut the connection down (read gives EOF). */
static int peer_shut(int fd) {
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char b;
    return read(fd, &b, 1) == 0;
}

int main(void) {
    char err[256];
    unsigned ra = 0;

    /* Rate: 2/s, burst 3. */
    guard_options o = {.requests_per_second = 2, .burst = 3};
    guard *g = guard_new(&o, err, sizeof err);
    CHECK(g != NULL);
    struct sockaddr_in a = addr("10.1.2.3"), b = addr("10.1.2.4");
    for (int i = 0; i < 3; i++) CHECK(guard_rate_allow(g, (struct sockaddr *)&a, &ra));
    CHECK(!guard_rate_allow(g, (struct sockaddr *)&a, &ra));
    CHECK(ra == 1);
    CHECK(guard_rate_allow(g, (struct sockaddr *)&b, &ra)); /* its own bucket */
    sleep_ms(600);                                          /* 1.2 tokens back */
    CHECK(guard_rate_allow(g, (struct sockaddr *)&a, &ra));
    CHECK(!guard_rate_allow(g, (struct sockaddr *)&a, &ra));
    CHECK(guard_get_stats(g).rate_limited == 2);
    guard_free(g);

    /* Default burst: 2 x rate; no limit at all when the rate is 0. */
    guard_options o2 = {.requests_per_second = 1};
    g = guard_new(&o2, err, sizeof err);
    CHECK(guard_rate_allow(g, (struct sockaddr *)&a, &ra) && guard_rate_allow(g, (struct sockaddr *)&a, &ra));
    CHECK(!guard_rate_allow(g, (struct sockaddr *)&a, &ra));
    guard_free(g);
    guard_options none = {0};
    g = guard_new(&none, err, sizeof err);
    for (int i = 0; i < 1000; i++) CHECK(guard_rate_allow(g, (struct sockaddr *)&a, &ra));
    guard_free(g);
    CHECK(guard_rate_allow(NULL, (struct sockaddr *)&a, &ra));

    /* A full table does not refuse: new clients go untracked. */
    guard_options small = {.requests_per_second = 1, .burst = 1, .max_tracked_ips = 2};
    g = guard_new(&small, err, sizeof err);
    struct sockaddr_in c1 = addr("10.0.0.1"), c2 = addr("10.0.0.2"), c3 = addr("10.0.0.3");
    CHECK(guard_rate_allow(g, (struct sockaddr *)&c1, &ra));
    CHECK(guard_rate_allow(g, (struct sockaddr *)&c2, &ra));
    CHECK(guard_rate_allow(g, (struct sockaddr *)&c3, &ra));
    CHECK(guard_rate_allow(g, (struct sockaddr *)&c3, &ra));
    CHECK(!guard_rate_allow(g, (struct sockaddr *)&c1, &ra));
    guard_free(g);

    /* Header deadline: 1 s. */
    guard_options h = {.header_timeout_s = 1};
    g = guard_new(&h, err, sizeof err);
    int slow[2], fast[2], keep[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, slow) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, fast) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, keep) == 0);
    guard_conn *cs = guard_conn_open(g, slow[0]);
    guard_conn *cf = guard_conn_open(g, fast[0]);
    guard_conn *ck = guard_conn_open(g, keep[0]);
    CHECK(cs && cf && ck);
    guard_conn_headers_done(g, cf); /* headers in: no deadline */
    guard_conn_headers_done(g, ck);
    sleep_ms(500);
    guard_conn_request_done(g, ck); /* response done: deadline again */
    CHECK(!peer_shut(slow[1]));
    sleep_ms(2200);
    CHECK(peer_shut(slow[1]));  /* cut */
    CHECK(!peer_shut(fast[1])); /* untouched */
    CHECK(peer_shut(keep[1]));  /* idle keep-alive cut */
    CHECK(guard_get_stats(g).header_timeouts == 2);
    guard_conn_close(g, cs);
    guard_conn_close(g, cf);
    guard_conn_close(g, ck);
    for (int i = 0; i < 2; i++) {
        close(slow[i]);
        close(fast[i]);
        close(keep[i]);
    }
    guard_free(g);

    /* Near the limit (4: from 3 open on, a reserve of one), the connection
     * idle longest (at least a second) is closed for each new one; busy and
     * fresh ones are not; no header deadline is needed for that. */
    guard_options lim = {.max_connections = 4};
    g = guard_new(&lim, err, sizeof err);
    int old[2], busy[2], fresh[2], next[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, old) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, busy) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, fresh) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, next) == 0);
    guard_conn *co = guard_conn_open(g, old[0]);
    guard_conn *cb = guard_conn_open(g, busy[0]);
    CHECK(co && cb);
    guard_conn_headers_done(g, cb);
    guard_load l = guard_get_load(g);
    CHECK(l.open == 2 && l.idle == 1);
    sleep_ms(1100);
    guard_conn *cn = guard_conn_open(g, fresh[0]); /* the third: old goes */
    CHECK(cn != NULL);
    CHECK(peer_shut(old[1]));
    CHECK(!peer_shut(busy[1]));
    CHECK(!peer_shut(fresh[1]));
    CHECK(guard_get_stats(g).idle_reclaimed == 1);
    l = guard_get_load(g);
    CHECK(l.open == 3 && l.idle == 1); /* old is closing: neither idle nor counted as room */
    guard_conn_close(g, co);
    guard_conn *cx = guard_conn_open(g, next[0]); /* 3 again: fresh is too new to go */
    CHECK(cx != NULL);
    CHECK(!peer_shut(fresh[1]) && !peer_shut(next[1]));
    CHECK(guard_get_stats(g).idle_reclaimed == 1);
    guard_conn_close(g, cb);
    guard_conn_close(g, cn);
    guard_conn_close(g, cx);
    for (int i = 0; i < 2; i++) {
        close(old[i]);
        close(busy[i]);
        close(fresh[i]);
        close(next[i]);
    }
    guard_free(g);
    return UNIT_DONE("guard");
}
