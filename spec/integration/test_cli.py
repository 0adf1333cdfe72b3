"""The command line as operators expect it, through the real binary:
serve/check --listen, --cache-dir, --log-level, --config and their
REGFACADE_* environment variables (flag > env > file > default, as `check`
prints), `--help` on every command, `make run LISTEN= CACHE=`, log_level in
the config and on SIGHUP, and byte sizes with suffixes in the config."""
import json
import os
import signal
import subprocess
import time

import pytest

from harness import REGFACADE, ROOT, free_port, wait_http


def write(tmp_path, cfg, name="rf.json"):
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return str(p)


def base_config(tmp_path, **extra):
    cfg = {"listen": f"127.0.0.1:{free_port()}", "cache": {"dir": str(tmp_path / "file-cache")},
           "upstreams": {"up": {"url": "http://127.0.0.1:9"}}}
    cfg.update(extra)
    return cfg


def run(args, env=None, cwd=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("REGFACADE_") or k == "REGFACADE_BIN"}
    full.update(env or {})
    return subprocess.run([REGFACADE, *args], capture_output=True, text=True, timeout=60, env=full, cwd=cwd)


def check_lines(r):
    assert r.returncode == 0, r.stderr
    return {line.split()[0]: line.strip() for line in r.stdout.splitlines()[1:]}


def test_precedence_flag_env_file_default(tmp_path):
    cfg = base_config(tmp_path)
    path = write(tmp_path, cfg)
    lines = check_lines(run(["check", "--config", path]))
    assert lines["listen"] == f"listen {cfg['listen']} (file)"
    assert lines["cache.dir"] == f"cache.dir {tmp_path / 'file-cache'} (file)"
    assert lines["log_level"] == "log_level info (default)"

    env = {"REGFACADE_LISTEN": "127.0.0.1:6001", "REGFACADE_CACHE_DIR": str(tmp_path / "env-cache"),
           "REGFACADE_LOG_LEVEL": "warn"}
    lines = check_lines(run(["check", "--config", path], env=env))
    assert lines["listen"] == "listen 127.0.0.1:6001 (REGFACADE_LISTEN)"
    assert lines["cache.dir"] == f"cache.dir {tmp_path / 'env-cache'} (REGFACADE_CACHE_DIR)"
    assert lines["log_level"] == "log_level warn (REGFACADE_LOG_LEVEL)"

    lines = check_lines(run(["check", "--config", path, "--listen", "127.0.0.1:6002", "--cache-dir=rel-cache",
                             "--log-level", "debug"], env=env, cwd=str(tmp_path)))
    assert lines["listen"] == "listen 127.0.0.1:6002 (--listen)"
    assert lines["cache.dir"] == f"cache.dir {tmp_path / 'rel-cache'} (--cache-dir)"  # relative to the working folder
    assert lines["log_level"] == "log_level debug (--log-level)"

    # REGFACADE_CONFIG names the file; --config wins over it
    other = write(tmp_path, dict(cfg, log_level="error"), "other.json")
    r = run(["check"], env={"REGFACADE_CONFIG": other})
    assert check_lines(r)["log_level"] == "log_level error (file)" and other in r.stdout
    r = run(["check", "--config", path], env={"REGFACADE_CONFIG": other})
    assert check_lines(r)["log_level"] == "log_level info (default)"


@pytest.mark.parametrize("args,env,needle", [
    (["--listen", "localhost:5000"], {}, "--listen:"),
    (["--listen", "127.0.0.1:0"], {}, "--listen:"),
    ([], {"REGFACADE_LISTEN": "nonsense"}, "REGFACADE_LISTEN:"),
    (["--log-level", "loud"], {}, "--log-level: \"loud\" is not a log level"),
    ([], {"REGFACADE_LOG_LEVEL": "verbose"}, "REGFACADE_LOG_LEVEL:"),
    (["--cache-dir="], {}, "--cache-dir: must not be empty"),
])
def test_bad_settings_are_refused_by_check_and_serve_alike(tmp_path, args, env, needle):
    path = write(tmp_path, base_config(tmp_path))
    for cmd in ("check", "serve"):
        r = run([cmd, "--config", path, *args], env=env)
        assert r.returncode != 0 and needle in r.stderr, (cmd, r.stderr)
    assert not (tmp_path / "file-cache").exists()  # nothing was created


def test_unknown_argument_and_missing_value(tmp_path):
    r = run(["serve", "--lisen", "x"])
    assert r.returncode == 2 and "unknown argument \"--lisen\"" in r.stderr
    r = run(["serve", "--listen"])
    assert r.returncode == 2 and "--listen needs a value" in r.stderr
    r = run(["check"])
    assert r.returncode == 2 and "--config FILE (or REGFACADE_CONFIG) is required" in r.stderr


@pytest.mark.parametrize("group", ["cache", "tags"])
def test_help_on_command_groups(group):
    r = run([group, "--help"])
    assert r.returncode == 0 and f"usage: regfacade {group} " in r.stdout, r.stderr


@pytest.mark.parametrize("cmd", ["serve", "check"])
def test_help_on_every_command(cmd):
    r = run([cmd, "--help"])
    assert r.returncode == 0 and f"usage: regfacade {cmd}" in r.stdout
    for flag in ("--config", "--listen", "--cache-dir", "--log-level", "REGFACADE_LISTEN"):
        assert flag in r.stdout, flag
    r = run(["--help"])
    assert r.returncode == 0 and "regfacade serve" in r.stdout and "regfacade check" in r.stdout


def test_serve_listens_and_caches_where_the_flags_say(procs, tmp_path):
    cfg = base_config(tmp_path)
    path = write(tmp_path, cfg)
    port = free_port()
    cache = tmp_path / "flag-cache"
    p = procs.start("rf-flags", [REGFACADE, "serve", "--config", path, "--listen", f"127.0.0.1:{port}",
                                 "--cache-dir", str(cache)])
    wait_http(f"http://127.0.0.1:{port}/v2/", timeout=20)
    assert (cache / "blobs").is_dir() and not (tmp_path / "file-cache").exists()
    # a reload keeps what the flags said (the file's listen differs: a reload
    # that took it would be refused as a change of listen)
    os.kill(p.pid, signal.SIGHUP)
    deadline = time.time() + 20
    while time.time() < deadline and "SIGHUP: reloaded" not in open(p.log_path).read():
        time.sleep(0.1)
    assert "SIGHUP: reloaded" in open(p.log_path).read()
    wait_http(f"http://127.0.0.1:{port}/v2/", timeout=10)


def log_messages(p):
    out = []
    for line in open(p.log_path).read().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_log_level_from_config_and_on_sighup(procs, tmp_path):
    cfg = base_config(tmp_path)
    path = write(tmp_path, cfg)
    p = procs.start("rf-level", [REGFACADE, "serve", "--config", path])
    wait_http(f"http://127.0.0.1:{cfg['listen'].rsplit(':', 1)[1]}/v2/", timeout=20)
    assert any("serving on" in m["msg"] for m in log_messages(p))  # info at the default level

    def hup_and_wait(count_before, what):
        os.kill(p.pid, signal.SIGHUP)
        deadline = time.time() + 20
        while time.time() < deadline:
            if sum(what in m["msg"] for m in log_messages(p)) > count_before:
                return
            time.sleep(0.1)

    write(tmp_path, dict(cfg, log_level="error"))
    hup_and_wait(0, "SIGHUP: reloaded")
    msgs = log_messages(p)
    assert any("reloaded" in m["msg"] and "log_level error" in m["msg"] for m in msgs)  # said before going quiet
    # the same config again: an info line that error now hides
    n = len(log_messages(p))
    os.kill(p.pid, signal.SIGHUP)
    time.sleep(1.5)  # nothing is expected; give it time to (wrongly) appear
    assert [m for m in log_messages(p)[n:] if m["level"] == "info" and m["msg"] != "access"] == []
    # errors still show: a broken config is rejected, loudly
    (tmp_path / "rf.json").write_text('{"listen": ')
    hup_and_wait(0, "reload rejected")
    assert any(m["level"] == "error" and "reload rejected" in m["msg"] for m in log_messages(p))
    # the access log has its own switch and is written at any level
    port = cfg["listen"].rsplit(":", 1)[1]
    wait_http(f"http://127.0.0.1:{port}/v2/", timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and not any(m["msg"] == "access" for m in log_messages(p)[n:]):
        time.sleep(0.1)
    assert any(m["msg"] == "access" for m in log_messages(p)[n:])


def test_sizes_with_suffixes(tmp_path):
    ok = base_config(tmp_path, cache={"dir": str(tmp_path / "c"), "max_bytes": "20GiB"},
                     limits={"manifest_max_bytes": "8MiB"},
                     policy={"memory_bytes": "16MiB"})
    r = run(["check", "--config", write(tmp_path, ok)])
    assert r.returncode == 0, r.stderr
    for bad, where in (("20 GiB", "cache.max_bytes"), ("20XB", "cache.max_bytes"), ("GiB", "cache.max_bytes"),
                       ("99999999999TiB", "cache.max_bytes")):
        cfg = base_config(tmp_path, cache={"dir": str(tmp_path / "c"), "max_bytes": bad})
        r = run(["check", "--config", write(tmp_path, cfg)])
        assert r.returncode != 0 and where in r.stderr and "\"20GiB\"" in r.stderr, (bad, r.stderr)
    # a size is a size, a count is a count: suffixes only on *_bytes keys
    cfg = base_config(tmp_path, limits={"max_connections": "1KiB"})
    r = run(["check", "--config", write(tmp_path, cfg)])
    assert r.returncode != 0 and "limits.max_connections" in r.stderr


def test_make_run_takes_listen_and_cache(procs, tmp_path):
    port = free_port()
    cache = tmp_path / "run-cache"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    build = os.path.dirname(REGFACADE)
    args = ["make", "-C", ROOT, "run", f"LISTEN=127.0.0.1:{port}", f"CACHE={cache}", f"BUILD={build}"]
    if "asan" in os.path.basename(build):
        args.append("SANITIZE=1")
    p = procs.start("make-run", args, env=env)
    wait_http(f"http://127.0.0.1:{port}/v2/", timeout=300)  # make may build first
    assert (cache / "blobs").is_dir()
    procs.stop(p)
