"""Docker Engine (Debian's docker.io, dockerd 20.10) as a client of the real
binary, the most common client there is, in both of the ways operators point
it at a registry facade:

- as a registry of its own (`insecure-registries`: plain HTTP on loopback),
  pulling by tag and by digest, and running what it pulled, including an
  image regfacade assembles with an added file layer;
- as Docker Hub's mirror (`registry-mirrors`): Docker Hub names
  (`rf-docker`, `acme/rf-docker`), which dockerd sends to the mirror as
  /v2/library/... and /v2/acme/... without any `ns` parameter, so they go to
  `default_upstream`. This machine has no route to Docker Hub: a pull that
  did not go through the mirror fails, and regfacade's access log shows the
  request it served.

dockerd runs with its own data root, exec root, socket and daemon.json
(no iptables, no bridge, vfs), in the test's temp folder; containers run with
--network none. It is stopped by PID with everything it started.
"""
import json
import os

import pytest

import clients
import images
import layerkit
from layerkit import manifest_ok, start_layers_facade

MIRRORED = {"library": ("library/rf-docker", "v1"), "org": ("acme/rf-docker", "v1")}


@pytest.fixture(scope="module")
def setup(session_procs, plain_registry, built_images, tmp_path_factory):
    if not (os.path.exists(clients.DOCKERD) and os.path.exists(clients.DOCKER)):
        pytest.fail(f"{clients.DOCKERD} / {clients.DOCKER} missing: Debian's docker.io is a test package")
    d = str(tmp_path_factory.mktemp("docker"))
    # The small image again, under Docker Hub style names the mirror serves.
    for repo, tag in MIRRORED.values():
        images.push_image(built_images, "oci", plain_registry.host, repo=repo, tag=tag)
    files = layerkit.LayerFiles(os.path.join(d, "files"))
    variants = {"tools": {"repository": plain_registry.images["schema2"]["repo"],
                          "layers": ["base", {"file": files.tools["path"], "created_by": "ADD tools"}]}}
    rf = start_layers_facade(session_procs, os.path.join(d, "rf"), plain_registry.url, variants)
    dockerd = clients.Dockerd(session_procs, os.path.join(d, "dockerd"), insecure=[rf.host], mirrors=[rf.url])
    try:
        dockerd.start()
    except RuntimeError as e:
        pytest.fail(f"dockerd could not start on this machine: {e}")

    class Setup:
        pass

    s = Setup()
    s.rf, s.dockerd, s.files, s.reg = rf, dockerd, files, plain_registry
    try:
        yield s
    finally:
        dockerd.stop()
        rf.stop()


@pytest.fixture
def docker(setup):
    yield setup.dockerd
    setup.dockerd.remove_images()  # each test pulls from scratch


def access_paths(rf):
    """The paths of every request in regfacade's JSON access log."""
    out = []
    with open(rf.proc.log_path, "rb") as f:
        for line in f.read().decode(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "access":
                out.append(rec.get("path", ""))
    return out


def assert_ok(r, what, setup):
    assert r.returncode == 0, (f"{what}: exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}\n"
                               f"{clients.diag(setup.rf)}\ndockerd: {setup.dockerd.log()[-3000:]}")
    return r.stdout


def test_docker_pulls_and_runs_through_insecure_registry(setup, docker):
    for name in ("oci", "schema2"):
        ref = f"{setup.rf.host}/{setup.reg.images[name]['repo']}:v1"
        assert_ok(docker.pull(ref, check=False), f"docker pull {ref}", setup)
        out = assert_ok(docker.run(ref, "cat", images.TEST_FILE, check=False), f"docker run {ref}", setup)
        assert out == images.TEST_FILE_CONTENT


def test_docker_runs_image_with_injected_layer(setup, docker):
    ref = f"{setup.rf.host}/v/tools:v1"
    assert_ok(docker.pull(ref, check=False), f"docker pull {ref}", setup)
    out = assert_ok(docker.run(ref, "sh", "-c", f"cat /opt/tools/hello.txt {images.TEST_FILE}", check=False),
                    f"docker run {ref}", setup)
    assert out.encode() == setup.files.TOOLS_TEXT + images.TEST_FILE_CONTENT.encode()


def test_docker_pulls_assembled_image_by_digest(setup, docker):
    _, m, digest = manifest_ok(setup.rf, "v/tools")
    ref = f"{setup.rf.host}/v/tools@{digest}"
    assert_ok(docker.pull(ref, check=False), f"docker pull {ref}", setup)
    # dockerd records the digest it pulled and verified
    r = docker.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref, check=False)
    assert ref in json.loads(assert_ok(r, "docker image inspect", setup))
    out = assert_ok(docker.run(ref, "cat", "/opt/tools/hello.txt", check=False), f"docker run {ref}", setup)
    assert out.encode() == setup.files.TOOLS_TEXT


def test_docker_hub_names_through_registry_mirror(setup, docker):
    for short, (repo, tag) in (("rf-docker:v1", MIRRORED["library"]), ("acme/rf-docker:v1", MIRRORED["org"])):
        before = len(access_paths(setup.rf))
        assert_ok(docker.pull(short, check=False), f"docker pull {short} (Docker Hub name, via the mirror)", setup)
        served = access_paths(setup.rf)[before:]
        assert f"/v2/{repo}/manifests/{tag}" in served, served
        out = assert_ok(docker.run(short, "cat", images.TEST_FILE, check=False), f"docker run {short}", setup)
        assert out == images.TEST_FILE_CONTENT


def test_docker_pull_of_unknown_image_fails_cleanly(setup, docker):
    ref = f"{setup.rf.host}/regfacade-test/no-such-image:v1"
    r = docker.pull(ref, check=False)
    assert r.returncode != 0
    assert "not found" in (r.stderr + r.stdout).lower() or "unknown" in (r.stderr + r.stdout).lower(), r.stderr
