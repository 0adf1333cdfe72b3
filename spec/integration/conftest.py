import pytest

from harness import ProcessGroup


@pytest.fixture
def procs(tmp_path):
    """A ProcessGroup whose processes are all stopped when the test ends."""
    g = ProcessGroup(str(tmp_path))
    try:
        yield g
    finally:
        g.stop_all()


# ---- fake upstream (fake_upstream.py): used by test_api.py and test_bad_input.py ----

@pytest.fixture
def fake_upstream():
    """A programmable in-process OCI registry, stopped when the test ends."""
    from fake_upstream import FakeUpstream
    f = FakeUpstream().start()
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
def fake_facade(procs, tmp_path, fake_upstream):
    """Factory: start a regfacade in tmp_path whose upstream "fake" is
    fake_upstream. fake_facade(upstream={...extra upstream keys},
    upstreams={...more upstreams}, config={...top-level keys}, tag_ttl=60).
    The result is a started harness.Regfacade with .cache_dir set."""
    import os
    from harness import Regfacade

    def start(upstream=None, upstreams=None, config=None, tag_ttl=60, name="regfacade"):
        ups = {"fake": dict({"url": fake_upstream.url}, **(upstream or {}))}
        ups.update(upstreams or {})
        cache_dir = os.path.join(str(tmp_path), f"{name}-cache")
        cfg = {"cache": {"dir": cache_dir, "tag_ttl_seconds": tag_ttl}, "upstreams": ups}
        if len(ups) > 1:
            cfg["default_upstream"] = "fake"
        cfg.update(config or {})
        rf = Regfacade(procs, str(tmp_path), cfg, name=name)
        rf.cache_dir = cfg["cache"]["dir"]
        started.append(rf)
        return rf.start()

    started = []
    yield start
    # Shown by pytest only when the test failed.
    for rf in started:
        try:
            with open(os.path.join(rf.workdir, f"{rf.name}.log"), "rb") as f:
                tail = f.read()[-6000:].decode("utf-8", "replace")
        except OSError:
            tail = "(no log)"
        print(f"----- {rf.name} log tail -----\n{tail}")


# ---------------------------------------------------------------------------
# Real peers (registries.py, images.py, clients.py): session-scoped, stopped
# by PID when the session ends.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def session_procs(tmp_path_factory):
    """A ProcessGroup for session-long processes (registries, containerd)."""
    g = ProcessGroup(str(tmp_path_factory.mktemp("session-procs")))
    try:
        yield g
    finally:
        g.stop_all()


@pytest.fixture(scope="session")
def built_images(tmp_path_factory):
    """Every test image (images.py), built once per session in one OCI layout."""
    import images
    return images.build_images(str(tmp_path_factory.mktemp("images")))


class SeededRegistry:
    """A running registries.Registry plus what was pushed into it:
    `images` is {name: images.describe() dict}."""

    def __init__(self, registry, pushed):
        self.registry = registry
        self.images = pushed

    def __getattr__(self, name):
        return getattr(self.registry, name)


@pytest.fixture(scope="session")
def plain_registry(session_procs, built_images, tmp_path_factory):
    """docker-registry without auth, seeded with every image of images.PUSH_PLAN
    (oci, schema2, index, big)."""
    import images
    import registries
    reg = registries.start_registry(session_procs, str(tmp_path_factory.mktemp("reg-plain")),
                                    name="registry-plain")
    return SeededRegistry(reg, images.push_images(built_images, reg.host))


HTPASSWD_USER = "rf-alice"
HTPASSWD_PASSWORD = "htpasswd-secret-1"
TOKEN_USER = "rf-bob"
TOKEN_PASSWORD = "token-secret-2"


@pytest.fixture(scope="session")
def htpasswd_registry(session_procs, built_images, tmp_path_factory):
    """docker-registry with htpasswd (Basic) auth, seeded with the small OCI image."""
    import images
    import registries
    reg = registries.start_registry(session_procs, str(tmp_path_factory.mktemp("reg-htpasswd")),
                                    name="registry-htpasswd", mode="htpasswd",
                                    username=HTPASSWD_USER, password=HTPASSWD_PASSWORD)
    return SeededRegistry(reg, images.push_images(built_images, reg.host, creds=reg.creds,
                                                  names=["oci"]))


@pytest.fixture
def policy_facade(procs, tmp_path, htpasswd_registry):
    """Factory: start a regfacade in tmp_path/NAME running the policy text
    given (as policy.lua there), whose one upstream "reg" is
    htpasswd_registry (with its account): policy_facade(text, policy={...more
    policy keys}, name=...). The result has .registry set."""
    from harness import Regfacade

    def start(text=None, policy=None, name="regfacade"):
        work = tmp_path / name
        work.mkdir()
        (work / "upstream-password").write_text(HTPASSWD_PASSWORD)
        pol = dict(policy or {})
        if text is not None:
            (work / "policy.lua").write_text(text)
            pol["file"] = "policy.lua"
        rf = Regfacade(procs, str(work), {
            "upstreams": {"reg": {"url": htpasswd_registry.url, "username": HTPASSWD_USER,
                                  "password_file": "upstream-password"}},
            "policy": pol,
        }, name=name).start()
        rf.registry = htpasswd_registry
        return rf

    return start


@pytest.fixture(scope="session")
def token_server(tmp_path_factory):
    """The Bearer token endpoint for token_registry (a thread; stopped at the end)."""
    import registries
    ts = registries.TokenServer(str(tmp_path_factory.mktemp("token-server")), TOKEN_USER,
                                TOKEN_PASSWORD).start()
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="session")
def token_registry(session_procs, built_images, token_server, tmp_path_factory):
    """docker-registry with Bearer token auth (token_server), seeded with the
    small OCI image as regfacade-test/oci:v1 and :v2."""
    import images
    import registries
    reg = registries.start_registry(session_procs, str(tmp_path_factory.mktemp("reg-token")),
                                    name="registry-token", mode="token",
                                    token_server=token_server,
                                    username=TOKEN_USER, password=TOKEN_PASSWORD)
    pushed = images.push_images(built_images, reg.host, creds=reg.creds, names=["oci"])
    pushed["oci-v2"] = images.push_image(built_images, "oci", reg.host, creds=reg.creds, tag="v2")
    token_server.reset()
    return SeededRegistry(reg, pushed)


@pytest.fixture(scope="session")
def containerd(session_procs, tmp_path_factory):
    """A containerd daemon (root, state, socket in a temp folder). Use
    containerd.new_namespace() per test so nothing is shared between tests."""
    import clients
    # AF_UNIX paths are short: keep this one out of pytest's deep tmp tree.
    import tempfile
    d = tempfile.mkdtemp(prefix="rf-ctrd-")
    c = clients.Containerd(session_procs, d).start()
    try:
        yield c
    finally:
        c.stop()
        import shutil
        subprocess_umount_all(d)
        shutil.rmtree(d, ignore_errors=True)


def subprocess_umount_all(root):
    """Unmount anything containerd left mounted under root (best effort)."""
    import subprocess
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f]
    except OSError:
        return
    for m in sorted((m for m in mounts if m.startswith(root + "/")), reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)
