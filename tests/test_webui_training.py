"""The web UI's training page in real headless Chromium (Playwright), end to end on the tiny random Llama-3.

The server serves the tiny model with a random LoRA adapter (so a trained adapter can be loaded beside it and
compared with the base model, the adapter switched off). One run goes through every state a user meets: start
(the loss chart fills and the loss moves; a second start is refused) -> stop (a checkpoint of its step) ->
resume -> the training process killed with SIGKILL (failed, its log shown; the server still answers) -> resume
again (the step count continues from the checkpoint) -> finished -> loaded into the server -> the Generate tab's
compare view shows base and tuned side by side -> the Chat tab answers from the tuned adapter. Bad data is refused
in the form with the inspect rules' message. A screenshot per step (ADGEN_SCREENSHOT_DIR, default: tmp dir).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from adgen.serve.server import ServerThread, build
from adgen.serve.settings import Limits, ServeSettings
from browser_helpers import as_textarea, browser, field, page, screenshot, wait_for  # noqa: F401 (fixtures)
from train_helpers import read_metrics

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# fast settings for the tiny model, in the page's "more settings" box: short examples, frequent checkpoints,
# an eval loss and generation metrics every few steps
EXTRA = "\n".join([
    "max_length=64", "system_prompt=null", "batch_size=2", "grad_accum=1", "warmup_steps=0", "precision=fp32",
    "lora.target_modules=[q_proj,v_proj]", "save_every=5", "eval_every=5", "gen_eval_every=5",
    "gen_eval_samples=2", "gen_max_new_tokens=8", "plot=false",
])


@pytest.fixture(scope="module")
def train_server(tiny_llama3_dir, tiny_llama3_lora_dir, tmp_path_factory):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    settings = ServeSettings(model=str(tiny_llama3_dir), adapter=str(tiny_llama3_lora_dir),
                             state_dir=str(tmp_path_factory.mktemp("serve-state")),
                             limits=Limits(default_max_tokens=24))
    state, app = build(settings)
    with ServerThread(app, state=state) as srv:
        srv.state = state
        yield srv


@pytest.fixture(scope="module")
def adgen_files(adgen_dev_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-data")
    lines = adgen_dev_path.read_text(encoding="utf-8").splitlines()
    (d / "train.jsonl").write_text("\n".join(lines[:16]) + "\n", encoding="utf-8")
    (d / "dev.jsonl").write_text("\n".join(lines[16:20]) + "\n", encoding="utf-8")
    (d / "bad.jsonl").write_text(lines[0] + '\n{"content": "类型#裙", "summary": \n', encoding="utf-8")
    return d


def open_training_page(page, server):
    page.goto(server.url + "/ui/", wait_until="domcontentloaded")
    page.get_by_role("tab", name="训练 Train").click()
    field(page, "train-data-path").wait_for(state="visible", timeout=30_000)


def fill_form(page, train_path: str, eval_path: str = "", steps: int = 0, extra: str = EXTRA) -> None:
    field(page, "train-data-path").fill(train_path)
    field(page, "eval-data-path").fill(eval_path)
    field(page, "train-rank").fill("4")
    field(page, "train-lr").fill("0.01")
    field(page, "train-steps").fill(str(steps))
    page.get_by_text("更多设置 more settings").click()
    field(page, "train-extra").fill(extra)


def wait_status(page, text: str, timeout: float = 90) -> str:
    page.locator("#train-status").get_by_text(text).first.wait_for(timeout=timeout * 1000)
    return page.locator("#train-status").inner_text()


def plot_lines(page, elem_id: str) -> int:
    """How many visible lines of two or more points the chart drew (Vega renders each series' line as an SVG path;
    one its colour scale does not know has no stroke)."""
    return page.evaluate(
        """(id) => [...document.querySelectorAll('#' + id + ' g.mark-line path')]
                .filter(p => (p.getAttribute('d') || '').includes('L') && p.getAttribute('stroke')).length""",
        elem_id,
    )


def test_bad_data_and_bad_settings_are_refused_in_the_form(page, train_server, adgen_files, tmp_path):
    jobs = train_server.state.training
    open_training_page(page, train_server)
    fill_form(page, str(adgen_files / "bad.jsonl"), steps=10)
    page.locator("#train-start").click()
    message = page.locator("#train-message")
    message.get_by_text("bad.jsonl:2").wait_for(timeout=30_000)  # the inspect rules' file:line
    assert "Traceback" not in message.inner_text()
    screenshot(page, tmp_path, "train-bad-data.png")

    field(page, "train-data-path").fill(str(adgen_files / "train.jsonl"))
    field(page, "eval-data-path").fill(str(adgen_files / "dev.jsonl"))
    field(page, "train-extra").fill(EXTRA + "\nlora.r=0")  # TrainConfig.validate refuses it
    page.locator("#train-start").click()
    message.get_by_text("lora.r").wait_for(timeout=30_000)
    assert jobs.status() is None and not jobs.busy, "a refused form started a run"
    assert page.external_requests == [] and page.console_errors == []


def test_train_stop_resume_crash_finish_load_compare_chat(page, train_server, adgen_files, tmp_path):
    state, jobs, url = train_server.state, train_server.state.training, train_server.url
    open_training_page(page, train_server)
    # the training file as an upload, the eval file as a path on the server
    page.locator("#train-data-upload input[type=file]").set_input_files(str(adgen_files / "train.jsonl"))
    fill_form(page, "", str(adgen_files / "dev.jsonl"), steps=1000)
    page.locator("#train-start").click()
    page.locator("#train-message").get_by_text("started run").wait_for(timeout=60_000)
    assert "train data: 16 records" in page.locator("#train-message").inner_text()

    # running: the loss chart fills, the loss moves; a second start is refused
    wait_status(page, "训练中 running")
    wait_for(lambda: len([r for r in read_metrics(jobs.status().run_dir) if "loss" in r]) >= 6, what="6 loss rows")
    wait_for(lambda: plot_lines(page, "loss-plot") >= 1, timeout=30, what="the loss chart's line")
    page.locator("#train-start").click()
    page.locator("#train-message").get_by_text("one run at a time").wait_for(timeout=30_000)
    losses = [r["loss"] for r in read_metrics(jobs.status().run_dir) if "loss" in r]
    assert max(losses) - min(losses) > 1e-3, f"the loss did not move: {losses}"
    screenshot(page, tmp_path, "train-running.png")

    # stop: a checkpoint of the step it stopped at
    page.locator("#train-stop").click()
    text = wait_status(page, "已停止 stopped")
    st = jobs.status()
    stopped_at = st.step
    assert st.resumable and f"step {stopped_at}" in text
    assert (Path(st.run_dir) / "checkpoints" / f"step-{stopped_at}").is_dir()
    screenshot(page, tmp_path, "train-stopped.png")

    # resume, then the training process killed: failed, with its log; the server keeps serving
    page.locator("#train-resume").click()
    pid = wait_for(lambda: jobs.status().pid, what="the resumed process")
    os.killpg(pid, signal.SIGKILL)
    text = wait_status(page, "失败 failed")
    assert "exit code -9" in text
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    screenshot(page, tmp_path, "train-failed.png")

    # resume again with a step count: continues from the checkpoint to the end
    field(page, "train-steps").fill(str(stopped_at + 6))
    page.locator("#train-resume").click()
    wait_status(page, "已完成 completed", timeout=120)
    steps = [r["step"] for r in read_metrics(jobs.status().run_dir) if "loss" in r]
    assert steps == list(range(1, stopped_at + 7)), steps
    log = (Path(jobs.status().run_dir).parent / "train.log").read_text(encoding="utf-8")
    assert f"resumed from {st.run_dir}/checkpoints/step-{stopped_at} at step {stopped_at}/" in log
    wait_for(lambda: plot_lines(page, "loss-plot") == 2, timeout=30, what="train and eval loss lines")
    wait_for(lambda: plot_lines(page, "gen-plot") == 4, timeout=30, what="the 4 generation metrics' lines")
    screenshot(page, tmp_path, "train-completed.png")

    # load the adapter into the server under a name
    field(page, "adapter-name").fill("ui-tuned")
    page.locator("#load-btn").click()
    page.locator("#load-message").get_by_text("ui-tuned").first.wait_for(timeout=60_000)
    assert "ui-tuned" in state.model_ids()
    page.wait_for_timeout(2500)  # a few more polls of the finished run: its charts keep their lines
    assert plot_lines(page, "loss-plot") == 2 and plot_lines(page, "gen-plot") == 4
    screenshot(page, tmp_path, "train-loaded.png")

    # the Generate tab: the loaded adapter is selected; compare shows base and tuned side by side
    content = "类型#裙*颜色#黑色*风格#简约"
    page.get_by_role("tab", name="生成 Generate").click()
    assert field(page, "model-select").input_value() == "ui-tuned"
    field(page, "raw-content").fill(content)
    page.locator("#compare-base input[type=checkbox]").check()
    page.locator("#generate-btn").click()
    page.locator("#status").get_by_text("完成").wait_for(timeout=60_000)
    tuned, base = field(page, "output-main").input_value(), field(page, "output-base").input_value()
    api = lambda **kw: httpx.post(url + "/v1/adcopy", json={"attributes": content, **kw}, timeout=60).json()  # noqa: E731
    assert tuned == as_textarea(api(model="ui-tuned")["text"])
    assert base == as_textarea(api(use_adapter=False)["text"])
    assert tuned != base and tuned != as_textarea(api()["text"]), "the tuned pane is not the new adapter's"
    screenshot(page, tmp_path, "train-compare.png")

    # the Chat tab answers from the tuned adapter (same prompt as the adcopy request: the same greedy text)
    page.get_by_role("tab", name="对话 Chat").click()
    assert field(page, "chat-model").input_value() == "ui-tuned"
    field(page, "chat-input").fill(content)
    page.locator("#chat-send").click()
    bot = page.locator("#chatbot .message.bot, #chatbot [data-testid=bot]").last
    bot.wait_for(timeout=60_000)
    wait_for(lambda: _squash(bot.inner_text()) and _squash(bot.inner_text()) == _squash(tuned), timeout=60,
             what="the chat answer to equal the tuned model's copy")
    screenshot(page, tmp_path, "train-chat.png")
    assert page.external_requests == [] and page.console_errors == []


def _squash(text: str) -> str:
    """Letters, digits and CJK only: the chat renders Markdown, the textarea shows the raw text."""
    return "".join(c for c in text if c.isalnum())
