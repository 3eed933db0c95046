"""The server's per-round bookkeeping: central evaluation, the round record, the summary and
the checkpoint, all on disk before the next round starts, so a run killed at any point loses
at most the round in flight and `resume=<run dir>` continues it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from fedsparse.data.glue import main_metric
from fedsparse.federation import checkpoint
from fedsparse.federation.strategy import PackedStrategy
from fedsparse.methods import Method
from fedsparse.methods.model import load_tokenizer
from fedsparse.report.cli import plot_runs
from fedsparse.report.results import RunWriter
from fedsparse.report.tables import format_comm_table, format_round
from fedsparse.run import Run
from fedsparse.training.train import evaluate

MODEL_DIR = "model"  # the merged model, in stock Hugging Face format


class RoundRecorder:
    """`evaluate_fn` of Flower's `Strategy.start`, plus the run's summary and final outputs."""

    def __init__(
        self,
        run: Run,
        method: Method,
        strategy: PackedStrategy,
        dev_loader: DataLoader,
        full_message_bytes: int,
        extra_fields: Callable[[int], dict] = lambda server_round: {},
    ):
        self.run, self.cfg = run, run.cfg
        self.method, self.strategy, self.dev_loader = method, strategy, dev_loader
        self.full_message_bytes = full_message_bytes
        self.extra_fields = extra_fields
        self.metric = main_metric(self.cfg.task.name)
        self.history = run.history
        self.done = run.done  # rounds completed before this process
        self.start_values = run.resumed.values if run.resumed else method.initial_state()
        self.last_values = self.start_values
        self.writer = RunWriter(self.cfg, self.history if run.resumed else None)
        self.started = time.time() - (self.history[-1]["wall_seconds"] if self.history else 0.0)

    @property
    def dir(self) -> Path:
        return self.writer.dir

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += self.done
        if self.history and server_round == self.history[-1]["round"]:
            return None  # the resumed state, evaluated before the interruption
        values = self.last_values = arrays["values"].numpy()
        self.method.unpack(values)
        # on the method's device (train.device); the vector itself stays float32 on the host
        metrics = evaluate(
            self.method.model,
            self.dev_loader,
            self.cfg.task.name,
            str(self.cfg.train.get("precision", "fp32")),
        )
        comm = self.strategy.ledger.summary(server_round)
        s = self.strategy
        record = {
            "round": server_round,
            "dev": metrics,
            "comm": comm,
            "cumulative_bytes": (self.history[-1]["cumulative_bytes"] if self.history else 0)
            + comm["total_bytes"],
            "ratio_to_full": comm["up"]["per_client"] / self.full_message_bytes,
            "train": dict(s.train_metrics.get(server_round, {})),
            "client_eval": dict(s.client_eval.get(server_round, {})),
            "rejected": s.rejected.get(server_round, []),
            "trimmed": s.trimmed.get(server_round, []),
            "skipped": s.skipped.get(server_round),
            "sampled": s.sampler.sampled.get((server_round, "train"), []),
            "node_notes": s.sampler.notes.get(server_round, []),  # node identity policy (sampling)
            "wall_seconds": time.time() - self.started,
            **self.extra_fields(server_round),
        }
        self.writer.add_round(record)
        self.history.append(record)
        self.writer.write_summary(self.summary(finished=False))
        state = checkpoint.Checkpoint(
            server_round, values, self.history, s.state_arrays(), self.run.generator_states()
        )
        checkpoint.save(self.dir, state)
        print(format_round(record, self.cfg.federation.rounds, self.metric), flush=True)
        return MetricRecord(metrics)

    def summary(self, finished: bool) -> dict:
        history, method = self.history, self.method
        trained = history[1:]

        def total(*directions: str) -> int:
            return sum(h["comm"][d]["bytes"] for h in history for d in directions)

        def mean(direction: str) -> float:
            return float(np.mean([h["comm"][direction]["per_client"] for h in trained])) if trained else 0.0

        return {
            "mode": "federated",
            "finished": finished,
            "rounds_done": history[-1]["round"],
            "method": self.cfg.method.name,
            "task": self.cfg.task.name,
            "model": self.cfg.model.name,
            "rounds": self.cfg.federation.rounds,
            "metric": self.metric,
            "final": history[-1]["dev"],
            "best": max((h["dev"][self.metric] for h in trained), default=None),
            "values_per_message": method.num_values(),
            "trainable_values": method.num_trainable(),
            "head_values": method.head_size,
            "model_parameters": sum(p.numel() for p in method.model.parameters()),
            "full_model_message_bytes": self.full_message_bytes,
            "fingerprint": self.strategy.fingerprint,
            "bytes_down": total("down", "eval_down"),
            "bytes_up": total("up", "eval_up"),
            "mean_up_per_client": mean("up"),
            "mean_down_per_client": mean("down"),
            "rejected_replies": sum(len(h["rejected"]) for h in history),
            "skipped_rounds": [h["round"] for h in history if h.get("skipped")],
            "wall_seconds": time.time() - self.started,
        }

    def finish(self) -> dict:
        """The final summary, the communication table, plots and (optionally) the merged model."""
        summary = self.summary(finished=True)
        print(format_comm_table(self.history), flush=True)
        run = {
            "dir": str(self.dir),
            "summary": summary,
            "rounds": self.history,
            "config": OmegaConf.to_container(self.cfg),
        }
        outputs = plot_runs([run], self.dir)
        if self.cfg.save_model:
            outputs.append(self.save_model())
        self.writer.write_summary(summary)  # last: a run is finished only once its outputs exist
        print(f"results: {self.dir}\noutputs: {', '.join(str(p) for p in outputs)}", flush=True)
        return summary

    def save_model(self) -> Path:
        """The final global state merged into a stock model with its tokenizer: loadable with
        `AutoModelForSequenceClassification.from_pretrained(<run dir>/model)`, no fedsparse."""
        self.method.to("cpu")  # a stock model on the host, whatever evaluated
        self.method.unpack(self.last_values)
        path = self.dir / MODEL_DIR
        self.method.merge().save_pretrained(path)
        load_tokenizer(self.cfg.model.name).save_pretrained(path)
        return path
