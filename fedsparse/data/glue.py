"""GLUE data from three sources, and seeded non-IID partitioning over clients.

Sources: a local directory in GLUE's TSV layout (`data.glue_dir`), the SST-2 copy bundled in
this package (works offline on a fresh machine), or the Hugging Face hub (`nyu-mll/glue`).
Every loader returns columns `sentence1`, (`sentence2`), `label`. GLUE dev is our test set.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.metadata
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import numpy as np
from omegaconf import DictConfig

if TYPE_CHECKING:  # imported when data is read: a ClientApp with a warm cache needs neither
    import datasets  # with pandas, ~1.3 s
    from flwr_datasets.partitioner import Partitioner  # with matplotlib and seaborn, ~2 s

SPLITS = ("train", "validation")
SOURCES = ("auto", "dir", "bundled", "hub")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    glue_dir: str  # folder in GLUE's layout
    num_labels: int  # 1: regression (STS-B)
    text_columns: tuple[int, ...]  # TSV column positions of sentence1 (and sentence2)
    label_column: int  # TSV column of the label (-1: last)
    hub_columns: tuple[str, ...]  # the same texts in nyu-mll/glue
    header: bool = True
    dev_split: str = "dev"
    label_names: tuple[str, ...] = field(default=())  # string labels in TSV order -> ids

    def label_id(self, raw: str) -> float | int:
        """The label of one TSV field; ValueError saying what a label must look like."""
        if self.num_labels == 1:
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"label {raw!r} is not a number") from None
        names = self.label_names or tuple(str(i) for i in range(self.num_labels))
        if raw not in names:
            raise ValueError(f"label {raw!r} is not one of {', '.join(names)}")
        return names.index(raw)


NLI2 = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("sst2", "SST-2", 2, (0,), 1, ("sentence",)),
        TaskSpec("cola", "CoLA", 2, (3,), 1, ("sentence",), header=False),
        TaskSpec("mrpc", "MRPC", 2, (3, 4), 0, ("sentence1", "sentence2")),
        TaskSpec("rte", "RTE", 2, (1, 2), 3, ("sentence1", "sentence2"), label_names=NLI2),
        TaskSpec("stsb", "STS-B", 1, (7, 8), 9, ("sentence1", "sentence2")),
        TaskSpec("qnli", "QNLI", 2, (1, 2), 3, ("question", "sentence"), label_names=NLI2),
        TaskSpec(
            "mnli",
            "MNLI",
            3,
            (8, 9),
            -1,
            ("premise", "hypothesis"),
            dev_split="dev_matched",
            label_names=("entailment", "neutral", "contradiction"),
        ),
        TaskSpec("qqp", "QQP", 2, (3, 4), 5, ("question1", "question2")),
    )
}
BUNDLED = {("sst2", "train"): "sst2_train.tsv.gz", ("sst2", "validation"): "sst2_dev.tsv.gz"}


def task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"Unknown task '{task}': choose one of {', '.join(TASKS)}.")
    return TASKS[task]


def load_glue(
    task: str, split: str = "train", source: str = "auto", glue_dir: str | None = None
) -> datasets.Dataset:
    """A GLUE split as columns sentence1[, sentence2], label (cached per process)."""
    spec = task_spec(task)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}' (GLUE dev is 'validation').")
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got '{source}'.")
    if source == "auto":
        source = "dir" if glue_dir else "bundled" if (task, split) in BUNDLED else "hub"
    if source == "dir":
        if not glue_dir:
            raise ValueError("data.source=dir needs data.glue_dir=/path/to/glue (GLUE's TSV layout).")
        return _load_dir(spec, split, str(Path(glue_dir).expanduser().resolve()))
    if source == "bundled":
        if (task, split) not in BUNDLED:
            raise ValueError(f"Only SST-2 is bundled; for {task} pass data.glue_dir=/path/to/glue.")
        return _load_bundled(spec, split)
    return _load_hub(spec, split)


def source_file(task: str, split: str, source: str = "auto", glue_dir: str | None = None) -> Path | None:
    """The local file `load_glue` reads this split from (None: the hub), for cache keys."""
    if source == "auto":
        source = "dir" if glue_dir else "bundled" if (task, split) in BUNDLED else "hub"
    spec = task_spec(task)
    if source == "dir" and glue_dir:
        return Path(glue_dir).expanduser().resolve() / spec.glue_dir / _file_for(spec, split)
    return bundled_asset(BUNDLED[(task, split)]) if source == "bundled" and (task, split) in BUNDLED else None


def _file_for(spec: TaskSpec, split: str) -> str:
    return "train.tsv" if split == "train" else f"{spec.dev_split}.tsv"


@functools.lru_cache(maxsize=16)
def _load_dir(spec: TaskSpec, split: str, glue_dir: str) -> datasets.Dataset:
    path = Path(glue_dir) / spec.glue_dir / _file_for(spec, split)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Point data.glue_dir at a directory with "
            f"{spec.glue_dir}/{_file_for(spec, split)} (GLUE's TSV layout)."
        )
    return _parse_tsv(spec, path.read_text(encoding="utf-8-sig"), str(path))


@functools.lru_cache(maxsize=4)
def _load_bundled(spec: TaskSpec, split: str) -> datasets.Dataset:
    path = bundled_asset(BUNDLED[(spec.name, split)])
    return _parse_tsv(spec, gzip.decompress(path.read_bytes()).decode("utf-8-sig"), str(path))


def _datasets():
    """The `datasets` module, imported on first use (see TYPE_CHECKING above)."""
    import datasets

    datasets.disable_progress_bars()  # per-client shards would flood the console
    return datasets


def _parse_tsv(spec: TaskSpec, text: str, path: str) -> datasets.Dataset:
    """GLUE TSVs are unquoted: quote characters are text, never delimiters, so each line is
    one row. Every row must have the first line's number of columns (a stray or missing tab
    would shift the fields) and a valid label; otherwise the error names the file and line."""
    rows = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    width = len(rows[0]) if rows else 0
    needed = max(*spec.text_columns, spec.label_column) + 1
    if rows and width < needed:
        raise ValueError(
            f"{path}, line 1: {width} tab-separated columns, but {spec.name} reads column "
            f"{needed - 1}. Fix: point data.glue_dir at GLUE's {spec.glue_dir} files."
        )
    columns: dict[str, list] = {f"sentence{i + 1}": [] for i in range(len(spec.text_columns))}
    columns["label"] = []
    for line, row in enumerate(rows[1:] if spec.header else rows, 2 if spec.header else 1):
        try:
            if len(row) != width:
                raise ValueError(f"{len(row)} tab-separated columns, expected {width}")
            columns["label"].append(spec.label_id(row[spec.label_column]))
        except ValueError as err:
            raise ValueError(f"{path}, line {line}: {err}. Fix: repair or delete that line.") from None
        for i, c in enumerate(spec.text_columns):
            columns[f"sentence{i + 1}"].append(row[c])
    ds = _datasets()
    features = ds.Features(
        {
            **{k: ds.Value("string") for k in columns if k != "label"},
            "label": ds.Value("float32" if spec.num_labels == 1 else "int64"),
        }
    )
    return ds.Dataset.from_dict(columns, features=features)


@functools.lru_cache(maxsize=16)
def _load_hub(spec: TaskSpec, split: str) -> datasets.Dataset:
    hub_split = "validation_matched" if spec.name == "mnli" and split == "validation" else split
    try:
        data = _datasets().load_dataset("nyu-mll/glue", spec.name, split=hub_split)
    except Exception as err:  # offline, hub unreachable, or no such config
        raise RuntimeError(
            f"Could not load {spec.name}/{split} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Fix: pass data.glue_dir=/path/to/glue (a directory in GLUE's TSV layout), or use "
            "task=sst2, which is bundled and works offline."
        ) from err
    names = {old: f"sentence{i + 1}" for i, old in enumerate(spec.hub_columns)}
    keep = [*spec.hub_columns, "label"]
    return data.select_columns(keep).rename_columns(names)


def bundled_asset(name: str) -> Path:
    """A file from `fedsparse/data/assets`, also when the package was imported from a copy of its
    sources without that folder (Flower ships only *.py/*.yaml to its app processes)."""
    candidates = [Path(__file__).resolve().parent / "assets" / name]
    try:
        dist = importlib.metadata.distribution("fedsparse")
        candidates.append(Path(str(dist.locate_file(f"fedsparse/data/assets/{name}"))))
        direct_url = dist.read_text("direct_url.json")
        if direct_url:  # editable install: the project directory
            url = json.loads(direct_url).get("url", "")
            if url.startswith("file://"):
                candidates.append(Path(unquote(urlparse(url).path)) / "fedsparse" / "data" / "assets" / name)
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"Bundled data file {name} not found (looked in: "
        f"{', '.join(map(str, candidates))}). Reinstall fedsparse "
        "(`pip install .`) or pass data.glue_dir=/path/to/glue."
    )


def train_split(cfg: DictConfig, source: str | None = None, glue_dir: str | None = None) -> datasets.Dataset:
    """The training split, subsampled (seeded) when `data.max_train_examples` is set."""
    data = load_glue(cfg.task.name, "train", source or cfg.data.source, glue_dir or cfg.data.glue_dir)
    limit = cfg.data.max_train_examples
    if limit and limit < len(data):
        data = data.shuffle(seed=int(cfg.seed)).select(range(int(limit)))
    return data


def dev_split(cfg: DictConfig) -> datasets.Dataset:
    """GLUE dev (our test set), optionally its first `data.max_eval_examples` rows."""
    dev = load_glue(cfg.task.name, "validation", cfg.data.source, cfg.data.glue_dir)
    if cfg.data.max_eval_examples:
        dev = dev.select(range(min(len(dev), int(cfg.data.max_eval_examples))))
    return dev


# --- partitioning -------------------------------------------------------------------------
BIN_COLUMN = "label_bin"


def _binned(dataset: datasets.Dataset) -> datasets.Dataset:
    """STS-B scores (0-5) in 5 integer bins, so Dirichlet label skew applies to regression too."""
    bins = np.clip(np.floor(np.asarray(dataset["label"], dtype=np.float64)), 0, 4).astype(np.int64)
    return dataset.add_column(BIN_COLUMN, bins.tolist())


_FITTED: dict[tuple, Partitioner] = {}


def _partitioner(
    dataset: datasets.Dataset, num_partitions: int, kind: str, alpha: float, seed: int, min_size: int
) -> Partitioner:
    """Fitted partitioners are cached: a client asks for its shard every round."""
    key = (dataset._fingerprint, num_partitions, kind, alpha, seed, min_size)
    if key not in _FITTED:
        if len(_FITTED) >= 8:
            _FITTED.pop(next(iter(_FITTED)))
        _FITTED[key] = _fit_partitioner(dataset, *key[1:])
    return _FITTED[key]


def _fit_partitioner(
    dataset: datasets.Dataset, num_partitions: int, kind: str, alpha: float, seed: int, min_size: int
) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_partitions > len(dataset):
        raise ValueError(
            f"{num_partitions} partitions for {len(dataset)} examples: use fewer clients "
            "(federation.num_clients) or more data."
        )
    if kind == "iid":  # IidPartitioner shards contiguously: shuffle first
        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = dataset.shuffle(seed=seed)
    elif kind == "dirichlet":
        by = "label"
        if dataset.features["label"].dtype.startswith("float"):
            dataset, by = _binned(dataset), BIN_COLUMN
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=by,
            alpha=alpha,
            seed=seed,
            min_partition_size=min_size,
            self_balancing=False,
        )
        partitioner.dataset = dataset
    else:
        raise ValueError(f"Unknown partitioner '{kind}': use dirichlet or iid.")
    try:
        partitioner.load_partition(0)  # fit now, so errors surface here with a useful message
    except ValueError as err:
        raise ValueError(
            f"Dirichlet partitioning failed ({err}). Fix: a larger federation.alpha, "
            "fewer clients, a lower federation.min_partition_size, or another seed "
            f"(the draw depends on it; seed={seed} drew no valid partition in 10 tries)."
        ) from err
    return partitioner


def partition(
    dataset: datasets.Dataset,
    num_partitions: int,
    partition_id: int,
    partitioner: str = "dirichlet",
    alpha: float = 1.0,
    seed: int = 42,
    min_partition_size: int = 10,
) -> datasets.Dataset:
    """Shard `partition_id` of `num_partitions`; every example lands in exactly one shard."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}.")
    fitted = _partitioner(
        dataset, num_partitions, partitioner, float(alpha), int(seed), int(min_partition_size)
    )
    shard = fitted.load_partition(partition_id)
    return shard.remove_columns(BIN_COLUMN) if BIN_COLUMN in shard.column_names else shard


def partition_all(
    dataset: datasets.Dataset,
    num_partitions: int,
    partitioner: str = "dirichlet",
    alpha: float = 1.0,
    seed: int = 42,
    min_partition_size: int = 10,
) -> list[datasets.Dataset]:
    return [
        partition(dataset, num_partitions, i, partitioner, alpha, seed, min_partition_size)
        for i in range(num_partitions)
    ]


def label_histograms(partitions: list[datasets.Dataset], num_bins: int = 5) -> list[list[int]]:
    """Examples per label for each shard (STS-B scores in `num_bins` integer bins)."""
    labels = [np.asarray(p["label"]) for p in partitions]
    if any(lab.dtype.kind == "f" for lab in labels):
        labels = [np.clip(np.floor(lab), 0, num_bins - 1).astype(int) for lab in labels]
    width = max((int(lab.max()) + 1 for lab in labels if lab.size), default=0)
    return [np.bincount(lab.astype(int), minlength=width).tolist() for lab in labels]


def format_label_histograms(partitions: list[datasets.Dataset], num_bins: int = 5) -> str:
    """A table: one row per client with its size and examples per label."""
    hists = label_histograms(partitions, num_bins)
    width = len(hists[0]) if hists else 0
    lines = ["client    size  " + "  ".join(f"label {j:>2}" for j in range(width))]
    for i, (part, hist) in enumerate(zip(partitions, hists)):
        lines.append(f"{i:>6}  {len(part):>6}  " + "  ".join(f"{c:>8}" for c in hist))
    return "\n".join(lines)


SHARDS_FILE = "shards.json"


def describe_shards(cfg: DictConfig, out: Path, deployed: bool = False) -> dict | None:
    """Print the clients' label histograms and keep them in `<out>/shards.json` ({sizes, labels},
    one entry per partition id): on label-skewed shards the partition draw decides much of the
    result, so every run records its own.

    A simulation calls it before it starts (a partition that cannot be drawn stops it there). A
    deployed ServerApp calls it with `deployed=True`: its SuperNodes split the configured data the
    same way (`partition-id` of `num-partitions` = federation.num_clients), so these are their
    shards; a node with its own `data-dir` trains on data the server cannot see. Deployed, a train
    split the server cannot read (a data.glue_dir holding only dev files) is said in one line and
    nothing is written, and a directory holding another run is left alone (the run refuses it next).
    Returns what was written, or None."""
    fed = cfg.federation
    if deployed and not cfg.get("resume") and (Path(out) / "config.yaml").exists():
        return None
    try:
        train = train_split(cfg)
    except (FileNotFoundError, RuntimeError) as err:
        if not deployed:
            raise
        print(f"No {SHARDS_FILE}: the server cannot read the training split ({err})", flush=True)
        return None
    shards = partition_all(
        train, fed.num_clients, fed.partitioner, fed.alpha, cfg.seed, fed.min_partition_size
    )
    where = " as the SuperNodes' partition-id/num-partitions select them" if deployed else ""
    print(
        f"Client shards ({fed.partitioner}, alpha={fed.alpha}, seed={cfg.seed}){where}:\n"
        + format_label_histograms(shards),
        flush=True,
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    histograms = {"sizes": [len(s) for s in shards], "labels": label_histograms(shards)}
    (Path(out) / SHARDS_FILE).write_text(json.dumps(histograms))
    return histograms


def largest_shard(cfg: DictConfig) -> int:
    """The largest client's num-examples under this config's partitioning (max_weight: auto)."""
    fed = cfg.federation
    shards = partition_all(
        train_split(cfg), fed.num_clients, fed.partitioner, fed.alpha, cfg.seed, fed.min_partition_size
    )
    return max(len(s) for s in shards)


# The metric each task is ranked by (GLUE leaderboard): what results, tables and plots report.
MAIN_METRIC = {
    "sst2": "accuracy",
    "rte": "accuracy",
    "qnli": "accuracy",
    "mnli": "accuracy",
    "mrpc": "f1",
    "qqp": "f1",
    "cola": "matthews_correlation",
    "stsb": "pearson",
}


def main_metric(task: str) -> str:
    """The metric a task is ranked by on the GLUE leaderboard."""
    if task not in MAIN_METRIC:
        raise ValueError(f"Unknown task '{task}': choose one of {', '.join(MAIN_METRIC)}.")
    return MAIN_METRIC[task]
