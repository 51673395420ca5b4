"""Train one adapter, or sweep many: the Hydra app (configs in conf/).

    python run.py                                      # MiniLM + SST-2 + LoRA r=8 on q,v; offline, CPU
    python run.py -m adapter=lora,dora rank=4,8,64     # six runs under multirun/<date>/<time>/
    python run.py -m experiment=lora_fig3              # a paper preset's sweep
    python run.py --cfg job                            # print the composed config
    python -m lowrank.runner.results aggregate <sweep_dir>    # rebuild a sweep's table

Re-running a command with the same hydra.run.dir / hydra.sweep.dir skips completed runs and resumes
interrupted ones. What each run writes: lowrank/runner/app.py; the command line: lowrank/runner/command.py; the config schema: lowrank/runner/config.py.
"""

import os

# Idle OpenMP threads sleep instead of spinning (must be set before torch loads). On a CPU shared with other
# processes a spinning thread waits for a descheduled sibling at every parallel region: measured here, with one
# other busy process on the 2 cores, a MiniLM LoRA step took 5.3 s spinning and 0.74 s passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lowrank.runner import command  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    return command.task(cfg)


if __name__ == "__main__":
    command.main(main)
