/*
 * test_cluster: the "cluster" section's checks, and a cluster whose Redis
 * does not answer: it starts (degraded, not an error), says so, and every
 * call returns CLUSTER_DOWN without waiting; no cluster is CLUSTER_OFF.
 * (Against a real redis-server: spec/integration/test_cluster.py.)
 */
#include "regfacade/cluster.h"

#include "unit.h"

#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/clock.h"

static char dir[256];

static config *load(const char *cluster_json, char *err, size_t errlen) {
    char path[512], text[1024];
    snprintf(path, sizeof path, "%s/c.json", dir);
    snprintf(text, sizeof text,
             "{\"cache\":{\"dir\":\"%s/cache\"},\"upstreams\":{\"u\":{\"url\":\"http://127.0.0.1:9\"}},"
             "\"cluster\":%s}",
             dir, cluster_json);
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(2);
    }
    fputs(text, f);
    fclose(f);
    return config_load(path, err, errlen);
}

/* A loopback port nothing listens on (bound, then closed). */
static int dead_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || getsockname(fd, (struct sockaddr *)&a, &len) != 0)
        exit(2);
    close(fd);
    return ntohs(a.sin_port);
}

static void bad(const char *section, const char *want) {
    char err[1024] = "";
    config *c = load(section, err, sizeof err);
    CHECK(c != NULL);
    if (!c) return;
    CHECK(cluster_check_config(c, err, sizeof err) == -1);
    if (!strstr(err, want)) fprintf(stderr, "for %s: \"%s\" lacks \"%s\"\n", section, err, want);
    CHECK(strstr(err, want) != NULL);
    cluster *cl = (cluster *)1;
    CHECK(cluster_start(c, &cl, err, sizeof err) == -1 && cl == NULL);
    config_free(c);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/test_cluster.XXXXXX");
    if (!mkdtemp(dir)) return 2;

    bad("{}", "cluster.redis: required");
    bad("{\"redis\":\"127.0.0.1\"}", "must be HOST:PORT");
    bad("{\"redis\":\"127.0.0.1:0\"}", "must be HOST:PORT");
    bad("{\"redis\":\"127.0.0.1:6379\",\"timeout_ms\":0}", "cluster.timeout_ms: must be an integer from 1 to 10000");
    bad("{\"redis\":\"127.0.0.1:6379\",\"namespace\":\"a:b\"}", "cluster.namespace");
    bad("{\"redis\":\"127.0.0.1:6379\",\"typo\":1}", "typo");

    /* No cluster: everything is OFF, nothing is degraded. */
    char tag[64], base[128], digest[128], mt[128], detail[512];
    long left;
    CHECK(cluster_tag_get(NULL, "u", "r", "t", digest, sizeof digest, mt, sizeof mt, &left) == CLUSTER_OFF);
    CHECK(cluster_made_get(NULL, "sha256:00", "r", tag, sizeof tag, base, sizeof base) == CLUSTER_OFF);
    CHECK(!cluster_degraded_detail(NULL, detail, sizeof detail) && detail[0] == '\0');

    /* Redis that is not there: started, degraded, every call DOWN at once. */
    char err[1024], section[256];
    snprintf(section, sizeof section, "{\"redis\":\"127.0.0.1:%d\",\"timeout_ms\":200,\"retry_ms\":50}", dead_port());
    config *c = load(section, err, sizeof err);
    CHECK(c != NULL);
    cluster *cl = NULL;
    CHECK(c && cluster_start(c, &cl, err, sizeof err) == 0 && cl != NULL);
    int64_t until = clock_monotonic_ms() + 30000;
    while (cl && cluster_up(cl) && clock_monotonic_ms() < until) {
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    CHECK(cl && !cluster_up(cl));
    CHECK(cluster_degraded_detail(cl, detail, sizeof detail));
    CHECK(strstr(detail, "degraded: Redis 127.0.0.1:") != NULL);
    snprintf(digest, sizeof digest, "sha256:%064d", 0);
    snprintf(mt, sizeof mt, "application/vnd.oci.image.manifest.v1+json");
    CHECK(cluster_tag_get(cl, "u", "r", "t", digest, sizeof digest, mt, sizeof mt, &left) == CLUSTER_DOWN);
    CHECK(cluster_tag_claim(cl, "u", "r", "t", 1000, digest, sizeof digest, mt, sizeof mt, &left) == CLUSTER_DOWN);
    CHECK(cluster_made_add(cl, digest, "r", "t", digest) == CLUSTER_DOWN);
    bool replaced = true;
    CHECK(cluster_spec_put(cl, "p", "id", "{}", 2, &replaced) == CLUSTER_DOWN && !replaced);
    char *text = NULL;
    size_t len = 0;
    CHECK(cluster_spec_get(cl, "p", "id", 1024, &text, &len) == CLUSTER_DOWN && text == NULL);
    CHECK(cluster_spec_del(cl, "p", "id") == CLUSTER_DOWN);
    cluster_stop(cl);
    config_free(c);

    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return UNIT_DONE("cluster");
}
