"""Observability: /metrics on its own listener, /healthz and
/readyz on both listeners, the JSON access log, and the metrics config
section checked by `regfacade check`. Against the fake upstream."""
import json
import os
import re
import shutil
import subprocess

import pytest

from fake_upstream import ALL_MANIFEST_TYPES, random_bytes, request, wait_until
from harness import REGFACADE, free_port

ACCEPT_ALL = ", ".join(ALL_MANIFEST_TYPES)

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? '
                    r'(-?[0-9.e+]+|\+Inf|NaN)$')


def start_with_metrics(fake_facade, **kw):
    port = free_port()
    config = dict(kw.pop("config", {}))
    config["metrics"] = dict({"listen": f"127.0.0.1:{port}"}, **config.get("metrics", {}))
    rf = fake_facade(config=config, **kw)
    rf.metrics_host = f"127.0.0.1:{port}"
    # The harness's /v2/ probe is counted when that request ends, which may
    # be just after its answer arrived: let it settle before any baseline.
    def probe_counted():
        try:
            return val(scrape(rf), "regfacade_requests_total", route="ping", status="200") >= 1
        except OSError:  # the metrics listener not accepting yet
            return False

    assert wait_until(probe_counted, timeout=30), rf.log()[-2000:]
    return rf


def scrape(rf):
    """{(name, frozenset(labels.items())): value} of one /metrics answer."""
    r = request(rf.metrics_host, "GET", "/metrics")
    assert r.status == 200, r
    assert r.header("Content-Type").startswith("text/plain; version=0.0.4"), r
    out = {}
    for line in r.body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name = m.group(1)
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(name, frozenset(labels.items()))] = float(m.group(4))
    return out


def val(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before, after, name, **labels):
    return val(after, name, **labels) - val(before, name, **labels)


def pull(rf, img, tag):
    """Manifest by tag, then config and layers, like a client."""
    r = request(rf.host, "GET", f"/v2/{img.repo}/manifests/{tag}", {"Accept": ACCEPT_ALL})
    assert r.status == 200, r
    got = len(r.body)
    for b in [img.config] + img.layers:
        rb = request(rf.host, "GET", f"/v2/{img.repo}/blobs/{b.digest}")
        assert rb.status == 200 and rb.body == b.data, rb
        got += len(rb.body)
    return got


def test_metrics_count_a_pull(fake_upstream, fake_facade):
    # A 2 MiB layer is streamed from the spool (above the 1 MiB
    # verify-before-send size); the config is verified whole first.
    img = fake_upstream.add_image("acme/app", "v1", layer_sizes=[2 * 1024 * 1024])
    rf = start_with_metrics(fake_facade)
    total = len(img.manifest) + img.config.size + sum(l.size for l in img.layers)
    before = scrape(rf)
    fake_upstream.reset_counts()

    assert pull(rf, img, "v1") == total
    upstream_gets = fake_upstream.count()

    def settled(samples):
        return (val(samples, "regfacade_requests_total", route="blob", status="200")
                - val(before, "regfacade_requests_total", route="blob", status="200")) >= 2 and \
            delta(before, samples, "regfacade_response_bytes_total", source="upstream") >= total and \
            delta(before, samples, "regfacade_cache_entries") >= 3  # a blob's commit may end after its last byte

    assert wait_until(lambda: settled(scrape(rf)), timeout=5)
    cold = scrape(rf)
    assert delta(before, cold, "regfacade_requests_total", route="manifest", status="200") == 1
    assert delta(before, cold, "regfacade_requests_total", route="blob", status="200") == 2
    assert delta(before, cold, "regfacade_cache_misses_total", kind="manifest") == 1
    assert delta(before, cold, "regfacade_cache_hits_total", kind="manifest") == 0
    assert delta(before, cold, "regfacade_cache_misses_total", kind="blob") == 2
    assert delta(before, cold, "regfacade_cache_hits_total", kind="blob") == 0
    assert delta(before, cold, "regfacade_response_bytes_total", source="upstream") == total
    assert delta(before, cold, "regfacade_response_bytes_total", source="cache") == 0
    assert delta(before, cold, "regfacade_blob_fetches_total") == 2
    # Every request the fake saw was counted, all 2xx (manifest HEAD + GET, two blobs).
    assert upstream_gets >= 4
    assert delta(before, cold, "regfacade_upstream_requests_total", upstream="fake", status="2xx") == upstream_gets
    assert delta(before, cold, "regfacade_cache_entries") == 3
    assert delta(before, cold, "regfacade_cache_size_bytes") == total
    assert delta(before, cold, "regfacade_policy_hook_duration_seconds_count", hook="resolve") == 3
    assert delta(before, cold, "regfacade_policy_hook_calls_total", hook="resolve", outcome="ok") == 3

    # The same pull again: all from the cache, nothing upstream.
    fake_upstream.reset_counts()
    assert pull(rf, img, "v1") == total
    assert fake_upstream.count() == 0
    assert wait_until(lambda: delta(cold, scrape(rf), "regfacade_response_bytes_total", source="cache") >= total,
                      timeout=5)
    warm = scrape(rf)
    assert delta(cold, warm, "regfacade_cache_hits_total", kind="manifest") == 1
    assert delta(cold, warm, "regfacade_cache_misses_total", kind="manifest") == 0
    assert delta(cold, warm, "regfacade_cache_hits_total", kind="blob") == 2
    assert delta(cold, warm, "regfacade_cache_misses_total", kind="blob") == 0
    assert delta(cold, warm, "regfacade_response_bytes_total", source="cache") == total
    assert delta(cold, warm, "regfacade_response_bytes_total", source="upstream") == 0
    assert delta(cold, warm, "regfacade_upstream_requests_total", upstream="fake", status="2xx") == 0
    assert delta(cold, warm, "regfacade_blob_fetches_total") == 0
    assert delta(cold, warm, "regfacade_requests_total", route="blob", status="200") == 2


def test_metrics_errors_and_generated_bytes(fake_upstream, fake_facade):
    rf = start_with_metrics(fake_facade)
    before = scrape(rf)
    r = request(rf.host, "GET", "/v2/acme/none/manifests/v1", {"Accept": ACCEPT_ALL})
    assert r.status == 404, r
    r2 = request(rf.host, "GET", "/v2/")
    assert r2.status == 200
    assert wait_until(lambda: delta(before, scrape(rf), "regfacade_requests_total", route="ping", status="200") == 1)
    after = scrape(rf)
    assert delta(before, after, "regfacade_requests_total", route="manifest", status="404") == 1
    assert delta(before, after, "regfacade_upstream_requests_total", upstream="fake", status="4xx") >= 1
    assert delta(before, after, "regfacade_response_bytes_total", source="generated") == len(r.body) + len(r2.body)


def test_metrics_count_retries_and_upstream_errors(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/app", "v1", layer_sizes=[100])
    fake_upstream.misbehave(f"/v2/acme/app/blobs/{img.layers[0].digest}", "status", status=503, times=1)
    rf = start_with_metrics(fake_facade)
    before = scrape(rf)
    r = request(rf.host, "GET", f"/v2/acme/app/blobs/{img.layers[0].digest}")
    assert r.status == 200 and r.body == img.layers[0].data, r
    after = scrape(rf)
    assert delta(before, after, "regfacade_upstream_retries_total", upstream="fake", kind="blob") == 1
    assert delta(before, after, "regfacade_upstream_requests_total", upstream="fake", status="5xx") == 1
    fake_upstream.stop()
    r = request(rf.host, "GET", "/v2/acme/app/manifests/v9", {"Accept": ACCEPT_ALL})
    assert r.status in (502, 504), r
    down = scrape(rf)
    assert delta(after, down, "regfacade_upstream_requests_total", upstream="fake", status="error") >= 1
    assert delta(after, down, "regfacade_upstream_errors_total", upstream="fake", reason="connect") >= 1


def test_exposition_format(fake_upstream, fake_facade):
    rf = start_with_metrics(fake_facade)
    r = request(rf.metrics_host, "GET", "/metrics")
    text = r.body.decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name in ("regfacade_requests_total", "regfacade_response_bytes_total", "regfacade_cache_hits_total",
                 "regfacade_cache_misses_total", "regfacade_cache_size_bytes", "regfacade_cache_entries",
                 "regfacade_cache_evictions_total", "regfacade_upstream_requests_total",
                 "regfacade_upstream_retries_total", "regfacade_blob_fetch_coalesced_total",
                 "regfacade_policy_hook_duration_seconds", "regfacade_policy_errors_total",
                 "regfacade_policy_budget_kills_total", "regfacade_upstream_ratelimit_remaining"):
        assert name in types, f"{name} missing from /metrics"
    assert types["regfacade_policy_hook_duration_seconds"] == "histogram"
    assert types["regfacade_requests_total"] == "counter"
    assert types["regfacade_cache_size_bytes"] == "gauge"
    scrape(rf)  # every sample line parses
    assert request(rf.metrics_host, "GET", "/nope").status == 404
    assert request(rf.metrics_host, "POST", "/metrics", body=b"").status == 405


def test_health_while_upstream_is_down(fake_upstream, fake_facade):
    rf = start_with_metrics(fake_facade)
    fake_upstream.stop()
    for host in (rf.host, rf.metrics_host):
        r = request(host, "GET", "/healthz")
        assert r.status == 200, r
        assert r.json() == {"status": "ok"}
        r = request(host, "GET", "/readyz")
        assert r.status == 200, r
        assert r.json()["status"] == "ready"
        assert request(host, "HEAD", "/healthz").status == 200
    # The facade still answers pulls, with an error, and stays alive.
    r = request(rf.host, "GET", "/v2/acme/app/manifests/v1", {"Accept": ACCEPT_ALL})
    assert r.status in (502, 504), r
    assert request(rf.host, "GET", "/healthz").status == 200


def test_readyz_when_cache_is_not_writable(fake_upstream, fake_facade):
    rf = start_with_metrics(fake_facade)
    tmp = os.path.join(rf.cache_dir, "tmp")
    shutil.rmtree(tmp)
    with open(tmp, "w") as f:  # root ignores modes: a file where the folder was
        f.write("not a folder\n")
    try:
        for host in (rf.host, rf.metrics_host):
            r = request(host, "GET", "/readyz")
            assert r.status == 503, r
            body = r.json()
            assert body["status"] == "unavailable"
            assert "not writable" in body["reason"] and "tmp" in body["reason"], body
            assert request(host, "GET", "/healthz").status == 200
    finally:
        os.remove(tmp)
        os.mkdir(tmp, 0o700)
    assert request(rf.host, "GET", "/readyz").status == 200
    assert request(rf.metrics_host, "GET", "/readyz").status == 200


def access_lines(rf):
    lines = []
    for line in rf.log().splitlines():
        try:
            o = json.loads(line)
        except ValueError:
            continue
        if o.get("msg") == "access":
            lines.append(o)
    return lines


def test_access_log_has_no_secrets(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/app", "v1", layer_sizes=[100])
    rf = fake_facade()
    secret_pw = "hunter2-very-secret"
    secret_tok = "tok-abcdef-very-secret"
    import base64
    basic = base64.b64encode(f"alice:{secret_pw}".encode()).decode()
    r = request(rf.host, "GET", f"/v2/acme/app/manifests/v1?token={secret_tok}",
                {"Accept": ACCEPT_ALL, "Authorization": f"Basic {basic}"})
    assert r.status == 200, r
    r = request(rf.host, "GET", f"/v2/acme/app/blobs/{img.layers[0].digest}",
                {"Authorization": f"Bearer {secret_tok}"})
    assert r.status == 200, r
    assert wait_until(lambda: len(access_lines(rf)) >= 3)  # the harness's /v2/ probe too
    lines = access_lines(rf)
    log = rf.log()
    for s in (secret_pw, secret_tok, basic, "Authorization", "Bearer"):
        assert s not in log, f"{s!r} leaked into the log"
    man = [o for o in lines if o["route"] == "manifest"][-1]
    assert man["method"] == "GET"
    assert man["path"] == "/v2/acme/app/manifests/v1"
    assert man["status"] == 200
    assert man["bytes"] == len(img.manifest)
    assert man["upstream"] == "fake"
    assert man["client"] == "127.0.0.1"
    assert man["source"] == "upstream"
    assert isinstance(man["duration_ms"], (int, float)) and man["duration_ms"] >= 0
    blob = [o for o in lines if o["route"] == "blob"][-1]
    assert blob["bytes"] == img.layers[0].size and blob["status"] == 200


def test_access_log_can_be_turned_off(fake_upstream, fake_facade):
    rf = start_with_metrics(fake_facade, config={"metrics": {"access_log": False}})
    assert request(rf.host, "GET", "/v2/").status == 200
    assert request(rf.host, "GET", "/healthz").status == 200
    assert access_lines(rf) == []


def check(tmp_path, metrics):
    cfg = {"cache": {"dir": str(tmp_path / "cache")},
           "upstreams": {"u": {"url": "http://127.0.0.1:9"}}, "metrics": metrics}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    return subprocess.run([REGFACADE, "check", "--config", str(p)], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("metrics, want", [
    ({"listn": "127.0.0.1:9090"}, 'metrics.listn: unknown key'),
    ({"listen": "localhost:9090"}, "metrics.listen: \"localhost\" is not an IP address"),
    ({"listen": "127.0.0.1"}, "metrics.listen: \"127.0.0.1\" is not HOST:PORT"),
    ({"listen": "127.0.0.1:0"}, "metrics.listen: port \"0\" must be an integer from 1 to 65535"),
    ({"listen": "127.0.0.1:99999"}, "metrics.listen: port"),
    ({"listen": 9090}, "metrics.listen: must be a non-empty string"),
    ({"access_log": "yes"}, "metrics.access_log: must be true or false"),
    ("127.0.0.1:9090", "metrics: must be an object"),
])
def test_check_rejects_bad_metrics_config(tmp_path, metrics, want):
    r = check(tmp_path, metrics)
    assert r.returncode != 0, r
    assert want in r.stderr, r.stderr
    assert str(tmp_path / "c.json") in r.stderr or "metrics" in r.stderr


@pytest.mark.parametrize("metrics", [{}, {"listen": "127.0.0.1:9191"}, {"listen": "[::1]:9191"},
                                     {"listen": "0.0.0.0:9191", "access_log": False}])
def test_check_accepts_good_metrics_config(tmp_path, metrics):
    r = check(tmp_path, metrics)
    assert r.returncode == 0, r.stderr


def test_serve_refuses_bad_metrics_config(tmp_path):
    cfg = {"listen": f"127.0.0.1:{free_port()}", "cache": {"dir": str(tmp_path / "cache")},
           "upstreams": {"u": {"url": "http://127.0.0.1:9"}}, "metrics": {"port": 1}}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    r = subprocess.run([REGFACADE, "serve", "--config", str(p)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "metrics.port: unknown key" in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# What an operator alerts on: a cold transfer shows while it runs, request
# latency, in-flight gauges, reloads, series present from the start, the
# standard process_* set, promtool's own checks.
# ---------------------------------------------------------------------------

PROCESS_SET = ("process_cpu_seconds_total", "process_open_fds", "process_max_fds", "process_virtual_memory_bytes",
               "process_virtual_memory_max_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
               "process_network_receive_bytes_total", "process_network_transmit_bytes_total")


def scrape_text(rf):
    r = request(rf.metrics_host, "GET", "/metrics")
    assert r.status == 200, r
    return r.body


def promtool_check_metrics(text):
    """promtool check metrics (Prometheus' own linter) on one scrape."""
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool (Debian's prometheus package) is a test package")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")


def test_series_present_from_the_start_and_process_set(fake_facade):
    rf = start_with_metrics(fake_facade, upstreams={"second": {"url": "http://127.0.0.1:9"}})
    s = scrape(rf)
    names = {k[0] for k in s}
    for name in PROCESS_SET:
        assert name in names, name
    assert val(s, "process_max_fds") > 0 and val(s, "process_cpu_seconds_total") >= 0
    assert val(s, "process_start_time_seconds") > 1.7e9
    # Each configured upstream has its series at 0 before its first request.
    for up in ("fake", "second"):
        assert (("regfacade_upstream_requests_total", frozenset({"upstream": up, "status": "5xx"}.items())) in s)
        assert (("regfacade_upstream_errors_total", frozenset({"upstream": up, "reason": "timeout"}.items())) in s)
        assert (("regfacade_upstream_received_bytes_total", frozenset({"upstream": up}.items())) in s)
    assert val(s, "regfacade_upstream_requests_total", upstream="second", status="5xx") == 0
    # Latency histograms for the routes alerts watch exist before any pull.
    for route in ("manifest", "blob"):
        for cls in ("2xx", "4xx", "5xx"):
            key = ("regfacade_http_request_duration_seconds_count", frozenset({"route": route, "status": cls}.items()))
            assert key in s, key
    assert val(s, "regfacade_reloads_total", result="ok") == 0
    assert val(s, "regfacade_reloads_total", result="rejected") == 0
    assert val(s, "regfacade_config_generation") == 1
    promtool_check_metrics(scrape_text(rf))


def test_request_duration_histogram_counts_requests(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/app", "v1", layer_sizes=[1000])
    rf = start_with_metrics(fake_facade)
    before = scrape(rf)
    pull(rf, img, "v1")
    r = request(rf.host, "GET", "/v2/acme/app/manifests/nope", {"Accept": ACCEPT_ALL})
    assert r.status == 404

    def counted(s):
        return (delta(before, s, "regfacade_http_request_duration_seconds_count", route="blob", status="2xx") == 2
                and delta(before, s, "regfacade_http_request_duration_seconds_count", route="manifest",
                          status="4xx") == 1)

    assert wait_until(lambda: counted(scrape(rf)), timeout=10)
    s = scrape(rf)
    assert delta(before, s, "regfacade_http_request_duration_seconds_count", route="manifest", status="2xx") == 1
    # Cumulative buckets: +Inf holds every request, a bucket never exceeds the next.
    inf = val(s, "regfacade_http_request_duration_seconds_bucket", route="blob", status="2xx", le="+Inf")
    assert inf == val(s, "regfacade_http_request_duration_seconds_count", route="blob", status="2xx")
    les = sorted(float(dict(k[1])["le"]) for k in s if k[0] == "regfacade_http_request_duration_seconds_bucket"
                 and dict(k[1]).get("route") == "blob" and dict(k[1]).get("status") == "2xx"
                 and dict(k[1])["le"] != "+Inf")
    counts = [val(s, "regfacade_http_request_duration_seconds_bucket", route="blob", status="2xx", le=f"{le:g}")
              for le in les]
    assert counts == sorted(counts) and counts[-1] <= inf
    assert val(s, "regfacade_http_request_duration_seconds_sum", route="blob", status="2xx") > 0


def test_reloads_by_result_and_generation(fake_facade):
    import signal as sig
    rf = start_with_metrics(fake_facade)
    os.kill(rf.proc.pid, sig.SIGHUP)
    assert wait_until(lambda: val(scrape(rf), "regfacade_reloads_total", result="ok") == 1, timeout=10)
    s = scrape(rf)
    assert val(s, "regfacade_config_generation") == 2 and val(s, "regfacade_config_last_reload_successful") == 1
    with open(rf.config_path) as f:
        good = f.read()
    with open(rf.config_path, "w") as f:
        f.write('{"listen": ')  # not JSON: rejected, the old config keeps serving
    os.kill(rf.proc.pid, sig.SIGHUP)
    assert wait_until(lambda: val(scrape(rf), "regfacade_reloads_total", result="rejected") == 1, timeout=10)
    s = scrape(rf)
    assert val(s, "regfacade_config_generation") == 2 and val(s, "regfacade_config_last_reload_successful") == 0
    assert val(s, "regfacade_config_last_reload_timestamp_seconds") > 1.7e9
    with open(rf.config_path, "w") as f:
        f.write(good)


def test_cold_transfer_moves_on_metrics_and_in_the_log(procs, tmp_path, fake_upstream, fake_facade):
    """A cold blob trickling from the upstream: two scrapes taken while it
    runs show the bytes received and sent growing and the transfer in the
    in-flight gauges; promtool accepts the scrape; the log has progress
    lines for it."""
    from test_reliability import FaultProxy, MiB
    data = random_bytes(48 * MiB, "metrics cold transfer")
    d = fake_upstream.put_blob("acme/app", data)
    proxy = FaultProxy(fake_upstream.url).start()
    try:
        proxy.add("trickle", path=re.escape(d), rate=4 * MiB, times=1)  # about 12 s
        rf = start_with_metrics(fake_facade, upstream={"url": proxy.url})
        before = scrape(rf)
        import socket
        c = socket.create_connection(("127.0.0.1", rf.port), timeout=60)
        try:
            c.sendall(f"GET /v2/acme/app/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            got = 0
            while got < 2 * MiB:  # headers and the first bytes came while the upstream trickles
                chunk = c.recv(65536)
                assert chunk, "connection closed early"
                got += len(chunk)
            first = scrape(rf)
            first_text = scrape_text(rf)
            assert val(first, "regfacade_upstream_fetches_in_flight") == 1
            assert val(first, "regfacade_client_transfers_in_flight") == 1
            assert val(first, "regfacade_blob_fetch_waiters") >= 1
            assert val(first, "regfacade_http_requests_in_flight") >= 1
            rx1 = delta(before, first, "regfacade_upstream_received_bytes_total", upstream="fake")
            tx1 = delta(before, first, "regfacade_response_bytes_total", source="upstream")
            assert rx1 >= 2 * MiB and tx1 > 0, (rx1, tx1)
            # keep reading for a while, then scrape again: both moved on
            deadline = got + 8 * MiB
            while got < deadline:
                chunk = c.recv(65536)
                assert chunk
                got += len(chunk)
            second = scrape(rf)
            rx2 = delta(before, second, "regfacade_upstream_received_bytes_total", upstream="fake")
            tx2 = delta(before, second, "regfacade_response_bytes_total", source="upstream")
            assert rx2 > rx1 and tx2 > tx1, (rx1, rx2, tx1, tx2)
            assert val(second, "regfacade_upstream_fetches_in_flight") == 1
            promtool_check_metrics(first_text)
            # at 4 MiB/s the transfer takes longer than one progress period
            assert wait_until(lambda: f"fetch: blob {d} from fake/acme/app" in rf.log(), timeout=30), rf.log()[-2000:]
            line = next(l for l in rf.log().splitlines() if f"fetch: blob {d}" in l)
            assert f"of {len(data)} bytes" in line and "MiB/s" in line and "waiting" in line, line
        finally:
            c.close()
    finally:
        proxy.stop()


def test_blobserve_and_spec_provider_series_on_metrics(fake_upstream, fake_facade, tmp_path):
    img = fake_upstream.add_image("ide/web", "v1", layer_sizes=[500])
    bs_port = free_port()
    token = tmp_path / "admin-token"
    token.write_text("metrics-test-admin-token\n")
    rf = start_with_metrics(fake_facade, config={
        "admin": {"listen": f"127.0.0.1:{free_port()}", "token_file": str(token)},
        "blobserve": {"listen": f"127.0.0.1:{bs_port}", "repositories": ["ide/web"],
                      "cache": {"dir": str(tmp_path / "bs-cache")}},
        "specs": {"providers": {"svc": {"type": "pulled", "url": "http://127.0.0.1:9/specs/{id}"},
                                "pushed": {"type": "pushed"}}},
    })
    s = scrape(rf)
    for name in ("regfacade_blobserve_requests_total", "regfacade_blobserve_extractions_total",
                 "regfacade_blobserve_cache_bytes", "regfacade_blobserve_prepull_pending"):
        assert (name, frozenset()) in s, name
    assert ("regfacade_spec_lookups_total", frozenset({"provider": "svc"}.items())) in s
    assert val(s, "regfacade_spec_pushed", provider="pushed") == 0
    before = val(s, "regfacade_blobserve_requests_total")
    r = request(f"127.0.0.1:{bs_port}", "GET", "/_stats")
    assert r.status == 200
    assert wait_until(lambda: val(scrape(rf), "regfacade_blobserve_requests_total") > before, timeout=10)
    promtool_check_metrics(scrape_text(rf))


EXAMPLES_OBS = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "observability")


def test_alert_rules_and_dashboard_check_and_name_real_series(fake_facade, tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool (Debian's prometheus package) is a test package")
    alerts = os.path.join(EXAMPLES_OBS, "alerts.yml")
    r = subprocess.run([promtool, "check", "rules", alerts], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, timeout=60,
                       cwd=EXAMPLES_OBS)
    assert r.returncode == 0, r.stdout + r.stderr
    # Every dashboard query is valid PromQL: promtool checks them as recording rules.
    with open(os.path.join(EXAMPLES_OBS, "grafana-dashboard.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    rules = tmp_path / "dashboard-rules.yml"
    with open(rules, "w") as f:
        f.write("groups:\n  - name: dashboard\n    rules:\n")
        for i, e in enumerate(exprs):
            e = e.replace("$__rate_interval", "5m").replace("$instance", ".*")
            f.write(f"      - record: dashboard:q{i}\n        expr: {json.dumps(e)}\n")
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # ... and names only series a running regfacade exports from its start.
    rf = start_with_metrics(fake_facade)
    exported = {k[0] for k in scrape(rf)}
    with open(alerts) as f:
        text = f.read() + "\n".join(exprs)
    used = set(re.findall(r"\b((?:regfacade|process)_[a-z_]+)\b", text))
    # The one series that appears only once an upstream sent the value
    # (Docker Hub's ratelimit-remaining): a 0 before that would be a lie.
    used.discard("regfacade_upstream_ratelimit_remaining")
    assert used and not (used - exported), sorted(used - exported)
