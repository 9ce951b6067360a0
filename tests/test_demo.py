"""`adgen demo`: the whole journey (zero-shot eval, fine-tune, eval, comparison, serve command)."""

import json

import pytest
from rich.console import Console

from adgen.cli import main
from adgen.demo import DemoConfig, builtin_sample_path, run_demo


def _check_journey(out, summary, eval_records, base_model):
    assert summary["eval_records"] == eval_records
    for run in ("zero_shot", "fine_tuned"):
        assert {"rouge-1", "rouge-2", "rouge-l", "bleu-4"} <= set(summary[run])
    assert (out / "eval-zero-shot" / "metrics.json").is_file()
    assert (out / "eval-fine-tuned" / "metrics.json").is_file()
    tuned = json.loads((out / "eval-fine-tuned" / "metrics.json").read_text())
    # the fine-tune trains the top layers' own weights: the result is a whole model directory
    assert (out / "train" / "model" / "config.json").is_file() and summary["fine_tuned_model"] == str(out / "train" / "model")
    assert tuned["model"].endswith("model") and not tuned.get("adapter")
    md = (out / "comparison.md").read_text()
    assert "zero-shot" in md and "fine-tuned" in md and "ROUGE-1" in md
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a whole model has no adapter to switch off: the command serves its base beside it for the UI's compare view
    assert summary["serve_command"] == f"adgen serve --model {out / 'train' / 'model'} --base {base_model}"
    assert json.loads((out / "summary.json").read_text())["serve_command"] == summary["serve_command"]


def test_demo_runs_the_journey_on_a_data_dir(tiny_chatml_dir, adgen_dev_path, tmp_path):
    out = tmp_path / "demo"
    console = Console(record=True, width=160)
    summary = run_demo(
        DemoConfig(data_dir=str(adgen_dev_path.parent), model=str(tiny_chatml_dir), output_dir=str(out),
                   eval_samples=3, train_samples=16, max_new_tokens=8, progress=False),
        console=console,
    )
    _check_journey(out, summary, 3, tiny_chatml_dir)
    assert summary["train_records"] == 16
    text = console.export_text()
    assert "zero-shot vs fine-tuned" in text
    assert summary["serve_command"] in " ".join(text.split())  # the printed command (wrapped by the console)


@pytest.mark.slow
def test_demo_with_the_builtin_model_and_sample_needs_no_data(tmp_path, capsys):
    """The README's main job, shortened: built-in model, built-in sample, no --data-dir."""
    out = tmp_path / "demo"
    code = main(["demo", "-o", str(out), "--eval-samples", "2", "--train-samples", "8", "--max-new-tokens", "16",
                 "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    _check_journey(out, summary, 2, "smollm2-135m")
    assert summary["data"] == "the built-in sample" and summary["train_records"] == 8
    assert builtin_sample_path().is_file()


def test_demo_names_a_data_dir_without_dev_json(tmp_path, capsys):
    (tmp_path / "train.json").write_text("")
    assert main(["demo", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dev.json" in err and str(tmp_path) in err


def test_demo_gives_the_fine_tune_what_the_evaluations_leave():
    from adgen.demo import training_minutes

    cfg = DemoConfig(minutes=9.0, zero_shot_max_new_tokens=128)
    # 60 s spent; the zero-shot eval took 64 s for 128 token steps -> the tuned eval (448 steps) is
    # reserved at 3/4 of 0.5 s x 448 = 168 s, plus 45 s for loading and the comparison
    assert training_minutes(cfg, 60.0, 64.0, 448) == pytest.approx((540 - 60 - 168 - 45) / 60)
    # a slower machine gets less training time, never less than a minute
    assert training_minutes(cfg, 60.0, 128.0, 448) < training_minutes(cfg, 60.0, 64.0, 448)
    assert training_minutes(cfg, 500.0, 128.0, 448) == 1.0
