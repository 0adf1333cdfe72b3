"""regfacade authenticating to real upstreams (CONTRACT.md):

- htpasswd (HTTP Basic) registry, credentials from `username` +
  `password_file`, or from a Docker config.json (`docker_config`, auths keyed
  by host:port); no credentials -> the pull fails with an OCI error (401
  UNAUTHORIZED or 403 DENIED); wrong credentials -> 403 DENIED.
- Bearer token registry (distribution's token auth, our token server):
  pulls succeed; the token is cached: one token request per scope across two
  pulls of the same repository.
"""
import base64
import collections
import hashlib
import json
import os
import re

import pytest

import clients
from conftest import HTPASSWD_PASSWORD, HTPASSWD_USER, TOKEN_PASSWORD, TOKEN_USER
from clients import assert_cached, check_copied_layout, diag, start_facade


def write_secret(tmp_path, name, value):
    p = tmp_path / name
    p.write_text(value)
    os.chmod(p, 0o600)
    return str(p)


def manifest_request(rf, info, tag=None):
    return clients.http_request(
        f"{rf.url}/v2/{info['repo']}/manifests/{tag or info['tag']}",
        headers={"Accept": clients.MANIFEST_ACCEPT})


def copy_through(rf, info, tmp_path, tag=None, out="copy"):
    tag = tag or info["tag"]
    ref = f"{rf.host}/{info['repo']}:{tag}"
    raw = clients.skopeo_inspect(ref, raw=True, check=False)
    assert isinstance(raw, bytes), f"inspect failed: {raw.stderr}\n{diag(rf)}"
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == info["manifest_digest"]
    d = str(tmp_path / out)
    r = clients.skopeo_copy(f"docker://{ref}", f"oci:{d}:{tag}", extra=["--preserve-digests"],
                            check=False)
    assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
    check_copied_layout(d, tag, info, preserved=True)


def assert_auth_error(resp, rf, allowed=("UNAUTHORIZED", "DENIED")):
    assert resp.status in (401, 403), f"{resp!r}\n{diag(rf)}"
    codes = resp.error_codes()
    assert codes, f"no OCI error JSON: {resp!r}"
    want = "DENIED" if resp.status == 403 else "UNAUTHORIZED"
    assert want in allowed, f"{resp!r}"
    assert codes[0] == want, f"status {resp.status} wants code {want}: {resp!r}"


# ---------------------------------------------------------------------------
# htpasswd (Basic)
# ---------------------------------------------------------------------------

def test_htpasswd_upstream_with_password_file(procs, tmp_path, htpasswd_registry):
    info = htpasswd_registry.images["oci"]
    pw = write_secret(tmp_path, "upstream-password", HTPASSWD_PASSWORD)
    rf = start_facade(procs, tmp_path, {"private": {
        "url": htpasswd_registry.url, "username": HTPASSWD_USER, "password_file": pw}})
    copy_through(rf, info, tmp_path)
    assert_cached(rf, info)


def test_htpasswd_upstream_without_credentials_fails_clearly(procs, tmp_path, htpasswd_registry):
    info = htpasswd_registry.images["oci"]
    rf = start_facade(procs, tmp_path, {"private": {"url": htpasswd_registry.url}})
    resp = manifest_request(rf, info)
    assert_auth_error(resp, rf)
    blob = clients.http_request(f"{rf.url}/v2/{info['repo']}/blobs/{info['layers'][0]['digest']}")
    assert_auth_error(blob, rf)
    r = clients.skopeo_copy(f"docker://{rf.host}/{info['repo']}:{info['tag']}",
                            f"oci:{tmp_path / 'copy'}:x", check=False)
    assert r.returncode != 0
    assert not os.path.exists(clients.cache_blob_path(rf.cache_dir, info["layers"][0]["digest"]))


def test_htpasswd_upstream_wrong_password_is_denied(procs, tmp_path, htpasswd_registry):
    info = htpasswd_registry.images["oci"]
    pw = write_secret(tmp_path, "upstream-password", "not-the-password")
    rf = start_facade(procs, tmp_path, {"private": {
        "url": htpasswd_registry.url, "username": HTPASSWD_USER, "password_file": pw}})
    resp = manifest_request(rf, info)
    # CONTRACT.md: upstream refusing our credentials (401/403 after auth) -> 403 DENIED.
    assert resp.status == 403, f"{resp!r}\n{diag(rf)}"
    assert resp.error_codes()[:1] == ["DENIED"], f"{resp!r}"


def test_htpasswd_upstream_with_docker_config(procs, tmp_path, htpasswd_registry):
    info = htpasswd_registry.images["oci"]
    auth = base64.b64encode(f"{HTPASSWD_USER}:{HTPASSWD_PASSWORD}".encode()).decode()
    cfg = tmp_path / "docker-config.json"
    cfg.write_text(json.dumps({"auths": {
        "registry.invalid:5000": {"auth": base64.b64encode(b"x:y").decode()},
        htpasswd_registry.host: {"auth": auth},
    }}))
    os.chmod(cfg, 0o600)
    rf = start_facade(procs, tmp_path, {"private": {"url": htpasswd_registry.url}},
                      docker_config=str(cfg))
    copy_through(rf, info, tmp_path)
    assert_cached(rf, info)


# ---------------------------------------------------------------------------
# Bearer token
# ---------------------------------------------------------------------------

def upstream_requests(registry, path):
    """(method, status) of the upstream's access-log lines for path."""
    with open(registry.proc.log_path, "rb") as f:
        log = f.read().decode("utf-8", "replace")
    pat = re.compile(r'"(GET|HEAD) ' + re.escape(path) + r'(?:\?[^ ]*)? HTTP/1\.1" (\d{3})')
    return [(m.group(1), int(m.group(2))) for m in pat.finditer(log)]


def test_token_upstream_pull_and_token_cached(procs, tmp_path, token_registry, token_server):
    info = token_registry.images["oci"]
    info2 = token_registry.images["oci-v2"]
    pw = write_secret(tmp_path, "upstream-password", TOKEN_PASSWORD)
    token_server.reset()
    rf = start_facade(procs, tmp_path, {"tok": {
        "url": token_registry.url, "username": TOKEN_USER, "password_file": pw}})

    # Pull 1: manifest by tag, config and layer blobs, each cold (upstream).
    copy_through(rf, info, tmp_path, out="copy1")
    assert_cached(rf, info)
    # Pull 2 of the same repository: another tag, so the manifest comes from upstream again.
    copy_through(rf, info2, tmp_path, tag="v2", out="copy2")
    v2 = upstream_requests(token_registry, f"/v2/{info['repo']}/manifests/v2")
    assert any(s == 200 for _, s in v2), \
        f"regfacade never fetched manifests/v2 from upstream with a token: {v2}\n{diag(rf)}"

    reqs = token_server.token_requests()
    assert reqs, f"regfacade never asked the token server\n{diag(rf)}"
    assert all(r["status"] == 200 and r["user"] == TOKEN_USER for r in reqs), reqs
    assert all(r["service"] == token_server.service for r in reqs), reqs
    per_scope = collections.Counter(tuple(sorted(r["scopes"])) for r in reqs)
    repeated = {s: n for s, n in per_scope.items() if n > 1}
    assert not repeated, f"token not cached, requests per scope: {dict(per_scope)}\n{diag(rf)}"
    pull_scope = f"repository:{info['repo']}:pull"
    assert any(pull_scope in s for s in per_scope), f"no pull scope requested: {dict(per_scope)}"


@pytest.mark.parametrize("password", [None, "not-the-password"], ids=["no-creds", "wrong-password"])
def test_token_upstream_refused(password, procs, tmp_path, token_registry, token_server):
    info = token_registry.images["oci"]
    up = {"url": token_registry.url}
    if password is not None:
        up.update(username=TOKEN_USER, password_file=write_secret(tmp_path, "pw", password))
    rf = start_facade(procs, tmp_path, {"tok": up})
    resp = manifest_request(rf, info)
    if password is None:
        # Anonymous token without access: the pull fails with an auth error.
        assert_auth_error(resp, rf)
    else:
        # The token server refuses our credentials -> 403 DENIED.
        assert resp.status == 403, f"{resp!r}\n{diag(rf)}"
        assert resp.error_codes()[:1] == ["DENIED"], f"{resp!r}"
