"""The evaluate stage at scale, simulated: K ingredients of a tiny network on generated 1000-class splits with
ImageNet-R-, -A- and ObjectNet-style label groups, scored and ensembled the way the pipeline does it. Each
measurement runs in a fresh process and prints JSON (peak resident memory, disk, accuracies), so the peak is
this evaluation's own. Used by `bench_eval_memory.py` (before/after, side by side) and `tests/test_eval_scale.py`.

    python experiments/eval_scale.py setup DIR --ingredients 72 --images 1000      # generate data + ingredients
    python experiments/eval_scale.py run DIR --ingredients 72 [--mode after|in_ram|before] [--check]

Modes: `after` is soupbench's evaluator (mapped images, fp16 scores per (weights, split), running ensemble);
`in_ram` the same with every split's images loaded into memory first (the control: what mapping saves);
`before` the evaluator of soupbench revision `--rev` (its source from git), with images in memory as its loaders
kept them. `--check` compares every ensemble accuracy with a direct computation on fp32 logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from soupbench.backbones import Classifier
from soupbench.data import DataBundle, Split
from soupbench.evaluate import (
    correct,
    correct_by_rows,
    ensemble_correct,
    percent,
    predict,
    predict_chunks,
    split_scores,
)
from soupbench.evaluator import Evaluator
from soupbench.io.atomic import save_weights
from soupbench.io.weights import load_weights
from soupbench.rowfile import MappedRows, write_rows

WIDTH, CLASSES = 64, 1000


def peak_rss_mb() -> float:
    """This address space's resident high-water mark (VmHWM; ru_maxrss survives execve and would report a large
    parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def model(size: int) -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, WIDTH), nn.ReLU()), WIDTH, CLASSES,
                      [0.5] * 3, [0.5] * 3)


def label_groups(gen: torch.Generator) -> dict[str, list[list[int]] | None]:
    """Like ImageNet-R and -A (200 single logits each, different subsets) and ObjectNet (113 classes of 1-3
    logits each, disjoint)."""
    perm = torch.randperm(CLASSES, generator=gen).tolist()
    objectnet, start = [], 0
    for k in range(113):
        n = 1 + k % 3
        objectnet.append(sorted(perm[start:start + n]))
        start += n
    return {"heldout": None, "test": None, "imagenet_r": [[c] for c in sorted(perm[:200])],
            "imagenet_a": [[c] for c in sorted(perm[-200:])], "objectnet": objectnet}


def split_sizes(images: int) -> dict[str, int]:
    return {"heldout": images // 2, "test": images, "imagenet_r": images, "imagenet_a": images // 2,
            "objectnet": images // 2}


def setup(d: Path, k: int, images: int, size: int) -> None:
    """Row files of uint8 images and labels per split, `groups.json`, and K perturbed ingredients. The labels
    are the unperturbed network's predictions, so the ingredients and their ensemble score well above chance."""
    gen = torch.Generator().manual_seed(0)
    groups = label_groups(gen)
    net = model(size)
    for name, n in split_sizes(images).items():
        path = d / f"{name}.images.safetensors"
        chunks = (torch.randint(0, 256, (min(4096, n - i), 3, size, size), dtype=torch.uint8, generator=gen)
                  for i in range(0, n, 4096))
        write_rows(path, "images", (n, 3, size, size), torch.uint8, chunks)
        split = Split(name, MappedRows(path, "images"), torch.zeros(n, dtype=torch.int64), groups[name])
        teacher = torch.cat([split_scores(b, split).argmax(dim=1)
                             for b in predict_chunks(net, split.images, 1024, torch.device("cpu"))])
        save_weights(d / f"{name}.labels.safetensors", {"labels": teacher})
    (d / "groups.json").write_text(json.dumps(groups))
    (d / "size.json").write_text(json.dumps(size))
    base = net.state_dict()
    for i in range(k):
        g = torch.Generator().manual_seed(1000 + i)
        save_weights(d / "ingredients" / f"g{i:03d}.safetensors",
                     {n: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) for n, v in base.items()})


def bundle(d: Path, in_ram: bool) -> DataBundle:
    groups = json.loads((d / "groups.json").read_text())
    splits = {}
    for name, g in groups.items():
        images = MappedRows(d / f"{name}.images.safetensors", "images")
        splits[name] = Split(name, images.load() if in_ram else images,
                             load_weights(d / f"{name}.labels.safetensors")["labels"], g)
    return DataBundle([f"c{i}" for i in range(CLASSES)], splits["heldout"], splits["heldout"], splits["test"],
                      {n: s for n, s in splits.items() if n not in ("heldout", "test")})


def old_evaluate_module(rev: str):
    """soupbench/evaluate.py as it was at revision `rev`, imported from git (it runs against today's helpers)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:soupbench/evaluate.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(root / "outputs" / f"evaluate_{rev}.py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"evaluate_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(d: Path, k: int, mode: str, rev: str, check: bool) -> dict:
    torch.set_num_threads(1)
    data = bundle(d, in_ram=mode != "after")
    net = model(json.loads((d / "size.json").read_text()))
    cache = d / f"scores-{mode}-{k}"
    paths = sorted((d / "ingredients").glob("*.safetensors"))[:k]
    splits = data.eval_splits()
    t0 = time.perf_counter()
    hits: dict[str, dict[str, torch.Tensor]] = {}
    if mode == "before":
        old = old_evaluate_module(rev)
        ev = old.Evaluator(net, data, cache, "data", 256, torch.device("cpu"))
        for p in paths:                       # as its evaluate stage did: every split of every ingredient, then
            state = load_weights(p)           # the ensemble from the cached logits
            hits[p.stem] = {s: old.correct(ev.logits(state, s, p.stem), sp) for s, sp in splits.items()}
        ens = {s: old.correct(old.ensemble_logits(ev.cached_logits(p.stem, s) for p in paths), sp)
               for s, sp in splits.items()}
    else:
        ev = Evaluator(net, data, cache, "data", 256, torch.device("cpu"))
        for p in paths:                       # as the pipeline's evaluate stage: scores stored, read by blocks
            state = load_weights(p)
            hits[p.stem] = {s: correct_by_rows(ev.score_rows(state, s, p.stem), sp) for s, sp in splits.items()}
        ens = {s: ensemble_correct([ev.cached_score_rows(p.stem, s) for p in paths], sp) for s, sp in splits.items()}
    out = {"mode": mode, "ingredients": k, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
           "disk_mb": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20,
           "split_images": {s: len(sp) for s, sp in splits.items()},
           "ensemble": {s: percent(h) for s, h in ens.items()}}
    out["disk_mb_per_ingredient"] = out["disk_mb"] / k
    if check:
        out["check"] = direct_check(net, data, paths, ens, hits)
    return out


def direct_check(net: nn.Module, data: DataBundle, paths: list[Path], ens: dict[str, torch.Tensor],
                 hits: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Every ingredient's and each split's ensemble's correctness (the ensemble: mean of the members' split
    scores, the official model-soups definition) from fp32 logits computed here directly, image by image
    against the evaluated one. An image may differ only where fp16 rounding of the stored scores can decide it:
    where the direct top two scores are closer than twice the largest rounding error of a score (2^-11 of its
    magnitude)."""
    result = {}
    for s, sp in data.eval_splits().items():
        x = sp.images.load() if isinstance(sp.images, MappedRows) else sp.images
        total, bound = None, torch.zeros(len(sp))
        ing = {"differ": 0, "near_ties": 0, "differ_outside_ties": 0}
        for p in paths:
            scores = split_scores(predict(net, x, 512, torch.device("cpu"), load_weights(p)), sp)
            own = scores.abs().max(dim=1).values * 2.0 ** -11
            top2 = scores.topk(2, dim=1).values
            tie, differ = (top2[:, 0] - top2[:, 1]) <= 2 * own, correct(scores, sp) != hits[p.stem][s]
            for key, v in (("differ", differ), ("near_ties", tie), ("differ_outside_ties", differ & ~tie)):
                ing[key] += int(v.sum())
            bound = torch.maximum(bound, own)
            total = scores if total is None else total + scores
        mean = total / len(paths)
        top2 = mean.topk(2, dim=1).values
        near_tie = (top2[:, 0] - top2[:, 1]) <= 2 * bound
        direct = correct(mean, sp)
        differ = direct != ens[s]
        result[s] = {"direct_acc": percent(direct), "differ": int(differ.sum()), "near_ties": int(near_tie.sum()),
                     "differ_outside_ties": int((differ & ~near_tie).sum()), "ingredients": ing}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["setup", "run"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--ingredients", type=int, default=72)
    parser.add_argument("--images", type=int, default=1000, help="test split size (others in proportion)")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--mode", choices=["after", "in_ram", "before"], default="after")
    parser.add_argument("--rev", default="0df3e51", help="soupbench revision for --mode before")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.action == "setup":
        setup(args.dir, args.ingredients, args.images, args.size)
    else:
        print(json.dumps(run(args.dir, args.ingredients, args.mode, args.rev, args.check)))


if __name__ == "__main__":
    sys.exit(main())
