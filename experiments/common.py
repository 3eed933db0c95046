"""Shared by the benchmark scripts: print a result and keep it under experiments/results."""

from __future__ import annotations

from pathlib import Path


def write_result(text: str, out: str | Path) -> None:
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text + "\n")
    print(f"\nwrote {out}")
