"""Every setting is declared once, typed (soupbench/settings/), and a wrong type or an out-of-range value for
any of them stops the run with one line naming the key, before any data is loaded. Data-driven: the tests
walk every option of every config group and derive the bad values from the declarations."""

from __future__ import annotations

import enum
import subprocess
import sys
import typing
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

import pytest
import torch

import soupbench
from soupbench.errors import ConfigError, report_errors
from soupbench.runtime import check_device
from soupbench.settings import base
from soupbench.settings.base import TARGET, Axis, Settings, What, keys
from soupbench.settings.check import check_settings, config_problems, plain, sections
from soupbench.soups import registry
from tests.helpers import compose_cfg

GROUPS = sorted(d.name for d in soupbench.CONFIG_DIR.iterdir() if d.is_dir() and d.name != "hydra")   # new ones too
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((soupbench.CONFIG_DIR / g).glob("*.yaml"))]
CUDA = torch.cuda.is_available()
REQUIRED = {("dataset", "image_folder"): ["dataset.root='???': required: set it on the command line or in a preset"]}


def select(group: str, option: str) -> str:
    return f"{group}=[{option}]" if group == "soup" else f"{group}={option}"


@cache
def composed(group: str, option: str) -> dict[str, Any]:
    return plain(compose_cfg([select(group, option)]))


def soup_model(name: str, node: Mapping[str, Any]) -> type[Settings]:
    """The Settings model soup method `name` declares (its `_target_`'s variant `name`)."""
    return registry.method_of(name, node).settings


def parts(node: dict[str, Any]) -> Iterator[tuple[str, type[Settings], Any]]:
    """(prefix, model, node) for every part of a composed config, each soup method's included."""
    yield from sections(node)
    for name, sub in node["soup"].items():
        yield f"soup.{name}", soup_model(name, sub), sub


def declared(model: type[Settings], node: Mapping[str, Any], key: tuple = ()) -> Iterator[tuple[tuple, Any, Any]]:
    """(key, value, (annotation, metadata)) of every declared setting in `node`: the leaves of the models
    (a list or a search-space axis is one setting; a mapping of names, e.g. report.paper, is entered)."""
    for k, v in node.items():
        field = keys(model).get(k)
        if field is None:
            continue
        yield from _declared(field.annotation, [field], v, (*key, k))


def _declared(annotation: Any, meta: list, value: Any, key: tuple) -> Iterator[tuple[tuple, Any, Any]]:
    sub, inner = base._model_of(annotation), base._dict_value(annotation)
    if sub is not None and isinstance(value, Mapping):
        yield from declared(sub, value, key)
    elif inner is not None and isinstance(value, Mapping):
        for k, v in value.items():
            yield from _declared(inner, [], v, (*key, k))
    else:
        yield key, value, (annotation, meta)


def dotted(prefix: str, key: tuple) -> str:
    return ".".join([prefix, *map(str, key)] if prefix else map(str, key))


def all_declared(node: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {dotted(prefix, key): (value, decl) for prefix, model, part in parts(node) if isinstance(part, Mapping)
            for key, value, decl in declared(model, part)}


def raw_leaves(node: Any, key: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from raw_leaves(v, (*key, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from raw_leaves(v, (*key, i))
    else:
        yield key, node


# ------------------------------------------------------------------------------------------- structure


def models_reachable() -> set[type[Settings]]:
    from soupbench.settings import backbone, dataset, logger
    from soupbench.settings.finetune import Finetune
    from soupbench.settings.run import Run

    todo = [Run, Finetune, logger.Paths, logger.Wandb, logger.NoLogger, *backbone.BY_TARGET.values(),
            *dataset.BY_TARGET.values()]
    seen: set[type[Settings]] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for field in m.model_fields.values():
            for t in typing.get_args(field.annotation) or (field.annotation,):
                if (sub := base._model_of(t)) is not None:
                    todo.append(sub)
    return seen


def test_every_built_in_model_forbids_unknown_keys_and_is_strict():
    for m in models_reachable():
        assert m.model_config.get("extra") == "forbid", m


@pytest.mark.parametrize("override,key", [("+foo=1", "foo"), ("+eval.foo=1", "eval.foo"),
                                          ("+finetune.space.momentum=[0.9]", "finetune.space.momentum"),
                                          ("+backbone.foo=1", "backbone.foo"), ("+dataset.foo=true", "dataset.foo"),
                                          ("+report.bootstrap.foo=1", "report.bootstrap.foo"),
                                          ("+logger.foo=x", "logger.foo"), ("+paths.foo=x", "paths.foo")])
def test_an_unknown_key_is_one_line_naming_it(override, key):
    with pytest.raises(ConfigError) as err:
        check_settings(compose_cfg([override]))
    line = str(err.value)
    assert "\n" not in line and line.split("=", 1)[0] == key and "not a setting" in line, line


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_number_and_bool_is_a_declared_setting(group, option):
    """A setting added to a YAML without a declaration fails here (and in validate: extra keys are errors)."""
    node = composed(group, option)
    names = set(all_declared(node))
    raw = [(dotted("", k), v) for k, v in raw_leaves(node) if isinstance(v, bool | int | float)]
    missing = [f"{k} = {v!r}" for k, v in raw
               if not any(k == n or k.startswith(n + ".") or k.startswith(n + "[") for n in names)]
    assert not missing, f"{select(group, option)}: not declared in soupbench/settings/: " + "; ".join(missing)


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_passes_its_own_settings(group, option):
    assert config_problems(composed(group, option)) == REQUIRED.get((group, option), [])


# ------------------------------------------------------------------------------------------- bad values


def shape(decl: tuple[Any, list]) -> dict[str, Any]:
    """What a declaration allows, for deriving bad values: type, choices, pattern, bounds, form."""
    annotation, meta = base._unwrap(decl[0])
    meta = [*base._expand(decl[1]), *meta]
    if base._is_union(annotation):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation, more = base._unwrap(rest[0])
        meta += more
    form, item = "value", annotation
    if (ax := next((m for m in meta if isinstance(m, Axis)), None)) is not None:
        form, (item, meta) = "space", (ax.item, [])
    elif typing.get_origin(annotation) in (list, tuple):
        form, item, meta = "list", typing.get_args(annotation)[0], []
    item, more = base._unwrap(item)
    meta += more
    checked = any(isinstance(m, What) for m in meta) or typing.get_origin(item) is typing.Literal \
        or (isinstance(item, type) and issubclass(item, enum.Enum))
    kind = str if checked or item is str else item
    bounds = [(op, float(getattr(m, a))) for m in base._flat(meta)
              for op, a in ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt")) if hasattr(m, a)]
    return {"type": kind, "checked": checked, "bounds": bounds, "form": form}


def bad_values(decl: tuple[Any, list], current: Any) -> dict[str, str]:
    """Command-line values that break the declaration: one of the wrong type, one out of range (where it has
    a range or choices). Lists and search-space axes keep the current value's shape, as Hydra merges them."""
    s = shape(decl)
    if s["type"] is bool:
        wrong, out = "abc", None
    elif s["type"] is str:
        wrong, out = "12345", ("no_such_choice" if s["checked"] else None)
    elif s["type"] in (int, float):
        wrong, out = "abc", None
        if s["bounds"]:
            op, bound = s["bounds"][0]
            value = bound - 1 if op == ">=" else bound + 1 if op == "<=" else bound
            out = str(int(value)) if s["type"] is int else repr(float(value))
    else:
        return {}                                       # free-form (a factory's own keyword arguments)
    if s["form"] == "list":
        wrong, out = f"[{wrong}]", (f"[{out}]" if out else None)
    elif s["form"] == "space":
        if isinstance(current, dict):
            (kind, _), = current.items()
            wrong, out = f"{{{kind}:[{wrong},{wrong}]}}", (f"{{{kind}:[{out},{out}]}}" if out else None)
        else:
            wrong, out = f"[{wrong}]", (f"[{out}]" if out else None)
    return {"wrong type": wrong, **({"out of range": out} if out else {})}


@pytest.mark.parametrize("kind", ["wrong type", "out of range"])
@pytest.mark.parametrize("group,option", OPTIONS)
def test_each_setting_rejects_a_wrong_type_and_an_out_of_range_value(group, option, kind):
    """All of the option's settings at once, through Hydra's own override parsing: each is named, nothing
    else is. (`_target_` picks the model, so it is left as it is.)"""
    overrides = {}
    for key, (value, decl) in all_declared(composed(group, option)).items():
        if key.rsplit(".", 1)[-1] != TARGET and (bad := bad_values(decl, value).get(kind)):
            overrides[key] = bad
    assert overrides
    cfg = compose_cfg([select(group, option), *(f"{k}={v}" for k, v in overrides.items())])
    named = {line.split("=", 1)[0] for line in config_problems(cfg)}
    expected = set(overrides) | {line.split("=", 1)[0] for line in REQUIRED.get((group, option), [])}
    assert named == expected, f"not caught: {sorted(expected - named)}; wrongly flagged: {sorted(named - expected)}"


MESSAGES = [("export.formats=[x]", 'export.formats=["x"]: expected a list of values among state_dict, '
             "huggingface, open_clip"),
            ("eval.precision=fp16", "eval.precision='fp16': expected one of auto, bf16, fp32"),
            ("diagnostics.edge_frac=0.6", "diagnostics.edge_frac=0.6: expected a number >= 0 and <= 0.5"),
            ("num_threads=0", "num_threads=0: expected an integer >= 1, or null"),
            ("device=gpu", "device='gpu': expected auto, cpu, cuda or cuda:N"),
            ("finetune.space.lr={log_uniform:[2,1]}", 'finetune.space.lr={"log_uniform": [2, 1]}: expected a list '
             "of choices or {log_uniform|uniform|int_uniform|uniform_or_zero|rand_augment: [low, high]}, "
             "of numbers > 0"),
            ("finetune.space.epochs=[1.5]", "finetune.space.epochs=[1.5]: expected a list of choices or "
             "{log_uniform|uniform|int_uniform|uniform_or_zero|rand_augment: [low, high]}, of integers >= 1"),
            ("backbone.std=[0.5,0.0,0.5]", "backbone.std=[0.5, 0.0, 0.5]: expected a list of numbers > 0, or null"),
            ("seed=true", "seed=true: expected an integer >= 0"),
            ("report.bootstrap.confidence=1", "report.bootstrap.confidence=1: expected a number > 0 and < 1"),
            ("soup.greedy.accept=lt", "soup.greedy.accept='lt': expected one of >=, >")]


@pytest.mark.parametrize("override,message", MESSAGES)
def test_the_message_says_what_the_declaration_allows(override, message):
    assert config_problems(compose_cfg([override])) == [message]


def test_a_missing_required_value_is_named():
    assert config_problems(compose_cfg(["dataset=image_folder"])) == REQUIRED[("dataset", "image_folder")]
    assert config_problems(compose_cfg(["dataset=image_folder", "dataset.root=/data"])) == []


# ------------------------------------------------------------------------------------------- the run


ISSUE_CASES = [("eval.batch_size=-1", "eval.batch_size=-1: expected an integer >= 1"),
               ("dataset.image_size=0", "dataset.image_size=0: expected an integer >= 1"),
               ("finetune.num_ingredients=abc", "finetune.num_ingredients='abc': expected an integer >= 1, or null"),
               ("soup.learned.lr=-0.5", "soup.learned.lr=-0.5: expected a number > 0")]
if not CUDA:
    ISSUE_CASES.append(("device=cuda", "device=cuda: no CUDA device is available (torch.cuda.is_available() is "
                                       "False); use device=cpu or auto"))


@pytest.mark.parametrize("override,message", ISSUE_CASES)
def test_a_bad_setting_stops_the_run_with_one_line_before_any_data_is_loaded(override, message, tmp_path,
                                                                          monkeypatch, capsys):
    import soupbench.data.mnist
    from soupbench import pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("the run loaded data despite a bad setting")

    monkeypatch.setattr(soupbench.data.mnist, "load", no_work)          # the dataset's _target_
    cfg = compose_cfg([override, "logger=none"], tmp_path)
    with pytest.raises(ConfigError) as err:
        pipeline.run(cfg)
    assert str(err.value) == message
    with pytest.raises(SystemExit) as exit_:
        report_errors(pipeline.run, cfg)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"soupbench: error: {message}\n"
    assert not any(tmp_path.rglob("*")), sorted(tmp_path.rglob("*"))      # nothing written, no run directory


def test_several_bad_settings_are_one_line_naming_them_all(tmp_path):
    cfg = compose_cfg(["eval.batch_size=0", "soup.mehl.epochs=1.5", "progress=yes"], tmp_path)
    with pytest.raises(ConfigError) as err:
        check_settings(cfg)
    assert "\n" not in str(err.value)
    assert str(err.value) == "progress='yes': expected true or false (also: eval.batch_size, soup.mehl.epochs)"


def test_cli_exits_2_with_one_line(tmp_path):
    override, message = ISSUE_CASES[-1]              # device=cuda without CUDA (else a lr out of range)
    proc = subprocess.run([sys.executable, "-m", "soupbench.cli", override, "logger=none",
                           f"paths.output_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == f"soupbench: error: {message}\n"
    assert not (tmp_path / "default" / "base").exists()                  # no linear probe, no data
    assert not (tmp_path / "default" / "ingredients").exists()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_device_index_is_checked():
    check_device("cuda")
    with pytest.raises(ConfigError, match="cuda:99: this machine has"):
        check_device("cuda:99")
