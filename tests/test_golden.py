"""The golden run: `experiment=tiny` with every soup method (fine-tune, soups, evaluate) gives the results recorded
in tests/golden/tiny_all_methods.json: every accuracy, every soup's members, greedy's path, learned and HL/MEHL
coefficients, WiSE-FT's α. A change of results on purpose regenerates the file (`python tests/test_golden.py`)
in a commit of its own that lists each value that changed and why.

Accuracies are counts over fixed images and compared exactly; coefficients, losses and other floats to 1e-6
(relative): one process on the CPU with 2 threads reproduces them bit for bit, and the tolerance only covers a
reordered float32 reduction if torch's kernels change. Times, memory figures and paths are ignored."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "tiny_all_methods.json"
ALL_METHODS = ("best_individual", "uniform", "greedy", "learned", "learned_plus", "hl", "hl_plus", "mehl",
               "mehl_plus", "wise_ft", "model_stock", "ensemble", "greedy_ensemble")
OVERRIDES = ["experiment=tiny", "finetune.num_ingredients=3", "logger=none", f"soup=[{','.join(ALL_METHODS)}]",
             "soup.wise_ft.curve=true"]
IGNORED = {"soup_time_s", "peak_mem_mb", "peak_mem_kind", "train_time_s", "time_s", "runtime", "config",
           "steps_per_s", "images_per_s", "elapsed_s", "bn_recalibrated_on_s"}
REL_TOL = 1e-6


def _clean(node):
    """The values a redesign must keep: numbers, names and lists; no times, memory figures or paths."""
    if isinstance(node, dict):
        return {k: _clean(v) for k, v in node.items() if k not in IGNORED and not k.endswith("_time_s")
                and not k.endswith("_s") and "path" not in k and k not in ("dir", "file")}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def golden_values(run_dir: Path, results: dict) -> dict:
    """results.json's methods and ingredients, with every soup's record (members, info) from soups/<name>.json."""
    soups = {}
    for name in ALL_METHODS:
        meta = json.loads((run_dir / "soups" / f"{name}.json").read_text())
        soups[name] = {"kind": meta["kind"], "members": meta["members"], "info": meta["info"]}
    return _clean({"methods": results["methods"], "ingredients": results["ingredients"], "soups": soups,
                   "splits": results["splits"], "warnings": results["warnings"]})


def run_golden(tmp: Path) -> dict:
    from soupbench.pipeline import run
    from tests.helpers import compose_cfg

    cfg = compose_cfg(OVERRIDES, tmp)
    results = run(cfg)
    return golden_values(Path(cfg.paths.run_dir), results)


def differences(want, got, where: str = "") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: missing" for k in want if k not in got]
        return out + [d for k in want if k in got for d in differences(want[k], got[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: {len(got)} items, expected {len(want)}"]
        return [d for i, (w, g) in enumerate(zip(want, got, strict=True)) for d in differences(w, g, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        exact = "acc" in where or "heldout" in where or "test" in where or "ood" in where
        tol = 0.0 if exact and not any(s in where for s in ("loss", "coef", "alpha")) else REL_TOL
        if math.isclose(want, got, rel_tol=tol, abs_tol=tol * 1e-3) or (math.isnan(want) and math.isnan(got)):
            return []
        return [f"{where}: {got!r}, expected {want!r}"]
    return [] if want == got else [f"{where}: {got!r}, expected {want!r}"]


def test_tiny_with_every_method_gives_the_golden_results(tmp_path):
    got = run_golden(tmp_path)
    want = json.loads(GOLDEN.read_text())
    diff = differences(want, got)
    assert not diff, "\n".join(diff[:40])


if __name__ == "__main__":        # regenerate: python tests/test_golden.py
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent.parent))
    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(run_golden(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
