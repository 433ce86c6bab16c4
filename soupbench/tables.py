"""One table, three renderings: aligned text for the console and results.txt, Markdown for notes and READMEs,
LaTeX (booktabs) to paste into a paper. Cells that carry statistics (an interval, a mean ± std) are typed
so that each format marks them its own way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FORMATS = ("text", "markdown", "latex")


@dataclass(frozen=True)
class Interval:
    """A difference in percentage points and its confidence interval; marked when the interval excludes 0."""

    delta: float
    lo: float
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


class Signed(float):
    """A difference shown with its sign (+0.31, -1.20), e.g. ours − the paper's figure."""


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof=1) over n runs; std is None for a single run."""

    mean: float
    std: float | None
    n: int


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return {"text": "-", "markdown": "–", "latex": "--"}[fmt]
    if isinstance(value, Interval):
        text = f"{value.delta:+.2f} [{value.lo:+.2f}, {value.hi:+.2f}]"
        if fmt == "latex":
            text = f"${value.delta:+.2f}$ $[{value.lo:+.2f}, {value.hi:+.2f}]$"
            return f"\\textbf{{{text}}}" if value.excludes_zero else text
        if fmt == "markdown":
            return f"**{text}**" if value.excludes_zero else text
        return f"{text}*" if value.excludes_zero else f"{text} "
    if isinstance(value, MeanStd):
        std = "n/a" if value.std is None else f"{value.std:.2f}"
        if fmt == "latex":
            return f"${value.mean:.2f}$" if value.std is None else f"${value.mean:.2f} \\pm {std}$"
        return f"{value.mean:.2f} ± {std}"
    if isinstance(value, Signed):
        return f"${value:+.2f}$" if fmt == "latex" else f"{value:+.2f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    text = str(value)
    return latex_escape(text) if fmt == "latex" else text


LATEX_SPECIAL = {"\\": "\\textbackslash{}", "_": "\\_", "%": "\\%", "&": "\\&", "#": "\\#", "$": "\\$",
                 "{": "\\{", "}": "\\}", "Δ": "$\\Delta$", "±": "$\\pm$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def render(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str, title: str = "",
           notes: Sequence[str] = ()) -> str:
    """The table in `fmt` (text | markdown | latex), with a title line above and note lines below."""
    if fmt not in FORMATS:
        raise ValueError(f"table format {fmt!r}: expected one of {FORMATS}")
    cells = [[cell(c, fmt) for c in r] for r in rows]
    if fmt == "markdown":
        lines = [f"**{title}**", ""] if title else []
        lines += ["| " + " | ".join(columns) + " |",
                  "| " + " | ".join(":--" if i == 0 else "--:" for i in range(len(columns))) + " |",
                  *("| " + " | ".join(r) + " |" for r in cells)]
        return "\n".join([*lines, *([""] + list(notes) if notes else [])])
    if fmt == "latex":
        lines = [f"% {title}"] if title else []
        lines += ["% needs \\usepackage{booktabs}", "\\begin{tabular}{l" + "r" * (len(columns) - 1) + "}", "\\toprule",
                  " & ".join(latex_escape(c) for c in columns) + " \\\\", "\\midrule",
                  *(" & ".join(r) + " \\\\" for r in cells), "\\bottomrule", "\\end{tabular}"]
        return "\n".join([*lines, *(f"% {n}" for n in notes)])
    widths = [max(len(columns[i]), *(len(r[i]) for r in cells)) for i in range(len(columns))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    lines = [title] if title else []
    lines += [line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    return "\n".join([*lines, *notes]).rstrip()
