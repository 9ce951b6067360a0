"""The terminal metrics table that `adgen eval` and `adgen score` share."""

from rich.console import Console

from adgen.evaluation.report import metrics_table


def _render(table) -> str:
    console = Console(width=120, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_sections_follow_the_figures_present():
    values = {"rouge-1": 21.456, "bleu-4": 4.5, "chinese_share": 0.987, "repetition_rate": 0.0421}
    text = _render(metrics_table(values, "run"))
    assert "protocol" in text and "text" in text
    assert "attribute faithfulness" not in text  # no faithfulness figure -> no empty section
    assert "ROUGE-1" in text and "21.46" in text  # labels, protocol scores to 0.01
    assert "repetition (4-gram)" in text and "0.042" in text
    assert text.index("ROUGE-1") < text.index("Chinese share")


def test_raw_keys_and_fixed_decimals_for_score():
    values = {"n_with_attributes": 7, "attr_coverage": 0.5, "rouge-l": 12.3456}
    text = _render(metrics_table(values, "preds.jsonl", value_header="mean", decimals=4, use_labels=False))
    assert "mean" in text
    assert "attr_coverage" in text and "0.5000" in text
    assert "rouge-l" in text and "12.3456" in text
    row = next(line for line in text.splitlines() if "n_with_attributes" in line)
    assert row.strip(" │|").split()[-1] == "7"  # a count stays an integer


def test_counts_get_a_label_for_people():
    text = _render(metrics_table({"n_with_attributes": 12, "attr_coverage": 0.25}, "run"))
    assert "examples with attributes" in text and "n_with_attributes" not in text
