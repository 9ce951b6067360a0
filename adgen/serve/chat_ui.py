"""The web UI's chat tab ("对话 Chat"): a conversation with one of the served models -- the default adapter, one
loaded by name (the training page's result), or the base model -- streamed through the same scheduler as the
API. The first turn gets the model's training-time system prompt, so an AdGen attribute string written here is
answered as the tuned model learned to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adgen.generation.config import DecodingConfig

if TYPE_CHECKING:
    from adgen.serve.service import ServeState


def chat_choices(state: ServeState) -> list[str]:
    """What the chat may talk to: the served ids with an adapter on, then the base model (adapter off)."""
    return state.tuned_ids() + ([state.base_id] if state.can_compare else [])


def build_chat_page(gr, state: ServeState):
    """The tab's parts; returns its model selector (the training page switches it to a loaded adapter)."""
    model = gr.Dropdown(chat_choices(state), value=state.model_id, label="模型 model", elem_id="chat-model")
    # plain text: an attribute string's '*' must not turn into italics; no share button (it posts to the Hub)
    chatbot = gr.Chatbot(elem_id="chatbot", height=360, label="对话 chat", render_markdown=False,
                         buttons=["copy", "copy_all"], feedback_options=None)
    with gr.Row():
        text = gr.Textbox(show_label=False, placeholder="输入属性串或问题，回车发送 · type and press Enter",
                          elem_id="chat-input", scale=6, max_length=state.limits.max_prompt_chars)
        send = gr.Button("发送 Send", variant="primary", elem_id="chat-send", scale=1, min_width=100)
        clear = gr.Button("清空 Clear", elem_id="chat-clear", scale=1, min_width=100)
    respond = _responder(state)
    for trigger in (send.click, text.submit):
        trigger(respond, [model, text, chatbot], [chatbot, text], api_visibility="private", concurrency_limit=8)
    clear.click(lambda: ([], ""), None, [chatbot, text], api_visibility="private", queue=False)
    return model


def _responder(state: ServeState):
    async def respond(model_id: str, text: str, history: list):
        history = list(history or [])
        if not (text or "").strip():
            yield history, ""
            return
        try:
            use_adapter = state.use_adapter_for(model_id)
            first = state.generator.formatter.messages(text.strip())  # [system,] user
            messages = first[:-1] + [{"role": m["role"], "content": _text_of(m["content"])} for m in history] + first[-1:]
            state.check_prompt(messages)
            handle = state.scheduler.open_stream([messages], DecodingConfig(max_new_tokens=state.default_max_tokens),
                                                 use_adapter=use_adapter)
        except Exception as e:  # ApiError (unknown model, too long, queue full): shown, never raised into Gradio
            yield history + [{"role": "assistant", "content": f"⚠️ {getattr(e, 'message', None) or e}"}], text
            return
        history += [{"role": "user", "content": text.strip()}, {"role": "assistant", "content": ""}]
        try:
            async for kind, _i, payload in handle:
                if kind == "piece":
                    history[-1] = {"role": "assistant", "content": history[-1]["content"] + payload}
                elif kind == "done":
                    history[-1] = {"role": "assistant", "content": payload.text}
                yield history, ""
        except Exception as e:  # the generation failed (it fails alone): said in the answer's place
            history[-1] = {"role": "assistant", "content": f"⚠️ {getattr(e, 'message', None) or e}"}
            yield history, ""
        finally:
            handle.cancel()  # the page closed: the model stops after its current step

    return respond


def _text_of(content) -> str:
    """A Chatbot message's content as plain text (Gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)
