"""The learned soups' coefficient-learning loop: validate the settings, cut the models into blocks, learn each
block's coefficients on held-out around the soup so far, fold them in, save the progress, and return the soup
with its effective weights (see soupbench.soups.learned for the method)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from tqdm.auto import tqdm

import soupbench.soups.learned.resume as resume
from soupbench import faults
from soupbench.batches import batch_bounds
from soupbench.distributed import resolve_ranks
from soupbench.errors import ConfigError
from soupbench.guards import divergence_warning, require_finite_losses, require_finite_tensors, setting
from soupbench.io.hashing import hash_settings
from soupbench.io.weights import to_device
from soupbench.rowfile import in_memory
from soupbench.runtime import lr_schedule
from soupbench.soups.context import SoupContext, SoupResult
from soupbench.soups.learned.blocks import (
    block_order,
    block_tensors,
    coefficient_groups,
    fold_effective,
    learnable_names,
)
from soupbench.soups.learned.gradient import coefficient_weights, combine, inner_step, validation_loss
from soupbench.soups.learned.settings import (
    Centre,
    Granularity,
    LearnedSettings,
    LogitScale,
    ModelOrder,
    Parameterisation,
)


def build(ctx: SoupContext, settings: LearnedSettings | None = None, **values: Any) -> SoupResult:
    """See soupbench.soups.learned. `settings`: validated (the engine passes them); or keyword `values` (a
    `_target_` instantiated with its YAML), validated here against LearnedSettings, whose defaults are the
    learned soup's: one declaration, no second set of defaults in this signature.

    With few held-out images the layer-wise variants fit thousands of coefficients and overfit; three settings
    counter that: coarser groups (`layer_size`), `coef_l2` toward the centre, and `val_fraction`: that share of
    the held-out images is kept out of the inner steps, and each block keeps the coefficients of the epoch with
    the lowest loss on it. `distributed: auto` splits each block's models over the ranks of an initialised
    torch.distributed group; `off` ignores it."""
    from soupbench.settings.base import validated

    if settings is not None and values:
        raise TypeError("learned.build: pass validated settings or keyword settings, not both")
    s = settings if settings is not None else validated(LearnedSettings, values, ctx.settings_name("learned"))
    v = s.model_dump(mode="json")         # plain values: the record and the resume key hold these
    parameterisation, granularity, block_size, layer_size = (v["parameterisation"], v["granularity"],
                                                              v["block_size"], v["layer_size"])
    num_passes, shuffle_models, centre, normalize_directions = (v["num_passes"], v["shuffle_models"], v["centre"],
                                                                v["normalize_directions"])
    epochs, batch_size, lr, weight_decay, schedule = v["epochs"], v["batch_size"], v["lr"], v["weight_decay"], \
        v["schedule"]
    warmup_frac, max_grad_norm, clip, logit_scale = v["warmup_frac"], v["max_grad_norm"], v["clip"], v["logit_scale"]
    temperature, init, coef_l2, val_fraction, seed = v["temperature"], v["init"], v["coef_l2"], v["val_fraction"], \
        v["seed"]
    distributed, model_order, batch_pieces = v["distributed"], v["model_order"], v["batch_pieces"]
    num_val, num_fit = heldout_split(len(ctx.heldout.labels), val_fraction, ctx.settings_name("learned"))
    ranks = resolve_ranks(distributed)
    K = len(ctx.ingredients)
    b = K if block_size is None else int(block_size)
    if parameterisation == Parameterisation.SIMPLEX and (b < K or num_passes > 1):
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
    if model_order != ModelOrder.TORCH:                 # in the key only when set: earlier resume states stay valid
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
    val_idx, fit_idx = shuffled[:num_val], shuffled[num_val:]
    shuffle = shuffle_models and parameterisation == Parameterisation.AFFINE
    blocks = block_order(K, b, num_passes, shuffle, seed, model_order)

    if ranks.distributed and batch_pieces < ranks.size and ranks.main:
        logging.getLogger("soupbench").info(
            "learned soup: each of the %d ranks runs the whole held-out batch (batch_pieces=%d); "
            "soup.<method>.batch_pieces=%d splits the forward/backward over them (the coefficients then follow the "
            "pieces, never the number of ranks)", ranks.size, batch_pieces, ranks.size)
    state = ranks.from_first(resume.load_progress(ctx, key, len(names)) if ranks.main else None)
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
        elif centre == Centre.START:
            ref = to_device(ctx.start_weights("centre=base"), dev)
        else:
            ref = None                               # first_block_mean
        centre_state, buffers, directions, norms = block_tensors(states, names, parameterisation, ref,
                                                                 normalize_directions, groups, ranks, len(block),
                                                                 ctx.start, dev)
        del states
        num_p = (len(block), num_groups) if granularity == Granularity.LAYER else (len(block),)
        param = torch.full(num_p, float(init), device=dev, dtype=torch.float32, requires_grad=True)
        scale = torch.ones((), device=dev, requires_grad=True) if logit_scale == LogitScale.LEARNED else None
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
        require_finite_tensors(soup, f"block {bi + 1}'s soup tensor", setting(f"{ctx.settings_name('learned')}.lr", lr))
        eff_models, eff_base = fold_effective(eff_models, eff_base, block, w.detach().cpu().double(),
                                               None if norms is None else norms.cpu().double(), parameterisation,
                                               bi == 0, centre)
        raw.append({"block": block, "alpha": param.detach().cpu().tolist(),
                    "logit_scale": None if scale is None else scale.item(),
                    "val_losses": val_losses, "best_epoch": None if best is None else best[1]})
        losses.append(torch.stack(block_losses).tolist() if block_losses else [])
        del directions, centre_state
        if ranks.main:                              # one writer; every rank holds the same soup
            resume.save_progress(ctx, key, soup, raw, losses, bi + 1, settings, eff_models, eff_base)
            faults.point(f"soup.{ctx.name}.block")
        bar.update()
    bar.close()
    ordered = {k: soup[k] for k in ctx.start}      # the start's key order and every key, buffers included
    return SoupResult([g.id for g in ctx.ingredients], ordered, {
        "settings": settings, "layers": names, "groups": groups,
        "coefficients": eff_models.tolist(), "start_weight": eff_base.tolist(),
        "coefficient_min": eff_models.min().item(), "coefficient_max": eff_models.max().item(),
        "blocks": raw, "heldout_loss_per_block": [{"first": ls[0], "last": ls[-1]} for ls in losses if ls],
        "num_blocks": len(blocks), "ranks": ranks.size, "num_fit_images": num_fit, "num_val_images": num_val,
        **({"warnings": warnings} if warnings else {})})


def heldout_split(num_images: int, val_fraction: float, name: str) -> tuple[int, int]:
    """(images to validate on, images to learn from) of `num_images` held-out images: round(val_fraction · N)
    are kept out of the inner steps. A split that leaves nothing to learn from, or nothing to validate on where
    val_fraction asks for validation, is a ConfigError naming `<name>.val_fraction`, before any work: a soup
    that ran no step would be reported as the soup it started from."""
    num_val = int(round(val_fraction * num_images))
    num_fit = num_images - num_val
    knob = setting(f"{name}.val_fraction", val_fraction)
    most = math.floor((num_images - 1) / max(1, num_images) * 1e4) / 1e4      # leaves at least one to learn from
    least = math.ceil(1e4 / max(1, num_images)) / 1e4                         # keeps at least one to validate on
    if num_fit == 0:
        if val_fraction == 0:
            raise ConfigError(f"{name}: the held-out split has 0 images to learn the coefficients from")
        lower = f"lower it to at most {most:g}, or to 0" if most > 0 else "set it to 0"
        raise ConfigError(f"{knob}: leaves 0 of {num_images} held-out images to learn from; {lower} (no "
                          "validation)")
    if val_fraction > 0 and num_val == 0:
        raise_it = f"raise it to at least {least:g}, or " if least <= most else ""
        raise ConfigError(f"{knob}: leaves 0 of {num_images} held-out images to validate on; {raise_it}set it to 0 "
                          "to keep the last epoch's coefficients")
    return num_val, num_fit


def _check_block(ctx: SoupContext, block_losses: list[torch.Tensor], val_losses: list[float], param: torch.Tensor,
                 scale: torch.Tensor | None, lr: float, bi: int, num_blocks: int) -> str | None:
    """After a block's inner epochs, before anything of it is saved (soupbench.guards): a non-finite held-out
    loss, validation loss or coefficient stops the soup with one line naming soup.<name>.lr; a loss that ended
    more than DIVERGENCE_FACTOR times above its first step is returned as a warning. One read of the losses."""
    where = f"block {bi + 1} of {num_blocks}"
    knob = setting(f"{ctx.settings_name('learned')}.lr", lr)
    losses = torch.stack(block_losses).detach().cpu() if block_losses else torch.empty(0)
    require_finite_losses(losses, "held-out loss", where, knob)
    require_finite_losses(val_losses, "validation loss (val_fraction)", where, knob)
    require_finite_tensors({"coefficients": param.detach(), **({"logit scale": scale.detach()} if scale is not None
                                                                else {})}, "learned", knob)
    if len(losses) >= 2:
        return divergence_warning(float(losses[0]), float(losses[-1]), "held-out loss",
                                  f"soup {ctx.name or 'learned'}, {where}", knob)
    return None

