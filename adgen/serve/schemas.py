"""Request bodies of the API, validated strictly (a string is not a number, a dict is not a list).

Unknown fields are ignored (OpenAI clients send many), except the few whose meaning we cannot honour
(tools, logprobs, non-zero penalties, JSON mode): those are refused rather than silently dropped.
The decoding fields of both bodies are generated from `DecodingConfig` (`decoding_schema.DecodingFields`).
Limits that depend on the server's settings (max_tokens, n, stop count, prompt length) are checked in
`service.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from adgen.serve.decoding_schema import STRICT, DecodingFields
from adgen.serve.security import ApiError


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_template_message(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class ChatCompletionRequest(DecodingFields):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted only at their no-op values
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported by this server (use repetition_penalty)", param=name)
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        if self.tools:
            raise ApiError(400, "tools / function calling are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format type 'text' is supported", param="response_format")
        return self


class CompletionRequest(DecodingFields):
    """OpenAI's legacy completions: raw text in, text out (no chat template). `prompt`: one text or a list."""

    model: str
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=16)]
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    user: str | None = None
    # accepted only at their no-op values
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported by this server (use repetition_penalty)", param=name)
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by this server", param="suffix")
        if self.logprobs is not None:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        if self.best_of not in (None, 1, self.n):
            raise ApiError(400, "best_of is not supported by this server (use n)", param="best_of")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


AttributeValue = str | list[str]


class AdcopyRequest(DecodingFields):
    """`attributes`: {"类型": "裙", "颜色": ["黑色", "白色"]}, [["类型", "裙"], ...], or "类型#裙*颜色#黑色"."""

    attributes: dict[str, AttributeValue] | list[Annotated[list[str], Field(min_length=2, max_length=2)]] | str
    style: Annotated[str, Field(max_length=64)] | None = None
    length: Annotated[int, Field(ge=10, le=2000)] | None = None  # approximate characters
    model: str | None = None
    use_adapter: bool = True
    stream: bool = False


def parse_body(model_cls: type[BaseModel], body: bytes) -> Any:
    """Validate a raw JSON body; every failure becomes a 400 in OpenAI's error shape."""
    if not body.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate_json(body)
    except ApiError:
        raise
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"malformed JSON in the request body: {first['msg']}", code="invalid_json") from None
        if first["type"] == "model_type":
            raise ApiError(400, "the request body must be a JSON object", code="invalid_type") from None
        param = _param(first["loc"])
        # A union (str | list[...]) fails once per member: report them as one problem.
        same = [e for e in errors if _param(e["loc"]) == param]
        others = len(errors) - len(same)
        more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
        if first["type"] == "missing":
            message = f"'{param}' is a required field{more}"
            code = "missing_required_parameter"
        else:
            reasons = "; or ".join(dict.fromkeys(e["msg"] for e in same))
            message = f"invalid value for '{param}': {reasons}{more}"
            code = "invalid_type" if all(e["type"].endswith("_type") for e in same) else "invalid_value"
        raise ApiError(400, message, param=param, code=code) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "TextPart", "ChatMessage", "StreamOptions"}


def _param(loc) -> str | None:
    """`messages.0.content` from pydantic's loc, without the union-member tags it adds ('str', 'list[...]')."""
    parts = [
        str(p) for p in loc
        if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS or p.startswith(("function-", "constrained-"))))
    ]
    return ".".join(parts) or None
