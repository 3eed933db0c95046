"""One configuration, two front doors: compose `conf/` from Hydra override strings, and name a run.

`python -m fedsparse key=value ...` composes `conf/` with Hydra; `flwr run .` hands the apps a
flat run config from `[tool.flwr.app.config]`. The bridge keeps a single source of truth: the
Flower run config holds only `overrides`, the same Hydra override strings, and both doors
compose the same `conf/` tree from them. Validation, resume and upgrades of saved configs are
the run lifecycle's (`fedsparse.run`); this module imports no other layer of fedsparse.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import shlex
import time
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"
# Settings added after results were committed, per config section, with the value that trains as
# before they existed: `training_settings` leaves them out at that value.
NEUTRAL_SETTINGS = {
    "federation": {"min_replies": 1, "max_examples": 10_000_000, "fail_rate": 0.0, "fail_mode": "error"},
    "train": {"head_lr_scale": 1.0, "precision": "fp32"},
    "method": {"train_down": True},  # HiWi: W_down trains, as before the setting existed
    "compression": {"downlink_bits": 0, "downlink_error_feedback": False, "rounding": "stochastic"},
}
# Where a run computes, not what: left out of its training settings (a run resumed or rerun on
# another device keeps its name; docs/configuration.md, Devices, says what stays bit-identical).
DEVICE_KEYS = {"train": ("device",), "federation": ("client_gpus",)}
# Each method's `lr` default when the first results were saved (see `training_settings`).
SAVED_METHOD_LR = {"pafi": 2e-2, "hiwi": 3e-3, "lora": 1e-3, "bitfit": 1e-3, "full": 5e-5, "topk": 5e-5}
RUN_CONFIG_KEY = "overrides"
# Where a run lives and how it is stored, not what it computes: left out of its training settings.
PLACEMENT_KEYS = ("run_name", "output_dir", "resume", "save_model", "schema_version")


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved, named config for these Hydra overrides, not validated (`fedsparse.run`
    validates); works inside and outside `@hydra.main`."""
    return name_run(_compose(tuple(overrides)))


@functools.lru_cache(maxsize=8)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    if GlobalHydra.instance().is_initialized():
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return cfg


def to_run_config(overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Hydra overrides -> Flower run config (`flwr run --run-config`, `[tool.flwr.app.config]`)."""
    return {RUN_CONFIG_KEY: " ".join(shlex.quote(o) for o in overrides)}


def overrides_from_run_config(run_config: dict) -> list[str]:
    """Flower run config -> the Hydra override strings it carries."""
    extra = sorted(set(run_config) - {RUN_CONFIG_KEY})
    if extra:
        raise ValueError(
            f"Unknown run-config keys {extra}: pass settings as Hydra overrides, e.g. "
            "--run-config 'overrides=\"method=hiwi federation.rounds=3\"'."
        )
    return shlex.split(str(run_config.get(RUN_CONFIG_KEY, "")))


def client_config(run_config: dict) -> DictConfig:
    """The config a deployed ClientApp computes with: the run's overrides composed as the server
    composes them. A node cannot read the server's run directory, so `resume=` is dropped: a
    deployed run is resumed with its original overrides again (the server refuses any that differ
    from the saved run, and a client with another method config fails the fingerprint check)."""
    overrides = overrides_from_run_config(run_config)
    return compose(tuple(o for o in overrides if not o.startswith("resume=")))


def name_run(cfg: DictConfig) -> DictConfig:
    """A resolved copy of `cfg` with its run named: `run_name=null` gets a timestamped name,
    `run_name=auto` the name that follows from its settings (`auto_run_name`)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    OmegaConf.resolve(cfg)
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
    for key in PLACEMENT_KEYS:
        settings.pop(key, None)
    federation = settings["federation"]
    for key in ("round_timeout", "grace_min", "grace_factor"):
        federation.pop(key, None)  # how long a round waits: they only drop late replies
    if federation["strategy"] != "fedprox":
        federation.pop("proximal_mu", None)  # read by fedprox only
    for section, keys in DEVICE_KEYS.items():
        for key in keys:
            settings[section].pop(key, None)
    for section, neutrals in NEUTRAL_SETTINGS.items():
        for key, neutral in neutrals.items():
            if section in settings and settings[section].get(key, neutral) == neutral:
                settings[section].pop(key, None)
    if "masked_backward" in settings["method"]:
        # PaFi's backward kernel computes the same gradients whichever it is (up to summation order),
        # so it does not tell runs apart; the digest keeps the value the first results were saved with
        settings["method"]["masked_backward"] = True
    if settings["method"].get("name") in SAVED_METHOD_LR:
        # `method.lr` is only the default that `train.lr` interpolates, and train.lr (in the settings
        # and the name) is the rate that trains; the defaults were raised to the rates the methods
        # suite chose, so the digest keeps the default the first results were saved with
        settings["method"]["lr"] = SAVED_METHOD_LR[settings["method"]["name"]]
    c = settings.get("compression", {})
    if not c.get("enabled", False) and not c.get("downlink_bits", 0):
        settings.pop("compression", None)  # off: trains exactly as before the group existed
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
        *compression_tags(cfg.get("compression") or {}),
        cfg.task.name,
        f"a{fed.alpha:g}",
        f"lr{cfg.train.lr:g}",
        f"s{cfg.seed}",
        digest,
    ]
    return "-".join(str(p) for p in parts if p)


def compression_tags(compression) -> list[str]:
    """How run names and report labels show a compression group: `q<bits>[ef]` for a compressed
    uplink, `d<bits>[ef]` for a compressed downlink (`ef`: with error feedback; `q1s`, `d1s`: a
    1-bit direction sent as the scaled sign); [] when off."""
    tags = []

    def tag(prefix: str, bits: int, feedback: bool) -> str:
        sign = "s" if bits == 1 and compression.get("rounding") == "sign" else ""
        return f"{prefix}{bits}{sign}{'ef' if feedback else ''}"

    if compression.get("enabled", False):
        tags.append(tag("q", compression["bits"], compression.get("error_feedback", False)))
    if compression.get("downlink_bits", 0):
        tags.append(tag("d", compression["downlink_bits"], compression.get("downlink_error_feedback", False)))
    return tags


def run_key(cfg: DictConfig) -> str:
    """A digest of the run's training settings and name: what keys a client's state between rounds
    (the error-feedback residual, the globals of a compressed downlink), so two runs never share
    it and a resumed run finds its own, also one resumed with more rounds."""
    settings = training_settings(cfg)
    for key in ("rounds", "wait_timeout"):  # a resumed run may change them (run.RESUMABLE)
        settings["federation"].pop(key, None)
    blob = json.dumps({"settings": settings, "run_name": cfg.run_name}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def run_dir(cfg: DictConfig) -> Path:
    """`<output_dir>/<run_name>`: where a run writes everything."""
    return Path(cfg.output_dir) / cfg.run_name
