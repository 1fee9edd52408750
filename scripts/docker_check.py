"""`make docker-check`: build the CPU image with this machine's Docker engine and check it as a user would.

What it does (docs/docker.md, "Checks"), with host networking and traffic to 127.0.0.1 only:
  1. the base image: pulls python:3.11-slim; where Docker Hub cannot be reached, says so and makes a
     stand-in from Debian's packages (debootstrap), with this machine's CA certificates for pip;
  2. the wheels: where the PyTorch CPU index cannot be reached, says so and serves a local folder holding
     the torch CPU wheel on 127.0.0.1 (--wheel-dir; default: the folders pip's find-links names here);
  3. builds docker/Dockerfile.cpu (BuildKit where buildx is installed, else the legacy builder), timed;
  4. runs the image as docs/docker.md does (--shm-size 1g): /health, a completion at
     X-Activation-Budget: 0.5 with the applied header echoed, /metrics counting it, no process as root,
     the image's HEALTHCHECK healthy, `docker stop` within its timeout (exit code and log recorded);
     and without --shm-size, the entrypoint's warning;
  5. runs the compose `cpu` service's settings (Compose v1 or v2) with a host-network override;
  6. the GPU Dockerfile's stage that does not need the vLLM CUDA base (`bake`), on the same base.
Results land in build/docker-check/ (summary.md, summary.json, each step's log). Exit 1 if a check failed.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CPU_FILE = ROOT / "docker" / "Dockerfile.cpu"
GPU_FILE = ROOT / "docker" / "Dockerfile"
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
# The middleware's header names (tests/test_docker.py keeps these in step): no vLLM import here.
BUDGET_HEADER = "X-Activation-Budget"
APPLIED_HEADER = "X-Activation-Budget-Applied"
UID = "10001"  # the images' user
HUB_BASE = "python:3.11-slim"
STANDIN_BASE = "vllm-alloc-standin/python:3.11-slim"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu/torch/"
STOP_TIMEOUT_S = 50  # docs/docker.md: `docker stop -t 50`; compose: stop_grace_period: 50s
MODEL = "/opt/vllm-alloc/models/default"
SHUTDOWN_NOISE = ("Traceback", "EngineDeadError")
UNKNOWN_ENV = "Unknown vLLM environment variable"


class Report:
    """Each check's name, outcome (PASS, FAIL, WARN, INFO) and detail, printed as they come."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[tuple[str, str, str]] = []
        self.facts: dict[str, Any] = {}

    def add(self, name: str, ok: bool | None, detail: str = "") -> bool:
        outcome = {True: "PASS", False: "FAIL", None: "INFO"}[ok]
        self.rows.append((name, outcome, detail))
        print(f"[{outcome}] {name}: {detail}", flush=True)
        return bool(ok)

    def warn(self, name: str, detail: str) -> None:
        self.rows.append((name, "WARN", detail))
        print(f"[WARN] {name}: {detail}", flush=True)

    def write(self) -> bool:
        failed = [r for r in self.rows if r[1] == "FAIL"]
        lines = ["| check | outcome | detail |", "|---|---|---|"]
        lines += [f"| {n} | {o} | {d.replace('|', '/')} |" for n, o, d in self.rows]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        (self.out / "summary.json").write_text(
            json.dumps({"facts": self.facts, "checks": self.rows}, indent=1)
        )
        counts = ", ".join(
            f"{sum(r[1] == o for r in self.rows)} {o}" for o in ("PASS", "FAIL", "WARN", "INFO")
        )
        print(f"\n{counts}; summary: {self.out}/summary.md")
        return not failed


def sh(
    *argv: str, log: Path | None = None, timeout: float = 600, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command; its output goes to `log` (appended) when given, else is captured."""
    if log is None:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        return subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(url: str) -> str | None:
    """None when `url` answers, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=15):
            return None
    except (OSError, urllib.error.URLError) as e:
        return str(getattr(e, "reason", e))


# --- 1. base image ---------------------------------------------------------------------------------


def base_image(args: argparse.Namespace, report: Report) -> str:
    if args.base:
        return str(args.base)
    pulled = sh("docker", "pull", HUB_BASE, timeout=300)
    if pulled.returncode == 0:
        report.add("base image", None, f"{HUB_BASE} pulled from Docker Hub")
        return HUB_BASE
    why = (pulled.stderr.strip().splitlines() or ["no answer"])[-1]
    report.warn("base image", f"missing: {HUB_BASE} cannot be pulled ({why}); fallback: {STANDIN_BASE}")
    if sh("docker", "image", "inspect", STANDIN_BASE).returncode != 0:
        start = time.monotonic()
        make_standin(args.out / "standin.log")
        report.facts["standin_s"] = round(time.monotonic() - start)
        size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", STANDIN_BASE).stdout.strip())
        report.add(
            "stand-in base",
            None,
            f"made in {report.facts['standin_s']} s, {size / 1e6:.0f} MB, log standin.log",
        )
    return STANDIN_BASE


def make_standin(log: Path) -> None:
    """python:3.11-slim's layout from Debian 12's packages: Python 3.11 with pip in a venv at /usr/local
    (`python`, `pip` on PATH, as in the official image), apt as on this machine, and this machine's CA
    certificates (pip inside the container goes through the same TLS path as pip here)."""
    if not shutil.which("debootstrap"):
        sys.exit("the stand-in base needs debootstrap: apt-get install debootstrap")
    print(f"making {STANDIN_BASE} with debootstrap (a few minutes; log: {log})", flush=True)
    with tempfile.TemporaryDirectory(prefix="standin-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        mirror = "http://deb.debian.org/debian"
        if sh(
            "debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror, log=log, timeout=1800
        ).returncode:
            sys.exit(f"debootstrap failed; see {log}")
        sources = Path("/etc/apt/sources.list.d/debian.sources")
        if sources.exists():  # this machine's suites (updates, security) and mirror
            shutil.copy(sources, rootfs / "etc/apt/sources.list.d/debian.sources")
            (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        # A snapshot mirror's Release files are past Valid-Until; apt here accepts them, so apt there must.
        conf = sh("apt-config", "dump", "Acquire::Check-Valid-Until", "Acquire::Check-Date").stdout
        (rootfs / "etc/apt/apt.conf.d/99standin").write_text(conf)
        # As the official Debian images: apt keeps no package cache (the *.bin files are ~80 MB), so an
        # image's `apt-get install` layer holds only what it installs.
        (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(
            'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
            '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
            'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
            '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
            'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
        )
        extra_certs = rootfs / "usr/local/share/ca-certificates"
        extra_certs.mkdir(parents=True, exist_ok=True)
        for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(crt, extra_certs / crt.name)
        script = (
            "set -e; apt-get update -q; DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            "--no-install-recommends python3.11 python3.11-venv ca-certificates; update-ca-certificates; "
            "python3.11 -m venv /usr/local; /usr/local/bin/python -m pip --version; "
            "apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc /usr/share/man"
        )
        if sh("chroot", str(rootfs), "/bin/sh", "-c", script, log=log, timeout=1800).returncode:
            sys.exit(f"setting up the stand-in failed; see {log}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        changes = [
            "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
            'CMD ["python3"]',
        ]
        imported = subprocess.run(
            ["docker", "import", *(f"--change={c}" for c in changes), "-", STANDIN_BASE],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=900,
        )
        tar.wait()
        if imported.returncode:
            sys.exit(f"docker import failed: {imported.stderr}")


# --- 2. wheels -------------------------------------------------------------------------------------


def torch_pin() -> str:
    found = re.search(r"torch==([\w.+]+)", CPU_FILE.read_text())
    assert found, "Dockerfile.cpu pins no torch"
    return found.group(1)


def pip_build_args(args: argparse.Namespace, report: Report) -> tuple[list[str], Any]:
    """Build args for pip, and the loopback server to shut down (None when the index answers)."""
    why = reachable(TORCH_INDEX)
    if why is None and not args.wheel_dir:
        report.add("wheels", None, f"PyTorch CPU index reachable: torch=={torch_pin()} comes from it")
        return [], None
    wheel = f"torch-{torch_pin()}-"
    dirs = [Path(d) for d in ([args.wheel_dir] if args.wheel_dir else _find_links_dirs())]
    holder = next((d for d in dirs if any(d.glob(f"{wheel}*.whl"))), None)
    if holder is None:
        sys.exit(
            f"missing: the PyTorch CPU index ({TORCH_INDEX}: {why}) and a local {wheel}*.whl in "
            f"{[str(d) for d in dirs]}; pass --wheel-dir DIR holding it (on a machine that reaches the "
            f"index: pip download --no-deps -d DIR torch=={torch_pin()} --index-url {TORCH_INDEX[:-6]})"
        )
    handler = functools.partial(_QuietHandler, directory=str(holder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    report.warn("wheels", f"missing: the PyTorch CPU index ({why}); fallback: {holder} served at {url}")
    return ["--build-arg", "PIP_EXTRA_INDEX_URL=", "--build-arg", f"PIP_FIND_LINKS={url}"], server


def _find_links_dirs() -> list[str]:
    raw = os.environ.get("PIP_FIND_LINKS", "")
    listed = sh(sys.executable, "-m", "pip", "config", "get", "global.find-links")
    raw += " " + (listed.stdout if listed.returncode == 0 else "")
    return [d for d in raw.split() if Path(d).is_dir()]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


# --- 3. build --------------------------------------------------------------------------------------


def builder_env() -> tuple[dict[str, str], str]:
    if sh("docker", "buildx", "version").returncode == 0:
        return {**os.environ, "DOCKER_BUILDKIT": "1"}, "BuildKit (buildx)"
    return {**os.environ, "DOCKER_BUILDKIT": "0"}, "legacy builder (no buildx plugin)"


def build(args: argparse.Namespace, report: Report, base: str, pip_args: list[str]) -> bool:
    env, builder = builder_env()
    log = args.out / "build.log"
    start = time.monotonic()
    built = sh(
        "docker", "build", "--network", "host", "-f", str(CPU_FILE), "-t", args.image,
        "--build-arg", f"BASE_IMAGE={base}", *pip_args, str(ROOT),
        log=log, timeout=3600, env=env,
    )  # fmt: skip
    seconds = time.monotonic() - start
    report.facts.update(builder=builder, base=base, build_s=round(seconds))
    if not report.add("build", built.returncode == 0, f"{builder}, {seconds:.0f} s, log {log}"):
        return False
    size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", args.image).stdout.strip())
    report.facts["image_bytes"] = size
    top = sh("docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", args.image, "-c",
             "du -sm /usr/local/lib/python3.11/site-packages/* | sort -rn | head -6")  # fmt: skip
    report.add(
        "image size", None, f"{size / 1e9:.2f} GB; largest packages (MB): {' '.join(top.stdout.split())}"
    )
    has_triton = sh("docker", "run", "--rm", "--network", "none", "--entrypoint", "python", args.image,
                    "-c", "import importlib.util as u; print(u.find_spec('triton') is not None)")  # fmt: skip
    report.add("no triton in the image", has_triton.stdout.strip() == "False", has_triton.stdout.strip())
    return True


# --- 4. run as documented --------------------------------------------------------------------------


def get(url: str, timeout: float = 10, **headers: str) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, dict(response.headers), response.read().decode()


def wait_health(port: int, container: str, timeout_s: float = 600) -> float | None:
    """Seconds until /health answers 200, or None (the container stopped, or time ran out)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if get(f"http://127.0.0.1:{port}/health", timeout=3)[0] == 200:
                return time.monotonic() - start
        except OSError:
            pass
        if inspect(container, "{{.State.Running}}") != "true":
            return None
        time.sleep(2)
    return None


def inspect(container: str, template: str) -> str:
    return sh("docker", "inspect", "-f", template, container).stdout.strip()


def check_server(report: Report, label: str, container: str, port: int, log: Path) -> bool:
    """What a user checks on a running container; False when it never became healthy."""
    seconds = wait_health(port, container)
    if not report.add(f"{label}: /health", seconds is not None, f"200 after {seconds or 0:.0f} s"):
        sh("docker", "logs", container, log=log)
        return False
    body = json.dumps({"model": MODEL, "prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=body.encode(),
        headers={"content-type": "application/json", BUDGET_HEADER: "0.5"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            applied, tokens = (
                response.headers.get(APPLIED_HEADER),
                json.load(response)["usage"]["completion_tokens"],
            )
    except (OSError, KeyError, ValueError) as e:
        applied, tokens = None, f"error {e}"
    report.add(
        f"{label}: completion at budget 0.5",
        applied == "0.5",
        f"{APPLIED_HEADER}: {applied}, tokens {tokens}",
    )
    report.add(f"{label}: /metrics counts it", *metrics_count(port))
    # The engine parses ps's output by its PID column: without `pid`, `docker top` fails.
    top = sh("docker", "top", container, "-eo", "pid,uid,args")
    rows = [line.split() for line in top.stdout.splitlines()[1:] if line.strip()]
    uids = sorted({row[1] for row in rows})
    report.add(
        f"{label}: not root",
        top.returncode == 0 and uids == [UID],
        f"uids of its {len(rows)} processes: {uids}" + (f" ({top.stderr.strip()})" if top.returncode else ""),
    )
    health, waited = inspect(container, "{{.State.Health.Status}}"), 0
    while health != "healthy" and waited < 180:  # the first probe runs one interval (30 s) after start
        time.sleep(5)
        waited += 5
        health = inspect(container, "{{.State.Health.Status}}")
    report.add(f"{label}: HEALTHCHECK", health == "healthy", health)
    return True


def metrics_count(port: int) -> tuple[bool, str]:
    """Whether /metrics counts the budget-0.5 request: the API server's budget histogram at once, the
    worker's activation counters once flushed (retried for a minute)."""
    deadline, requests, routed = time.monotonic() + 60, 0.0, 0.0
    while time.monotonic() < deadline:
        try:
            text = get(f"http://127.0.0.1:{port}/metrics")[2]
        except OSError:
            text = ""
        requests = _sum(text, r"vllm_alloc:request_budget_count(?:\{[^}]*\})? ")
        routed = _sum(text, r'vllm_alloc:routed_activations_total\{[^}]*budget="0\.5[0]*"[^}]*\} ')
        if requests >= 1 and routed > 0:
            return True, f"request_budget_count {requests:g}, routed_activations_total at b=0.5 {routed:g}"
        time.sleep(5)
    return False, f"request_budget_count {requests:g}, routed_activations_total at b=0.5 {routed:g}"


def _sum(text: str, prefix: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(f"^{prefix}(\\S+)$", text, re.M))


def check_stop(report: Report, label: str, container: str, log: Path, stop: list[str]) -> None:
    start = time.monotonic()
    stopped = sh(*stop, timeout=STOP_TIMEOUT_S + 60)
    seconds = time.monotonic() - start
    code = inspect(container, "{{.State.ExitCode}}")
    sh("docker", "logs", container, log=log)
    ok = stopped.returncode == 0 and code == "0" and seconds < STOP_TIMEOUT_S
    report.add(f"{label}: stop", ok, f"`{' '.join(stop[:2])} ...` took {seconds:.1f} s, exit code {code}")
    text = log.read_text(errors="replace")
    unknown = sorted(set(re.findall(rf"{UNKNOWN_ENV} detected: (\S+)", text)))
    report.add(f"{label}: no unknown-variable warnings", not unknown, f"{UNKNOWN_ENV}: {unknown or 'none'}")
    noise = [n for n in SHUTDOWN_NOISE if n in text]
    if noise:
        report.warn(f"{label}: shutdown log", f"{', '.join(noise)} in the log (log {log})")
    else:
        report.add(f"{label}: shutdown log", True, "no traceback")


def run_documented(args: argparse.Namespace, report: Report) -> None:
    """`docker run` as docs/docker.md says, on the host network, bound to 127.0.0.1 on a free port."""
    name, port, log = "vllm-alloc-check-run", free_port(), args.out / "run.log"
    sh("docker", "rm", "-f", name)
    cmd = json.loads(inspect(args.image, "{{json .Config.Cmd}}") or "[]")
    started = sh(
        "docker", "run", "-d", "--name", name, "--network", "host", "--shm-size", "1g",
        "-e", f"PORT={port}", args.image, *cmd, "--host", "127.0.0.1",
    )  # fmt: skip
    if not report.add("docker run: start", started.returncode == 0, started.stderr.strip()[-300:]):
        return
    try:
        if check_server(report, "docker run", name, port, log):
            check_stop(report, "docker run", name, log, ["docker", "stop", "-t", str(STOP_TIMEOUT_S), name])
    finally:
        sh("docker", "rm", "-f", name)
    # Docker's default /dev/shm (64 MiB): the entrypoint says what to do before vLLM starts.
    small = sh("docker", "run", "--rm", "--network", "none", args.image, "--help", timeout=300)
    warned = "--shm-size 1g" in small.stderr and small.returncode == 0
    report.add(
        "docker run without --shm-size: warning", warned, (small.stderr.strip().splitlines() or [""])[0]
    )


# --- 5. compose ------------------------------------------------------------------------------------


def compose_command() -> list[str] | None:
    if sh("docker", "compose", "version").returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def run_compose(args: argparse.Namespace, report: Report) -> None:
    compose = compose_command()
    if compose is None:
        report.warn(
            "compose",
            "missing: neither `docker compose` nor `docker-compose` (apt-get install docker-compose)",
        )
        return
    version = sh(*compose, "version", "--short").stdout.strip()
    port, log = free_port(), args.out / "compose.log"
    cmd = json.loads(inspect(args.image, "{{json .Config.Cmd}}") or "[]")
    # The service's own settings, less what a shared machine cannot have: host networking on a free port.
    # Published ports mean nothing on the host network, and Compose v1 refuses them there ("host"
    # network_mode is incompatible with port_bindings); an override file cannot drop them (lists merge),
    # so `up` runs on a copy of compose.yaml without the cpu service's `ports`, with compose.yaml's folder
    # as the project directory, so relative paths resolve as they do for compose.yaml.
    project = yaml.safe_load(COMPOSE_FILE.read_text())
    project["services"]["cpu"].pop("ports", None)
    copy_file = args.out / "compose.yaml"
    copy_file.write_text(json.dumps(project, indent=1))  # JSON is YAML
    override = {
        "services": {
            "cpu": {
                "image": args.image,
                "network_mode": "host",
                "environment": {"PORT": str(port)},
                "command": [*cmd, "--host", "127.0.0.1"],
                "restart": "no",
            }
        }
    }
    override_file = args.out / "compose.override.yaml"
    override_file.write_text(json.dumps(override, indent=1))
    config = sh(*compose, "-f", str(COMPOSE_FILE), "--profile", "cpu", "config", "-q", log=log)
    report.add("compose: config", config.returncode == 0, f"{' '.join(compose)} {version}, compose.yaml")
    base = [
        *compose,
        "-p",
        "vllm-alloc-check",
        "--project-directory",
        str(COMPOSE_FILE.parent),
        "-f",
        str(copy_file),
        "-f",
        str(override_file),
        "--profile",
        "cpu",
    ]
    merged = sh(*base, "config", log=log)
    report.add(
        "compose: check config", merged.returncode == 0, f"compose.yaml without cpu ports, {override_file}"
    )
    up = sh(*base, "up", "-d", "--no-build", "cpu", log=log, timeout=300)
    if not report.add("compose: up", up.returncode == 0, f"log {log}"):
        return
    container = sh(*base, "ps", "-q", "cpu").stdout.strip()
    try:
        if check_server(report, "compose", container, port, log):
            shm = sh("docker", "exec", container, "df", "-Pk", "/dev/shm").stdout.splitlines()[-1].split()
            report.add("compose: /dev/shm", int(shm[1]) >= 1024 * 1024, f"{int(shm[1]) // 1024} MiB")
            env = sh("docker", "exec", container, "env").stdout.split()
            set_vars = [e for e in env if e.startswith("VLLM_ALLOC_")]
            report.add("compose: no empty VLLM_ALLOC_* set", not set_vars, str(set_vars or "none"))
            check_stop(report, "compose", container, log, [*base, "stop", "cpu"])
    finally:
        sh(*base, "down", "-v", log=log)


# --- 6. GPU image: what runs without its base --------------------------------------------------------


def check_gpu(args: argparse.Namespace, report: Report, base: str) -> None:
    env, _ = builder_env()
    tag, log = "vllm-alloc-check/gpu-bake", args.out / "gpu-bake.log"
    built = sh(
        "docker", "build", "-f", str(GPU_FILE), "--target", "bake", "-t", tag,
        "--build-arg", f"VLLM_IMAGE={base}", "--build-arg", "BAKE=configs/default.json", str(ROOT),
        log=log, timeout=900, env=env,
    )  # fmt: skip
    baked = sh("docker", "run", "--rm", "--network", "none", tag, "ls", "/tmp/baked/configs/default.json")
    report.add(
        "GPU Dockerfile: bake stage", built.returncode == 0 and baked.returncode == 0, f"on {base}, log {log}"
    )
    sh("docker", "rmi", tag)
    report.add(
        "GPU image",
        None,
        "not built: its base vllm/vllm-openai:v0.32.0 is not pulled here; its entrypoint is the CPU image's",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="vllm-alloc:0.1.0-cpu", help="tag to build (compose's cpu image)")
    parser.add_argument("--base", help="base image to build on (default: python:3.11-slim, or the stand-in)")
    parser.add_argument("--wheel-dir", help="folder with the torch CPU wheel, served on 127.0.0.1")
    parser.add_argument("--skip-build", action="store_true", help="check an image built before")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "docker-check")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.log"):
        stale.unlink()
    report = Report(args.out)
    engine = sh("docker", "version", "-f", "{{.Server.Version}}")
    if engine.returncode:
        sys.exit(f"missing: a Docker engine answering the docker client ({engine.stderr.strip()})")
    report.facts["engine"] = engine.stdout.strip()
    base = base_image(args, report)
    if not args.skip_build:
        pip_args, server = pip_build_args(args, report)
        try:
            if not build(args, report, base, pip_args):
                return 0 if report.write() else 1
        finally:
            if server is not None:
                server.shutdown()
    run_documented(args, report)
    run_compose(args, report)
    check_gpu(args, report, base)
    return 0 if report.write() else 1


if __name__ == "__main__":
    sys.exit(main())
