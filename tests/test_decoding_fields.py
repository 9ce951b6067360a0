"""DecodingConfig is the one source of every decoding setting: each field is a flag of `adgen generate` /
`eval`, a request field of both API endpoints in the served /openapi.json, a control of the web UI or a
default there, and named once in the vLLM mapping. The checks iterate the dataclass, never a list."""

from __future__ import annotations

import argparse
import dataclasses
import json

import httpx
import pytest

from adgen.cli import build_parser
from adgen.commands.generate import add_decoding_arguments, decoding_config
from adgen.generation.config import DecodingConfig, DecodingFieldError, ad_law_banned_strings
from adgen.generation.decoding_fields import decoding_fields, field_named
from adgen.serve.schemas import AdcopyRequest, ChatCompletionRequest, parse_body
from adgen.serve.security import ApiError
from adgen.serve.settings import Limits, ServeSettings

from test_serve_unit import FakeServedGenerator

FIELDS = dataclasses.fields(DecodingConfig)


def api_name(f: dataclasses.Field) -> str:
    spec = f.metadata.get("spec")
    return spec.api_name if spec is not None and spec.api_name else f.name


def served_state(generator=None, **settings):
    from adgen.serve.service import ServeState

    return ServeState(generator or FakeServedGenerator(), ServeSettings(model="fake", **settings), vocab=object(),
                      examples=[])


def generate_flags() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s for action in sub.choices["generate"]._actions for s in action.option_strings}


def test_every_field_is_a_generate_flag_and_a_request_field_of_both_endpoints_in_the_served_openapi():
    from adgen.serve.api import create_app
    from adgen.serve.server import ServerThread

    state = served_state(api_key="k")
    with ServerThread(create_app(state, ui=False), state=state) as srv:
        assert httpx.get(srv.url + "/openapi.json").status_code == 401  # behind the key
        assert httpx.get(srv.url + "/openapi.json", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = httpx.get(srv.url + "/openapi.json", headers={"Authorization": "Bearer k"})
    assert r.status_code == 200
    schema = r.json()
    components = schema["components"]["schemas"]
    for path, model in [("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/adcopy", "AdcopyRequest")]:
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    chat, adcopy = components["ChatCompletionRequest"]["properties"], components["AdcopyRequest"]["properties"]
    flags = generate_flags()
    for f in FIELDS:
        name = api_name(f)
        assert name in chat and name in adcopy, f.name
        assert chat[name].get("description"), f.name  # the field's comment is its help
        assert "--" + f.name.replace("_", "-") in flags, f.name
    assert "max_tokens" in chat and "max_new_tokens" not in chat  # OpenAI's name
    assert {"--ban", "--no-loop-detection", "--plain"} <= flags  # older spellings kept
    # the API's caps, declared once in the field metadata, are in the contract
    assert chat["repetition_penalty"]["anyOf"][0]["maximum"] == 10
    assert adcopy["banned_strings"]["anyOf"][0]["maxItems"] == 16


def test_without_a_key_the_schema_is_served_openly():
    from adgen.serve.api import create_app
    from adgen.serve.server import ServerThread

    state = served_state()
    with ServerThread(create_app(state, ui=False), state=state) as srv:
        r = httpx.get(srv.url + "/openapi.json")
    assert r.status_code == 200 and "/v1/adcopy" in r.json()["paths"]


def parse(*argv: str) -> DecodingConfig:
    p = argparse.ArgumentParser()
    add_decoding_arguments(p)
    return decoding_config(p.parse_args(list(argv)))


def test_the_flags_make_the_configs_they_always_made():
    law = ad_law_banned_strings()
    assert parse() == DecodingConfig()
    assert parse("--temperature", "0.7") == DecodingConfig(do_sample=True, temperature=0.7)  # implies sampling
    assert parse("--top-k", "5").do_sample and parse("--top-p", "0.8").do_sample
    assert parse("--do-sample").do_sample and not parse("--seed", "3").do_sample
    assert parse("--plain", "--dry-multiplier", "0.5") == DecodingConfig.plain()  # --plain wins
    assert parse("--no-loop-detection").loop_detection is False
    assert parse("--stop", "。", "--stop", "！").stop == ("。", "！")
    mine = parse("--ban", "耐克").banned_strings
    assert set(law) <= set(mine) and mine[-1] == "耐克" and parse("--banned-strings", "耐克").banned_strings == mine
    assert parse("--ban", "").banned_strings == () and parse("--ban", "", "--ban", "耐克").banned_strings == ("耐克",)
    # the fields that had no flag before
    assert parse("--dry-sequence-breakers", "，", "--dry-sequence-breakers", "\n").dry_sequence_breakers == ("，", "\n")
    assert parse("--dry-sequence-breakers", "").dry_sequence_breakers == ()
    assert parse("--no-repeat-ngram-size", "3").no_repeat_ngram_size == 3
    with pytest.raises(DecodingFieldError, match="dry_sequence_breakers"):
        parse("--dry-sequence-breakers", "ab")


def chat(**fields) -> bytes:
    return json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_the_fields_the_api_lacked_reach_the_config_on_both_endpoints():
    state = served_state()
    for model, body in [(ChatCompletionRequest, chat), (AdcopyRequest, lambda **kw: json.dumps(
            {"attributes": "类型#裙", **kw}).encode())]:
        cfg = state.decoding_config(parse_body(model, body(no_repeat_ngram_size=3, dry_sequence_breakers=["，", "。"])))
        assert (cfg.no_repeat_ngram_size, cfg.dry_sequence_breakers) == (3, ("，", "。"))
        assert state.decoding_config(parse_body(model, body(do_sample=True))).do_sample
        assert not state.decoding_config(parse_body(model, body(do_sample=False, temperature=0.8))).do_sample
    greedy = state.decoding_config(parse_body(ChatCompletionRequest, chat(temperature=0, top_p=0.5, seed=3)))
    assert greedy == DecodingConfig(max_new_tokens=greedy.max_new_tokens, seed=3)  # greedy leaves top_p out
    stop = state.decoding_config(parse_body(ChatCompletionRequest, chat(stop="。", max_completion_tokens=7)))
    assert (stop.stop, stop.max_new_tokens) == (("。",), 7)


@pytest.mark.parametrize("field, value, param", [
    ("dry_sequence_breakers", ["ab"], "dry_sequence_breakers.0"),  # the metadata's item length
    ("dry_sequence_breakers", ["\n"] * 17, "dry_sequence_breakers"),  # and item count
    ("no_repeat_ngram_size", -1, "no_repeat_ngram_size"),
    ("stop", ["x" * 65], "stop.0"),
    ("do_sample", "yes", "do_sample"),
])
def test_the_new_fields_bad_values_are_400s_naming_them(field, value, param):
    with pytest.raises(ApiError) as e:
        parse_body(ChatCompletionRequest, chat(**{field: value}))
    assert e.value.status == 400 and e.value.param == param


def test_what_only_validate_knows_is_a_400_naming_the_request_field():
    """no_repeat_char_ngram=1 fits the schema's range; DecodingConfig.validate() refuses it: a 400, not a 500."""
    state = served_state()
    with pytest.raises(ApiError) as e:
        state.decoding_config(parse_body(AdcopyRequest, json.dumps({"attributes": "类型#裙", "no_repeat_char_ngram": 1}).encode()))
    assert (e.value.status, e.value.param, e.value.code) == (400, "no_repeat_char_ngram", "invalid_value")


class SizedGenerator(FakeServedGenerator):
    def resolve(self, config):
        return config.replace(max_new_tokens=448) if config.max_new_tokens is None else config


def test_the_web_ui_panel_comes_from_the_fields():
    import gradio as gr

    from adgen.serve.webui import PANEL, _decoding_panel, _ui_config

    state = served_state(SizedGenerator(), limits=Limits(max_tokens=1000))
    with gr.Blocks():
        controls = _decoding_panel(gr, state)
    by_id = {c.elem_id: c for c in controls}
    defaults = DecodingConfig()
    for c in PANEL:
        f = field_named(c.field)
        control = by_id[f.api_name.replace("_", "-")]
        assert control.info == f.help
        if f.name not in ("max_new_tokens", "seed") and f.spec.suggested is None:
            assert control.value == getattr(defaults, f.name), f.name
    assert by_id["max-tokens"].value == 448  # sized from the tokenizer, not a fixed fallback
    shown = {c.field: by_id[field_named(c.field).api_name.replace("_", "-")].value for c in PANEL}
    cfg = _ui_config(state, {**shown, "max_new_tokens": 0})
    assert cfg == DecodingConfig(max_new_tokens=448)  # greedy: the sampling sliders and seed -1 left out
    cfg = _ui_config(state, {**shown, "do_sample": True, "seed": 7.0, "end_after_chars": 60.0})
    assert (cfg.temperature, cfg.top_p, cfg.seed, cfg.end_after_chars) == (0.95, 0.7, 7, 60)


def test_the_vllm_mapping_names_every_field_once():
    from adgen.generation import vllm_backend as v

    named = [*v.VLLM_PARAMS, *v.VLLM_AROUND, *v.VLLM_WITHOUT, *v.VLLM_REFUSED]
    assert sorted(named) == sorted(f.name for f in FIELDS)
    assert [f.name for f in decoding_fields()] == [f.name for f in FIELDS]
