"""Budget aliases (model names NAME@b) and the admin route, against a fake ASGI app and a fake engine; the
worker's side of a change (`AllocState.reconfigure`) on a state built without vLLM. End to end:
test_server_e2e.py."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.integration.test_integration_unit import make_state
from tests.serving.test_middleware import FakeApp, vllm_config
from vllm_alloc.budget import uniform_budget_file
from vllm_alloc.cli import build_parser
from vllm_alloc.integration.config import PluginConfig, parse_aliases, resolve_settings
from vllm_alloc.serving import launch
from vllm_alloc.serving.middleware import ADMIN_PATH, ActivationBudgetMiddleware

KEY = "0123456789abcdef-admin"


@dataclass
class BaseModelPath:  # vLLM's (vllm/entrypoints/openai/models/protocol.py)
    name: str
    model_path: str


class FakeEngine:
    """The engine client's collective_rpc: records calls; `refuse` makes every worker raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.refuse: str | None = None
        self.input_processor = SimpleNamespace()

    async def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        self.calls.append((method, args))
        if self.refuse:
            return [{"source": "uniform"}, {"error": self.refuse}]  # the second rank refuses
        return [{}, {}]


class Server:
    """One middleware over a fake app, with app state as vLLM's API server has it."""

    def __init__(self, additional: Any = None, api_servers: int = 1) -> None:
        self.app = FakeApp()
        self.middleware = ActivationBudgetMiddleware(self.app)
        self.engine = FakeEngine()
        config = vllm_config(additional)
        config.parallel_config = SimpleNamespace(_api_process_count=api_servers)
        self.state = SimpleNamespace(
            vllm_config=config,
            openai_serving_models=SimpleNamespace(base_model_paths=[BaseModelPath("tiny", "/models/tiny")]),
            engine_client=self.engine,
        )

    def served(self) -> list[str]:
        return [p.name for p in self.state.openai_serving_models.base_model_paths]

    def start(self) -> list[dict[str, Any]]:
        """The ASGI lifespan start-up; the messages the server sent."""
        incoming = [{"type": "lifespan.startup"}]
        sent: list[dict[str, Any]] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "lifespan.startup.complete"})

        self.middleware.app = app
        try:
            asyncio.run(self._run({"type": "lifespan", "app": self}, incoming, sent))
        finally:
            self.middleware.app = self.app
        return sent

    def request(
        self,
        body: Any,
        path: str = "/v1/completions",
        method: str = "POST",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[bytes, bytes], Any]:
        """(status, response headers, parsed body or what reached vLLM) of one request."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "app": self,
        }
        sent: list[dict[str, Any]] = []
        calls = len(self.app.calls)
        asyncio.run(self._run(scope, [{"type": "http.request", "body": raw, "more_body": False}], sent))
        status, response_headers = sent[0]["status"], dict(sent[0]["headers"])
        if len(self.app.calls) > calls:
            reached = self.app.calls[-1]["body"]
            return status, response_headers, json.loads(reached) if reached[:1] in (b"{", b"[") else reached
        return status, response_headers, json.loads(sent[1]["body"])

    def admin(self, body: Any = None, key: str | None = KEY, method: str = "POST") -> tuple[int, Any]:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        status, _, answer = self.request(body if body is not None else b"", ADMIN_PATH, method, headers)
        return status, answer

    async def _run(self, scope: Any, incoming: list[dict[str, Any]], sent: list[dict[str, Any]]) -> None:
        async def receive() -> dict[str, Any]:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.middleware(scope, receive, send)


def aliased(*aliases: float) -> Server:
    server = Server({"vllm_alloc": {"budget_aliases": list(aliases)}})
    assert server.start() == [{"type": "lifespan.startup.complete"}]
    return server


# -- settings ------------------------------------------------------------------------------------------------


def test_aliases_parse_from_lists_and_text() -> None:
    assert parse_aliases([0.75, "0.5"], "x") == (0.75, 0.5)
    assert parse_aliases("0.75, 0.5", "x") == (0.75, 0.5)
    assert parse_aliases(None, "x") == ()
    with pytest.raises(ValueError, match=r"x\[1\]='high' is not a number"):
        parse_aliases("0.5,high", "x")
    with pytest.raises(ValueError, match=r"names @0.5 twice"):
        parse_aliases([0.5, "0.50"], "x")
    with pytest.raises(ValueError, match=r"x=3 is not valid; expected a list"):
        parse_aliases(3, "x")


def test_an_alias_below_the_models_minimum_stops_start_up() -> None:
    with pytest.raises(ValueError, match=r"budget_aliases\[1\]=0\.1 .*\[0\.25, 1\]"):
        resolve_settings({"vllm_alloc": {"budget_aliases": [0.5, 0.1]}}, top_k=4)


def test_aliases_are_served_as_model_names_at_start_up() -> None:
    server = aliased(0.75, 0.5)
    assert server.served() == ["tiny", "tiny@0.75", "tiny@0.5"]
    assert server.middleware.aliases == {"tiny@0.75": 0.75, "tiny@0.5": 0.5}


def test_names_already_served_are_not_added_twice() -> None:
    server = Server({"vllm_alloc": {"budget_aliases": [0.5]}})
    server.state.openai_serving_models.base_model_paths.append(BaseModelPath("tiny@0.5", "/models/tiny"))
    server.start()
    assert server.served() == ["tiny", "tiny@0.5"]


def test_bad_aliases_fail_the_start_up_with_the_setting_named() -> None:
    server = Server({"vllm_alloc": {"budget_aliases": "0.5,0.5"}})
    (message,) = server.start()
    # A bad setting stops the engine first; this is the API server's own refusal (a model without MoE
    # layers never resolves the settings in its workers).
    assert message["type"] == "lifespan.startup.failed"
    assert "vllm_alloc budget_aliases names @0.5 twice" in message["message"]


# -- requests to an alias ------------------------------------------------------------------------------------


def test_a_request_to_an_alias_runs_at_its_budget() -> None:
    server = aliased(0.75, 0.5)
    status, headers, body = server.request({"model": "tiny@0.5", "prompt": "hi"})
    assert status == 200 and headers[b"x-activation-budget-applied"] == b"0.5"
    assert body["vllm_xargs"]["activation_budget"] == 0.5
    assert body["cache_salt"] == "activation_budget=0.5"  # prefix cache per budget, as for a header
    assert body["model"] == "tiny@0.5"  # vLLM serves the alias name itself
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
        status, headers, body = server.request({"model": "tiny@0.75", "messages": []}, path)
        assert headers[b"x-activation-budget-applied"] == b"0.75", path
    _, headers, _ = server.request({"model": "tiny", "prompt": "hi"})
    assert headers[b"x-activation-budget-applied"] == b"1.0"  # the base name: the server default


def test_a_budget_that_disagrees_with_the_alias_is_400() -> None:
    server = aliased(0.5)
    status, _, error = server.request(
        {"model": "tiny@0.5", "prompt": "hi"}, headers={"X-Activation-Budget": "0.75"}
    )
    assert status == 400
    assert "model 'tiny@0.5' is a budget alias (b = 0.5)" in error["error"]["message"]
    assert "X-Activation-Budget header (0.75) disagrees" in error["error"]["message"]
    body = {"model": "tiny@0.5", "prompt": "hi", "vllm_xargs": {"activation_budget": 0.25}}
    status, _, error = server.request(body)
    assert status == 400 and "vllm_xargs.activation_budget (0.25) disagrees" in error["error"]["message"]
    # The same budget, however written, is no conflict.
    status, headers, _ = server.request(
        {"model": "tiny@0.5", "prompt": "hi"}, headers={"X-Activation-Budget": "0.50"}
    )
    assert status == 200 and headers[b"x-activation-budget-applied"] == b"0.5"


def test_an_alias_with_a_pooling_invocation_is_400() -> None:
    server = aliased(0.5)
    status, _, error = server.request({"model": "tiny@0.5", "input": "x"}, "/invocations")
    assert status == 400 and "pooling handler" in error["error"]["message"]


def test_an_alias_on_batch_and_generate_runs_at_its_budget() -> None:
    server = aliased(0.5)
    status, headers, body = server.request(
        {"model": "tiny@0.5", "messages": []}, "/v1/chat/completions/batch"
    )
    assert status == 200 and headers[b"x-activation-budget-applied"] == b"0.5"
    assert body["vllm_xargs"] == {"activation_budget": 0.5}
    generate = {"model": "tiny@0.5", "token_ids": [1], "sampling_params": {}}
    status, headers, body = server.request(generate, "/inference/v1/generate")
    assert status == 200 and headers[b"x-activation-budget-applied"] == b"0.5"
    assert body["sampling_params"]["extra_args"] == {"activation_budget": 0.5}
    generate["sampling_params"] = {"extra_args": {"activation_budget": 0.25}}
    status, _, error = server.request(generate, "/inference/v1/generate")
    assert status == 400
    assert "sampling_params.extra_args.activation_budget (0.25) disagrees" in error["error"]["message"]


def test_an_alias_on_a_route_that_cannot_apply_it_is_400() -> None:
    server = aliased(0.5)
    scoring = {"model": "tiny@0.5", "query": "q", "items": ["a"], "label_token_ids": [1]}
    status, _, error = server.request(scoring, "/generative_scoring")
    assert status == 400
    assert "cannot apply a budget" in error["error"]["message"] and "'tiny' here" in error["error"]["message"]
    scoring["model"] = "tiny"
    status, _, body = server.request(scoring, "/generative_scoring")
    assert status == 200 and body == scoring  # passed on untouched
    boundary = "b0undary"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\nRIFF....\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny@0.5\r\n--{boundary}--\r\n'
    ).encode()
    content_type = {"content-type": f"multipart/form-data; boundary={boundary}"}
    status, _, error = server.request(form, "/v1/audio/transcriptions", headers=content_type)
    assert status == 400 and "cannot apply a budget" in error["error"]["message"]
    plain = form.replace(b"tiny@0.5", b"tiny")  # the base name: passed on as it came
    assert server.request(plain, "/v1/audio/transcriptions", headers=content_type)[::2] == (200, plain)
    status, _, body = server.request({"model": "tiny@0.5", "prompt": "x"}, "/tokenize")
    assert status == 200 and body["model"] == "tiny@0.5"  # no generation there: the alias is just a name


def audio_form(xargs: str | None) -> tuple[bytes, dict[str, str]]:
    """A transcription form (vLLM's audio routes take multipart data), with a `vllm_xargs` field."""
    boundary = "b0undary"
    fields = [("model", "tiny")] + ([("vllm_xargs", xargs)] if xargs is not None else [])
    form = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
    for name, value in fields:
        form += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
    return (form + f"--{boundary}--\r\n").encode(), {
        "content-type": f"multipart/form-data; boundary={boundary}"
    }


@pytest.mark.parametrize("route", ["/v1/audio/transcriptions", "/v1/audio/translations"])
def test_audio_form_budgets_are_checked_and_echoed(route: str) -> None:
    """Issue #33: vLLM passes the form's vllm_xargs on, so its budget is checked as on the budget routes
    (never run at the model's minimum instead) and a valid one is echoed; the form itself is untouched."""
    server = Server()
    for raw, needle in (("0.01", "below this model's minimum"), ("1.5", "out of range"), ('"x"', "number")):
        form, headers = audio_form(f'{{"activation_budget": {raw}}}')
        status, _, error = server.request(form, route, headers=headers)
        assert status == 400, error
        message = error["error"]["message"]
        assert message.startswith("vllm_xargs.activation_budget") and needle in message, message
    form, headers = audio_form('{"activation_budget": 0.5}')
    status, response_headers, reached = server.request(form, route, headers=headers)
    assert (status, reached) == (200, form) and response_headers[b"x-activation-budget-applied"] == b"0.5"
    for xargs in (None, "{not json", '{"other": 1}'):  # no budget (or vLLM's own 400): as without the plugin
        form, headers = audio_form(xargs)
        status, response_headers, reached = server.request(form, route, headers=headers)
        assert (status, reached) == (200, form) and b"x-activation-budget-applied" not in response_headers


# -- the admin route -----------------------------------------------------------------------------------------


def test_admin_is_off_without_a_key_and_refuses_a_wrong_one(monkeypatch: pytest.MonkeyPatch) -> None:
    server = aliased(0.5)
    monkeypatch.delenv("VLLM_ALLOC_ADMIN_KEY", raising=False)
    status, answer = server.admin({"default_budget": 0.5})
    assert status == 403 and "VLLM_ALLOC_ADMIN_KEY" in answer["error"]["message"]
    monkeypatch.setenv("VLLM_ALLOC_ADMIN_KEY", KEY)
    for key in (None, "wrong", KEY + "x"):
        status, answer = server.admin({"default_budget": 0.5}, key=key)
        assert status == 401, key
    assert server.engine.calls == []


def test_admin_sets_the_default_budget_on_every_worker_then_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOC_ADMIN_KEY", KEY)
    server = aliased(0.5)
    status, state = server.admin(method="GET")
    assert status == 200 and state["default_budget"] == 1.0 and state["aliases"] == {"tiny@0.5": 0.5}
    status, state = server.admin({"default_budget": 0.75})
    assert status == 200 and state["default_budget"] == 0.75
    change = {"default_budget": 0.75}
    assert server.engine.calls == [
        ("vllm_alloc_reconfigure", (change, False)),
        ("vllm_alloc_reconfigure", (change, True)),
    ]
    _, headers, body = server.request({"model": "tiny", "prompt": "hi"})
    assert headers[b"x-activation-budget-applied"] == b"0.75"  # requests naming none now run at 0.75
    assert body["cache_salt"] == "activation_budget=0.75"
    assert server.engine.input_processor._vllm_alloc_settings.default_budget == 0.75  # the engine's salts too


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"default_budget": 0.1}, "default_budget=0.1 is below this model's minimum"),
        ({"default_budget": "x"}, "default_budget='x' is not a number"),
        ({"budget": 0.5}, "keys default_budget and/or budget_file"),
        ({}, "keys default_budget and/or budget_file"),
        ({"budget_file": 3}, "budget_file=3 is not valid"),
        ({"budget_file": "/no/such/file.json"}, "no/such/file.json"),
    ],
)
def test_admin_refuses_a_bad_change_and_keeps_serving(
    monkeypatch: pytest.MonkeyPatch, change: dict[str, Any], message: str
) -> None:
    monkeypatch.setenv("VLLM_ALLOC_ADMIN_KEY", KEY)
    server = aliased()
    status, answer = server.admin(change)
    assert status == 400 and message in answer["error"]["message"]
    assert server.engine.calls == []  # refused before any worker heard of it
    _, headers, _ = server.request({"model": "tiny", "prompt": "hi"})
    assert headers[b"x-activation-budget-applied"] == b"1.0"


def test_admin_refuses_a_budget_file_with_its_field_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VLLM_ALLOC_ADMIN_KEY", KEY)
    server = aliased()
    model = make_state().fingerprint()
    data = uniform_budget_file(model).model_dump(mode="json")
    data["allocations"][1]["k"] = [9, 9]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    status, answer = server.admin({"budget_file": str(bad)})
    assert (
        status == 400
        and str(bad) in answer["error"]["message"]
        and "allocations[1].k" in answer["error"]["message"]
    )
    assert server.engine.calls == []


def k_base_2_file(tmp_path: Path) -> Path:
    """A valid budget file for the fake model with K_base = 2: its minimum is 0.5, not 0.25."""
    path = tmp_path / "k2.json"
    uniform_budget_file(make_state().fingerprint(), k_base=2).dump(path)
    return path


def test_admin_loads_a_file_and_a_worker_refusal_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VLLM_ALLOC_ADMIN_KEY", KEY)
    server = aliased(0.5)
    path = k_base_2_file(tmp_path)
    server.engine.refuse = f"budget file {path}: field 'model': written for another model"
    status, answer = server.admin({"budget_file": str(path)})
    assert status == 400 and answer["error"]["message"] == server.engine.refuse
    assert len(server.engine.calls) == 1  # the check failed: no worker was asked to apply it
    assert server.admin(method="GET")[1]["budget_file"] == "uniform"
    server.engine.refuse = None
    status, state = server.admin({"budget_file": str(path)})
    assert status == 200 and state["budget_file"] == str(path) and state["min_budget"] == 0.5
    sent = server.engine.calls[-1][1][0]["budget_file"]
    assert sent == {"source": str(path), "text": path.read_text()}  # every worker checks the same text
    status, _, error = server.request(
        {"model": "tiny", "prompt": "hi"}, headers={"X-Activation-Budget": "0.25"}
    )
    assert status == 400 and "[0.5, 1]" in error["error"]["message"]  # the new file's minimum


def test_admin_refuses_a_file_whose_minimum_is_above_an_alias(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VLLM_ALLOC_ADMIN_KEY", KEY)
    server = aliased(0.25)
    path = k_base_2_file(tmp_path)
    status, answer = server.admin({"budget_file": str(path)})
    assert status == 400 and "budget_aliases[0]=0.25" in answer["error"]["message"]


def test_admin_answers_503_with_several_api_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOC_ADMIN_KEY", KEY)
    server = Server(api_servers=2)
    status, answer = server.admin({"default_budget": 0.5})
    assert status == 503 and "--api-server-count" in answer["error"]["message"]
    assert server.admin(method="GET")[0] == 200


# -- the worker's side ---------------------------------------------------------------------------------------


def test_worker_checks_then_applies_a_new_file_in_place(tmp_path: Path) -> None:
    state = make_state()
    plan = state.plan
    assert plan is not None
    table = plan.table
    text = uniform_budget_file(state.fingerprint(), k_base=2, default_budget=0.75).model_dump_json()
    change = {"budget_file": {"source": "k2.json", "text": text}}
    assert state.reconfigure(change, apply=False) == {
        "source": "k2.json",
        "default_budget": 0.75,
        "min_budget": 0.5,
    }
    assert plan.source == "uniform" and plan.table[2].tolist() == [1, 1]  # checked only
    state.reconfigure(change, apply=True)
    assert plan.table is table and plan.table[2].tolist() == [0, 0]  # same buffer, K_base = 2 now
    assert plan.source == "k2.json" and plan.default_budget == 0.75 and state.absolute_budget(None) == 6
    state.reconfigure({"default_budget": 0.5}, apply=True)  # the file stays, as loaded
    assert plan.source == "k2.json" and state.absolute_budget(None) == 4
    state.reconfigure({"budget_file": None}, apply=True)  # back to uniform; the default set stays
    assert plan.source == "uniform" and plan.table[2].tolist() == [1, 1] and plan.default_budget == 0.5


def test_worker_refuses_a_file_for_another_model_and_keeps_its_own() -> None:
    state = make_state()
    plan = state.plan
    assert plan is not None
    other = state.fingerprint().model_copy(update={"num_experts": 16})
    change = {"budget_file": {"source": "other.json", "text": uniform_budget_file(other).model_dump_json()}}
    with pytest.raises(ValueError, match=r"other\.json.*num_experts"):
        state.reconfigure(change, apply=True)
    with pytest.raises(ValueError, match=r"default_budget"):
        state.reconfigure({"default_budget": 0.1}, apply=True)
    assert plan.source == "uniform" and plan.default_budget == 1.0
    assert torch.equal(plan.table, uniform_budget_file(state.fingerprint()).allocation_table())


# -- the launcher --------------------------------------------------------------------------------------------


def build(argv: list[str]) -> launch.Launch:
    args, rest = build_parser().parse_known_args(["serve", *argv])
    return launch.build_launch(args, rest, cuda=False)


def additional(launched: launch.Launch) -> dict[str, Any]:
    return json.loads(launched.argv[launched.argv.index("--additional-config") + 1])


def test_serve_budget_aliases_reach_the_config(tiny_config_dir: Path) -> None:
    launched = build([str(tiny_config_dir), "--budget-aliases", "0.75,0.5"])
    assert additional(launched)["vllm_alloc"]["budget_aliases"] == [0.75, 0.5]
    with pytest.raises(launch.LaunchError, match=r"budget_aliases\[1\]=0.1 .*\[0.25, 1\]"):
        build([str(tiny_config_dir), "--budget-aliases", "0.75,0.1"])
    with pytest.raises(launch.LaunchError, match="disagree"):
        build(
            [
                str(tiny_config_dir),
                "--budget-aliases",
                "0.5",
                "--additional-config",
                '{"vllm_alloc": {"budget_aliases": [0.75]}}',
            ]
        )


def test_serve_admin_key_file(tiny_config_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    launched = build([str(tiny_config_dir), "--admin-key-file", str(key)])
    assert launched.env["VLLM_ALLOC_ADMIN_KEY"] == KEY and KEY not in " ".join(launched.argv)
    key.write_text("short")
    with pytest.raises(launch.LaunchError, match="at least 16 characters"):
        build([str(tiny_config_dir), "--admin-key-file", str(key)])
    with pytest.raises(launch.LaunchError, match="cannot be read"):
        build([str(tiny_config_dir), "--admin-key-file", str(tmp_path / "missing")])


@pytest.fixture
def tiny_config_dir(tmp_path: Path) -> Path:
    """A local checkpoint folder with only config.json (K = 4), which the launcher reads for the minimum."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_experts_per_tok": 4}))
    return folder


def test_plugin_config_default_has_no_aliases() -> None:
    assert PluginConfig().resolve(top_k=4).aliases == ()
