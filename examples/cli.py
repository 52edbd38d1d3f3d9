"""LightningCLI entry point: LeNet-300-100 on MNIST with any lightning_pai callback, configured from YAML or flags.

Usage (from the repository root)::

    python examples/cli.py fit --config examples/configs/prune_at_init.yaml     # the demo, through the CLI
    python examples/cli.py fit --config examples/configs/rigl.yaml --trainer.max_epochs=2
    python examples/cli.py fit --trainer.max_epochs=2 \\
        --trainer.callbacks+=lightning_pai.RigL --trainer.callbacks.sparsity=0.9
    python examples/cli.py fit --print_config --config examples/configs/snfs.yaml  # every argument, resolved

``--data.data_dir`` (default ``../shared/data``) points at torchvision's MNIST layout; ``--data.download=true``
fetches it. One config per method is in ``examples/configs/``.
"""

from __future__ import annotations

import warnings

from mnist_lenet import LeNet300100, MNISTDataModule
from pytorch_lightning.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args``: the command line without the program name; ``None`` reads ``sys.argv``)."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    return LightningCLI(LeNet300100, MNISTDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
