"""The test session's environment (offline, a fresh disk cache) and its fixtures, which live in
tests/harness/fixtures.py with the rest of the shared harness (tests/harness/)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

for _var in (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
    "FLWR_DISABLE_UPDATE_CHECK",
):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a fresh disk cache (fedsparse.data.cache) per test session, inherited by the Flower processes
if "FEDSPARSE_CACHE_DIR" not in os.environ:
    os.environ["FEDSPARSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedsparse-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FEDSPARSE_CACHE_DIR"], ignore_errors=True)

pytest_plugins = ["harness.fixtures"]
