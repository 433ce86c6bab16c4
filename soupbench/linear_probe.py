"""The linear probe of LP-FT: a linear head fitted on the frozen backbone's features (L-BFGS on the full batch of
training features), the shared start every ingredient fine-tunes from. Features are encoded over the ranks of a
torch.distributed job, each its share of whole batches; the head is fitted once."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from soupbench.backbones import Classifier
from soupbench.batches import batch_bounds
from soupbench.data import Split
from soupbench.data.streaming import TrainImages, eval_transform
from soupbench.distributed import SINGLE, World
from soupbench.errors import ConfigError
from soupbench.guards import divergence_warning, require_finite_losses, require_finite_tensors, setting
from soupbench.runtime import autocast, progress_bar
from soupbench.settings.choices import ProbeInit
from soupbench.sharding import fold_share, sharded_rows


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
