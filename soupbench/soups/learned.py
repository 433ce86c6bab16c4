"""Learned soups as one engine: learned soup(+), HL-Soup(+) and MEHL-Soup(+) are settings of `build`.

    θ_l = c_l + Σ_i w_{i,l} d_{i,l}

- parameterisation `simplex` (learned soup): c = 0, d_i = θ_i, w = softmax(β / T) over the models.
  `affine` (HL-Soup): d_i = θ_i − c (optionally unit-normalised per layer), w = α unconstrained, so the soup
  may extrapolate beyond the ingredients.
- granularity `model`: one coefficient per model; `layer` (the "+" variants): one per (model, tensor).
- block_size b: b = K (null) learns all models at once; b < K is MEHL's block coordinate descent: each
  block of b models is loaded, its coefficients learned around the current soup, folded in, and freed.

Why it fits in memory: ∂L/∂w_{i,l} = <∇_{θ_l} L(θ), d_{i,l}>. One forward/backward of the single soup gives
∇θL; the coefficients' gradients are one GEMV per tensor against the block's stacked directions, pushed
through the (tiny) softmax/identity graph of the coefficients. No graph through K models is ever built, and
only the current block's directions are in memory. After every block the soup, the coefficients and the
settings are saved, so a killed run resumes from its last finished block.

Buffers (BatchNorm running statistics) are not learned: they come from the centre (affine) or the uniform
mean of the block (simplex); re-estimate them on training data with `bn_recalibration` where they matter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from soupbench.errors import ConfigError
from soupbench.evaluate import autocast
from soupbench.finetune import cosine_with_warmup
from soupbench.io import hash_settings, load_weights, read_json, save_weights, write_json
from soupbench.soups import SoupContext, SoupResult, is_averaged


def learnable_names(model: torch.nn.Module) -> list[str]:
    """The tensors that get coefficients: the model's floating-point parameters, in module order."""
    return [n for n, p in model.named_parameters() if p.is_floating_point()]


def combine(centre: Mapping[str, torch.Tensor] | None, directions: Mapping[str, torch.Tensor],
            weights: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """θ_l = c_l + w[:, l] @ D_l for every learnable tensor (D_l: (b, *shape)); one allocation per tensor."""
    out = {}
    for j, n in enumerate(names):
        d = directions[n]
        w = weights[:, j].to(d.dtype)
        if centre is None:
            out[n] = torch.mv(d.flatten(1).t(), w).view(d.shape[1:])
        else:
            out[n] = torch.addmv(centre[n].flatten(), d.flatten(1).t(), w).view(d.shape[1:])
    return out


def coefficient_gradient(model: torch.nn.Module, centre: Mapping[str, torch.Tensor] | None,
                         directions: Mapping[str, torch.Tensor], weights: torch.Tensor, names: list[str],
                         buffers: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                         use_autocast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and G = ∂L/∂w (b × L) from one forward/backward of the single soup model.

    The soup's tensors are fresh leaves (not views of one flat vector, which is 3x slower)."""
    with torch.no_grad():
        theta = {n: t.requires_grad_(True) for n, t in combine(centre, directions, weights, names).items()}
    with autocast(x.device, use_autocast):
        logits = functional_call(model, {**buffers, **theta}, (x,), strict=False)
    loss = F.cross_entropy(logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits, y)
    grads = torch.autograd.grad(loss, [theta[n] for n in names])
    g = torch.stack([directions[n].flatten(1) @ gr.flatten().to(directions[n].dtype)
                     for n, gr in zip(names, grads, strict=True)], dim=1)
    return loss.detach(), g


def coefficient_weights(param: torch.Tensor, parameterisation: str, num_layers: int, temperature: float
                        ) -> torch.Tensor:
    """Learned parameters -> mixing weights (b × L): identity (affine) or softmax over models (simplex)."""
    w = param if param.ndim == 2 else param[:, None].expand(-1, num_layers)
    return torch.softmax(w / temperature, dim=0) if parameterisation == "simplex" else w


def inner_step(model: torch.nn.Module, param: torch.Tensor, opt: torch.optim.Optimizer,
               centre: Mapping[str, torch.Tensor] | None, directions: Mapping[str, torch.Tensor], names: list[str],
               buffers: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, parameterisation: str,
               temperature: float, max_grad_norm: float | None, use_autocast: bool = True) -> torch.Tensor:
    """One optimiser step on the block's coefficients (what the benchmark times). Returns the loss on device,
    so the caller decides when to synchronise."""
    w = coefficient_weights(param, parameterisation, len(names), temperature)
    loss, g = coefficient_gradient(model, centre, directions, w.detach(), names, buffers, x, y, use_autocast)
    opt.zero_grad(set_to_none=True)
    w.backward(g.to(w.dtype))
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
    opt.step()
    return loss


def build(ctx: SoupContext, parameterisation: str = "affine", granularity: str = "layer",
          block_size: int | None = None, centre: str = "first_block_mean", normalize_directions: bool = True,
          epochs: int = 5, batch_size: int = 128, lr: float = 0.01, weight_decay: float = 0.0,
          warmup_frac: float = 0.2, max_grad_norm: float | None = 1.0, temperature: float = 1.0,
          init: float = 0.0, seed: int = 0) -> SoupResult:
    K = len(ctx.ingredients)
    b = K if block_size is None else int(block_size)
    if parameterisation not in ("simplex", "affine"):
        raise ConfigError(f"parameterisation={parameterisation!r}: expected simplex or affine")
    if granularity not in ("model", "layer"):
        raise ConfigError(f"granularity={granularity!r}: expected model or layer")
    if centre not in ("first_block_mean", "base"):
        raise ConfigError(f"centre={centre!r}: expected first_block_mean or base")
    if b < 1:
        raise ConfigError(f"block_size={block_size}: must be >= 1")
    if parameterisation == "simplex" and b < K:
        raise ConfigError("parameterisation=simplex learns all models at once: set block_size=null "
                          "(block coordinate descent needs the affine parameterisation)")
    settings = dict(parameterisation=parameterisation, granularity=granularity, block_size=b, centre=centre,
                    normalize_directions=normalize_directions, epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, warmup_frac=warmup_frac, max_grad_norm=max_grad_norm,
                    temperature=temperature, init=init, seed=seed)
    key = hash_settings({"settings": settings, "ingredients": [g.fingerprint for g in ctx.ingredients]})
    ctx.model.eval()
    names = learnable_names(ctx.model)
    dev = ctx.device
    use_autocast = dev.type == "cuda"
    heldout_x, heldout_y = ctx.heldout.images, ctx.heldout.labels
    if dev.type == "cuda":          # uint8 held-out images live on the GPU for all inner steps
        heldout_x, heldout_y = heldout_x.to(dev), heldout_y.to(dev)
    blocks = [ctx.ingredients[i:i + b] for i in range(0, K, b)]

    soup, coefs, losses, start = _resume(ctx, key)
    bar = tqdm(total=len(blocks), initial=start, desc=f"learned soup ({parameterisation}, b={b})",
               disable=not ctx.progress, leave=False)
    for bi in range(start, len(blocks)):
        block = blocks[bi]
        states = [g.load(dev) for g in block]
        if bi > 0:                                   # later blocks move around the soup so far
            ref = {k: v.to(dev) for k, v in soup.items()}
        elif centre == "base":
            ref = {k: v.to(dev) for k, v in ctx.base.items()}
        else:
            ref = None                               # first_block_mean
        centre_state, buffers, directions = block_tensors(states, names, parameterisation, ref,
                                                          normalize_directions)
        del states
        num_p = (len(block), len(names)) if granularity == "layer" else (len(block),)
        param = torch.full(num_p, float(init), device=dev, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(heldout_y) / batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(epochs * steps_per_epoch, warmup_frac))
        gen = torch.Generator().manual_seed(seed * 100_003 + bi)
        block_losses = []
        for _ in range(epochs):
            perm = torch.randperm(len(heldout_y), generator=gen)
            for i in range(0, len(perm), batch_size):
                idx = perm[i:i + batch_size]
                x, y = heldout_x[idx].to(dev, non_blocking=True), heldout_y[idx].to(dev, non_blocking=True)
                loss = inner_step(ctx.model, param, opt, centre_state, directions, names, buffers, x, y,
                                  parameterisation, temperature, max_grad_norm, use_autocast)
                sched.step()
                block_losses.append(loss)
        with torch.no_grad():
            w = coefficient_weights(param, parameterisation, len(names), temperature)
            soup = {k: v.cpu() for k, v in {**buffers, **combine(centre_state, directions, w, names)}.items()}
        coefs.append(w.detach().cpu())
        losses.append(torch.stack(block_losses).tolist() if block_losses else [])
        del directions, centre_state
        _save_progress(ctx, key, soup, coefs, losses, bi + 1, settings)
        bar.update()
    bar.close()
    ordered = {k: soup[k] for k in ctx.base}      # the base's key order and every key, buffers included
    coefficients = torch.cat(coefs)              # (K, L): each ingredient's weight on its direction per tensor
    return SoupResult([g.id for g in ctx.ingredients], ordered, {
        "settings": settings, "layers": names, "coefficients": coefficients.tolist(),
        "coefficient_min": coefficients.min().item(), "coefficient_max": coefficients.max().item(),
        "heldout_loss_per_block": [{"first": ls[0], "last": ls[-1]} for ls in losses if ls],
        "num_blocks": len(blocks)})


def block_tensors(states: list[dict[str, torch.Tensor]], names: list[str], parameterisation: str,
                  ref: Mapping[str, torch.Tensor] | None, normalize: bool
                  ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(centre, buffers, stacked directions) of one loaded block; consumes `states`.

    simplex: no centre, the models themselves are the directions, buffers = the block's mean. affine: the
    directions are θ_i − c around `ref` (the block's mean when None), whose buffers are kept."""
    if parameterisation == "simplex":
        buffers = _mean_buffers(states, names)
        return None, buffers, _stack_directions(states, names, None, False)
    ref = _mean(states) if ref is None else ref
    centre = {n: ref[n] for n in names}
    buffers = {k: v for k, v in ref.items() if k not in centre}
    return centre, buffers, _stack_directions(states, names, centre, normalize)


def _stack_directions(states: list[dict[str, torch.Tensor]], names: list[str],
                      centre: Mapping[str, torch.Tensor] | None, normalize: bool) -> dict[str, torch.Tensor]:
    """D_l = stack_i(θ_i,l − c_l), unit-normalised per row if asked. Built tensor by tensor, dropping each
    loaded tensor as soon as it is stacked, so the block costs b copies, not 2b or 3b."""
    out = {}
    for n in names:
        d = torch.stack([s.pop(n) for s in states])
        if centre is not None:
            d.sub_(centre[n])
        if normalize:
            d.div_(d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (d.ndim - 1)))
        out[n] = d
    return out


def _mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in states[0].items():
        if is_averaged(v):
            acc = v.clone()
            for s in states[1:]:
                acc.add_(s[k])
            out[k] = acc.div_(len(states))
        else:
            out[k] = v
    return out


def _mean_buffers(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    skip = set(names)
    return _mean([{k: v for k, v in s.items() if k not in skip} for s in states])


def _state_paths(ctx: SoupContext):
    return ctx.work_dir / "progress.safetensors", ctx.work_dir / "progress.json"


def _save_progress(ctx: SoupContext, key: str, soup: dict, coefs: list, losses: list, next_block: int,
                   settings: dict) -> None:
    """After every block: the soup and all coefficients so far (weights first, then the JSON that vouches)."""
    weights_path, meta_path = _state_paths(ctx)
    tensors = {f"soup.{k}": v for k, v in soup.items()} | {f"coef.{i}": c for i, c in enumerate(coefs)}
    save_weights(weights_path, tensors, {"next_block": next_block})
    write_json(meta_path, {"key": key, "next_block": next_block, "settings": settings, "losses": losses})


def _resume(ctx: SoupContext, key: str):
    weights_path, meta_path = _state_paths(ctx)
    if meta_path.is_file() and weights_path.is_file():
        meta = read_json(meta_path)
        if meta.get("key") == key:
            t = load_weights(weights_path)
            soup = {k.removeprefix("soup."): v for k, v in t.items() if k.startswith("soup.")}
            coefs = [t[f"coef.{i}"] for i in range(meta["next_block"])]
            return soup, coefs, meta["losses"], meta["next_block"]
    return None, [], [], 0
