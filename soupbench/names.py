"""Names compared as text, not as bytes: class folders, domains, splits, ingredient ids and soup names are matched
after Unicode normalisation (NFC), so `café` written as one code point (U+00E9, NFC: most systems) and as `e` +
a combining accent (U+0065 U+0301, NFD: macOS file systems, some archives) is one name. A folder is still opened
by its on-disk name (`child`), whatever form the config or another split wrote it in. Messages about names that
differ show their code points whenever the text alone could look the same (`show`)."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path

from soupbench.errors import DataError


def nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _needs_code_points(name: str) -> bool:
    return not name.isascii() or name != name.strip() or not name.isprintable()


def show(name: str) -> str:
    """repr(name), followed by its code points when it is not plain printable ASCII (two such names can print
    alike and still differ)."""
    if not _needs_code_points(name):
        return repr(name)
    return f"{name!r} ({' '.join(f'U+{ord(c):04X}' for c in name)})"


def show_all(names: Iterable[str]) -> str:
    return "[" + ", ".join(show(n) for n in names) + "]"


def difference(found: list[str], expected: list[str]) -> str:
    """What differs between two lists of names (compared after NFC): those only in one, or the order."""
    f, e = [nfc(n) for n in found], [nfc(n) for n in expected]
    only_found = [n for n in found if nfc(n) not in set(e)]
    only_expected = [n for n in expected if nfc(n) not in set(f)]
    parts = []
    if only_found:
        parts.append(f"only here: {show_all(only_found)}")
    if only_expected:
        parts.append(f"missing: {show_all(only_expected)}")
    if not parts:
        parts.append(f"the same names in another order: {show_all(found)} vs {show_all(expected)}")
    return "; ".join(parts)


def unique_nfc(names: Iterable[str], where: str) -> dict[str, str]:
    """{NFC name: name as given}; two names that normalise alike (e.g. NFC and NFD `café` side by side) are a
    DataError naming both with their code points."""
    out: dict[str, str] = {}
    for n in names:
        key = nfc(n)
        if key in out:
            raise DataError(f"{where}: {show(out[key])} and {show(n)} are the same name in two Unicode forms; "
                            "rename or merge one")
        out[key] = n
    return out


def child(root: Path, name: str) -> Path:
    """`root / name`, or the entry of `root` whose name equals `name` after NFC (the on-disk spelling)."""
    direct = root / name
    if direct.exists() or not root.is_dir():
        return direct
    want = nfc(name)
    for entry in root.iterdir():
        if nfc(entry.name) == want:
            return entry
    return direct
