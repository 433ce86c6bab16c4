"""Bring your own models: checkpoints written the way other tools write them (timm's train.py saver, Lightning's
Trainer, DataParallel/DDP and torch.compile wrappers, timm's and huggingface_hub's folder writers, open_clip's
training layout) read as ingredients, every bad input named in one line, soups exported and loaded back by the
library itself with soupbench's logits."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from soupbench.backbones import timm_model
from soupbench.checkpoints import read_checkpoint, source_files
from soupbench.errors import CheckpointError, ConfigError
from soupbench.export import export_soup
from soupbench.importers import import_files, read_weights
from soupbench.start_check import check_start

ARCH = "test_convnext"      # timm's tiny ConvNeXt: its head holds a norm (head.norm) beside the classifier (head.fc)


def classifier(num_classes: int = 3, seed: int = 0, mean=None, std=None):
    torch.manual_seed(seed)
    return timm_model.create(ARCH, None, num_classes, mean, std)


def timm_net(model, noise: float = 0.0, seed: int = 0) -> nn.Module:
    """The timm network a user would train: soupbench's weights in timm's own module, plus a perturbation."""
    net = timm.create_model(ARCH, num_classes=model.num_classes)
    net.load_state_dict(model.source_keys.source_state(model.state_dict()))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return net


def images(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalised(x: torch.Tensor, model) -> torch.Tensor:
    mean = torch.tensor(model.source_keys.mean).view(1, -1, 1, 1)
    std = torch.tensor(model.source_keys.std).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


def test_timm_backbone_weights_drop_only_the_classifier(tmp_path):
    """timm's own convnext weights: `head.norm` is the encoder's, only `head.fc` (pretrained_cfg['classifier'])
    is replaced (every head.* key used to be dropped: 'head.norm.weight missing')."""
    src = timm.create_model(ARCH, num_classes=1000)
    with torch.no_grad():
        src.head.norm.weight.fill_(0.5)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model = timm_model.create(ARCH, str(tmp_path / "w.safetensors"), 3, None, None)
    assert torch.equal(model.state_dict()["encoder.head.norm.weight"], src.head.norm.weight)
    assert model.head.weight.shape == (3, src.num_features)


def test_every_format_reads_as_the_same_weights(tmp_path):
    from huggingface_hub import save_torch_state_dict
    from timm.models import save_for_hf
    from timm.utils import CheckpointSaver

    model = classifier()
    net = timm_net(model, 0.01)
    template = model.state_dict()
    want = {f"encoder.{k}" if not k.startswith("head.fc.") else k.replace("head.fc.", "head."): v
            for k, v in net.state_dict().items()}
    files = {}
    torch.save(net.state_dict(), files.setdefault("plain", tmp_path / "plain.pth"))
    save_file(net.state_dict(), str(files.setdefault("safetensors", tmp_path / "w.safetensors")))
    torch.save(nn.DataParallel(net).state_dict(), files.setdefault("ddp", tmp_path / "ddp.pt"))
    torch.save(torch.compile(net).state_dict(), files.setdefault("compile", tmp_path / "compiled.pt"))
    torch.save(nn.DataParallel(torch.compile(net)).state_dict(), files.setdefault("both", tmp_path / "both.pt"))
    # timm train.py's saver: state_dict, state_dict_ema, its argparse args, the optimizer, metric
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    (tmp_path / "timm").mkdir()
    saver = CheckpointSaver(net, opt, args=argparse.Namespace(lr=0.1, model=ARCH), model_ema=net,
                            checkpoint_dir=str(tmp_path / "timm"), recovery_dir=str(tmp_path / "timm"))
    saver.save_checkpoint(epoch=0, metric=0.5)
    files["timm"] = tmp_path / "timm" / "model_best.pth.tar"
    # a plain training script that keeps numpy records beside the weights
    torch.save({"state_dict": net.state_dict(), "best_acc": np.float64(0.5), "history": np.array([0.1, 0.2])},
               files.setdefault("numpy_records", tmp_path / "records.pth"))
    save_for_hf(net, str(tmp_path / "hf"), safe_serialization=True)
    files["huggingface"] = tmp_path / "hf"
    (tmp_path / "sharded").mkdir()
    save_torch_state_dict(net.state_dict(), str(tmp_path / "sharded"), max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    files["sharded"] = tmp_path / "sharded"
    torch.save({"epoch": 3, "name": "run", "state_dict": nn.DataParallel(net).state_dict(), "optimizer":
                opt.state_dict()}, files.setdefault("open_clip_layout", tmp_path / "epoch_3.pt"))
    for kind, path in files.items():
        state, info = read_weights(path, template, model.source_keys)
        assert list(state) == list(template), kind
        assert all(torch.equal(state[k], want[k]) for k in want), kind
        assert info["head"] == "file", kind
    assert read_checkpoint(files["timm"])[1]["format"] == "timm"
    ema, _ = read_weights(files["timm"], template, model.source_keys, ema=True)
    assert torch.equal(ema["head.weight"], want["head.weight"])
    with pytest.raises(CheckpointError, match="ingredients.ema=true but the file has no state_dict_ema"):
        read_weights(files["plain"], template, model.source_keys, ema=True)
    with pytest.raises(CheckpointError, match="ingredients.format=lightning but this looks like a timm"):
        read_checkpoint(files["timm"], "lightning")
    # a folder of mixed files is listed in natural order, model folders as one entry each
    listed = source_files(tmp_path)
    assert tmp_path / "hf" in listed and tmp_path / "plain.pth" in listed
    assert source_files(str(tmp_path / "*.pt")) == [tmp_path / "both.pt", tmp_path / "compiled.pt",
                                                     tmp_path / "ddp.pt", tmp_path / "epoch_3.pt"]


def test_lightning_checkpoint_from_its_trainer(tmp_path):
    """A real Lightning .ckpt (Trainer.save_checkpoint): the network under the module's attribute name, a loss
    module's buffers beside it, hyper-parameters and optimizer state around it."""
    lightning = pytest.importorskip("lightning")
    model = classifier()

    class Module(lightning.LightningModule):
        def __init__(self, lr: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = timm_net(model)
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(3))       # a buffer outside the network

        def training_step(self, batch, _):
            return self.criterion(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    trainer = lightning.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state, info = read_weights(tmp_path / "last.ckpt", model.state_dict(), model.source_keys)
    assert info["format"] == "lightning" and info["prefix"] == "net." and info["dropped_outside_prefix"] == 1
    assert torch.equal(state["head.weight"], module.net.head.fc.weight.detach())


def test_bad_inputs_are_named_in_one_line(tmp_path, caplog):
    model = classifier()
    template = model.state_dict()
    net = timm_net(model, 0.01)
    # another architecture
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match=r"resnet.pt: its tensor names do not match.*first in the file that "
                                              r"match nothing \['conv1.0.weight'.*not found \['stem.0.weight'"):
        read_weights(tmp_path / "resnet.pt", template, model.source_keys)
    # a missing tensor
    state = net.state_dict()
    del state["stages.0.blocks.0.conv_dw.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt: .*not found \['stages.0.blocks.0.conv_dw.weight'\]"):
        read_weights(tmp_path / "missing.pt", template, model.source_keys)
    # an extra tensor
    torch.save({**net.state_dict(), "aux.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra.pt: 1 tensors the backbone does not have, e.g. \['aux.weight'\]"):
        read_weights(tmp_path / "extra.pt", template, model.source_keys)
    # the network twice under two prefixes (a Lightning module with an EMA copy): ambiguous, then chosen
    twice = {**{f"model.{k}": v for k, v in net.state_dict().items()},
             **{f"ema_model.{k}": v + 0.01 if v.is_floating_point() else v for k, v in net.state_dict().items()}}
    torch.save(twice, tmp_path / "twice.pt")
    with pytest.raises(CheckpointError, match="twice.pt: ambiguous: .*'model.'.*'ema_model.'.*ingredients.key_map"):
        read_weights(tmp_path / "twice.pt", template, model.source_keys)
    state, _ = read_weights(tmp_path / "twice.pt", template, model.source_keys, key_map={r"^ema_model\..*": ""})
    assert torch.equal(state["head.weight"], net.head.fc.weight.detach())
    # the same network saved under two attribute names (aliases) is one reading, not an ambiguity
    torch.save({**{f"model.{k}": v for k, v in net.state_dict().items()},
                **{f"net.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "alias.pt")
    assert read_weights(tmp_path / "alias.pt", template, model.source_keys)[1]["prefix"] == "net."
    # timm's names under a wrapper attribute called `encoder` read as timm's, head included
    torch.save({f"encoder.{k}": v for k, v in net.state_dict().items()}, tmp_path / "encoder_attr.pt")
    state, info = read_weights(tmp_path / "encoder_attr.pt", template, model.source_keys)
    assert info["head"] == "file" and torch.equal(state["head.weight"], net.head.fc.weight.detach())
    # a whole pickled module
    torch.save(net, tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"module.pt: needs unpickling to read \(timm.models.convnext.ConvNeXt\)"
                                              r".*state_dict\(\)"):
        read_weights(tmp_path / "module.pt", template, model.source_keys)
    # another class count
    torch.save(timm_net(classifier(5)).state_dict(), tmp_path / "five.pt")
    with pytest.raises(CheckpointError, match=r"five.pt: 'head.weight' has shape \(5, .*another number of classes"):
        read_weights(tmp_path / "five.pt", template, model.source_keys)
    # a file that is no checkpoint, a truncated one
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read checkpoint"):
        read_weights(tmp_path / "junk.pt", template, model.source_keys)
    save_file(net.state_dict(), str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: cannot read safetensors file"):
        read_weights(tmp_path / "cut.safetensors", template, model.source_keys)
    # settings that name nothing
    with pytest.raises(ConfigError, match="ingredients.from_files: .*nowhere: no such file or folder"):
        source_files(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="ingredients.key_map: "):
        read_weights(tmp_path / "twice.pt", template, model.source_keys, key_map={"(": ""})
    # bf16 among fp32: cast to the backbone's dtype, with a warning naming the file
    torch.save({k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}, tmp_path / "bf16.pt")
    state, info = read_weights(tmp_path / "bf16.pt", template, model.source_keys)
    assert state["head.weight"].dtype == torch.float32 and info["cast_from"] == ["bfloat16"]
    with caplog.at_level(logging.WARNING, logger="soupbench"):
        import_files([tmp_path / "bf16.pt"], tmp_path / "store", template, model.source_keys, "", lambda s, fp: 0.0)
    assert any("bf16.pt: stored as bfloat16, cast to the backbone's float32" in r.message for r in caplog.records)


def test_hand_written_ingredient_record_is_refused_by_name(tmp_path):
    from soupbench.ingredients import list_ingredients

    save_file({"w": torch.zeros(1)}, str(tmp_path / "mine.safetensors"))
    (tmp_path / "mine.json").write_text('{"id": "mine", "heldout_acc": 50.0}')
    with pytest.raises(CheckpointError, match=r"mine.json: not an ingredient record \(no \['fingerprint'\].*"
                                              "ingredients.from_files"):
        list_ingredients(tmp_path)


def test_start_check_tells_the_true_start_from_another(tmp_path):
    """Ingredients fine-tuned from θ0 pass; the same ingredients against a start with another head (another
    linear probe) fail on the head."""
    model = classifier()
    base = model.state_dict()
    files = []
    for i in range(3):
        path = tmp_path / f"ft{i}.pt"
        torch.save(timm_net(model, 0.01, seed=i).state_dict(), path)
        files.append(path)
    ings = import_files(files, tmp_path / "store", base, model.source_keys, "", lambda s, fp: 0.0)
    assert check_start(ings, base, 10.0)["passed"]
    other = {**base, "head.weight": base["head.weight"] + 0.5}
    result = check_start(ings, other, 10.0)
    assert not result["passed"] and result["failed"][0]["tensor"] == "head.weight"


def test_exported_soups_load_in_their_library_with_the_same_logits(tmp_path):
    from soupbench.soups.averaging import average

    model = classifier(seed=1, mean=[0.4, 0.45, 0.5], std=[0.2, 0.25, 0.3])   # not the architecture's own
    files = []
    for i in range(2):
        torch.save(timm_net(model, 0.05, seed=i).state_dict(), tmp_path / f"m{i}.pt")
        files.append(tmp_path / f"m{i}.pt")
    ings = import_files(files, tmp_path / "store", model.state_dict(), model.source_keys, "", lambda s, fp: 0.0)
    soup = average(ings)
    model.load_state_dict(soup)
    x = images()
    with torch.no_grad():
        want = model.eval()(x)
    paths = export_soup(soup, model.source_keys, tmp_path / "export", "uniform", ["state_dict", "huggingface"], "fp")
    file, folder = paths
    loaded = {
        "pretrained_cfg_overlay": timm.create_model(ARCH, pretrained=True, num_classes=3,
                                                    pretrained_cfg_overlay=dict(file=str(file), num_classes=3)),
        "local-dir": timm.create_model(f"local-dir:{folder}", pretrained=True),
    }
    for how, net in loaded.items():
        with torch.no_grad():
            got = net.eval()(normalised(x, model))
        assert torch.allclose(got, want, atol=1e-5), how
    cfg = timm.data.resolve_data_config({}, model=loaded["local-dir"])
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (model.source_keys.mean, model.source_keys.std)
    # written once: a second export of the same soup leaves the files alone
    mtime = file.stat().st_mtime_ns
    export_soup(soup, model.source_keys, tmp_path / "export", "uniform", ["state_dict"], "fp")
    assert file.stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="open_clip is for CLIP backbones"):
        export_soup(soup, model.source_keys, tmp_path / "export", "uniform", ["open_clip"], "fp")


def test_timm_resnet_soup_loads_into_torchvision(tmp_path):
    """timm's ResNet keys are torchvision's: the exported state dict loads into torchvision.models.resnet18."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = timm_model.create("resnet18", None, 4, None, None)
    (path,) = export_soup(model.state_dict(), model.source_keys, tmp_path, "soup", ["state_dict"], "fp")
    from safetensors.torch import load_file

    tv = torchvision.models.resnet18(num_classes=4)
    tv.load_state_dict(load_file(str(path)))
    x = images(4, 64)
    with torch.no_grad():
        assert torch.allclose(tv.eval()(normalised(x, model)), model.eval()(x), atol=1e-5)


def test_open_clip_soup_loads_with_open_clip(clip_test_model, tmp_path):
    import open_clip

    from soupbench.backbones import open_clip_model

    torch.manual_seed(0)
    model = open_clip_model.create(clip_test_model, None, 5, [0.5] * 3, [0.5] * 3, False, "simple_imagenet", None)
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
    (path,) = export_soup(model.state_dict(), model.source_keys, tmp_path, "greedy", ["open_clip"], "fp")
    clip, _, _ = open_clip.create_model_and_transforms(clip_test_model, pretrained=str(path))
    from safetensors.torch import load_file

    head = load_file(str(tmp_path / "greedy.head.safetensors"))
    x = images(4, 32)
    with torch.no_grad():
        got = clip.eval().encode_image(normalised(x, model), normalize=True) @ head["weight"].T + head["bias"]
        assert torch.allclose(got, model.eval()(x), atol=1e-5)
    # and the export reads back as an ingredient (open_clip names + the model-soups head name)
    torch.save({**load_file(str(path)), **{f"classification_head.{k}": v for k, v in head.items()}},
               tmp_path / "back.pt")
    state, info = read_weights(tmp_path / "back.pt", model.state_dict(), model.source_keys)
    assert info["head"] == "file" and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
