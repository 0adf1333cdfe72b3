/* metrics.c: config section, recording and exposition, health answers. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "regfacade/json.h"
#include "regfacade/metrics.h"
#include "unit.h"

static int parse(const char *text, metrics_config *mc, char *err, size_t errlen) {
    char jerr[128];
    json_value *v = json_parse(text, strlen(text), 8, jerr, sizeof jerr);
    if (!v) return -2;
    int rc = metrics_config_parse(v, mc, err, errlen);
    json_free(v);
    return rc;
}

static int has(const char *text, const char *line) { return strstr(text, line) != NULL; }

static int ready_no(void *ud, char *why, size_t n) {
    (void)ud;
    snprintf(why, n, "cache \"x\" is gone");
    return -1;
}

static int ready_yes(void *ud, char *why, size_t n) {
    (void)ud;
    (void)why;
    (void)n;
    return 0;
}

int main(void) {
    metrics_config mc;
    char err[256];

    /* config: absent, defaults, good and bad values */
    CHECK(metrics_config_parse(NULL, &mc, err, sizeof err) == 0);
    CHECK(!mc.enabled && mc.access_log && mc.listen_port == 9090);
    CHECK(parse("{}", &mc, err, sizeof err) == 0);
    CHECK(mc.enabled);
    CHECK_STR(mc.listen_host, "127.0.0.1");
    CHECK(parse("{\"listen\":\"0.0.0.0:9100\",\"access_log\":false}", &mc, err, sizeof err) == 0);
    CHECK_STR(mc.listen_host, "0.0.0.0");
    CHECK(mc.listen_port == 9100 && !mc.access_log);
    CHECK(parse("{\"listen\":\"[::1]:9101\"}", &mc, err, sizeof err) == 0);
    CHECK_STR(mc.listen_host, "::1");
    CHECK(parse("{\"listn\":\"127.0.0.1:1\"}", &mc, err, sizeof err) == -1);
    CHECK(strncmp(err, "metrics.listn: unknown key", 26) == 0);
    CHECK(parse("{\"listen\":\"localhost:9090\"}", &mc, err, sizeof err) == -1);
    CHECK(strncmp(err, "metrics.listen:", 15) == 0);
    CHECK(parse("{\"listen\":\"127.0.0.1:70000\"}", &mc, err, sizeof err) == -1);
    CHECK(parse("{\"listen\":\"127.0.0.1:\"}", &mc, err, sizeof err) == -1);
    CHECK(parse("{\"listen\":\"::1:9090\"}", &mc, err, sizeof err) == -1);
    CHECK(parse("{\"listen\":9090}", &mc, err, sizeof err) == -1);
    CHECK(parse("{\"access_log\":1}", &mc, err, sizeof err) == -1);
    CHECK(strncmp(err, "metrics.access_log:", 19) == 0);
    CHECK(parse("[]", &mc, err, sizeof err) == -1);

    /* recording and exposition */
    metrics_cache_lookup("blob", false);
    metrics_cache_lookup("blob", true);
    metrics_cache_lookup("blob", true);
    metrics_cache_lookup("nonsense", true);
    metrics_cache_put(1000);
    metrics_cache_put(24);
    metrics_cache_evicted(24);
    metrics_upstream_request("hub", 200, NULL);
    metrics_upstream_request("hub", 404, NULL);
    metrics_upstream_request("hub", 0, "timeout");
    metrics_upstream_request("we\"ird", 503, NULL);
    metrics_upstream_retry("hub", "blob");
    metrics_upstream_ratelimit("hub", 76);
    metrics_upstream_ratelimit("hub", -1); /* absent: the last value stays */
    metrics_policy_hook("resolve", 0.0003, "ok");
    metrics_policy_hook("resolve", 0.3, "budget");
    metrics_policy_hook("rewrite", 0.002, "error");
    metrics_access *a = metrics_access_begin(NULL, "GET", "/v2/x/blobs/sha256:ab?token=secret");
    CHECK(a != NULL);
    CHECK_STR(a->path, "/v2/x/blobs/sha256:ab");
    a->route = "blob";
    a->status = 200;
    metrics_access_body(a, METRICS_SRC_CACHE, 4096, false);
    metrics_set_access_log(false);
    metrics_access_end(a, true);
    a = metrics_access_begin(NULL, "HEAD", "/v2/x/blobs/sha256:ab");
    a->route = "blob";
    a->status = 200;
    metrics_access_body(a, METRICS_SRC_CACHE, 4096, false);
    metrics_access_end(a, true); /* HEAD sends no body */
    a = metrics_access_begin(NULL, "GET", "/v2/x/blobs/sha256:cd");
    a->route = "blob";
    a->status = 200;
    metrics_access_body(a, METRICS_SRC_UPSTREAM, 1 << 20, true);
    metrics_access_streamed(a, 100);
    {
        /* streamed bytes show before the request ends */
        size_t l0 = 0;
        char *t0 = metrics_render(&l0);
        CHECK(t0 && has(t0, "regfacade_response_bytes_total{source=\"upstream\"} 100\n"));
        CHECK(t0 && has(t0, "regfacade_client_transfers_in_flight 1\n"));
        free(t0);
    }
    metrics_access_streamed(a, 200);
    metrics_access_end(a, false); /* cut: counts what was produced */

    size_t len = 0;
    char *text = metrics_render(&len);
    CHECK(text != NULL && len == strlen(text));
    if (text) {
        CHECK(has(text, "# TYPE regfacade_requests_total counter\n"));
        CHECK(has(text, "regfacade_requests_total{route=\"blob\",status=\"200\"} 3\n"));
        CHECK(has(text, "regfacade_response_bytes_total{source=\"cache\"} 4096\n"));
        CHECK(has(text, "regfacade_response_bytes_total{source=\"upstream\"} 300\n"));
        CHECK(has(text, "regfacade_cache_hits_total{kind=\"blob\"} 2\n"));
        CHECK(has(text, "regfacade_cache_misses_total{kind=\"blob\"} 1\n"));
        CHECK(has(text, "regfacade_cache_size_bytes 1000\n"));
        CHECK(has(text, "regfacade_cache_entries 1\n"));
        CHECK(has(text, "regfacade_cache_evictions_total 1\n"));
        CHECK(has(text, "regfacade_upstream_requests_total{upstream=\"hub\",status=\"2xx\"} 1\n"));
        CHECK(has(text, "regfacade_upstream_requests_total{upstream=\"hub\",status=\"4xx\"} 1\n"));
        CHECK(has(text, "regfacade_upstream_requests_total{upstream=\"hub\",status=\"error\"} 1\n"));
        CHECK(has(text, "regfacade_upstream_errors_total{upstream=\"hub\",reason=\"timeout\"} 1\n"));
        CHECK(has(text, "regfacade_upstream_requests_total{upstream=\"we\\\"ird\",status=\"5xx\"} 1\n"));
        CHECK(has(text, "regfacade_upstream_retries_total{upstream=\"hub\",kind=\"blob\"} 1\n"));
        CHECK(has(text, "regfacade_upstream_ratelimit_remaining{upstream=\"hub\"} 76\n"));
        CHECK(!has(text, "regfacade_upstream_ratelimit_remaining{upstream=\"we"));
        CHECK(has(text, "regfacade_policy_hook_duration_seconds_bucket{hook=\"resolve\",le=\"0.0005\"} 1\n"));
        CHECK(has(text, "regfacade_policy_hook_duration_seconds_bucket{hook=\"resolve\",le=\"+Inf\"} 2\n"));
        CHECK(has(text, "regfacade_policy_hook_duration_seconds_count{hook=\"resolve\"} 2\n"));
        CHECK(has(text, "regfacade_policy_hook_calls_total{hook=\"resolve\",outcome=\"budget\"} 1\n"));
        CHECK(has(text, "regfacade_policy_errors_total{hook=\"resolve\"} 1\n"));
        CHECK(has(text, "regfacade_policy_errors_total{hook=\"rewrite\"} 1\n"));
        CHECK(has(text, "regfacade_policy_budget_kills_total{hook=\"resolve\"} 1\n"));
        CHECK(has(text, "regfacade_policy_budget_kills_total{hook=\"rewrite\"} 0\n"));
        CHECK(!has(text, "secret"));
        free(text);
    }

    /* health answers */
    char body[512];
    CHECK(metrics_health_answer("/healthz", ready_no, NULL, body, sizeof body) == 200);
    CHECK_STR(body, "{\"status\":\"ok\"}");
    CHECK(metrics_health_answer("/readyz", ready_no, NULL, body, sizeof body) == 503);
    CHECK_STR(body, "{\"status\":\"unavailable\",\"reason\":\"cache \\\"x\\\" is gone\"}");
    CHECK(metrics_health_answer("/readyz", ready_yes, NULL, body, sizeof body) == 200);
    CHECK(metrics_health_answer("/metrics", ready_yes, NULL, body, sizeof body) == 0);

    /* cache writability: a folder with tmp/, then tmp/ replaced by a file */
    char dir[] = "/tmp/rf-metrics-unit-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s/tmp", dir);
    CHECK(mkdir(tmp, 0700) == 0);
    char why[512];
    CHECK(metrics_cache_writable(dir, why, sizeof why) == 0);
    CHECK(rmdir(tmp) == 0);
    FILE *f = fopen(tmp, "w");
    CHECK(f != NULL);
    if (f) fclose(f);
    CHECK(metrics_cache_writable(dir, why, sizeof why) == -1);
    CHECK(strstr(why, "not writable") != NULL);
    unlink(tmp);
    rmdir(dir);

    return UNIT_DONE("metrics");
}
