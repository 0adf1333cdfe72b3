/* guard: the per-IP token bucket and the header deadline (guard.h). */
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
    sleep_ms(600);                                           /* 1.2 tokens back */
    CHECK(guard_rate_allow(g, (struct sockaddr *)&a, &ra));
    CHECK(!guard_rate_allow(g, (struct sockaddr *)&a, &ra));
    CHECK(guard_get_stats(g).rate_limited == 2);
    CHECK(guard_conn_open(g, 0) == NULL); /* no header deadline configured */
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
    guard_conn_headers_done(g, cf);           /* headers in: no deadline */
    guard_conn_headers_done(g, ck);
    sleep_ms(500);
    guard_conn_request_done(g, ck);           /* response done: deadline again */
    CHECK(!peer_shut(slow[1]));
    sleep_ms(2200);
    CHECK(peer_shut(slow[1]));                /* cut */
    CHECK(!peer_shut(fast[1]));               /* untouched */
    CHECK(peer_shut(keep[1]));                /* idle keep-alive cut */
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
    return UNIT_DONE("guard");
}
