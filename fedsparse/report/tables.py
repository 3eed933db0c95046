"""Tables from run directories: per-round console lines, the communication table, run tables and
groups of seeds (mean ± std); reads files only (the CLI is `fedsparse.report.cli`).

Runs that differ only in their seed form one group, reported as mean ± std over its seeds.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from tabulate import tabulate

from fedsparse.config import NEUTRAL_SETTINGS, compression_tags, training_settings
from fedsparse.data.glue import main_metric
from fedsparse.report.results import is_finished, read_run

# Where and on what hardware a run ran, beyond what `training_settings` already leaves out: two runs
# differing only here (or in a key named `seed`) are seeds of one experiment.
IGNORED_KEYS = {"data.glue_dir", "federation.ray_address", "federation.client_cpus"}
# What a group label shows for a setting its runs leave out (`training_settings` drops neutral ones).
NEUTRAL = {f"{section}.{k}": v for section, neutrals in NEUTRAL_SETTINGS.items() for k, v in neutrals.items()}


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
    if record.get("skipped"):
        line += f" | round skipped: {record['skipped']}"
    return line


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A console table, every column right-aligned (numbers with units read best that way)."""
    return tabulate(rows, header, tablefmt="simple", stralign="right", disable_numparse=True)


def format_comm_table(history: list[dict]) -> str:
    """Communication per round: measured bytes per client and direction, with the uplink breakdown."""
    rows = []
    for rec in history[1:]:
        down, up = rec["comm"]["down"], rec["comm"]["up"]
        n = max(up["messages"], 1)
        rows.append(
            [rec["round"], len(rec["comm"]["clients"])]
            + [human_bytes(down["per_client"]), human_bytes(up["per_client"])]
            + [human_bytes(up[k] / n) for k in ("values", "head", "indices", "overhead")]
            + [human_bytes(_other_bytes(rec["comm"]))]
            + [human_bytes(rec["cumulative_bytes"]), f"{100 * rec['ratio_to_full']:.3g}%"]
        )
    header = ["round", "clients", "down/client", "up/client", "up values", "up head", "up indices"]
    header += ["up overhead", "other msgs", "cumulative", "up vs full"]
    note = "other msgs: all clients, both directions (partition-id queries, SecAgg+ key exchange)"
    title = "Communication (bytes measured on the serialized Flower messages)\n"
    return title + _table(header, rows) + "\n" + note


def _other_bytes(comm: dict) -> int:
    """Round bytes outside the train/evaluate exchanges (queries; SecAgg+ setup, keys, unmask)."""
    return comm["total_bytes"] - sum(comm[d]["bytes"] for d in ("down", "up", "eval_down", "eval_up"))


def is_run_dir(path: str | Path) -> bool:
    """A directory holding a run's `config.yaml`: a run, finished or not. A run stopped before its
    recorder started (only `shards.json`), a plots folder or a file beside the runs is not one."""
    return (Path(path) / "config.yaml").is_file()


def split_run_dirs(paths: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """`paths` (e.g. a shell glob over an output directory) as (run directories, everything else)."""
    paths = list(map(Path, paths))
    return [p for p in paths if is_run_dir(p)], [p for p in paths if not is_run_dir(p)]


def load_runs(run_dirs: list[str | Path]) -> tuple[list[dict], list[Path]]:
    """The finished runs as {dir, config, rounds, summary}, and the unfinished ones (a config.yaml
    and a summary saying `finished: false`, or none yet); raises for a path holding no run (see
    `split_run_dirs`, which sets those apart first)."""
    runs, unfinished = [], []
    for d in map(Path, run_dirs):
        if (d / "config.yaml").exists() and not is_finished(d):
            unfinished.append(d)
            continue
        config, rounds, summary = read_run(d)
        runs.append({"dir": str(d), "config": config, "rounds": rounds, "summary": summary})
    return runs, unfinished


def trained(rounds: list[dict]) -> list[dict]:
    """The rounds that trained: round 0 is the initial global state, evaluated before any client
    trained, the point the curves start from (plots, `format_round`) and not a result. One rule for
    every number over rounds: a run's best metric (`best_metric`), the first round that reaches a
    target (`bytes_to_target`) and the trend (`readme_blocks.trend`) look at rounds >= 1 only, as
    the summary's `best` does; so a run starting from a fine-tuned model does not "reach" a target
    at round 0 with 0 bytes that its training never reaches."""
    return [r for r in rounds if r["round"] >= 1]


def best_metric(run: dict, metric: str) -> float | None:
    """The best dev metric over the run's trained rounds (`trained`), read from its rounds; the
    summary's `best` for a run without rounds; None for a central run (it has only `dev`)."""
    values = [r["dev"][metric] for r in trained(run["rounds"]) if metric in r["dev"]]
    return max(values) if values else run["summary"].get("best")


def final_metric(summary: dict, metric: str) -> float:
    """The dev metric at the end of a run (`final` for federated runs, `dev` for central ones)."""
    return summary["final" if "final" in summary else "dev"][metric]


def run_table(runs: list[dict]) -> str:
    """One line per run: payload size, bytes per client and round, total, final metric, wall time."""
    rows = []
    for run in runs:
        summary = run["summary"]
        metric = summary.get("metric") or main_metric(summary["task"])
        full = summary.get("full_model_message_bytes")
        rows.append(
            [
                summary["method"] + _variant(run["config"]),
                summary["task"],
                f"{summary.get('values_per_message', summary.get('trainable_values')):,}",
                human_bytes(summary.get("mean_up_per_client", 0)),
                human_bytes(summary.get("mean_down_per_client", 0)),
                human_bytes(summary.get("bytes_down", 0) + summary.get("bytes_up", 0)),
                f"{100 * summary.get('mean_up_per_client', 0) / full:.3g}%" if full else "-",
                f"{final_metric(summary, metric):.4f}",
                f"{summary.get('wall_seconds', summary.get('train_seconds', 0)):.0f}s",
            ]
        )
    header = ["method", "task", "values/msg", "up/client/round", "down/client/round", "total"]
    return _table(header + ["up vs full", "final metric", "wall"], rows)


def compare_runs(run_dirs: list[str | Path]) -> tuple[str, list[dict]]:
    """run_table of the finished runs among `run_dirs`, and those runs."""
    runs, _ = load_runs(run_dirs)
    return run_table(runs), runs


def _variant(config: dict) -> str:
    """What tells runs of one method apart: HiWi's exchange and fixed W_down, PaFi's selection,
    density, index encoding, compression up and down."""
    method, parts = config["method"], []
    if method["name"] == "hiwi":
        parts.append(method["exchange"])
    if method["name"] == "pafi" and method.get("select", "smallest") != "smallest":
        parts.append(method["select"])
    if method["name"] in ("pafi", "topk") and method.get("density", 0.005) != 0.005:
        parts.append(f"d={method['density']:g}")
    if method["name"] == "topk" and method.get("index_encoding", "int32") != "int32":
        parts.append(method["index_encoding"])
    if method["name"] == "hiwi" and not method.get("train_down", True):
        parts.append("fixed-down")
    parts += compression_tags(config.get("compression") or {})  # as in the run names
    return f"[{','.join(parts)}]" if parts else ""


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of a config, lists as tuples, without seeds and IGNORED_KEYS."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif f"{prefix}{k}" not in IGNORED_KEYS and k != "seed":
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _group_label(config: dict) -> tuple:
    """What a group is labelled by: method variant, task, lr, Dirichlet alpha."""
    lr = config.get("train", {}).get("lr", config["method"].get("lr", 0.0))
    name = (
        config["method"]["name"] + _variant(config) + (" central" if config.get("mode") == "central" else "")
    )
    return name, config["task"]["name"], float(lr), config.get("federation", {}).get("alpha")


@dataclass
class Group:
    """Runs that differ only in their seed."""

    method: str  # method and variant, e.g. hiwi[merged], plus any other setting that tells groups apart
    task: str
    lr: float
    alpha: float | None
    runs: list[dict] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.runs[0]["summary"].get("metric") or main_metric(self.task)


def group_runs(runs: list[dict]) -> list[Group]:
    """Group runs whose training settings are equal but for seeds (a run saved before a setting
    existed joins the runs that have it at its neutral value); sorted by task, method, lr, alpha."""
    by_config: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        settings = training_settings(OmegaConf.create(run["config"]))
        by_config[tuple(sorted(_flatten(settings).items()))].append(run)
    labels = {key: _group_label(members[0]["config"]) for key, members in by_config.items()}
    groups = []
    for key, members in by_config.items():
        method, task, lr, alpha = labels[key]
        # Groups that would share a label get the settings that differ among them appended.
        twins = [set(k) for k in by_config if k != key and labels[k] == labels[key]]
        mine = dict(key)
        for name in sorted({name for twin in twins for name, _ in twin ^ set(key)}):
            method += f" {name}={mine.get(name, NEUTRAL.get(name, '-'))}"
        members.sort(key=lambda r: (r["config"].get("seed", 0), r.get("dir", "")))
        groups.append(Group(method, task, lr, alpha, members))
    return sorted(groups, key=lambda g: (g.task, g.method, g.lr, -1 if g.alpha is None else g.alpha))


def series(run: dict, metric: str) -> dict[str, np.ndarray]:
    """Per round: dev metric, cumulative bytes up and down (all clients, client-side evaluation
    included) and uplink bytes per client."""
    rounds = run["rounds"]

    def cumulative(*directions: str) -> np.ndarray:
        return np.cumsum([sum(r["comm"].get(d, {}).get("bytes", 0) for d in directions) for r in rounds])

    return {
        "round": np.array([r["round"] for r in rounds]),
        "metric": np.array([r["dev"][metric] for r in rounds]),
        "up": cumulative("up", "eval_up"),
        "down": cumulative("down", "eval_down"),
        "up_per_client": np.array([r["comm"]["up"]["per_client"] for r in rounds]),
    }


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for a single value) and count."""
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0, len(x)


def bytes_to_target(group: Group, target: float) -> dict:
    """Rounds and cumulative bytes until the dev metric first reaches `target` in a trained round
    (round >= 1: see `trained`), mean over the seeds that reach it: {reached, seeds[, round, up,
    down, total]}."""
    hits = []
    for run in group.runs:
        s = series(run, group.metric)
        first = np.flatnonzero((s["metric"] >= target) & (s["round"] >= 1))
        if len(first):
            hits.append([s[k][first[0]] for k in ("round", "up", "down")])
    out = {"reached": len(hits), "seeds": len(group.runs)}
    if hits:
        rounds, up, down = np.mean(hits, axis=0)
        out.update(round=float(rounds), up=float(up), down=float(down), total=float(up + down))
    return out
