"""ActivationBudgetMiddleware against a fake ASGI app, and the `vllm-alloc serve` command builder.

No vLLM engine here (fast); the real server is exercised in test_server_e2e.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from vllm_alloc.cli import build_parser
from vllm_alloc.integration.config import settings_from_vllm_config
from vllm_alloc.serving import launch
from vllm_alloc.serving.middleware import ActivationBudgetMiddleware

K = 4  # the fake model's top-k: minimum b = K_base / K = 0.25
COMPLETIONS = "/v1/completions"
SCORING = "/generative_scoring"  # vLLM builds its SamplingParams without vllm_xargs


class FakeApp:
    """Records what reached vLLM; answers 200 with two body chunks (a stream) and echoes the body."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        first = await receive()
        after = await receive() if scope.get("wait_disconnect") else None
        self.calls.append({"scope": scope, "body": first.get("body", b""), "after": after})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-vllm", b"1")]})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def vllm_config(additional: Any = None, top_k: int | None = K) -> Any:
    hf = SimpleNamespace(num_experts_per_tok=top_k) if top_k else SimpleNamespace()
    return SimpleNamespace(additional_config=additional, model_config=SimpleNamespace(hf_text_config=hf))


def call(
    body: Any = None,
    header: str | bytes | list[bytes] | None = None,
    *,
    path: str = COMPLETIONS,
    method: str = "POST",
    config: Any = None,
    chunks: int = 1,
    wait_disconnect: bool = False,
) -> tuple[FakeApp, list[dict[str, Any]]]:
    """Run one request through the middleware; (the fake app, the messages sent to the client)."""
    app = FakeApp()
    middleware = ActivationBudgetMiddleware(app)
    raw = body if isinstance(body, bytes) else json.dumps(body or {"prompt": "hi"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if isinstance(header, list):
        headers += [(b"x-activation-budget", h) for h in header]
    elif header is not None:
        headers.append((b"x-activation-budget", header.encode() if isinstance(header, str) else header))
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": headers,
        "app": SimpleNamespace(state=SimpleNamespace(vllm_config=config or vllm_config())),
        "wait_disconnect": wait_disconnect,
    }
    step = max(1, len(raw) // chunks + 1)
    incoming = [
        {"type": "http.request", "body": raw[i : i + step], "more_body": i + step < len(raw)}
        for i in range(0, max(len(raw), 1), step)
    ] + [{"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    return app, sent


def forwarded(app: FakeApp) -> dict[str, Any]:
    (c,) = app.calls
    return json.loads(c["body"])


def headers_of(sent: list[dict[str, Any]]) -> dict[bytes, bytes]:
    return dict(sent[0]["headers"])


def error_of(sent: list[dict[str, Any]]) -> dict[str, Any]:
    assert sent[0]["status"] == 400
    return json.loads(sent[1]["body"])["error"]


# -- valid budgets ---------------------------------------------------------------------------------------


def test_header_becomes_float_in_vllm_xargs_and_is_echoed() -> None:
    app, sent = call({"prompt": "hi", "vllm_xargs": {"other": "x"}}, "0.5")
    body = forwarded(app)
    assert body["vllm_xargs"] == {"other": "x", "activation_budget": 0.5}
    assert isinstance(body["vllm_xargs"]["activation_budget"], float)
    assert body["cache_salt"] == "activation_budget=0.5"
    assert headers_of(sent)[b"x-activation-budget-applied"] == b"0.5"
    assert headers_of(sent)[b"x-vllm"] == b"1"  # the app's own headers stay


def test_body_only() -> None:
    app, sent = call({"prompt": "hi", "vllm_xargs": {"activation_budget": 0.25}})
    assert forwarded(app)["vllm_xargs"]["activation_budget"] == 0.25
    assert headers_of(sent)[b"x-activation-budget-applied"] == b"0.25"


def test_header_and_body_that_agree() -> None:
    app, _ = call({"prompt": "hi", "vllm_xargs": {"activation_budget": "0.50"}}, " 0.5 ")
    assert forwarded(app)["vllm_xargs"]["activation_budget"] == 0.5


def test_none_given_applies_the_server_default() -> None:
    app, sent = call({"prompt": "hi"})
    body = forwarded(app)
    assert body["vllm_xargs"]["activation_budget"] == 1.0
    assert "cache_salt" not in body  # b = 1.0 keeps vLLM's unsalted prefix-cache namespace
    assert headers_of(sent)[b"x-activation-budget-applied"] == b"1.0"


def test_default_from_additional_config() -> None:
    config = vllm_config({"vllm_alloc": {"default_budget": 0.75}})
    app, sent = call({"prompt": "hi"}, config=config)
    assert forwarded(app)["vllm_xargs"]["activation_budget"] == 0.75
    assert headers_of(sent)[b"x-activation-budget-applied"] == b"0.75"


def test_content_length_is_rewritten() -> None:
    app, _ = call({"prompt": "hi"}, "0.5", chunks=3)  # body arrives in pieces (more_body)
    (c,) = app.calls
    lengths = [v for k, v in c["scope"]["headers"] if k == b"content-length"]
    assert lengths == [str(len(c["body"])).encode()]


def test_streaming_body_chunks_pass_through_and_header_is_on_the_start_message() -> None:
    _, sent = call({"prompt": "hi", "stream": True}, "0.5")
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert headers_of(sent)[b"x-activation-budget-applied"] == b"0.5"
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n", b"data: [DONE]\n\n"]


def test_disconnect_reaches_the_app_after_the_body() -> None:
    app, _ = call({"prompt": "hi", "stream": True}, "0.5", wait_disconnect=True)
    assert app.calls[0]["after"] == {"type": "http.disconnect"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": []}),
        ("/v1/completions", {"model": "m", "prompt": "hi"}),
        ("/v1/responses", {"model": "m", "input": "hi"}),
        ("/v1/messages", {"model": "m", "max_tokens": 8, "messages": []}),  # Anthropic
        ("/invocations", {"messages": []}),  # SageMaker, a chat body: vLLM tries ChatCompletionRequest first
        ("/invocations", {"prompt": "hi"}),  # ... then CompletionRequest
        ("/invocations", {"prompt_embeds": "AAAA"}),
    ],
)
def test_every_generation_endpoint(path: str, body: dict[str, Any]) -> None:
    app, sent = call(body, "0.5", path=path)
    assert forwarded(app)["vllm_xargs"]["activation_budget"] == 0.5
    assert forwarded(app)["cache_salt"] == "activation_budget=0.5"
    assert headers_of(sent)[b"x-activation-budget-applied"] == b"0.5"
    app, sent = call(body, path=path)  # no budget named: the server default, as on every route
    assert forwarded(app)["vllm_xargs"]["activation_budget"] == 1.0


@pytest.mark.parametrize(
    ("body", "header"),
    [
        ({"input": "embed me"}, "0.5"),  # an embedding body: vLLM would hand it to a pooling handler
        ({"input": "x", "vllm_xargs": {"activation_budget": 0.5}}, None),
        ({"query": "q", "documents": ["d"]}, "1"),  # rerank; even b = 1.0 is a budget the route ignores
    ],
)
def test_invocations_refuses_a_budget_on_a_pooling_body(body: dict[str, Any], header: str | None) -> None:
    app, sent = call(body, header, path="/invocations")
    assert app.calls == []
    message = error_of(sent)["message"]
    assert "applies only to text generation" in message and "messages, prompt, prompt_embeds" in message


def test_invocations_pooling_body_without_a_budget_is_untouched() -> None:
    raw = b'{"input": "embed me"}'
    app, sent = call(raw, path="/invocations")
    assert app.calls[0]["body"] == raw
    assert b"x-activation-budget-applied" not in headers_of(sent)


def test_invocations_pooling_body_with_an_invalid_header_is_400() -> None:
    _, sent = call({"input": "x"}, "abc", path="/invocations")
    assert "not a number" in error_of(sent)["message"]


def test_messages_errors_have_vllms_anthropic_shape() -> None:
    app, sent = call({"model": "m", "max_tokens": 8, "messages": []}, "2", path="/v1/messages")
    assert app.calls == []
    assert sent[0]["status"] == 400
    payload = json.loads(sent[1]["body"])
    assert payload["type"] == "error" and payload["error"]["type"] == "BadRequestError"
    assert "out of range" in payload["error"]["message"] and "[0.25, 1]" in payload["error"]["message"]


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/v1/models", "GET"),  # not a generation endpoint
        ("/metrics", "GET"),
        ("/v1/completions", "GET"),  # generation path, wrong method: vLLM answers 405
    ],
)
def test_other_requests_are_untouched(path: str, method: str) -> None:
    raw = b'{"prompt": "hi"}'
    app, sent = call(raw, "garbage", path=path, method=method)
    assert app.calls[0]["body"] == raw
    assert b"x-activation-budget-applied" not in headers_of(sent)


def test_non_json_body_is_left_for_vllm() -> None:
    app, sent = call(b"not json{", "0.5")
    assert app.calls[0]["body"] == b"not json{"
    assert b"x-activation-budget-applied" not in headers_of(sent)


def test_client_cache_salt_is_combined_per_budget() -> None:
    app, _ = call({"prompt": "hi", "cache_salt": "tenant-7"}, "0.5")
    assert forwarded(app)["cache_salt"] == "activation_budget=0.5;tenant-7"
    app, _ = call({"prompt": "hi", "cache_salt": "tenant-7"}, "1")
    assert forwarded(app)["cache_salt"] == "tenant-7"


# -- invalid budgets: 400 with vLLM's error shape, the app never sees the request --------------------------


@pytest.mark.parametrize(
    ("body_budget", "header", "needle"),
    [
        (None, "abc", "not a number"),
        (None, "", "not a number"),
        (None, "nan", "not finite"),
        (None, "inf", "not finite"),
        (None, "-inf", "not finite"),
        (None, "0", "out of range"),
        (None, "-0.5", "out of range"),
        (None, "1.5", "out of range"),
        (None, "0.2", "below this model's minimum"),  # 1/K = 0.25
        (None, "0." + "5" * 40, "characters"),  # oversized header
        (None, "0.5, 0.25", "different values (0.25, 0.5)"),  # folded by a proxy, and they differ
        (None, "0.5, abc", "not a number"),  # every element of a folded header must be a budget
        (None, " , ", "not a number"),  # nothing but separators
        ("abc", None, "not a number"),
        (float("nan"), None, "not finite"),  # json.dumps writes NaN, json.loads reads it
        (0, None, "out of range"),
        (2, None, "out of range"),
        (True, None, "not a number"),
        ([0.5], None, "has type list"),
        (0.1, None, "below this model's minimum"),
        (0.25, "0.5", "disagree"),
        (0.25, "0.5, 0.5", "disagree"),
        pytest.param(10**400, None, "out of range", id="int-of-401-digits"),  # float() overflows
        pytest.param(-(10**400), None, "out of range", id="negative-int-of-401-digits"),
    ],
)
def test_invalid_budget_is_400_naming_the_range(body_budget: Any, header: str | None, needle: str) -> None:
    body: dict[str, Any] = {"prompt": "hi"}
    if body_budget is not None:
        body["vllm_xargs"] = {"activation_budget": body_budget}
    app, sent = call(body, header)
    assert app.calls == []
    error = error_of(sent)
    assert needle in error["message"]
    assert "[0.25, 1]" in error["message"]
    assert error["type"] == "BadRequestError" and error["param"] == "activation_budget"
    assert error["code"] == 400
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(sent[1]["body"])).encode()


def test_huge_header_is_refused_before_parsing() -> None:
    _, sent = call({"prompt": "hi"}, b"1" * 100_000)
    assert "100000 bytes long" in error_of(sent)["message"]
    _, sent = call({"prompt": "hi"}, [b"0.5"] * 1000)  # as many headers: refused as one folded list
    assert "3999 bytes long" in error_of(sent)["message"]


def test_huge_integer_body_budget_names_the_field() -> None:
    raw = b'{"prompt": "hi", "vllm_xargs": {"activation_budget": 1' + b"0" * 400 + b"}}"
    app, sent = call(raw)
    assert app.calls == []
    message = error_of(sent)["message"]
    assert message.startswith("vllm_xargs.activation_budget=<an integer of about 401 digits> is out of range")
    assert "[0.25, 1]" in message and "too large" not in message


def test_repeated_headers_that_differ_are_400_naming_both() -> None:
    _, sent = call({"prompt": "hi"}, [b"0.5", b"0.25"])
    assert "different values (0.25, 0.5)" in error_of(sent)["message"]
    app, _ = call({"prompt": "hi"}, [b"0.5", b"0.5"])
    assert forwarded(app)["vllm_xargs"]["activation_budget"] == 0.5


@pytest.mark.parametrize(
    "header",
    [
        b"0.5, 0.5",  # RFC 9110 list folding, as a proxy writes it
        b"0.5,0.50",  # equal as numbers
        b"0.5, , 0.5",  # empty list elements are ignored
        [b"0.5, 0.5", b"0.5"],  # folded and repeated
    ],
)
def test_folded_headers_that_agree_are_one_budget(header: bytes | list[bytes]) -> None:
    app, sent = call({"prompt": "hi"}, header)
    assert forwarded(app)["vllm_xargs"]["activation_budget"] == 0.5
    assert headers_of(sent)[b"x-activation-budget-applied"] == b"0.5"


def test_non_ascii_header_is_shown_escaped_not_as_mojibake() -> None:
    _, sent = call({"prompt": "hi"}, "0.5é".encode())
    message = error_of(sent)["message"]
    assert r"X-Activation-Budget header=b'0.5\xc3\xa9' is not a number" in message
    assert "Ã" not in message and "é" not in message


def test_unknown_model_accepts_the_open_range() -> None:
    config = vllm_config(top_k=None)
    app, _ = call({"prompt": "hi"}, "0.01", config=config)
    assert forwarded(app)["vllm_xargs"]["activation_budget"] == 0.01
    _, sent = call({"prompt": "hi"}, "0", config=config)
    assert "(0, 1]" in error_of(sent)["message"]


def test_settings_from_a_budget_file(tmp_path: Any) -> None:
    from vllm_alloc.budget import ModelFingerprint, uniform_budget_file

    model = ModelFingerprint(
        architecture="Qwen3MoeForCausalLM",
        moe_layers=[0, 1],
        num_experts=16,
        top_k=8,
        hidden_size=128,
        intermediate_size=64,
    )
    path = tmp_path / "b.json"
    uniform_budget_file(model, k_base=2, default_budget=0.5).dump(path)
    settings = settings_from_vllm_config(vllm_config({"vllm_alloc": {"budget_file": str(path)}}))
    assert (settings.min_budget, settings.default_budget) == (0.25, 0.5)  # k_base / K = 2 / 8
    assert settings.budget_file == uniform_budget_file(model, k_base=2, default_budget=0.5)


def test_settings_fall_back_to_the_open_range_when_they_cannot_be_resolved() -> None:
    config = vllm_config({"vllm_alloc": {"budget_file": "/no/such.json"}})
    app, _ = call({"prompt": "hi"}, "0.01", config=config)  # the engine refuses this config at start-up
    assert forwarded(app)["vllm_xargs"]["activation_budget"] == 0.01


# -- the launcher: command line and checks, without starting vLLM ------------------------------------------


def launch_for(argv: list[str], *, cuda: bool = False) -> launch.Launch:
    args, rest = build_parser().parse_known_args(["serve", *argv])
    return launch.build_launch(args, rest, cuda=cuda)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_serve_command_cpu(tmp_path: Any) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_experts_per_tok": 4}))
    result = launch_for([str(tmp_path), "--default-budget", "0.5", "--port", "8123", "--enforce-eager"])
    try:
        argv = result.argv
        assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert flag(argv, "--model") == str(tmp_path)
        assert flag(argv, "--port") == "8123" and "--enforce-eager" in argv
        assert flag(argv, "--middleware") == "vllm_alloc.serving.middleware.ActivationBudgetMiddleware"
        assert json.loads(flag(argv, "--additional-config")) == {"vllm_alloc": {"default_budget": 0.5}}
        assert "--moe-backend" not in argv
        assert result.env["PROMETHEUS_MULTIPROC_DIR"] == result.prometheus_dir
    finally:
        launch._remove(result.prometheus_dir)


def test_serve_drains_requests_on_shutdown_unless_told_otherwise() -> None:
    # vLLM 0.32's default (0: abort) leaves in-flight connections unanswered at SIGTERM.
    ours = launch_for(["m"])
    launch._remove(ours.prometheus_dir)
    assert flag(ours.argv, "--shutdown-timeout") == str(launch.SHUTDOWN_TIMEOUT_S)
    assert ours.kill_after_s == launch.SHUTDOWN_TIMEOUT_S + launch.KILL_GRACE_S
    for given in (["--shutdown-timeout", "5"], ["--shutdown_timeout=5"]):
        theirs = launch_for(["m", *given])
        launch._remove(theirs.prometheus_dir)
        assert sum(a.startswith(("--shutdown-timeout", "--shutdown_timeout")) for a in theirs.argv) == 1
        assert theirs.kill_after_s == 5 + launch.KILL_GRACE_S
    with pytest.raises(launch.LaunchError, match=r"--shutdown-timeout 'soon' is not a number"):
        launch_for(["m", "--shutdown-timeout", "soon"])


def test_serve_command_cuda_merges_additional_config() -> None:
    user = json.dumps({"other_plugin": 1, "vllm_alloc": {"scope": "request"}})
    result = launch_for(["m", "--additional-config", user, "--default-budget", "1"], cuda=True)
    launch._remove(result.prometheus_dir)
    assert flag(result.argv, "--moe-backend") == "triton"
    assert json.loads(flag(result.argv, "--additional-config")) == {
        "other_plugin": 1,
        "vllm_alloc": {"scope": "request", "default_budget": 1.0},
    }
    kept = launch_for(["m", "--moe-backend", "cutlass"], cuda=True)
    launch._remove(kept.prometheus_dir)
    assert flag(kept.argv, "--moe-backend") == "cutlass" and kept.argv.count("--moe-backend") == 1


def test_several_api_servers_leave_the_metrics_dir_to_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch.importlib.metadata, "version", lambda name: "0.32.0")
    result = launch_for(["m", "--api-server-count", "2"])
    assert result.argv[1] == "serve" and flag(result.argv, "--api-server-count") == "2"
    assert result.prometheus_dir is None and "PROMETHEUS_MULTIPROC_DIR" not in result.env


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "MODEL is required"),
        (["m", "--default-budget", "abc"], "not a number"),
        (["m", "--default-budget", "0"], "out of range"),
        (["m", "--budget-config", "/no/such.json"], "no such file"),
        (["m", "--additional-config", "{bad"], "not valid JSON"),
        (["m", "--additional-config", '{"vllm_alloc": {"colour": 1}}'], "unknown key"),
        (
            ["m", "--default-budget", "0.5", "--additional-config", '{"vllm_alloc": {"default_budget": 1}}'],
            "disagree",
        ),
        (["m", "--additional-config", '{"vllm_alloc": 3}'], r'"vllm_alloc" is 3; expected a JSON object'),
        (["m", "--additional-config", '{"vllm_alloc": []}'], r'"vllm_alloc" is \[\]; expected a JSON object'),
        (["m", "--additional-config", '{"vllm_alloc": "x"}'], r'"vllm_alloc" is "x"; expected a JSON object'),
        (["m", "--additional-config", '{"vllm_alloc": {"budget_file": 3}}'], "budget_file=3 is not valid"),
        (
            ["m", "--default-budget", "1" + "0" * 400],
            r"--default-budget is 401 characters long",  # text: capped before float() sees it
        ),
        (
            ["m", "--additional-config", '{"vllm_alloc": {"default_budget": 1' + "0" * 400 + "}}"],
            r"out of range",
        ),
    ],
)
def test_serve_refuses_bad_settings(argv: list[str], needle: str) -> None:
    with pytest.raises(launch.LaunchError, match=needle):
        launch_for(argv)


@pytest.mark.parametrize(
    ("flag_value", "config_value"),
    [("1", 1.0), ("1.0", 1), ("0.50", 0.5), ("0.5", "0.5")],
)
def test_flag_and_additional_config_compare_as_numbers(flag_value: str, config_value: Any) -> None:
    user = json.dumps({"vllm_alloc": {"default_budget": config_value}})
    result = launch_for(["m", "--default-budget", flag_value, "--additional-config", user])
    launch._remove(result.prometheus_dir)
    section = json.loads(flag(result.argv, "--additional-config"))["vllm_alloc"]
    assert section["default_budget"] == float(flag_value)


def test_flag_and_additional_config_compare_budget_files_by_what_they_load(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_alloc.budget import ModelFingerprint, uniform_budget_file
    from vllm_alloc.budget import load as budget_load  # where CONFIGS_DIR is looked up

    monkeypatch.setattr(budget_load, "CONFIGS_DIR", tmp_path / "configs")
    (tmp_path / "configs").mkdir()
    for name in ("a", "b"):
        uniform_budget_file(ModelFingerprint(**FINGERPRINT)).dump(tmp_path / "configs" / f"{name}.json")
    monkeypatch.chdir(tmp_path)
    same = [
        "a",
        "a.json",
        "configs/a.json",
        str(tmp_path / "configs" / "a.json"),
        "./configs/../configs/a.json",
    ]
    for flag_value in same:
        for config_value in same:
            user = json.dumps({"vllm_alloc": {"budget_file": config_value}})
            result = launch_for(["m", "--budget-config", flag_value, "--additional-config", user])
            launch._remove(result.prometheus_dir)
    user = json.dumps({"vllm_alloc": {"budget_file": "b"}})
    with pytest.raises(
        launch.LaunchError, match=r"--budget-config 'a' and --additional-config .* 'b' disagree"
    ):
        launch_for(["m", "--budget-config", "a", "--additional-config", user])


FINGERPRINT = {
    "architecture": "Qwen3MoeForCausalLM",
    "moe_layers": [0, 1],
    "num_experts": 8,
    "top_k": 4,
    "hidden_size": 64,
    "intermediate_size": 32,
}


def test_default_below_the_local_models_minimum(tmp_path: Any) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_experts_per_tok": 4}))
    with pytest.raises(launch.LaunchError, match=r"minimum.*\[0.25, 1\]"):
        launch_for([str(tmp_path), "--default-budget", "0.2"])


def test_serve_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_alloc.cli import main

    assert main(["serve", "m", "--budget-config", "/no/such.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-alloc serve: error: budget file /no/such.json") and "Traceback" not in err


def test_run_forwards_the_exit_code_and_removes_the_dir(tmp_path: Any) -> None:
    import sys

    d = tmp_path / "prom"
    d.mkdir()
    code = launch.run(
        launch.Launch(argv=[sys.executable, "-c", "raise SystemExit(3)"], prometheus_dir=str(d))
    )
    assert code == 3 and not d.exists()


def test_parser_has_no_abbreviations() -> None:
    args, rest = build_parser().parse_known_args(["serve", "m", "--default", "x"])
    assert isinstance(args, argparse.Namespace) and rest == ["--default", "x"]


@pytest.mark.parametrize("path", [SCORING, "/cohere/v2/chat", "/v1/embeddings", "/pooling"])
def test_other_routes_refuse_a_budget_header_instead_of_ignoring_it(path: str) -> None:
    app, sent = call({"prompt": "hi"}, "0.5", path=path)
    assert not app.calls and sent[0]["status"] == 400
    message = json.loads(sent[1]["body"])["error"]["message"]
    assert f"not applied on {path}" in message and "/v1/completions" in message


def test_other_routes_without_a_budget_pass_through() -> None:
    raw = json.dumps(ROUTES[SCORING]).encode()
    app, sent = call(raw, path=SCORING)
    assert app.calls[0]["body"] == raw and sent[0]["status"] == 200
    assert b"x-activation-budget-applied" not in headers_of(sent)


# -- the other routes vLLM 0.32 generates on (issue #33): applied, or refused, never ignored ---------------


BATCH = "/v1/chat/completions/batch"  # vllm_xargs reaches each conversation's ChatCompletionRequest
GENERATE = "/inference/v1/generate"  # the body holds SamplingParams: sampling_params.extra_args
ROUTES = {
    BATCH: {"model": "m", "messages": [[{"role": "user", "content": "hi"}]]},
    GENERATE: {"model": "m", "token_ids": [1, 2], "sampling_params": {"max_tokens": 2}},
    SCORING: {"model": "m", "query": "q", "items": ["a"], "label_token_ids": [1]},
}
FIELD = {
    BATCH: "vllm_xargs.activation_budget",
    GENERATE: "sampling_params.extra_args.activation_budget",
    SCORING: "vllm_xargs.activation_budget",
}


def route_body(path: str, budget: Any = None) -> dict[str, Any]:
    """The route's minimal body, with `budget` where that route's request model reads it."""
    body = json.loads(json.dumps(ROUTES[path]))
    if budget is not None:
        holder = body["sampling_params"] if path == GENERATE else body
        holder["extra_args" if path == GENERATE else "vllm_xargs"] = {"activation_budget": budget}
    return body


def applied_in(path: str, body: dict[str, Any]) -> Any:
    return (body["sampling_params"]["extra_args"] if path == GENERATE else body["vllm_xargs"])[
        "activation_budget"
    ]


@pytest.mark.parametrize("path", [BATCH, GENERATE])
@pytest.mark.parametrize(("budget", "header"), [(0.5, None), (None, "0.5"), (0.5, "0.50")])
def test_batch_and_generate_apply_a_valid_budget(path: str, budget: Any, header: str | None) -> None:
    app, sent = call(route_body(path, budget), header, path=path)
    body = forwarded(app)
    assert applied_in(path, body) == 0.5 and body["cache_salt"] == "activation_budget=0.5"
    assert headers_of(sent)[b"x-activation-budget-applied"] == b"0.5"
    if path == GENERATE:
        assert body["sampling_params"]["max_tokens"] == 2  # the client's sampling params stay
    assert body.keys() - {"vllm_xargs", "cache_salt"} == ROUTES[path].keys()


@pytest.mark.parametrize("path", [BATCH, GENERATE])
def test_batch_and_generate_without_a_budget_run_at_the_default(path: str) -> None:
    config = vllm_config({"vllm_alloc": {"default_budget": 0.75}})
    app, sent = call(route_body(path), path=path, config=config)
    assert applied_in(path, forwarded(app)) == 0.75
    assert headers_of(sent)[b"x-activation-budget-applied"] == b"0.75"


@pytest.mark.parametrize("path", [BATCH, GENERATE, SCORING])
@pytest.mark.parametrize(
    ("budget", "header", "needle"),
    [
        (0.1, None, "below this model's minimum"),  # the case: 0.01 ran clamped to 0.25
        (0.01, None, "below this model's minimum"),
        (2, None, "out of range"),
        ("abc", None, "not a number"),
        (True, None, "not a number"),
        ([0.5], None, "has type list"),
        (None, "abc", "not a number"),
        (None, "0.2", "below this model's minimum"),
        (None, "1.5", "out of range"),
    ],
)
def test_invalid_budget_on_every_generating_route_is_400_naming_field_and_range(
    path: str, budget: Any, header: str | None, needle: str
) -> None:
    app, sent = call(route_body(path, budget), header, path=path)
    assert app.calls == []
    message = error_of(sent)["message"]
    source = "X-Activation-Budget header" if header is not None else FIELD[path]
    assert message.startswith(source) and needle in message and "[0.25, 1]" in message, message


@pytest.mark.parametrize("path", [BATCH, GENERATE])
def test_batch_and_generate_refuse_header_and_body_that_disagree(path: str) -> None:
    app, sent = call(route_body(path, 0.25), "0.5", path=path)
    assert app.calls == []
    assert f"header (0.5) and {FIELD[path]} (0.25) disagree" in error_of(sent)["message"]


@pytest.mark.parametrize("header", [None, "0.5"])
def test_generate_refuses_a_top_level_vllm_xargs_budget_vllm_would_drop(header: str | None) -> None:
    body = {**route_body(GENERATE), "vllm_xargs": {"activation_budget": 0.5}}
    app, sent = call(body, header, path=GENERATE)
    assert app.calls == []
    message = error_of(sent)["message"]
    assert message.startswith(f"vllm_xargs.activation_budget is not applied on {GENERATE}")
    assert "sampling_params.extra_args.activation_budget" in message
    body["vllm_xargs"] = {"activation_budget": 0.1}  # an invalid one: its range, as everywhere
    _, sent = call(body, path=GENERATE)
    assert "below this model's minimum" in error_of(sent)["message"]
    body["vllm_xargs"] = {"session_id": "s"}  # other keys are vLLM's business
    app, _ = call(body, path=GENERATE)
    assert applied_in(GENERATE, forwarded(app)) == 1.0


@pytest.mark.parametrize("sampling_params", ["x", None, {"extra_args": [1]}])
def test_generate_with_malformed_sampling_params_is_left_for_vllm(sampling_params: Any) -> None:
    body = {**route_body(GENERATE), "sampling_params": sampling_params}
    app, sent = call(body, "0.5", path=GENERATE)
    assert forwarded(app) == body and b"x-activation-budget-applied" not in headers_of(sent)
    _, sent = call(body, "0.2", path=GENERATE)  # the header is still checked
    assert "below this model's minimum" in error_of(sent)["message"]


@pytest.mark.parametrize("path", [SCORING, "/cohere/v2/chat"])
@pytest.mark.parametrize(("budget", "header"), [(0.5, None), (None, "0.5"), (0.5, "0.5"), (0.25, "0.5")])
def test_scoring_and_cohere_refuse_a_valid_budget_they_would_drop(
    path: str, budget: Any, header: str | None
) -> None:
    app, sent = call(route_body(SCORING, budget), header, path=path)
    assert app.calls == []
    message = error_of(sent)["message"]
    assert f"is not applied on {path}" in message and "/v1/chat/completions/batch" in message, message


def test_the_old_middleware_path_is_a_deprecated_alias() -> None:
    """`--middleware vllm_alloc.server.ActivationBudgetMiddleware`, the path documented before the package
    layout, still loads the same class, with a warning that names the new path."""
    import importlib
    import sys

    sys.modules.pop("vllm_alloc.server", None)
    with pytest.warns(FutureWarning, match=r"vllm_alloc\.serving\.middleware\.ActivationBudgetMiddleware"):
        old = importlib.import_module("vllm_alloc.server")
    assert old.ActivationBudgetMiddleware is ActivationBudgetMiddleware


def test_cli_finds_every_subcommand() -> None:
    """`vllm-alloc serve | profile | show` each parse, from the modules the package layout moved them to."""
    from vllm_alloc.cli import SUBCOMMANDS, build_parser

    minimal = {
        "serve": ["models/default"],
        "profile": ["models/default", "--out", "x.json"],
        "show": ["x.json"],
    }
    assert set(SUBCOMMANDS) == set(minimal)
    parser = build_parser()
    for name, argv in minimal.items():
        assert parser.parse_args([name, *argv]).command == name
