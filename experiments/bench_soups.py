"""Soup construction at paper scale, with no download: soupbench's engine beside a reference written the way
the original model-soups / MEHL-Soup code works, in the same process, so every figure is also a ratio.

Workload: a ViT (random weights; time and memory do not depend on the values) as the pretrained model, K
ingredients = pretrained + small random task vectors stored as safetensors, N held-out images of random
pixels. Sizes are settings (`--preset cpu|gpu`, then any flag), so the same command runs small on a CPU.

    python experiments/bench_soups.py --preset gpu          # H100: 72 x ViT-B/32, 10k images
    python experiments/bench_soups.py --preset cpu          # 2 cores: a ViT-Tiny at 64 px, 12 ingredients

What is timed (soupbench | reference):
- load: safetensors straight to the device | torch.load of a pickled state dict, then .to(device)
- eval pass: uint8 images resident on the device, bf16 autocast on CUDA | JPEG files decoded by a
  DataLoader every pass, fp32
- greedy soup: K individual passes + K-1 tries, running sum on the device | per try: torch.load, merge on the
  CPU, load_state_dict, a decoding pass (extrapolated from `--ref-tries` tries)
- learned step (MEHL-Soup+ block, HL-Soup+ and learned soup+ with all K): one forward/backward of the single
  soup + one GEMV per tensor | an autograd graph through θ = c + Σ α τ over the block's models
- peak memory: GPU (max allocated per phase) and host (VmHWM)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soupbench.backbones import Classifier  # noqa: E402
from soupbench.data import Split  # noqa: E402
from soupbench.evaluate import accuracy, predict  # noqa: E402
from soupbench.ingredients import Ingredient  # noqa: E402
from soupbench.io.atomic import save_weights, write_json
from soupbench.io.hashing import fingerprint
from soupbench.io.weights import load_weights
from soupbench.runtime import autocast  # noqa: E402
from soupbench.soups import greedy, learned  # noqa: E402
from soupbench.soups.context import SoupContext  # noqa: E402

PRESETS = {
    "gpu": dict(model="vit_base_patch32_224", image_size=224, num_classes=1000, k=72, images=10_000, block=18,
                batch=256, eval_batch=1024, steps=20, ref_tries=2, ref_steps=5, mehl_epochs=5, workers=8),
    "cpu": dict(model="vit_tiny_patch16_224", image_size=64, num_classes=100, k=12, images=512, block=4,
                batch=64, eval_batch=256, steps=5, ref_tries=2, ref_steps=3, mehl_epochs=1, workers=2),
}


PHASES = ("load", "eval", "greedy", "mehl_plus_step", "mehl_plus_protocol", "hl_plus_all_k_step",
          "learned_plus_all_k_step")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default=None, help="default: gpu when CUDA is there, else cpu")
    for k, v in PRESETS["cpu"].items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", type=Path, default=Path("outputs/bench"), help="ingredients and JPEGs (reused)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: <workdir>/bench_<preset>.json)")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: " + ",".join(PHASES))
    args = ap.parse_args()
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                               else args.device)
    args.preset = args.preset or ("gpu" if args.device.type == "cuda" else "cpu")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.skip = set(filter(None, args.skip.split(",")))
    return args


# ------------------------------------------------------------------------------------------------ helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def host_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def make_model(args) -> Classifier:
    import timm

    torch.manual_seed(0)
    net = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.image_size)
    return Classifier(net, net.num_features, args.num_classes, [0.5] * 3, [0.5] * 3)


def prepare(args, model: Classifier) -> tuple[list[Ingredient], list[Path], Split, Path]:
    """K safetensors ingredients, the reference's pickled copies of the few it loads, N images (tensor + JPEGs)."""
    tag = f"{args.model}-{args.image_size}-{args.num_classes}"
    root = args.workdir / tag
    base = model.state_dict()
    ings, pts = [], []
    for i in range(args.k):
        path = root / f"ingredient{i:03d}.safetensors"
        if not path.is_file():
            g = torch.Generator().manual_seed(i)
            save_weights(path, {n: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                                for n, v in base.items()})
        ings.append(Ingredient(f"g{i:03d}", path, {"fingerprint": fingerprint(load_weights(path)),
                                                   "heldout_acc": 0.0}))
    for i in range(min(args.k, args.ref_tries + 1)):
        pt = root / f"ingredient{i:03d}.pt"
        if not pt.is_file():
            tmp = pt.with_suffix(".pt.tmp")
            torch.save(load_weights(ings[i].path), tmp)
            os.replace(tmp, pt)
        pts.append(pt)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=g)
    labels = torch.randint(0, args.num_classes, (args.images,), generator=g)
    jpeg_dir = root / f"jpeg{args.images}"
    if not (jpeg_dir / "done").is_file():
        from PIL import Image

        jpeg_dir.mkdir(parents=True, exist_ok=True)
        for i in range(args.images):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(jpeg_dir / f"{i:06d}.jpg", quality=90)
        (jpeg_dir / "done").touch()
    return ings, pts, Split("heldout", images, labels), jpeg_dir


class JpegFolder(torch.utils.data.Dataset):
    """The reference's data path: every pass opens and decodes every JPEG (as a torchvision ImageFolder)."""

    def __init__(self, folder: Path, labels: torch.Tensor) -> None:
        self.files = sorted(folder.glob("*.jpg"))
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.open(self.files[i]).convert("RGB")
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
        return x.permute(2, 0, 1), self.labels[i]


def reference_eval(model: Classifier, loader, device: torch.device) -> float:
    """fp32, host-decoded batches: the original code's evaluation loop."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return 100.0 * correct / len(loader.dataset)


def reference_coefficient_step(model, centre, taus, names, buffers, alpha, opt, x, y) -> None:
    """HL-Soup as first written: θ_l = c_l + Σ_i α_il τ_il as an autograd graph through every model."""
    from torch.func import functional_call

    theta = {n: centre[n] + torch.einsum("b,b...->...", alpha[:, j], taus[n]) for j, n in enumerate(names)}
    with autocast(x.device):
        loss = torch.nn.functional.cross_entropy(functional_call(model, {**buffers, **theta}, (x,)).float(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


# ------------------------------------------------------------------------------------------------ phases


def bench_load(ings, pts, device) -> dict:
    n = min(len(ings), 4)
    size = ings[0].path.stat().st_size
    load_weights(ings[0].path, device)                                   # warm the page cache and allocator
    _, t = timed(lambda: [load_weights(g.path, device) for g in ings[:n]], device)
    _, tr = timed(lambda: [{k: v.to(device) for k, v in torch.load(p, weights_only=True).items()}
                           for p in pts[:n]], device)
    nr = min(n, len(pts))
    return {"bytes_per_ingredient": size, "soupbench_gb_s": n * size / t / 1e9,
            "soupbench_s_per_ingredient": t / n, "reference_s_per_ingredient": tr / nr,
            "ratio": (tr / nr) / (t / n)}


def bench_eval(args, model, heldout, loader) -> dict:
    dev = args.device
    images = heldout.images.to(dev) if dev.type == "cuda" else heldout.images
    predict(model, images[: args.eval_batch], args.eval_batch, dev)         # warm-up
    _, t = timed(lambda: predict(model, images, args.eval_batch, dev), dev)
    _, tr = timed(lambda: reference_eval(model, loader, dev), dev)
    return {"soupbench_images_s": len(images) / t, "soupbench_pass_s": t,
            "reference_images_s": len(images) / tr, "reference_pass_s": tr, "ratio": tr / t}


def bench_greedy(args, model, ings, pts, heldout, loader) -> dict:
    dev = args.device
    images = heldout.images.to(dev) if dev.type == "cuda" else heldout.images
    passes = 0

    def heldout_acc(state) -> float:
        nonlocal passes
        passes += 1
        return accuracy(predict(model, images, args.eval_batch, dev, state), heldout)

    reset_gpu_peak(dev)
    t0 = time.perf_counter()
    for g in ings:                                     # individual held-out accuracies rank the ingredients
        g.meta["heldout_acc"] = heldout_acc(load_weights(g.path, dev))
    t_individual = time.perf_counter() - t0
    ctx = SoupContext(ingredients=ings, start={}, heldout=heldout, model=model, device=dev,
                      work_dir=args.workdir / "work", heldout_accuracy=heldout_acc,
                      ingredient_scores=lambda g, s: None)
    result, t_greedy = timed(lambda: greedy.build(ctx), dev)
    out = {"soupbench_s": t_individual + t_greedy, "individual_passes_s": t_individual, "tries_s": t_greedy,
           "passes": passes, "members": len(result.members), "peak_gpu_gib": gpu_peak_gib(dev)}

    # reference: what one individual evaluation and one try cost, the original way
    ref_model = make_model(args).to(dev)

    def ref_individual(p: Path) -> None:
        ref_model.load_state_dict(torch.load(p, weights_only=True))
        reference_eval(ref_model, loader, dev)

    def ref_try(soup: dict, n: int, p: Path) -> dict:
        cand = torch.load(p, weights_only=True)                           # CPU merge, as the original code
        new = {k: (soup[k] * n + cand[k]) / (n + 1) if v.is_floating_point() else v for k, v in soup.items()}
        ref_model.load_state_dict(new)
        reference_eval(ref_model, loader, dev)
        return new

    _, t_ind = timed(lambda: ref_individual(pts[0]), dev)
    soup = torch.load(pts[0], weights_only=True)
    tries = []
    for i, p in enumerate(pts[1:1 + args.ref_tries]):
        soup, t = timed(lambda p=p, i=i, s=soup: ref_try(s, i + 1, p), dev)
        tries.append(t)
    t_try = sum(tries) / len(tries)
    ref_total = args.k * t_ind + (args.k - 1) * t_try
    out |= {"reference_s_extrapolated": ref_total, "reference_individual_s": t_ind, "reference_try_s": t_try,
            "reference_measured_tries": len(tries), "ratio": ref_total / out["soupbench_s"]}
    return out


def block_setup(ings, model, dev, b, parameterisation):
    names = learned.learnable_names(model)
    states = [load_weights(g.path, dev) for g in ings[:b]]
    centre, buffers, directions, _ = learned.block_tensors(states, names, parameterisation, None, True)
    return names, centre, directions, buffers


def bench_learned_step(args, model, ings, heldout, b: int, parameterisation: str, with_reference: bool) -> dict:
    """Mean time of one inner step with b models in the block (after warm-up), and the phase's peak memory."""
    dev = args.device
    x, y = heldout.images[: args.batch].to(dev), heldout.labels[: args.batch].to(dev)
    reset_gpu_peak(dev)
    t = engine_steps(args, model, ings, b, parameterisation, x, y)
    out = {"models": b, "batch": args.batch, "soupbench_step_ms": 1000 * t, "soupbench_peak_gpu_gib": gpu_peak_gib(dev)}
    if with_reference:
        reset_gpu_peak(dev)
        try:
            tr = reference_steps(args, model, ings, b, x, y)
            out |= {"reference_step_ms": 1000 * tr, "reference_peak_gpu_gib": gpu_peak_gib(dev), "ratio": tr / t}
        except torch.OutOfMemoryError:
            out["reference_step_ms"] = "out of memory"
    return out


def engine_steps(args, model, ings, b, parameterisation, x, y) -> float:
    names, centre, directions, buffers = block_setup(ings, model, args.device, b, parameterisation)
    param = torch.zeros(b, len(names), device=args.device, requires_grad=True)
    opt = torch.optim.AdamW([param], lr=0.01, weight_decay=0.0)

    def step():
        return learned.inner_step(model, param, opt, centre, directions, names, buffers, x, y, parameterisation,
                                  1.0, 1.0, clip="model", precision="auto")

    step()
    _, t = timed(lambda: [step() for _ in range(args.steps)], args.device)
    return t / args.steps


def reference_steps(args, model, ings, b, x, y) -> float:
    names, centre, taus, buffers = block_setup(ings, model, args.device, b, "affine")
    alpha = torch.zeros(b, len(names), device=args.device, requires_grad=True)
    opt = torch.optim.AdamW([alpha], lr=0.01, weight_decay=0.0)
    reference_coefficient_step(model, centre, taus, names, buffers, alpha, opt, x, y)
    _, t = timed(lambda: [reference_coefficient_step(model, centre, taus, names, buffers, alpha, opt, x, y)
                          for _ in range(args.ref_steps)], args.device)
    return t / args.ref_steps


def bench_mehl_protocol(args, model, ings, heldout) -> dict:
    """The whole MEHL-Soup+ build (load, learn, fold in every block, save progress) as the engine runs it."""
    dev = args.device
    reset_gpu_peak(dev)
    work = args.workdir / "work" / "mehl"
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    ctx = SoupContext(ingredients=ings, start={}, heldout=heldout, model=model, device=dev, work_dir=work,
                      heldout_accuracy=lambda s: 0.0, ingredient_scores=lambda g, s: None)
    _, t = timed(lambda: learned.build(ctx, parameterisation="affine", granularity="layer", block_size=args.block,
                                       shuffle_models=True, normalize_directions=True, epochs=args.mehl_epochs,
                                       batch_size=args.batch, lr=0.01, schedule="cosine", max_grad_norm=1.0,
                                       clip="model", logit_scale="fixed"), dev)
    blocks = math.ceil(args.k / args.block)
    steps = blocks * args.mehl_epochs * math.ceil(args.images / args.batch)
    shutil.rmtree(work, ignore_errors=True)
    return {"blocks": blocks, "inner_steps": steps, "epochs": args.mehl_epochs, "wall_s": t,
            "peak_gpu_gib": gpu_peak_gib(dev)}


def main() -> None:
    args = parse()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = args.device
    model = make_model(args).to(dev).eval()
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    ings, pts, heldout, jpeg_dir = prepare(args, model)
    setup_s = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(JpegFolder(jpeg_dir, heldout.labels), batch_size=args.eval_batch,
                                         num_workers=args.workers, shuffle=False)
    report: dict = {
        "preset": args.preset, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
        or platform.machine(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": args.model, "parameters": params, "tensors": len(learned.learnable_names(model)),
        "image_size": args.image_size, "num_classes": args.num_classes, "k": args.k, "heldout_images": args.images,
        "setup_s": setup_s, "settings": {k: getattr(args, k) for k in PRESETS["cpu"]},
    }

    out = args.out or args.workdir / f"bench_{args.preset}.json"

    def phase(name: str, fn) -> None:
        if name in args.skip:
            return
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        report[name] = fn()
        print(f"[bench] {name}: {json.dumps(report[name])}", file=sys.stderr, flush=True)
        write_json(out, {**report, "complete": False})    # a run stopped by a time limit keeps its phases so far

    phase("load", lambda: bench_load(ings, pts, dev))
    phase("eval", lambda: bench_eval(args, model, heldout, loader))
    phase("greedy", lambda: bench_greedy(args, model, ings, pts, heldout, loader))
    phase("mehl_plus_step", lambda: bench_learned_step(args, model, ings, heldout, args.block, "affine", True))
    phase("mehl_plus_protocol", lambda: bench_mehl_protocol(args, model, ings, heldout))
    if "mehl_plus_step" in report and "load" in report:       # the paper's protocol: 1K inner steps x 4 blocks of 18
        report["mehl_plus_paper_protocol_estimate_s"] = (
            4 * 1000 * report["mehl_plus_step"]["soupbench_step_ms"] / 1000
            + args.k * report["load"]["soupbench_s_per_ingredient"])
    phase("hl_plus_all_k_step", lambda: bench_learned_step(args, model, ings, heldout, args.k, "affine", False))
    phase("learned_plus_all_k_step",
          lambda: bench_learned_step(args, model, ings, heldout, args.k, "simplex", False))
    report["host_peak_mb"] = host_peak_mb()
    report["complete"] = True
    write_json(out, report)
    print(json.dumps(report, indent=2))
    print(f"[bench] written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
