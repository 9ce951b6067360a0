"""Advertising-Law compliance: the versioned term list, find_violations (hits and false-positive traps),
compliance_violation_rate in scoring and `adgen score`, and banned terms in decoding."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from adgen.cli import main
from adgen.errors import DataError
from adgen.generation import DecodingConfig
from adgen.generation.config import DEFAULT_BANNED_STRINGS, ad_law_banned_strings
from adgen.metrics import aggregate, score_all, score_predictions
from adgen.metrics.compliance import (
    ad_law_terms,
    find_hits,
    find_violations,
    load_term_list,
    parse_term_list,
    read_term_file,
)

# The references' own figure on AdGen dev with list 1.0.0 (docs/METRICS.md, "Compliance").
DEV_REFERENCES_WITH_A_TERM = 11
DEV_REFERENCE_TERMS = {"独一无二": 4, "最美": 3, "无与伦比": 2, "最佳": 1, "最好": 1}


# ---- the list ----------------------------------------------------------------------------------
def test_the_list_is_package_data_versioned_and_cites_the_law():
    res = resources.files("adgen") / "resources" / "compliance" / "ad_law_terms.json"
    raw = json.loads(res.read_text(encoding="utf-8"))
    terms = ad_law_terms()
    assert re.fullmatch(r"\d+\.\d+\.\d+", terms.version) and terms.version == raw["version"]
    assert terms.label == f"adgen-ad-law-absolute-terms {terms.version}"
    basis = " ".join(json.dumps(b, ensure_ascii=False) for b in terms.legal_basis)
    assert "Art. 9(3)" in basis and "2015" in basis and "国家级" in basis and "最佳" in basis
    assert "广告绝对化用语执法指南" in basis and "2023" in basis
    assert len({r.id for r in terms.rules}) == len(terms.rules) >= 5
    assert all(r.note and r.title for r in terms.rules)  # every group says why
    for word in ("国家级", "最高级", "最佳", "顶级", "全网最低价", "史上最", "绝无仅有", "万能"):
        assert word in terms.banned_strings
    # only plain terms are banned as strings: no regex syntax, nothing a pattern decides
    assert all(not re.search(r"[\\()|?*\[\]]", t) for t in terms.banned_strings)
    assert "第一" not in terms.banned_strings and "唯一" not in terms.banned_strings
    assert ad_law_terms() is terms  # loaded once


# ---- find_violations ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("这是你的最佳选择", ["最佳"]),
    ("顶级面料，国家级工艺", ["顶级", "国家级"]),
    ("全网最低价！", ["全网最低价"]),  # leftmost-longest: not also 最低价
    ("史上最强单品", ["史上最"]),
    ("销量第一的连衣裙", ["销量第一"]),
    ("全国唯一指定", ["全国唯一"]),
    ("春季NO.1单品", ["NO.1"]),
    ("春季ＮＯ．１单品", ["NO.1"]),  # full-width: matched on the NFKC form
    ("本季top1", ["top1"]),
    ("最好的选择", ["最好的"]),
    ("透气的最好材质", ["最好"]),  # 最好 + a noun is a claim
    ("开春季节最美好的单品", ["最美"]),
    ("独一无二的美感，无与伦比", ["独一无二", "无与伦比"]),
    ("万能百搭单品", ["万能"]),
    ("１００％有效", ["100%有效"]),
    ("最佳，最佳，顶级", ["最佳", "顶级"]),  # each once, in order of first occurrence
])
def test_forbidden_terms_are_found(text, expected):
    assert find_violations(text) == expected


@pytest.mark.parametrize("text", [
    "这款连衣裙第一眼就美得让人心动",  # 第一 as an ordinal
    "第一次穿就爱上，第一时间入手",
    "唯一的设计点就在腰间，成为唯一的焦点",  # the garment's own single feature
    "全网状材料，透气",  # 全网状 = mesh
    "最大的亮点是最大限度的透气，最后是最新款",  # size, time
    "最能体现气质，最为百搭，最具个性，最适合通勤",  # degree / fit
    "最好搭配小白鞋，最好不要机洗，最好是选择宽松版",  # 最好 + a verb: advice
    "精选100%纯棉面料，百分百的纯棉，100%涤纶里衬",  # fibre content is a fact
    "永不过时的格纹，完美展现身材，简约到极致，绝对百搭",
    "TOP10榜单，laptop1，No.12",
    "最佳食用期为三个月",  # a consumer tip (the 2023 guidance)
    "",
])
def test_false_positive_traps_are_not_flagged(text):
    assert find_violations(text) == []


def test_merchant_terms_join_the_list_case_insensitively():
    text = "NIKE同款，比耐克更好，最佳选择"
    assert find_violations(text) == ["最佳"]
    assert find_violations(text, ["耐克", "nike", "  ", "阿迪"]) == ["NIKE", "耐克", "最佳"]
    hits = find_hits(text, ["耐克"])
    assert [(h.term, h.rule) for h in hits] == [("耐克", "merchant"), ("最佳", "statute")]
    assert text[hits[0].start:hits[0].end] == "耐克"


def test_read_term_file(tmp_path):
    path = tmp_path / "brand.txt"
    path.write_text("\ufeff# competitors\n耐克\n\n  阿迪达斯  \n耐克\n# done\n", encoding="utf-8")
    assert read_term_file(path) == ("耐克", "阿迪达斯")
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no terms"):
        read_term_file(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no such file"):
        read_term_file(tmp_path / "missing.txt")


def test_a_broken_list_is_a_clear_error(tmp_path):
    good = {"name": "x", "version": "1", "rules": [{"id": "a", "terms": ["最佳"]}]}
    assert parse_term_list(good, "x.json").find_violations("最佳") == ["最佳"]
    with pytest.raises(DataError, match=r"rule 'a'.*bad regex"):
        parse_term_list({**good, "rules": [{"id": "a", "patterns": ["最("]}]}, "x.json")
    with pytest.raises(DataError, match='no "version"'):
        parse_term_list({"name": "x", "rules": good["rules"]}, "x.json")
    with pytest.raises(DataError, match="duplicate or reserved"):
        parse_term_list({**good, "rules": [{"id": "merchant", "terms": ["a"]}]}, "x.json")
    path = tmp_path / "list.json"
    path.write_text(json.dumps(good), encoding="utf-8")
    assert load_term_list(path).version == "1"


def test_the_references_own_rate_on_dev(adgen_dev_path):
    """AdGen's dev references hold absolute terms too: the figure docs/METRICS.md reports."""
    refs = [json.loads(line)["summary"] for line in adgen_dev_path.read_text(encoding="utf-8").splitlines()]
    found = [find_violations(r) for r in refs]
    assert len(refs) == 1070 and sum(bool(f) for f in found) == DEV_REFERENCES_WITH_A_TERM
    counts: dict[str, int] = {}
    for terms in found:
        for t in terms:
            counts[t] = counts.get(t, 0) + 1
    assert counts == DEV_REFERENCE_TERMS


# ---- scoring -----------------------------------------------------------------------------------
ROWS = [
    {"predict": "顶级面料，最佳选择", "label": "白色连衣裙"},
    {"predict": "第一眼就爱上的白色连衣裙", "label": "白色连衣裙"},
    {"predict": "白色连衣裙，耐克同款", "label": "白色连衣裙"},
    {"predict": "", "label": "白色连衣裙"},
    {"predict": "销量第一，最佳", "label": "白色连衣裙", "content": "类型#裙*颜色#白色"},
]


def test_compliance_violation_rate_is_the_share_of_rows_with_a_term():
    per = score_all(ROWS)
    assert [p["compliance_terms"] for p in per] == [["顶级", "最佳"], [], [], [], ["销量第一", "最佳"]]
    summary = aggregate(per)
    assert summary["compliance_violation_rate"] == pytest.approx(2 / 5)
    assert summary["compliance_terms_found"] == {"最佳": 2, "销量第一": 1, "顶级": 1}
    assert list(summary["compliance_terms_found"]) == ["最佳", "销量第一", "顶级"]  # most frequent first
    assert summary["compliance_list"] == ad_law_terms().label
    merchant = score_predictions(ROWS, forbidden_terms=["耐克"])
    assert merchant["compliance_violation_rate"] == pytest.approx(3 / 5)
    assert merchant["compliance_list"] == f"{ad_law_terms().label} + 1 merchant term"


def test_score_json_reports_the_rate_terms_and_merchant_list(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    assert main(["score", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["compliance_violation_rate"] == pytest.approx(0.4)
    assert summary["compliance_terms_found"] == {"最佳": 2, "销量第一": 1, "顶级": 1}
    terms = tmp_path / "brand.txt"
    terms.write_text("耐克\n", encoding="utf-8")
    per = tmp_path / "per.jsonl"
    assert main(["score", str(path), "--json", "--forbidden-terms", str(terms), "--per-example", str(per)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["compliance_violation_rate"] == pytest.approx(0.6)
    assert [json.loads(line)["compliance_terms"] for line in per.read_text(encoding="utf-8").splitlines()][2] == ["耐克"]
    assert main(["score", str(path), "--forbidden-terms", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err


def test_eval_report_and_compare_show_the_rate():
    from adgen.evaluation.compare import CHART_SHARES
    from adgen.evaluation.report import LABELS, notes

    assert "compliance_violation_rate" in LABELS and "compliance_violation_rate" in dict(CHART_SHARES)
    m = {"metrics": score_predictions(ROWS), "decoding": {"max_new_tokens": 8}}
    rows = [{"finish_reason": "stop", "predict": r["predict"]} for r in ROWS]
    note = next(n for n in notes(m, rows) if "forbidden term" in n)
    assert "40.0%" in note and "最佳 ×2" in note and ad_law_terms().label in note


# ---- decoding ----------------------------------------------------------------------------------
LAW = DecodingConfig(banned_strings=DEFAULT_BANNED_STRINGS + ad_law_banned_strings())


def test_describe_names_the_law_terms_as_one_item():
    law = ad_law_banned_strings()
    assert law == ad_law_terms().banned_strings and len(law) > 30
    text = LAW.describe()
    assert f"never writes <UNK> + the Advertising Law's absolute terms ({len(law)})" in text
    assert "顶级" not in text and "最佳" not in text
    merchant = LAW.replace(banned_strings=LAW.banned_strings + ("耐克",)).describe()
    assert "<UNK>/耐克 + the Advertising Law's absolute terms" in merchant
    assert DecodingConfig.plain().banned_strings == ()  # --plain keeps nothing banned


@pytest.fixture(scope="module")
def tok(tiny_llama3_dir):
    from adgen.models import load_tokenizer

    return load_tokenizer(str(tiny_llama3_dir))


def test_penalties_ban_the_token_that_writes_zuijia(tok):
    from adgen.generation.repetition import RepeatState, token_table

    zuijia = tok.encode("最佳", add_special_tokens=False)
    assert len(zuijia) == 1  # one Llama-3 token
    quiet = dict(dry_multiplier=0.0, end_after_chars=0, loop_detection=False)
    state = RepeatState(token_table(tok), LAW.replace(**quiet), stop_ids=[128009])
    assert state.penalties()[zuijia[0]] == float("inf")
    off = RepeatState(token_table(tok), DecodingConfig(banned_strings=(), **quiet), stop_ids=[128009])
    assert zuijia[0] not in off.penalties()


@pytest.mark.parametrize("word", ["最佳", "顶级"])
def test_a_model_that_writes_a_law_term_never_does_when_the_terms_are_banned(tiny_llama3_dir, tok, word):
    from test_generation import EOT, HAO, KAN, chain_model, make_gen

    pieces = [tok.encode(c, add_special_tokens=False) for c in word]  # 最 + 佳: one token per character
    chain = [HAO, *[i for p in pieces for i in p], KAN]
    gen = make_gen(chain_model(tiny_llama3_dir, chain, EOT), tok)
    plain = gen.generate(["类型#裙"], DecodingConfig(max_new_tokens=12, banned_strings=()))[0]
    assert plain.text == f"好{word}看"  # the model is forced towards the term ...
    clean = gen.generate(["类型#裙"], LAW.replace(max_new_tokens=12))[0]
    assert word not in clean.text and find_violations(clean.text) == []  # ... and never writes it
    assert clean.text.startswith("好")


def test_default_decoding_bans_the_law_terms_but_keeps_their_first_characters(tok):
    from adgen.generation.repetition import RepeatState, token_table

    default = DecodingConfig(dry_multiplier=0.0, end_after_chars=0, loop_detection=False)
    assert set(ad_law_banned_strings()) <= set(default.banned_strings)
    pen = RepeatState(token_table(tok), default, stop_ids=[128009]).penalties()
    for char in "最国中全第":  # 最新, 国家标准, 中长款, 全棉, 第一眼
        assert tok.encode(char, add_special_tokens=False)[0] not in pen


def test_a_merchants_ban_list_adds_to_the_law_terms_and_empty_drops_the_defaults():
    from adgen.commands.generate import _banned

    law = set(ad_law_banned_strings())
    assert law <= set(_banned(None)) and "<UNK>" in _banned(None)
    mine = _banned(["耐克", "阿迪达斯"])
    assert law <= set(mine) and {"耐克", "阿迪达斯", "<UNK>"} <= set(mine)  # brand rules do not drop the law
    assert _banned([""]) == () and _banned(["", "耐克"]) == ("耐克",)


def test_the_apis_banned_strings_add_to_the_law_terms_and_an_empty_list_drops_them():
    from adgen.serve.schemas import AdcopyRequest, ChatCompletionRequest, parse_body

    law = set(ad_law_banned_strings())
    chat = parse_body(ChatCompletionRequest, json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "类型#裙"}], "banned_strings": ["耐克"]}).encode())
    banned = chat.repetition_fields()["banned_strings"]
    assert law <= set(banned) and {"耐克", "<UNK>"} <= set(banned)
    ad = parse_body(AdcopyRequest, json.dumps({"attributes": "类型#裙", "banned_strings": []}).encode())
    assert ad.repetition_fields()["banned_strings"] == []  # the defaults dropped on request
    plain = parse_body(AdcopyRequest, json.dumps({"attributes": "类型#裙"}).encode())
    assert "banned_strings" not in plain.repetition_fields()  # None: DecodingConfig's default (the law's terms)
