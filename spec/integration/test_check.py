"""`regfacade check` is `regfacade serve` without the listening: both run
one validation (server_check), so for every config serve refuses, check
exits non-zero with the message serve prints, and the other way round.
JSON errors (a duplicate key among them) say FILE:LINE:COLUMN. A SIGHUP
that changes a key applied only at start is rejected and names the key;
a key a reload applies is logged "reloaded" and applied.
"""
import json
import os
import signal
import subprocess
import time

import pytest

import harness
from harness import Regfacade, free_port


def run(cmd, path, timeout=60):
    """(exit code, stderr) of `regfacade CMD --config PATH`; serve must
    exit by itself (it refuses the config), else it is stopped and fails."""
    try:
        p = subprocess.run([harness.REGFACADE, cmd, "--config", path], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"regfacade {cmd} accepted {path} and kept running")
    return p.returncode, p.stderr


def base(tmp_path):
    return {"listen": f"127.0.0.1:{free_port()}", "cache": {"dir": str(tmp_path / "cache")},
            "upstreams": {"reg": {"url": "http://127.0.0.1:1"}}}


def bad_listen(tmp_path):
    c = base(tmp_path)
    c["listen"] = f"localhost:{free_port()}"
    return json.dumps(c), 'listen: "localhost:'


def missing_layer_file(tmp_path):
    c = base(tmp_path)
    c["layers"] = {"supervisor": {"file": "layers/supervisor.tar.gz"}}
    return json.dumps(c), "layers.supervisor: layer file " + str(tmp_path / "layers" / "supervisor.tar.gz") + \
        ": cannot open: No such file or directory"


def url_with_v2(tmp_path):
    c = base(tmp_path)
    c["upstreams"]["reg"]["url"] = "http://127.0.0.1:1/v2/"
    return json.dumps(c), 'upstreams.reg.url: "http://127.0.0.1:1/v2" ends in /v2: give the registry\'s base URL'


def mirror_with_v2(tmp_path):
    c = base(tmp_path)
    c["upstreams"]["reg"]["mirrors"] = ["http://127.0.0.1:2/V2"]
    return json.dumps(c), "upstreams.reg.mirrors[0]: \"http://127.0.0.1:2/V2\" ends in /v2"


def blobserve_listen(tmp_path):
    c = base(tmp_path)
    c["blobserve"] = {"listen": f"localhost:{free_port()}", "repositories": ["a/b"]}
    return json.dumps(c), 'blobserve.listen: "localhost:'


def duplicate_top_key(tmp_path):
    port, other = free_port(), free_port()
    text = ('{\n  "listen": "127.0.0.1:%d",\n  "cache": {"dir": "cache"},\n'
            '  "listen": "127.0.0.1:%d",\n  "upstreams": {"reg": {"url": "http://127.0.0.1:1"}}\n}\n'
            % (port, other))
    return text, ':4:3: duplicate key "listen"'


def duplicate_nested_key(tmp_path):
    text = ('{"listen": "127.0.0.1:%d", "cache": {"dir": "cache"},\n'
            ' "upstreams": {"reg": {"url": "http://127.0.0.1:1",\n'
            '                       "url": "http://127.0.0.1:2"}}}' % free_port())
    return text, ':3:24: duplicate key "url"'


def syntax_error(tmp_path):
    text = '{"listen": "127.0.0.1:%d",\n "cache": {"dir": "cache"}\n "upstreams": {}}' % free_port()
    return text, ":3:2: expected ',' or '}'"


def policy_error(tmp_path):
    c = base(tmp_path)
    (tmp_path / "bad.lua").write_text("return { resolve = function(req)\n  return { upstream = 'reg' }\n")
    c["policy"] = {"file": "bad.lua"}
    return json.dumps(c), "bad.lua:"


def unknown_user(tmp_path):
    c = base(tmp_path)
    c["user"] = "no-such-user-here"
    return json.dumps(c), "no-such-user-here"


def cache_dir_is_a_file(tmp_path):
    c = base(tmp_path)
    (tmp_path / "afile").write_text("x")
    c["cache"]["dir"] = str(tmp_path / "afile")
    return json.dumps(c), "afile exists and is not a folder"


def cache_dir_under_a_file(tmp_path):
    c = base(tmp_path)
    (tmp_path / "afile").write_text("x")
    c["cache"]["dir"] = str(tmp_path / "afile" / "cache")
    return json.dumps(c), "mkdir " + str(tmp_path / "afile" / "cache") + ": Not a directory"


def cache_dir_cannot_be_made(tmp_path):
    c = base(tmp_path)
    c["cache"]["dir"] = "/proc/regfacade-cache"
    return json.dumps(c), "mkdir /proc/regfacade-cache:"


def metrics_on_the_registry_address(tmp_path):
    c = base(tmp_path)
    c["metrics"] = {"listen": c["listen"]}
    return json.dumps(c), "metrics.listen " + c["listen"] + ": the registry (listen) listens there already"


@pytest.mark.parametrize("make", [bad_listen, missing_layer_file, url_with_v2, mirror_with_v2, blobserve_listen,
                                  duplicate_top_key, duplicate_nested_key, syntax_error, policy_error, unknown_user,
                                  cache_dir_is_a_file, cache_dir_under_a_file, cache_dir_cannot_be_made,
                                  metrics_on_the_registry_address],
                         ids=lambda f: f.__name__)
def test_check_and_serve_refuse_alike(tmp_path, make):
    text, needle = make(tmp_path)
    path = str(tmp_path / "config.json")
    with open(path, "w") as f:
        f.write(text)
    crc, cerr = run("check", path)
    src, serr = run("serve", path)
    assert crc != 0 and needle in cerr, cerr
    assert src != 0, serr
    message = cerr.strip().splitlines()[-1]
    assert message.startswith("regfacade: ") and message in serr, (message, serr)
    if "duplicate key" in needle or "expected" in needle:
        assert message.startswith(f"regfacade: {path}:"), message  # FILE:LINE:COLUMN
    assert not os.path.exists(tmp_path / "cache"), "a refused config created the cache"


def test_check_accepts_what_serve_serves(procs, tmp_path):
    c = base(tmp_path)
    os.makedirs(tmp_path / "layers")
    os.makedirs(tmp_path / "layer-src")
    (tmp_path / "layer-src" / "hello.txt").write_text("hello\n")
    # (not the folder the archive is written into: tar would read its own output)
    subprocess.run(["tar", "-czf", str(tmp_path / "layers" / "l.tar.gz"), "-C", str(tmp_path / "layer-src"), "."],
                   check=True, capture_output=True)
    c["layers"] = {"l": {"file": "layers/l.tar.gz"}}
    path = str(tmp_path / "good.json")
    with open(path, "w") as f:
        json.dump(c, f)
    crc, cerr = run("check", path)
    assert crc == 0, cerr
    rf = Regfacade(procs, str(tmp_path), c, name="good").start()
    assert rf.proc.poll() is None


def wait_log(rf, needle, count=1, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if rf.log().count(needle) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {needle!r} (x{count}) in the log:\n{rf.log()}")


def test_sighup_start_only_keys_rejected_by_name(procs, tmp_path):
    rf = Regfacade(procs, str(tmp_path), {"upstreams": {"reg": {"url": "http://127.0.0.1:1"}},
                                          "limits": {"max_connections": 64, "shutdown_grace_seconds": 5}},
                   name="hup").start()
    good = dict(rf.config)
    rejected = 0
    for key, value in [("max_connections", 128), ("client_timeout_seconds", 10), ("header_max_bytes", 16384),
                       ("requests_per_second", 5), ("connections_per_ip", 3), ("header_timeout_seconds", 5)]:
        cfg = json.loads(json.dumps(good))
        cfg["limits"][key] = value
        with open(rf.config_path, "w") as f:
            json.dump(cfg, f)
        rf.proc.send_signal(signal.SIGHUP)
        rejected += 1
        wait_log(rf, "reload rejected", rejected)
        last = rf.log().split("reload rejected")[-1].splitlines()[0].replace('\\"', '"')  # the log is JSON
        assert f'"limits.{key}" cannot change on reload' in last, last
    cfg = json.loads(json.dumps(good))
    cfg["upstream_client"] = {"max_concurrent_fetches": 8}
    with open(rf.config_path, "w") as f:
        json.dump(cfg, f)
    rf.proc.send_signal(signal.SIGHUP)
    wait_log(rf, "reload rejected", rejected + 1)
    assert 'upstream_client.max_concurrent_fetches\\" cannot change' in rf.log().split("reload rejected")[-1]
    # A reload that would fail the first pull (a named layer file that is not there) is rejected too.
    cfg = json.loads(json.dumps(good))
    cfg["layers"] = {"gone": {"file": "gone.tar.gz"}}
    with open(rf.config_path, "w") as f:
        json.dump(cfg, f)
    rf.proc.send_signal(signal.SIGHUP)
    wait_log(rf, "reload rejected", rejected + 2)
    assert "gone.tar.gz: cannot open" in rf.log().split("reload rejected")[-1]
    assert "SIGHUP: reloaded" not in rf.log()
    # A key a reload applies: reloaded, and in effect (the grace period of the stop).
    cfg = json.loads(json.dumps(good))
    cfg["limits"]["shutdown_grace_seconds"] = 0
    with open(rf.config_path, "w") as f:
        json.dump(cfg, f)
    rf.proc.send_signal(signal.SIGHUP)
    wait_log(rf, "SIGHUP: reloaded")
    assert rf.proc.poll() is None
