"""Differential privacy on the packed vector: clipping, noise, accounting, refusals (no simulation)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from harness.models import method_cfg, packed_strategy, tiny_model
from harness.replies import train_reply

from fedsparse.methods import build_method
from fedsparse.privacy.dp import ClientSideDp, ServerSideDp, client_mod, local_noise_std, round_record, wrap
from fedsparse.run import NOISE, compose_config, prepare

N, C = 4, 0.5  # sampled clients, clipping norm


@pytest.fixture
def strategy(app_identity):
    return packed_strategy(build_method(tiny_model(), method_cfg("pafi", density=0.5)))


def _reply(strategy, values: np.ndarray, weight: int) -> Message:
    return train_reply(values.astype(np.float32), weight, strategy.fingerprint)


def _updates(size: int, seed: int = 0) -> list[np.ndarray]:
    """N updates with norms 0.5C, 2C, 5C, 10C: one below the bound, three clipped."""
    rng = np.random.default_rng(seed)
    out = []
    for scale in (0.5, 2, 5, 10):
        u = rng.normal(size=size)
        out.append(u / np.linalg.norm(u) * scale * C)
    return out


def _dp(cls, strategy, noise_multiplier: float):
    dp = cls(strategy, noise_multiplier, C, N)
    dp._setup(population=10, delta=1e-5, noise=np.random.default_rng(0))
    return dp


def _clipped_mean(updates: list[np.ndarray]) -> np.ndarray:
    return np.mean([u * min(1.0, C / np.linalg.norm(u)) for u in updates], axis=0)


def test_server_side_dp_clips_every_update_and_averages_unweighted(strategy):
    g = strategy.global_values
    updates = _updates(g.size)
    dp = _dp(ServerSideDp, strategy, noise_multiplier=0.0)
    replies = [_reply(strategy, g + u, w) for u, w in zip(updates, (10, 200, 30, 4000))]
    arrays, _ = dp.aggregate_train(1, replies)
    for reply in replies:  # what reached the mean: each contribution within the norm
        contribution = reply.content["arrays"]["values"].numpy().astype(np.float64) - g
        assert np.linalg.norm(contribution) <= C * (1 + 1e-5)
    np.testing.assert_allclose(arrays["values"].numpy() - g, _clipped_mean(updates), atol=1e-6)
    record = dp.rounds[1]
    assert record["released"] and record["over_norm"] == 3
    np.testing.assert_allclose(record["update_norms"], [0.5 * C, 2 * C, 5 * C, 10 * C], rtol=1e-5)


def test_central_noise_has_the_configured_std_and_epsilon_grows_as_the_accountant_says(strategy):
    g = strategy.global_values
    dp = _dp(ServerSideDp, strategy, noise_multiplier=1.2)
    reference = RdpAccountant(
        PrivacyConfig(1e-5, 10, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    )
    epsilons = []
    for rnd in (1, 2, 3):
        updates = _updates(g.size, seed=rnd)
        arrays, _ = dp.aggregate_train(rnd, [_reply(strategy, g + u, 7) for u in updates])
        noise = arrays["values"].numpy().astype(np.float64) - g - _clipped_mean(updates)
        expected = 1.2 * C / N
        assert dp.rounds[rnd]["noise_std"] == pytest.approx(expected)
        # sample std of g.size Gaussian draws: relative standard error 1/sqrt(2 size)
        assert abs(noise.std() / expected - 1) < 5 / np.sqrt(2 * g.size)
        assert abs(noise.mean()) < 5 * expected / np.sqrt(g.size)
        reference.compose(GaussianPrivacyEvent(noise_multiplier=1.2, sample_size=N, population_size=10))
        assert dp.rounds[rnd]["epsilon"] == pytest.approx(reference.get_privacy_spent().epsilon)
        epsilons.append(dp.rounds[rnd]["epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert g.size > 2000  # enough draws for the bounds above to be tight


def test_a_round_with_a_rejected_reply_is_not_released(strategy):
    g = strategy.global_values
    dp = _dp(ServerSideDp, strategy, noise_multiplier=1.0)
    bad = g.copy()
    bad[0] = np.nan
    replies = [_reply(strategy, g + u, 5) for u in _updates(g.size)[:3]] + [_reply(strategy, bad, 5)]
    assert dp.aggregate_train(1, replies) == (None, None)
    assert not dp.rounds[1]["released"] and "3 valid replies of 4" in dp.rounds[1]["reason"]
    assert "epsilon" not in dp.rounds[1] and dp.rdp.num_releases == 0  # nothing spent


def test_client_side_dp_refuses_a_round_with_an_unclipped_update(strategy):
    g = strategy.global_values
    dp = _dp(ClientSideDp, strategy, noise_multiplier=0.0)
    updates = [u * min(1.0, C / np.linalg.norm(u)) for u in _updates(g.size)]
    arrays, _ = dp.aggregate_train(1, [_reply(strategy, g + u, 3) for u in updates])
    np.testing.assert_allclose(arrays["values"].numpy() - g, np.mean(updates, axis=0), atol=1e-6)
    arrays, _ = dp.aggregate_train(2, [_reply(strategy, g + u, 3) for u in _updates(g.size)])
    assert arrays is None and "not clipped" in dp.rounds[2]["reason"]


def _client_round(cfg, received: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """One train message through the client's privacy mod, with a handler that returns `trained`."""
    config = ConfigRecord({"clipping_norm": C, "fingerprint": "f"})
    msg = Message(
        content=RecordDict({"arrays": ArrayRecord({"values": Array(received)}), "config": config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )

    def handler(m: Message, _ctxt: Context) -> Message:
        arrays = ArrayRecord({"values": Array(trained)})
        return Message(
            content=RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 3})}), reply_to=m
        )

    ctxt = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = client_mod(lambda _: cfg)(msg, ctxt, handler)
    assert not reply.has_error(), reply.error
    return reply.content["arrays"]["values"].numpy().astype(np.float64) - received


def test_client_mods_clip_and_local_dp_noises_with_the_configured_std(app_identity):
    received = np.zeros(20_000, np.float32)
    trained = np.full(20_000, 0.01, np.float32)  # norm 1.41 > C
    central = compose_config(["model=tiny", "privacy.dp=client", f"privacy.clipping_norm={C}"])
    update = _client_round(central, received, trained)
    assert np.linalg.norm(update) == pytest.approx(C, rel=1e-5)
    local = compose_config(
        ["model=tiny", "privacy.dp=local", f"privacy.clipping_norm={C}", "privacy.local_epsilon=5"]
    )
    np.random.seed(1)
    small = received + np.float32(1e-3)  # inside the norm (a zero update would divide by zero in Flower)
    noise = _client_round(local, received, small) - 1e-3
    assert abs(noise.std() / local_noise_std(local) - 1) < 0.03
    record = round_record(local, None, 3)["privacy"]
    assert record["local_epsilon"] == 5 and record["epsilon_composed"] == 15


@pytest.mark.parametrize(
    "overrides, why",
    [
        (["method=topk", "privacy.secagg=true"], "same entries"),
        (["method=topk", "privacy.dp=server"], "indices"),
        (["privacy.dp=client", "federation.strategy=fedadam"], "un-noised"),
        (["privacy.dp=server", "privacy.secagg=true"], "not implemented"),
        (["privacy.dp=adaptive"], "use one of"),
    ],
)
def test_unsupported_combinations_are_refused_with_the_reason(overrides, why):
    with pytest.raises(ValueError, match=why):
        compose_config(["model=tiny"] + overrides)


def test_a_resumed_central_dp_run_continues_the_privacy_spent(strategy):
    """The accountant replays the releases in the resumed history: epsilon does not restart."""
    g = strategy.global_values
    cfg = compose_config(["model=tiny", "privacy.dp=server", "privacy.noise_multiplier=1.2"])
    cfg.federation.clients_per_round, cfg.privacy.clipping_norm = N, C
    whole = wrap(strategy, cfg, np.random.default_rng(0))
    history = [{"round": 0}]
    for rnd in (1, 2, 3):
        replies = [_reply(strategy, g + u, 7) for u in _updates(g.size, seed=rnd)]
        if rnd == 2:  # a skipped round spends nothing, before or after the resume
            replies = replies[:-1]
        whole.aggregate_train(rnd, replies)
        history.append({"round": rnd, **round_record(cfg, whole, rnd)})
    assert [r["privacy"]["released"] for r in history[1:]] == [True, False, True]

    resumed = wrap(strategy, cfg, np.random.default_rng(0))
    resumed.replay_releases(history[:3])  # interrupted after round 2
    strategy.round_offset = 2
    resumed.aggregate_train(1, [_reply(strategy, g + u, 7) for u in _updates(g.size, seed=3)])
    assert resumed.rdp.num_releases == whole.rdp.num_releases == 2
    assert resumed.rounds[3]["epsilon"] == pytest.approx(whole.rounds[3]["epsilon"])
    assert resumed.rounds[3]["epsilon"] > whole.rounds[1]["epsilon"]


def test_two_runs_with_the_same_public_seed_draw_different_noise(strategy):
    """The noise comes from a secret drawn at run start, not from `seed` (which config.yaml
    publishes) nor from numpy's global generator: knowing both does not give the noise."""
    g = strategy.global_values
    overrides = ["model=tiny", "seed=3", "privacy.dp=server", "privacy.noise_multiplier=1.2"]
    released = []
    for _ in range(2):
        run = prepare(overrides)
        run.cfg.federation.clients_per_round, run.cfg.privacy.clipping_norm = N, C
        np.random.seed(0)  # the global generator in the same state for both runs
        dp = wrap(strategy, run.cfg, run.generators[NOISE])
        arrays, _ = dp.aggregate_train(1, [_reply(strategy, g + u, 7) for u in _updates(g.size)])
        released.append(arrays["values"].numpy())
    assert not np.allclose(released[0], released[1])
