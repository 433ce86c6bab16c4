"""The gradient of the learned soups' coefficients from one forward/backward of the single soup model, and the
soup θ = c + Σ_i w_i d_i itself: every sum whose terms ranks or chunks split is taken in float64 and rounded
once, so W ranks (or any chunking) give one process's numbers bit for bit (see soupbench.soups.learned)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call

from soupbench.distributed import SINGLE, World
from soupbench.runtime import autocast, like_model
from soupbench.soups.learned.settings import Clip, Parameterisation


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
    return torch.softmax(w / temperature, dim=0) if parameterisation == Parameterisation.SIMPLEX else w


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
                                               precision, max_grad_norm if clip == Clip.MODEL else None, logit_scale,
                                               ranks, pieces)
    g = ranks.rows(g, len(param))
    opt.zero_grad(set_to_none=True)
    w.backward(g.to(w.dtype))
    if logit_scale is not None:
        logit_scale.grad = scale_grad
    if coef_l2:
        param.grad.add_(param.detach(), alpha=2.0 * coef_l2)
    if max_grad_norm and clip == Clip.COEFFICIENTS:
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
