"""The project speaks of itself alone: no tracked file points a reader at
something the repository does not hold.

- No tracker references ("issue" or "ticket" followed by a number, or a bare
  number after a hash sign, as trackers write them): a reader of a clone
  cannot open them; say what is meant instead.
- No paths outside the repository: the parent folder's `shared` tree, or
  the machine's work folder. The only ones allowed are the Makefile's path
  to the OCI conformance suite and CI's path to the fresh-root tool, both
  optional (what needs them is skipped, saying so, without them).

Fuzz inputs (fuzz/corpus, fuzz/regressions) are data, not text, and are not
read; nor is this file, which spells out what it looks for.
"""
import os
import re
import subprocess

from harness import ROOT

FORBIDDEN = [
    ("a tracker reference", re.compile(r"\b(?:issue|ticket|bug)s?\s*#?\s*\d+", re.I)),
    ("a tracker reference", re.compile(r"(?<![\w&#/$'\"])#\d+\b")),
    ("a path outside the repository", re.compile(r"\.\./shared\b")),
    ("a path outside the repository", re.compile(r"(?<![\w.])/work/")),
]
# (file, what the line must contain): the optional tools beside the repository.
ALLOWED = {
    ("Makefile", "../shared/tools/oci-conformance/"),
    (".ci/run", "../shared/tools/fresh-root/"),
}
NOT_TEXT = ("fuzz/corpus/", "fuzz/regressions/")
SELF = os.path.relpath(os.path.abspath(__file__), ROOT)


def tracked_files():
    r = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True)
    if r.returncode == 0 and r.stdout:
        return [f for f in r.stdout.decode().split("\0") if f]
    # not a git checkout (an unpacked tarball): every file but the build output
    out = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in (".git", "build", "build-asan", "__pycache__")]
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files]
    return out


def text_of(rel):
    try:
        with open(os.path.join(ROOT, rel), "rb") as f:
            data = f.read()
    except OSError:  # a tracked file deleted in the work tree
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def findings(files):
    out = []
    for rel in files:
        if rel.startswith(NOT_TEXT) or rel == SELF:
            continue
        text = text_of(rel)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(rel == f and what in line for f, what in ALLOWED):
                continue
            for why, rx in FORBIDDEN:
                m = rx.search(line)
                if m:  # one finding per line is enough
                    out.append(f"{rel}:{n}: {why} ({m.group(0)!r}): {line.strip()[:120]}")
                    break
    return out


def test_no_tracker_references_or_outside_paths():
    files = tracked_files()
    assert len(files) > 100, files  # the tree was found
    bad = findings(files)
    assert not bad, "say what is meant instead:\n" + "\n".join(bad)


def test_the_check_finds_what_it_forbids(tmp_path):
    """The patterns catch each kind (and let ordinary text through)."""
    rel = os.path.relpath(str(tmp_path / "sample.md"), ROOT)
    samples = {
        "as issue 4 says": 1, "see Issue #12": 1, "fixed in #123": 1, "ticket 7": 1,
        "see ../shared/tools/x": 1, "in /work/shared/reference": 1,
        "an issuer of tokens": 0, "HTTP 404, 2 issues": 0, "color: #fff; $#": 0, "a&#39;b": 0,
    }
    for text, n in samples.items():
        with open(tmp_path / "sample.md", "w") as f:
            f.write(text + "\n")
        assert len(findings([rel])) == n, (text, findings([rel]))
