"""The `adgen.generation.protocol.Generator` attributes every test fake shares (no engine, no model)."""

from __future__ import annotations

from adgen.generation import DecodingConfig


class FakeGeneratorBase:
    backend = "fake"
    model_name = "fake"
    adapter = None
    batch_size = 8
    device = "cpu"
    formatter = None
    tokenizer = None
    model = None
    uses_engine = False  # no DecodeEngine: not an EngineGenerator, no decode_engine
    stop_token_ids = [2]

    def prompt_ids(self, prompt):
        """One id per character of the content (no tokenizer here)."""
        text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
        return [1] * max(1, len(text))

    def resolve(self, config):
        config = config or DecodingConfig()
        return config if config.max_new_tokens is not None else config.replace(max_new_tokens=256)

    def generate_each(self, prompts, config=None):
        yield from enumerate(self.generate(prompts, config))

    def stream(self, prompt, config=None, *, cancel=None):
        raise NotImplementedError("this fake does not stream")
