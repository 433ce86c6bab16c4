"""Which soup methods there are and what each declares: a method is a `build` function plus, in its own file,
`DECLARATIONS` (name -> soupbench.soups.context.Declaration: the settings model with that variant's defaults
and the traits). The built-in names are the files under conf/soup/ (their `_target_` names the build); a
user's method is any `_target_` (`soupbench -cd <folder>`), and one without a declaration gets its settings
model from its build's signature. Nothing else lists methods."""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, create_model

from soupbench.errors import ConfigError
from soupbench.settings.base import Settings, problems, settings_values
from soupbench.settings.choices import SoupDistributed
from soupbench.soups.context import Declaration


@dataclass(frozen=True)
class SoupMethod:
    """One method: its name, build function (`build(ctx, **settings) -> SoupResult`), settings model (this
    variant's defaults) and traits, each a function of the validated settings."""

    name: str
    target: str
    build: Callable
    declaration: Declaration

    @property
    def settings(self) -> type[Settings]:
        return self.declaration.settings

    def needs_start(self, settings: Settings) -> bool:
        return self.declaration.needs_start(settings)

    def every_rank(self, settings: Settings) -> bool:
        return self.declaration.every_rank(settings)

    def builds_on_soup(self, settings: Settings) -> bool:
        return self.declaration.builds_on_soup(settings)


def names() -> list[str]:
    """The built-in methods: one YAML each under conf/soup/."""
    return sorted(p.stem for p in _soup_dir().glob("*.yaml"))


def method(name_or_target: str, variant: str | None = None) -> SoupMethod:
    """The method a name of conf/soup/ (`greedy`) or a `_target_` (`soupbench.soups.greedy.build`, a user's
    `my_soup.build`) stands for. A build shared by variants (learned, hl, ...) takes the variant's declaration
    from `variant` (or the name), else its first."""
    if "." in name_or_target:
        return _by_target(name_or_target, variant)
    path = _soup_dir() / f"{name_or_target}.yaml"
    if not path.is_file():
        raise ConfigError(f"soup method {name_or_target!r}: expected one of {names()} (or a config under soup/)")
    return _by_target(_yaml_node(path)["_target_"], variant or name_or_target)


def method_of(name: str, node: Mapping[str, Any]) -> SoupMethod:
    """The method of soup `name` of the config (`soup.<name>`): its `_target_`, the variant `name`."""
    target = node.get("_target_")
    return method(target if target else name, variant=name)


def defaults(m: SoupMethod) -> dict[str, Any]:
    """The method's declared settings with their defaults, as plain values (what its YAML holds)."""
    return m.settings().model_dump(mode="json")


def settings_problems(name: str, node: Mapping[str, Any]) -> list[str]:
    """`soup.<name>.<key>=<value>: expected ...` for every setting of `node` (soup.<name>, `_target_` and
    `_partial_` aside) that breaks the method's declared settings."""
    try:
        m = method_of(name, node)
    except ConfigError as e:
        return [f"soup.{name}: {e}"]
    return problems(m.settings, settings_values(node), f"soup.{name}")


# ---------------------------------------------------------------------------------------------- lookups


def _soup_dir() -> Path:
    import soupbench

    return Path(soupbench.CONFIG_DIR) / "soup"


@cache
def _yaml_node(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


@cache
def _by_target(target: str, variant: str | None) -> SoupMethod:
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        build = getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"soup method _target_={target!r}: {e}") from None
    declared: dict[str, Declaration] | None = getattr(module, "DECLARATIONS", None)
    if not declared:
        name = variant or module_name.rpartition(".")[2]
        return SoupMethod(name, target, build, Declaration(_signature_settings(build, name), every_rank=_auto))
    name = variant if variant in declared else next(iter(declared))
    return SoupMethod(name, target, build, declared[name])


def _auto(settings: Settings) -> bool:
    """A user's method with a `distributed: auto` setting is built by every rank, as the learned soups are."""
    return getattr(settings, "distributed", None) == SoupDistributed.AUTO


def _signature_settings(build: Callable, name: str) -> type[Settings]:
    """A settings model from a build signature's keyword parameters (after the context): their annotations
    where they resolve, their defaults; `**kwargs` allows any other key."""
    sig = inspect.signature(build)
    try:
        hints = typing.get_type_hints(build)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve is Any
        hints = {}
    fields: dict[str, Any] = {}
    extra = "forbid"
    for i, (key, p) in enumerate(sig.parameters.items()):
        if i == 0 and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue                                  # the SoupContext
        if p.kind is p.VAR_KEYWORD:
            extra = "allow"
        elif p.kind is not p.VAR_POSITIONAL:
            fields[key] = (hints.get(key, Any), ... if p.default is p.empty else p.default)
    return create_model(f"{name}_settings", __base__=Settings if extra == "forbid" else _OpenSettings, **fields)


class _OpenSettings(Settings):
    """Settings of a build that takes `**kwargs`: any other key is passed on."""

    model_config = ConfigDict(extra="allow", frozen=True)
