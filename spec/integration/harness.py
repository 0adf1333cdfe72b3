"""Integration-test harness: processes started by PID and stopped by PID,
free loopback ports, temp folders, and regfacade itself.

Every process a test starts goes through a ProcessGroup; the group is torn
down by the fixture that created it, pass or fail.
"""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import urllib.error

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REGFACADE = os.environ.get("REGFACADE_BIN", os.path.join(ROOT, "build", "regfacade"))


def free_port():
    """A free TCP port on 127.0.0.1 (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=20.0, ok=(200, 401), insecure=False):
    """Poll url until it answers with a status in ok; raise on timeout.
    insecure: accept any TLS certificate (a test's own self-signed one)."""
    import ssl
    ctx = ssl._create_unverified_context() if insecure else None
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                if r.status in ok:
                    return
                last = r.status
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
            last = e.code
        except Exception as e:  # noqa: BLE001 - connection refused while starting
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {ok} within {timeout}s (last: {last})")


class ProcessGroup:
    """Starts processes, remembers their PIDs, and stops every one of them."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def start(self, name, argv, env=None, cwd=None):
        log_path = os.path.join(self.workdir, f"{name}.log")
        log = open(log_path, "ab")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                             cwd=cwd or self.workdir, start_new_session=True)
        p.log_path = log_path
        p.name = name
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=10):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=timeout)
        if p in self.procs:
            self.procs.remove(p)
        check_sanitizer_report(p)

    def stop_all(self):
        failures = []
        for p in reversed(list(self.procs)):
            try:
                self.stop(p)
            except AssertionError as e:
                failures.append(e)
        if failures:
            raise failures[0]


# What AddressSanitizer, LeakSanitizer and UndefinedBehaviorSanitizer print
# (`make test SANITIZE=1` builds regfacade with them).
SANITIZER_MARKERS = (b"ERROR: AddressSanitizer", b"ERROR: LeakSanitizer", b"runtime error:",
                     b"WARNING: ThreadSanitizer", b"SUMMARY: UndefinedBehaviorSanitizer")


def check_sanitizer_report(p):
    """Fail when a stopped regfacade's log holds a sanitizer report (a bug
    that may not have broken the test's own checks)."""
    # regfacade may run behind a wrapper (Regfacade's wrap): look at every argument.
    if not getattr(p, "log_path", None) or not any(
            os.path.basename(str(a)) == os.path.basename(REGFACADE) for a in p.args):
        return
    try:
        with open(p.log_path, "rb") as f:
            data = f.read()
    except OSError:
        return
    for m in SANITIZER_MARKERS:
        i = data.find(m)
        if i >= 0:
            start = max(0, data.rfind(b"\n", 0, max(0, i - 200)))
            raise AssertionError(f"{p.name}: sanitizer report in {p.log_path}:\n"
                                 f"{data[start:start + 6000].decode('utf-8', 'replace')}")


def vm_rss_kib(pid):
    """Resident memory of process pid, in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def log_tail(p, n=4000):
    try:
        with open(p.log_path, "rb") as f:
            data = f.read()
        return data[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


class Regfacade:
    """A running regfacade with a config written to its own folder."""

    def __init__(self, group, workdir, config, name="regfacade", wrap=None, env=None):
        self.env = env  # more environment variables for the process (e.g. PATH)
        self.group = group
        self.wrap = list(wrap or [])  # argv prefix that execs regfacade in the same process
        self.workdir = workdir
        self.name = name
        self.port = None
        self.config = dict(config)
        if "listen" not in self.config:
            self.port = free_port()
            self.config["listen"] = f"127.0.0.1:{self.port}"
        else:
            self.port = int(self.config["listen"].rsplit(":", 1)[1])
        self.config.setdefault("cache", {"dir": os.path.join(workdir, "cache")})
        self.config_path = os.path.join(workdir, f"{name}.json")
        os.makedirs(workdir, exist_ok=True)
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=2)
        self.proc = None

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=20):
        self.proc = self.group.start(self.name, self.wrap + [REGFACADE, "serve", "--config", self.config_path],
                                     env=self.env)
        try:
            wait_http(self.url + "/v2/", timeout=timeout)
        except TimeoutError:
            raise RuntimeError(f"regfacade did not start:\n{log_tail(self.proc)}")
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None:
            self.group.stop(self.proc, sig=sig)
            self.proc = None

    def log(self):
        return log_tail(self.proc, 20000) if self.proc else ""

    def messages(self):
        """The "msg" of every line of its log so far (JSON lines), joined
        with newlines: what it said, unescaped."""
        out = []
        with open(self.proc.log_path, errors="replace") as f:
            for line in f:
                try:
                    out.append(json.loads(line).get("msg", ""))
                except ValueError:
                    out.append(line.rstrip("\n"))
        return "\n".join(out)
