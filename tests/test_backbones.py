"""Every backbone builds and gives logits of the right shape; CLIP's zero-shot head; local weight files;
the BatchNorm helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import soupbench
from soupbench.backbones import recalibrate_batchnorm, set_batchnorm_eval
from soupbench.backbones.open_clip_model import create as create_clip
from soupbench.errors import CheckpointError, ConfigError
from soupbench.stages.setup import build
from tests.helpers import CPU, compose_cfg, random_split, tiny_model

FAST = {"efficientnet_lite0": 32, "efficientnet_lite1": 32, "efficientnet_lite2": 32, "timm": 32, "clip_vit_b32": 224}
SLOW = {"clip_vit_b16": 224, "clip_vit_l14": 224}


def build_backbone(option: str, tmp_path, num_classes: int = 5):
    overrides = [f"backbone={option}"]
    if option.startswith("clip"):
        overrides += ["backbone.pretrained=null", "backbone.templates=['a photo of a {}.']"]
    cfg = compose_cfg(overrides, tmp_path)
    torch.manual_seed(0)
    return build(cfg.backbone, num_classes=num_classes, class_names=[f"class {i}" for i in range(num_classes)],
                 device=torch.device("cpu"))


def test_every_backbone_option_is_covered():
    options = sorted(p.stem for p in (soupbench.CONFIG_DIR / "backbone").glob("*.yaml"))
    assert options == sorted([*FAST, *SLOW])


@pytest.mark.parametrize("option", [*FAST, *[pytest.param(o, marks=pytest.mark.slow) for o in SLOW]])
def test_backbone_builds_and_gives_logits(option, tmp_path):
    model = build_backbone(option, tmp_path).eval()
    size = {**FAST, **SLOW}[option]
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert model.head.weight.shape == (5, model.feature_dim)


def test_zero_shot_head_has_one_row_per_class_from_the_templates(clip_test_model):
    import open_clip

    classes, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a sketch of a {}."]
    torch.manual_seed(0)
    model = create_clip(clip_test_model, None, 3, [0.5] * 3, [0.5] * 3, True, templates, None, classes)
    torch.manual_seed(0)
    clip = open_clip.create_model(clip_test_model).eval()
    tok = open_clip.get_tokenizer(clip_test_model)
    with torch.no_grad():
        rows = []
        for c in classes:
            e = F.normalize(clip.encode_text(tok([t.format(c) for t in templates])), dim=-1).mean(0)
            rows.append(F.normalize(e, dim=0) * clip.logit_scale.exp())
    assert model.head.weight.shape == (3, 32)
    assert torch.allclose(model.head.weight, torch.stack(rows), atol=1e-5)
    assert (model.head.bias == 0).all()
    # the head follows the templates: one template gives other rows
    torch.manual_seed(0)
    other = create_clip(clip_test_model, None, 3, [0.5] * 3, [0.5] * 3, True, templates[:1], None, classes)
    assert not torch.allclose(other.head.weight, model.head.weight)
    # and the image side is CLIP's own tower with unit-norm features: logits = scaled cosine similarity
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        feats = F.normalize(clip.encode_image(model.normalize(x)), dim=-1)
        assert torch.allclose(model(x), feats @ torch.stack(rows).t(), atol=1e-4)


def test_zero_shot_head_is_encoded_on_the_given_device(clip_test_model, monkeypatch):
    """The text tower moves to the run's device before the prompts are encoded (checked on any machine by
    recording where the tower is when the head is built)."""
    from soupbench.backbones import open_clip_model

    seen = []
    encode = open_clip_model.zero_shot_weights
    moved_to = []
    load = open_clip_model.load_clip

    def recording_load(*args):
        clip = load(*args)
        to = clip.to
        clip.to = lambda device: moved_to.append(torch.device(device)) or to(device)
        return clip

    def recording_encode(clip, *args):
        seen.append((list(moved_to), next(clip.parameters()).device))
        return encode(clip, *args)

    monkeypatch.setattr(open_clip_model, "load_clip", recording_load)
    monkeypatch.setattr(open_clip_model, "zero_shot_weights", recording_encode)
    model = create_clip(clip_test_model, None, 2, [0.5] * 3, [0.5] * 3, True, ["a {}."], None, ["a", "b"],
                        device="cpu")
    assert seen == [([torch.device("cpu")], torch.device("cpu"))]
    assert model.head.weight.device.type == "cpu"


@pytest.mark.cuda
def test_zero_shot_head_on_a_gpu_matches_the_cpu(clip_test_model):
    kwargs = dict(num_classes=3, mean=[0.5] * 3, std=[0.5] * 3, zero_shot_head=True, templates=["a {}."],
                  cache_dir=None, class_names=["cat", "dog", "car"])
    torch.manual_seed(0)
    cpu = create_clip(clip_test_model, None, **kwargs, device="cpu")
    torch.manual_seed(0)
    gpu = create_clip(clip_test_model, None, **kwargs, device="cuda")
    assert all(p.is_cuda for p in gpu.parameters())
    torch.testing.assert_close(gpu.head.weight.cpu(), cpu.head.weight, rtol=1e-4, atol=1e-4)


def test_zero_shot_head_is_cached_for_real_weights(clip_test_model, tmp_path):
    import open_clip

    torch.manual_seed(1)
    weights = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(clip_test_model).state_dict(), weights)
    kwargs = dict(num_classes=2, mean=[0.5] * 3, std=[0.5] * 3, zero_shot_head=True,
                  templates=["a {}."], cache_dir=str(tmp_path / "zs"), class_names=["a", "b"])
    first = create_clip(clip_test_model, str(weights), **kwargs)
    cached = list((tmp_path / "zs").glob("*.safetensors"))
    assert len(cached) == 1
    second = create_clip(clip_test_model, str(weights), **kwargs)
    assert torch.equal(first.head.weight, second.head.weight)
    assert torch.equal(first.encoder.visual.conv1.weight, second.encoder.visual.conv1.weight)   # loaded, not random


def test_clip_missing_weights_name_the_file_or_the_offline_hub(clip_test_model, tmp_path):
    kwargs = dict(num_classes=2, mean=[0.5] * 3, std=[0.5] * 3, zero_shot_head=False, templates="simple_imagenet",
                  cache_dir=None)
    with pytest.raises(CheckpointError, match=f"file not found: {tmp_path}/nope.bin"):
        create_clip("ViT-B-32-quickgelu", f"{tmp_path}/nope.bin", **kwargs)
    with pytest.raises(CheckpointError, match="offline"):
        create_clip("ViT-B-32-quickgelu", "openai", **kwargs)           # HF_HUB_OFFLINE=1: fails at once
    with pytest.raises(ConfigError, match="quickgelu"):
        create_clip("ViT-B-32-nope", None, **kwargs)
    with pytest.raises(ConfigError, match="one class name per class"):
        create_clip(clip_test_model, None, **{**kwargs, "zero_shot_head": True}, class_names=["a"])


def test_timm_by_name_loads_a_local_file_and_its_preprocessing(tmp_path):
    import timm
    from safetensors.torch import save_file

    from soupbench.backbones.timm_model import create

    torch.manual_seed(3)
    net = timm.create_model("resnet18", pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "r18.safetensors")
    model = create("resnet18", str(tmp_path / "r18.safetensors"), 7, None, None)
    assert torch.equal(model.encoder.conv1.weight, net.conv1.weight)       # the file's weights, head dropped
    assert model.head.weight.shape == (7, 512)
    assert torch.allclose(model.pixel_mean.flatten() / 255, torch.tensor([0.485, 0.456, 0.406]))
    with pytest.raises(CheckpointError, match="file not found"):
        create("resnet18", str(tmp_path / "missing.pth"), 7, None, None)


def test_head_and_logits_stay_fp32_under_bf16_autocast(clip_test_model):
    """At CLIP's logit scale (100) bf16 logits round classes 0.05 apart to one value; the head runs in fp32."""
    from soupbench.evaluate import predict
    from soupbench.runtime import autocast, use_bf16

    torch.manual_seed(0)
    names = [f"class {i}" for i in range(10)]
    model = create_clip(clip_test_model, None, 10, [0.5] * 3, [0.5] * 3, True, ["a {}."], None, names).eval()
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast(cpu, "bf16"):
        out = model(x)
        feats = model.features(x)
    assert out.dtype == torch.float32 and feats.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(feats.float(), model.head.weight, model.head.bias))
    assert predict(model, x, 8, cpu, precision="bf16").dtype == torch.float32
    with torch.no_grad():
        fp32 = model(x)
    assert not torch.equal(out, fp32)                 # the backbone did run in bf16
    assert use_bf16(torch.device("cuda"), "auto") and not use_bf16(cpu, "auto") and not use_bf16(cpu, "fp32")
    with pytest.raises(ConfigError, match="eval.precision"):
        use_bf16(cpu, "fp16")


def test_set_batchnorm_eval_counts():
    model = tiny_model().train()
    assert set_batchnorm_eval(model) == 1 and not model.encoder[1].training and model.encoder[0].training


def test_bn_recalibration_gives_the_exact_statistics():
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["encoder.1.running_mean"].fill_(5.0)
    state["encoder.1.running_var"].fill_(9.0)
    images = random_split(n=40).images
    new = recalibrate_batchnorm(model, state, images, batch_size=40, device=CPU)
    model.load_state_dict(state)
    with torch.no_grad():
        conv = model.encoder[0](model.normalize(images))
    torch.testing.assert_close(new["encoder.1.running_mean"], conv.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new["encoder.1.running_var"], conv.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert torch.equal(new["encoder.0.weight"], state["encoder.0.weight"])       # weights untouched
    assert model.encoder[1].momentum == 0.1 and not model.encoder[1].training
