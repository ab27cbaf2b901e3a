"""Entry point: ``python train.py stage=pretrain``, ``python train.py stage=finetune lora.rank=1,2,4 -m``."""

from pathlib import Path

import hydra

from loralab.cli import main as run_cli
from loralab.cli import run_job

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def main(cfg):
    return run_job(cfg)


if __name__ == "__main__":
    run_cli(main, CONF)
