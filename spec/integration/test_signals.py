"""SIGHUP reloads config, credentials and policy without dropping a
connection (a bad new config is rejected and the old one keeps serving);
SIGTERM stops accepting, lets transfers in flight finish, and exits 0."""
import http.client
import json
import os
import signal
import threading
import time

from fake_upstream import FakeUpstream, sha256_digest, wait_until
from harness import Regfacade

ACCEPT = "application/vnd.oci.image.manifest.v1+json"

ALLOW = """
return { resolve = function(req) return { upstream = "fake" } end }
"""
DENY_APP = """
return { resolve = function(req)
  if req.repository == "acme/app" then
    return nil, { status = 403, code = "DENIED", message = "acme/app is off limits now" }
  end
  return { upstream = "fake" }
end }
"""


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def get(conn, path):
    conn.request("GET", path, headers={"Accept": ACCEPT})
    r = conn.getresponse()
    return r.status, r.read()


def test_sighup_reloads_without_dropping_connections(procs, tmp_path):
    fake = FakeUpstream().start()
    try:
        img = fake.add_image("acme/app", "v1")
        fake.add_image("acme/other", "v1")
        policy = tmp_path / "policy.lua"
        write(policy, ALLOW)
        rf = Regfacade(procs, str(tmp_path), {
            "upstreams": {"fake": {"url": fake.url}},
            # SIGHUP only: the policy file watch (test_policy_sandbox.py) would
            # pick up the policy edits below by itself.
            "policy": {"file": "policy.lua", "watch": False},
            "cache": {"dir": str(tmp_path / "cache"), "tag_ttl_seconds": 0},
        }).start()
        conn = http.client.HTTPConnection("127.0.0.1", rf.port, timeout=10)
        status, body = get(conn, "/v2/acme/app/manifests/v1")
        assert status == 200 and sha256_digest(body) == img.digest
        sock = conn.sock

        # A good new policy: takes effect on the same connection.
        write(policy, DENY_APP)
        rf.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: reloaded" in rf.log(), timeout=10)
        status, body = get(conn, "/v2/acme/app/manifests/v1")
        assert status == 403, body
        assert json.loads(body)["errors"][0]["code"] == "DENIED"
        assert conn.sock is sock, "the keep-alive connection was dropped by the reload"
        assert get(conn, "/v2/acme/other/manifests/v1")[0] == 200

        # A broken config: rejected, the running one keeps serving.
        good_config = open(rf.config_path).read()
        write(rf.config_path, good_config.replace('"upstreams"', '"upstreamz"'))
        rf.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: 'reload rejected' in rf.log() and 'upstreamz' in rf.log(), timeout=10)
        assert get(conn, "/v2/acme/app/manifests/v1")[0] == 403
        assert get(conn, "/v2/acme/other/manifests/v1")[0] == 200

        # A broken policy: rejected with its file and line.
        write(rf.config_path, good_config)
        write(policy, "return { resolve = function(req) return { upstream = 'fake' } end\n")
        rf.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: rf.log().count("reload rejected") >= 2, timeout=10)
        assert "policy.lua:" in rf.log().split("reload rejected")[-1]
        assert get(conn, "/v2/acme/app/manifests/v1")[0] == 403

        # A setting bound at start (listen) cannot change on reload.
        cfg = json.loads(good_config)
        cfg["listen"] = "127.0.0.1:1"
        write(rf.config_path, json.dumps(cfg))
        write(policy, ALLOW)
        rf.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: '"listen" cannot change on reload' in rf.log(), timeout=10)
        assert get(conn, "/v2/acme/app/manifests/v1")[0] == 403

        # And a good one again.
        write(rf.config_path, good_config)
        rf.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: rf.log().count("SIGHUP: reloaded") >= 2, timeout=10)
        assert get(conn, "/v2/acme/app/manifests/v1")[0] == 200
        assert conn.sock is sock
        assert rf.proc.poll() is None
        conn.close()
    finally:
        fake.stop()


def test_sigterm_lets_transfers_finish_and_exits_zero(procs, tmp_path):
    fake = FakeUpstream().start()
    try:
        img = fake.add_image("acme/big", "v1", layer_sizes=[3 * 1024 * 1024])
        layer = img.layers[0]
        # The upstream stalls before answering: the transfer is in flight
        # when SIGTERM arrives.
        fake.misbehave(f"/v2/acme/big/blobs/{layer.digest}", "hang", seconds=2)
        rf = Regfacade(procs, str(tmp_path), {
            "upstreams": {"fake": {"url": fake.url}},
            "cache": {"dir": str(tmp_path / "cache")},
            "limits": {"shutdown_grace_seconds": 20},
        }).start()
        result = {}

        def pull():
            c = http.client.HTTPConnection("127.0.0.1", rf.port, timeout=30)
            c.request("GET", f"/v2/acme/big/blobs/{layer.digest}")
            r = c.getresponse()
            result["status"] = r.status
            result["body"] = r.read()
            c.close()

        t = threading.Thread(target=pull)
        t.start()
        wait_until(lambda: fake.count("GET", f"/v2/acme/big/blobs/{layer.digest}") >= 1, timeout=10)
        rf.proc.send_signal(signal.SIGTERM)
        # No new connections once it is draining.
        time.sleep(0.3)
        refused = False
        try:
            c = http.client.HTTPConnection("127.0.0.1", rf.port, timeout=2)
            c.request("GET", "/v2/")
            c.getresponse().read()
        except OSError:
            refused = True
        assert refused, "a new connection was accepted after SIGTERM"
        t.join(timeout=30)
        assert result.get("status") == 200
        assert sha256_digest(result["body"]) == layer.digest
        assert rf.proc.wait(timeout=20) == 0
        rf.proc = None
    finally:
        fake.stop()
