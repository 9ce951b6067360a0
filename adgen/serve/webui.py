"""The web UI (Gradio, mounted at /ui on the API's app): attributes in, streamed copy out.

- a form: category + attribute rows (a value cell may hold several values: "宽松，显瘦"), or a raw
  AdGen content string that overrides the form;
- style / length hints and decoding controls;
- example products from the AdGen dev set (click to fill the form);
- "compare with the base model": the same prompt with the adapter switched off, or on the `--base` model
  (a whole fine-tuned model beside the one it started from), side by side (disabled, with the reason, when
  there is nothing to compare with);
- the faithfulness figures of each answer (coverage, missing values, contradictions, invented values).

Generation goes through the same scheduler as the API (same queue, same limits). Nothing here
reaches the internet: analytics off, no share links, local fonts only, SSR off.
"""

# No `from __future__ import annotations` here: Gradio reads the `gr.Request` annotations below at
# run time, and `gr` is imported inside build_ui.
import asyncio
import os
import re
from dataclasses import dataclass
from typing import Any

from adgen.generation.config import DecodingConfig
from adgen.generation.decoding_fields import DecodingField, field_named, without_unused_sampling
from adgen.serve.chat_ui import build_chat_page, chat_choices
from adgen.serve.security import check_ui_login
from adgen.serve.service import ServeState
from adgen.serve.training_ui import CSS as TRAINING_CSS
from adgen.serve.training_ui import build_training_page, wire_loading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

UI_PATH = "/ui"
N_ROWS = 8
CATEGORY_KEY = "类型"
_VALUE_SEP = re.compile(r"[,，、;；]")

CSS = """
#adgen-title h1 { margin-bottom: 0; }
.adgen-figures { font-size: 0.92em; }
.adgen-attr-row { gap: 6px !important; }
"""


# ---- form <-> content string (pure functions, tested without a browser) -------------------------
def form_to_content(category: str, rows: list[tuple[str, str]], raw: str = "") -> tuple[str, list[tuple[str, str]]]:
    """The AdGen content string for the form; `raw` (if not blank) wins. Raises ValueError."""
    from adgen.data.attributes import format_attributes, parse_attributes

    if raw and raw.strip():
        pairs = parse_attributes(raw)
        return format_attributes(pairs), pairs
    pairs: list[tuple[str, str]] = []
    if category and category.strip():
        pairs.append((CATEGORY_KEY, category.strip()))
    for key, value in rows:
        key, value = (key or "").strip(), (value or "").strip()
        if not key and not value:
            continue
        if not key or not value:
            raise ValueError(f"attribute row '{key or value}' needs both a name and a value")
        pairs.extend((key, v.strip()) for v in _VALUE_SEP.split(value) if v.strip())
    if not pairs:
        raise ValueError("give a category and at least one attribute (or an AdGen content string)")
    content = format_attributes(pairs)  # rejects '#' / '*' inside keys and values
    return content, pairs


def content_to_form(content: str, n_rows: int = N_ROWS) -> tuple[str, list[tuple[str, str]]]:
    """Category and rows for an AdGen string (a repeated key becomes one row: "宽松，显瘦")."""
    from adgen.data.attributes import parse_attributes

    category, grouped = "", {}
    for key, value in parse_attributes(content):
        if key == CATEGORY_KEY and not category:
            category = value
        else:
            grouped.setdefault(key, []).append(value)
    rows = [(k, "，".join(vs)) for k, vs in grouped.items()][:n_rows]
    rows += [("", "")] * (n_rows - len(rows))
    return category, rows


def format_figures(fig: dict[str, Any] | None, result=None) -> str:
    """Markdown for one answer's faithfulness figures."""
    if not fig:
        return ""
    cov = fig.get("attr_coverage")
    parts = [
        f"**覆盖率 coverage** {'—' if cov is None else f'{cov:.0%}'}",
        f"**矛盾 contradictions** {fig.get('n_contradictions', 0)}",
        f"**编造 invented** {fig.get('n_hallucinated', 0)}",
    ]
    if fig.get("chinese_share") is not None:
        parts.append(f"**中文占比** {fig['chinese_share']:.0%}")
    if fig.get("length_chars") is not None:
        parts.append(f"**长度** {fig['length_chars']} 字")
    lines = [" · ".join(parts)]
    if fig.get("attr_missing"):
        lines.append("缺失 missing: " + "、".join(fig["attr_missing"]))
    for c in fig.get("contradictions", []):
        lines.append(f"矛盾: {c['key']} 写成「{c['value']}」，输入为 {'、'.join(c['input'])}")
    for h in fig.get("hallucinated", []):
        lines.append(f"编造: {'/'.join(h['keys'])}「{h['value']}」")
    if result is not None:
        lines.append(
            f"<small>tokens: {result.prompt_tokens} prompt + {result.completion_tokens} completion · "
            f"finish: {result.finish_reason}</small>"
        )
    return "\n\n".join(lines)


# ---- the app ----------------------------------------------------------------------------------
def build_ui(state: ServeState):
    import gradio as gr

    limits = state.limits
    compare_ok = state.can_compare
    texts = compare_texts(state)

    with gr.Blocks(title="adgen · 广告文案生成", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# adgen 广告文案生成\n模型 **{state.model_id}** · 设备 {state.health()['device']}",
            elem_id="adgen-title",
        )
        with gr.Tabs():
            with gr.Tab("生成 Generate", id="tab-generate"):
                with gr.Row():
                    with gr.Column(scale=4, min_width=360):
                        category = gr.Textbox(label="类型 category", placeholder="如：裙 / 上衣 / 裤", elem_id="attr-category")
                        keys, values = [], []
                        for i in range(N_ROWS):
                            with gr.Row(elem_classes="adgen-attr-row"):
                                keys.append(gr.Textbox(show_label=False, placeholder=f"属性 {i + 1}（如：颜色）",
                                                       container=False, elem_id=f"attr-key-{i}", scale=2))
                                values.append(gr.Textbox(show_label=False, placeholder="取值（多个用，分隔）",
                                                         container=False, elem_id=f"attr-value-{i}", scale=3))
                        raw = gr.Textbox(label="或：AdGen 属性串（填写后优先于上面的表单）",
                                         placeholder="类型#裙*颜色#黑色*风格#简约", elem_id="raw-content",
                                         max_length=limits.max_prompt_chars)
                        with gr.Row():
                            style = gr.Textbox(label="风格提示 style（可选）", placeholder="如：活泼 / 文艺 / 高端",
                                               max_length=64, elem_id="style-hint")
                            length = gr.Slider(0, 300, value=0, step=10, label="篇幅提示（字，0 = 不提示）",
                                               elem_id="length-hint")
                        decoding = _decoding_panel(gr, state)
                        model = gr.Dropdown(state.tuned_ids(), value=state.model_id, label="模型 model",
                                            info="默认 adapter，或训练页载入的 adapter", elem_id="model-select")
                        compare = gr.Checkbox(value=False, label=texts.toggle, info=texts.info,
                                              interactive=compare_ok, elem_id="compare-base")
                        with gr.Row():
                            go = gr.Button("生成 Generate", variant="primary", elem_id="generate-btn")
                            stop = gr.Button("停止 Stop", elem_id="stop-btn")
                    with gr.Column(scale=7):
                        with gr.Row(equal_height=False):
                            with gr.Column(min_width=240):
                                out_main = gr.Textbox(label=texts.main_pane, lines=10, interactive=False,
                                                      elem_id="output-main", buttons=["copy"])
                                fig_main = gr.Markdown(elem_id="figures-main", elem_classes="adgen-figures")
                            with gr.Column(visible=False, min_width=240) as base_col:
                                out_base = gr.Textbox(label=texts.base_pane, lines=10, interactive=False,
                                                      elem_id="output-base", buttons=["copy"])
                                fig_base = gr.Markdown(elem_id="figures-base", elem_classes="adgen-figures")
                        status = gr.Markdown(elem_id="status")

                example_rows, labels = [], []
                for content in state.examples:
                    try:
                        cat, rows = content_to_form(content)
                    except ValueError:
                        continue
                    example_rows.append([cat, *[x for kv in rows for x in kv], ""])
                    labels.append(content)
                form_inputs = [category, *[x for kv in zip(keys, values) for x in kv], raw]
                if example_rows:
                    gr.Examples(example_rows, inputs=form_inputs, label="示例商品（AdGen dev）",
                                example_labels=labels, examples_per_page=len(labels))

            if state.training is not None:
                with gr.Tab("训练 Train", id="tab-train"):
                    training = build_training_page(gr, state, state.training)
            with gr.Tab("对话 Chat", id="tab-chat"):
                chat_model = build_chat_page(gr, state)
        if state.training is not None:
            wire_loading(gr, state, state.training, training, [model, chat_model])
        _wire_model_selectors(gr, demo, state, model, chat_model, out_main, texts)

        compare.change(lambda on: gr.update(visible=bool(on)), inputs=compare, outputs=base_col,
                       api_visibility="private", queue=False)

        running: dict[str, list] = {}  # session -> its stream handles, for Stop and page close

        async def cancel_session(request: gr.Request):
            for handle in running.pop(getattr(request, "session_hash", None) or "", []):
                handle.cancel()

        generate = _generate_handler(gr, state, running, cancel_session, compare_ok)
        event = go.click(
            generate,
            inputs=[*form_inputs, style, length, *decoding, model, compare],
            outputs=[out_main, fig_main, out_base, fig_base, status],
            api_visibility="private",
            concurrency_limit=8,
        )
        # Gradio's `cancels` stops the event on the page, but does not always close the generator
        # on the server: cancel this session's streams ourselves, and again when the page is closed.
        stop.click(cancel_session, None, None, api_visibility="private", queue=False)
        stop.click(None, cancels=[event], api_visibility="private", queue=False)
        demo.unload(cancel_session)
    demo.queue(max_size=min(64, limits.max_queue))
    return demo


def _wire_model_selectors(gr, demo, state: ServeState, model, chat_model, out_main, texts: "CompareTexts") -> None:
    """The Generate tab's model choice names its pane; a page opened before an adapter was loaded (in another tab,
    by another user) lists it once reloaded."""
    model.change(lambda m: gr.update(label=texts.main_pane if m == state.model_id else f"微调模型 {m}"), model,
                 out_main, api_visibility="private", queue=False)
    demo.load(lambda: (gr.update(choices=state.tuned_ids(), value=state.model_id),
                       gr.update(choices=chat_choices(state), value=state.model_id)),
              None, [model, chat_model], api_visibility="private", queue=False)


@dataclass(frozen=True)
class CompareTexts:
    """What the compare switch and the two answer panes say: the base is the adapter switched off, or the
    `--base` model beside a whole fine-tuned one."""

    toggle: str
    info: str
    main_pane: str
    base_pane: str


def compare_texts(state: ServeState) -> CompareTexts:
    tuned = f"微调模型 {state.model_id}"
    if state.has_base_model:
        return CompareTexts("对比基座模型", f"同一提示词，基座模型（{state.base_id}，adgen serve --base）的输出并排显示",
                            tuned, f"基座模型 {state.base_id}")
    if state.can_compare:
        info = f"同一提示词，关闭 adapter（{state.adapter_name}）后的基座模型输出并排显示"
    elif state.has_adapter:
        info = "此后端不能临时关闭 adapter，无法对比"
    else:
        info = "未加载 adapter（adgen serve --adapter DIR）或基座模型（--base MODEL），没有可对比的基座模型"
    return CompareTexts("对比基座模型（关闭 adapter）", info, tuned if state.has_adapter else f"模型 {state.model_id}",
                        f"基座模型 {state.base_id}（adapter off）")


@dataclass(frozen=True)
class PanelControl:
    """One DecodingConfig field in the decoding panel: its Chinese label and, for a slider, its range and step
    (the value it starts at and its help come from the field)."""

    field: str
    label: str
    # (lowest, highest -- None: the server's max_tokens cap --, step); None: a number box or a checkbox
    slider: tuple[float, float | None, float] | None = None


# The fields the panel shows, in order (the others keep their defaults).
PANEL = (
    PanelControl("max_new_tokens", "max_tokens", (8, None, 8)),
    PanelControl("do_sample", "采样 sampling（关闭 = greedy，结果可复现）"),
    PanelControl("temperature", "temperature", (0.05, 2.0, 0.05)),
    PanelControl("top_p", "top_p", (0.05, 1.0, 0.05)),
    PanelControl("seed", "seed（采样时使用，-1 = 随机）"),
    PanelControl("dry_multiplier", "字级重复惩罚 DRY（0 = 关闭）", (0.0, 3.0, 0.1)),
    PanelControl("no_repeat_char_ngram", "禁止重复的字数 N（0 = 关闭）"),
    PanelControl("end_after_chars", "收尾字数（0 = 关闭）", (0, 300, 10)),
    PanelControl("loop_detection", "循环检测：文本开始循环时停止并删去重复部分"),
    PanelControl("coverage_bonus_per_char", "属性覆盖加分 / 字（0 = 关闭）", (0.0, 0.5, 0.01)),
    PanelControl("coverage_hold_chars", "未写全属性时推迟结束的字数（0 = 关闭）", (0, 300, 10)),
    PanelControl("word_repeat_penalty", "词语重复惩罚（0 = 关闭）", (0.0, 5.0, 0.1)),
)
UNSET = -1  # a number box's value for an optional field left unset (seed: none)


def _decoding_panel(gr, state: ServeState) -> list:
    """The decoding accordion: one control per PANEL entry, started at the field's default (a sampling
    setting at its usual value; max_tokens at the server's default)."""
    controls = []
    with gr.Accordion("解码设置 decoding", open=False):
        for c in PANEL:
            f = field_named(c.field)
            value = state.default_max_tokens if f.name == "max_new_tokens" else _start_value(f)
            common = dict(value=value, label=c.label, info=f.help, elem_id=f.api_name.replace("_", "-"))
            if f.type is bool:
                controls.append(gr.Checkbox(**common))
            elif c.slider is not None:
                low, high, step = c.slider
                controls.append(gr.Slider(low, state.limits.max_tokens if high is None else high, step=step, **common))
            else:
                controls.append(gr.Number(precision=0 if f.type is int else None, minimum=f.spec.ge,
                                          maximum=f.spec.le, **common))
    return controls


def _start_value(f: DecodingField):
    if f.spec.suggested is not None:
        return f.spec.suggested
    return UNSET if f.default is None else f.default


def _generate_handler(gr, state: ServeState, running: dict, cancel_session, compare_ok: bool):
    """The Generate button: form -> prompt -> one stream (two with the base model beside it), shown as it comes."""

    async def generate(request: gr.Request, *args):
        (cat, *kv), rest = args[: 1 + 2 * N_ROWS], args[1 + 2 * N_ROWS :]
        raw_s, style_s, length_v, *panel, model_id, cmp = rest
        rows = list(zip(kv[0::2], kv[1::2]))
        try:
            content, pairs = form_to_content(cat, rows, raw_s)
            messages = state.adcopy_messages(content, style_s, int(length_v or 0) or None)
            state.check_prompt(messages, param="attributes")
            config = _ui_config(state, {c.field: v for c, v in zip(PANEL, panel)})
            chosen = state.use_adapter_for(model_id)  # True: the default adapter; a name: a loaded one
        except Exception as e:  # ValueError, ApiError: shown, never raised into Gradio
            yield "", "", "", "", f"⚠️ {getattr(e, 'message', None) or e}"
            return
        runs = [chosen] + ([False] if cmp and compare_ok else [])
        handles = []
        try:
            for use_adapter in runs:
                handles.append(state.scheduler.open_stream([messages], config, use_adapter=use_adapter))
        except Exception as e:
            for h in handles:
                h.cancel()
            yield "", "", "", "", f"⚠️ 服务器忙 server busy: {e}"
            return
        session = getattr(request, "session_hash", None) or ""
        await cancel_session(request)  # a new click replaces this session's previous run
        running[session] = handles
        texts, figs = ["", ""], ["", ""]
        yield "", "", "", "", f"生成中… `{content}`"
        try:
            for slot, handle in enumerate(handles):
                async for kind, _i, payload in handle:
                    if kind == "piece":
                        texts[slot] += payload
                    elif kind == "done":
                        texts[slot] = payload.text
                        fig = await asyncio.to_thread(state.figures, pairs, payload.text)
                        figs[slot] = format_figures(fig, payload)
                    yield texts[0], figs[0], texts[1], figs[1], f"生成中… `{content}`"
            yield texts[0], figs[0], texts[1], figs[1], f"完成 · `{content}`"
        finally:
            for h in handles:
                h.cancel()  # page closed / stop pressed: the model stops after its current step
            if running.get(session) is handles:
                del running[session]

    return generate


def _ui_config(state: ServeState, shown: dict[str, Any]) -> DecodingConfig:
    """The panel's values (field name -> value) as a DecodingConfig: Gradio's numbers as the field's type, an
    optional field below 0 left unset, max_tokens within the server's cap (0 / empty: the server's default)."""
    values: dict[str, Any] = {}
    for name, value in shown.items():
        f = field_named(name)
        if value in (None, "") or (f.optional and value < 0):  # e.g. seed -1 (UNSET): none
            continue
        values[name] = f.type(value)
    max_tokens = values.get("max_new_tokens") or state.default_max_tokens
    values["max_new_tokens"] = max(1, min(max_tokens, state.limits.max_tokens))
    return DecodingConfig(**without_unused_sampling(values))


def mount_ui(app, state: ServeState) -> None:
    import gradio as gr

    api_key = state.settings.resolved_api_key()
    gr.mount_gradio_app(
        app,
        build_ui(state),
        path=UI_PATH,
        auth=check_ui_login(api_key) if api_key else None,
        auth_message="输入 API key 作为密码（用户名任意） / Enter the server's API key as the password" if api_key else None,
        footer_links=[],
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        theme=gr.themes.Default(),  # local fonts only: nothing is fetched from a CDN
        css=CSS + TRAINING_CSS,
    )
