"""Every setting has a typed rule (soupbench.config_schema.SCHEMA), and a wrong type or an out-of-range value
for any of them stops the run with one line naming the key, before any data is loaded. Data-driven: the
tests walk every option of every config group and derive the bad values from the rules."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from typing import Any

import pytest
import torch

import soupbench
from soupbench import config_schema
from soupbench.config_schema import SCHEMA, Rule, dotted, plain, problems, walk
from soupbench.errors import ConfigError, report_errors
from tests.helpers import compose_cfg

GROUPS = sorted(d.name for d in soupbench.CONFIG_DIR.iterdir() if d.is_dir() and d.name != "hydra")   # new ones too
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((soupbench.CONFIG_DIR / g).glob("*.yaml"))]
CUDA = torch.cuda.is_available()


def select(group: str, option: str) -> str:
    return f"{group}=[{option}]" if group == "soup" else f"{group}={option}"


@cache
def composed(group: str, option: str) -> dict[str, Any]:
    return plain(compose_cfg([select(group, option)]))


def test_schema_table_is_well_formed():
    keys = [r.key for r in SCHEMA]
    assert len(keys) == len(set(keys)), f"keys with two rules: {sorted({k for k in keys if keys.count(k) > 1})}"
    for r in SCHEMA:
        assert r.type in (int, float, bool, str) and r.form in ("value", "list", "space"), r
        if r.type in (int, float) and r.check:
            config_schema._bounds(r.check)                  # parses
        if r.type is str and isinstance(r.check, str) and r.check:
            re.compile(r.check)
        assert config_schema.describe(r)


def suggestion(key: tuple, value: Any) -> str:
    """The SCHEMA line a leaf needs, with the type filled in and the range left to the author."""
    in_list = isinstance(key[-1], int)
    name = dotted(key[:-1] if in_list else key)
    kind = "bool" if isinstance(value, bool) else type(value).__name__
    form = ', form="list"' if in_list else ""
    return f'{dotted(key)} = {value!r}: add Rule("{name}", {kind}, "<range>"{form})'


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_number_and_bool_has_a_rule(group, option):
    """A setting added without a SCHEMA line fails here, naming the key and the line to add."""
    missing = [suggestion(key, value) for key, value, rule in walk(composed(group, option))
               if rule is None and isinstance(value, bool | int | float)]
    assert not missing, f"{select(group, option)}: no rule in SCHEMA (soupbench/config_schema.py) for " + \
        "; ".join(missing)


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_passes_its_own_schema(group, option):
    assert problems(composed(group, option)) == []


def bad_values(rule: Rule, current: Any) -> dict[str, str]:
    """Command-line values that break `rule`: one of the wrong type, one out of range (where the rule has a
    range or choices). Lists and search-space axes keep the current value's shape, as Hydra merges them."""
    if rule.type is bool:
        wrong, out = "abc", None
    elif rule.type is str:
        wrong, out = "12345", ("no_such_choice" if rule.check else None)
    else:
        wrong, out = "abc", None
        if rule.check:
            op, bound = config_schema._bounds(rule.check)[0]
            value = bound - 1 if op == ">=" else bound + 1 if op == "<=" else bound
            out = str(int(value)) if rule.type is int else repr(float(value))
    if rule.form == "list":
        wrong, out = f"[{wrong}]", (f"[{out}]" if out else None)
    elif rule.form == "space":
        if isinstance(current, dict):
            (kind, _), = current.items()
            wrong, out = f"{{{kind}:[{wrong},{wrong}]}}", (f"{{{kind}:[{out},{out}]}}" if out else None)
        else:
            wrong, out = f"[{wrong}]", (f"[{out}]" if out else None)
    return {"wrong type": wrong, **({"out of range": out} if out else {})}


@pytest.mark.parametrize("kind", ["wrong type", "out of range"])
@pytest.mark.parametrize("group,option", OPTIONS)
def test_each_setting_rejects_a_wrong_type_and_an_out_of_range_value(group, option, kind):
    """All of the option's settings at once, through Hydra's own override parsing: each is named."""
    overrides = {}
    for key, value, rule in walk(composed(group, option)):
        if rule is not None and (bad := bad_values(rule, value).get(kind)):
            overrides[dotted(key)] = bad
    assert overrides
    cfg = compose_cfg([select(group, option), *(f"{k}={v}" for k, v in overrides.items())])
    named = {line.split("=", 1)[0] for line in problems(cfg)}
    assert named == set(overrides), f"not caught: {sorted(set(overrides) - named)}; " \
                                    f"wrongly flagged: {sorted(named - set(overrides))}"


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
    from soupbench import pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("the run started work despite a bad setting")

    monkeypatch.setattr(pipeline, "setup", no_work)
    cfg = compose_cfg([override, "logger=none"], tmp_path)
    with pytest.raises(ConfigError) as err:
        pipeline.run(cfg)
    assert str(err.value) == message
    with pytest.raises(SystemExit) as exit_:
        report_errors(pipeline.run, cfg)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"soupbench: error: {message}\n"


def test_several_bad_settings_are_one_line_naming_them_all(tmp_path):
    cfg = compose_cfg(["eval.batch_size=0", "soup.mehl.epochs=1.5", "progress=yes"], tmp_path)
    with pytest.raises(ConfigError) as err:
        config_schema.check_settings(cfg)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("progress='yes': expected true or false (also: ")
    assert "eval.batch_size" in str(err.value) and "soup.mehl.epochs" in str(err.value)


def test_cli_exits_2_with_one_line(tmp_path):
    override, message = ISSUE_CASES[-1]              # device=cuda without CUDA (else a lr out of range)
    proc = subprocess.run([sys.executable, "-m", "soupbench.cli", override, "logger=none",
                           f"paths.output_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == f"soupbench: error: {message}\n"
    assert not (tmp_path / "default" / "base").exists()                  # no linear probe, no data


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_device_index_is_checked():
    config_schema.check_device("cuda")
    with pytest.raises(ConfigError, match="cuda:99: this machine has"):
        config_schema.check_device("cuda:99")
