"""The run lifecycle: compose and validate a run's configuration once, decide whether it starts,
resumes or is skipped, and restore a resumed run's state for the ServerApp and its recorder.

    CLI / flwr run ──overrides──> prepare() ──> Run(cfg, resumed checkpoint, noise generator)
        new run:      compose today's conf/, validate, name
        resume=DIR:   DIR/config.yaml merged over today's defaults (a config saved by an older
                      version gains the settings added since, at their defaults), the overrides
                      allowed on a resumed run applied, every other change refused by name
        finished:     Run.finished (the caller prints "skip")
    Run ──> ServerApp (the same cfg for server and simulated clients) ──> Run.restore(strategy,
    runner): round offset, server optimiser state, DP accountant; the recorder saves
    Run.generator_states() with every checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from fedsparse.config import (
    CONF_DIR,
    auto_run_name,
    compose,
    name_run,
    overrides_from_run_config,
    run_dir,
)
from fedsparse.data.glue import TASKS
from fedsparse.federation import checkpoint
from fedsparse.federation.compression import config_problems as compression_problems
from fedsparse.federation.faults import FAIL_MODES
from fedsparse.federation.strategy import STRATEGIES
from fedsparse.methods import METHODS
from fedsparse.methods.device import device_problem, precision_problem
from fedsparse.privacy.dp import config_problems
from fedsparse.report.results import already_finished, is_finished

# `schema_version` in conf/config.yaml; 1: configs saved before versions existed (no `schema_version`)
CONFIG_SCHEMA_VERSION = 2
MODES = ("federated", "central")
# What a resumed run may change: how long it runs and waits, and whether it saves the model.
# Where it computes (train.device, federation.client_gpus) may change too: the messages do not
# depend on it (docs/configuration.md, Devices, says what does).
RESUMABLE = (
    "federation.rounds",
    "federation.round_timeout",
    "federation.grace_min",
    "federation.grace_factor",
    "federation.wait_timeout",
    "save_model",
    "train.device",
    "federation.client_gpus",
)
# Decided by resume=DIR itself (the run's directory), or only a default of another key:
# `method.lr` is what `train.lr` copies, and `train.lr` is compared.
NOT_COMPARED = ("resume", "run_name", "output_dir", "method.lr")
NOISE = "dp-noise"  # the generator of central DP noise: seeded from OS entropy, never from `seed`


class ConfigError(ValueError):
    """A configuration that cannot run, said in one line naming the key and the valid values."""


def problems(cfg: DictConfig) -> list[str]:
    """Every reason this resolved config cannot run, each naming its key and the valid values."""
    fed, train = cfg.federation, cfg.train
    checks = [
        (cfg.mode in MODES, f"mode={cfg.mode}: use one of {MODES}"),
        (cfg.method.name in METHODS, f"method={cfg.method.name}: use one of {tuple(METHODS)}"),
        (cfg.task.name in TASKS, f"task={cfg.task.name}: use one of {tuple(TASKS)}"),
        (fed.strategy in STRATEGIES, f"federation.strategy={fed.strategy}: use one of {tuple(STRATEGIES)}"),
        (
            fed.partitioner in ("dirichlet", "iid"),
            f"federation.partitioner={fed.partitioner}: use dirichlet or iid",
        ),
        (fed.num_clients >= 1, f"federation.num_clients={fed.num_clients}: must be >= 1"),
        (
            0 < fed.clients_per_round <= fed.num_clients,
            f"federation.clients_per_round={fed.clients_per_round}: must be between 1 and "
            f"federation.num_clients={fed.num_clients}",
        ),
        (fed.rounds >= 1, f"federation.rounds={fed.rounds}: must be >= 1"),
        (fed.alpha > 0, f"federation.alpha={fed.alpha}: must be > 0"),
        (fed.get("proximal_mu", 0.0) >= 0, f"federation.proximal_mu={fed.get('proximal_mu')}: must be >= 0"),
        (train.lr > 0, f"train.lr={train.lr}: must be > 0"),
        (train.batch_size >= 1, f"train.batch_size={train.batch_size}: must be >= 1"),
        (0 < train.lr_decay <= 1, f"train.lr_decay={train.lr_decay}: must be in (0, 1]"),
        (train.head_lr_scale > 0, f"train.head_lr_scale={train.head_lr_scale}: must be > 0"),
        (
            1 <= fed.min_replies <= fed.clients_per_round,
            f"federation.min_replies={fed.min_replies}: must be between 1 and "
            f"federation.clients_per_round={fed.clients_per_round} (a larger quorum skips every round)",
        ),
        (fed.max_examples >= 1, f"federation.max_examples={fed.max_examples}: must be >= 1"),
        (fed.round_timeout > 0, f"federation.round_timeout={fed.round_timeout}: must be > 0 (seconds)"),
        (fed.grace_min >= 0, f"federation.grace_min={fed.grace_min}: must be >= 0 (seconds)"),
        (fed.grace_factor >= 0, f"federation.grace_factor={fed.grace_factor}: must be >= 0"),
        (0 <= fed.fail_rate <= 1, f"federation.fail_rate={fed.fail_rate}: must be in [0, 1]"),
        (fed.fail_mode in FAIL_MODES, f"federation.fail_mode={fed.fail_mode}: use one of {FAIL_MODES}"),
        (
            train.local_steps is None or train.local_steps >= 1,
            f"train.local_steps={train.local_steps}: must be >= 1 (or null, with train.local_epochs set)",
        ),
        (
            train.local_epochs is None or train.local_epochs > 0,
            f"train.local_epochs={train.local_epochs}: must be > 0",
        ),
        (  # clients take the steps when both are set: the epochs would be silently ignored
            train.local_steps is None or train.local_epochs is None,
            "set only one of train.local_steps and train.local_epochs "
            "(e.g. train.local_steps=null train.local_epochs=1)",
        ),
    ]
    return (
        [message for ok, message in checks if not ok]
        + device_problems(cfg)
        + config_problems(cfg)
        + compression_problems(cfg)
    )


def device_problems(cfg: DictConfig) -> list[str]:
    """`train.device` (checked against the GPUs this process sees: the server's, or a simulation's;
    a deployed client checks its own when it resolves the device), `train.precision` and
    `federation.client_gpus`. Configs saved before these keys existed run on their defaults."""
    train, fed = cfg.train, cfg.federation
    found = [
        device_problem(train.get("device", "auto")),
        precision_problem(train.get("precision", "fp32")),
    ]
    gpus = fed.get("client_gpus", 0)
    if not isinstance(gpus, (int, float)) or isinstance(gpus, bool) or gpus < 0:
        found.append(
            f"federation.client_gpus={gpus}: must be a number >= 0 (a GPU fraction per client actor)"
        )
    return [p for p in found if p]


def validate(cfg: DictConfig) -> DictConfig:
    """`cfg` itself, or a ConfigError listing every problem."""
    found = problems(cfg)
    if found:
        raise ConfigError("invalid configuration: " + "; ".join(found))
    return cfg


def check_overrides(overrides: Sequence[str]) -> None:
    """Unknown keys and config-group options, refused in one line before Hydra composes (Hydra's
    own messages span several lines and suggest a stack trace). A key is checked against the
    config that the overrides' own group choices compose (`method=hiwi method.exchange=merged`
    is known; `method.exchange` alone is not), against each value of a swept group choice."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    parsed = [
        o
        for o in OverridesParser.create().parse_overrides(list(overrides))
        if not o.key_or_group.startswith("hydra") and not o.is_delete()
    ]
    choices = []  # per group override: the override strings of each value it chooses
    for override in parsed:
        key = override.key_or_group
        if key not in groups:
            continue
        if not override.is_sweep_override():
            values = [override.get_value_element_as_str()]
        elif override.is_choice_sweep():
            values = list(override.sweep_string_iterator())
        else:
            continue  # a range or other sweep: left to Hydra
        options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
        for value in values:
            if value not in options:
                raise ConfigError(f"{key}={value}: use one of {', '.join(options)}")
        prefix = "++" if override.is_force_add() else "+" if override.is_add() else ""
        choices.append([f"{prefix}{key}={value}" for value in values])
    first = [c[0] for c in choices]
    variants = [first] + [first[:i] + [v] + first[i + 1 :] for i, c in enumerate(choices) for v in c[1:]]
    configs = [OmegaConf.to_container(compose(tuple(v))) for v in variants]
    for override in parsed:
        key = override.key_or_group
        if key in groups or override.is_add() or override.is_force_add():
            continue
        missing = [_unknown(config, key) for config in configs]
        if all(missing):
            raise ConfigError(missing[0])


def _unknown(config: dict, key: str) -> str | None:
    """Why `key` is not in `config` (None when it is)."""
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            section = ".".join(parts[:depth]) or "the top level"
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "no keys"
            return f"unknown key {key}: {section} has {known} (add a new key with +{key}=...)"
        node = node[part]
    return None


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The validated, named config of a new run with these Hydra overrides."""
    return validate(compose(tuple(overrides)))


def from_run_config(run_config: dict) -> DictConfig:
    """Flower run config -> the validated config of a new run (the ServerApp uses `prepare`)."""
    return compose_config(overrides_from_run_config(run_config))


@dataclass
class Run:
    """One run, ready to start: its config, the checkpoint it resumes from, and its generators."""

    cfg: DictConfig
    resumed: checkpoint.Checkpoint | None = None
    generators: dict[str, np.random.Generator] = field(default_factory=dict)
    finished: bool = False  # already complete: nothing to run (a sweep skips it)

    @property
    def dir(self) -> Path:
        return run_dir(self.cfg)

    @property
    def done(self) -> int:
        """Rounds completed before this process started."""
        return self.resumed.round if self.resumed else 0

    @property
    def history(self) -> list[dict]:
        """The rounds.jsonl records of the rounds before a resume."""
        return list(self.resumed.history) if self.resumed else []

    def restore(self, strategy, runner) -> None:
        """Put a resumed run's state back into the strategy and what runs it: the round
        numbering (and with it the client sampling and the clients' seeds), the server
        optimiser's state, and the DP accountant (which replays the recorded releases)."""
        if self.resumed is None:
            return
        strategy.round_offset = self.resumed.round
        strategy.load_state_arrays(self.resumed.strategy_state)
        if hasattr(runner, "replay_releases"):
            runner.replay_releases(self.resumed.history)

    def generator_states(self) -> dict[str, dict]:
        """What the checkpoint keeps of the run's generators (a secret: see docs/privacy.md)."""
        return {name: gen.bit_generator.state for name, gen in self.generators.items()}


def new_run(cfg: DictConfig) -> Run:
    """A new run of this composed config (validated, named, fresh generators)."""
    return Run(validate(name_run(cfg)), generators=_generators(None))


def _generators(resumed: checkpoint.Checkpoint | None) -> dict[str, np.random.Generator]:
    """DP noise comes from OS entropy at the start of a run, never from the public `seed` (anyone
    could regenerate noise drawn from it and subtract it); a resumed run continues its state."""
    noise = np.random.Generator(np.random.PCG64())
    saved = resumed.generators.get(NOISE) if resumed else None
    if saved is not None:
        noise.bit_generator.state = saved
    return {NOISE: noise}


def _flat(node: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def saved_config(directory: str | Path) -> DictConfig:
    """The config saved in a run directory, merged over today's defaults for its method and task
    (so a config saved by an older version gains every setting added since, at its default),
    pointed back at that directory."""
    path = Path(directory)
    if not (path / "config.yaml").exists():
        raise ConfigError(f"resume={directory}: no config.yaml there; pass the directory of a fedsparse run")
    saved = OmegaConf.load(path / "config.yaml")
    if saved.get("mode", "federated") != "federated":
        raise ConfigError(
            f"resume={directory}: only federated runs checkpoint (this one is mode={saved.mode})"
        )
    if saved.get("schema_version", 1) > CONFIG_SCHEMA_VERSION:
        raise ConfigError(
            f"resume={directory}: saved with schema_version={saved.schema_version}, newer than this "
            f"fedsparse ({CONFIG_SCHEMA_VERSION}); upgrade fedsparse"
        )
    defaults = compose((f"method={saved.method.name}", f"task={saved.task.name}"))
    OmegaConf.set_struct(defaults, False)
    cfg = OmegaConf.merge(defaults, saved)
    cfg.schema_version = CONFIG_SCHEMA_VERSION
    cfg.output_dir, cfg.run_name, cfg.resume = str(path.parent), path.name, str(path)
    return cfg


def _apply_resume_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The keys these overrides change from today's defaults: `RESUMABLE` ones are applied, any
    other one must equal the run's own value (so the original overrides may be repeated)."""
    asked = _flat(OmegaConf.to_container(compose(tuple(o for o in overrides if not o.startswith("resume=")))))
    defaults = _flat(OmegaConf.to_container(compose()))
    have = _flat(OmegaConf.to_container(cfg))
    changed = [k for k, v in asked.items() if defaults.get(k, object()) != v and k not in NOT_COMPARED]
    refused = [k for k in changed if k not in RESUMABLE and have.get(k, object()) != asked[k]]
    if refused:
        shown = ", ".join(f"{k}={asked[k]} (the run has {have.get(k)})" for k in refused)
        raise ConfigError(
            f"resume={cfg.resume} keeps the run's settings, but {shown} was asked; a resumed run may "
            f"change only {', '.join(RESUMABLE)}"
        )
    for key in changed:
        if key in RESUMABLE:
            OmegaConf.update(cfg, key, asked[key])
    return cfg


def prepare(overrides: Sequence[str], cfg: DictConfig | None = None) -> Run:
    """The run these overrides ask for (`cfg`: the same, already composed by `@hydra.main`);
    `Run.finished` when there is nothing left to run. Raises ConfigError with a one-line reason."""
    cfg = name_run(cfg) if cfg is not None else compose(tuple(overrides))
    if not cfg.resume and cfg.mode == "federated":
        validate(cfg)  # a bad setting is named before any run directory is read
        if already_finished(cfg):  # an interrupted sweep continues where it stopped
            return Run(cfg, finished=True)
        if cfg.run_name == auto_run_name(cfg) and (run_dir(cfg) / checkpoint.FILE).exists():
            cfg.resume = str(run_dir(cfg))  # named by its configuration: the same run, interrupted
    if not cfg.resume:
        return new_run(cfg)
    resumed_cfg = validate(_apply_resume_overrides(saved_config(cfg.resume), overrides))
    try:
        resumed = checkpoint.load(resumed_cfg.resume)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if resumed.round > resumed_cfg.federation.rounds:
        raise ConfigError(
            f"federation.rounds={resumed_cfg.federation.rounds}: the run in {resumed_cfg.resume} already "
            f"completed {resumed.round} rounds"
        )
    done = is_finished(resumed_cfg.resume) and resumed.round >= resumed_cfg.federation.rounds
    return Run(resumed_cfg, resumed, _generators(resumed), finished=done)


def prepare_from_run_config(run_config: dict) -> Run:
    """The ServerApp's run in a deployment (`flwr run --run-config 'overrides="..."'`)."""
    return prepare(overrides_from_run_config(run_config))
