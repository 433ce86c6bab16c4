"""What bf16 changes in evaluation: a CLIP-style classifier (logit scale 100, 1000 classes, unit-norm features)
with random weights, its predictions in fp32, with a bf16 backbone and an fp32 head (soupbench's `bf16`), and
with the logits themselves in bf16 (the whole forward under autocast). Prints JSON.

    python experiments/precision_check.py [--images 2000] [--classes 1000]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from soupbench.backbones import Classifier


class UnitNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.GELU(), nn.Conv2d(32, dim, 4, stride=4),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Classifier(UnitNorm(args.dim), args.dim, args.classes, [0.5] * 3, [0.5] * 3).eval()
    with torch.no_grad():   # a zero-shot-like head: unit rows times CLIP's logit scale of 100
        model.head.weight.copy_(100 * F.normalize(torch.randn(args.classes, args.dim), dim=-1))
        model.head.bias.zero_()
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_backbone = model(x)                                             # head in fp32 (Classifier.forward)
            bf16_logits = model.head(model.features(x)).float()                  # logits rounded to bf16
    top2 = fp32.topk(2, dim=1).values

    def flips(a: torch.Tensor) -> int:
        return int((a.argmax(1) != fp32.argmax(1)).sum())

    def ties(a: torch.Tensor) -> int:
        t = a.topk(2, dim=1).values
        return int((t[:, 0] == t[:, 1]).sum())

    print(json.dumps({
        "images": args.images, "classes": args.classes,
        "fp32_top2_gap_median": float((top2[:, 0] - top2[:, 1]).median()),
        "argmax_changes_vs_fp32": {"bf16_backbone_fp32_head": flips(bf16_backbone), "bf16_logits": flips(bf16_logits)},
        "tied_top2": {"fp32": ties(fp32), "bf16_backbone_fp32_head": ties(bf16_backbone),
                      "bf16_logits": ties(bf16_logits)},
        "logit_dtype": {"bf16_backbone_fp32_head": str(bf16_backbone.dtype)},
    }, indent=2))


if __name__ == "__main__":
    main()
