"""What the learned soups' coefficient-learning loop works on: the tensors that get coefficients and their
groups, the order of the blocks of models, one block's centre, buffers and (normalised) directions, and the
effective weight of every ingredient that the soup's record shows."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from soupbench.distributed import SINGLE, World
from soupbench.errors import ConfigError
from soupbench.soups.averaging import is_averaged
from soupbench.soups.learned.gradient import _row_chunks
from soupbench.soups.learned.settings import Centre, Granularity, ModelOrder, Parameterisation


def learnable_names(model: torch.nn.Module) -> list[str]:
    """The tensors that get coefficients: the model's floating-point parameters, in module order."""
    return [n for n, p in model.named_parameters() if p.is_floating_point()]


def coefficient_groups(numels: list[int], granularity: str, layer_size: int = 0) -> list[int]:
    """Group index of every learnable tensor. `model`: one group. `layer`: consecutive tensors share a group
    until it holds more than `layer_size` parameters (the MEHL-Soup code's rule; 0 gives one per tensor)."""
    if granularity == Granularity.MODEL:
        return [0] * len(numels)
    if granularity != Granularity.LAYER:
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
    if model_order not in tuple(ModelOrder):
        raise ConfigError(f"model_order={model_order!r}: expected one of {[o.value for o in ModelOrder]}")
    blocks = []
    if model_order == ModelOrder.MEHL_OFFICIAL and shuffle:
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



def fold_effective(eff: torch.Tensor, eff_base: torch.Tensor, block: list[int], w: torch.Tensor,
                    norms: torch.Tensor | None, parameterisation: str, first: bool, centre: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Track the soup as Σ_i e_{i,l} θ_{i,l} + e0_l θ0_l (θ0 the shared start), per tensor.

    Affine: θ' = c + Σ_{i∈block} α_i (θ_i − c) / n_i = (1 − Σ α_i/n_i) c + Σ (α_i/n_i) θ_i, with c the previous
    soup (or the block's mean, or θ0, for the first block). The rows of `e` are what the soup's coefficient
    plot shows: each ingredient's effective weight per tensor, whatever the number of blocks and passes."""
    eff, eff_base = eff.clone(), eff_base.clone()
    if parameterisation == Parameterisation.SIMPLEX:
        eff[block] = w
        return eff, eff_base
    if first:
        eff.zero_()
        eff_base.zero_()
        if centre == Centre.START:
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

    if parameterisation == Parameterisation.SIMPLEX:
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

