"""Reports over seeds and the generated README blocks, on small hand-written run directories."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedsparse.report.cli import main
from fedsparse.report.readme_blocks import (
    group_table,
    pareto_front,
    plot_groups,
    target_table,
    trend,
    update_readme,
)
from fedsparse.report.tables import bytes_to_target, group_runs, load_runs, mean_std

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"

# Dev accuracy per round (round 0 = initial state) for each seed of each method.
CURVES = {
    "pafi": [[0.50, 0.81, 0.79, 0.80], [0.50, 0.70, 0.82, 0.82], [0.50, 0.60, 0.70, 0.84]],
    "hiwi": [[0.50, 0.55, 0.60, 0.61], [0.50, 0.52, 0.58, 0.65], [0.50, 0.60, 0.86, 0.63]],
}
UP, DOWN = 100, 200  # training bytes per client per round; client-side evaluation adds a tenth
CLIENTS = 2


def direction(per_client: float, messages: int) -> dict:
    total = int(per_client * messages)
    return {"messages": messages, "bytes": total, "per_client": float(per_client if messages else 0)}


def write_run(root: Path, method: str, seed: int, curve: list[float], finished: bool = True, **method_cfg):
    """One run directory like the server writes it, with known numbers: seed s sends (s + 1) x the bytes."""
    name = f"{method}-s{seed}"
    path = root / name
    path.mkdir(parents=True)
    extra = {"exchange": "merged"} if method == "hiwi" else {"select": "smallest", "density": 0.005}
    config = {
        "seed": seed,
        "run_name": name,
        "output_dir": str(root),
        "method": {"name": method, "lr": 0.01, "seed": 0, **extra, **method_cfg},
        "task": {"name": "sst2"},
        "federation": {"alpha": 1.0, "strategy": "fedavg", "rounds": len(curve) - 1, "clients_per_round": 2},
        "train": {"lr": 0.01, "local_steps": 5},
    }
    OmegaConf.save(OmegaConf.create(config), path / "config.yaml")
    scale = seed + 1
    rounds, cumulative = [], 0
    for r, acc in enumerate(curve):
        n = CLIENTS if r else 0
        comm = {
            "down": direction(DOWN * scale, n),
            "up": direction(UP * scale, n),
            "eval_down": direction(DOWN * scale / 10, n),
            "eval_up": direction(UP * scale / 10, n),
            "clients": list(range(n)),
        }
        comm["total_bytes"] = sum(comm[d]["bytes"] for d in ("down", "up", "eval_down", "eval_up"))
        cumulative += comm["total_bytes"]
        record = {"round": r, "dev": {"accuracy": acc, "loss": 1 - acc}, "comm": comm}
        rounds.append(record | {"cumulative_bytes": cumulative, "ratio_to_full": 0.01, "wall_seconds": r})
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    if finished:
        summary = {
            "method": method,
            "task": "sst2",
            "metric": "accuracy",
            "rounds": len(curve) - 1,
            "final": {"accuracy": curve[-1], "loss": 1 - curve[-1]},
            "best": max(curve[1:]),
            "values_per_message": 1000,
            "mean_up_per_client": float(UP * scale),
            "mean_down_per_client": float(DOWN * scale),
            "bytes_up": int(1.1 * UP * scale * CLIENTS * (len(curve) - 1)),
            "bytes_down": int(1.1 * DOWN * scale * CLIENTS * (len(curve) - 1)),
            "full_model_message_bytes": 100_000,
            "wall_seconds": 10.0,
        }
        (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def experiment(tmp_path) -> Path:
    """tmp/experiments/results/exp: 2 methods x 3 seeds."""
    root = tmp_path / "experiments" / "results" / "exp"
    for method, curves in CURVES.items():
        for seed, curve in enumerate(curves):
            write_run(root, method, seed, curve)
    return root


def groups_of(experiment: Path):
    runs, unfinished = load_runs(sorted(experiment.iterdir()))
    assert unfinished == []
    return group_runs(runs)


def _add_settings(run: Path, **federation) -> None:
    """Give a run's config the settings added after the others were saved (privacy off)."""
    config = OmegaConf.load(run / "config.yaml")
    config.federation.update(federation)
    config.privacy = {"dp": "none", "secagg": False, "clipping_norm": 1.0}
    OmegaConf.save(config, run / "config.yaml")


def test_a_setting_added_later_splits_a_group_only_when_it_changes_training(experiment):
    _add_settings(experiment / "pafi-s2", fail_rate=0.0, min_replies=1, round_timeout=60)
    assert [(g.method, len(g.runs)) for g in groups_of(experiment)] == [("hiwi[merged]", 3), ("pafi", 3)]
    _add_settings(experiment / "pafi-s2", fail_rate=0.3)
    assert [(g.method, len(g.runs)) for g in groups_of(experiment)] == [
        ("hiwi[merged]", 3),
        ("pafi federation.fail_rate=0.0", 2),  # the neutral value, which its runs leave out
        ("pafi federation.fail_rate=0.3", 1),
    ]


def test_runs_differing_only_in_seed_form_one_group_with_mean_and_std(experiment):
    groups = groups_of(experiment)
    assert [(g.method, g.lr, len(g.runs)) for g in groups] == [("hiwi[merged]", 0.01, 3), ("pafi", 0.01, 3)]
    mean, std, n = mean_std([0.80, 0.82, 0.84])
    assert (mean, std, n) == (pytest.approx(0.82), pytest.approx(0.02), 3)
    table = group_table(groups)
    # pafi: final 0.80/0.82/0.84, best 0.81/0.82/0.84; 3 rounds of 2 clients at (s+1) x (100+200+10+20) B
    # trend: slopes over rounds 1-3 of -0.005, 0.06 and 0.12 per round
    row = "| pafi | 0.01 | 3 | 0.8200 ± 0.0200 | 0.8233 ± 0.0153 | +0.0583 ± 0.0625 | 200 B | 400 B | 4.0 KB | 3 |"
    assert row in table
    assert "| hiwi[merged] | 0.01 | 3 | 0.6300 ± 0.0200 | 0.7067 ± 0.1343 |" in table


def test_trend_is_the_slope_of_the_last_rounds_and_needs_enough_of_them():
    rounds = np.arange(6)
    flat = {"round": rounds, "metric": np.array([0.5, 0.6, 0.7, 0.8, 0.8, 0.8])}
    rising = {"round": rounds, "metric": np.array([0.5, 0.5, 0.5, 0.6, 0.7, 0.8])}
    assert trend(flat) == pytest.approx(0.0, abs=1e-12) and trend(rising) == pytest.approx(0.1)
    short = {"round": rounds[:3], "metric": np.array([0.5, 0.6, 0.7])}  # two trained rounds
    assert trend(short) is None


def test_a_group_label_shows_what_else_differs(tmp_path):
    write_run(tmp_path, "pafi", 0, [0.5, 0.6], select="random")
    write_run(tmp_path, "pafi", 1, [0.5, 0.6], density=0.01, scope="global")
    write_run(tmp_path, "pafi", 2, [0.5, 0.6], density=0.01, scope="per_tensor")
    write_run(tmp_path, "topk", 0, [0.5, 0.6], index_encoding="varint")
    write_run(tmp_path, "topk", 1, [0.5, 0.6], index_encoding="int32")
    write_run(tmp_path, "hiwi", 0, [0.5, 0.6], train_down=False)
    labels = [g.method for g in group_runs(load_runs(sorted(tmp_path.iterdir()))[0])]
    assert labels == [
        "hiwi[merged,fixed-down]",
        "pafi[d=0.01] method.scope=global",
        "pafi[d=0.01] method.scope=per_tensor",
        "pafi[random]",
        "topk",
        "topk[varint]",
    ]


def test_bytes_to_target_takes_the_first_round_reaching_it(experiment):
    pafi = groups_of(experiment)[1]
    # 0.80 is first reached in round 1, 2, 3 by seeds 0, 1, 2 (seed 0 drops below it later);
    # cumulative uplink after round r of seed s: r x 2 clients x 110 B x (s + 1)
    up = [1 * 220 * 1, 2 * 220 * 2, 3 * 220 * 3]
    t = bytes_to_target(pafi, 0.80)
    assert (t["reached"], t["seeds"], t["round"]) == (3, 3, 2.0)
    assert t["up"] == pytest.approx(sum(up) / 3) and t["down"] == pytest.approx(2 * sum(up) / 3)
    assert t["total"] == pytest.approx(sum(up))
    t = bytes_to_target(pafi, 0.83)  # only seed 2, in round 3
    assert (t["reached"], t["round"], t["up"], t["down"]) == (1, 3.0, 1980, 3960)
    assert bytes_to_target(pafi, 0.9) == {"reached": 0, "seeds": 3}


def test_best_and_targets_follow_one_rule_for_round_0(tmp_path):
    """A run starting from a fine-tuned model (round 0 at 0.85) that training moves to 0.7695 at
    best: round 0 is the initial state, in neither its best accuracy nor the target table."""
    run = write_run(tmp_path, "pafi", 0, [0.85, 0.76, 0.7695, 0.75])
    groups = group_runs(load_runs([run])[0])
    assert "| pafi | 0.01 | 1 | 0.7500 | 0.7695 |" in group_table(groups)
    assert "| pafi | 0.01 | 0.8 | not reached (0/1 seeds) |" in target_table(groups, [0.80])
    assert bytes_to_target(groups[0], 0.80) == {"reached": 0, "seeds": 1}
    assert bytes_to_target(groups[0], 0.76)["round"] == 1.0
    # the rounds decide, whatever a summary says (one written by another rule)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(summary | {"best": 0.85}))
    assert "| pafi | 0.01 | 1 | 0.7500 | 0.7695 |" in group_table(group_runs(load_runs([run])[0]))


def test_target_table_reports_partial_and_not_reached(experiment):
    table = target_table(groups_of(experiment), [0.80, 0.85])
    assert "| pafi | 0.01 | 0.8 | 3/3 seeds | 2.0 | 1.0 KB | 2.1 KB | 3.1 KB |" in table
    assert "| pafi | 0.01 | 0.85 | not reached (0/3 seeds) | - | - | - | - |" in table
    assert "| hiwi[merged] | 0.01 | 0.8 | 1/3 seeds | 2.0 | 1.3 KB | 2.6 KB | 4.0 KB |" in table


def test_plots_are_written(experiment, tmp_path):
    paths = plot_groups(groups_of(experiment), tmp_path / "plots", prefix="x_")
    assert [p.name for p in paths] == [
        "x_metric_vs_bytes.png",
        "x_bytes_per_round.png",
        "x_metric_vs_round.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5_000


def test_cli_on_run_directories_lists_unfinished_runs(experiment, tmp_path, capsys):
    unfinished = write_run(experiment, "pafi", 7, [0.5, 0.6], finished=False)
    assert main([*map(str, sorted(experiment.iterdir())), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "hiwi[merged]" in out and "0.8200 ± 0.0200" in out
    assert f"Unfinished, not in the tables: `{unfinished.name}` (no round finished)" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "bytes_per_round.png",
        "metric_vs_bytes.png",
        "metric_vs_round.png",
    ]


def test_cli_skips_what_is_not_a_run_with_one_line(experiment, tmp_path, capsys):
    """`python -m fedsparse.report outputs/* --out outputs/plots`, run twice: the glob also matches a
    run stopped before its recorder started (only shards.json), a file beside the runs and, the
    second time, the plots folder itself."""
    stopped = experiment / "pafi-stopped"
    stopped.mkdir()
    (stopped / "shards.json").write_text("{}")
    (experiment / "multirun.yaml").write_text("hydra: {}\n")
    plots = experiment / "plots"
    for use in (1, 2):
        assert main([*map(str, sorted(experiment.iterdir())), "--out", str(plots)]) == 0
        out = capsys.readouterr().out
        skipped = [line for line in out.splitlines() if line.startswith("skipped")]
        expected = [experiment / "multirun.yaml", stopped] + ([plots] if use == 2 else [])
        assert skipped == [
            "skipped, no config.yaml (not a run, or one stopped before it began): "
            + ", ".join(map(str, sorted(expected)))
        ]
        assert "| pafi | 0.01 | 3 | 0.8200 ± 0.0200 |" in out
        assert sorted(p.name for p in plots.iterdir()) == [
            "bytes_per_round.png",
            "metric_vs_bytes.png",
            "metric_vs_round.png",
        ]
    assert main([str(plots), str(stopped)]) == 1
    assert "no fedsparse run among the given paths" in capsys.readouterr().out


def test_plots_default_to_the_first_finished_run_not_the_first_path(experiment, capsys):
    plots = experiment / "a-plots"  # sorts before the runs
    plots.mkdir()
    assert main(list(map(str, sorted(experiment.iterdir())))) == 0
    assert not any(plots.iterdir()) and (experiment / "hiwi-s0" / "metric_vs_bytes.png").exists()


def readme_with_block(experiment: Path, opening: str = "<!-- report:exp -->") -> Path:
    readme = experiment.parents[2] / "README.md"
    readme.write_text(
        f"# Title\n\nhand-written text\n\n{opening}\nstale\n<!-- /report:exp -->\n\nmore text\n"
    )
    return readme


def test_readme_blocks_are_regenerated_then_checked(experiment, capsys):
    readme = readme_with_block(experiment)
    assert main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nhand-written text\n\n<!-- report:exp -->\n_Generated")
    assert text.endswith("<!-- /report:exp -->\n\nmore text\n") and "stale" not in text
    assert "| pafi | 0.01 | 3 | 0.8200 ± 0.0200 |" in text and "| pafi | 0.01 | 0.8 | 3/3 seeds |" in text
    for kind in ("metric_vs_bytes", "bytes_per_round", "metric_vs_round"):
        assert f"(experiments/results/exp/report_{kind}.png)" in text
        assert (experiment / f"report_{kind}.png").read_bytes()[:8] == PNG
    assert main(["--readme", str(readme), "--check"]) == 0
    assert main(["--readme", str(readme)]) == 0 and readme.read_text() == text  # deterministic
    assert "1 report block(s) checked: exp" in capsys.readouterr().out


def test_check_fails_with_a_diff_after_a_block_is_edited(experiment, capsys):
    readme = readme_with_block(experiment)
    main(["--readme", str(readme)])
    edited = readme.read_text().replace("0.8200 ± 0.0200", "0.9000 ± 0.0200")
    readme.write_text(edited)
    capsys.readouterr()
    assert main(["--readme", str(readme), "--check"]) == 1
    out = capsys.readouterr().out
    assert "-| pafi | 0.01 | 3 | 0.9000 ± 0.0200" in out and "+| pafi | 0.01 | 3 | 0.8200 ± 0.0200" in out
    assert readme.read_text() == edited  # --check writes nothing


def test_check_fails_for_a_block_without_runs_or_plots(experiment, capsys):
    readme = readme_with_block(experiment)
    main(["--readme", str(readme)])
    (experiment / "report_metric_vs_round.png").unlink()
    assert main(["--readme", str(readme), "--check"]) == 1
    assert "missing experiments/results/exp/report_metric_vs_round.png" in capsys.readouterr().out
    readme.write_text(readme.read_text().replace("report:exp", "report:nothing"))
    assert main(["--readme", str(readme), "--check"]) == 1
    assert "block nothing: no runs under" in capsys.readouterr().out


def test_a_block_can_set_its_targets(experiment):
    readme = readme_with_block(experiment, "<!-- report:exp targets=0.6,0.7 -->")
    assert update_readme(readme) == 0
    text = readme.read_text()
    assert "<!-- report:exp targets=0.6,0.7 -->" in text
    assert "| hiwi[merged] | 0.01 | 0.7 | 1/3 seeds | 2.0 |" in text and "| 0.8 |" not in text
    assert update_readme(readme, check=True) == 0


def test_a_block_in_a_subdirectory_reads_the_repository_results_and_links_relative_to_its_file(experiment):
    doc = experiment.parents[2] / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\n<!-- report:exp -->\nstale\n<!-- /report:exp -->\n")
    assert update_readme(doc) == 0
    text = doc.read_text()
    assert "from `../experiments/results/exp/` (6 runs)" in text
    assert "(../experiments/results/exp/report_metric_vs_bytes.png)" in text
    assert update_readme(doc, check=True) == 0


def test_a_headline_block_is_one_short_table_and_one_plot(experiment):
    readme = readme_with_block(experiment, "<!-- report:exp view=headline targets=0.8 -->")
    (experiment / "report_metric_vs_round.png").unlink(missing_ok=True)
    assert update_readme(readme) == 0
    text = readme.read_text()
    assert "| seeds reaching 0.8 | rounds to 0.8 | bytes to 0.8 |" in text
    assert "| pafi | 0.01 | 3 | 0.8200 ± 0.0200 | 200 B | 400 B | 3/3 |" in text
    assert "| hiwi[merged] | 0.01 | 3 | 0.6300 ± 0.0200 | 200 B | 400 B | 1/3 | 2.0 |" in text
    assert "(experiments/results/exp/report_metric_vs_bytes.png)" in text
    assert "report_bytes_per_round" not in text and "Cumulative bytes over all clients" not in text
    assert not (experiment / "report_metric_vs_round.png").exists()  # only the plot it shows
    assert update_readme(readme, check=True) == 0
    readme.write_text(text.replace("view=headline", "view=nope"))
    with pytest.raises(ValueError, match="view=nope: use one of full, headline, frontier"):
        update_readme(readme, check=True)


def test_the_pareto_front_keeps_the_points_no_other_beats():
    """(bytes, metric): a point is beaten by one with as few bytes or fewer and a higher metric."""
    points = [(5.0, 0.80), (1.0, 0.70), (2.0, 0.75), (2.0, 0.90), (3.0, 0.85), (8.0, 0.95), (8.0, 0.95)]
    assert pareto_front(points) == [1, 3, 5]
    assert pareto_front([]) == []


def test_a_frontier_block_adds_other_experiments_and_labels_each_compression(experiment):
    """`with=` brings in another experiment's runs (the 32-bit points); `view=frontier` draws one
    point per group and labels compressed groups as the run names do."""
    compressed = experiment.parent / "compressed"
    for seed, curve in enumerate(CURVES["pafi"]):
        write_run(compressed, "pafi", seed, curve)
        config = OmegaConf.load(compressed / f"pafi-s{seed}" / "config.yaml")
        config.compression = {
            "enabled": True,
            "bits": 4,
            "block": 256,
            "error_feedback": True,
            "downlink_bits": 4,
        }
        OmegaConf.save(config, compressed / f"pafi-s{seed}" / "config.yaml")
    readme = experiment.parents[2] / "README.md"
    readme.write_text(
        "<!-- report:compressed view=frontier with=exp targets=0.8 -->\n<!-- /report:compressed -->\n"
    )
    assert update_readme(readme) == 0
    text = readme.read_text()
    assert "from `experiments/results/compressed/`, `experiments/results/exp/` (9 runs)" in text
    assert "| pafi[q4ef,d4] | 0.01 | 3 | 0.8200 ± 0.0200 |" in text
    assert "| pafi | 0.01 | 3 | 0.8200 ± 0.0200 |" in text and "| hiwi[merged] | 0.01 | 3 |" in text
    assert "(experiments/results/compressed/report_frontier.png)" in text
    assert "The dashed line joins the groups no other beats" in text
    assert (compressed / "report_frontier.png").read_bytes().startswith(PNG)
    assert not list(experiment.glob("report_*.png"))  # the other experiment's files are left alone
    assert update_readme(readme, check=True) == 0
    readme.write_text(text.replace("with=exp", "with=nothing"))
    assert update_readme(readme, check=True) == 1


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_repository_docs_match_the_committed_results(doc, capsys):
    text = (REPO / doc).read_text()
    names = re.findall(r"^<!-- report:([\w.-]+)", text, re.M)
    assert names, f"{doc} has no report block"
    assert update_readme(REPO / doc, check=True) == 0
    out = capsys.readouterr().out
    assert f"{len(names)} report block(s) checked: {', '.join(names)}" in out
    assert (REPO / doc).read_text() == text


def test_tasks_with_several_metrics_name_each_rows_metric_and_the_others(tmp_path):
    """MRPC is ranked by F1 and also reports accuracy: both appear, and the metric is named."""
    root = tmp_path / "exp"
    write_run(root, "pafi", 0, [0.5, 0.8])
    for seed, (f1, acc) in enumerate([(0.70, 0.60), (0.80, 0.70)]):
        run = write_run(root, "pafi", seed + 1, [0.5, f1])
        config = OmegaConf.load(run / "config.yaml")
        config.task.name = "mrpc"
        OmegaConf.save(config, run / "config.yaml")
        summary = json.loads((run / "summary.json").read_text())
        summary.update(task="mrpc", metric="f1", final={"f1": f1, "accuracy": acc, "loss": 0.5})
        (run / "summary.json").write_text(json.dumps(summary))
        rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
        for r in rounds:
            r["dev"]["f1"] = r["dev"]["accuracy"]
        (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    table = group_table(groups_of(root)).splitlines()
    assert "| metric | final metric | best metric | final, other metrics |" in table[0]
    mrpc = next(line for line in table if "| mrpc |" in line)
    assert "| f1 | 0.7500 ± 0.0707 |" in mrpc and "| accuracy 0.6500 ± 0.0707 |" in mrpc
    sst2 = next(line for line in table if "| sst2 |" in line)
    assert "| accuracy | 0.8000 |" in sst2
