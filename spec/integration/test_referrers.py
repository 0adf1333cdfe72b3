"""Referrers (OCI 1.1): GET /v2/<name>/referrers/<digest> through the real
binary.

- An upstream with the referrers API: its answer is passed on, the
  artifactType filter passed to it (and applied here when it did not apply
  it, with OCI-Filters-Applied either way).
- An upstream without it (CNCF distribution 2.8): the referrers tag schema
  (`sha256-<hex>` index) is read instead; nothing there: an empty index.
- Isolation: referrers are asked of the repository the name maps to, never
  another one's.
- The conformance suite's content-discovery workflow (tag listing with n and
  last, and the four referrers specs) through regfacade in front of
  distribution 2.8, its pushes going to the registry through a test front
  that keeps the referrers tag schema (referrers_front.py).
"""
import json
import os
import re
import subprocess

import pytest

import registries
from clients import diag, http_request, start_facade
from fake_upstream import sha256_digest
from referrers_front import ReferrersFront

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SIG = "application/vnd.example.signature.v1"
SBOM = "application/spdx+json"


def descriptor(body, artifact_type, annotation):
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256_digest(body),
            "size": len(body), "artifactType": artifact_type, "annotations": {"org.example.note": annotation}}


def get(rf, path):
    return http_request(f"{rf.url}{path}")


@pytest.fixture
def subject(fake_upstream):
    img = fake_upstream.add_image("acme/app", "v1")
    sig = descriptor(b"sig", SIG, "a signature")
    sbom = descriptor(b"sbom", SBOM, "an sbom")
    fake_upstream.add_referrer("acme/app", img.digest, sig)
    fake_upstream.add_referrer("acme/app", img.digest, sbom)
    return img, sig, sbom


@pytest.mark.parametrize("upstream_filters", [True, False])
def test_referrers_api_passed_through_and_filtered(fake_upstream, fake_facade, subject, upstream_filters):
    img, sig, sbom = subject
    fake_upstream.referrers_api = True
    fake_upstream.referrers_filter = upstream_filters
    rf = fake_facade()
    r = get(rf, f"/v2/acme/app/referrers/{img.digest}")
    assert r.status == 200 and r.headers["Content-Type"] == OCI_INDEX, f"{r!r}\n{diag(rf)}"
    idx = r.json()
    assert idx["schemaVersion"] == 2 and idx["mediaType"] == OCI_INDEX
    assert idx["manifests"] == [sig, sbom]
    assert "OCI-Filters-Applied" not in r.headers
    r = get(rf, f"/v2/acme/app/referrers/{img.digest}?artifactType={SIG.replace('+', '%2B')}")
    assert r.status == 200 and r.json()["manifests"] == [sig], r
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    # the filter went to the upstream as asked
    seen = [q["query"] for q in fake_upstream.requests if "/referrers/" in q["path"]]
    assert {"artifactType": [SIG]} in seen, seen
    # not cached: a new referrer shows at once
    new = descriptor(b"sig2", SIG, "another signature")
    fake_upstream.add_referrer("acme/app", img.digest, new)
    r = get(rf, f"/v2/acme/app/referrers/{img.digest}?artifactType={SIG}")
    assert r.json()["manifests"] == [sig, new], r


def test_referrers_of_unknown_digest_is_an_empty_index(fake_upstream, fake_facade, subject):
    fake_upstream.referrers_api = False  # like distribution 2.8: the endpoint is a 404
    rf = fake_facade()
    r = get(rf, f"/v2/acme/app/referrers/sha256:{'0' * 64}")
    assert r.status == 200 and r.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}, r


def test_referrers_tag_schema_fallback(fake_upstream, fake_facade, subject):
    img, sig, sbom = subject
    fake_upstream.referrers_api = False
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [sig, sbom]}).encode()
    fake_upstream.put_manifest("acme/app", index, OCI_INDEX, tags=["sha256-" + img.digest.split(":")[1]])
    rf = fake_facade()
    r = get(rf, f"/v2/acme/app/referrers/{img.digest}")
    assert r.status == 200 and r.json()["manifests"] == [sig, sbom], f"{r!r}\n{diag(rf)}"
    r = get(rf, f"/v2/acme/app/referrers/{img.digest}?artifactType={SBOM.replace('+', '%2B')}")
    assert r.json()["manifests"] == [sbom] and r.headers["OCI-Filters-Applied"] == "artifactType", r
    # the same digest under another repository: that repository's answer (none)
    r = get(rf, f"/v2/acme/other/referrers/{img.digest}")
    assert r.status == 200 and r.json()["manifests"] == [], r
    assert fake_upstream.count("GET", "/v2/acme/other/manifests/sha256-" + img.digest.split(":")[1]) == 1


def test_referrers_bad_requests(fake_upstream, fake_facade, subject):
    img, _, _ = subject
    rf = fake_facade()
    r = get(rf, "/v2/acme/app/referrers/sha256:nothex")
    assert r.status == 400 and "DIGEST_INVALID" in r.error_codes(), r
    r = get(rf, f"/v2/acme/app/referrers/{img.digest}?artifactType=notamediatype")
    assert r.status == 400 and "UNSUPPORTED" in r.error_codes(), r
    # an upstream that answers garbage is a clean 502, not a crash
    fake_upstream.referrers_api = False
    fake_upstream.put_manifest("acme/app", b'{"manifests": [{"digest": 5}]}', OCI_INDEX,
                               tags=["sha256-" + img.digest.split(":")[1]])
    r = get(rf, f"/v2/acme/app/referrers/{img.digest}")
    assert r.status == 502 and "not a descriptor" in r.body.decode(), r


SUITE = os.environ.get("OCI_CONFORMANCE_SUITE", "")


def test_conformance_content_discovery_through_regfacade(procs, tmp_path):
    if not SUITE or not os.access(SUITE, os.X_OK):
        pytest.skip("OCI conformance suite not given: OCI_CONFORMANCE_SUITE is unset or not executable "
                    "(`make test` sets it when the suite is installed beside the repository)")
    reg = registries.start_registry(procs, str(tmp_path / "registry"), name="registry-discovery")
    rf = start_facade(procs, tmp_path, {"up": {"url": reg.url}}, default_upstream="up", tag_ttl_seconds=0)
    front = ReferrersFront(rf.url, reg.url).start()
    try:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
               "OCI_ROOT_URL": front.url, "OCI_NAMESPACE": "conformance/discovery",
               "OCI_TEST_CONTENT_DISCOVERY": "1", "OCI_HIDE_SKIPPED_WORKFLOWS": "1", "OCI_DEBUG": "0",
               "OCI_REPORT_DIR": "none"}
        r = subprocess.run([SUITE, "-ginkgo.no-color", "-ginkgo.v"], env=env, cwd=str(tmp_path), capture_output=True,
                           text=True, timeout=600)
    finally:
        front.stop()
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"content discovery: exit {r.returncode}\n{out[-8000:]}\n{diag(rf)}"
    m = re.search(r"(\d+) Passed \| (\d+) Failed", out)
    # setup (4), tag listing (3), referrers (4), teardown (4)
    assert m and (int(m.group(1)), int(m.group(2))) == (15, 0), out[-4000:]
    # The referrers and tag specs ran (-ginkgo.v names each one run).
    for spec in ("GET request to list tags should yield 200 response",
                 "GET number of tags should be limitable by `n` query parameter",
                 "GET start of tag is set by `last` query parameter",
                 "GET request to nonexistent blob should result in empty 200 response",
                 "GET request to existing blob should yield 200",
                 "GET request to existing blob with filter should yield 200",
                 "GET request to missing manifest should yield 200"):
        assert f"Content Discovery Test content discovery endpoints" in out and spec in out, spec
    log = rf.log()
    assert "/referrers/" in log and "/tags/list" in log, log[-3000:]


def test_assembled_image_has_none_of_its_bases_referrers(fake_upstream, procs, tmp_path, subject):
    """A signature or SBOM of the base speaks of the base's bytes; the
    assembled image is other bytes (a new digest): nothing refers to it."""
    import layerkit
    img, sig, sbom = subject
    fake_upstream.referrers_api = True
    files = layerkit.LayerFiles(str(tmp_path / "files"))
    rf = layerkit.start_layers_facade(procs, str(tmp_path / "rf"), fake_upstream.url,
                                      {"ws": {"repository": "acme/app", "upstream": "up",
                                              "layers": ["base", {"file": files.tools["path"]}]}})
    _, m, digest = layerkit.manifest_ok(rf, "v/ws")
    assert digest != img.digest
    r = get(rf, f"/v2/v/ws/referrers/{digest}")
    assert r.status == 200 and r.json()["manifests"] == [], f"{r!r}\n{diag(rf)}"
    r = get(rf, f"/v2/v/ws/referrers/{img.digest}")  # the base's own digest still has them
    assert r.status == 200 and r.json()["manifests"] == [sig, sbom], r


ATTACH_POLICY = r'''
local mirror = require "regfacade.mirror"
return {
    resolve = function(req)
        local res = mirror.resolve(req)
        if req.kind == "referrers" and req.repository == "acme/app" then
            -- an attestation of the policy's own, for whatever digest is asked
            res.referrers = { { mediaType = "application/vnd.oci.image.manifest.v1+json",
                                digest = "sha256:" .. string.rep("ab", 32), size = 123,
                                artifactType = "application/vnd.example.attestation",
                                annotations = { ["org.example.by"] = "policy" } } }
        elseif req.kind == "referrers" and req.repository == "acme/bad" then
            res.referrers = { { mediaType = "x/y", digest = "not-a-digest", size = 1 } }
        end
        return res
    end,
}
'''


def test_policy_attaches_referrers(fake_upstream, procs, tmp_path, subject):
    from harness import Regfacade
    img, sig, sbom = subject
    fake_upstream.referrers_api = True
    (tmp_path / "policy.lua").write_text(ATTACH_POLICY)
    rf = Regfacade(procs, str(tmp_path), {"cache": {"dir": str(tmp_path / "cache")},
                                          "policy": {"file": str(tmp_path / "policy.lua")},
                                          "upstreams": {"fake": {"url": fake_upstream.url}}}).start()
    r = get(rf, f"/v2/acme/app/referrers/{img.digest}")
    assert r.status == 200, f"{r!r}\n{diag(rf)}"
    got = r.json()["manifests"]
    assert got[:2] == [sig, sbom] and got[2]["annotations"] == {"org.example.by": "policy"}, got
    # filtered like the upstream's
    r = get(rf, f"/v2/acme/app/referrers/{img.digest}?artifactType=application/vnd.example.attestation")
    assert [d["artifactType"] for d in r.json()["manifests"]] == ["application/vnd.example.attestation"], r
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    # a malformed attachment is the policy's error: a clear 500, nothing served as right
    r = get(rf, f"/v2/acme/bad/referrers/{img.digest}")
    assert r.status == 500 and "referrers[1] must be a descriptor" in r.body.decode(), r
