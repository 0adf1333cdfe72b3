"""The OCI distribution-spec conformance suite (v1.1.1), pull workflow,
through the real binary: a third-party judge of the pull API.

The suite is a prebuilt test binary that this repository does not hold;
`make test` passes its path in OCI_CONFORMANCE_SUITE (the Makefile says where
it looks). Without it these tests are skipped, saying so.

With OCI_TAG_NAME, OCI_MANIFEST_DIGEST and OCI_BLOB_DIGEST set the suite
only reads (GET and HEAD): the tag, its manifest by tag and by digest, a
blob, nonexistent manifests and blobs (".INVALID_MANIFEST_NAME",
"sha256:totallywrong", ...) and the error body. 14 specs, exit 0 only when
all pass. Two setups:

- regfacade as a mirror of a real registry (docker-registry, content built
  by umoci and pushed by skopeo), two repositories of it served side by side;
- regfacade serving an image its policy assembles (the base plus a file
  layer), the suite's blob being the added layer.
"""
import json
import os
import re
import subprocess

import pytest

import layerkit
from clients import diag, http_request, start_facade
from layerkit import OCI_MANIFEST, start_layers_facade

SUITE = os.environ.get("OCI_CONFORMANCE_SUITE", "")
PULL_SPECS = 14


@pytest.fixture(scope="module")
def suite():
    if not SUITE:
        pytest.skip("OCI conformance suite not given: OCI_CONFORMANCE_SUITE is unset "
                    "(`make test` sets it when the suite is installed beside the repository)")
    if not os.access(SUITE, os.X_OK):
        pytest.skip(f"OCI conformance suite not found: {SUITE} is not an executable file")
    return SUITE


def run_pull_workflow(suite, tmp_path, rf, namespace, tag, manifest_digest, blob_digest):
    """Run the suite's read-only pull workflow against rf; return its output."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "OCI_ROOT_URL": rf.url,
        "OCI_NAMESPACE": namespace,
        "OCI_TEST_PULL": "1",
        "OCI_TAG_NAME": tag,
        "OCI_MANIFEST_DIGEST": manifest_digest,
        "OCI_BLOB_DIGEST": blob_digest,
        "OCI_HIDE_SKIPPED_WORKFLOWS": "1",
        "OCI_DEBUG": "0",
        "OCI_REPORT_DIR": "none",
    }
    r = subprocess.run([suite, "-ginkgo.no-color"], env=env, cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"conformance suite exited {r.returncode} on {namespace}:\n{out[-8000:]}\n{diag(rf)}"
    m = re.search(r"(\d+) Passed \| (\d+) Failed", out)
    assert m, f"no pass count in the suite's output:\n{out[-4000:]}"
    assert (int(m.group(1)), int(m.group(2))) == (PULL_SPECS, 0), out[-8000:]
    return out


def manifest_by_tag(rf, repo, tag):
    r = http_request(f"{rf.url}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    assert r.status == 200, (r, diag(rf))
    assert r.headers["content-type"] == OCI_MANIFEST
    return r.headers["docker-content-digest"], json.loads(r.body)


def test_pull_workflow_mirror_of_docker_registry(suite, plain_registry, procs, tmp_path):
    rf = start_facade(procs, tmp_path, {"up": {"url": plain_registry.url}}, default_upstream="up")
    oci = plain_registry.images["oci"]
    # Two repositories of the upstream: each passes with its own tag, manifest and blob.
    for repo, info, tag in ((oci["repo"], oci, oci["tag"]),
                            ("regfacade-test/big", plain_registry.images["big"], "v1")):
        digest, m = manifest_by_tag(rf, repo, tag)
        assert digest == info["manifest_digest"]
        run_pull_workflow(suite, tmp_path, rf, repo, tag, digest, m["layers"][-1]["digest"])


def test_pull_workflow_assembled_image(suite, plain_registry, procs, tmp_path):
    files = layerkit.LayerFiles(str(tmp_path / "files"))
    oci = plain_registry.images["oci"]
    variants = {"tools": {"repository": oci["repo"],
                          "layers": ["base", {"file": files.tools["path"], "created_by": "ADD tools"}]}}
    rf = start_layers_facade(procs, str(tmp_path / "rf"), plain_registry.url, variants)
    digest, m = manifest_by_tag(rf, "v/tools", "v1")
    assert digest != oci["manifest_digest"]  # assembled, not the base
    assert m["layers"][-1]["digest"] == files.tools["digest"]
    run_pull_workflow(suite, tmp_path, rf, "v/tools", "v1", digest, files.tools["digest"])


# ---------------------------------------------------------------------------
# Without the suite: the two answers it found wrong, checked here directly.
# ---------------------------------------------------------------------------

SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def test_manifest_by_digest_is_served_whatever_the_accept_header(plain_registry, procs, tmp_path):
    """A digest pins the bytes (distribution serves them so too); Accept only
    chooses what a tag names. And a name that is not a tag is unknown: 404."""
    rf = start_facade(procs, tmp_path, {"up": {"url": plain_registry.url}}, default_upstream="up")
    oci = plain_registry.images["oci"]
    up = http_request(f"{plain_registry.url}/v2/{oci['repo']}/manifests/{oci['manifest_digest']}",
                      headers={"Accept": OCI_MANIFEST})
    assert up.status == 200
    for accept in (DOCKER_MANIFEST, SCHEMA1, "text/plain"):
        for method in ("GET", "HEAD"):
            r = http_request(f"{rf.url}/v2/{oci['repo']}/manifests/{oci['manifest_digest']}", method=method,
                             headers={"Accept": accept})
            assert r.status == 200, (accept, method, r, diag(rf))
            assert r.headers["content-type"] == OCI_MANIFEST
            assert r.headers["docker-content-digest"] == oci["manifest_digest"]
            assert int(r.headers["content-length"]) == len(up.body)
            if method == "GET":
                assert r.body == up.body
        # by tag, Accept still decides
        r = http_request(f"{rf.url}/v2/{oci['repo']}/manifests/{oci['tag']}", headers={"Accept": accept})
        assert r.status in (404, 415), (accept, r)
    for method in ("GET", "HEAD"):
        r = http_request(f"{rf.url}/v2/{oci['repo']}/manifests/.INVALID_MANIFEST_NAME", method=method)
        assert r.status == 404, (method, r)
        if method == "GET":
            assert r.error_codes() == ["MANIFEST_UNKNOWN"], r
