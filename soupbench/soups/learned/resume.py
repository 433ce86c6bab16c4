"""A learned soup's progress after every block (the soup so far and the effective weights, then the JSON that
vouches for them), so a killed run resumes from its last finished block with the same settings and data."""

from __future__ import annotations

import torch

from soupbench.io.atomic import save_weights, write_json
from soupbench.io.reuse import reusable_meta
from soupbench.io.weights import load_weights
from soupbench.soups.context import SoupContext


def state_paths(ctx: SoupContext) -> tuple:
    """The soup so far (safetensors) and the record that vouches for it (JSON), in the soup's work folder."""
    return ctx.work_dir / "progress.safetensors", ctx.work_dir / "progress.json"


def save_progress(ctx: SoupContext, key: str, soup: dict, raw: list, losses: list, next_block: int,
                   settings: dict, eff: torch.Tensor, eff_base: torch.Tensor) -> None:
    """After every block: the soup and the effective weights (weights first, then the JSON that vouches)."""
    weights_path, meta_path = state_paths(ctx)
    tensors = {f"soup.{k}": v for k, v in soup.items()} | {"effective": eff, "effective_base": eff_base}
    save_weights(weights_path, tensors, {"next_block": next_block})
    write_json(meta_path, {"key": key, "next_block": next_block, "settings": settings, "losses": losses,
                           "blocks": raw})


def load_progress(ctx: SoupContext, key: str, num_layers: int) -> dict:
    """The saved progress of these settings and data (`key`), or a fresh start."""
    weights_path, meta_path = state_paths(ctx)
    if weights_path.is_file() and (meta := reusable_meta(meta_path, "key", key)) is not None:
        t = load_weights(weights_path)
        soup = {k.removeprefix("soup."): v for k, v in t.items() if k.startswith("soup.")}
        return {"soup": soup, "raw": meta["blocks"], "losses": meta["losses"], "next_block": meta["next_block"],
                "effective": t["effective"], "effective_base": t["effective_base"]}
    K = len(ctx.ingredients)
    return {"soup": None, "raw": [], "losses": [], "next_block": 0,
            "effective": torch.zeros(K, num_layers, dtype=torch.float64),
            "effective_base": torch.zeros(num_layers, dtype=torch.float64)}
