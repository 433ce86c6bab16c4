"""The evaluate stage's peak host memory and disk, before and after the bounded evaluator, side by side in one
run: 72 ingredients of a tiny network on generated 1000-class splits with ImageNet-R-, -A- and ObjectNet-style
label groups (experiments/eval_scale.py; each measurement in a fresh process). `before` is soupbench's evaluator
at revision --rev (all fp32 logits of every split per ingredient in one growing file, all kept in memory, images
in memory); `after` is today's (fp16 scored columns per (weights, split), mapped images, block-wise ensembles).
Then the paper-scale figures those per-image costs imply for the ImageNet presets.

    python experiments/bench_eval_memory.py [--ingredients 72] [--images 1000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# images per split of the ImageNet presets (held-out: imagenet_98_idxs.npy's 2 % of train) and the columns each
# is scored by
PAPER_SPLITS = {"heldout": (25_623, 1000), "imagenet": (50_000, 1000), "imagenetv2": (10_000, 1000),
                "sketch": (50_889, 1000), "imagenet_r": (30_000, 200), "imagenet_a": (7_500, 200),
                "objectnet": (18_574, 113)}
IMAGE_BYTES_224 = 3 * 224 * 224


def probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "eval_scale.py"), *args], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def paper_scale(k: int) -> dict:
    """Disk of stored scores for k ingredients, and the decoded eval caches, at the presets' sizes."""
    images = sum(n for n, _ in PAPER_SPLITS.values())
    before = sum(n * 1000 * 4 for n, _ in PAPER_SPLITS.values())        # fp32, all 1000 logits
    after = sum(n * c * 2 for n, c in PAPER_SPLITS.values())            # fp16, the scored columns
    return {"eval_images": images, "scores_gb_per_ingredient": {"before": before / 1e9, "after": after / 1e9},
            f"scores_gb_{k}": {"before": k * before / 1e9, "after": k * after / 1e9},
            "decoded_caches_gb_224px": images * IMAGE_BYTES_224 / 1e9,
            "ensemble_sum_gb": {"before_stacked": k * 50_000 * 1000 * 4 / 1e9, "after_block": 4096 * 1000 * 4 / 1e9}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ingredients", type=int, default=72)
    parser.add_argument("--images", type=int, default=1000, help="test split size (others in proportion)")
    parser.add_argument("--rev", default="0df3e51", help="the revision measured as `before`")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_eval_memory.json")
    args = parser.parse_args()
    k = str(args.ingredients)
    with tempfile.TemporaryDirectory() as d:
        probe("setup", d, "--ingredients", k, "--images", str(args.images))
        runs = {"before": probe("run", d, "--ingredients", k, "--mode", "before", "--rev", args.rev),
                "after": probe("run", d, "--ingredients", k, "--mode", "after", "--check"),
                "after_8": probe("run", d, "--ingredients", "8", "--mode", "after")}
    print(f"evaluate stage, {k} ingredients, splits {runs['after']['split_images']}")
    print(f"{'':28s}{'before':>12s}{'after':>12s}{'after/before':>14s}")
    for label, key in (("peak RSS (MB)", "peak_rss_mb"), ("disk, all (MB)", "disk_mb"),
                       ("disk per ingredient (MB)", "disk_mb_per_ingredient"), ("time (s)", "seconds")):
        b, a = runs["before"][key], runs["after"][key]
        print(f"{label:28s}{b:12.1f}{a:12.1f}{a / b:14.2f}")
    print(f"peak RSS with 8 ingredients (after): {runs['after_8']['peak_rss_mb']:.1f} MB")
    check = runs["after"]["check"]
    print("ensemble vs direct fp32: " + ", ".join(
        f"{s} {c['differ']} differ ({c['near_ties']} near-ties)" for s, c in check.items()))
    paper = paper_scale(args.ingredients)
    print(f"paper scale ({paper['eval_images']} eval images): stored scores "
          f"{paper['scores_gb_per_ingredient']['before']:.2f} -> {paper['scores_gb_per_ingredient']['after']:.2f} "
          f"GB per ingredient, {paper[f'scores_gb_{k}']['before']:.1f} -> {paper[f'scores_gb_{k}']['after']:.1f} GB "
          f"for {k}; decoded caches at 224 px {paper['decoded_caches_gb_224px']:.1f} GB (mapped, not in RAM)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "paper_scale": paper, "rev_before": args.rev}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
