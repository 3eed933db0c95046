"""Reports from run directories: tables, grouped tables and plots, or the docs' report blocks.

    python -m fedsparse.report RUN_DIR [RUN_DIR ...] [--out DIR]   # per-run table, grouped tables, plots
    python -m fedsparse.report --readme docs/results.md [--check]  # regenerate / verify a file's report blocks

Runs that differ only in their seed form one group, reported as mean ± std over its seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsparse.report.readme_blocks import DEFAULT_TARGETS, experiment_tables, plot_groups, update_readme
from fedsparse.report.tables import group_runs, load_runs, run_table, split_run_dirs


def plot_runs(runs: list[dict], out_dir: str | Path) -> list[Path]:
    """bytes_per_round.png (uplink per client per round) and metric_vs_bytes.png of finished runs."""
    return plot_groups(group_runs(runs), out_dir, kinds=("bytes_per_round", "metric_vs_bytes"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs", nargs="*", help="run directories (config.yaml, ...); other paths are skipped with a note"
    )
    parser.add_argument("--out", default=None, help="where to write the plots (default: first finished run)")
    parser.add_argument(
        "--readme", default=None, help="regenerate the <!-- report:NAME --> blocks of this Markdown file"
    )
    parser.add_argument(
        "--results", default=None, help="default: the nearest experiments/results above the file"
    )
    parser.add_argument("--check", action="store_true", help="with --readme: write nothing, exit 1 if stale")
    parser.add_argument(
        "--targets", type=float, nargs="+", help=f"dev-metric targets (default {DEFAULT_TARGETS})"
    )
    args = parser.parse_args(argv)
    if args.readme:
        return update_readme(args.readme, args.results, check=args.check, targets=args.targets)
    if not args.runs:
        parser.error("give run directories, or --readme FILE.md")
    run_dirs, others = split_run_dirs(args.runs)
    if others:  # e.g. `outputs/*` also matches --out outputs/plots, or a run stopped before round 0
        skipped = ", ".join(map(str, others))
        print(f"skipped, no config.yaml (not a run, or one stopped before it began): {skipped}")
    if not run_dirs:
        print("no fedsparse run among the given paths (a run directory holds config.yaml)")
        return 1
    runs, unfinished = load_runs(run_dirs)
    groups = group_runs(runs)
    print(run_table(runs) + "\n\n" + experiment_tables(groups, unfinished, args.targets or DEFAULT_TARGETS))
    for path in plot_groups(groups, args.out or runs[0]["dir"]) if runs else []:
        print(f"wrote {path}")
    return 0
