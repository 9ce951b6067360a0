"""The API's decoding request fields, generated from `DecodingConfig`'s fields (`decoding_fields`): each
field's API name (OpenAI's where it has one: max_tokens), type, range and help, so the request models and
/openapi.json never drift from the library; `decoding_values()` turns a request back into config fields.

`DecodingConfig.validate()` stays the one full check: what the schema cannot say (no_repeat_char_ngram is
0 or >= 2) comes back from it as a 400 naming the field (`service.decoding_config`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from adgen.generation.decoding_fields import (
    DecodingField,
    added_to_default,
    decoding_fields,
    field_named,
    without_unused_sampling,
)

STRICT = ConfigDict(strict=True, extra="ignore")


class DecodingRequest(BaseModel):
    """What the generated fields share: OpenAI's second name for max_tokens, and the conversion."""

    model_config = STRICT
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="OpenAI's newer name of max_tokens (wins over it)")

    def given(self, name: str) -> Any:
        """The request's value of the DecodingConfig field `name` (None: not given)."""
        return getattr(self, field_named(name).api_name)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.given("max_new_tokens")

    def stop_list(self) -> list[str]:
        return list(self.given("stop") or [])

    def sampling(self) -> bool:
        """do_sample when given; else as OpenAI: a temperature above 0, or a top_p / top_k that filters."""
        if self.given("do_sample") is not None:
            return self.given("do_sample")
        if self.given("temperature") is not None:
            return self.given("temperature") > 0
        top_p, top_k = self.given("top_p"), self.given("top_k")
        return top_p is not None and top_p < 1.0 or bool(top_k)

    def decoding_values(self) -> dict[str, Any]:
        """The DecodingConfig fields this request gives, by their config names (a banned_strings list adds to
        the defaults, [] drops them); sampling decided by `sampling()`, whose settings greedy leaves out."""
        values: dict[str, Any] = {}
        for f in decoding_fields():
            value = getattr(self, f.api_name)
            if value is not None:
                values[f.name] = added_to_default(f, value) if f.spec.adds_to_default and value else value
        if self.max_completion_tokens is not None:
            values["max_new_tokens"] = self.max_completion_tokens
        values["do_sample"] = self.sampling()
        return without_unused_sampling(values)

    repetition_fields = decoding_values  # its older name (tests/test_compliance.py)


def _one_as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def request_annotation(f: DecodingField) -> Any:
    """The pydantic type of a field in a request: its range from the metadata, a list's item and length caps,
    `stop`'s single string as a one-item list; always optional (None: the config's or the server's default)."""
    s = f.spec
    if not f.is_list:
        return Annotated[f.type, Field(ge=s.ge, gt=s.gt, le=s.le)] | None
    lo, hi = s.item_chars or (None, None)
    item = Annotated[f.type, Field(min_length=lo, max_length=hi)]
    items = Annotated[list[item], Field(max_length=s.max_items)]
    if s.one_or_list:  # OpenAI's `stop`: "。" or ["。", "！"]; one type to validate, both in the schema
        items = Annotated[items, BeforeValidator(_one_as_list, json_schema_input_type=item | list[item])]
    return items | None


DecodingFields = create_model(
    "DecodingFields",
    __base__=DecodingRequest,
    __doc__="Decoding options shared by both endpoints (DecodingConfig's fields). Greedy unless sampling is asked for.",
    **{f.api_name: (request_annotation(f), Field(default=None, description=f.help)) for f in decoding_fields()},
)
