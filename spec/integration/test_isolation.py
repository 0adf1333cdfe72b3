"""Content belongs to repositories (docs/security.md, "Isolation").

The cache is shared storage, never a shared permission: a digest is served
under a name only where it is known to be (fetched or verified from that
upstream repository with that request's upstream account, referenced by a
manifest served there, or generated for that name); anything else asks the
upstream (HEAD) and answers 404 when it says no.

Peers: a real docker-registry with htpasswd holding acme/public and
acme/private (images built with oci_layout.py sharing one layer, and the
umoci-built image of images.py in acme/private only); a client that the
policy lets pull only acme/public; a warming client allowed everything.

And authorize decides on what will be fetched: every hook sees the name as
asked (req.repository) and where it goes (req.target), and the docs'
examples deny by the latter, whichever name form the mirror accepts.
"""
import json
import os
import time

import pytest

import oci_layout
from clients import http_request
from conftest import HTPASSWD_PASSWORD, HTPASSWD_USER
from harness import Regfacade
import images
import registries

OCI_ACCEPT = ", ".join([oci_layout.OCI_MANIFEST, oci_layout.OCI_INDEX,
                        "application/vnd.docker.distribution.manifest.v2+json",
                        "application/vnd.docker.distribution.manifest.list.v2+json"])

# The warming client (Basic user "warm", any password) may pull everything;
# everyone else only acme/public and gen/app (options.open: everything).
# Pulls go upstream with the facade's own account, the warming client's
# with credential set options.warm_set when it is set.
POLICY = r'''
local regfacade = require "regfacade"
local mirror = require "regfacade.mirror"
local function opts() return regfacade.config.options end
return {
  authorize = function(req)
    if req.client.user == "warm" then
      return opts().warm_set and { credentials = opts().warm_set } or true
    end
    if req.kind == "ping" or opts().open then return true end
    local name = req.repository
    if name == "acme/public" or name == "gen/app" then return true end
    return false, "this client may pull acme/public only"
  end,
  resolve = function(req)
    if req.repository == "gen/app" then
      return { upstream = "local", repository = "acme/public", reference = req.reference,
               layers = { "base", { image = "local/acme/private:v1", skip = 1 } } }
    end
    return mirror.resolve(req)
  end,
}
'''


class Seeded:
    pass


def _images(workdir):
    """acme/public:v1 = [shared, public-only]; acme/private:v1 = [shared,
    private-only] (Python-built); acme/private:small (umoci-built)."""
    lay = oci_layout.Layout(os.path.join(workdir, "layout"))
    shared = [oci_layout.F("shared.txt", b"in both repositories\n")]
    pub = [oci_layout.F("public.txt", b"public only\n")]
    priv = [oci_layout.F("private.txt", b"private only: secret\n")]
    pub_desc, pub_layers = lay.manifest([(shared, "gzip"), (pub, "gzip")])
    priv_desc, priv_layers = lay.manifest([(shared, "gzip"), (priv, "gzip")], arch="amd64")
    lay.tag("public", pub_desc)
    lay.tag("private", priv_desc)
    return lay, pub_desc, pub_layers, priv_desc, priv_layers


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, session_procs, built_images):
    work = str(tmp_path_factory.mktemp("isolation-seed"))
    reg = registries.start_registry(session_procs, os.path.join(work, "reg"), name="registry-isolation",
                                    mode="htpasswd", username=HTPASSWD_USER, password=HTPASSWD_PASSWORD)
    lay, pub_desc, pub_layers, priv_desc, priv_layers = _images(work)
    creds = ["--dest-creds", reg.creds]
    oci_layout.push(lay, "public", reg.host, "acme/public:v1", extra=creds)
    oci_layout.push(lay, "private", reg.host, "acme/private:v1", extra=creds)
    oci_layout.push(lay, "private", reg.host, "internal/x:v1", extra=creds)
    small = images.push_image(built_images, "oci", reg.host, creds=reg.creds, repo="acme/private", tag="small")
    s = Seeded()
    s.registry = reg
    s.public = images.describe(reg.host, "acme/public", "v1", creds=reg.creds)
    s.private = images.describe(reg.host, "acme/private", "v1", creds=reg.creds)
    s.small = small
    assert s.public["layers"][0]["digest"] == s.private["layers"][0]["digest"]  # the shared layer
    s.shared = s.public["layers"][0]["digest"]
    # Only in acme/private: its manifests, configs and its own layers.
    s.private_blobs = ([s.private["config_digest"], s.private["layers"][1]["digest"], s.small["config_digest"]]
                       + [l["digest"] for l in s.small["layers"]])
    s.private_manifests = [s.private["manifest_digest"], s.small["manifest_digest"]]
    s.pw_file = os.path.join(work, "pw")
    with open(s.pw_file, "w") as f:
        f.write(HTPASSWD_PASSWORD)
    return s


def facade(procs, workdir, seeded, upstream_url=None, options=None, cache_dir=None, extra=None, name="regfacade",
           local_pw_file=None):
    with open(os.path.join(workdir, "policy.lua"), "w") as f:
        f.write(POLICY)
    local = {"url": upstream_url or seeded.registry.url,
             "username": HTPASSWD_USER, "password_file": local_pw_file or seeded.pw_file,
             "credentials": {"ci": {"username": HTPASSWD_USER, "password_file": seeded.pw_file}}}
    cfg = {"cache": {"dir": cache_dir or os.path.join(workdir, "cache")},
           "policy": {"file": "policy.lua", "options": options or {}},
           "upstreams": {"local": local}, "default_upstream": "local"}
    cfg.update(extra or {})
    rf = Regfacade(procs, workdir, cfg, name=name)
    return rf.start()


WARM = {"Authorization": "Basic d2FybTp4"}  # warm:x


def get(rf, path, method="GET", headers=None):
    h = {"Accept": OCI_ACCEPT}
    h.update(headers or {})
    return http_request(rf.url + path, method=method, headers=h)


def warm(rf, seeded):
    """Pull acme/private's images through the facade as the warming client."""
    for tag, info in (("v1", seeded.private), ("small", seeded.small)):
        r = get(rf, f"/v2/acme/private/manifests/{tag}", headers=WARM)
        assert r.status == 200, (r.status, r.body[:300])
        for d in info["blobs"]:
            r = get(rf, f"/v2/acme/private/blobs/{d}", headers=WARM)
            assert r.status == 200, (d, r.status, r.body[:300])


def error_code(r):
    return json.loads(r.body)["errors"][0]["code"]


def assert_not_here(rf, path, code):
    """GET, HEAD and a Range GET of path all answer 404 with code."""
    for method, headers in (("GET", None), ("HEAD", None), ("GET", {"Range": "bytes=0-9"})):
        r = get(rf, path, method=method, headers=headers)
        assert r.status == 404, (method, path, r.status, r.body[:300])
        if method == "GET":
            assert error_code(r) == code, (path, r.body[:300])


def test_cached_private_content_is_404_under_public(procs, tmp_path, seeded):
    rf = facade(procs, str(tmp_path), seeded)
    warm(rf, seeded)
    # The client may not ask for acme/private itself...
    r = get(rf, f"/v2/acme/private/blobs/{seeded.private_blobs[0]}")
    assert r.status == 403, r.status
    # ...nor reach its cached content through the name it may use.
    for d in seeded.private_blobs:
        assert_not_here(rf, f"/v2/acme/public/blobs/{d}", "BLOB_UNKNOWN")
    for d in seeded.private_manifests:
        assert_not_here(rf, f"/v2/acme/public/manifests/{d}", "MANIFEST_UNKNOWN")
    # What acme/public has too is served there: the shared layer (cached by
    # the warming pull, confirmed by the upstream), and acme/public's own image.
    for method in ("GET", "HEAD"):
        r = get(rf, f"/v2/acme/public/blobs/{seeded.shared}", method=method)
        assert r.status == 200 and r.headers.get("Docker-Content-Digest") == seeded.shared, (method, r.status)
    r = get(rf, f"/v2/acme/public/blobs/{seeded.shared}", headers={"Range": "bytes=0-9"})
    assert r.status == 206 and len(r.body) == 10, r.status
    r = get(rf, "/v2/acme/public/manifests/v1")
    assert r.status == 200 and r.headers.get("Docker-Content-Digest") == seeded.public["manifest_digest"]
    for d in seeded.public["blobs"]:
        r = get(rf, f"/v2/acme/public/blobs/{d}")
        assert r.status == 200, (d, r.status)
    # The tag list is acme/public's own.
    r = get(rf, "/v2/acme/public/tags/list")
    assert r.status == 200 and json.loads(r.body)["tags"] == ["v1"], r.body
    # And the private content is still 404 there after all that.
    for d in seeded.private_blobs:
        assert get(rf, f"/v2/acme/public/blobs/{d}").status == 404, d


def test_refused_account_gets_no_cached_image(procs, tmp_path, seeded):
    # The warming client pulls with credential set "ci"; every other client
    # is let through by the policy, but goes upstream with the facade's own
    # account, whose password the upstream refuses.
    bad_pw = os.path.join(str(tmp_path), "bad-pw")
    with open(bad_pw, "w") as f:
        f.write("wrong")
    rf = facade(procs, str(tmp_path), seeded, options={"warm_set": "ci", "open": True}, local_pw_file=bad_pw)
    warm(rf, seeded)
    for d in seeded.private_blobs + [seeded.shared]:
        for method in ("GET", "HEAD"):
            r = get(rf, f"/v2/acme/private/blobs/{d}", method=method)
            assert r.status == 403, (d, method, r.status, r.body[:300])
    for d in seeded.private_manifests:
        r = get(rf, f"/v2/acme/private/manifests/{d}")
        assert r.status == 403 and error_code(r) == "DENIED", (d, r.status, r.body[:300])
    r = get(rf, "/v2/acme/private/manifests/v1")
    assert r.status == 403, r.status
    # The "ci" account still gets it, from the cache.
    r = get(rf, f"/v2/acme/private/manifests/{seeded.private['manifest_digest']}", headers=WARM)
    assert r.status == 200, r.status


def test_links_survive_a_restart(procs, tmp_path, seeded):
    # An upstream of its own (the same storage), stopped after the first run.
    up = seeded.registry.clone(procs, os.path.join(str(tmp_path), "up"), name="registry-isolation-clone")
    cache = os.path.join(str(tmp_path), "cache")
    rf = facade(procs, str(tmp_path), seeded, upstream_url=up.url, cache_dir=cache)
    warm(rf, seeded)
    # acme/public: its image, and the shared layer confirmed there.
    assert get(rf, "/v2/acme/public/manifests/v1").status == 200
    for d in seeded.public["blobs"]:
        assert get(rf, f"/v2/acme/public/blobs/{d}").status == 200
    rf.stop()
    up.stop()
    # Restarted with the upstream down: known pairs need no upstream call.
    rf = Regfacade(procs, str(tmp_path), rf.config, name="regfacade-again").start()
    md = seeded.public["manifest_digest"]
    r = get(rf, f"/v2/acme/public/manifests/{md}")
    assert r.status == 200 and r.headers.get("Docker-Content-Digest") == md, (r.status, r.body[:300])
    for d in seeded.public["blobs"]:
        for method in ("GET", "HEAD"):
            r = get(rf, f"/v2/acme/public/blobs/{d}", method=method)
            assert r.status == 200, (d, method, r.status, r.body[:300])
    for d in seeded.private["blobs"]:
        assert get(rf, f"/v2/acme/private/blobs/{d}", headers=WARM).status == 200, d
    # Unknown pairs cannot be confirmed without the upstream: never served.
    for d in seeded.private_blobs:
        r = get(rf, f"/v2/acme/public/blobs/{d}")
        assert r.status >= 400, (d, r.status)


def test_generated_layer_belongs_to_the_generated_name(procs, tmp_path, seeded):
    rf = facade(procs, str(tmp_path), seeded)
    r = get(rf, "/v2/gen/app/manifests/v1")
    assert r.status == 200, (r.status, r.body[:300])
    man = json.loads(r.body)
    added = seeded.private["layers"][1]["digest"]  # acme/private's own layer, added from local/acme/private:v1
    assert [l["digest"] for l in man["layers"]] == [l["digest"] for l in seeded.public["layers"]] + [added]
    # Cold: not under another repository (the origin record is gen/app's)...
    assert_not_here(rf, f"/v2/acme/public/blobs/{added}", "BLOB_UNKNOWN")
    # ...but under the generated name, fetched from its origin.
    r = get(rf, f"/v2/gen/app/blobs/{added}")
    assert r.status == 200 and r.headers.get("Docker-Content-Digest") == added, (r.status, r.body[:300])
    assert oci_layout.sha256(r.body) == added
    # Cached now: still not under acme/public.
    assert_not_here(rf, f"/v2/acme/public/blobs/{added}", "BLOB_UNKNOWN")
    # The generated config and manifest are gen/app's too.
    mr = get(rf, "/v2/gen/app/manifests/v1")
    gen_manifest = mr.headers.get("Docker-Content-Digest")
    assert get(rf, f"/v2/gen/app/manifests/{gen_manifest}").status == 200
    assert get(rf, f"/v2/gen/app/blobs/{man['config']['digest']}").status == 200
    assert_not_here(rf, f"/v2/acme/public/manifests/{gen_manifest}", "MANIFEST_UNKNOWN")
    assert_not_here(rf, f"/v2/acme/public/blobs/{man['config']['digest']}", "BLOB_UNKNOWN")


def test_blobserve_serves_only_what_the_repository_has(procs, tmp_path, seeded):
    from harness import free_port
    bs_port = free_port()
    rf = facade(procs, str(tmp_path), seeded,
                extra={"blobserve": {"listen": f"127.0.0.1:{bs_port}", "repositories": ["acme/public"]}})
    warm(rf, seeded)
    bs = f"http://127.0.0.1:{bs_port}"
    r = http_request(f"{bs}/acme/public:v1/public.txt")
    assert r.status == 200 and r.body == b"public only\n", (r.status, r.body[:300])
    for d in seeded.private_manifests:
        for f in ("private.txt", "shared.txt", images.TEST_FILE.lstrip("/")):
            r = http_request(f"{bs}/acme/public@{d}/{f}")
            assert r.status == 404, (d, f, r.status, r.body[:300])
    r = http_request(f"{bs}/acme/public@{seeded.public['manifest_digest']}/shared.txt")
    assert r.status == 200 and r.body == b"in both repositories\n", r.status


def doc_policy(path, heading=None):
    """The first ```lua block of a doc (after heading, when given): the
    examples the docs show are the ones tested."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "..", path)) as f:
        text = f.read()
    if heading:
        text = text[text.index(heading):]
    start = text.index("```lua\n") + len("```lua\n")
    return text[start:text.index("```", start)]


@pytest.mark.parametrize("doc,heading", [("docs/policy.md", None), ("README.md", "## Policy")])
def test_docs_deny_example_holds_for_every_name_form(procs, tmp_path, seeded, doc, heading):
    work = str(tmp_path)
    with open(os.path.join(work, "policy.lua"), "w") as f:
        f.write(doc_policy(doc, heading))
    local = {"url": seeded.registry.url, "username": HTPASSWD_USER, "password_file": seeded.pw_file}
    cfg = {"cache": {"dir": os.path.join(work, "cache")}, "policy": {"file": "policy.lua"},
           "upstreams": {"local": local}, "default_upstream": "local"}
    rf = Regfacade(procs, work, cfg).start()
    host = seeded.registry.host
    digest = seeded.private["layers"][1]["digest"]
    forms = ["/v2/{repo}/{what}", "/v2/local/{repo}/{what}", "/local/v2/{repo}/{what}",
             "/v2/{repo}/{what}?ns=" + host]
    for form in forms:
        for what in ("manifests/v1", f"blobs/{digest}", "tags/list"):
            r = get(rf, form.format(repo="internal/x", what=what))
            assert r.status == 403 and error_code(r) == "DENIED", (form, what, r.status, r.body[:300])
            r = get(rf, form.format(repo="acme/private", what=what))
            assert r.status == 200, (form, what, r.status, r.body[:300])


def test_every_hook_sees_the_name_asked_and_where_it_goes(procs, tmp_path, seeded):
    # Before resolve, req.target is the mirror's mapping of the name asked;
    # after it (rewrite, log), where resolve sent the request.
    work = str(tmp_path)
    with open(os.path.join(work, "policy.lua"), "w") as f:
        f.write(r'''
local regfacade = require "regfacade"
local function show(hook, req)
  local t = req.target
  regfacade.log("info", string.format("%s asked=%s target=%s", hook, req.repository,
    t and (t.upstream .. "/" .. t.repository) or "none"))
end
return {
  authorize = function(req) show("authorize", req) return true end,
  resolve = function(req)
    show("resolve", req)
    return { upstream = "local", repository = "acme/public", reference = req.reference }
  end,
  rewrite = function(img, req) show("rewrite", req) end,
  log = function(req, res) show("log", req) end,
}
''')
    local = {"url": seeded.registry.url, "username": HTPASSWD_USER, "password_file": seeded.pw_file}
    cfg = {"cache": {"dir": os.path.join(work, "cache")}, "policy": {"file": "policy.lua"},
           "upstreams": {"local": local}, "default_upstream": "local"}
    rf = Regfacade(procs, work, cfg).start()
    r = get(rf, "/local/v2/alias/x/manifests/v1")
    assert r.status == 200, (r.status, r.body[:300])
    # The log hook runs once the response is out: wait for its line.
    deadline = time.monotonic() + 60
    while "log asked=local/alias/x" not in rf.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = rf.log()
    for hook in ("authorize", "resolve"):
        assert f"{hook} asked=local/alias/x target=local/alias/x" in log, log[-3000:]
    for hook in ("rewrite", "log"):
        assert f"{hook} asked=local/alias/x target=local/acme/public" in log, log[-3000:]
