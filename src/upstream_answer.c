#include "regfacade/upstream_answer.h"

#include <stdio.h>
#include <string.h>

#include "regfacade/metrics.h"

/* Per upstream_what: the 404's OCI code and the retry metric's kind. */
static const struct {
    const char *unknown_code;
    const char *label;
} whats[] = {
    [UPSTREAM_WHAT_MANIFEST] = {"MANIFEST_UNKNOWN", "manifest"},
    [UPSTREAM_WHAT_BLOB] = {"BLOB_UNKNOWN", "blob"},
    [UPSTREAM_WHAT_TAGS] = {"NAME_UNKNOWN", "tags"},
};

upstream_answer upstream_answer_map(upstream_what what, const char *upstream, const char *subject, upstream_result r,
                                    const upstream_response *resp, const char *err, fetch_error *e, bool *retry) {
    bool again = false;
    upstream_answer a = UPSTREAM_ANSWER_STATUS;
    if (r != UPSTREAM_OK) {
        a = UPSTREAM_ANSWER_FAILED;
        again = upstream_result_retryable(r);
        if (r == UPSTREAM_ERR_DENIED)
            fetch_error_set(e, 403, "DENIED", "%s", err);
        else
            fetch_error_set(e, r == UPSTREAM_ERR_TIMEOUT ? 504 : 502, "UNKNOWN", "%s", err);
    } else {
        long st = resp->status;
        if (st >= 200 && st < 300) return UPSTREAM_ANSWER_OK;
        if (st == 404) {
            fetch_error_set(e, 404, whats[what].unknown_code, "%s is unknown to upstream %s", subject, upstream);
        } else if (st == 401 || st == 403) {
            fetch_error_set(e, 403, "DENIED", "upstream %s refused access to %s (status %ld)", upstream, subject, st);
        } else if (st == 429) {
            fetch_error_set(e, 429, "TOOMANYREQUESTS", "upstream %s is rate-limiting (429) %s", upstream, subject);
            snprintf(e->retry_after, sizeof e->retry_after, "%s", resp->retry_after);
            /* Waited out only when the upstream says how long. */
            again = upstream_parse_retry_after(resp->retry_after) >= 0;
        } else if (st >= 500) {
            fetch_error_set(e, 502, "UNKNOWN", "upstream %s answered %ld for %s", upstream, st, subject);
            again = true;
        } else {
            fetch_error_set(e, 502, "UNKNOWN", "upstream %s answered unexpected status %ld for %s", upstream, st,
                            subject);
        }
    }
    if (retry) *retry = again;
    return a;
}

upstream_answer upstream_ask(upstream *u, const upstream_request *req, upstream_response *resp, upstream_what what,
                             const char *subject, bool quick, fetch_error *e) {
    const char *name = upstream_name(u);
    upstream_retry rt;
    upstream_retry_init(&rt);
    for (;;) {
        char err[1024] = "";
        upstream_result r = upstream_perform(u, req, resp, err, sizeof err);
        bool retry = false;
        upstream_answer a = upstream_answer_map(what, name, subject, r, resp, err, e, &retry);
        if (a == UPSTREAM_ANSWER_OK || !retry || quick) return a;
        char why[400];
        /* A Retry-After paces 5xx answers too, not only 429s. */
        long delay = upstream_retry_delay(u, &rt, r == UPSTREAM_OK ? resp->retry_after : NULL, why, sizeof why);
        if (delay < 0) {
            size_t ml = strlen(e->message);
            if (ml < sizeof e->message - 1) snprintf(e->message + ml, sizeof e->message - ml, " (gave up: %s)", why);
            return a;
        }
        log_warn("%s: %s; retrying in %ld ms", subject, e->message, delay);
        metrics_upstream_retry(name, whats[what].label);
        upstream_sleep_ms(delay);
    }
}

const char *upstream_answer_retry_after(const fetch_error *e) {
    if (e->http_status != 429 && e->http_status != 503) return NULL;
    return e->retry_after[0] ? e->retry_after : UPSTREAM_ANSWER_RETRY_AFTER_S;
}

log_level upstream_answer_log_level(int http_status) {
    if (http_status == 404) return LOG_INFO;
    if (http_status >= 400 && http_status < 500) return LOG_WARN;
    return LOG_ERROR;
}
