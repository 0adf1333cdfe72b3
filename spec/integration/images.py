"""Test images, built offline once per session, and pushed into registries.

build_images(workdir) makes OCI layouts under workdir:
  small    an OCI image: busybox-static rootfs (/bin/busybox + sh, cat, echo,
           ls, env) plus /etc/regfacade-test.txt (TEST_FILE_CONTENT); config
           with Env PATH and Cmd; built with umoci.
  index    an OCI image index with linux/amd64 and linux/arm64 manifests; both
           share the busybox layer, only the config's architecture differs.
  big      one layer: a gzip tar holding BIG_FILE_SIZE random bytes (the blob
           is > 100 MiB: random data does not compress).
("schema2" is `small` pushed with `skopeo copy --format v2s2`.)

push_images(built, host, ...) pushes them and returns, per name, a dict:
  repo, tag, ref ("HOST/REPO:TAG" without transport), media_type,
  manifest_digest, manifest_size, config_digest, config_size,
  layers [{digest, size, media_type}], blobs (config + layers, digest->size),
  and for the index: children {arch: same dict for that platform's manifest}.
The digests are read back from the registry (`skopeo inspect --raw`).
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile

TEST_FILE = "/etc/regfacade-test.txt"
TEST_FILE_CONTENT = "regfacade integration test image: hello through the facade\n"
BIG_FILE_SIZE = 110 * 1024 * 1024
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "cat", "echo", "ls", "env")
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

# name -> (layout tag, repository, tag, skopeo copy extra args)
PUSH_PLAN = {
    "oci": ("small", "regfacade-test/oci", "v1", []),
    "schema2": ("small", "regfacade-test/schema2", "v1", ["--format", "v2s2"]),
    "index": ("multi", "regfacade-test/multi", "v1", ["--all"]),
    "big": ("big", "regfacade-test/big", "v1", []),
}


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def run(argv, **kw):
    """subprocess.run that raises with the command's output in the message."""
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}\n"
                           f"stdout: {r.stdout[-4000:]}\nstderr: {r.stderr[-4000:]}")
    return r


class Layout:
    """Minimal reader/writer of an OCI image layout folder."""

    def __init__(self, path):
        self.path = path

    def blob_path(self, digest):
        algo, hexd = digest.split(":", 1)
        return os.path.join(self.path, "blobs", algo, hexd)

    def read_blob(self, digest):
        with open(self.blob_path(digest), "rb") as f:
            return f.read()

    def write_blob(self, data):
        digest = "sha256:" + sha256_hex(data)
        p = self.blob_path(digest)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        return digest, len(data)

    def index(self):
        with open(os.path.join(self.path, "index.json")) as f:
            return json.load(f)

    def write_index(self, idx):
        with open(os.path.join(self.path, "index.json"), "w") as f:
            json.dump(idx, f)

    def descriptor(self, tag):
        for d in self.index()["manifests"]:
            if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return d
        raise KeyError(f"{self.path} has no tag {tag}")

    def set_tag(self, tag, desc):
        idx = self.index()
        idx["manifests"] = [d for d in idx["manifests"]
                            if d.get("annotations", {}).get("org.opencontainers.image.ref.name")
                            != tag]
        desc = dict(desc)
        desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
        idx["manifests"].append(desc)
        self.write_index(idx)


def _build_small(layout_dir, workdir):
    """umoci: init, new, unpack, fill the rootfs, repack, config."""
    run(["umoci", "init", "--layout", layout_dir])
    run(["umoci", "new", "--image", f"{layout_dir}:small"])
    bundle = os.path.join(workdir, "bundle")
    run(["umoci", "unpack", "--image", f"{layout_dir}:small", bundle])
    rootfs = os.path.join(bundle, "rootfs")
    for d in ("bin", "etc", "tmp"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(rootfs, "bin", "busybox"))
    os.chmod(os.path.join(rootfs, "bin", "busybox"), 0o755)
    for a in APPLETS:
        os.symlink("busybox", os.path.join(rootfs, "bin", a))
    with open(os.path.join(rootfs, TEST_FILE.lstrip("/")), "w") as f:
        f.write(TEST_FILE_CONTENT)
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    run(["umoci", "repack", "--image", f"{layout_dir}:small", bundle])
    run(["umoci", "config", "--image", f"{layout_dir}:small",
         "--config.env", f"PATH={IMAGE_PATH}", "--config.cmd", "/bin/sh",
         "--architecture", "amd64", "--os", "linux",
         "--history.created_by", "regfacade test: config"])
    shutil.rmtree(bundle)


def _build_index(layout_dir):
    """Tag small-arm64 (same layers, config architecture arm64) and an index
    `multi` listing small (amd64) and small-arm64 (arm64)."""
    run(["umoci", "config", "--image", f"{layout_dir}:small", "--tag", "small-arm64",
         "--architecture", "arm64", "--no-history"])
    lay = Layout(layout_dir)
    entries = []
    for tag, arch in (("small", "amd64"), ("small-arm64", "arm64")):
        d = lay.descriptor(tag)
        entries.append({"mediaType": d["mediaType"], "digest": d["digest"], "size": d["size"],
                        "platform": {"architecture": arch, "os": "linux"}})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    data = json.dumps(index, separators=(",", ":")).encode()
    digest, size = lay.write_blob(data)
    lay.set_tag("multi", {"mediaType": OCI_INDEX, "digest": digest, "size": size})


def _build_big(layout_dir):
    """A one-layer image whose layer is a gzip tar (level 1) holding
    BIG_FILE_SIZE random bytes at /big.bin; written straight into the layout."""
    lay = Layout(layout_dir)
    raw = io.BytesIO()
    payload = os.urandom(BIG_FILE_SIZE)
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("big.bin")
        ti.size = len(payload)
        ti.mode = 0o644
        ti.mtime = 0
        tf.addfile(ti, io.BytesIO(payload))
    tar_bytes = raw.getvalue()
    del payload
    diff_id = "sha256:" + sha256_hex(tar_bytes)
    gz = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    del tar_bytes
    layer_digest, layer_size = lay.write_blob(gz)
    del gz
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [f"PATH={IMAGE_PATH}"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "regfacade test: big"}],
    }
    cdig, csize = lay.write_blob(json.dumps(config, separators=(",", ":")).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cdig, "size": csize},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": layer_size}],
    }
    mdig, msize = lay.write_blob(json.dumps(manifest, separators=(",", ":")).encode())
    lay.set_tag("big", {"mediaType": OCI_MANIFEST, "digest": mdig, "size": msize})


class BuiltImages:
    def __init__(self, workdir, layout):
        self.workdir = workdir
        self.layout = layout  # one OCI layout holding tags small, small-arm64, multi, big

    def oci_ref(self, tag):
        return f"oci:{self.layout}:{tag}"


def build_images(workdir):
    """Build every test image into workdir/layout (one OCI layout)."""
    os.makedirs(workdir, exist_ok=True)
    layout = os.path.join(workdir, "layout")
    _build_small(layout, workdir)
    _build_index(layout)
    _build_big(layout)
    return BuiltImages(workdir, layout)


# --------------------------------------------------------------------------
# pushing and reading back
# --------------------------------------------------------------------------

def skopeo_raw(ref, creds=None, tls_verify=False, timeout=120):
    """Manifest bytes of docker://ref (`skopeo inspect --raw`)."""
    argv = ["skopeo", "inspect", "--raw", f"--tls-verify={'true' if tls_verify else 'false'}"]
    if creds:
        argv += ["--creds", creds]
    else:
        argv += ["--no-creds"]
    argv.append(f"docker://{ref}")
    r = subprocess.run(argv, capture_output=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: "
                           f"{r.stderr.decode(errors='replace')[-4000:]}")
    return r.stdout


def _image_info(manifest_bytes):
    m = json.loads(manifest_bytes)
    media_type = m.get("mediaType")
    if media_type is None:  # optional in OCI; umoci leaves it out
        media_type = OCI_INDEX if "manifests" in m else OCI_MANIFEST
    info = {
        "media_type": media_type,
        "manifest_digest": "sha256:" + sha256_hex(manifest_bytes),
        "manifest_size": len(manifest_bytes),
        "manifest": m,
    }
    if "config" in m:
        info["config_digest"] = m["config"]["digest"]
        info["config_size"] = m["config"]["size"]
        info["layers"] = [{"digest": l["digest"], "size": l["size"],
                           "media_type": l["mediaType"]} for l in m["layers"]]
        blobs = {m["config"]["digest"]: m["config"]["size"]}
        for l in m["layers"]:
            blobs[l["digest"]] = l["size"]
        info["blobs"] = blobs
    return info


def describe(host, repo, tag, creds=None):
    """Read an image back from host: manifest digest, config, layers, sizes;
    for an index also each child (by architecture)."""
    raw = skopeo_raw(f"{host}/{repo}:{tag}", creds=creds)
    info = _image_info(raw)
    info.update({"repo": repo, "tag": tag, "ref": f"{host}/{repo}:{tag}"})
    m = info["manifest"]
    if "manifests" in m:
        children = {}
        blobs = {}
        for d in m["manifests"]:
            craw = skopeo_raw(f"{host}/{repo}@{d['digest']}", creds=creds)
            c = _image_info(craw)
            assert c["manifest_digest"] == d["digest"], (c["manifest_digest"], d)
            children[d["platform"]["architecture"]] = c
            blobs.update(c["blobs"])
        info["children"] = children
        info["blobs"] = blobs
    return info


def push_image(built, name, host, creds=None, repo=None, tag=None):
    """skopeo copy one image of PUSH_PLAN into host; returns describe()."""
    layout_tag, prepo, ptag, extra = PUSH_PLAN[name]
    repo = repo or prepo
    tag = tag or ptag
    argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"] + list(extra)
    if creds:
        argv += ["--dest-creds", creds]
    argv += [built.oci_ref(layout_tag), f"docker://{host}/{repo}:{tag}"]
    run(argv, timeout=300)
    return describe(host, repo, tag, creds=creds)


def push_images(built, host, creds=None, names=None):
    """Push the named images (default: all of PUSH_PLAN) into host; returns
    {name: describe() dict}."""
    out = {}
    for name in (names or list(PUSH_PLAN)):
        out[name] = push_image(built, name, host, creds=creds)
    return out
