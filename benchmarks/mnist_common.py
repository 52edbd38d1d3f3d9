"""Shared pieces of the MNIST benchmarks: data, initialisers, and many masked MLPs trained at once.

The benchmarks train dozens of small MLPs (methods x sparsities x seeds). On a CPU that is only
affordable when they share every kernel launch, so :class:`StackedMLP` keeps model ``k``'s layer ``i``
as slice ``k`` of one ``[M, in, out]`` tensor and runs ``torch.baddbmm``. Each model has its own
masks, initial weights, data order (:class:`BatchStream`) and optimizer state (:func:`sgd_step`,
:func:`adam_step` are per-model), so the result is the same as training the models one by one.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
LENET_300_100 = (784, 300, 100, 10)


def base_parser(doc: str, out: Path) -> argparse.ArgumentParser:
    """Arguments every MNIST benchmark takes: data location, seeds, CPU threads and the results file."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(out))
    return parser


def load_mnist(
    data_dir: str, download: bool = False, dataset: str = "MNIST", holdout: float = 0.1
) -> tuple[Tensor, ...]:
    """Normalised, flattened ``(train_x, train_y, val_x, val_y, test_x, test_y)``; ``holdout`` of train is val."""
    cls = getattr(torchvision.datasets, dataset)

    def tensors(train: bool) -> tuple[Tensor, Tensor]:
        ds = cls(data_dir, train=train, download=download)
        x = ds.data.float().div(255).sub(MNIST_MEAN).div(MNIST_STD).flatten(1)
        return x, ds.targets.clone()

    x, y = tensors(True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_val = int(len(x) * holdout)
    val, train = perm[:n_val], perm[n_val:]
    test_x, test_y = tensors(False)
    return x[train], y[train], x[val], y[val], test_x, test_y


def variance_scaling_(weight: Tensor, gen: torch.Generator) -> None:
    """TF ``variance_scaling_initializer()``: truncated normal (|z| < 2), std = sqrt(1 / fan_in) / 0.8796."""
    std = math.sqrt(1.0 / weight.shape[1]) / 0.87962566103423978
    with torch.no_grad():
        z = torch.randn(weight.shape, generator=gen)
        bad = z.abs() >= 2
        while bad.any():
            z[bad] = torch.randn(int(bad.sum()), generator=gen)
            bad = z.abs() >= 2
        weight.copy_(z * std)


def glorot_normal_(weight: Tensor, gen: torch.Generator) -> None:
    """Glorot (Xavier) normal: std = sqrt(2 / (fan_in + fan_out)), the LTH paper's "Gaussian Glorot"."""
    fan_out, fan_in = weight.shape
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=gen) * math.sqrt(2.0 / (fan_in + fan_out)))


def mlp(sizes: Sequence[int], seed: int, init: str = "variance_scaling") -> nn.Sequential:
    """``Flatten -> Linear -> ReLU -> ... -> Linear`` with the named initialiser and zero biases.

    ``init="torch"`` keeps PyTorch's default ``nn.Linear`` initialisation (biases included), seeded.

    The weights are named ``"{2i + 1}.weight"`` (``1.weight``, ``3.weight``, ...).
    """
    if init == "torch":  # PyTorch's default nn.Linear initialisation, seeded
        torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    net = nn.Sequential(*layers)
    if init == "torch":
        return net
    fill = {"variance_scaling": variance_scaling_, "glorot_normal": glorot_normal_}[init]
    gen = torch.Generator().manual_seed(seed)
    for layer in net:
        if isinstance(layer, nn.Linear):
            fill(layer.weight, gen)
            nn.init.zeros_(layer.bias)
    return net


def lenet_recipe(seed: int, args: argparse.Namespace, n_train: int) -> tuple[nn.Sequential, torch.optim.Optimizer, Any]:
    """LeNet-300-100 (PyTorch's initialisation, seeded) with sparse_learning's MNIST recipe.

    SGD momentum 0.9, ``args.lr``, weight decay ``args.weight_decay`` on the weights only, lr x0.1 at 50 % and
    75 % of ``args.epochs`` epochs of ``n_train // args.batch_size`` steps (a ``MultiStepLR`` stepped per batch).

    Returns:
        ``(model, optimizer, scheduler)``.
    """
    model = mlp(LENET_300_100, seed, "torch")
    names = set(weight_names(model))
    weights = [p for n, p in model.named_parameters() if n in names]
    others = [p for n, p in model.named_parameters() if n not in names]
    optimizer = torch.optim.SGD(
        [{"params": weights, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
    )
    total = args.epochs * (n_train // args.batch_size)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [total // 2, 3 * total // 4], gamma=0.1)
    return model, optimizer, scheduler


def train_sparsified(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, sparsifier: Any, x: Tensor, y: Tensor,
    args: argparse.Namespace, seed: int,
) -> None:  # fmt: skip
    """``args.epochs`` epochs of a plain loop driven by a :class:`lightning_pai.Sparsifier` (seeded data order)."""
    per_epoch = len(x) // args.batch_size
    gen = torch.Generator().manual_seed(seed)
    for _epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=gen)
        for b in range(per_epoch):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            sparsifier.step()
            scheduler.step()
        sparsifier.epoch_end()


def test_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in % of ``model`` (put in eval mode) on ``(x, y)``."""
    with torch.no_grad():
        model.eval()
        return float((model(x).argmax(1) == y).float().mean()) * 100


def write_results(out: str | Path, lines: Sequence[str]) -> str:
    """Write ``lines`` (a Markdown results file) to ``out`` (parents created), print and return the text."""
    text = "\n".join(lines) + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(text)
    return text


def weight_names(net: nn.Sequential) -> list[str]:
    """Names of the Linear weights of :func:`mlp`, in order."""
    return [f"{i}.weight" for i, m in enumerate(net) if isinstance(m, nn.Linear)]


class StackedMLP:
    """``M`` masked MLPs of the same shape trained at once: weights ``[M, in, out]``, biases ``[M, 1, out]``."""

    def __init__(self, nets: Sequence[nn.Sequential], masks: Sequence[Mapping[str, Tensor] | None]) -> None:
        names = weight_names(nets[0])
        self.weights: list[Tensor] = []
        self.biases: list[Tensor] = []
        self.masks: list[Tensor] = []
        for name in names:
            owner = name.split(".")[0]
            lins = [net[int(owner)] for net in nets]
            ones = torch.ones_like(lins[0].weight.t())
            m = torch.stack([ones if mk is None else mk[name].t().float() for mk in masks]).contiguous()
            w = torch.stack([lin.weight.detach().t() for lin in lins]) * m
            self.weights.append(w.contiguous().requires_grad_(True))
            self.biases.append(torch.stack([lin.bias.detach()[None] for lin in lins]).contiguous().requires_grad_(True))
            self.masks.append(m)

    @property
    def params(self) -> list[Tensor]:
        """Weights then biases."""
        return self.weights + self.biases

    def __len__(self) -> int:
        return len(self.weights[0])

    def __call__(self, x: Tensor, dropout: float = 0.0) -> Tensor:
        """``x``: ``[M, B, in]`` (or ``[1, B, in]``, broadcast) -> logits ``[M, B, classes]``.

        ``dropout``: probability of dropping each hidden activation (training only).
        """
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h.expand(len(self), -1, -1), w)
            if i < len(self.weights) - 1:
                h = F.dropout(F.relu(h), dropout) if dropout else F.relu(h)
        return h

    def losses(self, x: Tensor, y: Tensor, dropout: float = 0.0) -> Tensor:
        """Mean cross-entropy per model, ``[M]``; ``x``: ``[M, B, in]``, ``y``: ``[M, B]``."""
        logits = self(x, dropout)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, chunk: int = 2000) -> tuple[Tensor, Tensor]:
        """``(error %, mean loss)`` of every model on ``(x, y)``."""
        wrong = torch.zeros(len(self))
        loss = torch.zeros(len(self))
        for i in range(0, len(x), chunk):
            logits = self(x[i : i + chunk][None])
            target = y[i : i + chunk]
            wrong += (logits.argmax(-1) != target).sum(-1).float()
            loss += F.cross_entropy(logits.transpose(1, 2), target.expand(len(self), -1), reduction="none").sum(-1)
        return 100.0 * wrong / len(x), loss / len(x)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        torch._foreach_mul_([w.grad for w in self.weights], self.masks)

    @torch.no_grad()
    def apply_masks_(self) -> None:
        torch._foreach_mul_(self.weights, self.masks)

    def pruned_weights_zero(self) -> bool:
        """Whether every masked weight is exactly zero."""
        return all(bool((w[m == 0] == 0).all()) for w, m in zip(self.weights, self.masks))

    def kept(self) -> Tensor:
        """Kept weights per model, ``[M]``."""
        return sum(m.sum((1, 2)) for m in self.masks)

    def model_weights(self, k: int, names: Sequence[str]) -> dict[str, Tensor]:
        """Model ``k``'s weights as ``{name: [out, in]}`` (the layout of ``nn.Linear``)."""
        return {n: w[k].detach().t().clone() for n, w in zip(names, self.weights)}


class BatchStream:
    """Per-model minibatch indices.

    Model ``k`` reads the data in the order of its seed ``seeds[k]``: epoch ``e`` is the ``e``-th
    permutation drawn from a generator seeded with ``10_000 + seed``. Each model has its own position
    (``pos[k]``, in steps), so a model can be rewound to replay the batches from any step.
    """

    def __init__(self, n: int, batch_size: int, seeds: Sequence[int]) -> None:
        self.n, self.batch_size, self.seeds = n, batch_size, list(seeds)
        self.gens = {s: torch.Generator().manual_seed(10_000 + s) for s in set(self.seeds)}
        self.orders: dict[int, list[Tensor]] = {s: [] for s in self.gens}
        self.per_epoch = n // batch_size
        self.pos = [0] * len(self.seeds)

    def _order(self, seed: int, epoch: int) -> Tensor:
        orders = self.orders[seed]
        while len(orders) <= epoch:
            orders.append(torch.randperm(self.n, generator=self.gens[seed]))
        return orders[epoch]

    def next(self) -> Tensor:
        """Indices ``[M, batch_size]`` of the next step (every model advances by one step)."""
        rows = []
        for k, seed in enumerate(self.seeds):
            epoch, step = divmod(self.pos[k], self.per_epoch)
            rows.append(self._order(seed, epoch)[step * self.batch_size : (step + 1) * self.batch_size])
            self.pos[k] += 1
        return torch.stack(rows)


def sgd_step(params: list[Tensor], bufs: list[Tensor], lr: float, momentum: float, decays: list[float]) -> None:
    """SGD with momentum and L2 weight decay, PyTorch's formula (``buf = m * buf + g + wd * w``; ``w -= lr * buf``)."""
    with torch.no_grad():
        for p, buf, wd in zip(params, bufs, decays):
            g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            buf.mul_(momentum).add_(g)
            p.sub_(buf, alpha=lr)


def adam_step(
    params: list[Tensor], state: dict[str, list[Tensor]], steps: Tensor, lr: float, betas=(0.9, 0.999), eps=1e-8
) -> None:
    """Adam (Kingma & Ba 2015) with a per-model step count ``steps`` (``[M]``), so models can rewind independently."""
    b1, b2 = betas
    with torch.no_grad():
        steps += 1
        c1 = (1 - b1**steps).view(-1, 1, 1)
        c2 = (1 - b2**steps).view(-1, 1, 1)
        for p, m, v in zip(params, state["exp_avg"], state["exp_avg_sq"]):
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + eps))
