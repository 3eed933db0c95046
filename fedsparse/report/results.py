"""Run directories: the resolved config, one JSON line per round, and a summary."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedsparse.atomic import write_text_atomic
from fedsparse.config import run_dir, training_settings


class RunWriter:
    """Writes `<output_dir>/<run_name>/{config.yaml, rounds.jsonl, summary.json}` as the run goes.

    A new run refuses a directory that already holds files (it would mix two runs' results);
    a resumed run rewrites `config.yaml` (its config as resumed) and `rounds.jsonl` from its
    checkpoint, dropping any round recorded after the checkpoint was taken.
    """

    def __init__(self, cfg: DictConfig, resumed_history: list[dict] | None = None):
        self.dir = run_dir(cfg)
        self.rounds_path = self.dir / "rounds.jsonl"
        if resumed_history is None:
            refuse_existing_run(cfg)
            self.dir.mkdir(parents=True, exist_ok=True)
            resumed_history = []
        # a resumed run's config as it continues: upgraded to today's layout, rounds as extended
        write_text_atomic(self.dir / "config.yaml", OmegaConf.to_yaml(cfg))
        write_text_atomic(self.rounds_path, "".join(json.dumps(r) + "\n" for r in resumed_history))

    def add_round(self, record: dict) -> None:
        with self.rounds_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict) -> Path:
        path = self.dir / "summary.json"
        write_text_atomic(path, json.dumps(summary, indent=2))
        return path


def refuse_existing_run(cfg: DictConfig) -> None:
    """A new run never writes into another run's directory (it would mix two runs' results)."""
    path = run_dir(cfg)
    if not cfg.get("resume") and (path / "config.yaml").exists():
        raise FileExistsError(
            f"{path} already holds a run. Continue it with resume={path}, or choose another "
            "run_name (or output_dir)."
        )


def is_finished(path: str | Path) -> bool:
    """A run directory whose summary says the last round is done (summaries written before
    per-round summaries existed were only written at the end)."""
    summary = Path(path) / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("finished", True)


def progress(path: str | Path) -> str:
    """`round r/R` of a run directory from its summary, or `not started`."""
    summary = Path(path) / "summary.json"
    if not summary.exists():
        return "no round finished"
    data = json.loads(summary.read_text())
    return f"round {data.get('rounds_done', '?')}/{data.get('rounds', '?')}"


def already_finished(cfg: DictConfig) -> bool:
    """True when this exact run already completed (sweeps skip it); raises if the run directory
    holds another configuration, which would otherwise be overwritten."""
    path = run_dir(cfg)
    if not is_finished(path):
        return False
    if training_settings(OmegaConf.load(path / "config.yaml")) != training_settings(cfg):
        raise FileExistsError(
            f"{path} holds a finished run with another configuration. Choose another run_name "
            "(or output_dir), or delete that directory."
        )
    return True


def read_run(path: str | Path) -> tuple[dict, list[dict], dict]:
    """(config, rounds, summary) of a run directory; raises naming what is missing."""
    path = Path(path)
    missing = [n for n in ("config.yaml", "summary.json") if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a fedsparse run with a finished round (missing {', '.join(missing)})."
        )
    config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    rounds_file = path / "rounds.jsonl"
    rounds = (
        [json.loads(line) for line in rounds_file.read_text().splitlines() if line.strip()]
        if rounds_file.exists()
        else []
    )
    summary = json.loads((path / "summary.json").read_text())
    return config, rounds, summary
