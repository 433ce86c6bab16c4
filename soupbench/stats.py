"""Paired bootstrap confidence intervals for accuracy differences between methods.

Two methods scored on the same test images are compared image by image: each bootstrap sample draws N
image indices with replacement, once, and both methods are scored on that same draw, so the image-to-image
variation they share cancels out and the interval is much tighter than one from two independent intervals.
The interval is the percentile interval of the resampled differences; the point estimate is the difference
on the full split.

`ood_avg` is the mean of the per-split differences; each OOD split is resampled separately (the splits are
different image sets), so its interval is a stratified bootstrap over those splits. The held-out split gets
no interval: every held-out-chosen method was selected on it, so a difference there says little.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from soupbench.errors import ConfigError

CHUNK_ELEMENTS = 1 << 22          # bootstrap index draws held at a time (b samples x N images), ~32 MB


def bootstrap_indices(n: int, num_samples: int, seed: int, key: str = "") -> Iterator[np.ndarray]:
    """Chunks (b, n) of image indices drawn with replacement, `num_samples` rows in all. The generator is
    seeded by (seed, key): a split's draw does not depend on which other splits or methods exist."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    per_chunk = max(1, CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, num_samples, per_chunk):
        yield rng.integers(0, n, size=(min(per_chunk, num_samples - start), n))


def resampled_means(values: np.ndarray, indices: Iterator[np.ndarray]) -> np.ndarray:
    """Mean of each row of `values` (P, N) over every bootstrap draw: (P, num_samples). One draw serves all
    P rows, which is what makes the comparison paired."""
    n = values.shape[1]
    out = []
    for idx in indices:
        counts = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)   # (b, n)
        out.append(values @ counts.T / n)
    return np.concatenate(out, axis=1) if out else np.empty((len(values), 0))


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return float(lo), float(hi)


def interval(delta: float, lo: float, hi: float) -> dict:
    return {"delta": delta, "lo": lo, "hi": hi, "excludes_zero": bool(lo > 0 or hi < 0)}


def paired_deltas(correct: Mapping[str, Mapping[str, np.ndarray]], splits: list[str], ood_splits: list[str],
                  references: list[str], num_samples: int, confidence: float, seed: int) -> dict:
    """Accuracy difference (percentage points) of every method to every reference that was run, with its
    paired bootstrap interval, on each split in `splits` and on `ood_avg`.

    correct[method][split]: per-image correctness (bool, one entry per image, same order for every method).
    Returns {reference: {method: {split: {delta, lo, hi, excludes_zero}}}}."""
    if num_samples <= 0:
        return {}
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"report.bootstrap.confidence={confidence}: expected a value in (0, 1), e.g. 0.95")
    refs = [r for r in references if r in correct]
    pairs = [(m, r) for r in refs for m in correct if m != r]
    if not pairs:
        return {}
    out: dict = {r: {m: {} for m, rr in pairs if rr == r} for r in refs}
    ood_samples: dict[tuple[str, str], list[np.ndarray]] = {p: [] for p in pairs}
    ood_points: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    for split in splits:
        diffs = np.stack([correct[m][split].astype(np.float64) - correct[r][split].astype(np.float64)
                          for m, r in pairs]) * 100.0                      # (P, N) in percentage points
        n = diffs.shape[1]
        samples = resampled_means(diffs, bootstrap_indices(n, num_samples, seed, split))
        for (m, r), d, s in zip(pairs, diffs, samples, strict=True):
            out[r][m][split] = interval(float(d.mean()), *percentile_interval(s, confidence))
            if split in ood_splits:
                ood_samples[(m, r)].append(s)
                ood_points[(m, r)].append(float(d.mean()))
    for (m, r), parts in ood_samples.items():
        if parts:
            mean = np.mean(np.stack(parts), axis=0)
            out[r][m]["ood_avg"] = interval(float(np.mean(ood_points[(m, r)])), *percentile_interval(mean, confidence))
    return out
