"""Serving: an OpenAI-compatible API (+ /v1/adcopy) and a Gradio web UI, streaming, safe by default.

- `settings`: ServeSettings / Limits, the bind check.
- `security`: API key check, body cap, OpenAI-shaped errors.
- `schemas`: strict request models.
- `scheduler`: the queue + worker thread that owns the model (batching, cancellation).
- `service`: ServeState (model, names, prompt building, faithfulness figures).
- `api`: `create_app(state)`; `webui`: the UI mounted at /ui; `server`: uvicorn (foreground or thread).
"""
