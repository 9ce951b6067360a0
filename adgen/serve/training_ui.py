"""The web UI's training page ("训练 Train"): a recipe, data (a server path or an upload), the key settings,
start / stop / resume, live loss and generation-metric charts, then the trained adapter loaded into this server
so the Generate tab's compare view and the Chat tab can use it.

The run is `adgen train` in its own process (adgen.serve.training_jobs, one at a time per server); the page
polls its metrics.jsonl and log once a second (gr.Timer). Every check's message (data: file, line, fix; settings:
the config key) is shown in the form; nothing here raises into Gradio, so no stack trace reaches the page.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adgen.errors import AdgenError
from adgen.serve.training_form import METHODS, TrainForm, parse_extra, recipe_config, training_recipes
from adgen.serve.training_jobs import RunStatus, TrainingJobs

if TYPE_CHECKING:
    import pandas as pd

    from adgen.serve.service import ServeState

log = logging.getLogger(__name__)

POLL_S = 1.0
MAX_POINTS = 400  # per line of a chart
DEFAULT_RECIPE = "smollm2-135m"  # a LoRA recipe a CPU trains
GEN_FIGURES = ("rouge-1", "bleu-4", "attr_coverage", "ended_share")  # the gen-eval figures charted (0-1 or 0-100)
# Every chart's series are in its data from the start (a row with no value, which is not drawn): Gradio's chart
# takes its colour domain from the data it was first drawn with, and a line of a series it did not know then stays
# uncoloured (invisible)
LOSS_COLORS = {"train loss": "#1f77b4", "eval loss": "#ff7f0e"}
GEN_COLORS = dict(zip(GEN_FIGURES, ("#2ca02c", "#d62728", "#9467bd", "#8c564b")))
STATE_NAMES = {"starting": "启动中 starting", "running": "训练中 running", "stopping": "停止中 stopping",
               "stopped": "已停止 stopped", "completed": "已完成 completed", "failed": "失败 failed",
               "interrupted": "已中断 interrupted (the server restarted)"}
CSS = """
#train-log textarea { font-family: monospace; font-size: 0.8em; }
"""


@dataclass
class TrainingPage:
    """The page's parts that other tabs' wiring needs: the result loader and its outputs."""

    load_btn: Any
    adapter_name: Any
    load_message: Any


def served_choice(state: ServeState) -> str:
    """The base-model choice meaning "the model this server serves" (its name, never its path)."""
    return f"本服务器的模型 served model: {state.model_name}"


def build_training_page(gr, state: ServeState, jobs: TrainingJobs) -> TrainingPage:
    recipes = training_recipes()
    recipe = DEFAULT_RECIPE if DEFAULT_RECIPE in recipes else recipes[0]
    cfg = recipe_config(recipe)
    with gr.Row():
        with gr.Column(scale=4, min_width=360):
            recipe_box = gr.Dropdown(recipes, value=recipe, label="配方 recipe（adgen recipes）", elem_id="train-recipe")
            model_box = gr.Dropdown([served_choice(state)], value=served_choice(state), allow_custom_value=True,
                                    label="基座模型 base model（或填写路径 / hub id）", elem_id="train-model")
            with gr.Row():
                train_path = gr.Textbox(label="训练数据 train data（服务器上的路径）", placeholder="data/train.jsonl",
                                        elem_id="train-data-path")
                eval_path = gr.Textbox(label="验证数据 eval data（可选）", placeholder="data/dev.jsonl",
                                       elem_id="eval-data-path")
            with gr.Row():
                train_file = gr.File(label="或上传训练数据 upload (.json / .jsonl)", file_types=[".json", ".jsonl"],
                                     type="filepath", elem_id="train-data-upload", height=120)
                eval_file = gr.File(label="或上传验证数据 upload", file_types=[".json", ".jsonl"], type="filepath",
                                    elem_id="eval-data-upload", height=120)
            with gr.Row():
                method = gr.Dropdown(list(METHODS), value=cfg.method, label="方法 method", elem_id="train-method",
                                     min_width=100)
                rank = gr.Number(cfg.lora.r, precision=0, minimum=1, label="LoRA rank", elem_id="train-rank",
                                 min_width=100)
                lr = gr.Number(cfg.lr, minimum=0, label="学习率 lr", elem_id="train-lr", min_width=100)
            with gr.Row():
                minutes = gr.Number(cfg.max_minutes or 0, minimum=0, label="时间预算（分钟，0 = 不限）",
                                    elem_id="train-minutes")
                steps = gr.Number(cfg.max_steps or 0, precision=0, minimum=0, label="步数 max steps（0 = 按 epochs）",
                                  elem_id="train-steps")
            with gr.Accordion("更多设置 more settings（key=value，同 adgen train）", open=False):
                extra = gr.Textbox(lines=3, show_label=False, elem_id="train-extra",
                                   placeholder="eval_every=20\ngen_eval_every=50\nmax_samples=200")
            with gr.Row():
                start_btn = gr.Button("开始训练 Start", variant="primary", elem_id="train-start", min_width=100)
                stop_btn = gr.Button("停止 Stop", elem_id="train-stop", min_width=100)
                resume_btn = gr.Button("继续 Resume", elem_id="train-resume", min_width=100)
            message = gr.Markdown(elem_id="train-message")
        with gr.Column(scale=6):
            status = gr.Markdown("还没有训练 · no run yet", elem_id="train-status")
            loss_plot = gr.LinePlot(loss_frame([]), x="step", y="value", color="series", title="loss",
                                    color_map=LOSS_COLORS, height=260, elem_id="loss-plot")
            gen_plot = gr.LinePlot(gen_frame([]), x="step", y="value", color="series", height=220, color_map=GEN_COLORS,
                                   title="生成指标 generation metrics (eval records)", elem_id="gen-plot")
            with gr.Accordion("日志 log", open=False):
                log_box = gr.Textbox(lines=12, max_lines=12, show_label=False, interactive=False,
                                     elem_id="train-log", autoscroll=True)
            with gr.Row():
                adapter_name = gr.Textbox(label="载入名称 adapter name", placeholder="留空 = ui-<run id>", scale=2,
                                          elem_id="adapter-name")
                load_btn = gr.Button("载入服务器 Load into the server", scale=1, elem_id="load-btn")
            load_message = gr.Markdown(elem_id="load-message")

    form_inputs = [recipe_box, model_box, train_path, train_file, eval_path, eval_file, method, rank, lr, minutes,
                   steps, extra]
    recipe_box.change(recipe_defaults, recipe_box, [method, rank, lr, minutes, steps], api_visibility="private")
    start_btn.click(_starter(state, jobs), form_inputs, message, api_visibility="private", concurrency_limit=1)
    stop_btn.click(_stopper(jobs), None, message, api_visibility="private")
    resume_btn.click(_resumer(jobs), [minutes, steps], message, api_visibility="private", concurrency_limit=1)
    timer = gr.Timer(POLL_S)
    timer.tick(_poller(gr, jobs), None, [status, loss_plot, gen_plot, log_box],
               api_visibility="private", show_progress="hidden", queue=False)
    return TrainingPage(load_btn, adapter_name, load_message)


def recipe_defaults(recipe: str) -> tuple:
    """The form's settings as the chosen recipe has them."""
    try:
        cfg = recipe_config(recipe)
    except AdgenError:
        return (None,) * 5
    return cfg.method, cfg.lora.r, cfg.lr, cfg.max_minutes or 0, cfg.max_steps or 0


def form_of(state: ServeState, values: list) -> tuple[TrainForm, dict[str, str]]:
    """(the form, uploads) from the page's inputs; an upload wins over its path box."""
    recipe, model, train_path, train_file, eval_path, eval_file, method, rank, lr, minutes, steps, extra = values
    model = state.settings.model if not model or model == served_choice(state) else model.strip()
    uploads = {k: v for k, v in (("train_data", train_file), ("eval_data", eval_file)) if v}
    if not (train_path or "").strip() and "train_data" not in uploads:
        raise AdgenError("give the training data: a file on the server (its path) or an upload")
    form = TrainForm(recipe, model, (train_path or "").strip() or "(upload)", (eval_path or "").strip() or None,
                     method or None, int(rank) if rank else None, float(lr) if lr else None,
                     float(minutes) if minutes else None, int(steps) if steps else None, parse_extra(extra))
    return form, uploads


def _starter(state: ServeState, jobs: TrainingJobs):
    def start(*values):
        try:
            form, uploads = form_of(state, list(values))
            status, checked = jobs.start(form, uploads)
        except AdgenError as e:
            return f"⚠️ {e}"
        except Exception as e:  # a bug: logged with its traceback, shown as one line
            log.exception("starting a training run from the web UI failed")
            return f"⚠️ {type(e).__name__}: {e}"
        return f"已开始 started run `{status.run_id}`\n\n" + "\n\n".join(f"✓ {line}" for line in checked)

    return start


def _stopper(jobs: TrainingJobs):
    def stop():
        status = jobs.stop()
        if status is None:
            return "没有正在进行的训练 · nothing is training"
        return f"停止中 stopping run `{status.run_id}`: it saves a checkpoint of its current step, then exits"

    return stop


def _resumer(jobs: TrainingJobs):
    def resume(minutes, steps):
        try:
            status = jobs.resume(max_steps=int(steps) if steps else None,
                                 max_minutes=float(minutes) if minutes else None)
        except AdgenError as e:
            return f"⚠️ {e}"
        return f"继续 resumed run `{status.run_id}` from its last checkpoint (steps / time budget: as in the form)"

    return resume


def _poller(gr, jobs: TrainingJobs):
    """The timer's refresh: status line, charts and log. The charts are sent whole each time (at most
    MAX_POINTS per line): a LinePlot sent a no-change update (gr.skip) blanks its lines."""

    def poll():
        st = jobs.status()
        if st is None:
            return (gr.skip(),) * 4
        return status_text(st), loss_frame(st.metrics), gen_frame(st.metrics), st.log_tail

    return poll


def status_text(st: RunStatus) -> str:
    steps = f"{st.step}/{st.total_steps}" if st.total_steps else str(st.step)
    parts = [f"**{STATE_NAMES.get(st.state, st.state)}**", f"step {steps}",
             f"elapsed {_clock(st.elapsed_s)}"]
    if st.train_time_s is not None:
        parts.append(f"train time {st.train_time_s:.0f} s")
    losses = [r["loss"] for r in st.metrics if "loss" in r]
    if losses:
        parts.append(f"loss {losses[-1]:.4f}")
    lines = [" · ".join(parts), f"<small>run `{st.run_id}` · {st.run_dir}</small>"]
    if st.message:
        lines.append(("⚠️ " if st.state == "failed" else "") + st.message)
    if st.state == "failed" and st.log_tail:
        tail = "\n".join(st.log_tail.splitlines()[-8:])
        lines.append(f"```\n{tail}\n```")
    if st.adapter_dir:
        lines.append(f"adapter: `{st.adapter_dir}`")
    return "\n\n".join(lines)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def loss_frame(metrics: list[dict[str, Any]]) -> pd.DataFrame:
    """Long-form rows (step, value, series) of the training and eval losses."""
    rows = _thin([(r["step"], r["loss"], "train loss") for r in metrics if r.get("loss") is not None])
    rows += _thin([(r["step"], r["eval_loss"], "eval loss") for r in metrics if r.get("eval_loss") is not None])
    return _frame(rows, LOSS_COLORS)


def _thin(rows: list, limit: int = MAX_POINTS) -> list:
    """At most about `limit` evenly spaced rows, the last one always kept (a long run's chart stays cheap to send)."""
    if len(rows) <= limit:
        return rows
    stride = -(-len(rows) // limit)
    return rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])


def gen_frame(metrics: list[dict[str, Any]]) -> pd.DataFrame:
    """The generation evaluations' figures on a 0-1 scale (ROUGE / BLEU are percentages in the rows)."""
    rows = []
    for r in metrics:
        gen = r.get("gen_eval")
        if not isinstance(gen, dict):
            continue
        for name in GEN_FIGURES:
            value = gen.get(name)
            if value is not None:
                rows.append((r["step"], value / 100 if name in ("rouge-1", "bleu-4") else value, name))
    return _frame(rows, GEN_COLORS)


def _frame(rows: list[tuple[int, float, str]], series: dict[str, str]) -> pd.DataFrame:
    """The chart's data: fixed column types (an empty frame's columns would be read as categories, and the chart
    keeps the axis types it was first drawn with) and a row without a value for each of `series` (see LOSS_COLORS)."""
    import pandas as pd  # (gradio's own dependency; the plots take a DataFrame)

    frame = pd.DataFrame([(0, math.nan, name) for name in series] + rows, columns=["step", "value", "series"])
    return frame.astype({"step": "int64", "value": "float64", "series": "str"})


def wire_loading(gr, state: ServeState, jobs: TrainingJobs, page: TrainingPage, selectors: list) -> None:
    """"Load into the server": the finished run's adapter joins this server under a name; `selectors` (the
    Generate and Chat tabs' model choices) list it and switch to it."""

    def load(name: str):
        name = (name or "").strip() or _default_name(jobs)
        same = (gr.skip(),) * len(selectors)
        st = jobs.status()
        if st is None or not st.adapter_dir:
            return ("⚠️ no finished LoRA run to load: train one first (a full fine-tune or prefixes load with "
                    "adgen serve --model RUN/model)", *same)
        run_model = jobs.form_of(st.run_id).get("model")
        command = f"`adgen serve --model {run_model} --adapter {st.adapter_dir}`"
        if run_model != state.settings.model:
            return f"this run trained another base model than this server's: serve it with {command}", *same
        try:
            state.add_adapter(name, st.adapter_dir)
        except AdgenError as e:
            return f"⚠️ {e}", *same
        except Exception as e:
            log.exception("loading a trained adapter into the server failed")
            return f"⚠️ {type(e).__name__}: {e}", *same
        choices = state.tuned_ids()
        return (f"已载入 loaded as **{name}**: pick it in 生成 Generate (compare with the base model) or 对话 Chat, "
                f"or call the API with \"model\": \"{name}\"",
                *[gr.update(choices=choices, value=name) for _ in selectors])

    page.load_btn.click(load, page.adapter_name, [page.load_message, *selectors], api_visibility="private")


def _default_name(jobs: TrainingJobs) -> str:
    st = jobs.status()
    return f"ui-{st.run_id}" if st is not None else f"ui-{time.strftime('%Y%m%d-%H%M%S')}"
