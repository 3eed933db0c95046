"""One configuration, two front doors.

`python -m fedsparse key=value ...` composes `conf/` with Hydra; `flwr run .` hands the apps a
flat run config from `[tool.flwr.app.config]`. The bridge keeps a single source of truth: the
Flower run config holds only `overrides`, the same Hydra override strings, and both doors
compose the same `conf/` tree from them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import shlex
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from fedsparse.data import TASKS
from fedsparse.faults import FAIL_MODES
from fedsparse.methods import METHODS
from fedsparse.privacy import config_problems
from fedsparse.strategy import STRATEGIES

CONF_DIR = Path(__file__).resolve().parent / "conf"
# Settings added after results were committed, per config section, with the value that trains as
# before they existed: `training_settings` leaves them out at that value.
NEUTRAL_SETTINGS = {
    "federation": {"min_replies": 1, "max_examples": 10_000_000, "fail_rate": 0.0, "fail_mode": "error"},
    "train": {"head_lr_scale": 1.0},
}
RUN_CONFIG_KEY = "overrides"
MODES = ("federated", "central")


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved config for these Hydra overrides (works inside and outside `@hydra.main`)."""
    return finalize(_compose(tuple(overrides)))


@functools.lru_cache(maxsize=8)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name="config", overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    return cfg


def to_run_config(overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Hydra overrides -> Flower run config (`flwr run --run-config`, `[tool.flwr.app.config]`)."""
    return {RUN_CONFIG_KEY: " ".join(shlex.quote(o) for o in overrides)}


def from_run_config(run_config: dict) -> DictConfig:
    """Flower run config -> the resolved config."""
    extra = sorted(set(run_config) - {RUN_CONFIG_KEY})
    if extra:
        raise ValueError(
            f"Unknown run-config keys {extra}: pass settings as Hydra overrides, e.g. "
            "--run-config 'overrides=\"method=hiwi federation.rounds=3\"'."
        )
    return compose_config(shlex.split(str(run_config.get(RUN_CONFIG_KEY, ""))))


def finalize(cfg: DictConfig) -> DictConfig:
    """Validate, resolve interpolations and name the run; raises with the fix on bad values."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    OmegaConf.resolve(cfg)
    checks = [
        (cfg.mode in MODES, f"mode={cfg.mode}: use one of {MODES}"),
        (cfg.method.name in METHODS, f"method={cfg.method.name}: use one of {tuple(METHODS)}"),
        (cfg.task.name in TASKS, f"task={cfg.task.name}: use one of {tuple(TASKS)}"),
        (
            cfg.federation.strategy in STRATEGIES,
            f"federation.strategy={cfg.federation.strategy}: use one of {tuple(STRATEGIES)}",
        ),
        (
            cfg.federation.partitioner in ("dirichlet", "iid"),
            f"federation.partitioner={cfg.federation.partitioner}: use dirichlet or iid",
        ),
        (
            0 < cfg.federation.clients_per_round <= cfg.federation.num_clients,
            "federation.clients_per_round must be between 1 and federation.num_clients",
        ),
        (cfg.federation.rounds >= 1, "federation.rounds must be >= 1"),
        (cfg.federation.alpha > 0, "federation.alpha must be > 0"),
        (cfg.federation.get("proximal_mu", 0.0) >= 0, "federation.proximal_mu must be >= 0"),
        (cfg.train.lr > 0 and cfg.train.batch_size >= 1, "train.lr must be > 0, train.batch_size >= 1"),
        (0 < cfg.train.lr_decay <= 1, "train.lr_decay must be in (0, 1]"),
        (cfg.train.head_lr_scale > 0, "train.head_lr_scale must be > 0"),
        (cfg.federation.min_replies >= 1, "federation.min_replies must be >= 1"),
        (cfg.federation.max_examples >= 1, "federation.max_examples must be >= 1"),
        (cfg.federation.round_timeout > 0, "federation.round_timeout must be > 0 (seconds)"),
        (0 <= cfg.federation.fail_rate <= 1, "federation.fail_rate must be in [0, 1]"),
        (cfg.federation.fail_mode in FAIL_MODES, f"federation.fail_mode must be one of {FAIL_MODES}"),
        (
            cfg.train.local_steps is None or cfg.train.local_steps >= 1,
            "train.local_steps must be >= 1 (or null, with train.local_epochs set)",
        ),
        (cfg.train.local_epochs is None or cfg.train.local_epochs > 0, "train.local_epochs must be > 0"),
        (  # clients take the steps when both are set: the epochs would be silently ignored
            cfg.train.local_steps is None or cfg.train.local_epochs is None,
            "set only one of train.local_steps and train.local_epochs "
            "(e.g. train.local_steps=null train.local_epochs=1)",
        ),
    ]
    errors = [message for ok, message in checks if not ok] + config_problems(cfg)
    if errors:
        raise ValueError("Invalid configuration: " + "; ".join(errors) + ".")
    if cfg.run_name is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.run_name = f"{cfg.method.name}-{cfg.task.name}-{stamp}-{secrets.token_hex(2)}"
    elif cfg.run_name == "auto":
        cfg.run_name = auto_run_name(cfg)
    return cfg


def training_settings(cfg: DictConfig) -> dict:
    """The settings that decide what a run computes: not where it writes or whether it saves, and
    not the settings added after the first results were committed while they keep their neutral
    value (the one that trains exactly as before they existed). Runs with equal training settings
    are the same run: they share an auto name, and a sweep skips one that is finished."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    for key in ("run_name", "output_dir", "resume", "save_model"):
        settings.pop(key, None)
    federation = settings["federation"]
    federation.pop("round_timeout", None)  # only drops late replies
    if federation["strategy"] != "fedprox":
        federation.pop("proximal_mu", None)  # read by fedprox only
    for section, neutrals in NEUTRAL_SETTINGS.items():
        for key, neutral in neutrals.items():
            if settings[section].get(key, neutral) == neutral:
                settings[section].pop(key, None)
    if "masked_backward" in settings["method"]:
        # PaFi's backward kernel computes the same gradients whichever it is (up to summation order),
        # so it does not tell runs apart; the digest keeps the value the first results were saved with
        settings["method"]["masked_backward"] = True
    privacy = settings.get("privacy", {})
    if privacy.get("dp", "none") == "none" and not privacy.get("secagg", False):
        settings.pop("privacy", None)
    return settings


def auto_run_name(cfg: DictConfig) -> str:
    """A name that is a function of the configuration (`run_name=auto`, used by the experiment
    presets): rerunning a sweep finds its finished runs and skips them. Readable parts first,
    then a digest of everything else, so two different configurations never share a directory."""
    method, fed = cfg.method, cfg.federation
    variant = {"hiwi": method.get("exchange"), "topk": method.get("index_encoding")}.get(method.name)
    if method.name == "pafi":
        variant = f"{method.select}-d{method.density:g}"
    digest = hashlib.sha1(json.dumps(training_settings(cfg), sort_keys=True).encode()).hexdigest()[:6]
    parts = [
        method.name,
        variant,
        cfg.task.name,
        f"a{fed.alpha:g}",
        f"lr{cfg.train.lr:g}",
        f"s{cfg.seed}",
        digest,
    ]
    return "-".join(str(p) for p in parts if p)


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / cfg.run_name
