"""What identifies an imported checkpoint (`ingredients.from_files`): the sha256 of its bytes (a model folder: of
its weight files), recorded at import beside each file's size, mtime and inode change time (st_ctime). A rerun
compares those three cheaply and hashes the file again whenever any of them differs: the same bytes are reused
(and the recorded times refreshed), other bytes imported again. The kernel sets st_ctime on every write, rename
and utime, and no copy tool can set it back, so a file overwritten in place with its mtime restored is noticed;
path, size and mtime alone never decide."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from soupbench.checkpoints import FOLDER_FILES
from soupbench.ingredients import Ingredient, natural_key
from soupbench.io.atomic import write_json
from soupbench.run_layout import ingredient_files

log = logging.getLogger("soupbench")

CHUNK = 1 << 20         # bytes read at a time: a 10 GB checkpoint is hashed in constant memory


def content_files(path: Path) -> list[Path]:
    """The files a checkpoint's weights are read from: the file itself, or a model folder's weights file (a
    sharded one's index and every shard it names), as `checkpoints.read_checkpoint` reads them."""
    if not path.is_dir():
        return [path] if path.is_file() else []       # reading it names what is missing
    for name in FOLDER_FILES:
        f = path / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return [f]
        try:
            shards = set(json.loads(f.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            shards = set()          # reading it names the problem; its index is still what identifies it
        return [f, *(path / s for s in sorted(shards, key=natural_key))]
    return []


def file_stats(path: Path) -> dict[str, dict[str, int]]:
    """{name: {size, mtime_ns, ctime_ns}} of each of `path`'s content files (names relative to a folder)."""
    out = {}
    for f in content_files(path):
        st = f.stat()
        name = f.relative_to(path).as_posix() if path.is_dir() else f.name
        out[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    return out


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes (what `sha256sum` prints); of a model folder, the sha256 of `sha256sum`'s lines
    for its content files ("<sha256>  <name>\\n", in order), so a renamed shard changes it too."""
    if not path.is_dir():
        return _sha256(path)
    lines = "".join(f"{_sha256(f)}  {f.relative_to(path).as_posix()}\n" for f in content_files(path))
    return hashlib.sha256(lines.encode()).hexdigest()


def same_content(path: Path, meta: dict, stats: dict) -> tuple[bool, str | None]:
    """Whether `path` holds the content its ingredient record `meta` was imported from, given its `stats` now
    (taken before any hashing); and its hash, when it had to be computed."""
    if "source_sha256" not in meta:
        log.info("%s: its ingredient record holds no content hash; importing it again, once", path)
        return False, None
    if meta.get("source_files") == stats:
        return True, None
    digest = content_hash(path)
    if digest == meta["source_sha256"]:
        log.info("%s: times changed, content the same (sha256); reused", path)
        return True, digest
    log.info("%s: content changed since it was imported (sha256); importing it again", path)
    return False, digest


def refreshed(directory: str | Path, ingredient: Ingredient, stats: dict) -> Ingredient:
    """`ingredient` with its source's current stats recorded (its weights untouched), so the next run's cheap
    check passes without hashing again."""
    if ingredient.meta.get("source_files") == stats:
        return ingredient
    meta = {**ingredient.meta, "source_files": stats}
    write_json(ingredient_files(Path(directory), ingredient.id)[1], meta)
    return Ingredient(ingredient.id, ingredient.path, meta)
