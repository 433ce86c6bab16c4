"""Search-space axes (finetune.space.*): a non-empty list of choices, or {distribution: [low, high]} whose
bounds are typed and ranged like the choices."""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar, Union

import annotated_types as at
from pydantic import Strict, model_validator

from soupbench.settings.base import Axis, Settings

T = TypeVar("T")


class _Range(Settings, Generic[T]):
    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        (low, high), = self.model_dump().values()
        if low > high:
            raise ValueError("low > high")
        return self


class LogUniform(_Range[T]):
    log_uniform: tuple[T, T]

    @model_validator(mode="after")
    def _positive(self) -> LogUniform:
        if self.log_uniform[0] <= 0:
            raise ValueError("log_uniform needs low > 0")
        return self


class Uniform(_Range[T]):
    uniform: tuple[T, T]


class UniformOrZero(_Range[T]):
    uniform_or_zero: tuple[T, T]


class IntUniform(_Range[T]):
    int_uniform: tuple[T, T]


class RandAugment(Settings):
    """timm RandAugment drawn per ingredient: [max magnitude 1..30, max layers 0..10]."""

    rand_augment: tuple[Annotated[int, Strict(), at.Ge(1), at.Le(30)], Annotated[int, Strict(), at.Ge(0), at.Le(10)]]


def axis(item: Any, *ranges: type) -> Any:
    """A search-space axis of `item` values: a non-empty list of them, or one of `ranges` (e.g. LogUniform) of
    them (RandAugment takes no item type)."""
    forms = [Annotated[list[item], at.MinLen(1)]]
    forms += [r if r is RandAugment else r[item] for r in ranges]
    return Annotated[Union[tuple(forms)], Axis(item)]  # noqa: UP007
