"""Fault injection on `soupbench experiment=tiny`, the way storage engines test crash consistency: kill the
process at named points of every stage and rerun, interrupt it with SIGTERM and SIGINT, damage each kind of
artefact, fill or freeze the output disk, and run two processes on one run directory. Every case is compared
with an uninterrupted run. One command:

    python experiments/fault_injection.py [--quick] [--work DIR] [--json OUT]

prints one line per case and the counts (points killed, signals, artefacts damaged, outcomes), and exits 1 if any
case failed. `tests/test_faults.py` runs a fast subset in the default suite and this whole sweep under
`-m slow`. Kill points are soupbench's named fault points (soupbench/faults.py: SOUPBENCH_FAULT), so every
kill lands exactly where it says.

What "equal" means: results.json of the rerun equals the uninterrupted run's in every field except the ones that
measure the machine: soup_time_s, peak_mem_mb, peak_mem_kind and the `runtime` record; the output directory's
own path is written as <out>. Accuracies, per-image bootstrap intervals, diagnostics and warnings must be identical.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOUPS = "[best_individual,uniform,greedy,mehl,wise_ft,model_stock,ensemble]"
ARGS = ["experiment=tiny", "logger=none", "progress=false", "num_threads=2", f"soup={SOUPS}",
        "soup.mehl.block_size=1", "soup.wise_ft.alphas=[0.0,0.5,1.0]", "report.bootstrap.num_samples=200"]
EARLY = ("lp.", "finetune.", "ingredient.")        # points before the ingredients are finished: start from nothing
MACHINE_FIELDS = {"soup_time_s", "peak_mem_mb", "peak_mem_kind"}

# where each case kills: (point, n-th time it is reached); spread over every stage of the run
KILL_POINTS = [("lp.start", 1), ("lp.weights_saved", 1), ("finetune.step", 2), ("finetune.step", 7),
               ("ingredient.weights_saved", 1), ("ingredient.weights_saved", 2), ("soup.best_individual.start", 1),
               ("soup.uniform.weights_saved", 1), ("soup.greedy.start", 1), ("soup.mehl.block", 1),
               ("soup.mehl.block", 2), ("soup.mehl.weights_saved", 1), ("soup.wise_ft.start", 1),
               ("soup.model_stock.saved", 1), ("soup.ensemble.start", 1), ("evaluate.scores", 1),
               ("evaluate.scores", 9), ("evaluate.correct", 1), ("evaluate.results", 1), ("report.start", 1),
               ("report.plots", 1), ("report.done", 1), ("tracker.finish", 1)]
QUICK_KILL_POINTS = [("soup.mehl.block", 1), ("evaluate.correct", 1)]
SIGNAL_POINTS = [("finetune.step", 3), ("soup.greedy.start", 1), ("soup.mehl.block", 1), ("evaluate.scores", 2),
                 ("report.plots", 1), ("tracker.finish", 1)]
QUICK_SIGNAL_POINTS = [("soup.mehl.block", 1)]
DAMAGE_MODES = ("truncate", "zero", "delete", "flip")     # flip: binary artefacts only (JSON is parsed, not summed)


@dataclass
class Case:
    kind: str
    name: str
    outcome: str = ""          # recomputed | refused | equal | clean-exit | failed: ...
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Harness:
    work: Path
    cases: list[Case] = field(default_factory=list)
    _refs: dict[str, dict] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ running
    def soupbench(self, out: Path, *extra: str, fault: str | None = None, limit_bytes: int | None = None,
                  background: bool = False, timeout: float = 1200) -> tuple[int, str] | subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
        env.pop("SOUPBENCH_FAULT", None)
        if fault:
            env["SOUPBENCH_FAULT"] = fault

        def limit() -> None:                 # a size limit on every file the run writes (RLIMIT_FSIZE)
            if limit_bytes is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

        out.mkdir(parents=True, exist_ok=True)
        keys = {e.split("=", 1)[0] for e in extra}        # an extra setting replaces the preset's own
        args = [a for a in ARGS if a.split("=", 1)[0] not in keys]
        proc = subprocess.Popen([sys.executable, "-m", "soupbench.cli", *args, *extra, f"paths.output_dir={out}"],
                                cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=limit)
        if background:
            return proc
        text = proc.communicate(timeout=timeout)[0]
        return proc.returncode, text

    def reference(self, variant: str = "ref") -> dict:
        """The uninterrupted run (work/<variant>), once: `ref` on the tiny preset's MNIST, `ref-folder` on an
        image-folder dataset (FOLDER_ARGS), whose images go through the decoded cache."""
        if variant not in self._refs:
            ref = self.work / variant
            if not (ref / "tiny" / "results.json").is_file():
                shutil.rmtree(ref, ignore_errors=True)
                rc, text = self.soupbench(ref, *self.variant_args(variant))
                if rc != 0:
                    raise RuntimeError(f"the uninterrupted run failed:\n{text[-3000:]}")
            self._refs[variant] = read_results(ref / "tiny")
        return self._refs[variant]

    def variant_args(self, variant: str) -> tuple[str, ...]:
        if variant == "ref":
            return ()
        root = self.work / "digit-folders"
        if not (root / "test").is_dir():
            write_digit_folders(root)
        return (*FOLDER_ARGS, f"dataset.root={root}")

    def fresh(self, name: str, stage: str, variant: str = "ref") -> Path:
        """A new output directory holding the reference's state at `stage`: `empty`, `finetuned` (linear probe,
        ingredients and their held-out scores: the state when the soup stage starts) or `done` (everything,
        the decoded image cache included)."""
        self.reference(variant)
        out = self.work / "cases" / name
        shutil.rmtree(out, ignore_errors=True)
        src, dst = self.work / variant / "tiny", out / "tiny"
        if stage == "done":
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("hydra", ".*.tmp"))
            if (src.parent / "cache").is_dir():
                shutil.copytree(src.parent / "cache", out / "cache")
        elif stage == "finetuned":
            dst.mkdir(parents=True)
            for sub in ("base", "ingredients"):
                shutil.copytree(src / sub, dst / sub)
            fps = [json.loads(p.read_text())["fingerprint"] for p in (src / "ingredients").glob("*.json")]
            fps.append(json.loads((src / "base" / "lp.json").read_text())["fingerprint"])
            for fp_dir in (src / "logits").glob("*/*"):
                if fp_dir.name in fps:
                    shutil.copytree(fp_dir, dst / "logits" / fp_dir.parent.name / fp_dir.name)
        else:
            out.mkdir(parents=True)
        return out

    def check_equal(self, run_dir: Path, variant: str = "ref") -> list[str]:
        return differences(self.reference(variant), read_results(run_dir))

    def record(self, case: Case, t0: float) -> Case:
        case.seconds = time.perf_counter() - t0
        self.cases.append(case)
        print(f"{case.kind:10s} {case.name:45s} {case.outcome:12s} {case.seconds:6.1f}s {case.detail}"[:240],
              flush=True)
        return case

    # ------------------------------------------------------------------------------------------ cases
    def kill(self, point: str, n: int, *extra: str) -> Case:
        """SIGKILL at the n-th time `point` is reached; a rerun must end with the uninterrupted run's results."""
        t0, case = time.perf_counter(), Case("kill", f"{point}@{n}" + (f" {' '.join(extra)}" if extra else ""))
        out = self.fresh(f"kill-{point}-{n}{'-'.join(('',) + extra).replace('=', '_')}",
                         "empty" if point.startswith(EARLY) else "finetuned")
        rc, text = self.soupbench(out, *extra, fault=f"{point}@{n}:KILL")
        if rc != -signal.SIGKILL:
            case.outcome, case.detail = "failed", f"the kill did not land (exit {rc}): {last_line(text)}"
            return self.record(case, t0)
        bad = half_written(out / "tiny")
        rc, text = self.soupbench(out, *extra)
        diffs = self.check_equal(out / "tiny") if rc == 0 else [f"rerun exit {rc}: {last_line(text)}"]
        diffs += wandb_problems(out / "tiny", extra)
        case.outcome = "equal" if not diffs and not bad else "failed"
        case.detail = "; ".join(bad + diffs)[:400]
        return self.record(case, t0)

    def interrupt(self, point: str, n: int, sig: str, *extra: str) -> Case:
        """SIGTERM / SIGINT at a point: exit 128 + signal, one line naming it, no temp file left, every artefact
        readable; a rerun ends equal."""
        t0 = time.perf_counter()
        case = Case(f"SIG{sig}", f"{point}@{n}" + (f" {' '.join(extra)}" if extra else ""))
        out = self.fresh(f"sig{sig}-{point}-{n}{'-'.join(('',) + extra).replace('=', '_')}",
                         "empty" if point.startswith(EARLY) else "finetuned")
        rc, text = self.soupbench(out, *extra, fault=f"{point}@{n}:{sig}")
        expected = 128 + int(getattr(signal, f"SIG{sig}"))
        lines = [x for x in text.splitlines() if x.startswith("soupbench: interrupted by")]
        problems = []
        if rc != expected:
            problems.append(f"exit {rc}, expected {expected}: {last_line(text)}")
        if len(lines) != 1 or f"SIG{sig}" not in lines[0]:
            problems.append(f"expected one 'soupbench: interrupted by SIG{sig}' line, got {lines}")
        if "Traceback" in text:
            problems.append("a traceback was printed")
        problems += half_written(out / "tiny", temp_files_allowed=False)
        rc, text = self.soupbench(out, *extra)
        problems += self.check_equal(out / "tiny") if rc == 0 else [f"rerun exit {rc}: {last_line(text)}"]
        problems += wandb_problems(out / "tiny", extra)
        case.outcome, case.detail = ("clean-exit" if not problems else "failed"), "; ".join(problems)[:400]
        if not problems:
            case.detail = lines[0]
        return self.record(case, t0)

    def damage(self, artefact: str, mode: str) -> Case:
        """Damage one artefact of a finished run and rerun: it must be recomputed (results equal) or refused in
        one line naming the file (exit 2), never used."""
        t0, case = time.perf_counter(), Case("damage", f"{artefact}:{mode}")
        variant = "ref-folder" if artefact == "decoded_cache" else "ref"     # MNIST is not decoded from files
        out = self.fresh(f"damage-{artefact}-{mode}", "done", variant)
        path = artefact_path(out / "tiny", artefact)
        if path is None:
            case.outcome, case.detail = "skipped", "no such artefact in this run"
            return self.record(case, t0)
        damage_file(path, mode)
        damaged = path.read_bytes() if path.is_file() else None
        rc, text = self.soupbench(out, *self.variant_args(variant))
        if rc == 2:
            errors = [x for x in text.splitlines() if x.startswith("soupbench: error:")]
            ok = len(errors) == 1 and path.name in errors[0] and "Traceback" not in text
            case.outcome = "refused" if ok else "failed"
            case.detail = errors[0] if errors else last_line(text)
        elif rc == 0:
            diffs = self.check_equal(out / "tiny", variant) + half_written(out / "tiny")
            if not path.is_file() or path.read_bytes() == damaged:      # used as it was, or never written again
                diffs.append(f"{path.name} was not rewritten: the damage went unnoticed")
            case.outcome = "recomputed" if not diffs else "failed"
            case.detail = "; ".join(diffs)[:400] or f"{path.name} rewritten"
        else:
            case.outcome, case.detail = "failed", f"exit {rc}: {last_line(text)}"
        return self.record(case, t0)

    def size_limit(self) -> Case:
        """A size limit on the files the run may write (RLIMIT_FSIZE, as a full quota): one line, exit 2, and
        every artefact that was there is byte-identical."""
        t0, case = time.perf_counter(), Case("disk", "size limit (RLIMIT_FSIZE 1 MB)")
        out = self.fresh("size-limit", "finetuned")
        return self._disk_case(case, t0, out, lambda: self.soupbench(out, limit_bytes=1 << 20))

    def size_limit_finetune(self) -> Case:
        """The same from an empty run directory with 20 MB per file: the linear probe (14 MB) is written, the first
        fine-tuning checkpoint (weights and Adam's moments, ~41 MB; one every 2 steps here) is not; one line naming
        the checkpoint."""
        t0, case = time.perf_counter(), Case("disk", "size limit (RLIMIT_FSIZE 20 MB) at fine-tuning")
        out = self.fresh("size-limit-finetune", "empty")
        go = lambda: self.soupbench(out, "finetune.checkpoint_every=2", limit_bytes=20 << 20)  # noqa: E731
        case = self._disk_case(case, t0, out, go, record=False)
        if case.outcome == "refused" and ".ckpt" not in case.detail and "checkpoint" not in case.detail:
            case.outcome = "failed"
            case.detail = f"stopped elsewhere than at the fine-tuning checkpoint: {case.detail}"
        return self.record(case, t0)

    def disk_full(self) -> Case:
        """The output on a tmpfs with a few KB free: one line, exit 2, the artefacts there intact."""
        t0, case = time.perf_counter(), Case("disk", "full (tmpfs)")
        with mounted_copy(self, "disk-full", ro=False) as out:
            if out is None:
                case.outcome, case.detail = "skipped", "mounting a tmpfs needs root"
                return self.record(case, t0)
            return self._disk_case(case, t0, out, lambda: self.soupbench(out))

    def read_only(self) -> Case:
        t0, case = time.perf_counter(), Case("disk", "read-only (tmpfs remounted ro)")
        with mounted_copy(self, "read-only", ro=True) as out:
            if out is None:
                case.outcome, case.detail = "skipped", "mounting a tmpfs needs root"
                return self.record(case, t0)
            return self._disk_case(case, t0, out, lambda: self.soupbench(out))

    def _disk_case(self, case: Case, t0: float, out: Path, go, record: bool = True) -> Case:
        before = tree_hashes(out / "tiny") if (out / "tiny").is_dir() else {}
        rc, text = go()
        lines = [x for x in text.splitlines() if x.startswith("soupbench: error:")]
        after = tree_hashes(out / "tiny")
        changed = [p for p, h in before.items() if after.get(p) != h]
        problems = []
        if rc != 2 or len(lines) != 1 or "Traceback" in text:
            problems.append(f"exit {rc}, {len(lines)} error line(s): {last_line(text)}")
        if changed:
            problems.append(f"artefacts changed: {changed[:3]}")
        case.outcome = "refused" if not problems else "failed"
        case.detail = "; ".join(problems) or (lines[0] if lines else "")
        return self.record(case, t0) if record else case

    def concurrent(self, same: bool, start: str = "finetuned") -> Case:
        """Two processes on one run directory at once: both finish, nothing is corrupt, and results.json equals
        one run's (same settings: the uninterrupted run; different soup lists: the last writer's, each soup as in
        the uninterrupted run)."""
        t0 = time.perf_counter()
        case = Case("concurrent", f"{'same' if same else 'different'} settings from {start}")
        out = self.fresh(f"concurrent-{same}-{start}", start)
        extra = () if same else ("soup=[uniform,mehl,wise_ft,ensemble]",)
        procs = [self.soupbench(out, background=True), self.soupbench(out, *extra, background=True)]
        outs = [p.communicate(timeout=2400)[0] for p in procs]
        problems = [f"process {i} exit {p.returncode}: {last_line(o)}"
                    for i, (p, o) in enumerate(zip(procs, outs, strict=True)) if p.returncode != 0]
        problems += half_written(out / "tiny")
        if not problems:
            got, ref = read_results(out / "tiny"), self.reference()
            if same:
                problems += differences(ref, got)
            else:
                for m, v in got["methods"].items():
                    problems += [f"{m}.{s}" for s in got["splits"] if v[s] != ref["methods"][m][s]]
        case.outcome, case.detail = ("equal" if not problems else "failed"), "; ".join(problems)[:400]
        return self.record(case, t0)

    def summary(self) -> dict:
        by_kind = Counter(c.kind for c in self.cases)
        outcomes = Counter(f"{c.kind}:{c.outcome}" for c in self.cases)
        return {"cases": len(self.cases), "by_kind": dict(by_kind), "outcomes": dict(sorted(outcomes.items())),
                "failed": [f"{c.kind} {c.name}: {c.detail}" for c in self.cases if c.outcome == "failed"],
                "seconds": round(sum(c.seconds for c in self.cases), 1)}


# ---------------------------------------------------------------------------------------------- artefacts
ARTEFACTS = ("lp.safetensors", "lp.json", "ingredient.safetensors", "ingredient.json", "soup.safetensors",
             "soup.json", "scores", "decoded_cache", "correct.safetensors", "results.json")
QUICK_ARTEFACTS = [("soup.safetensors", "zero"), ("scores", "truncate"), ("scores", "flip"),
                   ("results.json", "truncate")]


# an image-folder dataset (digits written as PNG files), so that the decoded image cache exists
FOLDER_ARGS = ("dataset=image_folder", "dataset.image_size=32", "~dataset.num_train", "~dataset.num_heldout",
               "~dataset.num_test", "~dataset.num_ood", "dataset.ood=[inverted]")


def write_digit_folders(root: Path) -> None:
    """scikit-learn's 8x8 digits (bundled with it) as 16x16 PNG files in <root>/<split>/<digit>/: 120 train,
    60 val, 60 test and 60 inverted (the OOD split)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    i = 0
    for split, n in {"train": 120, "val": 60, "test": 60, "inverted": 60}.items():
        for _ in range(n):
            pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
            path = root / split / str(digits.target[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(255 - pixels if split == "inverted" else pixels).resize((16, 16)).convert("RGB").save(path)
            i += 1


def artefact_path(run_dir: Path, kind: str) -> Path | None:
    """One artefact of each kind in a finished tiny run (the first ingredient, the greedy soup, a score file)."""
    ingredients = sorted((run_dir / "ingredients").glob("*.json"))
    candidates = {
        "lp.safetensors": run_dir / "base" / "lp.safetensors", "lp.json": run_dir / "base" / "lp.json",
        "ingredient.safetensors": ingredients[0].with_suffix(".safetensors") if ingredients else None,
        "ingredient.json": ingredients[0] if ingredients else None,
        "soup.safetensors": run_dir / "soups" / "greedy.safetensors", "soup.json": run_dir / "soups" / "greedy.json",
        "scores": next(iter(sorted((run_dir / "logits").glob("*/*/test.safetensors"))), None),
        "decoded_cache": next(iter(sorted(run_dir.parent.glob("cache/images/*.safetensors"))), None),
        "correct.safetensors": run_dir / "correct.safetensors", "results.json": run_dir / "results.json"}
    path = candidates[kind]
    return path if path is not None and path.is_file() else None


def damage_file(path: Path, mode: str) -> None:
    if mode == "delete":
        path.unlink()
    elif mode == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif mode == "zero":
        path.write_bytes(b"\0" * path.stat().st_size)
    elif mode == "flip":                          # one bit, three quarters in: inside a weights file's data
        data = bytearray(path.read_bytes())
        data[len(data) - len(data) // 4] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        raise ValueError(mode)


def half_written(run_dir: Path, temp_files_allowed: bool = True) -> list[str]:
    """Problems: a JSON that does not parse, a safetensors file that does not load, a temp file (after a clean
    exit; SIGKILL may leave temp files, which no run reads)."""
    from safetensors.torch import load_file

    problems = []
    for p in run_dir.rglob("*"):
        if not p.is_file() or "hydra" in p.parts or "wandb" in p.parts:
            continue
        if p.name.endswith(".tmp"):
            if not temp_files_allowed:
                problems.append(f"temp file left: {p.relative_to(run_dir)}")
            continue
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".safetensors":
                load_file(str(p))
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            problems.append(f"unreadable {p.relative_to(run_dir)}: {str(e)[:80]}")
    return problems


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@contextlib.contextmanager
def mounted_copy(h: Harness, name: str, ro: bool) -> Iterator[Path | None]:
    """The reference's post-fine-tune state copied onto a small tmpfs (a few KB free), remounted read-only when
    `ro`; None where mounting is not permitted."""
    src = h.fresh(f"{name}-src", "finetuned")
    mnt = h.work / "mnt" / name
    mnt.mkdir(parents=True, exist_ok=True)
    used = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    size_kb = used // 1024 + 256 + 4 * len(list(src.rglob("*")))     # the files, their inodes, a few KB free
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        yield None
        return
    try:
        shutil.copytree(src, mnt, dirs_exist_ok=True)
        (mnt / "tiny" / "hydra").mkdir(exist_ok=True)
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def read_results(run_dir: Path) -> dict:
    """results.json with the output directory's own path written as <out> (config paths differ per case) and
    without the logger's settings (the W&B cases log, the reference does not; results never depend on it)."""
    text = (run_dir / "results.json").read_text()
    results = json.loads(text.replace(str(run_dir.parent), "<out>"))
    results.get("config", {}).pop("logger", None)
    return results


def wandb_problems(run_dir: Path, extra: tuple[str, ...]) -> list[str]:
    """With logger=wandb: the rerun's offline W&B run (the newest) holds the soups' accuracies in its record log,
    so `wandb sync` has a whole run to upload whatever happened to the interrupted one."""
    if "logger=wandb" not in extra:
        return []
    logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    if len(logs) < 2 or b"uniform/heldout" not in logs[-1].read_bytes():
        return [f"no W&B run of the rerun with the soups' accuracies under {run_dir / 'wandb'} ({len(logs)} runs)"]
    return []


def differences(a: dict, b: dict, path: str = "") -> list[str]:
    """Fields that differ, ignoring what measures the machine (MACHINE_FIELDS, runtime)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in MACHINE_FIELDS or (path == "" and k == "runtime"):
                continue
            if k not in a or k not in b:
                out.append(f"{path}.{k} only in one")
            else:
                out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {str(a)[:60]} != {str(b)[:60]}"]


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:200] if lines else ""


# ---------------------------------------------------------------------------------------------- the sweep
def sweep(work: Path, quick: bool = False) -> dict:
    h = Harness(work)
    h.reference()
    for point, n in QUICK_KILL_POINTS if quick else KILL_POINTS:
        h.kill(point, n)
    for sig in ("TERM", "INT"):
        for point, n in QUICK_SIGNAL_POINTS if quick else SIGNAL_POINTS:
            h.interrupt(point, n, sig)
    for point in ("report.done", "tracker.finish"):           # W&B (offline) open while the process dies
        h.kill(point, 1, "logger=wandb")
        if not quick:
            h.interrupt(point, 1, "TERM", "logger=wandb")
    plan = QUICK_ARTEFACTS if quick else [(a, m) for a in ARTEFACTS for m in DAMAGE_MODES
                                          if m != "flip" or not a.endswith(".json")]
    for artefact, mode in plan:
        h.damage(artefact, mode)
    h.size_limit()
    h.size_limit_finetune()
    h.disk_full()
    h.read_only()
    h.concurrent(same=True)
    h.concurrent(same=False)
    if not quick:
        h.concurrent(same=True, start="empty")
    summary = h.summary()
    summary["cases_detail"] = [c.__dict__ for c in h.cases]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "outputs" / "fault_injection")
    ap.add_argument("--quick", action="store_true", help="a few cases of each kind")
    ap.add_argument("--json", type=Path, default=None, help="write the summary and every case here")
    args = ap.parse_args()
    shutil.rmtree(args.work / "cases", ignore_errors=True)
    summary = sweep(args.work, args.quick)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "cases_detail"}, indent=2))
    sys.exit(1 if summary["failed"] else 0)


if __name__ == "__main__":
    main()
