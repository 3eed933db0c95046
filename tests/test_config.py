"""One configuration behind both front doors: Hydra CLI and Flower's run config."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedsparse.config import auto_run_name, to_run_config
from fedsparse.methods.pafi import BACKWARDS
from fedsparse.run import ConfigError, check_overrides, compose_config, from_run_config, prepare

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def _plain(cfg):
    data = OmegaConf.to_container(cfg)
    data.pop("run_name")
    return data


def test_defaults_are_the_demo():
    cfg = compose_config()
    assert (cfg.method.name, cfg.task.name, cfg.model.name) == ("pafi", "sst2", "minilm")
    assert cfg.federation.num_clients == 10 and cfg.federation.partitioner == "dirichlet"
    assert cfg.federation.alpha == 1.0 and cfg.train.lr == cfg.method.lr  # per-method default lr


def test_run_config_bridge_composes_the_same_config():
    overrides = ["method=hiwi", "method.exchange=merged", "federation.rounds=3", "run_name=x y"]
    run_config = to_run_config(overrides)
    assert list(run_config) == ["overrides"]
    assert _plain(from_run_config(run_config)) == _plain(compose_config(overrides))
    assert from_run_config(run_config).run_name == "x y"


def test_pyproject_declares_only_the_bridge_key():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr = pyproject["tool"]["flwr"]["app"]
    assert flwr["config"] == {"overrides": ""}  # everything else lives in fedsparse/conf
    assert flwr["components"] == {
        "serverapp": "fedsparse.apps.server_app:app",
        "clientapp": "fedsparse.apps.client_app:app",
    }
    # and each names the app Flower will load (`flwr run` resolves module:attribute the same way)
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    for key, kind in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, attribute = flwr["components"][key].split(":")
        assert isinstance(getattr(importlib.import_module(module), attribute), kind), key


@pytest.mark.parametrize(
    "override, message",
    [
        ("method=nope", "method"),
        ("federation.clients_per_round=11", "clients_per_round"),
        ("federation.strategy=scaffold", "strategy"),
        ("mode=serverless", "mode"),
        ("train.local_steps=-1", r"train.local_steps=-1: must be >= 1 \(or null"),  # ran 0 steps, loss -0.0
        ("train.local_steps=0", "train.local_steps=0: must be >= 1"),
        ("train.local_epochs=1", "set only one of train.local_steps and train.local_epochs"),
    ],
)
def test_bad_values_fail_with_the_fix(override, message):
    with pytest.raises(Exception, match=message):
        compose_config([override])


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=hiwi", "method.exchange=merged"],  # a key of the chosen method, not of the default
        ["method=pafi,hiwi", "method.exchange=merged"],  # a sweep: known for one of its choices
        ["+experiment=convergence", "method=topk", "method.index_encoding=auto", "seed=0,1,2"],
    ],
)
def test_keys_are_checked_against_the_groups_the_overrides_choose(overrides):
    check_overrides(overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.exchange=merged"], "unknown key method.exchange: method has density, "),
        (["method=pafi,lora", "method.exchange=merged"], "unknown key method.exchange"),
        (["+experiment=nope"], "experiment=nope: use one of compare_methods, "),
        (["method=pafi,nope"], "method=nope: use one of bitfit, "),
    ],
)
def test_unknown_keys_and_options_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_overrides(overrides)


def test_local_epochs_replace_the_steps_and_must_be_positive():
    assert compose_config(["train.local_steps=null", "train.local_epochs=0.5"]).train.local_epochs == 0.5
    with pytest.raises(ValueError, match="train.local_epochs=-1: must be > 0"):
        compose_config(["train.local_steps=null", "train.local_epochs=-1"])


def test_unknown_run_config_key_names_the_fix():
    with pytest.raises(ValueError, match="overrides"):
        from_run_config({"overrides": "", "num-rounds": 3})


def test_central_mode_from_the_command_line(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsparse",
            "+experiment=smoke",
            "mode=central",
            "method=hiwi",
            "train.central_steps=3",
            f"output_dir={tmp_path}",
            "run_name=c",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "dev: accuracy=" in run.stdout
    summary = (tmp_path / "c" / "summary.json").read_text()
    assert '"mode": "central"' in summary and '"method": "hiwi"' in summary


def test_auto_run_names_follow_the_configuration():
    name = compose_config(["run_name=auto", "method=hiwi", "method.exchange=merged", "seed=2"]).run_name
    assert name.startswith("hiwi-merged-sst2-a1-lr0.003-s2-")
    assert (
        name == compose_config(["run_name=auto", "method=hiwi", "method.exchange=merged", "seed=2"]).run_name
    )
    other = compose_config(
        ["run_name=auto", "method=hiwi", "method.exchange=merged", "seed=2", "train.batch_size=8"]
    )
    assert other.run_name != name  # a setting outside the readable part still changes the name
    kernels = {compose_config(["run_name=auto", f"method.masked_backward={k}"]).run_name for k in BACKWARDS}
    assert len(kernels) == 1  # PaFi's backward kernel computes the same gradients: the same run


def test_a_finished_run_is_skipped_and_another_config_refused(tmp_path):
    from fedsparse.report.results import RunWriter, already_finished

    cfg = compose_config(["run_name=auto", f"output_dir={tmp_path}"])
    assert not already_finished(cfg)
    writer = RunWriter(cfg)
    assert not already_finished(cfg)  # started but not finished: run it again
    writer.write_summary({"final": {}})
    assert already_finished(cfg)
    # a run saved before later settings existed (absent from its config.yaml) is the same run
    saved = OmegaConf.load(writer.dir / "config.yaml")
    for key in ("privacy", "save_model", "resume"):
        saved.pop(key)
    for key in ("fail_rate", "fail_mode", "max_examples", "min_replies", "round_timeout"):
        saved.federation.pop(key)
    OmegaConf.save(saved, writer.dir / "config.yaml")
    assert already_finished(cfg)
    clash = compose_config([f"run_name={cfg.run_name}", f"output_dir={tmp_path}", "seed=5"])
    with pytest.raises(FileExistsError, match="another configuration"):
        already_finished(clash)
    # a bad setting is named first, not the directory it would have clashed with
    with pytest.raises(ConfigError, match="compression.bits=3"):
        prepare(
            [f"run_name={cfg.run_name}", f"output_dir={tmp_path}", "compression=uplink", "compression.bits=3"]
        )


def test_committed_results_keep_their_auto_names():
    """Settings added later stay out of the name at their neutral value, so sweeps still find
    (and skip) the runs committed before those settings existed."""
    named = [
        c
        for c in sorted(RESULTS.glob("*/*/config.yaml"))
        if re.fullmatch(r".+-s\d+-[0-9a-f]{6}", c.parent.name) and OmegaConf.load(c).run_name == c.parent.name
    ]
    assert named, "no auto-named results committed"
    for path in named:
        saved = OmegaConf.load(path)
        defaults = compose_config([f"method={saved.method.name}"])
        current = OmegaConf.merge(defaults, saved)
        assert auto_run_name(current) == path.parent.name
        # rerunning its command today (a preset, method=, train.lr=, seed=) composes today's
        # method.lr default beside the same train.lr: still the same run
        current.method.lr = defaults.method.lr
        assert auto_run_name(current) == path.parent.name


def _chosen_rates() -> dict[str, float]:
    """The rate each method ran its seeds 1-2 at in the methods suite: the one its search chose."""
    chosen = {}
    for path in (RESULTS / "methods").glob("*/config.yaml"):
        saved = OmegaConf.load(path)
        if saved.seed == 1:
            assert chosen.setdefault(saved.method.name, saved.train.lr) == saved.train.lr
    return chosen


def test_each_methods_default_lr_is_the_rate_the_comparison_chose():
    chosen = _chosen_rates()
    assert chosen == {"pafi": 2e-2, "lora": 4e-3, "bitfit": 4e-3, "hiwi": 3e-3, "full": 2e-4, "topk": 2e-4}
    for method, lr in chosen.items():
        assert compose_config([f"method={method}"]).train.lr == lr
    convergence = [OmegaConf.load(p) for p in (RESULTS / "convergence").glob("*/config.yaml")]
    assert {c.method.name: c.train.lr for c in convergence} == chosen  # the 20-round runs: the same


def test_a_committed_run_is_found_with_or_without_its_lr_on_the_command_line():
    """The methods suite passed train.lr; a user who leaves it out now gets the chosen rate, and both
    commands name the committed run. Another train.lr is another run, the losing 1x rate included."""

    def name(*overrides: str) -> str:
        return compose_config(["+experiment=methods", "method=lora", "seed=0", *overrides]).run_name

    assert name() == name("train.lr=4e-3") == "lora-sst2-a1-lr0.004-s0-462784"
    assert (RESULTS / "methods" / name() / "summary.json").exists()
    assert name("train.lr=1e-3") == "lora-sst2-a1-lr0.001-s0-730c8c"
    assert name("train.lr=5e-3") != name() and name("method.lr=5e-3") == name("train.lr=5e-3")
