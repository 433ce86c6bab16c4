"""Every code block of README.md, CONTRIBUTING.md and docs/*.md is tested, by one visible convention:

- ```python blocks run as written (exec, in a scratch folder holding a tiny image folder `data/` and timm
  checkpoints `runs/*/model_best.pth.tar` of `test_convnext`, the start `runs/start.pth`);
- ```bash / ```sh / ```console blocks need a marker on the line before the fence: `<!-- run -->` (each
  `soupbench` line runs in that scratch folder, with `logger=none` and no bootstrap intervals, outputs only; it
  must name `experiment=tiny`), `<!-- run slow -->` (the same, marked slow) or `<!-- compose-only -->` (each
  `soupbench` / `torchrun` line is composed with Hydra and its settings validated; scripts must exist and know
  their flags; console scripts must be installed);
- `make <target>` lines are never run; the target must exist in the Makefile;
- `<!-- file: PATH -->` before a block writes it to PATH in the scratch folder first (a YAML or Python file a
  command block uses); ```yaml blocks are parsed;
- ```text blocks are output and exempt. Any other block fails.

Also checked: the README front page's length, that every path its layout names exists, its links, and that
the methods table names every config under conf/soup/."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import soupbench

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "console"}
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(.*?)\s*-->\s*$")
SOUPBENCH = {"soupbench", ".venv/bin/soupbench"}
PYTHONS = {"python", "python3", ".venv/bin/python"}


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int           # the fence's line, 1-based
    lang: str
    marker: str         # the HTML comment on the line before, '' if none
    code: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    lines, out, i = doc.read_text().splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{doc.name}:{i + 1}: unclosed code block"
        prev = MARKER.match(lines[i - 1]) if i else None
        out.append(Block(doc, i + 1, m.group(1), prev.group(1) if prev else "", "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return out


ALL = [b for d in DOCS if d.is_file() for b in blocks(d)]


def of(pred) -> list:
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.marker == "run slow" else []) for b in ALL
            if pred(b)]


def test_every_block_is_run_composed_or_exempt():
    bad = [f"{b.id} ```{b.lang}" + (f" <!-- {b.marker} -->" if b.marker else "") for b in ALL
           if not (b.lang in ("python", "yaml", "text") or b.marker.startswith("file:")
                   or (b.lang in SHELL and b.marker in ("run", "run slow", "compose-only")))]
    bad += [f"{d.relative_to(REPO)}:{i} an indented fence" for d in DOCS if d.is_file()
            for i, line in enumerate(d.read_text().splitlines(), 1) if re.match(r"\s+```", line)]
    assert not bad, ("blocks neither run, composed nor exempt (python/yaml/text, or a shell block marked "
                     "<!-- run -->, <!-- run slow --> or <!-- compose-only -->): " + ", ".join(bad))


# ------------------------------------------------------------------------------------ the scratch folder


def user_files(root: Path) -> None:
    """A user's folder: a 10-class image folder of 32 px images, a start and three timm checkpoints saved the
    way timm's train.py saves them under DDP (`module.` keys inside a dict)."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("heldout", 3), ("test", 2)):
        for c in range(10):
            (root / "data" / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    root / "data" / split / str(c) / f"{i}.png")
    torch.manual_seed(0)
    start = timm.create_model("test_convnext", num_classes=10).state_dict()
    (root / "runs").mkdir(exist_ok=True)
    torch.save(start, root / "runs" / "start.pth")
    for r in range(3):
        state = {f"module.{k}": v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in start.items()}
        (root / "runs" / f"run{r}").mkdir()
        torch.save({"epoch": 0, "state_dict": state}, root / "runs" / f"run{r}" / "model_best.pth.tar")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One scratch folder for every page (their run blocks reuse each other's tiny ingredients, as a rerun of
    the same `name` does), with the user's files and every `<!-- file: ... -->` block."""
    root = tmp_path_factory.mktemp("docs")
    user_files(root)
    for b in ALL:
        if b.marker.startswith("file:"):
            path = root / b.marker.removeprefix("file:").strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(b.code)
    return root


# ------------------------------------------------------------------------------------ python and yaml


@pytest.mark.parametrize("block", of(lambda b: b.lang == "python"))
def test_python_block_runs(block: Block, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    monkeypatch.syspath_prepend(str(scratch))
    exec(compile(block.code, block.id, "exec"), {"__name__": "__doc_block__"})


@pytest.mark.parametrize("block", of(lambda b: b.lang == "yaml"))
def test_yaml_block_parses(block: Block):
    assert isinstance(yaml.safe_load(block.code), dict), block.id


# ------------------------------------------------------------------------------------ shell blocks


def commands(code: str) -> list[list[str]]:
    """Each command of a shell block: continuation lines joined, comments dropped, `&&` chains split."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1:]
    return [c for c in out if c]


@functools.cache
def make_targets() -> frozenset[str]:
    text = (REPO / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))


@functools.cache
def console_scripts() -> frozenset[str]:
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return frozenset(re.findall(r"^([\w-]+)\s*=", section, re.M))


@functools.cache
def script_help(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    return done.stdout


def check_flags(script: str, args: list[str]) -> None:
    """A script the docs name exists, and knows every --flag they give it (in its source, or its --help)."""
    path = REPO / script
    assert path.is_file(), f"{script}: no such file"
    source = path.read_text()
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        assert f'"{flag}"' in source or flag in script_help(script), f"{script}: no option {flag}"


def sweep_free(overrides: list[str]) -> list[str]:
    """A multirun's overrides with each sweep cut to its first value: one job's config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(o.input_line)
    return out


def validate_settings(cfg) -> None:
    """Every setting checked as the command checks it before any work (the device aside: a GPU preset is
    composed on a machine without one)."""
    from soupbench.settings.check import check_settings

    check_settings(cfg)


def compose_command(args: list[str], cwd: Path) -> None:
    """`soupbench [-m] [-cd DIR] overrides...`: composed as the command composes it, settings validated."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides, i = [], 0
    while i < len(args):
        if args[i] in ("-m", "--multirun"):
            i += 1
        elif args[i] in ("-cd", "--config-dir"):
            overrides.append(f"hydra.searchpath=[file://{(cwd / args[i + 1]).resolve()}]")
            i += 2
        else:
            assert not args[i].startswith("-"), f"option {args[i]} is not composed by this test"
            overrides.append(args[i])
            i += 1
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(soupbench.CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=sweep_free(overrides), return_hydra_config=True)
    validate_settings(cfg)


def check_command(words: list[str], cwd: Path, run: bool) -> Path:
    """One command of a shell block: run, composed or checked. Returns the folder the next command runs in."""
    head, rest = words[0], words[1:]
    if head == "cd":
        return cwd / rest[0]
    if head == "make":
        targets = [w for w in rest if "=" not in w]
        assert targets and set(targets) <= make_targets(), f"make {' '.join(targets)}: not a Makefile target"
        return cwd
    if head in SOUPBENCH or head == "torchrun" or head in PYTHONS and rest[:2] == ["-m", "soupbench.cli"]:
        if head == "torchrun":
            assert not run, "torchrun: mark the block <!-- compose-only -->"
            assert "-m" in rest and rest[rest.index("-m") + 1] == "soupbench.cli", words
            rest = rest[rest.index("-m") + 2:]
        elif head in PYTHONS:
            rest = rest[2:]
        if run:
            assert "experiment=tiny" in rest, "a run block's soupbench lines use experiment=tiny (CPU, seconds)"
            env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
            quiet = ["logger=none", "progress=false", "report.bootstrap.num_samples=0"]     # outputs only
            done = subprocess.run([sys.executable, "-m", "soupbench.cli", *rest, *quiet],
                                  cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{' '.join(words)}\n{done.stderr[-3000:]}"
        else:
            compose_command(rest, cwd)
        return cwd
    if head == "soupbench-aggregate" or head in PYTHONS and rest[:2] == ["-m", "soupbench.aggregate"]:
        assert "soupbench-aggregate" in console_scripts()
        rest = rest[2:] if head in PYTHONS else rest
        if run:
            rest = [m for a in rest for m in (sorted(str(p.relative_to(cwd)) for p in cwd.glob(a)) or [a])]
            done = subprocess.run([sys.executable, "-m", "soupbench.aggregate", *rest], cwd=cwd, capture_output=True,
                                  text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
            assert done.returncode == 0, f"{' '.join(words)}\n{done.stderr[-3000:]}"
        else:
            check_flags("soupbench/aggregate.py", rest)
        return cwd
    assert not run, f"{head}: only soupbench, soupbench-aggregate and make lines run; mark it compose-only"
    if head in PYTHONS:
        check_flags(rest[0], rest[1:])
    elif head in (".venv/bin/wandb", "wandb"):
        assert Path(sys.executable).with_name("wandb").is_file(), "wandb's console script is not installed"
    else:
        raise AssertionError(f"{head}: a command this test neither runs nor checks")
    return cwd


@pytest.mark.parametrize("block", of(lambda b: b.lang in SHELL))
def test_shell_block(block: Block, scratch):
    run = block.marker.startswith("run")
    cwd = scratch
    found = commands(block.code)
    assert found, f"{block.id}: an empty block"
    for words in found:
        cwd = check_command(words, cwd, run)


# ------------------------------------------------------------------------------------ the front page


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_is_a_front_page():
    assert len(readme().splitlines()) <= 210


def test_layout_names_only_paths_that_exist():
    layout = readme().split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"(?<![\w/.])((?:soupbench|conf|tests|experiments|docs)/[\w./-]*)", layout)
    assert named, "the layout names no path"
    missing = sorted({p for p in named if not (REPO / p.rstrip(".")).exists()})
    assert not missing, f"the layout names paths that do not exist: {missing}"


def test_methods_table_names_every_config_and_source():
    table = readme().split("## Methods", 1)[1].split("\n## ", 1)[0]
    configs = set(re.findall(r"conf/soup/[\w]+\.yaml", table))
    assert configs == {f"conf/soup/{p.name}" for p in (REPO / "conf" / "soup").glob("*.yaml")}
    for path in {*configs, *re.findall(r"soupbench/soups/[\w/.]+", table)}:
        assert (REPO / path).exists(), path


def test_links_between_documents_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not re.match(r"\w+://", target):
                assert (doc.parent / target).exists(), f"{doc.name}: link to {target}, which does not exist"


def test_docs_describe_what_is():
    """No history: the documents say what soupbench does, not what it did before."""
    banned = ("a revision before", "an earlier version", "earlier versions", "no longer", "used to ",
              "before this change", "since the", "session", "is now ", "are now ")
    for doc in DOCS:
        text = doc.read_text().lower()
        found = [w for w in banned if w in text]
        assert not found, f"{doc.name}: {found}"
