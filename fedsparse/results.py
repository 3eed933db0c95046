"""Run directories: the resolved config, one JSON line per round, and a summary."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedsparse.config import run_dir


class RunWriter:
    """Writes `<output_dir>/<run_name>/{config.yaml, rounds.jsonl, summary.json}` as the run goes."""

    def __init__(self, cfg: DictConfig):
        self.dir = run_dir(cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        self.rounds_path = self.dir / "rounds.jsonl"
        self.rounds_path.write_text("")

    def add_round(self, record: dict) -> None:
        with self.rounds_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict) -> Path:
        path = self.dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(path)  # never leave a half-written summary behind
        return path


def finished(cfg: DictConfig) -> bool:
    """True when this exact run already completed (sweeps skip it); raises if the run directory
    holds another configuration, which would otherwise be overwritten."""
    path = run_dir(cfg)
    if not (path / "summary.json").exists():
        return False
    saved = OmegaConf.load(path / "config.yaml")
    if saved != cfg:
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
        raise FileNotFoundError(f"{path} is not a finished fedsparse run (missing {', '.join(missing)}).")
    config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    rounds_file = path / "rounds.jsonl"
    rounds = (
        [json.loads(line) for line in rounds_file.read_text().splitlines() if line.strip()]
        if rounds_file.exists()
        else []
    )
    summary = json.loads((path / "summary.json").read_text())
    return config, rounds, summary
