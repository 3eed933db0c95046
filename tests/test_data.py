"""GLUE loading from the real TSVs and the bundled copy; seeded partitions."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from harness.models import SHARED_GLUE

from fedsparse.data.glue import format_label_histograms, label_histograms, load_glue, partition, partition_all

needs_glue = pytest.mark.skipif(
    not SHARED_GLUE.exists(), reason=f"{SHARED_GLUE} is absent: the GLUE TSVs sit beside the repo in CI"
)

SIZES = {
    "sst2": (67_349, 872),
    "cola": (8_551, 1_043),
    "mrpc": (3_668, 408),
    "rte": (2_490, 277),
    "stsb": (5_749, 1_500),
}


@needs_glue
@pytest.mark.parametrize("task", sorted(SIZES))
def test_loaders_reproduce_official_split_sizes(task):
    train = load_glue(task, "train", "dir", str(SHARED_GLUE))
    dev = load_glue(task, "validation", "dir", str(SHARED_GLUE))
    assert (len(train), len(dev)) == SIZES[task]
    assert all(isinstance(s, str) and s for s in train["sentence1"][:50])


@needs_glue
def test_label_counts_and_quirks_match_the_glue_readme():
    glue = str(SHARED_GLUE)
    assert np.bincount(load_glue("sst2", "validation", "dir", glue)["label"]).tolist() == [428, 444]
    assert np.bincount(load_glue("cola", "train", "dir", glue)["label"]).tolist() == [2_528, 6_023]
    mrpc = load_glue("mrpc", "train", "dir", glue)  # BOM before the header, quotes inside text
    assert np.bincount(mrpc["label"]).tolist() == [1_194, 2_474]
    assert mrpc[0]["sentence1"].startswith('Amrozi accused his brother, whom he called "the witness"')
    assert np.bincount(load_glue("rte", "validation", "dir", glue)["label"]).tolist() == [146, 131]
    stsb = load_glue("stsb", "train", "dir", glue)
    assert stsb.features["label"].dtype == "float32"
    assert abs(np.mean(stsb["label"]) - 2.701) < 1e-3
    assert len(load_glue("qnli", "validation", "dir", glue)) == 5_463


@needs_glue
def test_bundled_sst2_equals_the_glue_files():
    for split in ("train", "validation"):
        bundled = load_glue("sst2", split, "bundled")
        from_dir = load_glue("sst2", split, "dir", str(SHARED_GLUE))
        assert bundled["sentence1"] == from_dir["sentence1"] and bundled["label"] == from_dir["label"]


def test_bundled_sst2_works_offline_by_default():
    train, dev = load_glue("sst2"), load_glue("sst2", "validation")
    assert (len(train), len(dev)) == (67_349, 872)


def test_missing_data_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="data.glue_dir"):
        load_glue("rte", "train", "bundled")
    with pytest.raises(FileNotFoundError, match="data.glue_dir"):
        load_glue("rte", "train", "dir", str(tmp_path))
    with pytest.raises(ValueError, match="Unknown task"):
        load_glue("squad")


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


@pytest.mark.parametrize(
    ("task", "folder", "text", "error"),
    [
        (
            "rte",
            "RTE",
            RTE_HEADER + "0\ta\tb\tentailment\n1\ta b\tentailment\n",
            "line 3: 3 tab-separated columns, expected 4",
        ),
        ("rte", "RTE", RTE_HEADER + "0\ta\tb\tentailment\n\n", "line 3: 0 tab-separated columns"),
        (
            "rte",
            "RTE",
            RTE_HEADER + "0\ta\tb\tmaybe\n",
            "line 2: label 'maybe' is not one of entailment, not_entailment",
        ),
        ("sst2", "SST-2", "sentence\tlabel\ngood\t1\nbad\t2\n", "line 3: label '2' is not one of 0, 1"),
        ("cola", "CoLA", "gj04\t1\t\tok .\ngj04\tx\t*\tbad .\n", "line 2: label 'x' is not one of 0, 1"),
        (
            "stsb",
            "STS-B",
            "\t".join("abcdefghij") + "\n" + "\t".join("0123456abc") + "\n",
            "line 2: label 'c' is not a number",
        ),
        (
            "rte",
            "RTE",
            "sentence\tlabel\ngood\t1\n",
            "line 1: 2 tab-separated columns, but rte reads column 3",
        ),
    ],
)
def test_a_corrupted_tsv_line_is_named_with_its_file_and_number(task, folder, text, error, tmp_path):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "train.tsv").write_text(text)
    with pytest.raises(ValueError, match=f"{folder}/train.tsv, {error}"):
        load_glue(task, "train", "dir", str(tmp_path))


def _indexed(n: int, labels: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"sentence1": [f"s{i}" for i in range(n)], "label": labels, "idx": list(range(n))}
    )


def test_dirichlet_partitions_are_seeded_cover_everything_once_and_are_skewed():
    data = _indexed(3000, [i % 2 for i in range(3000)])
    parts = partition_all(data, 10, "dirichlet", alpha=0.5, seed=7)
    ids = np.concatenate([p["idx"] for p in parts])
    assert len(ids) == 3000 and len(set(ids.tolist())) == 3000
    again = partition_all(data, 10, "dirichlet", alpha=0.5, seed=7)
    assert [p["idx"] for p in parts] == [p["idx"] for p in again]
    other = partition_all(data, 10, "dirichlet", alpha=0.5, seed=8)
    assert [sorted(p["idx"]) for p in parts] != [sorted(p["idx"]) for p in other]
    shares = [h[1] / sum(h) for h in label_histograms(parts)]
    assert max(shares) - min(shares) > 0.5  # label skew, unlike an IID split


def test_iid_partitions_mix_a_label_sorted_dataset():
    data = _indexed(1000, [0] * 500 + [1] * 500)
    parts = partition_all(data, 4, "iid", seed=0)
    assert sorted(np.concatenate([p["idx"] for p in parts]).tolist()) == list(range(1000))
    for hist in label_histograms(parts):
        assert min(hist) > 80  # every shard has both labels


@needs_glue
def test_stsb_scores_are_binned_for_dirichlet_and_histograms_sum_up():
    stsb = load_glue("stsb", "train", "dir", str(SHARED_GLUE))
    parts = partition_all(stsb, 5, "dirichlet", alpha=1.0, seed=0)
    assert sum(len(p) for p in parts) == len(stsb)
    assert parts[0].features["label"].dtype == "float32" and "label_bin" not in parts[0].column_names
    table = format_label_histograms(parts)
    counts = [int(x) for line in table.splitlines()[1:] for x in line.split()[2:]]
    assert sum(counts) == len(stsb)


def test_partition_errors_name_the_fix():
    data = _indexed(20, [i % 2 for i in range(20)])
    with pytest.raises(ValueError, match="fewer clients"):
        partition(data, 30, 0)
    with pytest.raises(ValueError, match="larger federation.alpha.*another seed"):
        partition(data, 10, 0, "dirichlet", alpha=0.01, min_partition_size=5)
    with pytest.raises(ValueError, match="outside"):
        partition(data, 2, 2)
