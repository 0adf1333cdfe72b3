"""Bad layer input through the real binary.

Each bad source or bad policy answer fails only the requests that need it:
an OCI error JSON whose message names the layer and the reason, a log line,
nothing half-built stored (no cache/generated entry for the decision, no
stray spool, no blob of the bad file, no manifest of a half-assembled
index), and the same process keeps serving other images. A missing file is
loaded lazily: create it, ask again, and the image is served.

The policy is layerkit.LAYER_POLICY (v/<variant> -> options.variants).
"""
import gzip
import json
import os

import pytest

import clients
import layerkit
from clients import diag
from layerkit import (OCI_LAYER_GZIP, cache_blobs, generated_entries, get_blob, get_manifest, manifest_ok, sha256,
                      start_layers_facade, tmp_files)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bad-layers"))
    files = layerkit.LayerFiles(os.path.join(d, "good"))
    good_gz = open(files.tools["path"], "rb").read()
    paths = {}

    def put(name, data):
        p = os.path.join(d, name)
        with open(p, "wb") as f:
            f.write(data)
        paths[name] = p
        return p

    put("notar.tar", b"this is a text file, not a tar archive\n" * 40)
    put("notar.tar.gz", gzip.compress(b"gzip of text, not of a tar archive\n" * 40, mtime=0))
    big = layerkit.tar_bytes({f"f{i}.bin": os.urandom(4096) for i in range(8)})
    gz = bytearray(gzip.compress(big, mtime=0))
    for i in range(len(gz) // 2, len(gz) // 2 + 64):
        gz[i] ^= 0xFF
    put("corrupt.tar.gz", bytes(gz))
    put("truncated.tar.gz", good_gz[: len(good_gz) // 2])
    put("empty.tar.gz", b"")
    paths["missing"] = os.path.join(d, "later", "appears-later.tar.gz")

    class B:
        pass

    b = B()
    b.dir = d
    b.paths = paths
    b.files = files
    return b


CASES = {
    # variant: (layers, [fragments the error message must hold])
    "notar": (lambda p: [{"file": p["notar.tar"]}], ["notar.tar", "not a tar archive"]),
    "notar_gz": (lambda p: [{"file": p["notar.tar.gz"]}], ["notar.tar.gz", "not a tar archive inside the gzip"]),
    "corrupt_gz": (lambda p: [{"file": p["corrupt.tar.gz"]}], ["corrupt.tar.gz", "corrupt gzip data"]),
    "truncated_gz": (lambda p: [{"file": p["truncated.tar.gz"]}], ["truncated.tar.gz", "truncated gzip"]),
    "empty_file": (lambda p: [{"file": p["empty.tar.gz"]}], ["empty.tar.gz", "not a tar archive"]),
    "missing_file": (lambda p: [{"file": p["missing"]}], ["appears-later.tar.gz", "No such file or directory"]),
    "named_broken": (lambda p: ["broken"], ["layer broken", "notar.tar", "not a tar archive"]),
    "named_unknown": (lambda p: ["nosuch"], ['"nosuch"', "not defined in the config's layers"]),
    "no_image": (lambda p: [{"image": "up/rf-layers/does-not-exist:v1"}],
                 ["up/rf-layers/does-not-exist:v1", "unknown"]),
    "no_image_tag": (lambda p: [{"image": "up/acme/ide:9.9"}], ["up/acme/ide:9.9", "unknown"]),
    # malformed stacks
    "stack_number": (lambda p: [42], ["layers[2]", '"base", a name, or a table']),
    "stack_two_kinds": (lambda p: [{"file": p["notar.tar"], "image": "up/acme/ide:1.2"}],
                        ["layers[2]", "exactly one of file, image or blob"]),
    "stack_typo": (lambda p: [{"fiel": "x.tar.gz"}], ["layers[2]", 'unknown key "fiel"']),
    "stack_bad_blob": (lambda p: [{"blob": "sha256:1234", "size": 1, "media_type": OCI_LAYER_GZIP,
                                   "diff_id": "sha256:" + "0" * 64}], ["layers[2].blob", "not a sha256 digest"]),
    "stack_blob_no_size": (lambda p: [{"blob": "sha256:" + "1" * 64, "media_type": OCI_LAYER_GZIP,
                                       "diff_id": "sha256:" + "0" * 64}], ["layers[2].size", "required"]),
    "stack_bad_skip": (lambda p: [{"image": "up/acme/ide:1.2", "skip": -1}], ["layers[2].skip"]),
    "stack_base_twice": (lambda p: ["base"], ['stack[2]: "base" appears twice']),
}
# The stack is "base" followed by the case's layers (so "layers[2]" is the bad one).


def variants_for(bad, kit_oci_repo):
    p = bad.paths
    v = {"good": {"repository": kit_oci_repo, "layers": ["base", {"file": bad.files.tools["path"]}]}}
    for name, (layers, _) in CASES.items():
        v[name] = {"repository": kit_oci_repo, "layers": ["base"] + layers(p)}
    v["stack_string"] = {"repository": kit_oci_repo, "layers": "base"}
    v["platforms_string"] = {"repository": kit_oci_repo, "platforms": "linux/amd64", "layers": ["base"]}
    v["answer_string"] = {"repository": kit_oci_repo, "answer": "string"}
    v["answer_number"] = {"repository": kit_oci_repo, "answer": "number"}
    v["rewrite_raises"] = {"repository": kit_oci_repo, "rewrite_error": "rewrite refused this image",
                           "layers": ["base", {"file": bad.files.tools["path"]}]}
    return v


EXTRA_CASES = {
    "stack_string": ["layers must be a list", "string"],
    "platforms_string": ["platforms must be a list"],
    "answer_string": ["resolve must return a table", "string"],
    "answer_number": ["resolve must return a table", "number"],
    "rewrite_raises": ["rewrite", "rewrite refused this image"],
}


@pytest.fixture
def facade(procs, tmp_path, plain_registry, bad_files):
    rf = start_layers_facade(procs, str(tmp_path), plain_registry.url,
                             variants_for(bad_files, plain_registry.images["oci"]["repo"]),
                             layers={"broken": {"file": bad_files.paths["notar.tar"]}})
    yield rf
    print(diag(rf))


def error_message(r):
    body = r.json()
    errs = body["errors"]
    assert len(errs) == 1 and set(errs[0]) >= {"code", "message"}, body
    return errs[0]["code"], errs[0]["message"]


@pytest.mark.parametrize("variant", sorted(list(CASES) + list(EXTRA_CASES)))
def test_bad_layer_fails_that_request_only(variant, facade, bad_files, plain_registry):
    rf = facade
    upstream_blobs = set(clients.expected_cached(plain_registry.images["oci"]))
    want = CASES[variant][1] if variant in CASES else EXTRA_CASES[variant]
    before_blobs = cache_blobs(rf.cache_dir)
    for method in ("GET", "HEAD", "GET"):  # and again: nothing remembered in between
        r = get_manifest(rf, f"v/{variant}", "v1", method=method)
        assert 500 <= r.status < 600, f"{variant}: {r!r}\n{diag(rf)}"
        if method == "GET":
            code, msg = error_message(r)
            assert code in ("UNKNOWN", "MANIFEST_INVALID"), (code, msg)
            for frag in want:
                assert frag in msg, f"{variant}: {frag!r} not in {msg!r}"
    # loud: the reason is in the log too
    assert json.dumps(want[-1])[1:-1] in rf.log(), rf.log()[-3000:]  # as the JSON log line has it
    # nothing half-built: no decision remembered, no spool left, no blob of a bad file
    assert generated_entries(rf.cache_dir) == []
    assert tmp_files(rf.cache_dir) == []
    new_blobs = cache_blobs(rf.cache_dir) - before_blobs
    for name, p in bad_files.paths.items():
        if os.path.exists(p):
            assert sha256(open(p, "rb").read()) not in new_blobs, name
    # only what was fetched from the upstream (the base, an IDE image's manifest)
    stray = {d for d in new_blobs - upstream_blobs if not _upstream_has(plain_registry, d)
             and d != bad_files.files.tools["digest"]}  # a good file layer, loaded before the failure
    assert not stray, f"stored while failing: {stray}"
    # the same process keeps serving others: a good variant and a mirrored image
    _, m, _ = manifest_ok(rf, "v/good")
    assert m["layers"][-1]["digest"] == bad_files.files.tools["digest"]
    assert len(generated_entries(rf.cache_dir)) == 1
    r = get_manifest(rf, "regfacade-test/oci", "v1")
    assert r.status == 200, r


def _upstream_has(registry, digest):
    """Does the upstream registry hold this blob (any repository)?"""
    d = digest.split(":", 1)[1]
    return os.path.isdir(os.path.join(registry.registry.storage, "docker", "registry", "v2", "blobs", "sha256",
                                      d[:2], d))


def test_missing_file_is_loaded_later(facade, bad_files):
    rf = facade
    missing = bad_files.paths["missing"]
    r = get_manifest(rf, "v/missing_file", "v1")
    assert r.status == 500 and "No such file" in error_message(r)[1], r
    assert generated_entries(rf.cache_dir) == []
    # the file appears: the next request loads it, no restart
    os.makedirs(os.path.dirname(missing), exist_ok=True)
    made = layerkit.write_layer(missing, {"opt/later.txt": b"appeared later\n"})
    try:
        _, m, digest = manifest_ok(rf, "v/missing_file")
        assert m["layers"][-1]["digest"] == made["digest"]
        blob = get_blob(rf, "v/missing_file", made["digest"])
        assert blob.status == 200 and sha256(blob.body) == made["digest"]
        assert len(generated_entries(rf.cache_dir)) == 1
        # changed in place: a new digest, computed again
        layerkit.write_layer(missing, {"opt/later.txt": b"changed again\n"})
        os.utime(missing, ns=(1, 1))
        _, m2, digest2 = manifest_ok(rf, "v/missing_file")
        assert digest2 != digest and m2["layers"][-1]["digest"] != made["digest"]
    finally:
        os.unlink(missing)
    # and gone again: an error again, the old image still served by digest
    r = get_manifest(rf, "v/missing_file", "v1")
    assert r.status == 500, r
    assert manifest_ok(rf, "v/missing_file", digest)[2] == digest


def test_missing_image_is_loaded_later(procs, tmp_path, plain_registry, built_images):
    """An {image=} that is not upstream yet: an error naming it; pushed,
    the next request assembles the image (no restart, nothing remembered)."""
    repo = f"rf-layers/later-{os.getpid()}-{tmp_path.name[-8:]}"
    variants = {"later": {"repository": plain_registry.images["oci"]["repo"],
                          "layers": ["base", {"image": f"up/{repo}:v1"}]}}
    rf = start_layers_facade(procs, str(tmp_path), plain_registry.url, variants)
    r = get_manifest(rf, "v/later", "v1")
    assert r.status == 502, f"{r!r}\n{diag(rf)}"
    code, msg = error_message(r)
    assert code == "UNKNOWN" and f"up/{repo}:v1" in msg and "unknown" in msg, (code, msg)
    assert generated_entries(rf.cache_dir) == []
    clients.skopeo_copy(built_images.oci_ref("small"), f"docker://{plain_registry.host}/{repo}:v1")
    _, m, _ = manifest_ok(rf, "v/later")
    base = plain_registry.images["oci"]["layers"]
    assert len(m["layers"]) == 2 * len(base)


def test_half_built_index_is_not_kept(procs, tmp_path, plain_registry, bad_files):
    """A layer that fails for one platform only (arm64): the index fails,
    and neither the index nor the amd64 manifest already assembled is kept."""
    index = plain_registry.images["index"]
    missing = os.path.join(bad_files.dir, "arm-later.tar.gz")
    variants = {"multi": {"repository": index["repo"], "layers": [
        "base", {"file": bad_files.files.tools["path"]}, {"file": missing, "platforms": ["linux/arm64"]}]}}
    rf = start_layers_facade(procs, str(tmp_path), plain_registry.url, variants)
    before = cache_blobs(rf.cache_dir)
    r = get_manifest(rf, "v/multi", "v1")
    assert r.status == 500 and "arm-later.tar.gz" in error_message(r)[1], f"{r!r}\n{diag(rf)}"
    assert generated_entries(rf.cache_dir) == []
    stray = {d for d in cache_blobs(rf.cache_dir) - before if not _upstream_has(plain_registry, d)
             and d != bad_files.files.tools["digest"]}
    assert not stray, f"half-built parts stored: {stray}"
    # once the file is there, the whole index is served
    layerkit.write_layer(missing, {"etc/arm.txt": b"arm\n"})
    try:
        _, idx, _ = manifest_ok(rf, "v/multi")
        assert len(idx["manifests"]) == 2
    finally:
        os.unlink(missing)


def test_blob_descriptor_whose_bytes_do_not_match(procs, tmp_path, plain_registry, fake_upstream, containerd):
    """A {blob=} layer whose upstream serves other bytes: the manifest names
    the descriptor (regfacade cannot know), pulling the blob is a digest
    error, nothing is cached, and a pull fails cleanly."""
    real = layerkit.tar_bytes({"opt/blob.txt": b"the real bytes\n"})
    real_gz = gzip.compress(real, mtime=0)
    claimed = sha256(real_gz)
    wrong = bytearray(real_gz)
    wrong[-1] ^= 0xFF  # same size, other bytes
    fake_upstream.put_blob("acme/blobs", bytes(wrong), digest=claimed)
    oci = plain_registry.images["oci"]
    variants = {"blob": {"repository": oci["repo"], "layers": [
        "base", {"blob": claimed, "size": len(real_gz), "media_type": OCI_LAYER_GZIP, "diff_id": sha256(real),
                 "upstream": "fake", "repository": "acme/blobs"}]},
        "good": {"repository": oci["repo"], "layers": ["base"]}}
    rf = start_layers_facade(procs, str(tmp_path), plain_registry.url, variants,
                             upstreams={"fake": {"url": fake_upstream.url}})
    _, m, _ = manifest_ok(rf, "v/blob")
    assert m["layers"][-1]["digest"] == claimed
    r = get_blob(rf, "v/blob", claimed)
    assert r.status == 502 and r.error_codes() == ["DIGEST_INVALID"], f"{r!r}\n{diag(rf)}"
    assert claimed in r.json()["errors"][0]["message"] or claimed in json.dumps(r.json()), r
    assert claimed not in cache_blobs(rf.cache_dir)
    assert tmp_files(rf.cache_dir) == []
    ns = containerd.new_namespace()
    try:
        p = containerd.pull(f"{rf.host}/v/blob:v1", namespace=ns, check=False)
        assert p.returncode != 0, p.stdout
        assert claimed not in cache_blobs(rf.cache_dir)
        # the process goes on serving
        manifest_ok(rf, "v/good")
    finally:
        containerd.remove_namespace(ns)
