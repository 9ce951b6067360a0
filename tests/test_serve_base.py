"""`adgen serve --model TUNED --base BASE`: a whole fine-tuned model (no adapter) served beside its base model.

The server runs a tiny random Llama-3 ("the base") and a copy of it whose top layer's weights changed ("the
fine-tune", as `adgen demo` leaves it). The API's `model` field (and /v1/adcopy's `use_adapter: false`) must reach
the base model's own scheduler: its answers equal what the base model alone generates, and differ from the
fine-tune's. The web UI's compare view over the same server is tested in tests/test_webui_browser.py.
"""

from __future__ import annotations

import json
import shlex

import httpx
import pytest

from adgen.cli import build_parser, main
from adgen.commands.serve import settings_from_args
from adgen.demo import serve_command
from adgen.generation import load_generator
from adgen.generation.config import DecodingConfig
from adgen.serve.routing import first_of_two_utilization
from adgen.serve.server import ServerThread, build
from adgen.serve.settings import Limits, ServeSettings
from tuned_copy import build_tuned_copy

MAX_TOKENS = 12
MESSAGES = [{"role": "user", "content": "类型#裙*颜色#黑色*风格#简约"}]


@pytest.fixture(scope="module")
def tuned_dir(tiny_llama3_dir, tmp_path_factory):
    return build_tuned_copy(tiny_llama3_dir, tmp_path_factory.mktemp("tuned-llama3"))


@pytest.fixture(scope="module")
def server(tuned_dir, tiny_llama3_dir):
    settings = ServeSettings(model=str(tuned_dir), base=str(tiny_llama3_dir), batch_size=4,
                             limits=Limits(default_max_tokens=MAX_TOKENS))
    state, app = build(settings)
    with ServerThread(app, state=state) as srv:
        srv.state = state
        yield srv


def alone(model_dir) -> str:
    """What the model generates for MESSAGES loaded on its own (greedy)."""
    return load_generator(str(model_dir)).generate([MESSAGES], DecodingConfig(max_new_tokens=MAX_TOKENS))[0].text


def chat(server, model: str, **kw) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": model, "messages": MESSAGES, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_the_fine_tune_and_its_base(server, tuned_dir, tiny_llama3_dir):
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]]
    assert ids == [tuned_dir.name, tiny_llama3_dir.name]
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["model"] == tuned_dir.name and health["base_model"]["model_id"] == tiny_llama3_dir.name


def test_the_model_field_picks_the_base_model_or_the_fine_tune(server, tuned_dir, tiny_llama3_dir):
    state = server.state
    base_before = httpx.get(server.url + "/health", timeout=10).json()["base_model"]["completed"]
    base = chat(server, state.base_id)
    tuned = chat(server, state.model_id)
    assert base["model"] == state.base_id and tuned["model"] == state.model_id
    base_text, tuned_text = base["choices"][0]["message"]["content"], tuned["choices"][0]["message"]["content"]
    assert base_text == alone(tiny_llama3_dir)
    assert tuned_text == alone(tuned_dir)
    assert base_text != tuned_text, "the two models wrote the same text: the test cannot tell them apart"
    # the base model's request ran on the base model's own scheduler
    assert httpx.get(server.url + "/health", timeout=10).json()["base_model"]["completed"] == base_before + 1


def test_streams_and_adcopy_reach_the_base_model_too(server):
    state = server.state
    base_text = chat(server, state.base_id)["choices"][0]["message"]["content"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": state.base_id, "messages": MESSAGES, "stream": True}) as r:
        pieces = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in pieces)
    assert streamed == base_text
    body = {"attributes": "类型#裙*颜色#黑色", "max_tokens": MAX_TOKENS}
    off = httpx.post(server.url + "/v1/adcopy", json={**body, "use_adapter": False}, timeout=60).json()
    by_id = httpx.post(server.url + "/v1/adcopy", json={**body, "model": state.base_id}, timeout=60).json()
    on = httpx.post(server.url + "/v1/adcopy", json=body, timeout=60).json()
    assert off["model"] == by_id["model"] == state.base_id and on["model"] == state.model_id
    assert off["text"] == by_id["text"] != on["text"]


def test_the_demos_serve_command_serves_the_base_beside_the_fine_tune(tmp_path):
    command = serve_command(str(tmp_path / "runs" / "demo" / "train" / "model"), "smollm2-135m")
    assert command == f"adgen serve --model {tmp_path}/runs/demo/train/model --base smollm2-135m"
    argv = shlex.split(command)
    settings = settings_from_args(build_parser().parse_args(argv[1:]))
    assert (settings.model, settings.base, settings.adapter) == (argv[3], "smollm2-135m", None)


def test_base_with_an_adapter_is_refused_before_loading(capsys):
    code = main(["serve", "--model", "no/such/model", "--base", "smollm2-135m", "--adapter", "no/such/adapter"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--base" in err and "--adapter" in err and "loading" not in err


def test_a_base_named_like_the_model_is_refused_before_loading(tmp_path, capsys):
    """Both directories are named "model": one id for two models. (Empty directories: loading would fail otherwise.)"""
    tuned, base = tmp_path / "a" / "model", tmp_path / "b" / "model"
    tuned.mkdir(parents=True), base.mkdir(parents=True)
    assert main(["serve", "--model", str(tuned), "--base", str(base)]) == 2
    assert "--served-model-name" in capsys.readouterr().err


def test_two_models_on_one_gpu_split_the_kv_budget(monkeypatch):
    """The fine-tune's KV cache is sized with half of what the weights leave under the server's share; the base
    model's, sized next from what is then free, gets the other half."""
    import torch

    gib = 2**30
    total, free = 80 * gib, 60 * gib  # 20 GiB of weights and other use
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    u = first_of_two_utilization(0.9, "cuda:0")
    left = 0.9 * total - (total - free)  # 52 GiB for the two caches
    assert u * total - (total - free) == pytest.approx(left / 2)
    assert first_of_two_utilization(0.9, "cpu") == 0.9  # a CPU grows its cache on demand: unused there
