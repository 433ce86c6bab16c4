"""LP-FT: fit a linear head on frozen features once (the linear probe), then fine-tune the whole network
from that shared start with each hyperparameter configuration (the ingredients)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from soupbench.backbones import Classifier, set_batchnorm_eval
from soupbench.data import Split
from soupbench.errors import ConfigError
from soupbench.evaluate import predict
from soupbench.io import hash_settings
from soupbench.runtime import autocast, cosine_with_warmup

# ---------------------------------------------------------------------------------------------- search space


def _draw(spec: Any, rng: random.Random, name: str) -> Any:
    if isinstance(spec, list | tuple):
        return rng.choice(list(spec))
    if isinstance(spec, Mapping) and len(spec) == 1:
        (kind, bounds), = spec.items()
        lo, hi = bounds
        if kind == "log_uniform":
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        if kind == "uniform":
            return rng.uniform(lo, hi)
        if kind == "int_uniform":
            return rng.randint(int(lo), int(hi))
    raise ConfigError(f"finetune.space.{name}: expected a list or one of {{log_uniform|uniform|int_uniform: "
                      f"[low, high]}}, got {spec!r}")


def hyperparameter_configs(search: str, space: Mapping[str, Any], num_ingredients: int | None,
                           search_seed: int) -> list[dict[str, Any]]:
    """The ingredients' hyperparameters. Random search draws config i from its own seeded generator, so
    raising num_ingredients keeps the first ones (and their finished checkpoints) unchanged."""
    names = sorted(space)
    if search == "grid":
        for n in names:
            if not isinstance(space[n], list | tuple):
                raise ConfigError(f"finetune.space.{n}: a grid search needs a list of values")
        configs = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(space[n] for n in names))]
        return configs[:num_ingredients] if num_ingredients else configs
    if search == "random":
        if not num_ingredients:
            raise ConfigError("finetune.num_ingredients must be set for a random search")
        return [{n: _draw(space[n], random.Random(f"{search_seed}-{i}-{n}"), n) for n in names}
                for i in range(num_ingredients)]
    raise ConfigError(f"finetune.search={search!r}: expected 'grid' or 'random'")


# ---------------------------------------------------------------------------------------------- linear probe


def linear_probe(model: Classifier, train: Split, max_iter: int, weight_decay: float, batch_size: int,
                 device: torch.device, progress: bool = False, init: str = "zeros") -> dict[str, float]:
    """Fit `model.head` by L2-regularised logistic regression (full-batch L-BFGS) on frozen features.

    `init`: `zeros`, or `backbone` to start from the head the backbone built (CLIP's zero-shot head).
    max_iter=0 keeps the backbone's head as it is (no features are computed)."""
    if init not in ("zeros", "backbone"):
        raise ConfigError(f"finetune.linear_probe.init={init!r}: expected zeros or backbone")
    model.eval()
    if max_iter == 0:
        if init == "zeros":
            raise ConfigError("finetune.linear_probe.max_iter=0 keeps the backbone's head: set "
                              "finetune.linear_probe.init=backbone (e.g. CLIP's zero-shot head)")
        return {"lp_skipped": True}
    if len(train) == 0:
        raise ConfigError("the linear probe needs training images but the dataset has none (dataset.num_train=0?): "
                          "set finetune.linear_probe.max_iter=0 and init=backbone to start from the backbone's head")
    feats = predict(_FeatureView(model), train.images, batch_size, device, desc="LP features",
                    progress=progress).to(device)
    labels = train.labels.to(device)
    head = model.head
    if init == "zeros":
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + 0.5 * weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = head(feats)
        loss = F.cross_entropy(logits, labels).item()
        acc = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    return {"lp_train_loss": loss, "lp_train_acc": acc}


class _FeatureView(torch.nn.Module):
    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


# ---------------------------------------------------------------------------------------------- fine-tuning


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Batch augmentation on uint8 images: `none`, `crop` (pad 1/8 and random-crop back), `crop_flip`."""
    if mode == "none":
        return x
    if mode not in ("crop", "crop_flip"):
        raise ConfigError(f"augment={mode!r}: expected none, crop or crop_flip")
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if mode == "crop_flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def finetune(model: Classifier, start: Mapping[str, torch.Tensor], train: Split, hp: Mapping[str, Any],
             seed: int, batch_size: int, warmup_frac: float, max_grad_norm: float | None, freeze_bn: bool,
             device: torch.device, progress: bool = False, desc: str = "fine-tune") -> dict[str, Any]:
    """Fine-tune every parameter from `start` with AdamW + cosine schedule; returns the final train loss."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.load_state_dict(start)
    model.train()
    if freeze_bn:
        set_batchnorm_eval(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * int(hp["epochs"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, warmup_frac))
    smoothing = float(hp.get("label_smoothing", 0.0))
    mode = str(hp.get("augment", "none"))
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    for _ in range(int(hp["epochs"])):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch_size):
            idx = perm[i:i + batch_size]
            x = augment(train.images[idx], mode, gen).to(device, non_blocking=True)
            y = train.labels[idx].to(device, non_blocking=True)
            with autocast(device):
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    if not all(math.isfinite(v) for v in losses):
        raise ConfigError(f"{desc}: the training loss became NaN/Inf (lr={hp['lr']}); lower finetune.space.lr")
    tail = losses[-max(1, steps_per_epoch // 4):]
    return {"final_train_loss": sum(tail) / len(tail), "steps": total}


def ingredient_id(index: int, hp: Mapping[str, Any], seed: int, fixed: Mapping[str, Any]) -> str:
    """Readable, stable id: the config's index and a hash of everything that shapes the ingredient."""
    return f"ft{index:03d}-{hash_settings({'hp': dict(hp), 'seed': seed, 'fixed': dict(fixed)})[:8]}"

