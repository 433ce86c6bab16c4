"""Fine-tuning one ingredient (the FT of LP-FT): the whole network from the shared start (the linear probe,
soupbench.linear_probe) with one hyperparameter configuration (soupbench.search_space), resumable from its
checkpoint, on every rank of a torch.distributed job (DDP)."""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from soupbench import faults
from soupbench.backbones import Classifier, has_batchnorm, set_batchnorm_eval
from soupbench.batches import num_batches
from soupbench.data import Split
from soupbench.data.streaming import TrainImages, epoch_loader, train_transform
from soupbench.distributed import World, barrier
from soupbench.errors import ConfigError, DataError, DivergedError
from soupbench.guards import divergence_warning, require_finite_tensors, setting
from soupbench.io.atomic import save_torch
from soupbench.runtime import autocast, cosine_with_warmup, progress_bar
from soupbench.settings.choices import Augment

log = logging.getLogger("soupbench")


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


