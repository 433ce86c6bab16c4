"""LP-FT: fit a linear head on frozen features once (the linear probe), then fine-tune the whole network
from that shared start with each hyperparameter configuration (the ingredients)."""

from __future__ import annotations

import gc
import itertools
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from soupbench.backbones import Classifier, set_batchnorm_eval
from soupbench.data import Split
from soupbench.data.streaming import TrainImages, epoch_loader, eval_transform, train_transform
from soupbench.distributed import World, barrier
from soupbench.errors import ConfigError, DataError
from soupbench.io import atomic_path, hash_settings
from soupbench.runtime import autocast, cosine_with_warmup, progress_bar

log = logging.getLogger("soupbench")

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
        if kind == "uniform_or_zero":         # the model-soups search: label smoothing and mixup in half the runs
            return rng.uniform(lo, hi) if rng.random() < 0.5 else 0.0
        if kind == "rand_augment":            # [max magnitude, max layers]: RandAugment in half the runs
            return f"rand-m{rng.randint(1, int(lo))}-n{rng.randint(0, int(hi))}" if rng.random() < 0.5 else "none"
    raise ConfigError(f"finetune.space.{name}: expected a list or one of {{log_uniform|uniform|int_uniform|"
                      f"uniform_or_zero|rand_augment: [low, high]}}, got {spec!r}")


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


@torch.no_grad()
def probe_features(model: Classifier, train: Split, image_size: int, batch_size: int, device: torch.device,
                   workers: int = 0, progress: bool = False, precision: str = "auto") -> torch.Tensor:
    """The frozen encoder's features of every training image in one streaming pass, fp16 (N, D) on the CPU:
    1.28 M ImageNet images x 512 (ViT-B/32) are 1.3 GB, and the images are never all in memory."""
    model.eval()
    data = TrainImages(train, eval_transform(image_size), seed=0)
    loader = epoch_loader(data, 0, 0, 1, batch_size, 0, workers, device.type == "cuda", shuffle=False)
    out = torch.empty(len(train), model.feature_dim, dtype=torch.float16)
    i = 0
    for x, _ in progress_bar(loader, "LP features", progress):
        with autocast(device, precision, "finetune.precision"):
            f = model.features(x.to(device, non_blocking=True))
        out[i:i + len(f)].copy_(f.to(torch.float16), non_blocking=True)
        i += len(f)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def linear_probe(model: Classifier, train: Split, max_iter: int, weight_decay: float, batch_size: int,
                 device: torch.device, progress: bool = False, init: str = "zeros", image_size: int | None = None,
                 workers: int = 0, precision: str = "auto") -> dict[str, float]:
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
    size = image_size or int(train.images.shape[-1])
    feats = probe_features(model, train, size, batch_size, device, workers, progress, precision).to(device).float()
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


# ---------------------------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class TrainSettings:
    """What every ingredient of a grid shares (finetune.* and dataset.image_size); `hp` varies per ingredient.
    `batch_size` is the global batch: each of N ranks takes batch_size / N."""

    batch_size: int
    warmup_frac: float
    max_grad_norm: float | None
    freeze_bn: bool
    image_size: int
    warmup_steps: int | None = None         # overrides warmup_frac (the model-soups recipe: 500 steps)
    workers: int = 0                        # DataLoader worker processes per rank
    checkpoint_every: int | None = None     # steps between checkpoints (besides one per epoch); None: epochs only
    log_every: int = 50                     # steps between progress updates (the only host-device syncs)
    precision: str = "auto"                 # training forward passes: auto (bf16 autocast on CUDA) | bf16 | fp32


def _mixup(alpha: float, smoothing: float, num_classes: int):
    from timm.data import Mixup

    return Mixup(mixup_alpha=alpha, cutmix_alpha=0.0, label_smoothing=smoothing, num_classes=num_classes)


def finetune(model: Classifier, start: Mapping[str, torch.Tensor], train: Split, hp: Mapping[str, Any],
             seed: int, settings: TrainSettings, device: torch.device, progress: bool = False,
             desc: str = "fine-tune", checkpoint: Path | None = None, world: World | None = None) -> dict[str, Any]:
    """Fine-tune every parameter from `start` with AdamW and a cosine schedule, on one device or, inside a
    torch.distributed process group (`world`), on every rank with DistributedDataParallel.

    `hp`: lr, weight_decay, epochs, and optionally label_smoothing, augment, randaugment (timm string), mixup
    (alpha). `checkpoint`: a file that rank 0 rewrites atomically after every epoch (and every
    `checkpoint_every` steps); a rerun resumes from it and gives the ingredient an uninterrupted run gives.
    Returns the mean training loss of the last quarter epoch and the number of steps."""
    world = world or World()
    torch.manual_seed(seed)
    model.load_state_dict(start)
    model.train()
    if settings.freeze_bn:
        set_batchnorm_eval(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))
    if settings.batch_size % world.size:
        raise ConfigError(f"finetune.batch_size={settings.batch_size} does not divide over {world.size} ranks")
    local_batch = settings.batch_size // world.size
    mean = tuple((model.pixel_mean.flatten() / 255.0).tolist())        # RandAugment's fill under augment=timm
    data = TrainImages(train, train_transform(str(hp.get("augment", "none")), settings.image_size,
                                              hp.get("randaugment"), mean), seed)
    epochs = int(hp["epochs"])
    steps_per_epoch = math.ceil(math.ceil(len(train) / world.size) / local_batch)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, settings.warmup_frac,
                                                                      settings.warmup_steps))
    smoothing = float(hp.get("label_smoothing", 0.0))
    mix = float(hp.get("mixup", 0.0))
    mixup = _mixup(mix, smoothing, model.num_classes) if mix > 0 else None
    net = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step, tail_sum, tail_n = 0, torch.zeros((), device=device), 0
    if checkpoint is not None and checkpoint.is_file():
        step, tail_sum, tail_n = _resume(checkpoint, model, opt, sched, device, total)
        log.info("%s: resuming from step %d of %d (%s)", desc, step, total, checkpoint.name)
    tail_from = total - max(1, steps_per_epoch // 4)
    bar = progress_bar(None, desc, progress and world.main, total=total, initial=step)
    loss_sum, last_logged = torch.zeros((), device=device), step
    bad = torch.zeros((), dtype=torch.bool, device=device)      # any non-finite loss: checked once per epoch
    for epoch in range(step // steps_per_epoch, epochs):
        loader = epoch_loader(data, epoch, world.rank, world.size, local_batch, seed, settings.workers,
                              device.type == "cuda", skip_batches=step - epoch * steps_per_epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup is not None:
                np.random.seed((seed * 7919 + step) % 2**32)      # mixup's λ: the same after a resume
                x, target = mixup(x.float(), y)
            else:
                target = y
            with autocast(device, settings.precision, "finetune.precision"):
                out = net(x).float()
            loss = (torch.sum(-target * F.log_softmax(out, dim=-1), dim=-1).mean() if mixup is not None
                    else F.cross_entropy(out, target, label_smoothing=smoothing))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss.detach()
            bad |= ~torch.isfinite(loss.detach())
            if step > tail_from:
                tail_sum += loss.detach()
                tail_n += 1
            if step - last_logged >= settings.log_every or step == total:
                bar.update(step - last_logged)
                bar.set_postfix(loss=f"{loss_sum.item() / (step - last_logged):.3f}")   # one sync per log_every
                loss_sum.zero_()
                last_logged = step
            if checkpoint is not None and settings.checkpoint_every and step % settings.checkpoint_every == 0 \
                    and step % steps_per_epoch:
                _save_checkpoint(checkpoint, model, opt, sched, step, total, tail_sum, tail_n, world)
        if bad.item():
            raise ConfigError(f"{desc}: the training loss became NaN/Inf (lr={hp['lr']}); lower finetune.space.lr")
        if checkpoint is not None and step < total:
            _save_checkpoint(checkpoint, model, opt, sched, step, total, tail_sum, tail_n, world)
    bar.close()
    if net is not model:      # DDP's reducer hooks the parameters' gradients until it is freed: free it now, so
        del net               # that a later backward on this model (a learned soup) runs no all-reduce of its own
        gc.collect()
    model.eval()
    return {"final_train_loss": float(tail_sum) / max(1, tail_n), "steps": total}


def _save_checkpoint(path: Path, model: Classifier, opt: torch.optim.Optimizer, sched: Any, step: int, total: int,
                     tail_sum: torch.Tensor, tail_n: int, world: World) -> None:
    """Everything a resume needs, written atomically by rank 0; every rank waits for it."""
    if world.main:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "step": step, "total": total, "tail_sum": float(tail_sum), "tail_n": tail_n,
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    barrier()


def _resume(path: Path, model: Classifier, opt: torch.optim.Optimizer, sched: Any, device: torch.device,
            total: int) -> tuple[int, torch.Tensor, int]:
    """Load the checkpoint into the model, optimizer and schedule; (step, tail loss sum, tail count)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise DataError(f"{path}: unreadable fine-tuning checkpoint ({e}); delete it to start the ingredient "
                        "again") from e
    if state.get("total") != total:
        raise DataError(f"{path}: a checkpoint of a run with {state.get('total')} steps, this one has {total} "
                        "(another batch size or number of ranks); delete it to start the ingredient again")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), torch.tensor(state["tail_sum"], device=device), int(state["tail_n"])


def ingredient_id(index: int, hp: Mapping[str, Any], seed: int, fixed: Mapping[str, Any]) -> str:
    """Readable, stable id: the config's index and a hash of everything that shapes the ingredient."""
    return f"ft{index:03d}-{hash_settings({'hp': dict(hp), 'seed': seed, 'fixed': dict(fixed)})[:8]}"

