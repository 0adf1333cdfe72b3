"""`make install` and policy tests in the user's own folder, as a new user
does it: install into a temporary prefix, copy the policy repository
skeleton (examples/policy-repo) into an empty folder outside this tree, run
`regfacade-busted` there and see it pass; break the policy and see busted
fail naming the file and line; `regfacade check` on its config; the man page
and --help from the installed binary."""
import os
import re
import shutil
import subprocess

import pytest

from harness import REGFACADE, ROOT

BUILD_DIR = os.environ.get("REGFACADE_BUILD_DIR") or os.path.dirname(REGFACADE)


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "LUA_PATH",
                                                            "LUA_PATH_5_4", "LUA_CPATH", "LUA_CPATH_5_4",
                                                            "REGFACADE_BUILD")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("prefix"))
    args = ["make", "-C", ROOT, "install", f"PREFIX={p}", f"BUILD={BUILD_DIR}"]
    if "asan" in os.path.basename(BUILD_DIR):
        args.append("SANITIZE=1")
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=clean_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return p


def busted(prefix, cwd, *args):
    env = clean_env()
    preload = os.environ.get("REGFACADE_LUA_PRELOAD", "").strip()
    if preload:  # the C modules of a sanitizer build need its runtimes first
        env.update(LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0")
    return subprocess.run([os.path.join(prefix, "bin", "regfacade-busted"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def test_install_lays_out_binary_library_modules_and_man_page(prefix):
    for rel in ("bin/regfacade", "bin/regfacade-busted", "share/man/man1/regfacade.1",
                "share/lua/5.4/regfacade/testing.lua", "share/lua/5.4/regfacade/mirror.lua",
                "share/lua/5.4/regfacade/rules.lua", "lib/lua/5.4/regfacade/core.so",
                "lib/lua/5.4/regfacade/sandbox.so"):
        assert os.path.isfile(os.path.join(prefix, rel)), rel
    assert os.access(os.path.join(prefix, "bin", "regfacade-busted"), os.X_OK)
    r = subprocess.run([os.path.join(prefix, "bin", "regfacade"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "regfacade serve" in r.stdout and "regfacade check" in r.stdout
    with open(os.path.join(prefix, "share/man/man1/regfacade.1")) as f:
        man = f.read()
    assert man.startswith(".TH REGFACADE 1") and "regfacade-busted" in man
    if shutil.which("man"):
        r = subprocess.run(["man", "-l", os.path.join(prefix, "share/man/man1/regfacade.1")], capture_output=True,
                           text=True, env=clean_env(MANPAGER="cat", MANWIDTH="80"))
        assert r.returncode == 0 and "registry facade" in r.stdout, r.stderr


def test_policy_repo_skeleton_passes_in_its_own_folder(prefix, tmp_path):
    work = tmp_path / "my-policy"
    shutil.copytree(os.path.join(ROOT, "examples", "policy-repo"), work)
    assert not str(work).startswith(ROOT)
    r = busted(prefix, work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "4 successes / 0 failures / 0 errors" in r.stdout, r.stdout
    # its config runs with the installed binary
    r = subprocess.run([os.path.join(prefix, "bin", "regfacade"), "check", "--config", str(work / "config.json")],
                       capture_output=True, text=True, cwd=work)
    assert r.returncode == 0 and ": ok" in r.stdout, r.stderr


def test_broken_policy_fails_with_file_and_line(prefix, tmp_path):
    work = tmp_path / "broken"
    shutil.copytree(os.path.join(ROOT, "examples", "policy-repo"), work)
    policy = work / "policy.lua"
    # a behaviour bug: everything is allowed
    policy.write_text(policy.read_text().replace("if mapped and allowed(mapped.repository) then", "if mapped then"))
    r = busted(prefix, work)
    assert r.returncode != 0
    assert "spec/policy_spec.lua:" in r.stdout and re.search(r" [1-9] failures? / ", r.stdout), r.stdout[-3000:]
    # a syntax error: the policy's own file and line
    policy.write_text(policy.read_text().replace("return true\n", "return true +\n", 1))
    r = busted(prefix, work)
    assert r.returncode != 0
    assert "policy.lua:" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


def test_regfacade_busted_without_busted_says_what_to_install(prefix, tmp_path):
    # the wrapper with busted's path pointed elsewhere: a clear message, exit 127
    w = tmp_path / "regfacade-busted"
    with open(os.path.join(prefix, "bin", "regfacade-busted")) as f:
        w.write_text(f.read().replace("busted=/usr/bin/busted", "busted=/nonexistent/busted"))
    w.chmod(0o755)
    r = subprocess.run([str(w)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 127 and "lua-busted" in r.stderr, r.stderr
