"""regfacade asking credential helpers and using identity tokens (CONTRACT.md,
README "Upstream credentials"):

- `credsStore` / `credHelpers` of the Docker config and per-upstream
  `credential_helper`: `docker-credential-NAME get` (found on PATH, or a
  path), the server URL on stdin, JSON on stdout; "credentials not found in
  native keychain" means anonymous. The answer is kept for
  credential_cache_seconds and asked again after the upstream refuses it.
- `identitytoken` in auths, or a helper answering Username "<token>": the
  OAuth2 refresh-token grant (POST) at the token realm, against a token
  server that refuses password grants.
- a helper that hangs, fails or prints garbage: 502 naming the helper, a log
  line, no secret anywhere, and everyone else still served.

The helpers are shell scripts this file writes; each logs its calls.
"""
import json
import os
import subprocess
import threading
import time

import pytest

import clients
import harness
import images
import registries
from conftest import HTPASSWD_PASSWORD, HTPASSWD_USER, TOKEN_PASSWORD, TOKEN_USER
from clients import assert_cached, check_copied_layout, diag, start_facade

HELPER_SCRIPT = r'''#!/bin/sh
# A docker-credential-helpers program written by the test: its answer comes
# from the files in STATE (mode, user, secret); every call is logged.
d='STATE'
[ "$1" = get ] || { echo "unsupported command: $1"; exit 2; }
url=$(cat)
echo "$url" >> "$d/calls"
env | cut -d= -f1 | sort | tr '\n' ' ' > "$d/env"
case "$(cat "$d/mode")" in
  ok) printf '{"ServerURL":"%s","Username":"%s","Secret":"%s"}\n' "$url" "$(cat "$d/user")" "$(cat "$d/secret")" ;;
  notfound) echo "credentials not found in native keychain"; exit 1 ;;
  fail) echo "the keychain is locked"; exit 3 ;;
  garbage) echo "Secret: $(cat "$d/secret") (not JSON)" ;;
  hang) sleep 600 & echo $! > "$d/pid"; wait ;;
esac
'''

REFRESH_TOKEN = "rf-refresh-token-7f3a91"


class Helper:
    """docker-credential-NAME in bindir, answering as set()."""

    def __init__(self, bindir, name, user=None, secret=None, mode="ok"):
        os.makedirs(bindir, exist_ok=True)
        self.name = name
        self.path = os.path.join(bindir, f"docker-credential-{name}")
        self.state = os.path.join(bindir, f"{name}.state")
        os.makedirs(self.state, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(HELPER_SCRIPT.replace("STATE", self.state))
        os.chmod(self.path, 0o755)
        self.set(mode, user, secret)

    def set(self, mode, user=None, secret=None):
        for key, value in (("mode", mode), ("user", user), ("secret", secret)):
            if value is not None:
                with open(os.path.join(self.state, key), "w") as f:
                    f.write(value)

    def calls(self):
        try:
            with open(os.path.join(self.state, "calls")) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def env_names(self):
        with open(os.path.join(self.state, "env")) as f:
            return set(f.read().split())

    def hung_pid(self):
        try:
            with open(os.path.join(self.state, "pid")) as f:
                return int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0


def path_env(bindir):
    return {"PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "RF_TEST_CANARY": "must-not-reach-a-helper"}


def write_docker_config(tmp_path, cfg):
    p = tmp_path / "docker-config.json"
    p.write_text(json.dumps(cfg))
    os.chmod(p, 0o600)
    return str(p)


def pull(rf, info, tmp_path, prefix="", tag=None, out="copy"):
    """skopeo copy through regfacade (optionally under /PREFIX/) and check
    the copy is the upstream image."""
    tag = tag or info["tag"]
    ref = f"{rf.host}/{prefix}{info['repo']}:{tag}"
    d = str(tmp_path / out)
    r = clients.skopeo_copy(f"docker://{ref}", f"oci:{d}:{tag}", extra=["--preserve-digests"],
                            check=False)
    assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
    check_copied_layout(d, tag, info, preserved=True)


def manifest(rf, info, prefix="", tag=None):
    return clients.http_request(f"{rf.url}/v2/{prefix}{info['repo']}/manifests/{tag or info['tag']}",
                                headers={"Accept": clients.MANIFEST_ACCEPT})


def assert_no_secret(rf, *secrets):
    with open(rf.proc.log_path, "rb") as f:
        log = f.read()
    for s in secrets:
        assert s.encode() not in log, f"secret {s!r} in the log\n{diag(rf)}"


def pid_gone(pid):
    """True when pid no longer runs (gone, or a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ---------------------------------------------------------------------------
# credsStore, credHelpers, credential_helper
# ---------------------------------------------------------------------------

def test_creds_store_helper_pulls_and_is_kept(procs, tmp_path, htpasswd_registry):
    info = htpasswd_registry.images["oci"]
    bindir = str(tmp_path / "bin")
    store = Helper(bindir, "rfstore", HTPASSWD_USER, HTPASSWD_PASSWORD)
    # The auths entry is the {} a credential store leaves behind.
    cfg = write_docker_config(tmp_path, {"auths": {htpasswd_registry.host: {}}, "credsStore": "rfstore"})
    rf = start_facade(procs, tmp_path, {"private": {"url": htpasswd_registry.url}}, docker_config=cfg,
                      env=path_env(bindir))
    assert store.calls() == [], "a helper must be asked on demand, not at start"
    pull(rf, info, tmp_path)
    assert_cached(rf, info)
    # Manifest, config and layers all went upstream with one answer.
    assert store.calls() == [htpasswd_registry.host], f"{store.calls()}\n{diag(rf)}"
    env = store.env_names()
    assert "RF_TEST_CANARY" not in env and "PATH" in env and "HOME" in env, env
    assert env <= {"PATH", "HOME", "PWD", "SHLVL", "_", "OLDPWD"}, f"helper environment not minimal: {env}"
    assert_no_secret(rf, HTPASSWD_PASSWORD)


def test_credential_cache_seconds_zero_asks_every_time(procs, tmp_path, htpasswd_registry):
    info = htpasswd_registry.images["oci"]
    bindir = str(tmp_path / "bin")
    store = Helper(bindir, "rfstore", HTPASSWD_USER, HTPASSWD_PASSWORD)
    cfg = write_docker_config(tmp_path, {"credsStore": "rfstore"})
    rf = start_facade(procs, tmp_path, {"private": {"url": htpasswd_registry.url}}, docker_config=cfg,
                      env=path_env(bindir), upstream_client={"credential_cache_seconds": 0})
    pull(rf, info, tmp_path)
    # Manifest, config and each layer: every upstream request asked anew.
    want = 2 + len(info["layers"])
    assert len(store.calls()) >= want, f"{store.calls()} (want at least {want})\n{diag(rf)}"


def test_cred_helpers_per_host(procs, tmp_path, htpasswd_registry, plain_registry):
    info = htpasswd_registry.images["oci"]
    plain = plain_registry.images["oci"]
    other = htpasswd_registry.clone(procs, str(tmp_path / "reg-clone"), name="registry-htpasswd-2")
    bindir = str(tmp_path / "bin")
    one = Helper(bindir, "rfone", HTPASSWD_USER, HTPASSWD_PASSWORD)
    two = Helper(bindir, "rftwo", HTPASSWD_USER, HTPASSWD_PASSWORD)
    store = Helper(bindir, "rfstore", mode="notfound")  # no credentials: anonymous
    cfg = write_docker_config(tmp_path, {
        "credHelpers": {htpasswd_registry.host: "rfone", f"http://{other.host}/": "rftwo"},
        "credsStore": "rfstore",
    })
    rf = start_facade(procs, tmp_path, {
        "one": {"url": htpasswd_registry.url},
        "two": {"url": other.url},
        "plain": {"url": plain_registry.url},
    }, default_upstream="one", docker_config=cfg, env=path_env(bindir))
    pull(rf, info, tmp_path, prefix="one/", out="c1")
    pull(rf, info, tmp_path, prefix="two/", out="c2")
    pull(rf, plain, tmp_path, prefix="plain/", out="c3")
    assert one.calls() == [htpasswd_registry.host], one.calls()
    assert two.calls() == [other.host], two.calls()
    # The plain registry never asks for credentials: neither is the store.
    assert store.calls() == [], store.calls()


def test_helper_without_credentials_is_anonymous(procs, tmp_path, htpasswd_registry):
    info = htpasswd_registry.images["oci"]
    helper = Helper(str(tmp_path / "bin"), "rfnone", mode="notfound")
    rf = start_facade(procs, tmp_path, {"private": {"url": htpasswd_registry.url,
                                                    "credential_helper": helper.path}})
    resp = manifest(rf, info)
    assert resp.status in (401, 403), f"{resp!r}\n{diag(rf)}"
    assert resp.error_codes()[:1] in (["UNAUTHORIZED"], ["DENIED"]), resp
    assert helper.calls() == [htpasswd_registry.host]


def test_helper_asked_again_after_the_password_changed(procs, tmp_path, built_images):
    reg = registries.start_registry(procs, str(tmp_path / "reg"), name="registry-rotating",
                                    mode="htpasswd", username="rf-carol", password="first-pass-31")
    v1 = images.push_image(built_images, "oci", reg.host, creds=reg.creds, tag="v1")
    v2 = images.push_image(built_images, "oci", reg.host, creds=reg.creds, tag="v2")
    helper = Helper(str(tmp_path / "bin"), "rfrotate", "rf-carol", "first-pass-31")
    rf = start_facade(procs, tmp_path, {"rot": {"url": reg.url, "credential_helper": helper.path,
                                                "credential_cache_seconds": 3600}})
    pull(rf, v1, tmp_path, out="c1")
    assert helper.calls() == [reg.host]
    # The password changes upstream and in the helper's store.
    reg.stop()
    reg.password = "second-pass-47"
    reg._write_config()
    reg.start()
    helper.set("ok", secret="second-pass-47")
    # v2's manifest goes upstream with the kept (old) password: refused,
    # the helper is asked again, the request retried with the new one.
    pull(rf, v2, tmp_path, tag="v2", out="c2")
    assert helper.calls() == [reg.host, reg.host], f"{helper.calls()}\n{diag(rf)}"
    assert_no_secret(rf, "first-pass-31", "second-pass-47")


# ---------------------------------------------------------------------------
# identity tokens (OAuth2 refresh-token grant)
# ---------------------------------------------------------------------------

@pytest.fixture
def refresh_only(procs, tmp_path, token_registry):
    """A token server that accepts only the refresh-token grant with
    REFRESH_TOKEN, and a registry (token_registry's storage) trusting it."""
    ts = registries.TokenServer(str(tmp_path / "refresh-token-server"), TOKEN_USER, TOKEN_PASSWORD,
                                refresh_tokens={REFRESH_TOKEN: TOKEN_USER}, password_grants=False).start()
    try:
        reg = token_registry.clone(procs, str(tmp_path / "reg-refresh"), name="registry-refresh",
                                   token_server=ts)
        yield ts, reg, token_registry.images["oci"]
    finally:
        ts.stop()


def check_refresh_grants(ts):
    reqs = ts.token_requests()
    assert reqs, "the token server was never asked"
    assert all(r["method"] == "POST" and r["grant_type"] == "refresh_token" for r in reqs), reqs
    assert all(r["client_id"] == "regfacade" and r["service"] == ts.service for r in reqs), reqs
    assert all(r["status"] == 200 and not r["basic"] for r in reqs), reqs


def test_password_grant_is_refused_by_the_refresh_only_server(procs, tmp_path, refresh_only):
    ts, reg, info = refresh_only
    pw = tmp_path / "pw"
    pw.write_text(TOKEN_PASSWORD)
    rf = start_facade(procs, tmp_path, {"tok": {"url": reg.url, "username": TOKEN_USER,
                                                "password_file": str(pw)}})
    resp = manifest(rf, info)
    assert resp.status == 403 and resp.error_codes()[:1] == ["DENIED"], f"{resp!r}\n{diag(rf)}"


def test_identity_token_in_auths(procs, tmp_path, refresh_only):
    ts, reg, info = refresh_only
    cfg = write_docker_config(tmp_path, {"auths": {reg.host: {"identitytoken": REFRESH_TOKEN}}})
    rf = start_facade(procs, tmp_path, {"tok": {"url": reg.url}}, docker_config=cfg)
    pull(rf, info, tmp_path)
    assert_cached(rf, info)
    check_refresh_grants(ts)
    assert_no_secret(rf, REFRESH_TOKEN)


def test_identity_token_from_a_helper(procs, tmp_path, refresh_only):
    ts, reg, info = refresh_only
    bindir = str(tmp_path / "bin")
    helper = Helper(bindir, "rftoken", "<token>", REFRESH_TOKEN)
    cfg = write_docker_config(tmp_path, {"credHelpers": {reg.host: "rftoken"}})
    rf = start_facade(procs, tmp_path, {"tok": {"url": reg.url}}, docker_config=cfg, env=path_env(bindir))
    pull(rf, info, tmp_path)
    check_refresh_grants(ts)
    assert helper.calls() == [reg.host]
    assert_no_secret(rf, REFRESH_TOKEN)


def test_refused_identity_token_asks_the_helper_once_more(procs, tmp_path, refresh_only):
    ts, reg, info = refresh_only
    helper = Helper(str(tmp_path / "bin"), "rfstale", "<token>", "a-revoked-refresh-token")
    rf = start_facade(procs, tmp_path, {"tok": {"url": reg.url, "credential_helper": helper.path}})
    resp = manifest(rf, info)
    assert resp.status == 403 and resp.error_codes()[:1] == ["DENIED"], f"{resp!r}\n{diag(rf)}"
    assert helper.calls() == [reg.host, reg.host], helper.calls()
    # The store gets the new token: the next pull works.
    helper.set("ok", secret=REFRESH_TOKEN)
    pull(rf, info, tmp_path)
    assert_no_secret(rf, REFRESH_TOKEN, "a-revoked-refresh-token")


# ---------------------------------------------------------------------------
# helpers that hang, fail or print garbage
# ---------------------------------------------------------------------------

def test_broken_helpers_give_clear_errors(procs, tmp_path, htpasswd_registry, plain_registry):
    info = htpasswd_registry.images["oci"]
    plain = plain_registry.images["oci"]
    secret = "the-real-secret-5521"
    helper = Helper(str(tmp_path / "bin"), "rfbroken", HTPASSWD_USER, secret, mode="hang")
    rf = start_facade(procs, tmp_path, {
        "private": {"url": htpasswd_registry.url, "credential_helper": helper.path},
        "plain": {"url": plain_registry.url},
    }, default_upstream="private", upstream_client={"credential_helper_timeout_ms": 3000})

    # Hangs: the request waits for the limit; everyone else is served meanwhile.
    result = {}
    t = threading.Thread(target=lambda: result.update(resp=manifest(rf, info)))
    t.start()
    deadline = time.time() + 60
    while not helper.hung_pid() and time.time() < deadline:
        time.sleep(0.05)
    hung = helper.hung_pid()
    assert hung, f"the helper never ran\n{diag(rf)}"
    other = manifest(rf, plain, prefix="plain/")
    assert other.status == 200, f"{other!r}\n{diag(rf)}"
    t.join(timeout=120)
    resp = result["resp"]
    assert resp.status == 502, f"{resp!r}\n{diag(rf)}"
    body = resp.body.decode()
    assert helper.path in body and "gave no answer within 3000 ms" in body, body
    assert helper.path in rf.log(), rf.log()
    # What it started went with it (its process group was killed).
    deadline = time.time() + 30
    while not pid_gone(hung) and time.time() < deadline:
        time.sleep(0.05)
    assert pid_gone(hung), f"the hung helper's child {hung} still runs"

    # Fails: its own message is shown.
    helper.set("fail")
    resp = manifest(rf, info)
    assert resp.status == 502, f"{resp!r}\n{diag(rf)}"
    assert helper.path in resp.body.decode() and "exited with status 3: the keychain is locked" in \
        resp.body.decode(), resp

    # Garbage holding the secret: refused without quoting it.
    helper.set("garbage")
    resp = manifest(rf, info)
    assert resp.status == 502, f"{resp!r}\n{diag(rf)}"
    assert "not JSON" in resp.body.decode() and secret not in resp.body.decode(), resp

    # Nothing of that was kept: once the helper works, so do pulls.
    helper.set("ok", secret=HTPASSWD_PASSWORD)
    pull(rf, info, tmp_path)
    assert clients.http_request(f"{rf.url}/v2/").status == 200
    assert rf.proc.poll() is None
    assert_no_secret(rf, secret, HTPASSWD_PASSWORD)


# ---------------------------------------------------------------------------
# regfacade check: a helper must exist and be executable (it is not run)
# ---------------------------------------------------------------------------

def run_check(tmp_path, upstreams, env=None, **extra):
    cfg = clients.facade_config(str(tmp_path / "cache"), upstreams, **extra)
    p = tmp_path / "check.json"
    p.write_text(json.dumps(cfg))
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run([harness.REGFACADE, "check", "--config", str(p)], capture_output=True, text=True,
                          timeout=30, env=full)


def test_check_verifies_helpers_without_running_them(tmp_path):
    bindir = str(tmp_path / "bin")
    helper = Helper(bindir, "rfcheck", "u", "p")
    url = "http://127.0.0.1:9"
    r = run_check(tmp_path, {"u": {"url": url, "credential_helper": "rfcheck"}}, env=path_env(bindir))
    assert r.returncode == 0, r.stderr
    cfg = write_docker_config(tmp_path, {"credsStore": "rfcheck"})
    r = run_check(tmp_path, {"u": {"url": url}}, env=path_env(bindir), docker_config=cfg)
    assert r.returncode == 0, r.stderr
    assert helper.calls() == [], "check must not run a helper"

    r = run_check(tmp_path, {"u": {"url": url, "credential_helper": "rf-missing"}})
    assert r.returncode != 0 and "upstreams.u: credential helper: docker-credential-rf-missing: not found on PATH" \
        in r.stderr, r.stderr
    cfg = write_docker_config(tmp_path, {"credHelpers": {"127.0.0.1:9": "rf-absent"}, "credsStore": "rfcheck"})
    r = run_check(tmp_path, {"u": {"url": url}}, env=path_env(bindir), docker_config=cfg)
    assert r.returncode != 0 and "docker-credential-rf-absent: not found on PATH" in r.stderr, r.stderr
    os.chmod(helper.path, 0o644)
    r = run_check(tmp_path, {"u": {"url": url, "credential_helper": helper.path}})
    assert r.returncode != 0 and "not executable" in r.stderr, r.stderr
    pw = tmp_path / "pw"
    pw.write_text("x")
    r = run_check(tmp_path, {"u": {"url": url, "credential_helper": helper.path, "username": "x",
                                   "password_file": str(pw)}})
    assert r.returncode != 0 and "exclude each other" in r.stderr, r.stderr
    r = run_check(tmp_path, {"u": {"url": url}}, upstream_client={"credential_cache_seconds": -1})
    assert r.returncode != 0 and "upstream_client.credential_cache_seconds" in r.stderr, r.stderr
