"""The coefficient-learning engine (learned, learned+, HL(+), MEHL(+)) against explicit references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from soupbench.errors import ConfigError as ConfigErrorType
from soupbench.evaluate import accuracy, predict
from soupbench.ingredients import save_ingredient
from soupbench.io.hashing import fingerprint
from soupbench.runtime import lr_schedule, set_memory_format
from soupbench.soups import learned
from soupbench.soups.learned import coefficient_gradient, coefficient_weights, combine, learnable_names
from tests.helpers import learned_soup, make_store, random_split, soup_context, tiny_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("parameterisation", ["simplex", "affine"])
@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pieces", [1, 5])             # 5: pieces of 5, 5, 5, 5 and 4 images, summed
def test_coefficient_gradient_matches_autograd_through_all_models(parameterisation, granularity, memory_format,
                                                                 pieces):
    torch.manual_seed(0)
    model = tiny_model().double().eval()
    names = learnable_names(model)
    base = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    set_memory_format(model, memory_format, CPU)     # the engine lays the soup out as the model (contiguous ref)
    K = 4
    thetas = [{n: base[n] + 0.3 * torch.randn_like(base[n]) for n in names} for _ in range(K)]
    buffers = {k: v for k, v in base.items() if k not in names}
    if parameterisation == "simplex":
        centre, dirs = None, {n: torch.stack([t[n] for t in thetas]) for n in names}
    else:
        centre = {n: base[n] for n in names}
        dirs = {n: torch.stack([t[n] - base[n] for t in thetas]) for n in names}
        dirs = {n: d / d.flatten(1).norm(dim=1).view(-1, *[1] * (d.ndim - 1)) for n, d in dirs.items()}
    shape = (K, len(names)) if granularity == "layer" else (K,)
    param = (0.5 * torch.randn(shape, dtype=torch.float64)).requires_grad_(True)
    split = random_split(n=24)
    x, y = split.images, split.labels

    # reference: one autograd graph through every model's tensors, exactly what the engine avoids
    w_ref = coefficient_weights(param, parameterisation, len(names), temperature=0.7)
    theta = {n: (0 if centre is None else centre[n]) + sum(w_ref[i, j] * dirs[n][i] for i in range(K))
             for j, n in enumerate(names)}
    loss_ref = F.cross_entropy(functional_call(model, {**buffers, **theta}, (x,)), y)
    (grad_ref,) = torch.autograd.grad(loss_ref, param)

    # engine: one forward/backward of the single soup, inner products, then the tiny coefficient graph
    w = coefficient_weights(param, parameterisation, len(names), temperature=0.7)
    loss, g, _ = coefficient_gradient(model, centre, dirs, w.detach(), names, buffers, x, y, precision="fp32",
                                      pieces=pieces)
    (grad,) = torch.autograd.grad(w, param, g)
    torch.testing.assert_close(loss, loss_ref.detach())
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)


def store_with_accuracies(tmp_path, k=4, scale=0.3, seed=0):
    model = tiny_model(seed=seed)
    heldout = random_split(n=64, seed=seed)
    _, ings = make_store(tmp_path, k, scale=scale, seed=seed, model=model)
    return model, heldout, ings


SETTINGS = dict(epochs=3, batch_size=32, lr=0.05, weight_decay=0.0, warmup_frac=0.2, max_grad_norm=1.0)


def test_mehl_with_one_block_equals_hl(tmp_path):
    model, heldout, ings = store_with_accuracies(tmp_path)
    hl = learned_soup(soup_context(model, ings, heldout, tmp_path / "a"), "affine", "layer", None, **SETTINGS)
    mehl = learned_soup(soup_context(model, ings, heldout, tmp_path / "b"), "affine", "layer", len(ings), **SETTINGS)
    assert torch.equal(torch.tensor(hl.info["coefficients"]), torch.tensor(mehl.info["coefficients"]))
    assert fingerprint(hl.state) == fingerprint(mehl.state)


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_simplex_stays_on_the_simplex(tmp_path, granularity):
    model, heldout, ings = store_with_accuracies(tmp_path)
    res = learned_soup(soup_context(model, ings, heldout, tmp_path), "simplex", granularity, **SETTINGS)
    w = torch.tensor(res.info["coefficients"])
    assert (w >= 0).all() and (w <= 1).all()
    torch.testing.assert_close(w.sum(0), torch.ones(w.shape[1]))
    assert not torch.allclose(w, torch.full_like(w, 0.25))        # it learned something
    # the soup is exactly Σ w_i θ_i per tensor
    states = [g.load() for g in ings]
    for j, n in enumerate(res.info["layers"]):
        ref = sum(w[i, j] * states[i][n] for i in range(len(ings)))
        torch.testing.assert_close(res.state[n], ref, rtol=1e-5, atol=1e-6)


def test_affine_extrapolates_where_the_optimum_lies_outside(tmp_path):
    """Both ingredients lie on the segment from a zero head towards a teacher head; the held-out loss keeps
    falling beyond them, so HL must leave [0, 1] and beat the simplex (learned) soup."""
    model = tiny_model(seed=1).eval()
    heldout = random_split(n=128, seed=1)
    with torch.no_grad():
        heldout.labels[:] = predict(model, heldout.images, 64, CPU).argmax(1)   # teacher labels
    start = {k: v.clone() for k, v in model.state_dict().items()}
    teacher_w, teacher_b = start["head.weight"].clone(), start["head.bias"].clone()
    start["head.weight"].zero_()
    start["head.bias"].zero_()
    bf = fingerprint(start)
    ings = []
    for i, t in enumerate([0.3, 0.6]):
        s = {k: v.clone() for k, v in start.items()}
        s["head.weight"] = t * teacher_w
        s["head.bias"] = t * teacher_b
        ings.append(save_ingredient(tmp_path, f"g{i}", s, {"fingerprint": fingerprint(s), "base_fingerprint": bf,
                                                            "heldout_acc": 50.0 + i}))
    ctx = soup_context(model, ings, heldout, tmp_path)
    ctx.start = start
    kw = dict(SETTINGS, epochs=30, lr=0.2)
    hl = learned_soup(ctx, "affine", "model", None, centre="base", normalize_directions=False, **kw)
    ls = learned_soup(ctx, "simplex", "model", None, **kw)
    hl_w = torch.tensor(hl.info["coefficients"])
    assert hl.info["coefficient_max"] > 1.0 or hl_w.sum(0).max() > 1.0
    # effective position along the teacher direction, beyond the best ingredient's 0.6
    t_hl = (hl.state["head.weight"] * teacher_w).sum() / teacher_w.square().sum()
    assert t_hl > 0.6
    loss = lambda s: F.cross_entropy(predict(model, heldout.images, 64, CPU, s), heldout.labels).item()  # noqa: E731
    assert loss(hl.state) < min(loss(ls.state), loss(ings[0].load()), loss(ings[1].load()))
    lw = torch.tensor(ls.info["coefficients"])
    assert (lw >= 0).all() and (lw <= 1).all()       # the simplex cannot leave the segment


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    model, heldout, ings = store_with_accuracies(tmp_path)
    kw = dict(parameterisation="affine", granularity="layer", block_size=1, **SETTINGS)
    full = learned_soup(soup_context(model, ings, heldout, tmp_path / "full"), **kw)

    calls = {"n": 0}
    original = type(ings[0]).load

    def flaky_load(self, device="cpu"):
        calls["n"] += 1
        if calls["n"] == 3:                       # die while loading the third block
            raise KeyboardInterrupt
        return original(self, device)

    ctx = soup_context(model, ings, heldout, tmp_path / "resumed")
    monkeypatch.setattr(type(ings[0]), "load", flaky_load)
    with pytest.raises(KeyboardInterrupt):
        learned_soup(ctx, **kw)
    monkeypatch.setattr(type(ings[0]), "load", original)
    loaded = []

    def recording_load(self, device="cpu"):
        loaded.append(self.id)
        return original(self, device)

    monkeypatch.setattr(type(ings[0]), "load", recording_load)
    resumed = learned_soup(ctx, **kw)
    order = [i for blk in learned.block_order(len(ings), 1, 1, True, 0) for i in blk]
    assert loaded == [ings[i].id for i in order[2:]]      # blocks 0 and 1 were not redone
    assert torch.equal(torch.tensor(resumed.info["coefficients"]), torch.tensor(full.info["coefficients"]))
    assert fingerprint(resumed.state) == fingerprint(full.state)


def test_learned_soup_improves_heldout_loss(tmp_path):
    """Full-batch steps: MEHL+ (2 blocks) must end below its start, the mean of the first block."""
    from soupbench.soups.averaging import average

    model, heldout, ings = store_with_accuracies(tmp_path, scale=0.5)
    ctx = soup_context(model, ings, heldout, tmp_path)
    res = learned_soup(ctx, "affine", "layer", 2, **dict(SETTINGS, epochs=20, batch_size=len(heldout), lr=0.02))
    loss = lambda s: F.cross_entropy(predict(model, heldout.images, 64, CPU, s), heldout.labels).item()  # noqa: E731
    assert loss(res.state) < loss(average(ings[:2])) - 1e-3
    assert res.info["num_blocks"] == 2 and len(res.info["coefficients"]) == 4
    assert 0 <= accuracy(predict(model, heldout.images, 64, CPU, res.state), heldout) <= 100


def test_bad_settings_are_named(tmp_path):
    from soupbench.errors import ConfigError

    model, heldout, ings = store_with_accuracies(tmp_path)
    ctx = soup_context(model, ings, heldout, tmp_path)
    with pytest.raises(ConfigError, match="block_size=null"):
        learned_soup(ctx, "simplex", "model", block_size=2)
    with pytest.raises(ConfigError, match="granularity"):
        learned_soup(ctx, "affine", "tensor")


def test_combine_is_centre_plus_weighted_directions():
    d = {"a": torch.arange(6.0).view(2, 3)}
    out = combine({"a": torch.ones(3)}, d, torch.tensor([[2.0], [-1.0]]), ["a"])
    torch.testing.assert_close(out["a"], torch.ones(3) + 2 * d["a"][0] - d["a"][1])


def test_the_soup_and_the_projections_do_not_depend_on_how_the_models_are_split(monkeypatch):
    """What lets W ranks learn one process's coefficients bit for bit: the soup summed as the all-reduce does
    (partial float64 sums over any split of the rows, added) and each row's projection, computed with any
    other rows or in chunks of any size, round to the same float32 values as the unsplit computation."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 5003, generator=gen) * torch.logspace(-3, 1, 7)[:, None]   # mixed magnitudes
    w, v = torch.randn(7, generator=gen), torch.randn(5003, generator=gen)
    weighted, project, squares_of = (learned.gradient._weighted_rows64, learned.gradient._project_rows64,
                                     learned.blocks._row_squares64)
    whole = weighted(rows, w).float()
    projections = project(rows, v).float()
    squares = squares_of(rows).float()
    for chunk in (learned.gradient.CHUNK_ELEMENTS, 5003, 2 * 5003 + 1, 64):   # the whole stack, 1, 2 and 1 row a chunk
        monkeypatch.setattr(learned.gradient, "CHUNK_ELEMENTS", chunk)
        for k in range(8):
            parts = weighted(rows[:k], w[:k]) + weighted(rows[k:], w[k:])
            assert torch.equal(parts.float(), whole), (chunk, k)
            split = torch.cat([project(rows[:k], v), project(rows[k:], v)])
            assert torch.equal(split.float(), projections), (chunk, k)
            assert torch.equal(torch.cat([squares_of(rows[:k]), squares_of(rows[k:])]).float(), squares), (chunk, k)


# ---------------------------------------------------------------------------------- the official code's protocol


def official_groups(numels: list[int], layer_size: int) -> list[int]:
    """MEHL_soup_layer.py's loop, verbatim in spirit: group sizes, then expanded to a group index per tensor."""
    layers = [0]
    for size in numels:
        if layers[-1] > layer_size:
            layers.append(size)
        else:
            layers[-1] += size
    out, g, acc = [], 0, 0
    for size in numels:
        if acc + size > layers[g] and acc > 0:
            g, acc = g + 1, 0
        acc += size
        out.append(g)
    return out


@pytest.mark.parametrize("layer_size", [0, 5, 100, 10**9])
def test_coefficient_groups_follow_the_official_layer_size_rule(layer_size):
    numels = [162, 6, 6, 6, 18, 3, 40, 1]
    assert learned.coefficient_groups(numels, "layer", layer_size) == official_groups(numels, layer_size)
    assert learned.coefficient_groups(numels, "model") == [0] * len(numels)
    assert learned.coefficient_groups(numels, "layer", 0) == list(range(len(numels)))


def test_model_wise_soup_stays_on_the_hyperplane_of_the_task_vectors(tmp_path):
    """One α per model moves every tensor of τ_i by the same factor: soup − c = Σ α_i τ_i exactly (directions
    normalised over the whole τ_i, not per tensor)."""
    model, heldout, ings = store_with_accuracies(tmp_path, scale=0.5)
    res = learned_soup(soup_context(model, ings, heldout, tmp_path / "w"), "affine", "model", None, **SETTINGS)
    names = res.info["layers"]
    states = [g.load() for g in ings]
    centre = {n: sum(s[n] for s in states) / len(states) for n in names}
    taus = torch.stack([torch.cat([(s[n] - centre[n]).flatten() for n in names]) for s in states], 1)   # D × K
    delta = torch.cat([(res.state[n] - centre[n]).flatten() for n in names])
    alpha = torch.linalg.lstsq(taus.double(), delta.double()[:, None]).solution
    residual = (taus.double() @ alpha).squeeze(1) - delta.double()
    assert delta.norm() > 1e-3                                    # it moved
    assert residual.norm() < 1e-5 * delta.norm()
    # the reported effective weights are one number per model for every tensor
    eff = torch.tensor(res.info["coefficients"])
    torch.testing.assert_close(eff, eff[:, :1].expand_as(eff))


@pytest.mark.parametrize("kw", [
    dict(parameterisation="affine", granularity="layer", block_size=2, num_passes=2),
    dict(parameterisation="affine", granularity="model", block_size=3, num_passes=1, centre="base"),
    dict(parameterisation="affine", granularity="layer", block_size=1, num_passes=2, layer_size=20),
    dict(parameterisation="simplex", granularity="layer", block_size=None, layer_size=10, logit_scale="learned"),
])
def test_effective_weights_rebuild_the_soup(tmp_path, kw):
    """Whatever the blocks, passes and groups: soup = Σ_i e_i θ_i + e_0 θ_0 per tensor, with the reported e."""
    model, heldout, ings = store_with_accuracies(tmp_path, scale=0.5)
    ctx = soup_context(model, ings, heldout, tmp_path / "w")
    res = learned_soup(ctx, **kw, **SETTINGS)
    eff, e0 = torch.tensor(res.info["coefficients"], dtype=torch.float64), res.info["start_weight"]
    states = [g.load() for g in ings]
    for j, n in enumerate(res.info["layers"]):
        ref = sum(eff[i, j] * states[i][n].double() for i in range(len(ings))) + e0[j] * ctx.start[n].double()
        torch.testing.assert_close(res.state[n].double(), ref, rtol=1e-4, atol=1e-5)
    passes = kw.get("num_passes", 1)
    assert res.info["num_blocks"] == passes * -(-len(ings) // (kw["block_size"] or len(ings)))


def test_blocks_are_shuffled_by_seed_and_reshuffled_each_pass():
    a = learned.block_order(12, 4, 2, True, seed=0)
    assert len(a) == 6 and sorted(sum(a[:3], [])) == list(range(12)) == sorted(sum(a[3:], []))
    assert a == learned.block_order(12, 4, 2, True, seed=0)
    assert a != learned.block_order(12, 4, 2, True, seed=1)
    assert sum(a[:3], []) != sum(a[3:], [])                      # a new order for the second pass
    assert learned.block_order(5, 2, 1, False, 0) == [[0, 1], [2, 3], [4]]


def test_model_gradient_is_clipped_before_projection():
    """MEHL-Soup clips ∇θL (norm 1) and projects the clipped gradient; clipping ∂L/∂α instead is different."""
    torch.manual_seed(0)
    model = tiny_model().double().eval()
    names = learnable_names(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v for k, v in base.items() if k not in names}
    dirs = {n: torch.randn(3, *base[n].shape, dtype=torch.float64) for n in names}
    w = torch.zeros(3, len(names), dtype=torch.float64)
    split = random_split(n=24)
    theta = {n: base[n].clone().requires_grad_(True) for n in names}
    loss = F.cross_entropy(functional_call(model, {**buffers, **theta}, (split.images,)), split.labels)
    loss.backward()
    raw_norm = torch.linalg.vector_norm(torch.stack([theta[n].grad.norm() for n in names]))
    max_norm = float(raw_norm) / 4
    torch.nn.utils.clip_grad_norm_([theta[n] for n in names], max_norm)
    ref = torch.stack([dirs[n].flatten(1) @ theta[n].grad.flatten() for n in names], 1)
    _, g, _ = coefficient_gradient(model, base, dirs, w, names, buffers, split.images, split.labels,
                                   precision="fp32", clip_model_grad=max_norm)
    torch.testing.assert_close(g, ref)
    _, g_free, _ = coefficient_gradient(model, base, dirs, w, names, buffers, split.images, split.labels,
                                        precision="fp32", clip_model_grad=1e9)
    torch.testing.assert_close(g_free, ref * raw_norm / max_norm, rtol=1e-5, atol=1e-8)


def test_learned_logit_scale_gradient_matches_autograd():
    """model-soups' learned soup multiplies the logits by a learnable scalar β trained with the weights."""
    torch.manual_seed(0)
    model = tiny_model().double().eval()
    names = learnable_names(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v for k, v in base.items() if k not in names}
    dirs = {n: torch.stack([base[n] + 0.2 * torch.randn_like(base[n]) for _ in range(3)]) for n in names}
    param = torch.randn(3, len(names), dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    split = random_split(n=24)
    w_ref = coefficient_weights(param, "simplex", len(names), 1.0)
    theta = {n: sum(w_ref[i, j] * dirs[n][i] for i in range(3)) for j, n in enumerate(names)}
    loss_ref = F.cross_entropy(beta * functional_call(model, {**buffers, **theta}, (split.images,)), split.labels)
    grad_ref, beta_ref = torch.autograd.grad(loss_ref, [param, beta])
    w = coefficient_weights(param, "simplex", len(names), 1.0)
    loss, g, beta_grad = coefficient_gradient(model, None, dirs, w.detach(), names, buffers, split.images,
                                              split.labels, precision="fp32", logit_scale=beta)
    (grad,) = torch.autograd.grad(w, param, g)
    torch.testing.assert_close(loss, loss_ref.detach())
    torch.testing.assert_close(grad, grad_ref)
    torch.testing.assert_close(beta_grad, beta_ref)


def test_official_learned_recipe_learns_the_scale_at_a_constant_rate(tmp_path):
    model, heldout, ings = store_with_accuracies(tmp_path)
    res = learned_soup(soup_context(model, ings, heldout, tmp_path / "w"), "simplex", "layer", None, epochs=2,
                        batch_size=32, lr=0.05, schedule="constant", max_grad_norm=None, logit_scale="learned")
    (blk,) = res.info["blocks"]
    assert blk["logit_scale"] != 1.0                            # trained jointly
    assert lr_schedule("constant", 100, 0.2)(0) == lr_schedule("constant", 100, 0.2)(99) == 1.0
    with pytest.raises(ConfigErrorType, match="schedule"):
        learned_soup(soup_context(model, ings, heldout, tmp_path / "x"), "simplex", "layer", None, schedule="step")


def test_resume_state_is_tied_to_the_data(tmp_path, monkeypatch):
    """A learned soup's progress from other data settings is not resumed."""
    from soupbench.io.atomic import read_json

    model, heldout, ings = store_with_accuracies(tmp_path)
    kw = dict(parameterisation="affine", granularity="layer", block_size=2, **SETTINGS)
    ctx = soup_context(model, ings, heldout, tmp_path / "w")
    ctx.data_key = "small"
    learned_soup(ctx, **kw)
    assert read_json(ctx.work_dir / "progress.json")["next_block"] == 2
    ctx.data_key = "full"
    calls = []
    original = type(ings[0]).load
    monkeypatch.setattr(type(ings[0]), "load",
                        lambda self, device="cpu": calls.append(self.id) or original(self, device))
    learned_soup(ctx, **kw)
    assert len(calls) == len(ings)                               # everything recomputed for the new data


def test_internal_split_keeps_the_epoch_with_the_lowest_loss(tmp_path):
    model, heldout, ings = store_with_accuracies(tmp_path, scale=0.5)
    ctx = soup_context(model, ings, heldout, tmp_path / "w")
    res = learned_soup(ctx, "affine", "layer", None, **dict(SETTINGS, epochs=4, lr=0.3), val_fraction=0.25)
    (blk,) = res.info["blocks"]
    assert len(blk["val_losses"]) == 4
    assert blk["best_epoch"] == min(range(4), key=lambda e: blk["val_losses"][e])
    # the soup is the kept epoch's: its loss on the internal split is the minimum
    idx = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[:16]
    logits = predict(model, heldout.images[idx], 64, CPU, res.state)
    assert F.cross_entropy(logits, heldout.labels[idx]).item() == pytest.approx(min(blk["val_losses"]), rel=1e-4)


def test_coefficient_penalty_pulls_toward_the_centre(tmp_path):
    model, heldout, ings = store_with_accuracies(tmp_path, scale=0.5)
    kw = dict(SETTINGS, epochs=4, lr=0.1)
    free = learned_soup(soup_context(model, ings, heldout, tmp_path / "a"), "affine", "layer", None, **kw)
    tied = learned_soup(soup_context(model, ings, heldout, tmp_path / "b"), "affine", "layer", None, **kw,
                         coef_l2=100.0)
    size = lambda r: torch.tensor(r.info["blocks"][0]["alpha"]).abs().max().item()  # noqa: E731
    assert size(tied) < 0.2 * size(free)


def test_mehl_official_model_order_gives_run_sh_blocks():
    """model_order=mehl_official: MEHL-Soup's run.sh (--randomseed 1) seeds numpy, utils.py get_datasets draws a
    permutation of the 1,281,167 ImageNet train images, then MEHL_soup_layer.py `np.random.shuffle(models)` cuts
    the blocks of 18: [70, 21, 45, 19, ...]. The paper preset uses it; the default (torch) cuts other blocks."""
    import numpy as np

    from soupbench.soups.learned import block_order
    from tests.helpers import compose_cfg

    saved = np.random.get_state()
    blocks = block_order(72, 18, 2, True, 1, "mehl_official")
    assert (np.random.get_state()[1] == saved[1]).all()         # the global numpy stream is untouched
    np.random.seed(1)                                            # the official script, step by step
    np.random.permutation(1_281_167)
    models = list(range(72))
    official = []
    for _ in range(2):                                           # --models_epochs: reshuffle the same list
        np.random.shuffle(models)
        official += [models[st:st + 18] for st in range(0, 72, 18)]
    np.random.set_state(saved)
    assert blocks == official and blocks[0][:3] == [70, 21, 45]
    assert block_order(72, 18, 1, True, 1)[0][:3] != [70, 21, 45]   # soupbench's default order
    table = compose_cfg(["experiment=imagenet_vit_b32"])
    assert (table.soup.mehl_plus.model_order, table.soup.mehl_plus.seed) == ("mehl_official", 1)
    assert compose_cfg([]).soup.mehl_plus.model_order == "torch"
