"""The policy runtime in the running server: every escape a policy
tries fails closed for that request (an OCI error, a log line naming the
policy's file and line, a metric) while the server keeps serving everyone
else meanwhile; reloads (file watch and SIGHUP) swap generations under a
steady stream of pulls without one failed pull; the authorize hook answers
401 with a challenge, 403 and 200 as the policy says (Basic with bcrypt
htpasswd, Bearer token lists); a credential set chosen by authorize is the
account regfacade pulls with; req.ctx flows from authorize to resolve to the
log hook, which runs after the response and cannot change it.
"""
import base64
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest

from fake_upstream import ALL_MANIFEST_TYPES, FakeUpstream, request, sha256_digest, wait_until
from harness import ROOT, Regfacade, free_port

ACCEPT = ", ".join(ALL_MANIFEST_TYPES)


def write(path, text):
    # Written whole in one go: the file watch never sees half a policy
    # because it compares the result of stat, then compiles what it reads;
    # a half-written file would only be a rejected generation.
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def manifest(rf, repo, tag="v1", headers=None, conn=None):
    h = {"Accept": ACCEPT}
    h.update(headers or {})
    if conn is None:
        return request(rf.host, "GET", f"/v2/{repo}/manifests/{tag}", h)
    conn.request("GET", f"/v2/{repo}/manifests/{tag}", headers=h)
    r = conn.getresponse()
    return r.status, r.read()


def full_log(rf):
    """The whole log (full_log(rf) is its tail; the streams fill it with access lines)."""
    with open(rf.proc.log_path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def scrape(host):
    r = request(host, "GET", "/metrics")
    assert r.status == 200, r
    out = {}
    for line in r.body.decode().splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            out[name_labels] = float(value)
    return out


class Stream:
    """Threads pulling manifests over keep-alive connections until stopped;
    every answer that is not 200 with the expected digest is a failure."""

    def __init__(self, rf, repo, digest, threads=4):
        self.rf, self.repo, self.digest = rf, repo, digest
        self.ok = 0
        self.failures = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.rf.port, timeout=30)
        while not self.stop.is_set():
            try:
                status, body = manifest(self.rf, self.repo, conn=conn)
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.rf.port, timeout=30)
                continue
            with self.lock:
                if status == 200 and sha256_digest(body) == self.digest:
                    self.ok += 1
                else:
                    self.failures.append(f"{status} {body[:200]!r}")
        conn.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        assert wait_until(lambda: self.ok > 20, timeout=10), self.failures[:3]
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def count(self):
        with self.lock:
            return self.ok


# ---------------------------------------------------------------------------
# escapes
# ---------------------------------------------------------------------------

ESCAPE_POLICY = r"""
local regfacade = require "regfacade"

local ESCAPES = {
    execute = function() return os.execute("touch PWNED") end,
    popen = function() return io.popen("id"):read("a") end,
    shadow = function() return assert(io.open("/etc/shadow")):read("a") end,
    read_file = function() return regfacade.read_file("/etc/shadow") end,
    climb = function() return regfacade.read_file("data/../../../../../../etc/passwd") end,
    memory = function() local t = {} for i = 1, 1e9 do t[i] = { i, i, i } end end,
    rep = function() return string.rep("x", 2 ^ 40) end,
    concat = function() local s = "x" while true do s = s .. s end end,
    loop = function() while true do end end,
    pcall_loop = function() while true do pcall(function() while true do end end) end end,
    recursion = function() local function f(n) return 1 + f(n + 1) end return f(1) end,
    cstack = function()
        local function f() local ok, e = pcall(f) if not ok then error(e, 0) end end
        f()
    end,
    gsub = function() local function f(s) return (s:gsub(".", f)) end return f("ab") end,
    coroutine = function()
        local co = coroutine.wrap(function() while true do pcall(coroutine.yield) end end)
        while true do pcall(co) end
    end,
    metatable = function() getmetatable("").__index.upper = function() return "pwned" end end,
    gc = function() setmetatable({}, { __gc = function() while true do end end }) end,
    debug = function() return debug.getregistry() end,
    global = function() counter = (rawget(_G, "counter") or 0) + 1 end,
    library = function() string.upper = function() return "pwned" end end,
    module = function() require("regfacade.mirror").resolve = function() return { upstream = "fake" } end end,
    bytecode = function() return load(string.dump(function() end)) end,
    binary = function() return assert(load("\27Lua\84\0", "x", "b"))() end,
    loadlib = function() return package.loadlib("libc.so.6", "system") end,
    collect = function() collectgarbage("stop") end,
}

return {
    resolve = function(req)
        local name = req.repository:match("^evil/(.+)$")
        if name then
            local escape = ESCAPES[name]
            if not escape then
                return nil, "no escape " .. name
            end
            escape()
            return nil, "escape " .. name .. " returned"
        end
        -- What the escapes tried to change is unchanged for everyone else.
        assert(("abc"):upper() == "ABC", "string.upper was changed")
        assert(rawget(_G, "counter") == nil, "a global survived")
        return { upstream = "fake" }
    end,
}
"""

ESCAPE_NAMES = ["execute", "popen", "shadow", "read_file", "climb", "memory", "rep", "concat", "loop", "pcall_loop",
                "recursion", "cstack", "gsub", "coroutine", "metatable", "gc", "debug", "global", "library", "module",
                "bytecode", "binary", "loadlib", "collect"]
STOPPED_BY_BUDGET = {"memory", "concat", "loop", "pcall_loop", "coroutine"}


def test_each_escape_fails_closed_while_the_server_keeps_serving(procs, tmp_path, fake_upstream):
    img = fake_upstream.add_image("good/app", "v1")
    os.makedirs(tmp_path / "data")
    write(tmp_path / "data" / "ok.txt", "fine")
    write(tmp_path / "policy.lua", ESCAPE_POLICY)
    metrics_port = free_port()
    rf = Regfacade(procs, str(tmp_path), {
        "upstreams": {"fake": {"url": fake_upstream.url}},
        "cache": {"dir": str(tmp_path / "cache"), "tag_ttl_seconds": 3600},
        "policy": {"file": "policy.lua", "data_dir": "data", "hook_time_ms": 20000,
                   "hook_instructions": 20000000, "memory_bytes": 32 * 1024 * 1024},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }).start()
    metrics = f"127.0.0.1:{metrics_port}"
    assert manifest(rf, "good/app").status == 200
    before = scrape(metrics)
    with Stream(rf, "good/app", img.digest) as stream:
        for name in ESCAPE_NAMES:
            seen = stream.count()
            r = manifest(rf, f"evil/{name}")
            assert r.status == 500, f"{name}: {r!r}"
            err = r.json()["errors"][0]
            assert err["code"] == "UNKNOWN", (name, err)
            assert "resolve hook" in err["message"], (name, err)
            # Others were served while (and after) this one failed.
            assert wait_until(lambda: stream.count() > seen + 5, timeout=10), name
        assert rf.proc.poll() is None, "the server died"
    assert not stream.failures, stream.failures[:5]
    assert not os.path.exists(tmp_path / "PWNED") and not os.path.exists(tmp_path / "cache" / "PWNED")
    log = full_log(rf)
    # One log line per escape, with the policy's file and line.
    policy_path = str(tmp_path / "policy.lua")
    for name in ESCAPE_NAMES:
        line = next((l for l in log.splitlines() if "policy resolve hook failed" in l and f"evil/{name}" in l), None)
        assert line, f"no log line for {name}"
        if name not in ("memory",):
            # (Lua shortens long chunk names from the left: "...t/policy.lua:12:")
            assert re.search(r"policy\.lua:\d+:", line), (name, line)
    assert "exceeded its instruction budget (20000000 instructions, policy.hook_instructions)" in log
    assert "its Lua state is closed and rebuilt" in log
    after = scrape(metrics)
    kills = after.get('regfacade_policy_budget_kills_total{hook="resolve"}', 0) - \
        before.get('regfacade_policy_budget_kills_total{hook="resolve"}', 0)
    errors = after.get('regfacade_policy_errors_total{hook="resolve"}', 0) - \
        before.get('regfacade_policy_errors_total{hook="resolve"}', 0)
    assert kills >= len(STOPPED_BY_BUDGET), (kills, errors)
    assert kills + errors >= len(ESCAPE_NAMES), (kills, errors)
    # And the good path is still right afterwards (fresh states included).
    for _ in range(20):
        assert manifest(rf, "good/app").status == 200


def test_a_broken_policy_never_starts(procs, tmp_path, fake_upstream):
    write(tmp_path / "policy.lua", "return {\n  resolve = function(req)\n    answer = 1\n  end,\n  x = \n}\n")
    cfg = tmp_path / "rf.json"
    cfg.write_text(json.dumps({"upstreams": {"fake": {"url": fake_upstream.url}},
                               "cache": {"dir": str(tmp_path / "cache")}, "policy": {"file": "policy.lua"}}))
    from harness import REGFACADE
    r = subprocess.run([REGFACADE, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    # The policy's path, then the Lua message (its chunk name relative to the config).
    assert str(tmp_path / "policy.lua") in r.stderr and "policy.lua:6: unexpected symbol" in r.stderr, r.stderr
    write(tmp_path / "policy.lua", "undefined_helper()\nreturn {}\n")
    r = subprocess.run([REGFACADE, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "policy.lua:1: undefined global 'undefined_helper'" in r.stderr, r.stderr
    write(tmp_path / "policy.lua", "return { resolve = 'x' }\n")
    r = subprocess.run([REGFACADE, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and 'hook "resolve" must be a function, got string' in r.stderr, r.stderr
    write(tmp_path / "policy.lua", "return { self_check = function() return false, 'no data' end }\n")
    r = subprocess.run([REGFACADE, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "self_check failed" in r.stderr and "no data" in r.stderr, r.stderr
    cfg.write_text(json.dumps({"upstreams": {"fake": {"url": fake_upstream.url}},
                               "cache": {"dir": str(tmp_path / "cache")},
                               "policy": {"file": "policy.lua", "hook_time_ms": 0}}))
    r = subprocess.run([REGFACADE, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "policy.hook_time_ms: must be an integer from 1 to 60000" in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# reload
# ---------------------------------------------------------------------------

def versioned(target):
    """A policy: stream/app is acme/app; probe/app is `target`."""
    return f"""
local regfacade = require "regfacade"
return {{
    self_check = function()
        return regfacade.config.upstreams.fake ~= nil, "no upstream fake"
    end,
    resolve = function(req)
        if req.repository == "probe/app" then
            return {{ upstream = "fake", repository = "{target}" }}
        end
        return {{ upstream = "fake", repository = "acme/app" }}
    end,
}}
"""


def test_reload_good_broken_good_under_a_stream_of_pulls(procs, tmp_path, fake_upstream):
    app = fake_upstream.add_image("acme/app", "v1")
    one = fake_upstream.add_image("acme/one", "v1")
    two = fake_upstream.add_image("acme/two", "v1")
    three = fake_upstream.add_image("acme/three", "v1")
    policy = tmp_path / "policy.lua"
    write(policy, versioned("acme/one"))
    rf = Regfacade(procs, str(tmp_path), {
        "upstreams": {"fake": {"url": fake_upstream.url}},
        "cache": {"dir": str(tmp_path / "cache"), "tag_ttl_seconds": 0},
        "policy": {"file": "policy.lua"},
    }).start()

    def probe():
        r = manifest(rf, "probe/app")
        return sha256_digest(r.body) if r.status == 200 else r.status

    assert probe() == one.digest
    with Stream(rf, "stream/app", app.digest, threads=6) as stream:
        # A syntax error: rejected, generation 1 keeps serving.
        write(policy, versioned("acme/two").replace("return {", "return {{", 1))
        assert wait_until(lambda: full_log(rf).count("policy reload rejected") >= 1, timeout=10), full_log(rf)[-2000:]
        assert "policy.lua:" in full_log(rf).split("policy reload rejected")[-1]
        assert probe() == one.digest
        # A good one: taken by the file watch (at most a second later).
        write(policy, versioned("acme/two"))
        assert wait_until(lambda: probe() == two.digest, timeout=10), full_log(rf)[-2000:]
        assert "generation 2 serving (the policy file changed)" in full_log(rf)
        # One whose self_check fails: rejected too.
        write(policy, versioned("acme/three").replace('regfacade.config.upstreams.fake ~= nil',
                                                      'regfacade.config.upstreams.nope ~= nil'))
        assert wait_until(lambda: full_log(rf).count("policy reload rejected") >= 2, timeout=10)
        assert "self_check failed" in full_log(rf).split("policy reload rejected")[-1]
        assert probe() == two.digest
        # A runtime error at load: rejected.
        write(policy, "local x = nil\nx.y = 1\nreturn {}\n")
        assert wait_until(lambda: full_log(rf).count("policy reload rejected") >= 3, timeout=10)
        assert probe() == two.digest
        # Good again, this time by SIGHUP (the whole config is reloaded).
        write(policy, versioned("acme/three"))
        rf.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: probe() == three.digest, timeout=10), full_log(rf)[-2000:]
        time.sleep(0.5)
    assert not stream.failures, stream.failures[:5]
    assert stream.count() > 100
    assert rf.proc.poll() is None


# ---------------------------------------------------------------------------
# authorize
# ---------------------------------------------------------------------------

def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def auth_facade(procs, tmp_path, fake_upstream):
    """regfacade running examples/auth/policy.lua with a fresh htpasswd
    (alice, bcrypt) and token list (one token for ci-bot)."""
    img = fake_upstream.add_image("acme/app", "v1")
    shutil.copy(os.path.join(ROOT, "examples", "auth", "policy.lua"), tmp_path / "policy.lua")
    lines = [subprocess.run(["htpasswd", "-Bbn", user, pw], capture_output=True, text=True, check=True).stdout.strip()
             for user, pw in (("alice", "s3cret-alice"), ("bob", "s3cret-bob"))]
    write(tmp_path / "htpasswd", "\n".join(lines) + "\n")
    write(tmp_path / "tokens", f"{sha256_digest(b'tok-ci-123')} ci-bot\n")
    rf = Regfacade(procs, str(tmp_path), {
        "upstreams": {"fake": {"url": fake_upstream.url}},
        "cache": {"dir": str(tmp_path / "cache")},
        "policy": {"file": "policy.lua", "data_files": ["htpasswd", "tokens"],
                   "options": {"htpasswd": "htpasswd", "tokens": "tokens", "max_failures": 5,
                               "realm": "test-facade"}},
    }).start()
    rf.img = img
    return rf


def test_authorize_basic_and_bearer(auth_facade):
    rf = auth_facade
    # No credentials: 401 with the challenge, on the ping and on a pull.
    for path in ("/v2/", "/v2/acme/app/manifests/v1"):
        r = request(rf.host, "GET", path, {"Accept": ACCEPT})
        assert r.status == 401, r
        assert r.header("WWW-Authenticate") == 'Basic realm="test-facade"', r
        assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    # Wrong password, unknown user: 401 again.
    assert manifest(rf, "acme/app", headers=basic("alice", "nope")).status == 401
    assert manifest(rf, "acme/app", headers=basic("mallory", "s3cret-alice")).status == 401
    # Right: 200 (ping and pull), twice (the second from the remembered digest).
    assert request(rf.host, "GET", "/v2/", basic("alice", "s3cret-alice")).status == 200
    for _ in range(2):
        r = manifest(rf, "acme/app", headers=basic("alice", "s3cret-alice"))
        assert r.status == 200 and sha256_digest(r.body) == rf.img.digest, r
    blob = request(rf.host, "GET", f"/v2/acme/app/blobs/{rf.img.layers[0].digest}", basic("alice", "s3cret-alice"))
    assert blob.status == 200 and blob.body == rf.img.layers[0].data
    # Bearer: a listed token is in, another is not.
    assert manifest(rf, "acme/app", headers={"Authorization": "Bearer tok-ci-123"}).status == 200
    r = manifest(rf, "acme/app", headers={"Authorization": "Bearer tok-guess"})
    assert r.status == 401 and "unknown token" in r.json()["errors"][0]["message"]
    # The log hook named the clients; no secret reached the log.
    log = full_log(rf)
    assert wait_until(lambda: "pull by ci-bot: GET manifest acme/app -> 200" in full_log(rf), timeout=5)
    assert "pull by alice: GET manifest acme/app -> 200" in full_log(rf)
    assert "pull by anonymous: GET ping /v2/ -> 401" in full_log(rf)
    for secret in ("s3cret-alice", "tok-ci-123", "tok-guess"):
        assert secret not in log


def test_authorize_too_many_wrong_passwords(auth_facade):
    rf = auth_facade
    for _ in range(5):
        assert manifest(rf, "acme/app", headers=basic("alice", "guess")).status == 401
    r = manifest(rf, "acme/app", headers=basic("alice", "s3cret-alice"))
    assert r.status == 429 and r.json()["errors"][0]["code"] == "TOOMANYREQUESTS", r
    assert 1 <= int(r.headers["Retry-After"]) <= 60, dict(r.headers)


def test_wrong_passwords_for_one_user_do_not_lock_out_another(auth_facade):
    """Every process on a node comes from 127.0.0.1: the failure counter is
    per user and address, so a client guessing alice's password (or a
    misconfigured one retrying) does not lock bob out."""
    rf = auth_facade
    for _ in range(12):  # well past max_failures (5)
        assert manifest(rf, "acme/app", headers=basic("alice", "guess")).status in (401, 429)
    r = manifest(rf, "acme/app", headers=basic("alice", "s3cret-alice"))
    assert r.status == 429, r
    r = manifest(rf, "acme/app", headers=basic("bob", "s3cret-bob"))
    assert r.status == 200 and sha256_digest(r.body) == rf.img.digest, r
    # and bob's own failures count for bob alone
    assert manifest(rf, "acme/app", headers=basic("bob", "guess")).status == 401
    assert manifest(rf, "acme/app", headers=basic("bob", "s3cret-bob")).status == 200


def test_authorize_with_a_real_client(auth_facade, tmp_path):
    rf = auth_facade
    skopeo = shutil.which("skopeo")
    if not skopeo:
        pytest.skip("skopeo is not installed")
    ref = f"docker://{rf.host}/acme/app:v1"
    bad = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", ref], capture_output=True, timeout=60)
    assert bad.returncode != 0
    ok = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", "--creds", "alice:s3cret-alice", ref],
                        capture_output=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert sha256_digest(ok.stdout) == rf.img.digest


CTX_POLICY = """
local regfacade = require "regfacade"
return {
    authorize = function(req)
        if req.repository == "deny/app" then return false, "not this one" end
        if req.repository == "other/app" then return { status = 404, code = "NAME_UNKNOWN", message = "hidden" } end
        req.ctx.tenant = "t-" .. (req.client.user or "anon")
        req.ctx.seen = { "authorize" }
        return true
    end,
    resolve = function(req)
        if req.kind ~= "ping" and req.ctx.tenant == nil then error("ctx lost between hooks") end
        req.ctx.seen[#req.ctx.seen + 1] = "resolve"
        return { upstream = "fake" }
    end,
    log = function(req, res)
        regfacade.log("info", string.format("ctx %s %s %s %d %s", req.repository or "-", req.ctx.tenant or "-",
            table.concat(req.ctx.seen or { "-" }, ">"), res.status, tostring(req.client.password)))
        if req.repository == "acme/app" then error("the log hook fails: only logged") end
    end,
}
"""


def test_ctx_flows_through_the_hooks_and_log_runs_after(procs, tmp_path, fake_upstream):
    img = fake_upstream.add_image("acme/app", "v1")
    write(tmp_path / "policy.lua", CTX_POLICY)
    rf = Regfacade(procs, str(tmp_path), {
        "upstreams": {"fake": {"url": fake_upstream.url}},
        "cache": {"dir": str(tmp_path / "cache")},
        "policy": {"file": "policy.lua"},
    }).start()
    r = manifest(rf, "acme/app", headers=basic("carol", "pw"))
    assert r.status == 200 and sha256_digest(r.body) == img.digest, r
    assert wait_until(lambda: "ctx acme/app t-carol authorize>resolve 200 nil" in full_log(rf), timeout=5), full_log(rf)
    assert "policy log hook failed" in full_log(rf)
    r = manifest(rf, "deny/app")
    assert r.status == 403 and r.json()["errors"][0] == {"code": "DENIED", "message": "not this one",
                                                         "detail": {}}, r
    r = manifest(rf, "other/app")
    assert r.status == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert wait_until(lambda: "ctx deny/app - - 403 nil" in full_log(rf), timeout=5)


def test_credential_set_chosen_by_authorize(procs, tmp_path, htpasswd_registry):
    """upstreams.NAME.credentials.SET: a client token maps to an upstream
    account; without it the same pull has no credentials upstream."""
    from conftest import HTPASSWD_PASSWORD, HTPASSWD_USER
    info = htpasswd_registry.images["oci"]
    write(tmp_path / "upstream-password", HTPASSWD_PASSWORD)
    write(tmp_path / "policy.lua", """
return {
    authorize = function(req)
        if req.client.token == "tok-team" then return { credentials = "team" } end
        return true
    end,
}
""")
    rf = Regfacade(procs, str(tmp_path), {
        "upstreams": {"private": {"url": htpasswd_registry.url, "credentials": {
            "team": {"username": HTPASSWD_USER, "password_file": "upstream-password"}}}},
        "cache": {"dir": str(tmp_path / "cache")},
        "policy": {"file": "policy.lua"},
    }).start()
    anon = manifest(rf, info["repo"], info["tag"])
    assert anon.status in (401, 403), anon
    r = manifest(rf, info["repo"], info["tag"], headers={"Authorization": "Bearer tok-team"})
    assert r.status == 200, f"{r!r}\n{full_log(rf)[-3000:]}"
    assert sha256_digest(r.body) == info["manifest_digest"]
    assert "tok-team" not in full_log(rf)
