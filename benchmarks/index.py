"""``python -m benchmarks.index [--out DIR]``: writes docs/benchmarks.md, the index of the
benchmark pages.

It measures nothing. It reads the header every generated page starts with (the command, the
commit, the date, the wall time, the seeds) and lists, per page, what it covers and on which
data; per model of the shapes data, which of its pages exist, the command of each one that
does not exist yet, and checks read off the pages' tables and verdicts (the dense reference in
its band, rows apart by their intervals, peer curves netshrink dominates). Rerun it after
regenerating any page (a test fails while docs/benchmarks.md differs from what it would write).
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import netshrink as ns
from benchmarks.harness import ROOT

#: A page's header line, as ``benchmarks.__main__`` writes it (pages made before the runner
#: recorded the commit have none).
HEADER = re.compile(
    r"Produced by `(?P<command>[^`]+)`(?: at commit `(?P<commit>[^`]+)`)? on "
    r"(?P<date>\d{4}-\d\d-\d\d \d\d:\d\d) UTC(?P<quick> \(quick mode)?")
WALL = re.compile(r"total wall time (?P<minutes>[\d.]+) min")
SEEDS = re.compile(r"\((?P<seeds>\d+) seed\(s\) per configuration\)")
DATA = re.compile(r"\b(digits(?:28|32)|shapes(?:32|64)(?:_gray)?)\b")
#: An accuracy cell: ``mean[ ± std]% [lo, hi]`` (the interval in percent).
ACC = re.compile(r"(?P<mean>\d+(?:\.\d+)?)(?: ± [\d.]+)?% \[(?P<lo>[\d.]+), (?P<hi>[\d.]+)\]")
ACC_COLUMN = "test acc [95% CI]"
#: A peers page's verdict line on one peer curve.
VERDICT = re.compile(r"^- \*\*(?P<peer>[^*]+)\*\*: (?:\*\*(?P<verdict>dominated|not dominated)\*\*"
                     r"|(?P<unmeasured>no point measured))")
#: The band every dense reference of the shapes data is trained into (docs/datasets.md).
BAND = (85.0, 95.0)
#: Pages are small markdown files; anything larger is not one of them.
MAX_PAGE_BYTES = 2_000_000


@dataclass(frozen=True)
class Page:
    """What a page's header and body say about the run that made it."""

    name: str
    title: str
    command: str | None
    commit: str | None
    date: str | None
    wall_min: float | None
    seeds: int | None
    quick: bool
    data: tuple[str, ...]
    #: The ``## `` headings, whose first word names the model of a per-model section.
    sections: tuple[str, ...]
    #: (row label, mean %, interval low %, interval high %) of every table row with a
    #: ``test acc [95% CI]`` cell.
    accuracies: tuple[tuple[str, float, float, float], ...] = ()
    #: Per section model: (peer curve, its verdict: "dominated", "not dominated" or "no point
    #: measured" when every point of the curve failed), from the verdicts.
    verdicts: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()


def read_page(path: Path) -> Page:
    """The header fields of the page at ``path`` (``None`` where the page does not state one),
    its sections, accuracy cells and peer verdicts."""
    if path.stat().st_size > MAX_PAGE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size:,} bytes, more than a benchmark page "
                         f"({MAX_PAGE_BYTES:,})")
    text = path.read_text(encoding="utf-8")
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")),
                 path.stem)
    head, wall, seeds = HEADER.search(text), WALL.search(text), SEEDS.search(text)
    return Page(
        name=path.stem, title=title,
        command=head["command"] if head else None,
        commit=head["commit"] if head else None,
        date=head["date"] if head else None,
        wall_min=float(wall["minutes"]) if wall else None,
        seeds=int(seeds["seeds"]) if seeds else None,
        quick=bool(head and head["quick"]),
        data=tuple(sorted(set(DATA.findall(text)))),
        sections=tuple(line[3:].split(" ")[0] for line in text.splitlines()
                       if line.startswith("## ")),
        accuracies=tuple(accuracy_rows(text)),
        verdicts=tuple(peer_verdicts(text).items()))


def peer_verdicts(text: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """Per ``## <model>`` section: each peer curve's verdict line (dominated, not dominated,
    or no point measured)."""
    out: dict[str, list[tuple[str, str]]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].split(" ")[0]
        elif m := VERDICT.match(line):
            out.setdefault(section, []).append((m["peer"], m["verdict"] or m["unmeasured"]))
    return {k: tuple(v) for k, v in out.items()}


def dominance(model: str, pages: list[Page]) -> str:
    """How many peer curves netshrink dominates on ``model``, naming the others, from the
    first page (``peers_<model>`` first) with verdicts on it. A curve whose every point
    failed counts among the curves and is named: it is neither dominated nor beating
    netshrink."""
    found = [(p, dict(p.verdicts)[model]) for p in pages if model in dict(p.verdicts)]
    if not found:
        return ""
    page, verdicts = found[0]
    free = [peer for peer, verdict in verdicts if verdict == "not dominated"]
    failed = [peer for peer, verdict in verdicts if verdict == "no point measured"]
    dominated = len(verdicts) - len(free) - len(failed)
    return (f"netshrink dominates {dominated} of {len(verdicts)} peer curves "
            f"([{page.name}](benchmarks/{page.name}.md))"
            + (f"; not: {', '.join(free)}" if free else "")
            + (f"; failed on the page (no point measured): {', '.join(failed)}"
               if failed else ""))


def accuracy_rows(text: str) -> list[tuple[str, float, float, float]]:
    """Every row of the page's tables whose ``test acc [95% CI]`` cell has an interval."""
    rows, column = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if ACC_COLUMN in cells:
            column = cells.index(ACC_COLUMN)
        elif column is not None and column < len(cells) and (m := ACC.search(cells[column])):
            rows.append((cells[0], float(m["mean"]), float(m["lo"]), float(m["hi"])))
    return rows


def checks(page: Page) -> str:
    """What the issue's "must show" asks of a model's page, read off its table: the dense
    reference's accuracy against the band, and how many pairs of the other rows differ by more
    than their (printed) intervals."""
    dense = [r for r in page.accuracies if r[0].startswith("dense")]
    rest = [r for r in page.accuracies if not r[0].startswith("dense")]
    if not dense or not rest:
        return "—"
    _, mean, lo, hi = dense[0]
    band = "in" if BAND[0] <= mean <= BAND[1] else "**outside**"
    pairs = [(a, b) for i, a in enumerate(rest) for b in rest[i + 1:]]
    apart = sum(a[3] < b[2] or b[3] < a[2] for a, b in pairs)
    return (f"dense {mean:.2f}% [{lo:.1f}, {hi:.1f}], {band} the {BAND[0]:.0f}–{BAND[1]:.0f}% "
            f"band; {apart} of {len(pairs)} pairs of rows differ by more than their intervals")


def _commit_cell(page: Page) -> str:
    if page.command is None:
        return "no header"
    return f"`{page.commit}`" if page.commit else "not recorded"


def _seeds_cell(page: Page, default: int | None) -> str:
    if page.seeds is None:
        return "—"
    if default is not None and page.seeds < default:
        return f"{page.seeds} (its command now runs {default}; not re-run yet)"
    return str(page.seeds)


def page_table(pages: list[Page], seeds: dict[str, int] | None = None) -> list[str]:
    """One row per page: link, data, command, commit, date, wall time, seeds (flagged when
    below ``seeds[page name]``, the seeds the page's command runs now)."""
    seeds = seeds or {}
    lines = ["| page | data | command | commit | date (UTC) | wall time | seeds |",
             "|---|---|---|---|---|---|---|"]
    for p in pages:
        lines.append(
            f"| [{p.title}](benchmarks/{p.name}.md){' (quick mode)' if p.quick else ''} | "
            f"{', '.join(f'`{d}`' for d in p.data) or '—'} | "
            f"{f'`{p.command}`' if p.command else '—'} | {_commit_cell(p)} | {p.date or '—'} | "
            f"{f'{p.wall_min:.1f} min' if p.wall_min is not None else '—'} | "
            f"{_seeds_cell(p, seeds.get(p.name))} |")
    return lines


def model_table(models: list[str], kinds: list[str], pages: dict[str, Page],
                defined: set[str]) -> list[str]:
    """One row per model, one column per page kind (``<kind>_<model>``): a link with its
    commit, the command that would make it when it is a page of ``defined`` not generated
    yet, or "—"; and the other pages with a section on the model."""
    lines = ["| model | " + " | ".join(kinds) + " | checks | sections on other pages |",
             "|---|" + "---|" * (len(kinds) + 2)]
    for m in models:
        cells = []
        for kind in kinds:
            name, page = f"{kind}_{m}", pages.get(f"{kind}_{m}")
            cells.append(f"[`{page.commit}`](benchmarks/{name}.md)" if page and page.commit
                         else f"[page](benchmarks/{name}.md)" if page
                         else f"not run yet: `python -m benchmarks {name}`" if name in defined
                         else "—")
        first = pages.get(f"{kinds[0]}_{m}")
        ranked = sorted(pages.values(), key=lambda p: p.name != f"peers_{m}")
        cells.append("; ".join(c for c in (checks(first) if first else "",
                                            dominance(m, ranked)) if c) or "—")
        others = [p for p in pages.values()
                  if m in p.sections and p.name not in {f"{k}_{m}" for k in kinds}]
        cells.append(", ".join(f"[{p.name}](benchmarks/{p.name}.md)" for p in others) or "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def render(docs: Path, commit: str, now: datetime.datetime) -> str:
    """The index of the pages under ``docs/benchmarks/``, as markdown."""
    from benchmarks.pages import PAGES, overview, peers

    pages = {p.name: p for p in map(read_page, sorted((docs / "benchmarks").glob("*.md")))}
    models = list(dict.fromkeys([*overview.SHAPES_MODELS, *peers.CNN_MODELS]))
    kinds = ["overview", "peers"]
    in_table = {f"{k}_{m}" for k in kinds for m in models}
    missing = sorted(name for name, spec in PAGES.items()
                     if not (docs / spec.OUT).is_file() and name not in in_table)
    return "\n".join([
        "# Benchmarks",
        "",
        f"Generated by `python -m benchmarks.index` at commit `{commit}` on {now:%Y-%m-%d %H:%M} "
        "UTC from the headers of the pages below. This index measures nothing: every figure is "
        "on the page that states the command and commit that made it.",
        "",
        "Every page is regenerated by `python -m benchmarks PAGE` (`python -m benchmarks --help` "
        "lists them); a rerun at the same commit resumes the rows an interrupted page finished "
        "(the overview, peers, peers_<model>, defaults, joint, normsparse, statprune_tucker and "
        "search_chains pages; the others start over). The data sets are "
        "described in [Datasets](datasets.md): `shapes32`/`shapes64` are the hard generated sets "
        "(test n = 10,000), `digits28`/`digits32` scikit-learn's 8×8 digits (test n = 360, a "
        "smoke run only). The pages run with `NETSHRINK_THREADS=1` on a 2-core machine shared "
        "with other jobs, so their wall times are upper bounds of what the work needs.",
        "",
        "## Per model on the shapes data",
        "",
        "`overview`: every method, the shipped chains and the single peer points; `peers`: every "
        "peer library as a curve over its own knob against netshrink's points, and whether "
        "netshrink dominates each curve. The checks are read off the pages (the issue's \"must "
        "show\"): from the overview page's table, the dense reference against the 85–95% band "
        "and how many pairs of its other rows (methods, chains, peers) have disjoint 95% "
        "intervals; from the verdicts of the peers page (or another page with peer curves on the "
        "model), how many peer curves netshrink dominates (smaller on disk at an accuracy not "
        "below), which it does not, and which failed on the page (a peer whose library "
        "refused the model is a row with its error, no point on its curve).",
        "",
        *model_table(models, kinds, pages, set(PAGES)),
        "",
        "## Every page",
        "",
        *page_table(list(pages.values()),
                    {Path(spec.OUT).stem: getattr(spec, "SEEDS", 1) for spec in PAGES.values()}),
        "",
        *(["Pages defined in `benchmarks/pages/` that have not been generated yet: "
           + ", ".join(f"`{n}`" for n in missing) + ".", ""] if missing else []),
    ]).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> Path:
    """Write ``<out>/benchmarks.md``; returns its path."""
    from benchmarks.__main__ import commit

    parser = argparse.ArgumentParser(prog="python -m benchmarks.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs",
                        help="documentation root holding benchmarks/ (default: docs/)")
    args = parser.parse_args(argv)
    text = render(args.out, commit(), datetime.datetime.now(datetime.timezone.utc))
    path = args.out / "benchmarks.md"
    ns.atomic_write(path, text)
    print(f"wrote {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
