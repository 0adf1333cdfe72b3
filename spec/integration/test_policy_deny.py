"""One refusal for every hook: regfacade.deny(status, code, message,
{ retry_after =, challenge = }) returned by authorize, spec, resolve or
rewrite ends the request with that status, OCI error code and message, and
with Retry-After / WWW-Authenticate when given, as a real HTTP client sees
it; the older answer forms of each hook keep working; a malformed refusal
is a clear 500, and the server keeps serving the others.

The upstream is a real docker-registry (distribution) with htpasswd auth,
seeded with an OCI image built by umoci/skopeo (conftest.htpasswd_registry).
"""
import os
import shutil
import subprocess

import pytest

from fake_upstream import ALL_MANIFEST_TYPES, request, sha256_digest, wait_until
from harness import ROOT, Regfacade

ACCEPT = ", ".join(ALL_MANIFEST_TYPES)

POLICY = r"""
local regfacade = require "regfacade"
local deny = regfacade.deny

-- Made once in top-level code, returned by many requests.
local GONE = deny(410, "NAME_UNKNOWN", "this name is retired")

local function first(req)
    return (req.repository or ""):match("^([^/]+)/") or ""
end

return {
    authorize = function(req)
        local f = first(req)
        if f == "a429" then return deny(429, "TOOMANYREQUESTS", "authorize: slow down", { retry_after = 30 }) end
        if f == "a401" then
            return deny(401, "UNAUTHORIZED", "authorize: log in",
                        { challenge = 'Bearer realm="http://127.0.0.1:1/token",service="rf"' })
        end
        if f == "a401default" then return deny(401) end
        if f == "gone" then return GONE end
        if f == "afalse" then return false, deny(429, nil, "authorize: second value", { retry_after = 2 }) end
        -- the older forms
        if f == "old403" then return false, "old: not you" end
        if f == "olddeny" then return "deny" end
        if f == "old401" then return { status = 401, message = "old: log in", challenge = 'Basic realm="old"' } end
        if f == "old429" then return { status = 429, code = "TOOMANYREQUESTS", message = "old: slow" } end
        -- malformed refusals
        if f == "bad200" then return deny(200, "DENIED", "fine?") end
        if f == "badcode" then return { status = 403, code = "NOT_A_CODE" } end
        if f == "badretry" then return deny(429, "TOOMANYREQUESTS", "x", { retry_after = -5 }) end
        if f == "badopt" then return deny(429, "TOOMANYREQUESTS", "x", { retry = 5 }) end
        return true
    end,
    spec = function(req)
        if first(req) == "s451" then
            return deny(451, "DENIED", "spec: unavailable for legal reasons", { retry_after = 5 })
        end
        if first(req) == "oldspec" then return nil, "old: no such spec" end
        return nil
    end,
    resolve = function(req)
        local f = first(req)
        if f == "r404" then return deny(404, "MANIFEST_UNKNOWN", "resolve: not here", { retry_after = 7 }) end
        if f == "r503" then return deny(503, "UNSUPPORTED", "resolve: maintenance", { retry_after = 120 }) end
        if f == "oldnil" then return nil, "old: nothing here" end
        if f == "oldtable" then return nil, { status = 403, code = "DENIED", message = "old: table" } end
        return { upstream = "reg", repository = "regfacade-test/oci", reference = "v1" }
    end,
    rewrite = function(img, req)
        if first(req) == "w403" then
            return deny(403, "DENIED", "rewrite: not this image",
                        { challenge = 'Basic realm="rewrite"', retry_after = 60 })
        end
        img.manifest.annotations = img.manifest.annotations or {}
        img.manifest.annotations["org.example.served-as"] = req.repository
    end,
    log = function(req)
        if first(req) == "logdeny" then deny(403, "DENIED", "too late") end
    end,
}
"""


@pytest.fixture
def deny_facade(policy_facade):
    return policy_facade(POLICY)


def get(rf, repo, tag="v1"):
    return request(rf.host, "GET", f"/v2/{repo}/manifests/{tag}", {"Accept": ACCEPT})


def error_of(r):
    body = r.json()
    assert len(body["errors"]) == 1, body
    return body["errors"][0]


# repository prefix -> (status, code, message, Retry-After, WWW-Authenticate)
DENIED = {
    # regfacade.deny from each of the four hooks
    "a429": (429, "TOOMANYREQUESTS", "authorize: slow down", "30", None),
    "a401": (401, "UNAUTHORIZED", "authorize: log in", None,
             'Bearer realm="http://127.0.0.1:1/token",service="rf"'),
    "a401default": (401, "UNAUTHORIZED", "authentication required", None, 'Basic realm="regfacade"'),
    "gone": (410, "NAME_UNKNOWN", "this name is retired", None, None),
    "afalse": (429, "TOOMANYREQUESTS", "authorize: second value", "2", None),
    "s451": (451, "DENIED", "spec: unavailable for legal reasons", "5", None),
    "r404": (404, "MANIFEST_UNKNOWN", "resolve: not here", "7", None),
    "r503": (503, "UNSUPPORTED", "resolve: maintenance", "120", None),
    "w403": (403, "DENIED", "rewrite: not this image", "60", 'Basic realm="rewrite"'),
    # the older forms, unchanged
    "old403": (403, "DENIED", "old: not you", None, None),
    "olddeny": (403, "DENIED", "access denied by policy", None, None),
    "old401": (401, "UNAUTHORIZED", "old: log in", None, 'Basic realm="old"'),
    "old429": (429, "TOOMANYREQUESTS", "old: slow", None, None),
    "oldspec": (404, "NAME_UNKNOWN", "old: no such spec", None, None),
    "oldnil": (404, "NAME_UNKNOWN", "old: nothing here", None, None),
    "oldtable": (403, "DENIED", "old: table", None, None),
}


def test_deny_from_every_hook_reaches_the_client(deny_facade):
    rf = deny_facade
    ok = get(rf, "ok/app")
    assert ok.status == 200, ok
    want_digest = ok.headers["Docker-Content-Digest"]
    for prefix, (status, code, message, retry_after, challenge) in DENIED.items():
        r = get(rf, f"{prefix}/app")
        assert r.status == status, (prefix, r)
        assert error_of(r) == {"code": code, "message": message, "detail": {}}, prefix
        assert r.headers.get("Retry-After") == retry_after, (prefix, dict(r.headers))
        assert r.headers.get("WWW-Authenticate") == challenge, (prefix, dict(r.headers))
        assert r.headers.get("Content-Type") == "application/json", prefix
        # Everyone else is still served, the same image.
        again = get(rf, "ok/app")
        assert again.status == 200 and again.headers["Docker-Content-Digest"] == want_digest, prefix


MALFORMED = {
    "bad200": "regfacade.deny: status 200 is not a refusal (an integer from 400 to 599)",
    "badretry": "regfacade.deny: retry_after -5 is not a number of seconds from 0 to 86400",
    "badopt": 'regfacade.deny: unknown option "retry" (options: retry_after, challenge)',
    "badcode": 'authorize returned a malformed refusal: code "NOT_A_CODE" is not an OCI error code',
}


def test_a_malformed_refusal_is_a_clear_500(deny_facade):
    rf = deny_facade
    for prefix, why in MALFORMED.items():
        r = get(rf, f"{prefix}/app")
        assert r.status == 500, (prefix, r)
        err = error_of(r)
        assert err["code"] == "UNKNOWN", (prefix, err)
        assert "Retry-After" not in r.headers and "WWW-Authenticate" not in r.headers, prefix
        if prefix == "badcode":
            assert why in err["message"], (prefix, err)   # a malformed answer: said to the client
        else:
            assert "the policy's authorize hook failed at policy.lua:" in err["message"], (prefix, err)
        assert wait_until(lambda: why in rf.messages(), timeout=10), prefix
        assert get(rf, "ok/app").status == 200, prefix
    # regfacade.deny in the log hook: refused there (it cannot change the answer), only logged.
    r = get(rf, "logdeny/app")
    assert r.status == 200, r
    assert wait_until(lambda: "regfacade.deny cannot be called in hook log" in rf.messages(), timeout=10)


def test_a_real_client_sees_the_refusal(deny_facade):
    """skopeo (containers/image) against the facade: a denied name fails
    with the policy's message, the allowed one is the registry's image."""
    rf = deny_facade
    skopeo = shutil.which("skopeo")
    if not skopeo:
        pytest.skip("skopeo is not installed")
    info = rf.registry.images["oci"]
    ok = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{rf.host}/ok/app:v1"],
                        capture_output=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    # The facade's rewrite annotated it: not the registry's bytes, but its layers.
    assert b"org.example.served-as" in ok.stdout and info["manifest_digest"] != sha256_digest(ok.stdout)
    bad = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{rf.host}/r404/app:v1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "resolve: not here" in bad.stderr, bad.stderr


def recipe(name):
    return os.path.join(ROOT, "examples", "recipes", name)


def test_the_recipes_refuse_through_the_server(policy_facade, htpasswd_registry):
    """examples/recipes/allowlist.lua (regfacade.rules.prefix + regfacade.deny)
    and ratelimit.lua (429 with Retry-After) in the real server."""
    info = htpasswd_registry.images["oci"]
    rf = policy_facade(policy={"file": recipe("allowlist.lua"), "options": {"allow": ["regfacade-test/"]}},
                       name="allowlist")
    r = get(rf, info["repo"], info["tag"])
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == info["manifest_digest"], r
    r = get(rf, "other/oci", info["tag"])
    assert r.status == 403, r
    assert error_of(r) == {"code": "DENIED", "message": "other/oci is not on this mirror's allow-list",
                           "detail": {}}
    rf.stop()
    rf = policy_facade(policy={"file": recipe("ratelimit.lua"), "options": {"per_minute": 2}}, name="ratelimit")
    # Two per minute window: of five quick pulls (two windows at most) one is refused.
    answers = [get(rf, info["repo"], info["tag"]) for _ in range(5)]
    assert answers[0].status == 200, answers[0]
    limited = [r for r in answers if r.status == 429]
    assert limited and all(r.status in (200, 429) for r in answers), answers
    r = limited[0]
    assert error_of(r)["code"] == "TOOMANYREQUESTS"
    assert 1 <= int(r.headers["Retry-After"]) <= 60, dict(r.headers)
