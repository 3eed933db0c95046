"""`python -m fedsparse [overrides]`: federated simulation (default) or `mode=central`;
`python -m fedsparse resume=<run dir>` continues an interrupted federated run."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fedsparse import checkpoint
from fedsparse.config import auto_run_name, finalize, run_dir
from fedsparse.results import finished, is_finished


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    cfg = finalize(cfg)
    if cfg.resume:
        cfg = checkpoint.resume_config(cfg.resume)
    elif finished(cfg):  # an interrupted sweep continues where it stopped
        print(f"skip: {run_dir(cfg)} is finished with this configuration", flush=True)
        return
    elif cfg.run_name == auto_run_name(cfg) and (run_dir(cfg) / checkpoint.FILE).exists():
        cfg.resume = str(run_dir(cfg))  # named by its configuration: the same run, interrupted
    if cfg.resume and is_finished(cfg.resume):
        print(f"skip: {cfg.resume} is finished", flush=True)
        return
    if cfg.mode == "central":
        from fedsparse.central import run_central

        run_central(cfg)
    else:
        from fedsparse.simulation import run_simulation

        run_simulation(cfg)


if __name__ == "__main__":
    main()
