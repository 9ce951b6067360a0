"""adgen.data.chat: the exact ids a model is trained on and generates from (issue "Foundation", item 4)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest

from adgen.data.chat import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, ChatFormatter, encode_records
from adgen.errors import ModelError

from expected_chat import CHATML_PROMPT, CHATML_RESPONSE, CONTENT, LLAMA3_PROMPT, LLAMA3_RESPONSE, SUMMARY

BOS, EOS, EOT = 128000, 128001, 128009
START_HEADER, END_HEADER, ASSISTANT = 128006, 128007, 78191


@dataclass
class Rec:
    content: str
    summary: str
    line: int


def split(tok, ex):
    """(prompt text, labelled text) of an example: what the model reads / what it learns to write."""
    n_prompt = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    labelled = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    return tok.decode(ex.input_ids[:n_prompt]), tok.decode(labelled)


def count_subseq(ids, sub):
    return sum(1 for i in range(len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub)


def fresh_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def llama3_base_tokenizer(tmp_path_factory, llama3_tokenizer):
    """The real Llama-3 tokenizer saved without any chat template, as a base model's would be."""
    out = tmp_path_factory.mktemp("llama3-base-tok")
    llama3_tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    tok = fresh_tokenizer(out)
    assert not tok.chat_template
    return tok


# ---- Llama-3 ---------------------------------------------------------------------------------------


def test_llama3_exact_text_ids_and_labels(llama3_tokenizer):
    tok = llama3_tokenizer
    f = ChatFormatter(tok, system_prompt="S")
    ex = f.encode(CONTENT, SUMMARY)
    expected_prompt = tok(LLAMA3_PROMPT, add_special_tokens=False)["input_ids"]
    expected_response = tok(SUMMARY, add_special_tokens=False)["input_ids"] + [EOT]
    assert ex.input_ids == expected_prompt + expected_response
    assert tok.decode(ex.input_ids) == LLAMA3_PROMPT + LLAMA3_RESPONSE
    assert ex.labels == [IGNORE_INDEX] * len(expected_prompt) + expected_response
    assert ex.labels[-1] == EOT and ex.input_ids[-1] == EOT
    assert split(tok, ex) == (LLAMA3_PROMPT, LLAMA3_RESPONSE)
    assert not ex.truncated
    assert ex.num_label_tokens == len(expected_response)


def test_llama3_single_bos_single_assistant_header(llama3_tokenizer):
    f = ChatFormatter(llama3_tokenizer, system_prompt="S")
    ex = f.encode(CONTENT, SUMMARY)
    assert ex.input_ids[0] == BOS and ex.input_ids[1] != BOS
    assert ex.input_ids.count(BOS) == 1
    # The original template appends an assistant header after every conversation: exactly one here.
    assert count_subseq(ex.input_ids, [START_HEADER, ASSISTANT, END_HEADER]) == 1
    assert ex.input_ids.count(START_HEADER) == 3  # system, user, assistant


def test_llama3_prompt_ids_end_at_the_generation_prompt(llama3_tokenizer):
    f = ChatFormatter(llama3_tokenizer, system_prompt="S")
    ids = f.prompt_ids(CONTENT)
    assert llama3_tokenizer.decode(ids) == LLAMA3_PROMPT
    assert ids[-4:] == [START_HEADER, ASSISTANT, END_HEADER, 271]  # 271 = "\n\n"
    # messages work as well as a content string, and give the same ids
    assert f.prompt_ids(f.messages(CONTENT)) == ids
    assert f.messages(CONTENT) == [{"role": "system", "content": "S"}, {"role": "user", "content": CONTENT}]


def test_llama3_stop_ids_and_end_of_turn(llama3_tokenizer):
    f = ChatFormatter(llama3_tokenizer)
    assert f.end_of_turn_id == EOT
    assert f.has_chat_template
    assert EOS in f.stop_token_ids and EOT in f.stop_token_ids
    f2 = ChatFormatter(llama3_tokenizer, generation_eos_ids=[128008])
    assert set(f2.stop_token_ids) == {EOS, EOT, 128008}


def test_loss_on_all_trains_on_prompt_and_response(llama3_tokenizer):
    ex = ChatFormatter(llama3_tokenizer, system_prompt="S", loss_on="all").encode(CONTENT, SUMMARY)
    assert ex.labels == ex.input_ids
    assert llama3_tokenizer.decode(ex.input_ids) == LLAMA3_PROMPT + LLAMA3_RESPONSE
    with pytest.raises(ValueError, match="loss_on"):
        ChatFormatter(llama3_tokenizer, loss_on="prompt")


def test_default_system_prompt_is_chinese_and_configurable(llama3_tokenizer):
    assert "中文" in DEFAULT_SYSTEM_PROMPT and "文案" in DEFAULT_SYSTEM_PROMPT
    text = llama3_tokenizer.decode(ChatFormatter(llama3_tokenizer).prompt_ids(CONTENT))
    assert f"<|start_header_id|>system<|end_header_id|>\n\n{DEFAULT_SYSTEM_PROMPT}<|eot_id|>" in text
    custom = llama3_tokenizer.decode(ChatFormatter(llama3_tokenizer, system_prompt="写短句").prompt_ids(CONTENT))
    assert "<|end_header_id|>\n\n写短句<|eot_id|>" in custom and DEFAULT_SYSTEM_PROMPT not in custom


@pytest.mark.parametrize("system", [None, ""])
def test_no_system_prompt_means_no_system_turn_llama3(llama3_tokenizer, system):
    f = ChatFormatter(llama3_tokenizer, system_prompt=system)
    assert f.messages(CONTENT) == [{"role": "user", "content": CONTENT}]
    ex = f.encode(CONTENT, SUMMARY)
    assert llama3_tokenizer.decode(ex.input_ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n类型#裙*颜色#黑色<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n黑色长裙。<|eot_id|>"
    )
    assert ex.input_ids[1] != BOS


# ---- truncation ------------------------------------------------------------------------------------


def test_truncation_cuts_the_response_and_drops_end_of_turn(llama3_tokenizer):
    f = ChatFormatter(llama3_tokenizer, system_prompt="S")
    prompt = f.prompt_ids(CONTENT)
    response = f.response_ids(SUMMARY)
    assert len(response) >= 3

    # room for the whole response and its end-of-turn: untouched
    ex = ChatFormatter(llama3_tokenizer, system_prompt="S", max_length=len(prompt) + len(response) + 1).encode(
        CONTENT, SUMMARY
    )
    assert not ex.truncated and ex.input_ids[-1] == EOT

    # one token short: only the end-of-turn goes (the copy did not end there)
    ex = ChatFormatter(llama3_tokenizer, system_prompt="S", max_length=len(prompt) + len(response)).encode(
        CONTENT, SUMMARY
    )
    assert ex.truncated and ex.input_ids == prompt + response and EOT not in ex.labels

    # room for 2 response tokens: cut from the end, prompt intact, labels on those 2 only
    ex = ChatFormatter(llama3_tokenizer, system_prompt="S", max_length=len(prompt) + 2).encode(CONTENT, SUMMARY)
    assert ex.truncated
    assert len(ex.input_ids) == len(prompt) + 2
    assert ex.input_ids[: len(prompt)] == prompt
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response[:2]

    # the prompt alone fills max_length: dropped
    assert ChatFormatter(llama3_tokenizer, system_prompt="S", max_length=len(prompt)).encode(CONTENT, SUMMARY) is None


def test_encode_records_counts_truncated_and_dropped(llama3_tokenizer):
    f0 = ChatFormatter(llama3_tokenizer, system_prompt="S")
    n_prompt = len(f0.prompt_ids(CONTENT))
    f = ChatFormatter(llama3_tokenizer, system_prompt="S", max_length=n_prompt + 8)
    records = [
        Rec(CONTENT, SUMMARY, 1),  # fits
        Rec(CONTENT, SUMMARY * 10, 2),  # response cut
        Rec(CONTENT + "*材质#棉" * 20, SUMMARY, 3),  # prompt too long: dropped
        Rec(CONTENT, SUMMARY, 4),
    ]
    examples, stats = encode_records(f, records)
    assert (stats.total, stats.truncated, stats.dropped) == (4, 1, 1)
    assert stats.dropped_lines == [3]
    assert len(examples) == 3
    assert [e.truncated for e in examples] == [False, True, False]
    assert all(len(e.input_ids) <= n_prompt + 8 for e in examples)
    assert "1 truncated" in stats.summary() and "1 dropped" in stats.summary()


# ---- ChatML (SmolLM2) ------------------------------------------------------------------------------


def test_chatml_exact_text_ids_and_labels(smollm2_tokenizer):
    tok = smollm2_tokenizer
    f = ChatFormatter(tok, system_prompt="S")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert f.end_of_turn_id == im_end
    assert im_end in f.stop_token_ids
    ex = f.encode(CONTENT, SUMMARY)
    assert tok.decode(ex.input_ids) == CHATML_PROMPT + CHATML_RESPONSE
    expected_prompt = tok(CHATML_PROMPT, add_special_tokens=False)["input_ids"]
    expected_response = tok(SUMMARY, add_special_tokens=False)["input_ids"] + [im_end]
    assert ex.input_ids == expected_prompt + expected_response
    assert ex.labels == [IGNORE_INDEX] * len(expected_prompt) + expected_response
    assert split(tok, ex) == (CHATML_PROMPT, CHATML_RESPONSE)
    assert count_subseq(ex.input_ids, tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]) == 1


def test_chatml_tiny_model_dir_formats_identically(tiny_chatml_dir, smollm2_tokenizer):
    """The tokenizer saved with the tiny ChatML model keeps its template and gives the same ids."""
    from adgen.models import load_tokenizer

    tok = load_tokenizer(str(tiny_chatml_dir))
    a = ChatFormatter(tok, system_prompt="S").encode(CONTENT, SUMMARY)
    b = ChatFormatter(smollm2_tokenizer, system_prompt="S").encode(CONTENT, SUMMARY)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


def test_chatml_without_system_prompt_uses_the_template_default(smollm2_tokenizer):
    """Stated behaviour: adgen adds no system turn, SmolLM2's template then adds its own (trained-with) one."""
    f = ChatFormatter(smollm2_tokenizer, system_prompt=None)
    assert f.messages(CONTENT) == [{"role": "user", "content": CONTENT}]
    text = smollm2_tokenizer.decode(f.prompt_ids(CONTENT))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\n类型#裙*颜色#黑色<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>system") == 1


def test_chatml_default_system_prompt(smollm2_tokenizer):
    text = smollm2_tokenizer.decode(ChatFormatter(smollm2_tokenizer).prompt_ids(CONTENT))
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    assert "SmolLM" not in text


# ---- base models (no chat template) ----------------------------------------------------------------


def test_base_model_uses_plain_format_with_single_bos(llama3_base_tokenizer, caplog):
    tok = llama3_base_tokenizer
    with caplog.at_level(logging.WARNING, logger="adgen.data.chat"):
        f = ChatFormatter(tok, system_prompt="S")
    assert not f.has_chat_template
    assert any("no chat template" in r.getMessage() and "plain" in r.getMessage() for r in caplog.records)
    assert f.end_of_turn_id == EOS and f.stop_token_ids == [EOS]
    ex = f.encode(CONTENT, SUMMARY)
    prompt = [BOS] + tok(CONTENT + "\n", add_special_tokens=False)["input_ids"]
    response = tok(SUMMARY, add_special_tokens=False)["input_ids"] + [EOS]
    assert ex.input_ids == prompt + response
    assert ex.input_ids.count(BOS) == 1
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response
    assert tok.decode(ex.input_ids) == "<|begin_of_text|>类型#裙*颜色#黑色\n黑色长裙。<|end_of_text|>"


def test_tokenizer_without_template_or_eos_is_a_clear_error(llama3_base_tokenizer):
    import copy

    tok = copy.deepcopy(llama3_base_tokenizer)
    tok.eos_token = None
    assert tok.eos_token_id is None
    with pytest.raises(ModelError, match="chat template"):
        ChatFormatter(tok)


# ---- end-of-turn probe for unknown templates ------------------------------------------------------

CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}" + "{END}" + "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_probe_finds_an_unknown_special_end_of_turn_token(llama3_tokenizer_dir):
    tok = fresh_tokenizer(llama3_tokenizer_dir)
    tok.chat_template = CUSTOM_TEMPLATE.replace("{END}", "<|reserved_special_token_7|>")
    end = tok.convert_tokens_to_ids("<|reserved_special_token_7|>")
    f = ChatFormatter(tok, system_prompt="S")
    assert f.end_of_turn_id == end != tok.eos_token_id
    assert end in f.stop_token_ids and EOS in f.stop_token_ids
    ex = f.encode(CONTENT, SUMMARY)
    assert ex.input_ids[-1] == end and ex.labels[-1] == end
    assert tok.decode(ex.input_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n黑色长裙。<|reserved_special_token_7|>")


def test_probe_finds_eos_written_by_the_template(llama3_tokenizer_dir):
    tok = fresh_tokenizer(llama3_tokenizer_dir)
    tok.chat_template = CUSTOM_TEMPLATE.replace("{END}", "{{ eos_token }}")
    f = ChatFormatter(tok)
    assert f.end_of_turn_id == EOS
    assert f.encode(CONTENT, SUMMARY).input_ids[-1] == EOS


def test_template_refusing_system_role_folds_it_into_the_user_turn(llama3_tokenizer_dir):
    tok = fresh_tokenizer(llama3_tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    text = tok.decode(ChatFormatter(tok, system_prompt="S").prompt_ids(CONTENT))
    assert text == (
        "<|start_header_id|>user<|end_header_id|>\n\nS\n\n类型#裙*颜色#黑色<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_one_meaning_of_a_system_prompt_setting_everywhere():
    from adgen.data.chat import DEFAULT_SYSTEM_PROMPT, resolve_system_prompt
    from adgen.train.config import TrainConfig

    assert resolve_system_prompt("default") == DEFAULT_SYSTEM_PROMPT
    assert resolve_system_prompt(None) is None and resolve_system_prompt("") is None
    assert resolve_system_prompt("你是文案。") == "你是文案。"
    assert resolve_system_prompt(TrainConfig().system_prompt) == DEFAULT_SYSTEM_PROMPT  # configs' default
