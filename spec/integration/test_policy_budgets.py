"""Budgets that hold where the Lua VM does not count: a catastrophic string
pattern on request data, and cjson on a deeply nested header.

- A backtracking pattern in authorize, matched against a header the client
  sends, is stopped by the hook's budget: the client gets a clean 500 that
  names the budget and the policy's line, everyone else keeps being served
  meanwhile, and SIGTERM then stops the server (before, the thread matched
  forever and only SIGKILL ended the process).
- cjson's depth limit is fixed by the sandbox: a policy that tries to raise
  it gets a clear error (500, logged), and a deeply nested header decoded by
  cjson is an error the policy handles, not a crashed server.

The upstream is a real docker-registry (distribution) with htpasswd auth
(conftest.htpasswd_registry).
"""
import os
import re
import signal
import threading

import pytest

from fake_upstream import ALL_MANIFEST_TYPES, request, wait_until
from harness import Regfacade

ACCEPT = ", ".join(ALL_MANIFEST_TYPES)

POLICY = r"""
local regfacade = require "regfacade"
local cjson = require "cjson"

return {
    authorize = function(req)
        local repo = req.repository or ""
        local agent = req.headers["x-agent"]
        if agent and repo:match("^ua/") then
            -- Six lazy captures: fine on a real agent string, catastrophic on
            -- 300 characters of one letter with no "b" anywhere.
            if agent:match("^(.-)(.-)(.-)(.-)(.-)(.-)b$") then return true end
            return regfacade.deny(403, "DENIED", "unknown agent")
        end
        local doc = req.headers["x-doc"]
        if doc then
            if repo:match("^raise/") then cjson.decode_max_depth(1000000) end
            local ok, v = pcall(cjson.decode, doc)
            if not ok then return regfacade.deny(400, "UNSUPPORTED", "x-doc is not usable JSON: " .. v) end
            return type(v) == "table"
        end
        return true
    end,
    resolve = function(req)
        return { upstream = "reg", repository = "regfacade-test/oci", reference = "v1" }
    end,
}
"""


@pytest.fixture
def facade(policy_facade):
    return policy_facade(POLICY)   # the default budgets: 250 ms, 10M instructions


def get(rf, repo, headers=None, timeout=60):
    h = {"Accept": ACCEPT}
    h.update(headers or {})
    return request(rf.host, "GET", f"/v2/{repo}/manifests/v1", h, timeout=timeout)


class Pulls:
    """A thread pulling the good image until stopped; counts answers."""

    def __init__(self, rf):
        self.rf, self.ok, self.bad = rf, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            r = get(self.rf, "good/app", timeout=30)
            if r.status == 200:
                self.ok += 1
            else:
                self.bad.append(r.status)

    def __enter__(self):
        self.thread.start()
        assert wait_until(lambda: self.ok > 3, timeout=30), self.bad[:3]
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=60)


def test_a_catastrophic_pattern_is_stopped_and_sigterm_completes(facade):
    rf = facade
    assert get(rf, "ua/app", {"X-Agent": "curl/8.0 b"}).status == 200
    assert get(rf, "ua/app", {"X-Agent": "curl/8.0"}).status == 403
    with Pulls(rf) as pulls:
        for _ in range(4):
            seen = pulls.ok
            # Lua's own matcher would take hours on this one (60 characters: a second).
            r = get(rf, "ua/app", {"X-Agent": "a" * 300})
            assert r.status == 500, r
            err = r.json()["errors"][0]
            assert err["code"] == "UNKNOWN"
            # Whichever budget runs out first (on a slow sanitizer build, time).
            assert re.search(r"the policy's authorize hook exceeded its (instruction|time) budget at policy\.lua:",
                             err["message"]), err
            assert wait_until(lambda: pulls.ok > seen + 2, timeout=30), "the others were not served meanwhile"
    assert not pulls.bad, pulls.bad[:5]
    assert re.search(r"policy authorize exceeded its (instruction budget \(10000000 instructions|time budget)",
                     rf.messages())
    # Nothing is left running: SIGTERM ends the process by itself.
    proc = rf.proc
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, "SIGTERM did not stop the server cleanly"


def test_cjson_depth_is_fixed_and_a_deep_header_is_an_error(facade):
    rf = facade
    assert get(rf, "doc/app", {"X-Doc": '{"a": [1, {"b": 2}]}'}).status == 200
    deep = "[" * 20000 + "]" * 20000
    # Raising the limit is refused where the policy tries it.
    r = get(rf, "raise/app", {"X-Doc": deep})
    assert r.status == 500, r
    assert "the policy's authorize hook failed at policy.lua:" in r.json()["errors"][0]["message"]
    assert wait_until(lambda: "cjson.decode_max_depth: fixed at 64 by the policy sandbox" in rf.messages(),
                      timeout=10)
    assert rf.proc.poll() is None, "the server died"
    # At the fixed limit, the deep header is an error the policy handles.
    r = get(rf, "doc/app", {"X-Doc": deep})
    assert r.status == 400, r
    err = r.json()["errors"][0]
    assert err["code"] == "UNSUPPORTED" and "x-doc is not usable JSON" in err["message"], err
    assert rf.proc.poll() is None, "the server died"
    assert get(rf, "good/app").status == 200
