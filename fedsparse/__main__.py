"""`python -m fedsparse [overrides]`: federated simulation (default) or `mode=central`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fedsparse.config import finalize, run_dir
from fedsparse.results import finished


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    cfg = finalize(cfg)
    if finished(cfg):  # an interrupted sweep continues where it stopped
        print(f"skip: {run_dir(cfg)} is finished with this configuration", flush=True)
        return
    if cfg.mode == "central":
        from fedsparse.central import run_central

        run_central(cfg)
    else:
        from fedsparse.simulation import run_simulation

        run_simulation(cfg)


if __name__ == "__main__":
    main()
