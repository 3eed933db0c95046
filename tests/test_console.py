"""What a simulation prints: Flower's warnings about fedsparse's own choices stay out of it."""

from __future__ import annotations

import logging
import os
from logging import WARNING

import pytest
from flwr.supercore.logger import log, warn_deprecated_feature

from fedsparse.apps.simulation import quiet_flower


@pytest.fixture
def flower_records():
    """The records Flower's logger passes on (its own filters applied)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    logging.getLogger("flwr").addHandler(handler)
    yield records
    logging.getLogger("flwr").removeHandler(handler)


def _flower_warnings() -> None:
    """The warnings `python -m fedsparse` met, logged the way Flower 1.41 logs them, and one other."""
    warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed ...")
    log(WARNING, "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
    log(WARNING, "Actor(%s) will be remove from pool.", "abc")


def test_flower_warnings_about_fedsparse_choices_are_left_out(flower_records, monkeypatch):
    monkeypatch.delenv("FLWR_LOG_LEVEL", raising=False)
    with quiet_flower(verbose=False):
        _flower_warnings()
        # the Ray actors (other processes, started in the block) log errors only: no "Manually
        # terminating ClientAppActor" at the end of every simulation
        assert os.environ["FLWR_LOG_LEVEL"] == "ERROR"
    assert [r.getMessage() for r in flower_records] == ["Actor(abc) will be remove from pool."]
    assert "FLWR_LOG_LEVEL" not in os.environ
    flower_records.clear()
    _flower_warnings()  # only inside the block
    assert len(flower_records) == 3


def test_verbose_shows_everything_and_a_users_log_level_wins(flower_records, monkeypatch):
    monkeypatch.delenv("FLWR_LOG_LEVEL", raising=False)
    with quiet_flower(verbose=True):
        _flower_warnings()
        assert "FLWR_LOG_LEVEL" not in os.environ
    assert len(flower_records) == 3
    monkeypatch.setenv("FLWR_LOG_LEVEL", "DEBUG")
    with quiet_flower(verbose=False):
        assert os.environ["FLWR_LOG_LEVEL"] == "DEBUG"
