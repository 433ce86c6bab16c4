"""The building blocks of every settings model, and `problems`: one line per bad key, `key=value: expected ...`.

A model declares each key once, with its type and range (`batch_size: Int = Field(ge=1)`); the message is
derived from that declaration, so the rule and its wording cannot drift apart. Types are strict: a bool is
never a number nor a number a bool, an integer setting takes no 1.5, a number is finite, and an unknown key is
an error naming it. Search-space axes are built in settings/space.py.
"""

from __future__ import annotations

import enum
import json
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, Union

import annotated_types as at
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError
from pydantic.fields import FieldInfo

from soupbench.errors import ConfigError
from soupbench.settings.choices import Distribution

REQUIRED = "???"                      # OmegaConf's missing value: the user has to set it
_REQUIRED_TEXT = "required: set it on the command line or in a preset"


class Settings(BaseModel):
    """A group of settings: unknown keys are errors; values are checked, never coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


S = TypeVar("S", bound=Settings)


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]    # an integer is a number too
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
TARGET = "_target_"                   # Hydra's factory key: declare it as `target_: Str = Field(alias=TARGET)`


@dataclass(frozen=True)
class What:
    """How a message describes a string pattern ("a path to a .npy file")."""

    text: str


def matching(pattern: str, what: str) -> Any:
    """A string that matches `pattern` whole, described as `what` in messages."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            raise ValueError(what)
        return value

    return Annotated[str, Strict(), AfterValidator(check), What(what)]


# ------------------------------------------------------------------------------- search-space axes

DISTRIBUTIONS = tuple(Distribution)


@dataclass(frozen=True)
class Axis:
    """Marks a search-space axis: a list of choices or {distribution: [low, high]} of `item`."""

    item: Any


# ------------------------------------------------------------------------------- messages


def problems(model: type[Settings], node: Mapping[str, Any], prefix: str) -> list[str]:
    """One line per key of `node` (keys under `prefix`) that breaks `model`, in the node's order."""
    if not isinstance(node, Mapping):
        return [f"{prefix}={show(node)}: expected a mapping of settings"]
    found: dict[tuple, str] = {}
    try:
        model.model_validate(dict(node))
    except ValidationError as err:
        for e in err.errors():
            key, expected = _leaf(model, tuple(e["loc"]))
            if key in found:
                continue
            if e["type"] == "missing":
                found[key] = f"{_dotted(prefix, key)}={REQUIRED}: {_REQUIRED_TEXT}"
                continue
            reason = (f"not a setting here (expected one of {', '.join(_keys(model, key[:-1]))})"
                      if expected is None else f"expected {expected}")
            found[key] = f"{_dotted(prefix, key)}={show(_at(node, key))}: {reason}"
    for key, value in _leaves(node):
        if isinstance(value, str) and value == REQUIRED:
            found[key] = f"{_dotted(prefix, key)}={show(value)}: {_REQUIRED_TEXT}"
    order = {key: i for i, (key, _) in enumerate(_leaves(node, stop_at=set(found)))}
    return [found[k] for k in sorted(found, key=lambda k: order.get(k, len(order)))]


HYDRA_KEYS = ("_target_", "_partial_")


def validated(model: type[S], values: Mapping[str, Any], prefix: str) -> S:
    """`values` as `model`'s settings (its defaults fill what is not given; Hydra's `_target_`/`_partial_` are
    ignored), or a ConfigError with the first problem line and the other keys."""
    plain = settings_values(values)
    raise_problems(problems(model, plain, prefix))
    return model.model_validate(plain)


def settings_values(node: Mapping[str, Any]) -> dict[str, Any]:
    """A config node's settings as plain Python values, without Hydra's keys."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    return {k: v for k, v in plain.items() if k not in HYDRA_KEYS}


def raise_problems(found: Sequence[str]) -> None:
    """Problem lines as one ConfigError: the first line, then ` (also: <key>, <key>)` naming the others."""
    if found:
        also = f" (also: {', '.join(p.split('=', 1)[0] for p in found[1:])})" if len(found) > 1 else ""
        raise ConfigError(found[0] + also)


def describe(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """What a declared type allows, in words: "an integer >= 1, or null", "a list of numbers > 0"."""
    annotation, meta = _unwrap(annotation)
    meta = [*_expand(metadata), *meta]
    null = False
    if _is_union(annotation) and type(None) in typing.get_args(annotation):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        null, annotation = True, rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
        annotation, more = _unwrap(annotation)
        meta += more
    axis_ = next((m for m in meta if isinstance(m, Axis)), None)
    if axis_ is not None:
        text = f"a list of choices or {{{'|'.join(DISTRIBUTIONS)}: [low, high]}}, of {_scalar(axis_.item, (), True)}"
    elif _is_union(annotation):
        text = " or ".join(describe(a) for a in typing.get_args(annotation))
    elif typing.get_origin(annotation) in (list, tuple):
        text = f"a list of {_scalar(typing.get_args(annotation)[0], (), True)}"
    elif typing.get_origin(annotation) is dict:
        text = "a mapping"
    else:
        text = _scalar(annotation, meta, False)
    return text + (", or null" if null else "")


def _scalar(annotation: Any, metadata: Sequence[Any], many: bool) -> str:
    annotation, meta = _unwrap(annotation)
    meta = [*metadata, *meta]
    what = next((m.text for m in meta if isinstance(m, What)), None)
    if what:
        return what
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return ("values among " if many else "one of ") + ", ".join(str(m.value) for m in annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return ("values among " if many else "one of ") + ", ".join(map(str, typing.get_args(annotation)))
    names = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
             str: ("a string", "strings")}
    text = names.get(annotation, ("a value", "values"))[many]
    bounds = [f"{op} {getattr(m, attr):g}" for m in _flat(meta)
              for op, attr in ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt")) if hasattr(m, attr)]
    return text + (" " + " and ".join(bounds) if bounds else "")


def _expand(meta: Sequence[Any]) -> list[Any]:
    """Field(...) objects replaced by the metadata they carry (pydantic moves Annotated's there)."""
    return [x for m in meta for x in (_expand(m.metadata) if isinstance(m, FieldInfo) else [m])]


def _flat(meta: Sequence[Any]) -> Iterator[Any]:
    """annotated_types constraints, also those inside a Field(...) or an at.Interval."""
    for m in meta:
        if isinstance(m, FieldInfo):
            yield from _flat(m.metadata)
        elif isinstance(m, at.Interval):
            yield from (c for c in (at.Gt(m.gt) if m.gt is not None else None, at.Ge(m.ge) if m.ge is not None
                                    else None, at.Lt(m.lt) if m.lt is not None else None,
                                    at.Le(m.le) if m.le is not None else None) if c is not None)
        elif isinstance(m, at.Gt | at.Ge | at.Lt | at.Le):
            yield m


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """Annotated[X, m...] -> (X, [m...]), nested ones flattened."""
    meta: list[Any] = []
    while typing.get_origin(annotation) is Annotated:
        annotation, *more = typing.get_args(annotation)
        meta = [*more, *meta]
    return annotation, meta


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _model_of(annotation: Any) -> type[Settings] | None:
    """The Settings model a field holds (also when it may be null)."""
    annotation, _ = _unwrap(annotation)
    if _is_union(annotation):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = _unwrap(rest[0])[0] if len(rest) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _leaf(model: type[Settings], loc: tuple) -> tuple[tuple, str | None]:
    """The key a validation error is about (the declared setting, not a list index inside it) and what it
    expects; None: the key is not declared."""
    current: Any = model
    for i, part in enumerate(loc):
        sub = _model_of(current)
        if sub is not None:
            field = keys(sub).get(part) if isinstance(part, str) else None
            if field is None:
                return loc[:i + 1], None
            current, meta = field.annotation, [field]
            if _model_of(current) is not None or _dict_value(current) is not None:
                continue
            return loc[:i + 1], describe(current, meta)
        value = _dict_value(current)
        if value is None:
            return loc[:i], describe(current)
        current = value
        if _model_of(current) is None and _dict_value(current) is None:
            return loc[:i + 1], describe(current)
    return loc, describe(current) if _model_of(current) is None else "a mapping of settings"


def _dict_value(annotation: Any) -> Any:
    annotation, _ = _unwrap(annotation)
    if _is_union(annotation):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = _unwrap(rest[0])[0] if len(rest) == 1 else None
    return typing.get_args(annotation)[1] if typing.get_origin(annotation) is dict else None


def _keys(model: type[Settings], key: tuple) -> list[str]:
    current: Any = model
    for part in key:
        sub = _model_of(current)
        current = keys(sub)[part].annotation if sub is not None else _dict_value(current)
    sub = _model_of(current)
    return list(keys(sub)) if sub is not None else []


def keys(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A model's fields by the key a config writes (`_target_` is declared as `target_` with that alias)."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _at(node: Any, key: tuple) -> Any:
    for part in key:
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        else:
            return None
    return node


def _leaves(node: Any, key: tuple = (), stop_at: set | None = None) -> Iterator[tuple[tuple, Any]]:
    """(key, value) of every mapping leaf (a list is one leaf), in order; keys in `stop_at` are not entered."""
    if isinstance(node, Mapping) and not (stop_at and key in stop_at):
        for k, v in node.items():
            yield from _leaves(v, (*key, k), stop_at)
    elif key:
        yield key, node


def _dotted(prefix: str, key: tuple) -> str:
    return ".".join([prefix, *map(str, key)] if prefix else map(str, key))


def show(value: Any) -> str:
    """A value as a message shows it: strings quoted, null/true/lists as YAML-ish JSON."""
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value, default=str) if value is None or isinstance(value, bool | list | dict) else str(value)
