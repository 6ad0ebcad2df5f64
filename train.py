"""The training job: ``python train.py --help`` (also installed as the ``dylora-moe-train`` command)."""

from dylora_moe.train.cli import cli

if __name__ == "__main__":
    cli()
