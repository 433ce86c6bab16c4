"""Streamed training throughput: images/s through soupbench's fine-tuning DataLoader for 0, 1 and 2 loader
workers, from JPEG files (large datasets) and from a decoded uint8 tensor (small ones), each alone (the loader)
and feeding the training step of a small CNN. Side by side in one run, so the
ratios hold on a noisy machine.

    python experiments/bench_streaming.py                    # 384 JPEGs of 320x240 -> 96 px
    python experiments/bench_streaming.py --images 4096 --size 224 --workers 0 2 4 8

Writes experiments/results/bench_streaming.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soupbench.data import Split  # noqa: E402
from soupbench.data.streaming import TrainImages, decoded, epoch_loader, train_transform  # noqa: E402


def make_jpegs(root: Path, n: int, classes: int = 10) -> Split:
    """n JPEGs of 320x240 (ImageNet's typical shape is ~400x350) with smooth random content."""
    rng = np.random.default_rng(0)
    files, labels = [], []
    for i in range(n):
        small = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((320, 240), Image.BILINEAR)
        path = root / f"{i % classes}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        files.append(path)
        labels.append(i % classes)
    return Split("train", None, torch.tensor(labels), files=files)


def throughput(split: Split, size: int, workers: int, batch: int, augment: str, randaug: str | None,
               step=None) -> float:
    data = TrainImages(split, train_transform(augment, size, randaug), seed=0)
    loader = epoch_loader(data, 0, 0, 1, batch, 0, workers, pin_memory=False)
    seen, t0 = 0, time.perf_counter()
    for x, y in loader:
        if step is not None:
            step(x, y)
        seen += len(x)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--augment", default="rrc_flip")
    p.add_argument("--randaugment", default="rand-m9-n2")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_streaming.json"))
    a = p.parse_args()
    from soupbench.backbones import Classifier

    # a small CNN: the step costs about what decoding a batch does, so the figure shows whether the loader's
    # workers overlap decoding with training (a real backbone on 2 CPU cores would hide the loader entirely)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, 1),
                                  torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = Classifier(encoder, 64, 10, [0.5] * 3, [0.25] * 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = make_jpegs(Path(tmp), a.images)
        in_memory = decoded(files, a.size)
        for source, split in (("jpeg files", files), ("decoded tensor", in_memory)):
            for w in a.workers:
                rows.append({"source": source, "workers": w,
                             "loader_img_s": throughput(split, a.size, w, a.batch, a.augment, a.randaugment),
                             "train_img_s": throughput(split, a.size, w, a.batch, a.augment, a.randaugment,
                                                       train_step)})
                r = rows[-1]
                print(f"{source:15s} workers={w}  loader {r['loader_img_s']:7.1f} img/s   "
                      f"loader + CNN step {r['train_img_s']:6.1f} img/s", flush=True)
    result = {"settings": vars(a), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "python": platform.python_version(), "torch": torch.__version__, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
