"""A policy that passes its busted specs cannot then answer 500 in the
server for the same inputs: the same cases go through busted
(regfacade.testing's testing.policy, the server's own C code loaded as a Lua
module) and through the real server in front of a real docker-registry,
and their answers are compared: status and code, where resolve sent the
request (upstream, repository, reference: the server serves that
repository's digest), and the digest of a generated image (the assembly
and rewrite `serve` runs give the same bytes in the spec).

The cases include what the old Lua front door let through and the server
answered with 500: resolve naming an upstream the config lacks, an invalid
reference, a credential set the upstream lacks, and regfacade.crypt_verify
called in resolve (a phase the server forbids). In busted each of them
fails the spec ("the server answers 500"), so such a policy cannot pass its
specs.
"""
import json
import os
import subprocess
import urllib.request

import pytest

from harness import REGFACADE, ROOT, Regfacade

OCI_ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])

POLICY = r'''
local regfacade = require "regfacade"
local image = require "regfacade.image"

-- requested "CASE/REPO": CASE says what the hooks do, REPO is the upstream repository
local function split(req)
    return (req.repository or ""):match("^([^/]+)/(.+)$")
end

return {
    authorize = function(req)
        local case = split(req)
        if case == "denied" then
            return regfacade.deny(403, "DENIED", "not for you")
        elseif case == "slow" then
            return regfacade.deny(429, "TOOMANYREQUESTS", "slow down", { retry_after = 7 })
        elseif case == "legacy" then
            return false, "refused the old way"
        end
        return true
    end,

    resolve = function(req)
        local case, repo = split(req)
        if case == "ok" or case == "env" then
            return { upstream = "reg", repository = repo, reference = req.reference,
                     layers = case == "env" and { "base" } or nil }
        elseif case == "other" then
            return { upstream = "reg2", repository = repo, reference = "v1" }
        elseif case == "nowhere" then
            return { upstream = "no-such-upstream", repository = repo }
        elseif case == "badref" then
            return { upstream = "reg", repository = repo, reference = "not a tag!" }
        elseif case == "badset" then
            return { upstream = "reg", repository = repo, credentials = "no-such-set" }
        elseif case == "crypt" then
            regfacade.crypt_verify("x", "$2y$05$xf80luoU5Ww6OhlO6p4KcutiF9PCRUvaxAQbJg9YYmhuMdC8j7dK2")
            return { upstream = "reg", repository = repo }
        end
        return nil, { status = 404, code = "NAME_UNKNOWN", message = "no such case" }
    end,

    rewrite = function(img, req)
        if split(req) == "env" then
            image.env_set(img.config, "FRONT_DOOR", req.repository)
            image.annotation_set(img.manifest, "io.regfacade.test.front-door", "yes")
        end
    end,
}
'''

# What busted runs: every case through testing.policy, each answer (or the
# error a failing spec would show) written as one JSON line.
SPEC = r'''
local testing = require "regfacade.testing"
local json = testing.json

local cases = json.decode(io.open(os.getenv("FRONT_DOOR_CASES")):read("a"))
local out = assert(io.open(os.getenv("FRONT_DOOR_OUT"), "w"))

local function base_of(repo)
    local m = io.open(os.getenv("FRONT_DOOR_BASES") .. "/" .. repo:gsub("/", "_") .. ".manifest", "rb")
    local c = io.open(os.getenv("FRONT_DOOR_BASES") .. "/" .. repo:gsub("/", "_") .. ".config", "rb")
    if not m then return nil end
    return { manifest_text = m:read("a"), config_text = c:read("a") }
end

describe("the front door", function()
    local policy = testing.policy("policy.lua", { config = "regfacade.json" })
    for _, case in ipairs(cases) do
        it(case.path, function()
            local req = testing.request { repository = case.repository, reference = case.reference }
            local row = { path = case.path }
            local ok, err = pcall(function()
                local a = policy:authorize(req)
                if not a.allowed then
                    row.status, row.code, row.retry_after = a.status, a.code, a.retry_after
                    return
                end
                local r = policy:resolve(req)
                if r.allowed == false then
                    row.status, row.code = r.status, r.code
                    return
                end
                row.upstream, row.repository, row.reference = r.upstream, r.repository, r.reference
                local base = base_of(r.repository)
                if base then
                    local run, refusal = policy:run(req, base)
                    assert(run, refusal and refusal.message)
                    row.digest, row.unchanged = run.manifest_digest, run.unchanged
                end
                row.status = 200
            end)
            if not ok then
                row.raised = tostring(err)
            end
            out:write(json.encode(row), "\n")
            out:flush()
        end)
    end
end)
'''


def registry_get(url, path, accept=None):
    req = urllib.request.Request(url + path, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def facade_get(rf, path):
    req = urllib.request.Request(rf.url + path, headers={"Accept": OCI_ACCEPT})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def busted_env(tmp_path, cases_path, out_path, bases):
    build = os.path.dirname(REGFACADE)
    env = dict(os.environ)
    env.update({
        "REGFACADE_BUILD": build,
        "LUA_PATH_5_4": f"{ROOT}/lua/?.lua;{ROOT}/lua/?/init.lua;/usr/share/lua/5.1/?.lua;"
                        "/usr/share/lua/5.1/?/init.lua;;",
        "FRONT_DOOR_CASES": str(cases_path),
        "FRONT_DOOR_OUT": str(out_path),
        "FRONT_DOOR_BASES": str(bases),
    })
    if os.path.basename(build) == "build-asan":
        # the modules are ASan builds: the interpreter loads the runtimes first
        libs = [subprocess.run(["cc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                for lib in ("libasan.so", "libubsan.so")]
        env["LD_PRELOAD"] = " ".join(libs)
        env["ASAN_OPTIONS"] = "detect_leaks=0"
    return env


@pytest.fixture(scope="module")
def two_image_registry(session_procs, built_images, tmp_path_factory):
    """docker-registry with the small image as OCI and as Docker schema2."""
    import images
    import registries
    reg = registries.start_registry(session_procs, str(tmp_path_factory.mktemp("reg-front-door")),
                                    name="registry-front-door")
    reg.pushed = images.push_images(built_images, reg.host, names=["oci", "schema2"])
    return reg


def test_busted_and_the_server_give_the_same_answers(procs, tmp_path, two_image_registry):
    reg = two_image_registry
    oci, schema2 = reg.pushed["oci"], reg.pushed["schema2"]
    (tmp_path / "policy.lua").write_text(POLICY)
    # One config for both: the server's, which busted loads too.
    rf = Regfacade(procs, str(tmp_path), {
        "upstreams": {"reg": {"url": reg.url}, "reg2": {"url": reg.url}},
        "default_upstream": "reg",
        "cache": {"dir": str(tmp_path / "cache")},
        "policy": {"file": "policy.lua"},
    })
    cases = []
    for case in ("ok", "env", "other", "denied", "slow", "legacy", "nowhere", "badref", "badset", "crypt", "gone"):
        for img in (oci, schema2):
            cases.append({"repository": f"{case}/{img['repo']}", "reference": img["tag"],
                          "path": f"/v2/{case}/{img['repo']}/manifests/{img['tag']}"})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    # The upstream's content, which a spec builds or fetches: here the real bytes.
    bases = tmp_path / "bases"
    bases.mkdir()
    for img in (oci, schema2):
        m = registry_get(reg.url, f"/v2/{img['repo']}/manifests/{img['tag']}", img["media_type"])
        c = registry_get(reg.url, f"/v2/{img['repo']}/blobs/{img['config_digest']}")
        (bases / (img["repo"].replace("/", "_") + ".manifest")).write_bytes(m)
        (bases / (img["repo"].replace("/", "_") + ".config")).write_bytes(c)
    (tmp_path / "spec.lua").write_text(SPEC)
    out = tmp_path / "answers.jsonl"
    r = subprocess.run(["lua5.4", "/usr/bin/busted", "--ignore-lua", "-o", "TAP", "spec.lua"], cwd=tmp_path,
                       env=busted_env(tmp_path, tmp_path / "cases.json", out, bases), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    spec = {row["path"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert len(spec) == len(cases), spec

    rf.start()
    digests = {img["repo"]: img["manifest_digest"] for img in (oci, schema2)}
    compared = 0
    for case in cases:
        path = case["path"]
        want = spec[path]
        status, headers, body = facade_get(rf, path)
        what = f"{path}: busted {want}, server {status} {body[:300]!r}"
        if "raised" in want:
            # the spec fails, naming the 500 the server gives
            assert "the server answers 500" in want["raised"], what
            assert status == 500, what
            continue
        assert status == want["status"], what
        assert status != 500, what
        if status != 200:
            err = json.loads(body)["errors"][0]
            assert err["code"] == want["code"], what
            if "retry_after" in want:
                assert headers.get("Retry-After") == str(want["retry_after"]), what
            continue
        got = headers["Docker-Content-Digest"]
        # where resolve sent it: the upstream repository's own digest, or
        # (a generated image) exactly the digest busted computed
        if want.get("unchanged", True):
            assert got == digests[want["repository"]], what
        assert got == want["digest"], what
        compared += 1
    # ok, other and env for both images were served and compared
    assert compared == 6, spec
    # busted saw the failures the server logs
    raised = {p for p, row in spec.items() if "raised" in row}
    assert {c["path"] for c in cases if c["path"].split("/")[2] in ("nowhere", "badref", "badset", "crypt")} == raised
    env_rows = [row for row in spec.values() if row["path"].startswith("/v2/env/")]
    assert env_rows and all(row["unchanged"] is False for row in env_rows), env_rows
    assert all(row["digest"] != digests[row["repository"]] for row in env_rows), env_rows
    msgs = rf.messages()
    assert "cannot be called in hook resolve" in msgs and '"no-such-upstream", which is not configured' in msgs
