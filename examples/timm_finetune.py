"""Sparse fine-tuning of a pretrained timm model with ``lightning_pai``.

Loads a timm backbone with its pretrained weights from a *local file* (``--checkpoint``; nothing is
downloaded), swaps the classifier for a 10-class head, prunes by magnitude — once when ``fit`` starts
(``--method oneshot``: :class:`~lightning_pai.PruneAtInit`) or gradually during fine-tuning
(``--method gmp``: :class:`~lightning_pai.GradualMagnitudePruning`) — and fine-tunes with the masks
enforced. The input layer and the new classifier stay dense (``exclude="stem_and_head"``, found through
timm's ``pretrained_cfg``). Data: MNIST resized to 32x32 and repeated to 3 channels, or ``--synthetic``.

Usage (from the repository root)::

    # make a "pretrained" file once (any timm state_dict works, e.g. one you downloaded elsewhere)
    python -c "import timm, torch; torch.save(timm.create_model('resnet18').state_dict(), '/tmp/resnet18.pth')"
    python examples/timm_finetune.py --checkpoint /tmp/resnet18.pth --method gmp --sparsity 0.8 --epochs 1
    python examples/timm_finetune.py --checkpoint /tmp/resnet18.pth --synthetic --max-train-batches 5
"""

from __future__ import annotations

import argparse
import warnings

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_pai import GradualMagnitudePruning, PruneAtInit, sparsity_report


class TimmClassifier(pl.LightningModule):
    """A timm model as a LightningModule: cross-entropy, accuracy, SGD with momentum and cosine decay.

    Args:
        model_name: Any ``timm.create_model`` name (``resnet18``, ``vit_tiny_patch16_224``, ``convnext_atto``).
        num_classes: Classes of the new head.
        checkpoint: Local file of pretrained weights (a state_dict, ``.pth`` or ``.safetensors``); the
            classifier is dropped from it when ``num_classes`` differs. ``None``: random initialisation.
        lr: Peak learning rate.
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``{"img_size": 32}`` for a ViT).
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 10,
        checkpoint: str | None = None,
        lr: float = 0.01,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        kwargs = dict(model_kwargs or {})
        if checkpoint is not None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": checkpoint})
        self.net = timm.create_model(model_name, num_classes=num_classes, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True)
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-5)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def mnist_rgb32(root: str, train: bool, limit: int | None, download: bool = False) -> TensorDataset:
    """MNIST as ``(N, 3, 32, 32)`` normalised floats (bilinear resize, grey repeated to RGB)."""
    from torchvision.datasets import MNIST

    ds = MNIST(root=root, train=train, download=download)
    x = ds.data[:limit].float().div(255).sub(0.1307).div(0.3081)[:, None]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()
    return TensorDataset(x, ds.targets[:limit].long())


def synthetic(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def make_pruning(method: str, sparsity: float) -> pl.Callback:
    """One-shot magnitude pruning at fit start, or gradual (cubic) pruning over the first half of fine-tuning."""
    if method == "oneshot":
        return PruneAtInit("magnitude", sparsity, distribution="global", exclude="stem_and_head")
    if method == "gmp":
        return GradualMagnitudePruning(sparsity, start=0, end=0.5, frequency=10, exclude="stem_and_head")
    raise SystemExit(f"--method must be 'oneshot' or 'gmp', not {method!r}")


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--checkpoint", default=None, help="local file with the pretrained weights")
    p.add_argument("--method", default="oneshot", choices=("oneshot", "gmp"))
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=10_000)
    p.add_argument("--max-train-batches", type=int, default=None)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--synthetic", action="store_true", help="random data instead of MNIST")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0)
    if args.synthetic:
        train, val = synthetic(args.train_samples, 0), synthetic(500, 1)
    else:
        train = mnist_rgb32(args.data_dir, True, args.train_samples, args.download)
        val = mnist_rgb32(args.data_dir, False, 2_000, args.download)
    extra = {"img_size": 32} if args.model.startswith(("vit", "deit")) else {}
    model = TimmClassifier(args.model, 10, args.checkpoint, args.lr, extra)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.max_train_batches,
        callbacks=[make_pruning(args.method, args.sparsity)],
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(model, DataLoader(train, args.batch_size, shuffle=True), DataLoader(val, 500))
    acc = float(trainer.callback_metrics["val_acc"])
    print(sparsity_report(model.net))
    print(f"validation accuracy: {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
