"""Tools the deployment checks need, built from their Go modules into .tools/bin (git-ignored).

    python deploy/tools.py helm   # prints the path of a helm of HELM_VERSION, building it first

Helm is `go install`ed from the module proxy (no prebuilt binary is downloaded) with the link flags
its release builds use: its version, and the Kubernetes version its lint and `helm template` assume
(the minor of the client-go it is built with; a plain `go install` says v3.22 and Kubernetes 1.20).
The build takes a few minutes once; after that a call only runs `helm version` (idempotent).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS_BIN = REPO / ".tools" / "bin"
HELM_MODULE = "helm.sh/helm/v3"
HELM_VERSION = "v3.22.0"
CHART = REPO / "deploy" / "helm" / "uc-msc-trial"


class ToolError(RuntimeError):
    """A tool could not be found or built; the message says why and what to do."""


def _say(message: str) -> None:
    print(f"[deploy/tools] {message}", file=sys.stderr, flush=True)


def find_go() -> str:
    """$GO, then `go` on PATH, then the usual /usr/local/go/bin/go."""
    for candidate in (os.environ.get("GO"), shutil.which("go"), "/usr/local/go/bin/go"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ToolError("no Go toolchain: set GO=/path/to/go or put go on PATH (helm is built from "
                    f"its Go module {HELM_MODULE}@{HELM_VERSION})")


def installed_helm_version(helm: Path) -> str | None:
    """What `helm version` says, or None if there is no runnable binary."""
    if not helm.is_file():
        return None
    try:
        out = subprocess.run([str(helm), "version", "--template", "{{.Version}}"],
                             capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _k8s_minor(go: str, env: dict[str, str]) -> str:
    """The Kubernetes minor helm's release build assumes: that of the client-go it requires."""
    out = subprocess.run([go, "mod", "download", "-json", f"{HELM_MODULE}@{HELM_VERSION}"],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise ToolError(f"`go mod download {HELM_MODULE}@{HELM_VERSION}` exited {out.returncode}:\n"
                        f"{out.stdout}{out.stderr}")
    gomod = Path(json.loads(out.stdout)["GoMod"]).read_text()
    found = re.search(r"^\s*k8s\.io/client-go v0\.(\d+)\.", gomod, re.MULTILINE)
    if found is None:
        raise ToolError(f"no k8s.io/client-go requirement in {HELM_MODULE}@{HELM_VERSION}'s go.mod")
    return found.group(1)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build at a time (two test processes may ask at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_helm(bin_dir: Path = TOOLS_BIN) -> Path:
    """The path of a helm of HELM_VERSION in bin_dir, `go install`ed there only if it is missing or
    of another version."""
    helm = bin_dir / "helm"
    if installed_helm_version(helm) == HELM_VERSION:
        return helm
    with _locked(bin_dir.parent / ".helm.lock"):
        found = installed_helm_version(helm)  # another process may have built it meanwhile
        if found == HELM_VERSION:
            return helm
        go = find_go()
        env = {**os.environ, "GOBIN": str(bin_dir), "GOFLAGS": "-buildvcs=false"}
        _say(f"helm {HELM_VERSION} is {'missing' if found is None else f'at {found}'} in {bin_dir}: "
             f"building it from {HELM_MODULE}@{HELM_VERSION} with {go} (a few minutes, once; the "
             "module cache keeps the sources)")
        started = time.monotonic()
        minor = _k8s_minor(go, env)
        ldflags = " ".join([
            "-s", "-w",
            f"-X {HELM_MODULE}/internal/version.version={HELM_VERSION}",
            f"-X {HELM_MODULE}/pkg/lint/rules.k8sVersionMajor=1",
            f"-X {HELM_MODULE}/pkg/lint/rules.k8sVersionMinor={minor}",
            f"-X {HELM_MODULE}/pkg/chartutil.k8sVersionMajor=1",
            f"-X {HELM_MODULE}/pkg/chartutil.k8sVersionMinor={minor}",
        ])
        command = [go, "install", f"-ldflags={ldflags}", f"{HELM_MODULE}/cmd/helm@{HELM_VERSION}"]
        _say(f"running: GOBIN={shlex.quote(str(bin_dir))} {shlex.join(command)}")
        bin_dir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(command, env=env, check=False)
        if result.returncode != 0:
            raise ToolError(f"`go install {HELM_MODULE}/cmd/helm@{HELM_VERSION}` exited "
                            f"{result.returncode} (see its output above)")
        found = installed_helm_version(helm)
        if found != HELM_VERSION:
            raise ToolError(f"built {helm}, but it says it is {found!r}, not {HELM_VERSION}")
        _say(f"built helm {HELM_VERSION} (Kubernetes 1.{minor}) in {time.monotonic() - started:.0f} s")
    return helm


def main(argv: list[str]) -> int:
    if argv == ["helm"]:
        try:
            print(ensure_helm())
        except ToolError as exc:
            _say(str(exc))
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
