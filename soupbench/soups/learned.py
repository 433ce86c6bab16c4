"""Learned soups as one engine: learned soup(+), HL-Soup(+) and MEHL-Soup(+) are settings of `build`.

    θ_l = c_l + Σ_i w_{i,l} d_{i,l}

- parameterisation `simplex` (learned soup): c = 0, d_i = θ_i, w = softmax(β / T) over the models.
  `affine` (HL-Soup): d_i = θ_i − c, unit-normalised per coefficient group, w = α unconstrained, so the soup
  may extrapolate beyond the ingredients.
- granularity `model`: one coefficient per model; `layer` (the "+" variants): one per (model, group of
  consecutive tensors), a group closing once it holds more than `layer_size` parameters (0: one per tensor).
  Directions are normalised over the same groups, so a model-wise soup stays on the hyperplane spanned by
  the task vectors (one α moves every tensor of τ_i by the same factor).
- block_size b: b = K (null) learns all models at once; b < K is MEHL-Soup's block coordinate descent: the
  models are shuffled (`shuffle_models`), cut into blocks of b, each block's coefficients learned around the
  current soup, folded in, and freed; `num_passes` passes over the models ("model epochs").

Why it fits in memory: ∂L/∂w_{i,l} = <∇_{θ_l} L(θ), d_{i,l}>. One forward/backward of the single soup gives
∇θL; the coefficients' gradients are one GEMV per tensor against the block's stacked directions, pushed
through the (tiny) softmax/identity graph of the coefficients. No graph through K models is ever built, and
only the current block's directions are in memory. After every block the soup, the coefficients and the
settings are saved, so a killed run resumes from its last finished block.

Official-code details each kept as a setting: MEHL-Soup clips the model gradient ∇θL to norm 1 before
projecting it (`clip: model`); model-soups' learned soup+ learns a logit scale jointly with the mixing
weights (`logit_scale: learned`) at a constant lr (`schedule: constant`) without clipping.

Across GPUs (`distributed: auto` with an initialised torch.distributed group of W > 1 processes), for blocks
of directions that do not fit one device, as MEHL_soup_layer.py does: each rank loads only its contiguous
share of the block's models (`World.share`, the official `parts`); the soup θ = c + Σ_i w_i d_i is the
all-reduced sum of every rank's partial Σ over its own directions, and each rank projects ∇θL onto its own
directions. W ranks give one process's coefficients and soup bit for bit (tested with gloo on the CPU, at one
thread per process), which takes three departures from the official code. Any float noise matters: Adam
divides each coefficient's step by its gradient's running RMS, so a near-zero gradient's sign noise moves a
coefficient by up to lr; on the tiny preset's learned_plus the split batch alone, or float32 ∂L/∂w alone, made
two ranks' coefficients differ from one process's by up to 6.7e-5.
(1) Every rank runs the soup on the whole held-out batch, where the official code splits it with DDP over a
DistributedSampler: the shards' summed gradients differ from the whole batch's in float order. So by default
the forward/backward is not split over the ranks (the validation batches are, whole batches per rank);
`batch_pieces: P` cuts every batch into P pieces spread over the ranks, their gradients added in float64
(P >= W splits the forward/backward as DDP does): the coefficients then depend on P, never on W.
(2) Every float sum whose terms the ranks split is taken in float64 and rounded once, in one process too:
∂L/∂w (a row of a float32 GEMV depends on the rows beside it), the soup (float32 alone: 6.6e-7), the block's
mean and the directions' norms. A product of two float32 numbers is exact in float64, so the rounded value
does not depend on the split barring a tie at float64 precision.
(3) Every rank keeps all of the block's coefficients and their optimiser, assembling the rows of ∂L/∂w from
the ranks (`World.rows`, a few numbers per model) where the official code keeps only its own rows: the
softmax of learned soup(+) spans all models, and clipping ∂L/∂α needs them all.
Only rank 0 writes the progress files; it reads them on resume and sends the state to the others.

Buffers (BatchNorm running statistics) are not learned: they come from the centre (affine) or the uniform
mean of the block (simplex); re-estimate them on training data with `bn_recalibration` where they matter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from soupbench import faults
from soupbench.batches import batch_bounds
from soupbench.distributed import SINGLE, World, resolve_ranks
from soupbench.errors import ConfigError
from soupbench.guards import divergence_warning, require_finite_losses, require_finite_tensors, setting
from soupbench.io import hash_settings, load_weights, reusable_meta, save_weights, to_device, write_json
from soupbench.rowfile import in_memory
from soupbench.runtime import autocast, like_model, lr_schedule
from soupbench.soups.averaging import is_averaged
from soupbench.soups.context import SoupContext, SoupResult


def learnable_names(model: torch.nn.Module) -> list[str]:
    """The tensors that get coefficients: the model's floating-point parameters, in module order."""
    return [n for n, p in model.named_parameters() if p.is_floating_point()]


def coefficient_groups(numels: list[int], granularity: str, layer_size: int = 0) -> list[int]:
    """Group index of every learnable tensor. `model`: one group. `layer`: consecutive tensors share a group
    until it holds more than `layer_size` parameters (the MEHL-Soup code's rule; 0 gives one per tensor)."""
    if granularity == "model":
        return [0] * len(numels)
    if granularity != "layer":
        raise ConfigError(f"granularity={granularity!r}: expected model or layer")
    if layer_size < 0:
        raise ConfigError(f"layer_size={layer_size}: expected >= 0")
    out, g, acc = [], 0, 0
    for i, n in enumerate(numels):
        if i > 0 and acc > layer_size:
            g, acc = g + 1, 0
        acc += n
        out.append(g)
    return out


def combine(centre: Mapping[str, torch.Tensor] | None, directions: Mapping[str, torch.Tensor],
            weights: torch.Tensor, names: list[str], ranks: World = SINGLE) -> dict[str, torch.Tensor]:
    """θ_l = c_l + w[:, l] @ D_l for every learnable tensor (D_l: (b, *shape)), summed in float64 and rounded
    once to D_l's dtype. A product of two float32 numbers is exact in float64, so the rounded soup is the same
    however the rows are split (over ranks, or into chunks) barring a tie at float64 precision: W ranks build
    one process's soup bit for bit. Across ranks each holds some rows of D and w; its float64 partial sums are
    all-reduced (all tensors at once), then c is added. Transient memory in one process: one float64 copy of a
    tensor, or of a 4M-element chunk; across ranks the float64 partial sums of every tensor, launched together."""
    out = {}
    partial: dict[str, torch.Tensor] = {}
    for j, n in enumerate(names):
        partial[n] = _weighted_rows64(directions[n].flatten(1), weights[:, j])
        if not ranks.distributed:            # one process: each float64 copy lives only while its tensor is built
            out[n] = _finish(partial.pop(n), centre, directions, n)
    if partial:                              # several ranks: one all-reduce launch for every tensor, then one wait
        ranks.sum_(partial.values())
        out = {n: _finish(acc, centre, directions, n) for n, acc in partial.items()}
    return out


def _finish(acc: torch.Tensor, centre: Mapping[str, torch.Tensor] | None, directions: Mapping[str, torch.Tensor],
            n: str) -> torch.Tensor:
    """The float64 sum of tensor `n` plus its centre, rounded once to the directions' dtype and shape."""
    if centre is not None:
        acc.add_(centre[n].flatten())
    d = directions[n]
    return acc.to(d.dtype).view(d.shape[1:])


CHUNK_ELEMENTS = 1 << 22    # float64 working copies of directions are made this many elements (or a row) at a time


def _row_chunks(rows: torch.Tensor) -> list[slice]:
    """Slices of the rows of a 2-D tensor, each about CHUNK_ELEMENTS elements (at least one row)."""
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    return [slice(i, i + step) for i in range(0, rows.shape[0], step)]


def _weighted_rows64(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i rows_i in float64 (rows: (r, n)); zeros for r = 0 (a rank without models in the block)."""
    acc = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    w64 = w.to(device=rows.device, dtype=torch.float64)
    for c in _row_chunks(rows):
        acc.addmv_(rows[c].t().double(), w64[c])
    return acc


def _project_rows64(rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """<rows_i, v> in float64 for every row (rows: (r, n), v: (n,)): a row's dot product does not depend on
    which other rows are projected with it, up to float64 rounding."""
    v64 = v.flatten().double()
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=rows.device)
    return torch.cat([rows[c].double() @ v64 for c in _row_chunks(rows)])


def coefficient_gradient(model: torch.nn.Module, centre: Mapping[str, torch.Tensor] | None,
                         directions: Mapping[str, torch.Tensor], weights: torch.Tensor, names: list[str],
                         buffers: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                         precision: str = "auto", clip_model_grad: float | None = None,
                         logit_scale: torch.Tensor | None = None, ranks: World = SINGLE, pieces: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss, G = ∂L/∂w (b × L) and ∂L/∂(logit scale) from one forward/backward of the single soup model.

    `clip_model_grad` rescales ∇θL to at most that global norm before it is projected (MEHL-Soup's
    clip_grad_norm_ on the model); the factor is applied to the projections, which is the same by linearity
    and costs no second pass. The soup's tensors are fresh leaves, not views of one flat vector (taking the
    gradient through views of one flat vector was 3x slower per step on a ViT-B/32). The projections are
    float64 dot products rounded once to the directions' dtype, so a row of G does not depend on the other rows.

    Across ranks `directions` and `weights` are this rank's rows: the soup is all-reduced, every rank runs the
    whole batch (x, y) on it, which gives every rank one process's loss and ∇θL, and projects ∇θL onto its own
    directions: G holds this rank's rows. `pieces` > 1 cuts the batch into that many pieces, spread over the
    ranks (`_pieces_gradient`): the same loss and ∇θL for any number of ranks, the forward/backward split."""
    with torch.no_grad():
        theta = {n: t.requires_grad_(True)
                 for n, t in like_model(model, combine(centre, directions, weights, names, ranks)).items()}
    leaves = [theta[n] for n in names] + ([logit_scale] if logit_scale is not None else [])
    if pieces > 1:
        loss, grads = _pieces_gradient(model, buffers, theta, leaves, x, y, precision, logit_scale, pieces, ranks)
    else:
        loss, grads = _model_gradient(model, buffers, theta, leaves, x, y, precision, logit_scale)
    scale_grad = grads[-1] if logit_scale is not None else None
    grads = grads[:len(names)]
    g = torch.stack([_project_rows64(directions[n].flatten(1), gr) for n, gr in zip(names, grads, strict=True)],
                    dim=1)
    if clip_model_grad:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(gr.float()) for gr in grads]))
        g = g * (clip_model_grad / (total + 1e-6)).clamp(max=1.0).to(g.dtype)   # torch's clip_grad_norm_ rule
    return loss, g.to(directions[names[0]].dtype), scale_grad


def _model_gradient(model: torch.nn.Module, buffers: Mapping[str, torch.Tensor], theta: dict[str, torch.Tensor],
                    leaves: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, precision: str,
                    logit_scale: torch.Tensor | None, batch_total: int | None = None) -> tuple[torch.Tensor, list]:
    """(loss, ∂loss/∂leaves) of the soup on (x, y): the mean cross-entropy, or with `batch_total` the sum over
    (x, y) / batch_total (a piece of a batch of that many images)."""
    with autocast(x.device, precision):
        logits = functional_call(model, {**buffers, **theta}, (x,), strict=False)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    if logit_scale is not None:
        logits = logits * logit_scale
    if batch_total is None:
        loss = F.cross_entropy(logits, y)
    else:
        loss = F.cross_entropy(logits, y, reduction="sum") / batch_total
    grads = [g.contiguous() for g in torch.autograd.grad(loss, leaves)]
    return loss.detach(), grads


def _pieces_gradient(model: torch.nn.Module, buffers: Mapping[str, torch.Tensor], theta: dict[str, torch.Tensor],
                     leaves: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, precision: str,
                     logit_scale: torch.Tensor | None, pieces: int, ranks: World) -> tuple[torch.Tensor, list]:
    """(loss, ∂loss/∂leaves) of the whole batch from `pieces` contiguous pieces of it, cut the same way for any
    number of ranks: each rank runs its share of the pieces, and their losses and gradients are added up in
    float64 over the pieces and the ranks, then rounded once. A piece's gradient does not depend on which rank
    runs it, so the result depends on `pieces`, never on the ranks (barring a tie at float64 precision)."""
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    acc = [torch.zeros(t.shape, dtype=torch.float64, device=t.device) for t in leaves]
    for j in range(pieces)[ranks.share(pieces)]:
        part = World(j, pieces).share(len(y))
        if part.stop == part.start:                  # fewer images than pieces
            continue
        piece_loss, grads = _model_gradient(model, buffers, theta, leaves, x[part], y[part], precision, logit_scale,
                                            len(y))
        loss += piece_loss
        for a, g in zip(acc, grads, strict=True):
            a.add_(g)
    ranks.sum_([loss, *acc])
    return loss.to(leaves[0].dtype), [a.to(t.dtype) for a, t in zip(acc, leaves, strict=True)]


def coefficient_weights(param: torch.Tensor, parameterisation: str, group_of: torch.Tensor | int,
                        temperature: float) -> torch.Tensor:
    """Learned parameters (b × G) -> mixing weights (b × L): identity (affine) or softmax over models (simplex),
    each tensor taking its group's coefficient. `group_of` is the group index per tensor (an int L means
    one group per tensor when param is 2-D, or one per model when param is 1-D)."""
    if isinstance(group_of, int):
        w = param if param.ndim == 2 else param[:, None].expand(-1, group_of)
    else:
        w = (param if param.ndim == 2 else param[:, None])[:, group_of]
    return torch.softmax(w / temperature, dim=0) if parameterisation == "simplex" else w


def inner_step(model: torch.nn.Module, param: torch.Tensor, opt: torch.optim.Optimizer,
               centre: Mapping[str, torch.Tensor] | None, directions: Mapping[str, torch.Tensor], names: list[str],
               buffers: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, parameterisation: str,
               temperature: float, max_grad_norm: float | None, clip: str = "model", precision: str = "auto",
               group_of: torch.Tensor | int | None = None, logit_scale: torch.Tensor | None = None,
               coef_l2: float = 0.0, ranks: World = SINGLE, pieces: int = 1) -> torch.Tensor:
    """One optimiser step on the block's coefficients (and the logit scale, when learned): what the benchmark
    times. `coef_l2` adds λ·Σ param² to the loss, pulling the coefficients toward 0: the centre (affine) or the
    uniform soup (simplex). Returns the loss on the device, so the caller decides when to synchronise.

    Across ranks every rank holds all of the block's coefficients and steps them identically: only the rows
    of ∂L/∂w for its own directions are computed here, and the full b × L is assembled from every rank's rows
    (zeros plus one value per slot: exact). The softmax over all models (simplex), the clipping of ∂L/∂α and
    AdamW then see exactly what one process sees."""
    w = coefficient_weights(param, parameterisation, len(names) if group_of is None else group_of, temperature)
    mine = ranks.share(len(param))
    loss, g, scale_grad = coefficient_gradient(model, centre, directions, w.detach()[mine], names, buffers, x, y,
                                               precision, max_grad_norm if clip == "model" else None, logit_scale,
                                               ranks, pieces)
    g = ranks.rows(g, len(param))
    opt.zero_grad(set_to_none=True)
    w.backward(g.to(w.dtype))
    if logit_scale is not None:
        logit_scale.grad = scale_grad
    if coef_l2:
        param.grad.add_(param.detach(), alpha=2.0 * coef_l2)
    if max_grad_norm and clip == "coefficients":
        torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
    opt.step()
    return loss


@torch.no_grad()
def validation_loss(model: torch.nn.Module, centre: Mapping[str, torch.Tensor] | None,
                    directions: Mapping[str, torch.Tensor], weights: torch.Tensor, names: list[str],
                    buffers: Mapping[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                    precision: str, logit_scale: torch.Tensor | None, ranks: World = SINGLE) -> float:
    """Mean cross-entropy of the soup with these weights on the engine's internal validation images. The images
    are cut into batches of `batch_size` whatever the number of ranks, and each rank scores its share of the
    batches (across ranks `directions` and `weights` are this rank's rows). The batches' float32 sums of losses
    add up exactly in float64 while they lie within a factor 2^29 of each other, so W ranks give one process's
    value bit for bit."""
    theta = like_model(model, {**buffers, **combine(centre, directions, weights, names, ranks)})
    dev = next(iter(theta.values())).device
    starts = range(0, len(labels), batch_size)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for i in starts[ranks.share(len(starts))]:
        x, y = images[i:i + batch_size].to(dev), labels[i:i + batch_size].to(dev)
        with autocast(dev, precision):
            logits = functional_call(model, theta, (x,), strict=False).float()
        if logit_scale is not None:
            logits = logits * logit_scale
        total += F.cross_entropy(logits, y, reduction="sum").double()
    ranks.sum_([total])
    return total.item() / max(1, len(labels))


MODEL_ORDERS = ("torch", "mehl_official")
# MEHL-Soup utils.py get_datasets draws `np.random.permutation(len(train_dataset))` of ImageNet train right after
# set_seed, before MEHL_soup_layer.py shuffles the models: the official blocks depend on that draw too
MEHL_OFFICIAL_FIRST_DRAW = 1_281_167


def block_order(num_models: int, block_size: int, num_passes: int, shuffle: bool, seed: int,
                model_order: str = "torch") -> list[list[int]]:
    """Blocks of ingredient indices, pass after pass; each pass reshuffles the models (MEHL-Soup shuffles
    before cutting blocks), so the blocks do not depend on file order. `model_order`: `torch` (soupbench's
    default: `torch.randperm` from a generator seeded by `seed`) or `mehl_official`, the official code's numpy
    stream (MEHL_soup_layer.py: `set_seed(seed)`, then utils.py's permutation of the 1,281,167 ImageNet train
    images, then `np.random.shuffle(models)` of [0..K) once per pass, on the list the last pass left): with
    run.sh's seed 1 and 72 models, the blocks [70, 21, 45, 19, ...]. The global numpy state is left as it was."""
    if model_order not in MODEL_ORDERS:
        raise ConfigError(f"model_order={model_order!r}: expected one of {list(MODEL_ORDERS)}")
    blocks = []
    if model_order == "mehl_official" and shuffle:
        rng = np.random.RandomState(seed)           # = np.random.seed(seed): the same Mersenne Twister stream
        rng.permutation(MEHL_OFFICIAL_FIRST_DRAW)
        order = list(range(num_models))
        for _ in range(num_passes):
            rng.shuffle(order)
            blocks += [order[i:i + block_size] for i in range(0, num_models, block_size)]
        return blocks
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num_passes):
        order = torch.randperm(num_models, generator=gen).tolist() if shuffle else list(range(num_models))
        blocks += [order[i:i + block_size] for i in range(0, num_models, block_size)]
    return blocks


def build(ctx: SoupContext, parameterisation: str = "affine", granularity: str = "layer",
          block_size: int | None = None, layer_size: int = 0, num_passes: int = 1, shuffle_models: bool = True,
          centre: str = "first_block_mean", normalize_directions: bool = True, epochs: int = 5,
          batch_size: int = 128, lr: float = 0.01, weight_decay: float = 0.0, schedule: str = "cosine",
          warmup_frac: float = 0.2, max_grad_norm: float | None = 1.0, clip: str = "model",
          logit_scale: str = "fixed", temperature: float = 1.0, init: float = 0.0, coef_l2: float = 0.0,
          val_fraction: float = 0.0, seed: int = 0, distributed: str = "auto", model_order: str = "torch",
          batch_pieces: int = 1) -> SoupResult:
    """See the module docstring. With few held-out images the layer-wise variants fit thousands of coefficients
    and overfit; three settings counter that: coarser groups (`layer_size`), `coef_l2` toward the centre, and
    `val_fraction`: that share of the held-out images is kept out of the inner steps, and each block keeps the
    coefficients of the epoch with the lowest loss on it. `distributed: auto` splits each block's models over
    the ranks of an initialised torch.distributed group (see the module docstring); `off` ignores it."""
    ranks = resolve_ranks(distributed)
    K = len(ctx.ingredients)
    b = K if block_size is None else int(block_size)
    if parameterisation not in ("simplex", "affine"):
        raise ConfigError(f"parameterisation={parameterisation!r}: expected simplex or affine")
    if centre not in ("first_block_mean", "base"):
        raise ConfigError(f"centre={centre!r}: expected first_block_mean or base")
    if clip not in ("model", "coefficients"):
        raise ConfigError(f"clip={clip!r}: expected model (clip ∇θL before projecting) or coefficients")
    if logit_scale not in ("fixed", "learned"):
        raise ConfigError(f"logit_scale={logit_scale!r}: expected fixed or learned")
    if b < 1:
        raise ConfigError(f"block_size={block_size}: must be >= 1")
    if num_passes < 1:
        raise ConfigError(f"num_passes={num_passes}: must be >= 1")
    if batch_pieces < 1:
        raise ConfigError(f"batch_pieces={batch_pieces}: must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction}: expected a fraction in [0, 1)")
    if parameterisation == "simplex" and (b < K or num_passes > 1):
        raise ConfigError("parameterisation=simplex learns all models at once: set block_size=null and "
                          "num_passes=1 (block coordinate descent needs the affine parameterisation)")
    ctx.model.eval()
    names = learnable_names(ctx.model)
    params = dict(ctx.model.named_parameters())
    groups = coefficient_groups([params[n].numel() for n in names], granularity, layer_size)
    num_groups = max(groups) + 1
    lr_schedule(schedule, 1, warmup_frac)                       # names a bad schedule before any work
    settings = dict(parameterisation=parameterisation, granularity=granularity, layer_size=layer_size,
                    block_size=b, num_passes=num_passes, shuffle_models=shuffle_models, centre=centre,
                    normalize_directions=normalize_directions, epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, schedule=schedule, warmup_frac=warmup_frac,
                    max_grad_norm=max_grad_norm, clip=clip, logit_scale=logit_scale, temperature=temperature,
                    init=init, coef_l2=coef_l2, val_fraction=val_fraction, seed=seed)
    if model_order != "torch":                 # in the key only when set: earlier resume states stay valid
        settings["model_order"] = model_order
    if batch_pieces != 1:
        settings["batch_pieces"] = batch_pieces
    key = hash_settings({"settings": settings, "ingredients": [g.fingerprint for g in ctx.ingredients],
                         "data": ctx.data_key, "precision": ctx.precision})
    dev = ctx.device
    heldout_x = in_memory(ctx.heldout_images if ctx.heldout_images is not None else ctx.heldout.images)
    heldout_y = ctx.heldout.labels.to(heldout_x.device)
    if dev.type == "cuda" and heldout_x.device.type != "cuda":   # uint8 held-out images on the GPU for all steps
        heldout_x, heldout_y = heldout_x.to(dev), heldout_y.to(dev)
    group_of = torch.tensor(groups, device=dev)
    split_gen = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(heldout_y), generator=split_gen).to(heldout_x.device)
    num_val = int(round(val_fraction * len(heldout_y)))
    val_idx, fit_idx = shuffled[:num_val], shuffled[num_val:]
    blocks = block_order(K, b, num_passes, shuffle_models and parameterisation == "affine", seed, model_order)

    if ranks.distributed and batch_pieces < ranks.size and ranks.main:
        logging.getLogger("soupbench").info(
            "learned soup: each of the %d ranks runs the whole held-out batch (batch_pieces=%d); "
            "soup.<method>.batch_pieces=%d splits the forward/backward over them (the coefficients then follow the "
            "pieces, never the number of ranks)", ranks.size, batch_pieces, ranks.size)
    state = ranks.from_first(_resume(ctx, key, len(names)) if ranks.main else None)
    soup, raw, losses, start = state["soup"], state["raw"], state["losses"], state["next_block"]
    eff_models, eff_base = state["effective"], state["effective_base"]
    warnings: list[str] = []
    bar = tqdm(total=len(blocks), initial=start, desc=f"learned soup ({parameterisation}, b={b})",
               disable=not (ctx.progress and ranks.main), leave=False)
    for bi in range(start, len(blocks)):
        block = blocks[bi]
        mine = ranks.share(len(block))                   # this rank's models of the block (all of them alone)
        states = [ctx.ingredients[i].load(dev) for i in block[mine]]
        if bi > 0:                                   # later blocks and passes move around the soup so far
            ref = to_device(soup, dev)
        elif centre == "base":
            ref = to_device(ctx.start_weights("centre=base"), dev)
        else:
            ref = None                               # first_block_mean
        centre_state, buffers, directions, norms = block_tensors(states, names, parameterisation, ref,
                                                                 normalize_directions, groups, ranks, len(block),
                                                                 ctx.base, dev)
        del states
        num_p = (len(block), num_groups) if granularity == "layer" else (len(block),)
        param = torch.full(num_p, float(init), device=dev, dtype=torch.float32, requires_grad=True)
        scale = torch.ones((), device=dev, requires_grad=True) if logit_scale == "learned" else None
        opt = torch.optim.AdamW([param] + ([scale] if scale is not None else []), lr=lr, weight_decay=weight_decay)
        cuts = batch_bounds(len(fit_idx), batch_size)   # a remainder under half a batch joins the previous batch
        steps_per_epoch = len(cuts)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(schedule, epochs * steps_per_epoch, warmup_frac))
        gen = torch.Generator().manual_seed(seed * 100_003 + bi)
        block_losses, val_losses, best = [], [], None
        for epoch in range(epochs):
            perm = fit_idx[torch.randperm(len(fit_idx), generator=gen).to(heldout_x.device)]
            for i, stop in cuts:
                idx = perm[i:stop]                       # every rank holds the whole batch
                x, y = heldout_x[idx].to(dev, non_blocking=True), heldout_y[idx].to(dev, non_blocking=True)
                loss = inner_step(ctx.model, param, opt, centre_state, directions, names, buffers, x, y,
                                  parameterisation, temperature, max_grad_norm, clip, ctx.precision, group_of, scale,
                                  coef_l2, ranks, batch_pieces)
                sched.step()
                block_losses.append(loss)
            if num_val:
                w = coefficient_weights(param.detach(), parameterisation, group_of, temperature)
                v = validation_loss(ctx.model, centre_state, directions, w[mine], names, buffers, heldout_x[val_idx],
                                    heldout_y[val_idx], batch_size, ctx.precision, scale, ranks)
                val_losses.append(v)
                if best is None or v < best[0]:
                    best = (v, epoch, param.detach().clone(), None if scale is None else scale.detach().clone())
        block_warning = _check_block(ctx, block_losses, val_losses, param, scale, lr, bi, len(blocks))
        if block_warning:
            warnings.append(block_warning)
        if best is not None:                         # the epoch with the lowest loss on the internal split
            with torch.no_grad():
                param.copy_(best[2])
                if scale is not None:
                    scale.copy_(best[3])
        with torch.no_grad():
            w = coefficient_weights(param, parameterisation, group_of, temperature)
            soup = {k: v.cpu() for k, v in {**buffers, **combine(centre_state, directions, w[mine], names,
                                                                 ranks)}.items()}
        require_finite_tensors(soup, f"block {bi + 1}'s soup tensor", setting(f"soup.{ctx.name}.lr", lr))
        eff_models, eff_base = _fold_effective(eff_models, eff_base, block, w.detach().cpu().double(),
                                               None if norms is None else norms.cpu().double(), parameterisation,
                                               bi == 0, centre)
        raw.append({"block": block, "alpha": param.detach().cpu().tolist(),
                    "logit_scale": None if scale is None else scale.item(),
                    "val_losses": val_losses, "best_epoch": None if best is None else best[1]})
        losses.append(torch.stack(block_losses).tolist() if block_losses else [])
        del directions, centre_state
        if ranks.main:                              # one writer; every rank holds the same soup
            _save_progress(ctx, key, soup, raw, losses, bi + 1, settings, eff_models, eff_base)
            faults.point(f"soup.{ctx.name}.block")
        bar.update()
    bar.close()
    ordered = {k: soup[k] for k in ctx.base}      # the base's key order and every key, buffers included
    return SoupResult([g.id for g in ctx.ingredients], ordered, {
        "settings": settings, "layers": names, "groups": groups,
        "coefficients": eff_models.tolist(), "start_weight": eff_base.tolist(),
        "coefficient_min": eff_models.min().item(), "coefficient_max": eff_models.max().item(),
        "blocks": raw, "heldout_loss_per_block": [{"first": ls[0], "last": ls[-1]} for ls in losses if ls],
        "num_blocks": len(blocks), "ranks": ranks.size, **({"warnings": warnings} if warnings else {})})


def _check_block(ctx: SoupContext, block_losses: list[torch.Tensor], val_losses: list[float], param: torch.Tensor,
                 scale: torch.Tensor | None, lr: float, bi: int, num_blocks: int) -> str | None:
    """After a block's inner epochs, before anything of it is saved (soupbench.guards): a non-finite held-out
    loss, validation loss or coefficient stops the soup with one line naming soup.<name>.lr; a loss that ended
    more than DIVERGENCE_FACTOR times above its first step is returned as a warning. One read of the losses."""
    where = f"block {bi + 1} of {num_blocks}"
    knob = setting(f"soup.{ctx.name}.lr", lr)
    losses = torch.stack(block_losses).detach().cpu() if block_losses else torch.empty(0)
    require_finite_losses(losses, "held-out loss", where, knob)
    require_finite_losses(val_losses, "validation loss (val_fraction)", where, knob)
    require_finite_tensors({"coefficients": param.detach(), **({"logit scale": scale.detach()} if scale is not None
                                                                else {})}, "learned", knob)
    if len(losses) >= 2:
        return divergence_warning(float(losses[0]), float(losses[-1]), "held-out loss", f"soup {ctx.name}, {where}",
                                  knob)
    return None


def _fold_effective(eff: torch.Tensor, eff_base: torch.Tensor, block: list[int], w: torch.Tensor,
                    norms: torch.Tensor | None, parameterisation: str, first: bool, centre: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Track the soup as Σ_i e_{i,l} θ_{i,l} + e0_l θ0_l (θ0 the shared start), per tensor.

    Affine: θ' = c + Σ_{i∈block} α_i (θ_i − c) / n_i = (1 − Σ α_i/n_i) c + Σ (α_i/n_i) θ_i, with c the previous
    soup (or the block's mean, or θ0, for the first block). The rows of `e` are what the soup's coefficient
    plot shows: each ingredient's effective weight per tensor, whatever the number of blocks and passes."""
    eff, eff_base = eff.clone(), eff_base.clone()
    if parameterisation == "simplex":
        eff[block] = w
        return eff, eff_base
    if first:
        eff.zero_()
        eff_base.zero_()
        if centre == "base":
            eff_base.fill_(1.0)
        else:
            eff[block] = 1.0 / len(block)
    step = w / norms if norms is not None else w
    keep = 1.0 - step.sum(0)
    eff.mul_(keep)
    eff_base.mul_(keep)
    eff[block] += step
    return eff, eff_base


def block_tensors(states: list[dict[str, torch.Tensor]], names: list[str], parameterisation: str,
                  ref: Mapping[str, torch.Tensor] | None, normalize: bool, groups: list[int] | None = None,
                  ranks: World = SINGLE, size: int | None = None, like: Mapping[str, torch.Tensor] | None = None,
                  device: torch.device | None = None
                  ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor], dict[str, torch.Tensor],
                             torch.Tensor | None]:
    """(centre, buffers, stacked directions, norms) of one loaded block; consumes `states`.

    simplex: no centre, the models themselves are the directions, buffers = the block's mean. affine: the
    directions are θ_i − c around `ref` (the block's mean when None), whose buffers are kept; with `normalize`
    each direction is divided by its norm over its coefficient group (`groups`, one per tensor when None), and
    `norms` (b × L) holds the divisors.

    Across ranks `states` are this rank's share of a block of `size` models (possibly none): the means are
    summed over the ranks, the directions and their norms are this rank's own (a norm is per model), and
    `norms` comes back for the whole block. `like` (a state dict of the block's keys, shapes and dtypes, e.g.
    the start) and `device` shape what a rank without models contributes."""
    def mean(parts: list[dict[str, torch.Tensor]], skip: set[str]) -> dict[str, torch.Tensor]:
        if not ranks.distributed:
            return _mean(parts, [k for k in parts[0] if k not in skip], SINGLE, len(parts), parts[0],
                         parts[0][next(iter(parts[0]))].device)
        return _mean(parts, [k for k in like if k not in skip], ranks, size, like, device)

    def stack(centre: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        return _stack_directions(states, names, centre, like, device)

    if parameterisation == "simplex":
        buffers = mean(states, set(names))
        return None, buffers, stack(None), None
    ref = mean(states, set()) if ref is None else ref
    centre = {n: ref[n] for n in names}
    buffers = {k: v for k, v in ref.items() if k not in centre}
    directions = stack(centre)
    norms = None
    if normalize:
        groups = list(range(len(names))) if groups is None else groups
        sq = torch.stack([_row_squares64(directions[n].flatten(1)) for n in names], dim=1)          # b × L
        # (a norm per row, no copy of the block: the block's directions are the engine's whole memory)
        index = torch.tensor(groups, device=sq.device)
        group_sq = torch.zeros(sq.shape[0], max(groups) + 1, dtype=sq.dtype, device=sq.device).index_add_(1, index, sq)
        # rounded to float32, the divisors the directions get, the same for a model whichever rank holds it
        norms = group_sq.sqrt().clamp_min(1e-12)[:, index].float().double()                          # b × L
        for j, n in enumerate(names):
            d = directions[n]
            d.div_(norms[:, j].to(d.dtype).view(-1, *[1] * (d.ndim - 1)))
        norms = ranks.rows(norms, len(states) if size is None else size)
    return centre, buffers, directions, norms


def _stack_directions(states: list[dict[str, torch.Tensor]], names: list[str],
                      centre: Mapping[str, torch.Tensor] | None, like: Mapping[str, torch.Tensor] | None = None,
                      device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """D_l = stack_i(θ_i,l − c_l). Built tensor by tensor, dropping each loaded tensor as soon as it is
    stacked, so the block costs b copies, not 2b or 3b. No states (a rank without models in this block): empty
    (0, *shape) tensors shaped after `like`, which add nothing to the soup."""
    out = {}
    for n in names:
        if not states:
            out[n] = torch.empty((0, *like[n].shape), dtype=like[n].dtype, device=device)
            continue
        d = torch.stack([s.pop(n) for s in states])
        if centre is not None:
            d.sub_(centre[n])
        out[n] = d
    return out


def _row_squares64(rows: torch.Tensor) -> torch.Tensor:
    """Σ_j rows_ij² in float64 for every row, chunk by chunk (no float64 copy of the whole stack)."""
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=rows.device)
    return torch.cat([torch.linalg.vector_norm(rows[c], dim=1, dtype=torch.float64).square()
                      for c in _row_chunks(rows)])


def _mean(states: list[dict[str, torch.Tensor]], keys: list[str], ranks: World, count: int,
          like: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Mean of a block's `count` states (across ranks: this rank's share of them), key by key: floating-point
    tensors summed in float64 (over the ranks too), divided, then rounded once, so the mean does not depend on
    how the block is split; integer tensors are the block's first model's (rank 0 holds it)."""
    out, first = {}, []
    for k in keys:
        t = like[k]
        if is_averaged(t):
            acc = torch.zeros(t.shape, dtype=torch.float64, device=device)
            for s in states:
                acc.add_(s[k])
            ranks.sum_([acc])
            out[k] = acc.div_(count).to(t.dtype)
        elif not ranks.distributed:
            out[k] = states[0][k]
        else:
            out[k] = states[0][k].clone() if ranks.main else torch.empty(t.shape, dtype=t.dtype, device=device)
            first.append(out[k])
    ranks.broadcast_(first)
    return out


def _state_paths(ctx: SoupContext):
    return ctx.work_dir / "progress.safetensors", ctx.work_dir / "progress.json"


def _save_progress(ctx: SoupContext, key: str, soup: dict, raw: list, losses: list, next_block: int,
                   settings: dict, eff: torch.Tensor, eff_base: torch.Tensor) -> None:
    """After every block: the soup and the effective weights (weights first, then the JSON that vouches)."""
    weights_path, meta_path = _state_paths(ctx)
    tensors = {f"soup.{k}": v for k, v in soup.items()} | {"effective": eff, "effective_base": eff_base}
    save_weights(weights_path, tensors, {"next_block": next_block})
    write_json(meta_path, {"key": key, "next_block": next_block, "settings": settings, "losses": losses,
                           "blocks": raw})


def _resume(ctx: SoupContext, key: str, num_layers: int) -> dict:
    weights_path, meta_path = _state_paths(ctx)
    if weights_path.is_file() and (meta := reusable_meta(meta_path, "key", key)) is not None:
        t = load_weights(weights_path)
        soup = {k.removeprefix("soup."): v for k, v in t.items() if k.startswith("soup.")}
        return {"soup": soup, "raw": meta["blocks"], "losses": meta["losses"], "next_block": meta["next_block"],
                "effective": t["effective"], "effective_base": t["effective_base"]}
    K = len(ctx.ingredients)
    return {"soup": None, "raw": [], "losses": [], "next_block": 0,
            "effective": torch.zeros(K, num_layers, dtype=torch.float64),
            "effective_base": torch.zeros(num_layers, dtype=torch.float64)}
