"""Reports over groups of seeds (markdown tables, plots) and the README blocks made of them.

A block is the lines between `<!-- report:NAME -->` and `<!-- /report:NAME -->`; its content is made
from the runs in `experiments/results/NAME/`: a table per group of seeds, a bytes-to-target table
and links to the plots. The opening line may set targets: `<!-- report:NAME targets=0.6,0.7 -->`,
and `view=headline` for one short table (final metric, bytes per client and round, bytes to each
target) and one plot, `view=frontier` for that table and one point per group (final metric against
total bytes); `with=OTHER[,OTHER]` adds the finished runs of `experiments/results/OTHER/` (the
frontier reuses the uncompressed convergence runs). `python -m fedsparse.report --readme docs/results.md` rewrites the blocks (and
the plots) of any Markdown file; `--check` writes nothing and exits 1 with a diff when a block
differs from what the files give. Links in a block are relative to the file's directory, and the
results are the `experiments/results/` of that directory or its nearest parent that has one.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fedsparse.report.results import progress
from fedsparse.report.tables import (
    Group,
    best_metric,
    bytes_to_target,
    final_metric,
    group_runs,
    human_bytes,
    load_runs,
    mean_std,
    series,
)

DEFAULT_TARGETS = (0.80, 0.85)
TREND_ROUNDS = 3  # a curve has flattened when its slope over this many last rounds is ~0
PLOT_KINDS = ("metric_vs_bytes", "bytes_per_round", "metric_vs_round")
VIEW_PLOTS = {"full": PLOT_KINDS, "headline": ("metric_vs_bytes",), "frontier": ("frontier",)}
PLOT_PREFIX = "report_"
PLOT_TITLES = {
    "metric_vs_bytes": "dev metric vs cumulative bytes",
    "bytes_per_round": "uplink bytes per client per round",
    "metric_vs_round": "dev metric per round",
    "frontier": "final dev metric vs total bytes",
}
BLOCK = re.compile(
    r"^<!-- report:(?P<name>[\w.-]+)(?P<opts>[^\n]*?) -->\n(?P<body>.*?)^<!-- /report:(?P=name) -->$",
    re.M | re.S,
)
OPENING = re.compile(r"^<!-- report:", re.M)


def _md(header: list[str], rows: list[list[str]], left: int) -> str:
    """A markdown table; the first `left` columns are left-aligned, the others right-aligned.
    Hand-written (3 lines): tabulate's pipe format pads every cell to its column's width, so a
    regenerated block would rewrite every row whenever one cell grows."""
    align = ["---"] * left + ["---:"] * (len(header) - left)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def _cell(
    values: list[float],
    fmt: Callable[[float], str] = "{:.4f}".format,
    spread: bool = True,
    mean_fmt: Callable[[float], str] | None = None,
) -> str:
    """`mean ± std` over seeds (the mean alone for one seed or `spread=False`); `-` for no values.
    `mean_fmt`, if given, formats the mean (e.g. with its sign) and `fmt` the std."""
    if not values:
        return "-"
    mean, std, n = mean_std(values)
    return (mean_fmt or fmt)(mean) + (f" ± {fmt(std)}" if spread and n > 1 else "")


def id_columns(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """Header and cells naming each group: method, task and alpha (where they vary in the set), lr."""
    header, cols = ["method"], [[g.method for g in groups]]
    for name, values in (("task", [g.task for g in groups]), ("alpha", [g.alpha for g in groups])):
        if len(set(values)) > 1:
            header.append(name)
            cols.append([v if name == "task" else "-" if v is None else f"{v:g}" for v in values])
    header.append("lr")
    cols.append([f"{g.lr:g}" for g in groups])
    return header, [list(row) for row in zip(*cols)]


def _metric_name(groups: list[Group]) -> str:
    metrics = {g.metric for g in groups}
    return metrics.pop() if len(metrics) == 1 else "metric"


def _present(summaries: list[dict], key: str) -> list[float]:
    return [s[key] for s in summaries if s.get(key) is not None]


def trend(run_series: dict[str, np.ndarray]) -> float | None:
    """Least-squares slope of the dev metric over a run's last TREND_ROUNDS rounds, per round:
    whether its curve has flattened (None when it has too few rounds to tell)."""
    if len(run_series["round"]) <= TREND_ROUNDS:  # round 0 is the initial state, not a trained one
        return None
    rounds, metric = run_series["round"][-TREND_ROUNDS:], run_series["metric"][-TREND_ROUNDS:]
    return float(np.polyfit(rounds, metric, 1)[0])


def group_table(groups: list[Group]) -> str:
    """Per group: seeds, final and best dev metric (mean ± std; best over the trained rounds,
    round 0 left out as in the bytes-to-target table: `tables.trained`), the trend of the last rounds,
    mean bytes per client and round, mean total bytes (all clients and rounds), rounds."""
    header, rows = id_columns(groups)
    metric = _metric_name(groups)
    mixed = metric == "metric"  # several tasks: say which metric each row reports
    others = [_other_finals(g) for g in groups]
    for g, row, other in zip(groups, rows, others):
        summaries = [r["summary"] for r in g.runs]
        fed = [series(r, g.metric) for r in g.runs if r["rounds"]]
        row += [str(len(g.runs))] + ([g.metric] if mixed else [])
        bests = [b for b in (best_metric(r, g.metric) for r in g.runs) if b is not None]
        row += [_cell([final_metric(s, g.metric) for s in summaries]), _cell(bests)]
        row += [other] if any(others) else []
        slopes = [t for t in map(trend, fed) if t is not None]
        row += [_cell(slopes, mean_fmt="{:+.4f}".format)]
        row += [
            _cell(_present(summaries, k), human_bytes, False)
            for k in ("mean_up_per_client", "mean_down_per_client")
        ]
        row += [_cell([s["up"][-1] + s["down"][-1] for s in fed], human_bytes, False)]
        row += [_cell(_present(summaries, "rounds"), "{:.0f}".format, False)]
    header += ["seeds"] + (["metric"] if mixed else []) + [f"final {metric}", f"best {metric}"]
    header += ["final, other metrics"] if any(others) else []
    header += [f"trend/round (last {TREND_ROUNDS})"]
    header += ["up/client/round", "down/client/round"]
    return _md(header + ["total bytes", "rounds"], rows, left=1)


def _other_finals(group: Group) -> str:
    """The task's other GLUE metrics at the end (MRPC's accuracy beside F1, STS-B's Spearman)."""
    finals = [r["summary"].get("final", r["summary"].get("dev", {})) for r in group.runs]
    names = sorted({k for f in finals for k in f} - {group.metric, "loss"})
    return ", ".join(f"{k} {_cell(_present(finals, k))}" for k in names)


def target_table(groups: list[Group], targets: Sequence[float]) -> str:
    """Per group and target: seeds that reached it, mean rounds and cumulative bytes up/down/total."""
    groups = [g for g in groups if any(r["rounds"] for r in g.runs)]
    header, ids = id_columns(groups)
    rows = []
    for g, row in zip(groups, ids):
        for target in targets:
            t = bytes_to_target(g, target)
            seeds = f"{t['reached']}/{t['seeds']} seeds"
            if not t["reached"]:
                rows.append(row + [f"{target:g}", f"not reached ({seeds})", "-", "-", "-", "-"])
                continue
            rows.append(
                row
                + [f"{target:g}", seeds, f"{t['round']:.1f}"]
                + [human_bytes(t[k]) for k in ("up", "down", "total")]
            )
    return _md(
        header + ["target", "reached", "rounds", "bytes up", "bytes down", "bytes total"], rows, left=1
    )


def headline_table(groups: list[Group], targets: Sequence[float]) -> str:
    """Per group: seeds, final dev metric (mean ± std), bytes per client and round, and per target
    the seeds that reach it, the mean rounds and the mean cumulative bytes (all clients) to it."""
    header, rows = id_columns(groups)
    metric = _metric_name(groups)
    for g, row in zip(groups, rows):
        summaries = [r["summary"] for r in g.runs]
        row += [str(len(g.runs)), _cell([final_metric(s, g.metric) for s in summaries])]
        row += [
            _cell(_present(summaries, k), human_bytes, False)
            for k in ("mean_up_per_client", "mean_down_per_client")
        ]
        for target in targets:
            t = bytes_to_target(g, target)
            row += [f"{t['reached']}/{t['seeds']}"]
            row += [f"{t['round']:.1f}", human_bytes(t["total"])] if t["reached"] else ["-", "-"]
    header += ["seeds", f"final {metric}", "up/client/round", "down/client/round"]
    for target in targets:
        header += [f"seeds reaching {target:g}", f"rounds to {target:g}", f"bytes to {target:g}"]
    return _md(header, rows, left=1)


def experiment_tables(groups: list[Group], unfinished: list[Path], targets: Sequence[float]) -> str:
    """The group table, the bytes-to-target table and the unfinished runs, as markdown."""
    metric = _metric_name(groups)
    parts = [
        "Mean ± sample standard deviation over seeds (no ± with one seed); trend: the least-squares "
        f"slope of the dev {metric} over the last {TREND_ROUNDS} rounds, per round (about 0 once the "
        "curve has flattened); bytes are the serialized Flower messages, per client and round, and "
        "in total over all clients and rounds.",
        group_table(groups),
        f"Cumulative bytes over all clients (down + up, client-side evaluation included) until the dev "
        f"{metric} first reaches each target; rounds and bytes are means over the seeds that reach it.",
        target_table(groups, targets),
    ]
    if unfinished:
        parts.append(
            "Unfinished, not in the tables: "
            + ", ".join(f"`{d.name}` ({progress(d)})" for d in sorted(unfinished))
        )
    return "\n\n".join(parts)


def plot_groups(
    groups: list[Group], out_dir: str | Path, kinds: tuple[str, ...] = PLOT_KINDS, prefix: str = ""
) -> list[Path]:
    """`<prefix><kind>.png` per kind: per group, the mean over seeds and a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header, ids = id_columns(groups)
    labels = [", ".join([row[0]] + [f"{h}={v}" for h, v in zip(header[1:], row[1:])]) for row in ids]
    ylabel = "dev " + "/".join(sorted({g.metric for g in groups}))
    axes = {
        "metric_vs_bytes": (
            "cumulative bytes (down + up, all clients)",
            ylabel,
            "Dev metric vs communication",
        ),
        "bytes_per_round": ("round", "uplink bytes per client", "Measured uplink per client per round"),
        "metric_vs_round": ("round", ylabel, "Dev metric per round"),
    }
    paths = []
    for kind in kinds:
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        for g, label in zip(groups, labels):
            runs = [series(r, g.metric) for r in g.runs if r["rounds"]]
            if not runs:
                continue
            n = min(len(s["round"]) for s in runs)
            y = np.array([s["up_per_client" if kind == "bytes_per_round" else "metric"][:n] for s in runs])
            x = runs[0]["round"][:n].astype(float)
            if kind == "metric_vs_bytes":
                x = np.mean([s["up"][:n] + s["down"][:n] for s in runs], axis=0)
            keep = x > 0 if kind != "metric_vs_round" else x >= 0  # no zero on a log axis, no round 0 upload
            (line,) = ax.plot(x[keep], y.mean(axis=0)[keep], marker="o", ms=3, label=label)
            ax.fill_between(
                x[keep], y.min(axis=0)[keep], y.max(axis=0)[keep], color=line.get_color(), alpha=0.2
            )
        ax.set(xlabel=axes[kind][0], ylabel=axes[kind][1], title=axes[kind][2])
        if kind == "metric_vs_bytes":
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if kind == "bytes_per_round":
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        paths.append(out_dir / f"{prefix}{kind}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _base_method(group: Group) -> str:
    """The method of a group's label without its variant: `pafi` of `pafi[q2ef,d4]`."""
    return re.split(r"[\[ ]", group.method)[0]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (bytes, metric) points that no other point beats, one with fewer or as many
    bytes and a higher metric; in order of bytes."""
    front: list[int] = []
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if not front or points[i][1] > points[front[-1]][1]:
            front.append(i)
    return front


def plot_frontier(groups: list[Group], path: Path) -> Path:
    """One point per group: mean total bytes (all clients, rounds, directions) against the mean final
    dev metric, the bars spanning the lowest to the highest seed on both axes; one colour per
    method, one marker per variant, and the points no other beats joined and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, ids = id_columns(groups)
    methods = sorted({_base_method(g) for g in groups})
    markers = "osD^v<>phX*"
    seen: dict[str, int] = {}  # variants of each method drawn so far
    means = []  # (bytes, metric) of each group, for the frontier line
    fig, ax = plt.subplots(figsize=(9, 4.6))
    for g, row in zip(groups, ids):
        runs = [series(r, g.metric) for r in g.runs if r["rounds"]]
        x = np.array([s["up"][-1] + s["down"][-1] for s in runs], dtype=float)
        y = np.array([final_metric(r["summary"], g.metric) for r in g.runs if r["rounds"]])
        method = _base_method(g)
        variant = seen[method] = seen.get(method, -1) + 1
        label = ", ".join([row[0]] + [f"{h}={v}" for h, v in zip(header[1:], row[1:])])
        means.append((x.mean(), y.mean()))
        ax.errorbar(
            x.mean(),
            y.mean(),
            xerr=[[x.mean() - x.min()], [x.max() - x.mean()]],
            yerr=[[y.mean() - y.min()], [y.max() - y.mean()]],
            fmt=markers[variant % len(markers)],
            mfc="white" if variant // len(markers) % 2 else None,  # hollow once the markers repeat
            color=plt.get_cmap("tab10")(methods.index(method) % 10),
            ms=5,
            capsize=2,
            label=f"{label} ({len(runs)})",
        )
    front = pareto_front(means)
    xs, ys = zip(*(means[i] for i in front))
    ax.step(xs, ys, where="post", ls="--", lw=0.8, color="0.4", zorder=0, label="frontier (seeds' means)")
    for k, i in enumerate(front):  # names below and above the line by turns, so neighbours do not overlap
        ax.annotate(
            groups[i].method,
            means[i],
            xytext=(3, 5 if k % 2 else -10),
            textcoords="offset points",
            fontsize=6,
        )
    ax.set(
        xscale="log",
        xlabel="total bytes (down + up, all clients, all rounds)",
        ylabel="final dev " + _metric_name(groups),
        title="Final dev metric vs communication (bars: lowest to highest seed)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_dirs(experiment: Path) -> list[Path]:
    """Sub-directories of an experiment that hold a run (a config.yaml), sorted."""
    return (
        sorted(p for p in experiment.iterdir() if (p / "config.yaml").exists()) if experiment.is_dir() else []
    )


def render_block(
    experiment: Path,
    readme_dir: Path,
    targets: Sequence[float],
    write_plots: bool,
    view: str = "full",
    others: Sequence[Path] = (),
) -> str:
    """A block's content for one experiment directory (plus the runs of `others`); writes its plots
    if asked."""
    # Finished runs only: a run in flight would make the README depend on when it was generated.
    runs, _ = load_runs(run_dirs(experiment) + [d for other in others for d in run_dirs(other)])
    groups = group_runs(runs)
    rel = Path(os.path.relpath(experiment, readme_dir)).as_posix()
    sources = ", ".join(
        f"`{Path(os.path.relpath(d, readme_dir)).as_posix()}/`" for d in [experiment, *others]
    )
    text = f"_Generated by `python -m fedsparse.report --readme` from {sources} ({len(runs)} runs); do not edit._"
    fed = [g for g in groups if any(r["rounds"] for r in g.runs)]
    kinds = VIEW_PLOTS[view]
    if view == "full":
        text += "\n\n" + experiment_tables(groups, [], targets)
    elif fed:
        metric = _metric_name(fed)
        note = (
            f"Final {metric}: mean ± sample standard deviation over seeds. Bytes per client and round: "
            "the serialized Flower messages. Bytes to a target: cumulative bytes over all clients (down + "
            f"up) until the dev {metric} first reaches it, mean over the seeds that reach it."
        )
        text += "\n\n" + headline_table(fed, targets) + "\n\n" + note
    if fed:
        if write_plots and view == "frontier":
            plot_frontier(fed, experiment / f"{PLOT_PREFIX}frontier.png")
        elif write_plots:
            plot_groups(fed, experiment, kinds=kinds, prefix=PLOT_PREFIX)
        images = [f"![{PLOT_TITLES[k]}]({rel}/{PLOT_PREFIX}{k}.png)" for k in kinds]
        plots = "Plots" if len(images) > 1 else "Plot"
        spread = "shaded" if view != "frontier" else "bars"
        text += f"\n\n{plots}: mean over seeds, {spread} from the lowest to the highest seed."
        if view == "frontier":
            text += " The dashed line joins the groups no other beats (as few bytes or fewer and a higher mean), named on the plot."
        text += "\n\n"
        text += "\n".join(images)
    return text


VIEWS = tuple(VIEW_PLOTS)
OPTIONS = ("targets", "view", "with")


def _options(opts: str, default: Sequence[float]) -> tuple[Sequence[float], str, list[str]]:
    """A block's targets, view and other experiments, from the options on its opening line."""
    options = dict(kv.split("=", 1) for kv in opts.split())
    if set(options) - set(OPTIONS):
        raise ValueError(f"unknown report block option(s): {', '.join(set(options) - set(OPTIONS))}")
    if options.get("view", "full") not in VIEWS:
        raise ValueError(f"report block view={options['view']}: use one of {', '.join(VIEWS)}")
    targets = [float(t) for t in options["targets"].split(",")] if "targets" in options else default
    others = options["with"].split(",") if "with" in options else []
    return targets, options.get("view", "full"), others


def results_dir(readme: Path) -> Path:
    """`experiments/results` in the file's directory or its nearest parent that has one (a file in
    `docs/` reads the repository's results); the file's own directory's when none has."""
    for directory in (readme.parent.resolve(), *readme.parent.resolve().parents):
        if (directory / "experiments" / "results").is_dir():
            return directory / "experiments" / "results"
    return readme.parent / "experiments" / "results"


def update_readme(
    readme: str | Path,
    results: str | Path | None = None,
    check: bool = False,
    targets: Sequence[float] | None = None,
) -> int:
    """Regenerate (or with `check`, compare) every report block; 0 if all blocks are (now) up to date."""
    readme = Path(readme)
    results = Path(results) if results else results_dir(readme)
    text, problems, names = readme.read_text(), [], []

    def render(m: re.Match) -> str:
        experiment = results / m["name"]
        names.append(m["name"])
        if not run_dirs(experiment):
            problems.append(f"block {m['name']}: no runs under {experiment}")
            return m[0]
        chosen, view, others = _options(m["opts"], targets or DEFAULT_TARGETS)
        missing = [o for o in others if not run_dirs(results / o)]
        if missing:
            problems.append(
                f"block {m['name']}: no runs under {', '.join(str(results / o) for o in missing)}"
            )
            return m[0]
        body = render_block(experiment, readme.parent, chosen, not check, view, [results / o for o in others])
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body):
            if not (readme.parent / image).exists():
                problems.append(f"block {m['name']}: missing {image} (run without --check to draw it)")
        return f"<!-- report:{m['name']}{m['opts']} -->\n{body}\n<!-- /report:{m['name']} -->"

    new = BLOCK.sub(render, text)
    if len(OPENING.findall(text)) != len(names):
        problems.append(
            f"{len(OPENING.findall(text)) - len(names)} report block(s) without a matching closing line"
        )
    if new != text and check:
        diff = difflib.unified_diff(
            text.splitlines(True), new.splitlines(True), str(readme), "from the result files"
        )
        print("".join(diff), end="")
        problems.append(f"{readme} is stale: run python -m fedsparse.report --readme {readme}")
    elif new != text:
        readme.write_text(new)
    for p in problems:
        print(p)
    print(f"{len(names)} report block(s) {'checked' if check else 'written'}: {', '.join(names) or '-'}")
    return 1 if problems else 0
