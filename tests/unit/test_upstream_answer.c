/*
 * Unit tests of upstream_answer.c: every row of the mapping table in its
 * header, for each kind of request, and the log level of the answers.
 */
#include <string.h>

#include "regfacade/upstream_answer.h"
#include "unit.h"

static upstream_response answer(long status, const char *retry_after) {
    upstream_response r;
    memset(&r, 0, sizeof r);
    r.status = status;
    r.content_length = -1;
    snprintf(r.retry_after, sizeof r.retry_after, "%s", retry_after ? retry_after : "");
    return r;
}

/* Map an HTTP answer; returns the client status, code in *code, retry in *retry. */
static int map(upstream_what what, long status, const char *retry_after, fetch_error *e, bool *retry) {
    upstream_response r = answer(status, retry_after);
    memset(e, 0, sizeof *e);
    *retry = false;
    upstream_answer a = upstream_answer_map(what, "hub", "the thing", UPSTREAM_OK, &r, "", e, retry);
    if (a == UPSTREAM_ANSWER_OK) return 0;
    CHECK(a == UPSTREAM_ANSWER_STATUS);
    return e->http_status;
}

static void test_statuses(void) {
    fetch_error e;
    bool retry;
    CHECK(map(UPSTREAM_WHAT_BLOB, 200, NULL, &e, &retry) == 0 && !retry);
    CHECK(map(UPSTREAM_WHAT_BLOB, 206, NULL, &e, &retry) == 0);

    const upstream_what whats[] = {UPSTREAM_WHAT_MANIFEST, UPSTREAM_WHAT_BLOB, UPSTREAM_WHAT_TAGS};
    const char *unknown[] = {"MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"};
    for (int i = 0; i < 3; i++) {
        /* the same answers, whatever was asked; only the 404's code differs */
        CHECK(map(whats[i], 404, NULL, &e, &retry) == 404 && !retry);
        CHECK_STR(e.code, unknown[i]);
        CHECK(strstr(e.message, "the thing is unknown to upstream hub") != NULL);
        CHECK(map(whats[i], 401, NULL, &e, &retry) == 403 && !retry);
        CHECK_STR(e.code, "DENIED");
        CHECK(map(whats[i], 403, NULL, &e, &retry) == 403 && !retry);
        CHECK(map(whats[i], 429, "7", &e, &retry) == 429 && retry);
        CHECK_STR(e.code, "TOOMANYREQUESTS");
        CHECK_STR(e.retry_after, "7");
        CHECK(map(whats[i], 429, NULL, &e, &retry) == 429 && !retry); /* no Retry-After: passed on */
        CHECK_STR(e.retry_after, "");
        CHECK(map(whats[i], 429, "soon", &e, &retry) == 429 && !retry);
        CHECK(map(whats[i], 503, "1", &e, &retry) == 502 && retry);
        CHECK_STR(e.code, "UNKNOWN");
        CHECK_STR(e.retry_after, ""); /* a 5xx's Retry-After paces retries; the client gets a 502 */
        CHECK(map(whats[i], 500, NULL, &e, &retry) == 502 && retry);
        CHECK(map(whats[i], 400, NULL, &e, &retry) == 502 && !retry);
        CHECK(strstr(e.message, "unexpected status 400") != NULL);
        CHECK(map(whats[i], 302, NULL, &e, &retry) == 502 && !retry);
    }
}

static void test_failures(void) {
    struct {
        upstream_result r;
        int status;
        const char *code;
        bool retry;
    } rows[] = {
        {UPSTREAM_ERR_CONNECT, 502, "UNKNOWN", true},  {UPSTREAM_ERR_TLS, 502, "UNKNOWN", true},
        {UPSTREAM_ERR_TIMEOUT, 504, "UNKNOWN", true},  {UPSTREAM_ERR_TRANSFER, 502, "UNKNOWN", true},
        {UPSTREAM_ERR_AUTH, 502, "UNKNOWN", false},    {UPSTREAM_ERR_DENIED, 403, "DENIED", false},
        {UPSTREAM_ERR_ABORTED, 502, "UNKNOWN", false}, {UPSTREAM_ERR_INTERNAL, 502, "UNKNOWN", false},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        upstream_response r = answer(0, NULL);
        fetch_error e;
        bool retry = !rows[i].retry;
        upstream_answer a = upstream_answer_map(UPSTREAM_WHAT_TAGS, "hub", "the tags of x", rows[i].r, &r,
                                                "upstream hub: GET http://h/v2/: could not resolve host h", &e, &retry);
        CHECK(a == UPSTREAM_ANSWER_FAILED);
        CHECK(e.http_status == rows[i].status);
        CHECK_STR(e.code, rows[i].code);
        CHECK(retry == rows[i].retry);
        /* the transport's own words reach the client */
        CHECK(strstr(e.message, "could not resolve host h") != NULL);
    }
}

static void test_retry_after(void) {
    fetch_error e;
    bool retry;
    map(UPSTREAM_WHAT_BLOB, 429, "120", &e, &retry);
    CHECK_STR(upstream_answer_retry_after(&e), "120");
    map(UPSTREAM_WHAT_BLOB, 429, NULL, &e, &retry);
    CHECK_STR(upstream_answer_retry_after(&e), UPSTREAM_ANSWER_RETRY_AFTER_S);
    map(UPSTREAM_WHAT_BLOB, 503, "5", &e, &retry);
    CHECK(upstream_answer_retry_after(&e) == NULL); /* a 502 for the client: no Retry-After */
    fetch_error_set(&e, 503, "UNKNOWN", "provider down");
    CHECK_STR(upstream_answer_retry_after(&e), UPSTREAM_ANSWER_RETRY_AFTER_S);
}

static void test_log_levels(void) {
    CHECK(upstream_answer_log_level(404) == LOG_INFO);
    CHECK(upstream_answer_log_level(403) == LOG_WARN);
    CHECK(upstream_answer_log_level(429) == LOG_WARN);
    CHECK(upstream_answer_log_level(502) == LOG_ERROR);
    CHECK(upstream_answer_log_level(504) == LOG_ERROR);
}

int main(void) {
    test_statuses();
    test_failures();
    test_retry_after();
    test_log_levels();
    return UNIT_DONE("upstream_answer");
}
