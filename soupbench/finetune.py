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
from torch.utils.data import DataLoader

from soupbench import faults
from soupbench.backbones import Classifier, has_batchnorm, set_batchnorm_eval
from soupbench.batches import batch_bounds, num_batches
from soupbench.data import Split
from soupbench.data.streaming import TrainImages, epoch_loader, eval_transform, train_transform
from soupbench.distributed import SINGLE, World, barrier
from soupbench.errors import ConfigError, DataError, DivergedError
from soupbench.guards import divergence_warning, require_finite_losses, require_finite_tensors, setting
from soupbench.io.atomic import save_torch
from soupbench.io.hashing import hash_settings
from soupbench.runtime import autocast, cosine_with_warmup, progress_bar
from soupbench.settings.choices import Augment, Distribution, ProbeInit, Search
from soupbench.sharding import fold_share, sharded_rows

log = logging.getLogger("soupbench")

# ---------------------------------------------------------------------------------------------- search space


def _draw(spec: Any, rng: random.Random, name: str) -> Any:
    if isinstance(spec, list | tuple):
        return rng.choice(list(spec))
    if isinstance(spec, Mapping) and len(spec) == 1:
        (kind, bounds), = spec.items()
        lo, hi = bounds
        if kind == Distribution.LOG_UNIFORM:
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        if kind == Distribution.UNIFORM:
            return rng.uniform(lo, hi)
        if kind == Distribution.INT_UNIFORM:
            return rng.randint(int(lo), int(hi))
        if kind == Distribution.UNIFORM_OR_ZERO:  # the model-soups search: label smoothing and mixup in half the runs
            return rng.uniform(lo, hi) if rng.random() < 0.5 else 0.0
        if kind == Distribution.RAND_AUGMENT:     # [max magnitude, max layers]: RandAugment in half the runs
            return f"rand-m{rng.randint(1, int(lo))}-n{rng.randint(0, int(hi))}" if rng.random() < 0.5 else "none"
    raise ConfigError(f"finetune.space.{name}: expected a list or one of {{log_uniform|uniform|int_uniform|"
                      f"uniform_or_zero|rand_augment: [low, high]}}, got {spec!r}")


def hyperparameter_configs(search: str, space: Mapping[str, Any], num_ingredients: int | None,
                           search_seed: int) -> list[dict[str, Any]]:
    """The ingredients' hyperparameters. Random search draws config i from its own seeded generator, so
    raising num_ingredients keeps the first ones (and their finished checkpoints) unchanged."""
    names = sorted(space)
    if search == Search.GRID:
        for n in names:
            if not isinstance(space[n], list | tuple):
                raise ConfigError(f"finetune.space.{n}: a grid search needs a list of values")
        configs = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(space[n] for n in names))]
        return configs[:num_ingredients] if num_ingredients else configs
    if search == Search.RANDOM:
        if not num_ingredients:
            raise ConfigError("finetune.num_ingredients must be set for a random search")
        return [{n: _draw(space[n], random.Random(f"{search_seed}-{i}-{n}"), n) for n in names}
                for i in range(num_ingredients)]
    raise ConfigError(f"finetune.search={search!r}: expected 'grid' or 'random'")


# ---------------------------------------------------------------------------------------------- linear probe


@torch.no_grad()
def probe_features(model: Classifier, train: Split, image_size: int, batch_size: int, device: torch.device,
                   workers: int = 0, progress: bool = False, precision: str = "auto", world: World = SINGLE
                   ) -> torch.Tensor:
    """The frozen encoder's features of every training image in one streaming pass, fp16 (N, D) on the CPU:
    1.28 M ImageNet images x 512 (ViT-B/32) are 1.3 GB, and the images are never all in memory. Under
    torch.distributed each rank encodes its `fold_share` of one process's batches (every rank builds the same
    encoder) and every rank gets all N rows, equal to one process's bit for bit (`sharding.sharded_rows`)."""
    model.eval()
    empty = torch.empty(0, model.feature_dim, dtype=torch.float16)
    return sharded_rows(world, len(train), batch_size, lambda rows: _features(
        model, train, rows, image_size, batch_size, device, workers, progress and world.main, precision), empty,
        fold_share, device)


def _features(model: Classifier, train: Split, rows: slice, image_size: int, batch_size: int, device: torch.device,
              workers: int, progress: bool, precision: str) -> torch.Tensor:
    """Features of images `rows` (whole batches of `batch_bounds`), batch by batch as one process cuts them."""
    batches = [list(range(a, b)) for a, b in batch_bounds(len(train), batch_size) if rows.start <= a < rows.stop]
    out = torch.empty(sum(map(len, batches)), model.feature_dim, dtype=torch.float16)
    if not batches:
        return out
    # a generator of its own, as epoch_loader's: a loader without one draws its seed from torch's global RNG
    loader = DataLoader(TrainImages(train, eval_transform(image_size), seed=0), batch_sampler=batches,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))
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
                 workers: int = 0, precision: str = "auto", world: World = SINGLE) -> dict[str, float]:
    """Fit `model.head` by L2-regularised logistic regression (full-batch L-BFGS) on frozen features.

    `init`: `zeros`, or `backbone` to start from the head the backbone built (CLIP's zero-shot head).
    max_iter=0 keeps the backbone's head as it is (no features are computed). Under torch.distributed the
    features are computed over the ranks (`probe_features`) and rank 0 alone fits the head, on the same rows as
    one process; every rank gets its statistics, and the caller sends rank 0's weights to the others."""
    if init not in (ProbeInit.ZEROS, ProbeInit.BACKBONE):
        raise ConfigError(f"finetune.linear_probe.init={init!r}: expected zeros or backbone")
    model.eval()
    if max_iter == 0:
        if init == ProbeInit.ZEROS:
            raise ConfigError("finetune.linear_probe.max_iter=0 keeps the backbone's head: set "
                              "finetune.linear_probe.init=backbone (e.g. CLIP's zero-shot head)")
        return {"lp_skipped": True}
    if len(train) == 0:
        raise ConfigError("the linear probe needs training images but the dataset has none (dataset.num_train=0?): "
                          "set finetune.linear_probe.max_iter=0 and init=backbone to start from the backbone's head")
    size = image_size or int(train.images.shape[-1])
    # held in a list the fit empties: the fp16 rows are freed once they are on the device as fp32
    feats = [probe_features(model, train, size, batch_size, device, workers, progress, precision, world)]
    return world.on_first(lambda: _fit_head(model.head, feats.pop().to(device).float(), train.labels.to(device),
                                            max_iter, weight_decay, init))


def _fit_head(head: torch.nn.Module, feats: torch.Tensor, labels: torch.Tensor, max_iter: int, weight_decay: float,
              init: str) -> dict[str, Any]:
    """The L-BFGS fit of `head` on `feats`, in place; its training loss, accuracy and warnings."""
    if init == ProbeInit.ZEROS:
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + 0.5 * weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    knob = (f"{setting('finetune.linear_probe.weight_decay', float(weight_decay))}, "
            f"{setting('finetune.linear_probe.max_iter', max_iter)}")
    with torch.no_grad():
        start_loss = F.cross_entropy(head(feats), labels).item()
    require_finite_tensors({"features": feats}, "the frozen encoder's", knob,
                           "the backbone's weights or the images are broken (check backbone.weights)")
    opt.step(closure)
    with torch.no_grad():
        logits = head(feats)
        loss = F.cross_entropy(logits, labels).item()
        acc = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    require_finite_losses([loss], "L-BFGS loss", "the linear probe", knob,
                          "raise finetune.linear_probe.weight_decay or lower max_iter")
    require_finite_tensors(dict(head.named_parameters()), "linear-probe head tensor", knob,
                           "raise finetune.linear_probe.weight_decay or lower max_iter")
    out = {"lp_train_loss": loss, "lp_train_acc": acc}
    if (warning := divergence_warning(start_loss, loss, "training loss", "the linear probe", knob)):
        out["warnings"] = [warning]
    return out


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
    # RandAugment's fill under augment=timm, read from the host (one device read per ingredient otherwise)
    mean = tuple((model.pixel_mean.flatten().cpu() / 255.0).tolist()) if hp.get("augment") == Augment.TIMM else None
    data = TrainImages(train, train_transform(str(hp.get("augment", Augment.NONE)), settings.image_size,
                                              hp.get("randaugment"), mean), seed)
    epochs = int(hp["epochs"])
    per_rank = math.ceil(len(train) / world.size)                # DistributedSampler pads every share to this
    if per_rank < 2 and not settings.freeze_bn and has_batchnorm(model):
        raise ConfigError(f"finetune.freeze_bn=false: {len(train)} training image(s) over {world.size} rank(s) "
                          "leave batches of one image, which BatchNorm in train mode cannot take; use more "
                          "images or finetune.freeze_bn=true")
    steps_per_epoch = num_batches(per_rank, local_batch)         # a remainder under half a batch is folded
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
    step, tail_sum, tail_n, first_loss_resumed = 0, torch.zeros((), device=device), 0, None
    if checkpoint is not None and checkpoint.is_file():
        step, tail_sum, tail_n, first_loss_resumed = _resume(checkpoint, model, opt, sched, device, total)
        log.info("%s: resuming from step %d of %d (%s)", desc, step, total, checkpoint.name)
    window = max(1, steps_per_epoch // 4)       # steps whose mean loss is the run's first / last loss
    tail_from = total - window
    bar = progress_bar(None, desc, progress and world.main, total=total, initial=step)
    loss_sum, last_logged = torch.zeros((), device=device), step
    # the step whose loss first stopped being finite (0: none) and the first step's loss, kept on the device and
    # read only at checkpoints and epoch ends (soupbench.guards): no extra synchronisation per step
    bad_step = torch.zeros((), dtype=torch.long, device=device)
    first_loss = torch.full((), float("nan") if step else 0.0, device=device) if first_loss_resumed is None \
        else torch.tensor(first_loss_resumed, device=device)
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
            faults.point("finetune.step")
            loss_sum += loss.detach()
            if step <= window:                  # the sum over the first window (its mean is compared with the tail's)
                first_loss = first_loss + loss.detach().float()
            bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss.detach()), step, bad_step)
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
                _require_finite(bad_step, model, hp, desc, total)
                _save_checkpoint(checkpoint, model, opt, sched, step, total, tail_sum, tail_n, world, first_loss)
        _require_finite(bad_step, model, hp, desc, total)
        if checkpoint is not None and step < total:
            _save_checkpoint(checkpoint, model, opt, sched, step, total, tail_sum, tail_n, world, first_loss)
            faults.point("finetune.checkpoint")
    bar.close()
    if net is not model:      # DDP's reducer hooks the parameters' gradients until it is freed: free it now, so
        del net               # that a later backward on this model (a learned soup) runs no all-reduce of its own
        gc.collect()
    model.eval()
    final = float(tail_sum) / max(1, tail_n)
    out: dict[str, Any] = {"final_train_loss": final, "steps": total}
    # the first and last windows' mean losses on this rank's images; with fewer than MIN_WINDOW_IMAGES images in
    # a window one batch's noise reads as divergence (tiny: 0.25 -> 0.89 over 16 images), so none is claimed
    first = float(first_loss) / min(window, total)
    if window * local_batch >= MIN_WINDOW_IMAGES and \
            (warning := divergence_warning(first, final, "training loss", desc, _lr_setting(hp))):
        out["warnings"] = [warning]
    return out


MIN_WINDOW_IMAGES = 128     # images a loss window needs before a rise counts as divergence (a warning, not a stop)


def _lr_setting(hp: Mapping[str, Any]) -> str:
    return f"finetune.space.lr (this ingredient: {setting('lr', float(hp['lr']))})"


def _require_finite(bad_step: torch.Tensor, model: Classifier, hp: Mapping[str, Any], desc: str, total: int) -> None:
    """Before any checkpoint or ingredient is written (soupbench.guards): a non-finite loss or weight stops the run
    with one line naming finetune.space.lr; the last checkpoint on disk stays the last finite one."""
    if (at := int(bad_step)) > 0:
        raise DivergedError(f"{_lr_setting(hp)}: the training loss became NaN or Inf at step {at} of {total} of "
                            f"{desc}; nothing saved: lower finetune.space.lr")
    require_finite_tensors(model.state_dict(), "weight", _lr_setting(hp),
                           f"nothing saved ({desc}): lower finetune.space.lr")

def _save_checkpoint(path: Path, model: Classifier, opt: torch.optim.Optimizer, sched: Any, step: int, total: int,
                     tail_sum: torch.Tensor, tail_n: int, world: World, first_loss: torch.Tensor | None = None) -> None:
    """Everything a resume needs, written atomically by rank 0; every rank waits for it."""
    if world.main:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "step": step, "total": total, "tail_sum": float(tail_sum), "tail_n": tail_n,
                 "first_loss": None if first_loss is None else float(first_loss),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        save_torch(path, state)
    barrier()


def _resume(path: Path, model: Classifier, opt: torch.optim.Optimizer, sched: Any, device: torch.device,
            total: int) -> tuple[int, torch.Tensor, int, float | None]:
    """Load the checkpoint into the model, optimizer and schedule; (step, tail loss sum, tail count, the first
    step's loss)."""
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
    return (int(state["step"]), torch.tensor(state["tail_sum"], device=device), int(state["tail_n"]),
            state.get("first_loss"))


def ingredient_id(index: int, hp: Mapping[str, Any], seed: int, fixed: Mapping[str, Any]) -> str:
    """Readable, stable id: the config's index and a hash of everything that shapes the ingredient."""
    return f"ft{index:03d}-{hash_settings({'hp': dict(hp), 'seed': seed, 'fixed': dict(fixed)})[:8]}"

