"""The first GPU, used well: one command that, on one H100/H200, runs within 8 minutes

1. the tests that need a real GPU (`pytest -m cuda`),
2. the soup-construction benchmark at paper scale (`experiments/bench_soups.py --preset gpu`),
3. a PACS table: EfficientNet-Lite0, leave-sketch-out (`experiment=pacs_lodo`), a few ingredients, one seed,

writes each step's JSON and `gpu_check.json` (every step's status, wall time and headline figures) under
`experiments/results/`, copies them to `$OUT` when that is set (the device tool brings back what is there),
and prints one summary. Each step runs under its own time limit (`--budget-*`), so a slow step leaves the
others their time and the summary says which one ran out.

The GPU machine's image has torch, torchvision, timm, safetensors and PIL but not hydra-core, omegaconf or
open_clip, and reaches no registry; the working tree travels but nothing beside it. So first, on a machine
that has them, copy the wheels (Python 3.12) and the PACS folder into the git-ignored `.gpu-bundle/`:

    python experiments/gpu_check.py --bundle WHEELS_DIR PACS_DIR      # or: make gpu-bundle WHEELS=... PACS=...

and run on the GPU machine, naming `.gpu-bundle` in the device tool's `carry` (64 MiB in all):

    python3 experiments/gpu_check.py

The wheels are installed into /tmp/site when hydra is missing (no index, no dependencies). Without a GPU:

    python experiments/gpu_check.py --cpu-dry-run       # every size shrunk; PACS from --pacs, $SOUPBENCH_PACS
                                                        # or .gpu-bundle/pacs, else MNIST (and it says so)

The dry run writes under `outputs/gpu_check_dry_run/` (git-ignored), never over the GPU's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu-bundle"
SITE = Path("/tmp/site")
LIMIT_MIB = 64

PACS_SOUPS = "[best_individual,uniform,greedy,learned_plus,hl_plus,ensemble]"
GPU = {
    "tests": ["-m", "cuda"],
    "bench": ["--preset", "gpu"],
    "pacs": ["experiment=pacs_lodo", "device=cuda", "finetune.num_ingredients=4", "finetune.space.epochs=[3]",
             "dataset.image_size=128", f"soup={PACS_SOUPS}", "finetune.workers=8"],
    "budgets": {"tests": 90, "bench": 230, "pacs": 140},     # 460 s, + ~15 s of set-up: 8 minutes
}
DRY = {
    "tests": ["-m", "cuda"],
    "bench": ["--preset", "cpu", "--device", "cpu", "--model", "vit_tiny_patch16_224", "--image-size", "32",
              "--num-classes", "10", "--k", "3", "--images", "32", "--block", "2", "--batch", "16",
              "--eval-batch", "32", "--steps", "1", "--ref-tries", "1", "--ref-steps", "1", "--mehl-epochs", "1",
              "--workers", "0"],
    "pacs": ["experiment=pacs_lodo", "device=cpu", "finetune.num_ingredients=2", "finetune.space.epochs=[1]",
             "dataset.image_size=32", "~dataset.fractions",
             "+dataset.fractions={train: 0.03, heldout: 0.03, test: 0.03, unused: 0.91}", "dataset.num_ood=64",
             "finetune.linear_probe.max_iter=5", "soup=[best_individual,uniform,greedy,ensemble]"],
    "mnist": ["experiment=tiny", "device=cpu", "dataset.num_train=64", "dataset.num_heldout=48",
              "dataset.num_test=48", "dataset.num_ood=48", "finetune.linear_probe.max_iter=5",
              "soup=[best_individual,uniform,greedy,ensemble]"],
    "budgets": {"tests": 300, "bench": 300, "pacs": 300},
}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="run every step end to end on the CPU, shrunk")
    ap.add_argument("--bundle", nargs=2, metavar=("WHEELS_DIR", "PACS_DIR"),
                    help="copy the wheels and PACS into .gpu-bundle/ for the device tool's carry, then exit")
    ap.add_argument("--pacs", type=Path, default=None, help="PACS folder (default: $SOUPBENCH_PACS or "
                    ".gpu-bundle/pacs)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default: experiments/results "
                    "on a GPU, outputs/gpu_check_dry_run in a dry run)")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: tests,bench,pacs")
    for step in ("tests", "bench", "pacs"):
        ap.add_argument(f"--budget-{step}", type=int, default=None, help=f"seconds for the {step} step")
    return ap.parse_args()


def make_bundle(wheels: Path, pacs: Path) -> None:
    """.gpu-bundle/wheels/*.whl and .gpu-bundle/pacs/<domain>/<class>/*.jpg; says what would travel."""
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        sys.exit(f"gpu_check: no wheels in {wheels}")
    if not all((pacs / d).is_dir() for d in ("photo", "art_painting", "cartoon", "sketch")):
        sys.exit(f"gpu_check: {pacs} is not a PACS folder (<domain>/<class>/*.jpg)")
    shutil.rmtree(BUNDLE, ignore_errors=True)
    (BUNDLE / "wheels").mkdir(parents=True)
    for w in sorted(wheels.glob("*.whl")):
        shutil.copy(w, BUNDLE / "wheels" / w.name)
    shutil.copytree(pacs, BUNDLE / "pacs")
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    tree = sum((ROOT / f).stat().st_size for f in listed.splitlines() if (ROOT / f).is_file())
    total = (size + tree) / 2**20
    print(f"gpu_check: .gpu-bundle holds {size / 2**20:.1f} MiB; with the tracked files ~{total:.1f} MiB travel "
          f"(limit {LIMIT_MIB} MiB){'  -- TOO LARGE' if total > LIMIT_MIB else ''}")
    print("gpu_check: on the GPU machine: carry ['.gpu-bundle'], command: python3 experiments/gpu_check.py")


def environment(dry: bool) -> dict[str, str]:
    """PYTHONPATH with the repository, and the bundle's wheels installed into /tmp/site where hydra is missing."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    paths = [str(ROOT)]
    has_hydra = subprocess.run([sys.executable, "-c", "import hydra, omegaconf, open_clip"],
                               capture_output=True, check=False).returncode == 0
    wheels = sorted((BUNDLE / "wheels").glob("*.whl"))
    if not has_hydra:
        if not wheels:
            sys.exit("gpu_check: hydra/omegaconf/open_clip are missing and .gpu-bundle/wheels has no wheels "
                     "(make the bundle with --bundle and carry .gpu-bundle)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(SITE), *map(str, wheels)], check=True)
        paths.insert(0, str(SITE))
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_step(name: str, cmd: list[str], budget: int, env: dict[str, str], log: Path) -> dict:
    """Run `cmd` under `budget` seconds, its output to `log` and to the console; status and wall time."""
    print(f"[gpu_check] {name}: {' '.join(cmd)}  (limit {budget} s)", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=budget,
                                check=False).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {budget} s"
    wall = time.perf_counter() - t0
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print("\n".join(f"    {line}" for line in tail), flush=True)
    print(f"[gpu_check] {name}: {status} in {wall:.1f} s", flush=True)
    return {"status": status, "wall_s": round(wall, 1), "log": log.name, "tail": tail}


def tests_summary(result: dict) -> dict:
    """pytest's last line, e.g. '5 passed, 2 skipped in 20.1s'."""
    line = next((t for t in reversed(result["tail"]) if " in " in t and any(
        w in t for w in ("passed", "failed", "skipped", "error", "deselected"))), "")
    return {"pytest": line.strip("= ").strip()}


def bench_summary(path: Path) -> dict:
    if not path.is_file():
        return {}
    b = json.loads(path.read_text())
    pick = {"device": b.get("device"), "model": b.get("model"), "k": b.get("k"), "images": b.get("heldout_images"),
            "complete": b.get("complete")}
    for phase, keys in {"load": ("soupbench_s_per_ingredient", "ratio"), "eval": ("soupbench_images_per_s", "ratio"),
                        "greedy": ("soupbench_s", "ratio", "gpu_peak_gib"),
                        "mehl_plus_step": ("soupbench_step_ms", "ratio", "gpu_peak_gib")}.items():
        if phase in b:
            pick[phase] = {k: b[phase][k] for k in keys if k in b[phase]}
    return pick


def pacs_summary(results: Path) -> dict:
    if not results.is_file():
        return {}
    r = json.loads(results.read_text())
    cols = [s for s in ("heldout", "test", *r.get("ood_splits", [])) if s in r.get("splits", [])]
    table = {name: {s: m.get(s) for s in cols} | {"members": m.get("members")} for name, m in r["methods"].items()}
    return {"splits": cols, "methods": table}


def main() -> None:
    args = parse()
    if args.bundle:
        make_bundle(Path(args.bundle[0]), Path(args.bundle[1]))
        return
    plan = DRY if args.cpu_dry_run else GPU
    out_dir = args.out_dir or (ROOT / ("outputs/gpu_check_dry_run" if args.cpu_dry_run else "experiments/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = ROOT / "outputs" / ("gpu_check_dry_run" if args.cpu_dry_run else "gpu_check")
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    t_start = time.perf_counter()
    env = environment(args.cpu_dry_run)
    py = sys.executable
    summary: dict = {"mode": "cpu-dry-run" if args.cpu_dry_run else "gpu", "steps": {}}
    device = subprocess.run([py, "-c", "import torch; print(torch.cuda.get_device_name(0) if "
                             "torch.cuda.is_available() else 'cpu', torch.__version__)"],
                            env=env, capture_output=True, text=True, check=False).stdout.strip()
    summary["device"] = device
    if not args.cpu_dry_run and device.startswith("cpu"):
        sys.exit("gpu_check: no CUDA device here; use --cpu-dry-run")
    budget = {s: getattr(args, f"budget_{s}") or plan["budgets"][s] for s in ("tests", "bench", "pacs")}

    if "tests" not in skip:
        r = run_step("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plan["tests"]], budget["tests"],
                     env, work / "tests.log")
        summary["steps"]["tests"] = {**r, **tests_summary(r)}
    if "bench" not in skip:
        bench_json = out_dir / f"bench_{'cpu_dry_run' if args.cpu_dry_run else 'gpu'}.json"
        r = run_step("bench", [py, "experiments/bench_soups.py", *plan["bench"], "--out", str(bench_json),
                               "--workdir", str(work / "bench")], budget["bench"], env, work / "bench.log")
        summary["steps"]["bench"] = {**r, "json": bench_json.name, **bench_summary(bench_json)}
    if "pacs" not in skip:
        pacs = args.pacs or (Path(os.environ["SOUPBENCH_PACS"]) if os.environ.get("SOUPBENCH_PACS")
                             else BUNDLE / "pacs")
        overrides = plan["pacs"]
        dataset = "pacs"
        if not (pacs / "sketch").is_dir():
            if not args.cpu_dry_run:
                sys.exit(f"gpu_check: no PACS at {pacs} (make the bundle with --bundle and carry .gpu-bundle)")
            dataset = "mnist (no PACS folder found: --pacs, $SOUPBENCH_PACS or .gpu-bundle/pacs)"
            overrides = DRY["mnist"]
        else:
            overrides = [*overrides, f"dataset.root={pacs}"]
        name = "gpu_check_pacs"
        r = run_step("pacs", [py, "-m", "soupbench.cli", *overrides, f"name={name}", "seed=0", "logger=none",
                              "progress=false", f"paths.output_dir={work / 'runs'}"], budget["pacs"], env,
                     work / "pacs.log")
        results = work / "runs" / name / "results.json"
        table = out_dir / f"pacs_{'cpu_dry_run' if args.cpu_dry_run else 'gpu'}.json"
        if results.is_file():
            shutil.copy(results, table)
        summary["steps"]["pacs"] = {**r, "dataset": dataset, "json": table.name if results.is_file() else None,
                                    **pacs_summary(results)}

    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    summary["ok"] = all(s["status"] == "ok" for s in summary["steps"].values())
    path = out_dir / ("gpu_check_cpu_dry_run.json" if args.cpu_dry_run else "gpu_check.json")
    path.write_text(json.dumps(summary, indent=2) + "\n")
    if os.environ.get("OUT"):
        for f in [path, *(out_dir / s["json"] for s in summary["steps"].values() if s.get("json"))]:
            if f.is_file():
                shutil.copy(f, Path(os.environ["OUT"]) / f.name)
    print_summary(summary, path)
    sys.exit(0 if summary["ok"] else 1)


def print_summary(summary: dict, path: Path) -> None:
    print(f"\n== gpu_check ({summary['mode']}, {summary['device']}): {summary['wall_s']} s, "
          f"{'all steps ok' if summary['ok'] else 'NOT all steps ok'} ==")
    for name, s in summary["steps"].items():
        extra = ""
        if name == "tests":
            extra = s.get("pytest", "")
        elif name == "bench":
            extra = ", ".join(f"{p}: {json.dumps(s[p])}" for p in ("greedy", "mehl_plus_step") if p in s)
        elif name == "pacs":
            extra = s["dataset"]
        print(f"  {name:6s} {s['status']:28s} {s['wall_s']:7.1f} s  {extra}")
    pacs = summary["steps"].get("pacs", {})
    if pacs.get("methods"):
        cols = pacs["splits"]
        print("  " + "method".ljust(16) + "".join(c.rjust(10) for c in cols))
        for m, row in pacs["methods"].items():
            print("  " + m.ljust(16) + "".join(
                (f"{row[c]:10.2f}" if isinstance(row[c], int | float) else str(row[c]).rjust(10)) for c in cols))
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
