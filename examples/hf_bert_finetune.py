"""Sparse fine-tuning of an HF BERT classifier through Lightning, from a local config (nothing downloaded).

A tiny ``BertForSequenceClassification`` (the config is built here; pass ``--config path/to/config.json``
for your own, e.g. a saved ``bert-base-uncased`` config) learns a synthetic task — is token 7 in the
sequence? — while :class:`~lightning_pai.MovementPruning` (Sanh et al. 2020, the method designed for BERT
fine-tuning: scores trained by their own AdamW, top-k recomputed every step) or gradual magnitude pruning
removes 80 % of every attention and feed-forward matrix. The targets are the encoder's ``nn.Linear``
layers (Q, K, V, attention output, intermediate, output); the pooler and the classifier stay dense, as in
the reference, and so do the embeddings; the printed table says how much of the model the masks cover.

Usage::

    python examples/hf_bert_finetune.py                       # movement pruning to 80 %, 3 epochs on the CPU
    python examples/hf_bert_finetune.py --method gmp --sparsity 0.9
    python examples/hf_bert_finetune.py --config my_bert/config.json --checkpoint my_bert/pytorch_model.bin
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_pai import GradualMagnitudePruning, MovementPruning

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the example never reaches the hub
KEY_TOKEN = 7


class TokenTask(Dataset):
    """Random token sequences; the label says whether ``KEY_TOKEN`` occurs in the sequence."""

    def __init__(self, n: int, length: int, vocab: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(KEY_TOKEN + 1, vocab, (n, length), generator=gen)
        positive = torch.rand(n, generator=gen) < 0.5
        where = torch.randint(0, length, (n,), generator=gen)
        self.ids[positive, where[positive]] = KEY_TOKEN
        self.labels = positive.long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class BertClassifier(pl.LightningModule):
    """``BertForSequenceClassification`` with AdamW; batches are HF-style dicts with ``labels``."""

    def __init__(self, config: str | None = None, checkpoint: str | None = None, lr: float = 1e-3) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        if config is None:
            cfg = BertConfig(
                vocab_size=64,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=64,
                num_labels=2,
            )
        else:
            cfg = BertConfig.from_json_file(config)
            cfg.num_labels = 2
        self.model = BertForSequenceClassification(cfg)
        if checkpoint is not None:  # a local weights file; the classifier stays new
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state, strict=False)
        self.lr = lr

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.log("train_loss", out.loss)
        return out.loss

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.log("val_acc", (out.logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=("movement", "gmp"), default="movement")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--config", default=None, help="a local BertConfig JSON (default: a tiny config)")
    p.add_argument("--checkpoint", default=None, help="a local state dict to fine-tune from")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    module = BertClassifier(args.config, args.checkpoint)
    vocab, length = module.model.config.vocab_size, 16
    train = DataLoader(TokenTask(args.train_samples, length, vocab, args.seed), args.batch_size, shuffle=True)
    val = DataLoader(TokenTask(512, length, vocab, args.seed + 1), args.batch_size)
    dense = ["*pooler*", "*classifier*"]  # the reference leaves BERT's pooler and the task head dense
    if args.method == "movement":  # the reference's schedule: pruning between 10 % and 60 % of the run
        pruning = MovementPruning(args.sparsity, initial_warmup=0.1, final_warmup=0.4, exclude=dense)
    else:
        pruning = GradualMagnitudePruning(args.sparsity, end=0.6, frequency=10, exclude=dense)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[pruning],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train, val)
    (result,) = trainer.validate(module, val, verbose=False)
    report = pruning.report(module)
    print(f"{report.summary()}\n{report}")
    print(f"validation accuracy {result['val_acc']:.4f} at sparsity {report.sparsity:.4f} ({args.method})")
    return float(result["val_acc"])


if __name__ == "__main__":
    main()
