"""Command line: ``python -m attn list`` and ``python -m attn compare``.

Examples::

    python -m attn list
    python -m attn compare                                # every registered mechanism
    python -m attn compare --mode self --mode multihead --quick --out results/
    python -m attn compare --preset book --device cpu --seed 1

``compare`` prints a table and writes ``summary.csv``, ``sweep.csv``,
``curves.csv``, ``results.json`` and PNG figures to ``--out``. Exit status:
0 on success, 1 when a mechanism failed (its row says why; the files are still
written), 2 for bad arguments (a message, never a traceback), 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from .compare import PRESETS, presets_help

    parser = argparse.ArgumentParser(
        prog="python -m attn",
        description="The Attention Book's package: list the registered mechanisms, or compare them on shared axes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    lst = sub.add_parser("list", help="registered mechanisms: name, paper, complexity, chapter")
    lst.add_argument("--all", action="store_true", help="also list the chapters with no registered mechanism yet")

    cmp_ = sub.add_parser(
        "compare",
        help="train and benchmark mechanisms on the shared task; write CSV, JSON and PNG",
        description=(
            "Measure every registered mechanism (or those named with --mode) on the same axes: parameters, "
            "FLOPs, latency and peak memory, a sequence-length sweep with fitted exponents, the implementation "
            "kind (fused kernel, torch ops or a Python loop, measured), accuracy after a fixed training budget "
            "on multi-query associative recall (or the one-query recall floor) over several seeds, with a "
            "grid over pairs and width, convergence, loss curves and attention entropy. "
            "Mechanisms on other data (graphs, images, sets, documents, pairs) are measured on the same axes "
            "on their own task, in a second table."
        ),
        epilog=presets_help() + "\n\n`--list-axes` explains every column of summary.csv.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmp_.add_argument("--mode", action="append", metavar="NAME", dest="modes",
                      help="a registered mechanism (repeat for several; default: all). See `python -m attn list`.")
    sizes = cmp_.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_const", const="quick", dest="preset",
                       help="tiny sizes, a few seconds per mechanism (tests, smoke runs)")
    sizes.add_argument("--preset", choices=list(PRESETS), dest="preset",
                       help="size preset (default: 'default' on the CPU, 5-30 min per mechanism on 2 cores; 'gpu' on CUDA; "
                            "'book' is the chapter's, about 2 s per mechanism)")
    cmp_.add_argument("--device", default="auto", help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    cmp_.add_argument("--seed", type=_seed, default=0, help="the first seed for initialisation and data (default 0)")
    cmp_.add_argument("--seeds", type=_count, default=None, metavar="N",
                      help="seeds per learning number: --seed, --seed + 1, ... (default: the preset's, 3 on book "
                           "and default)")
    cmp_.add_argument("--task", choices=("mqar", "recall"), default="mqar",
                      help="the learning task: mqar (multi-query associative recall, Arora et al. 2023; default) "
                           "or recall (one query per sequence, the easy floor)")
    cmp_.add_argument("--out", type=Path, default=Path("compare-results"), metavar="DIR",
                      help="output directory for CSV, JSON and PNG files (default ./compare-results)")
    cmp_.add_argument("--workers", type=int, default=1, metavar="N",
                      help="on the CPU, measure N mechanisms at once, one process and one thread each (default 1)")
    cmp_.add_argument("--no-progress", action="store_true", help="no progress bars")
    cmp_.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    cmp_.add_argument("--list-axes", action="store_true", help="print what each column of the results means, and exit")
    return parser


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _check_out_dir(parser: argparse.ArgumentParser, out: Path) -> None:
    """Fail early, with a message, when results could not be written."""
    try:
        if out.exists() and not out.is_dir():
            parser.error(f"--out {out}: exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        parser.error(f"--out {out}: cannot write there ({err.strerror or err})")


def _list(show_all: bool) -> int:
    from .registry import CHAPTERS, mechanisms

    ms = mechanisms()
    rows = [("name", "chapter", "paper", "complexity", "data")]
    rows += [(m.name, f"{m.chapter:2d} {_title(m.chapter)}", m.paper, m.complexity, m.data) for m in ms]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    covered = {m.chapter for m in ms}
    missing = [c for c in CHAPTERS if c.number not in covered]
    print(f"\n{len(ms)} mechanisms registered, covering {len(covered)} of {len(CHAPTERS)} chapters.")
    if show_all and missing:
        print("Chapters with no registered mechanism yet:")
        for c in missing:
            print(f"  {c.number:2d} {c.title} ({c.papers})")
    return 0


def _title(number: int) -> str:
    from .registry import chapter

    try:
        return chapter(number).title
    except KeyError:
        return "?"


def _axes() -> int:
    from .compare import AXES

    width = max(map(len, AXES))
    for name, meaning in AXES.items():
        print(f"{name.ljust(width)}  {meaning}")
    return 0


def _compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from . import compare
    from .registry import mechanisms

    if args.list_axes:
        return _axes()
    if args.modes:
        known = {m.name for m in mechanisms()}  # imports every mechanism module first
        unknown = [m for m in dict.fromkeys(args.modes) if m not in known]
        if unknown:
            parser.error(
                f"unknown --mode {', '.join(unknown)}; valid names: {', '.join(m.name for m in mechanisms())}"
            )
    try:
        device = compare.resolve_device(args.device)
    except ValueError as err:
        parser.error(f"--device: {err}")
    _check_out_dir(parser, args.out)
    preset = compare.get_preset(args.preset, device)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS

    progress = not args.no_progress
    chosen = args.modes or [m.name for m in mechanisms()]
    n_seeds = args.seeds or preset.seeds
    print(f"Comparing {len(chosen)} mechanism(s) on {device}, {args.task}, seeds {args.seed}..{args.seed + n_seeds - 1}"
          f"\n{preset.describe(args.task)}", flush=True)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    result = compare.run(args.modes, preset=preset, seed=args.seed, device=device, progress=progress,
                         workers=args.workers, seeds=n_seeds, task=args.task)
    written = result.save(args.out, figures=not args.no_figures)

    print()
    print(result.format_table())
    notes = [(r.name, n) for r in result.results for n in r.notes if r.status != "own task"]
    if notes:
        print("\nNotes:")
        for name, note in notes:
            print(f"  {name}: {note}")
    print(f"\n{result.reading()}".replace("**", ""))
    print(f"\nWall time {result.wall_s:.1f} s. Wrote {len(written)} files to {args.out}/: "
          + ", ".join(p.name for p in written))
    failed = [r.name for r in result.results if r.status == "error"]
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (see the notes above)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return _list(args.all)
        return _compare(parser, args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `python -m attn list | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
