"""Tables and plots from run directories: `python -m fedsparse.report RUN_DIR [RUN_DIR ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsparse.results import read_run


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def format_round(record: dict, total_rounds: int, metric: str) -> str:
    """One console line of per-round progress."""
    dev = record["dev"]
    head = f"[round {record['round']}/{total_rounds}] {metric}={dev[metric]:.4f} loss={dev['loss']:.4f}"
    if record["round"] == 0:
        return head + " (initial global state)"
    comm = record["comm"]
    line = (
        f"{head} | {len(comm['clients'])} clients | per client down "
        f"{human_bytes(comm['down']['per_client'])} up {human_bytes(comm['up']['per_client'])} | "
        f"cumulative {human_bytes(record['cumulative_bytes'])} | "
        f"{100 * record['ratio_to_full']:.3g}% of full | {record['wall_seconds']:.0f}s"
    )
    if record["rejected"]:
        line += f" | {len(record['rejected'])} replies dropped"
    return line


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    return "\n".join(lines + [fmt.format(*map(str, r)) for r in rows])


def format_comm_table(history: list[dict]) -> str:
    """Communication per round: measured bytes per client and direction, with the uplink breakdown."""
    rows = []
    for rec in history[1:]:
        down, up = rec["comm"]["down"], rec["comm"]["up"]
        n = max(up["messages"], 1)
        rows.append(
            [
                rec["round"],
                len(rec["comm"]["clients"]),
                human_bytes(down["per_client"]),
                human_bytes(up["per_client"]),
                human_bytes(up["values"] / n),
                human_bytes(up["head"] / n),
                human_bytes(up["indices"] / n),
                human_bytes(up["overhead"] / n),
                human_bytes(rec["cumulative_bytes"]),
                f"{100 * rec['ratio_to_full']:.3g}%",
            ]
        )
    header = [
        "round",
        "clients",
        "down/client",
        "up/client",
        "up values",
        "up head",
        "up indices",
        "up overhead",
        "cumulative",
        "up vs full",
    ]
    return "Communication (bytes measured on the serialized Flower messages)\n" + _table(header, rows)


def compare_runs(run_dirs: list[str | Path]) -> tuple[str, list[dict]]:
    """A comparison table of several runs (one line per run) and the loaded runs."""
    runs, rows = [], []
    for d in run_dirs:
        config, rounds, summary = read_run(d)
        runs.append({"dir": str(d), "config": config, "rounds": rounds, "summary": summary})
        metric = summary.get("metric")
        rows.append(
            [
                summary["method"] + _variant(config),
                summary["task"],
                f"{summary.get('values_per_message', summary.get('trainable_values')):,}",
                human_bytes(summary.get("mean_up_per_client", 0)),
                human_bytes(summary.get("mean_down_per_client", 0)),
                human_bytes(summary.get("bytes_down", 0) + summary.get("bytes_up", 0)),
                f"{100 * summary.get('mean_up_per_client', 0) / summary['full_model_message_bytes']:.3g}%"
                if summary.get("full_model_message_bytes")
                else "-",
                f"{summary['final'][metric]:.4f}" if metric else f"{summary['dev']}",
                f"{summary.get('wall_seconds', summary.get('train_seconds', 0)):.0f}s",
            ]
        )
    header = [
        "method",
        "task",
        "values/msg",
        "up/client/round",
        "down/client/round",
        "total",
        "up vs full",
        "final metric",
        "wall",
    ]
    return _table(header, rows), runs


def _variant(config: dict) -> str:
    method = config["method"]
    if method["name"] == "hiwi":
        return f"[{method['exchange']}]"
    if method["name"] == "pafi" and method["select"] != "smallest":
        return f"[{method['select']}]"
    return ""


def plot_runs(runs: list[dict], out_dir: str | Path) -> list[Path]:
    """bytes_per_round.png (uplink per client per round) and metric_vs_bytes.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fed = [r for r in runs if r["rounds"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in fed:
        label = r["summary"]["method"] + _variant(r["config"])
        rounds = r["rounds"][1:]
        ax.plot(
            [x["round"] for x in rounds],
            [x["comm"]["up"]["per_client"] for x in rounds],
            marker="o",
            label=label,
        )
    ax.set(
        yscale="log",
        xlabel="round",
        ylabel="uplink bytes per client",
        title="Measured uplink per client per round",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    bytes_png = out_dir / "bytes_per_round.png"
    fig.savefig(bytes_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in fed:
        metric = r["summary"]["metric"]
        label = r["summary"]["method"] + _variant(r["config"])
        ax.plot(
            [x["cumulative_bytes"] / 1e6 for x in r["rounds"]],
            [x["dev"][metric] for x in r["rounds"]],
            marker="o",
            label=label,
        )
    ax.set(
        xscale="symlog",
        xlabel="cumulative MB (down + up, all clients)",
        ylabel=f"dev {fed[0]['summary']['metric'] if fed else ''}",
        title="Dev metric vs communication",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    metric_png = out_dir / "metric_vs_bytes.png"
    fig.savefig(metric_png, dpi=120)
    plt.close(fig)
    return [bytes_png, metric_png]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (each with summary.json)")
    parser.add_argument("--out", default=None, help="where to write the plots (default: first run dir)")
    args = parser.parse_args(argv)
    table, runs = compare_runs(args.runs)
    print(table)
    for path in plot_runs(runs, args.out or args.runs[0]):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
