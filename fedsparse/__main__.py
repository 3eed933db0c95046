"""`python -m fedsparse [overrides]`: federated simulation (default) or `mode=central`;
`python -m fedsparse resume=<run dir> [federation.rounds=N]` continues an interrupted run."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedsparse.run import ConfigError, check_overrides, prepare


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run = prepare(list(HydraConfig.get().overrides.task), cfg)
    except (ConfigError, FileExistsError) as err:
        sys.exit(f"fedsparse: {err}")  # one line, no traceback: the message names the key and the fix
    if run.finished:
        print(f"skip: {run.dir} is finished with this configuration", flush=True)
        return
    if run.cfg.mode == "central":
        from fedsparse.apps.central import run_central

        run_central(run.cfg)
    else:
        from fedsparse.apps.simulation import run_simulation

        run_simulation(run)


if __name__ == "__main__":
    try:
        check_overrides([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")])
    except ConfigError as err:
        sys.exit(f"fedsparse: {err}")
    main()
