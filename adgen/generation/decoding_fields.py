"""`DecodingConfig`'s fields as one list, read from the dataclass: name, type, default, help (the field's
comment) and its `FieldSpec` metadata (API name and range, list rules, sampling). `adgen generate` / `eval`
flags, the API's request models and /openapi.json, the web UI's decoding panel and the vLLM mapping are all
derived from it, so a new field reaches each of them (tests/test_decoding_fields.py checks that)."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Mapping

from adgen.config import field_comments
from adgen.generation.config import DecodingConfig, FieldSpec, summarize_strings


@dataclasses.dataclass(frozen=True)
class DecodingField:
    name: str
    type: type  # int, float, bool or str (a list's item type)
    is_list: bool  # tuple[str, ...]: a list of strings
    optional: bool  # None is a value (max_new_tokens: sized from the tokenizer; seed: none)
    default: Any
    help: str
    spec: FieldSpec

    @property
    def api_name(self) -> str:
        """The request field's name (OpenAI's where it has one: max_tokens)."""
        return self.spec.api_name or self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_text(self) -> str:
        """The default as help text shows it: `none`, `'\\n'`, `<UNK> + the Advertising Law's absolute terms (74)`."""
        if self.default is None or self.default == ():
            return "none"
        if self.type is bool:
            return "on" if self.default else "off"
        if self.is_list:
            return summarize_strings(tuple(repr(s)[1:-1] for s in self.default))  # a newline shown as \n
        return str(self.default)


@functools.cache
def decoding_fields() -> tuple[DecodingField, ...]:
    hints = typing.get_type_hints(DecodingConfig)
    comments = field_comments(DecodingConfig)
    defaults = DecodingConfig()
    out = []
    for f in dataclasses.fields(DecodingConfig):
        tp, optional = _unwrap_optional(hints[f.name])
        is_list = typing.get_origin(tp) is tuple
        out.append(DecodingField(
            name=f.name, type=typing.get_args(tp)[0] if is_list else tp, is_list=is_list, optional=optional,
            default=getattr(defaults, f.name), help=comments.get(f.name, ""), spec=f.metadata.get("spec", FieldSpec()),
        ))
    return tuple(out)


def field_named(name: str) -> DecodingField:
    return _by_name()[name]


@functools.cache
def _by_name() -> dict[str, DecodingField]:
    return {f.name: f for f in decoding_fields()}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `float` -> (float, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def added_to_default(f: DecodingField, items: typing.Sequence[str]) -> tuple[str, ...]:
    """A given list of an `adds_to_default` field (banned_strings): the default, then the new items once each
    (a merchant's brand rules never drop the Advertising Law's terms)."""
    base = tuple(f.default)
    return base + tuple(dict.fromkeys(i for i in items if i not in base))


def without_unused_sampling(values: Mapping[str, Any]) -> dict[str, Any]:
    """Greedy decoding ignores the sampling settings (temperature, top_p, top_k): leave them out, so equal
    greedy requests make equal configs."""
    if values.get("do_sample"):
        return dict(values)
    return {k: v for k, v in values.items() if not field_named(k).spec.sampling}
