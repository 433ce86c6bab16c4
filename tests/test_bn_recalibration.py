"""BatchNorm re-estimation of the soups (bn_recalibration) on the tiny run: the issue's command (97 images in
batches of 32: a last batch of one image) builds the soup, and with the default finetune.freeze_bn=true the
combination is warned about by name and the diagnostics name it as the cause (not the search space)."""

from __future__ import annotations

from soupbench.pipeline import run
from tests.helpers import compose_cfg, copy_of_run


def test_reestimating_frozen_bn_ingredients_is_warned_and_named_as_the_cause(tiny_run, tmp_path, caplog):
    run_dir = copy_of_run(tiny_run, tmp_path)
    cfg = compose_cfg(["experiment=tiny", "logger=none", "soup=[uniform]", "bn_recalibration.enabled=true",
                       "bn_recalibration.num_images=97", "bn_recalibration.batch_size=32",
                       "stages=[soup,evaluate,report]", f"paths.run_dir={run_dir}"], tmp_path)
    results = run(cfg)
    assert "uniform" in results["methods"] and (run_dir / "soups" / "uniform.safetensors").is_file()
    warned = [w for w in results["warnings"] if w.startswith("bn_recalibration.enabled=true with finetune.freeze_bn")]
    assert warned and "bn_recalibration.enabled=true with finetune.freeze_bn=true" in caplog.text
    d = results["diagnostics"]
    assert d["cause"] and "finetune.freeze_bn=true" in d["cause"] and d["lines"][0].startswith("cause: ")
    assert "re-estimated statistics vs" in d["cause"]
    if d["soups_trail_best"]:
        assert "bn_recalibration.enabled=false" in d["suggestion"] and "weight_decay" not in d["suggestion"]
    # the plain average, statistics as the ingredients trained them, is what the basin check reads
    assert d["basin"]["uniform_heldout"] != results["methods"]["uniform"]["heldout"]
    assert (run_dir / "results.txt").read_text().count("bn_recalibration.enabled=true") >= 1
