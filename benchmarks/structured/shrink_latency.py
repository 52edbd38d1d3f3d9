"""Channel pruning that makes models smaller: parameters, MACs and CPU latency of ``shrink``'s output ÷ dense.

For each model (torchvision ResNet-18 and VGG-11-BN, random weights: the speed of a shape does not depend on
its values) and channel sparsity, ``ChannelPruning(sparsity, scorer="l1", couple=True)`` prunes that fraction of
every channel group (residual-coupled groups jointly) through a plain-loop ``Sparsifier``, ``shrink`` removes
the pruned channels, and the script reports:

- parameters and MACs per sample of the shrunk model, and the ones ``core.channels`` predicted from the masks;
- the largest output difference between the masked and the shrunk model;
- forward latency at batch ``--batch`` and ``--size``² (eval mode, ``torch.no_grad``): the dense model and the
  shrunk one timed in interleaved rounds in the same process, median of ``--rounds``; ratio = shrunk ÷ dense.

The CPU model, its vector flags and the thread count are printed with the table.

Usage::

    python benchmarks/structured/shrink_latency.py                       # what the results file was made with
    python benchmarks/structured/shrink_latency.py --models resnet18 --sparsities 0.5 --rounds 3 --out /tmp/s.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_pai import ChannelPruning, Sparsifier, shrink
from lightning_pai.core.channels import layer_positions, predicted_shrunk_macs, predicted_shrunk_params


def cpu_line() -> str:
    """CPU model name, its SIMD flags of interest, and the torch thread count."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name}; flags {' '.join(simd) or 'none of avx2/avx512'}; {torch.get_num_threads()} threads"


def prune(name: str, sparsity: float) -> tuple[nn.Module, object]:
    """A random-weight model with ``sparsity`` of its channels pruned by ChannelPruning, and its masks."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sparsifier = Sparsifier(ChannelPruning(sparsity, scorer="l1", couple=True, verbose=False), model, optimizer)
    model.eval()
    return model, sparsifier.masks


def median_ms(model: nn.Module, x: torch.Tensor, reps: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(reps):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg11_bn"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "shrink_latency.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for name in args.models:
        for sparsity in args.sparsities:
            model, masks = prune(name, sparsity)
            probe = x[:2]
            small, report = shrink(model, probe, report=True)
            predicted = predicted_shrunk_params(model, masks)
            predicted_macs = predicted_shrunk_macs(model, masks, layer_positions(model, probe[:1]))
            dense = model  # the masked model: the dense shapes, what a masked model costs without shrinking
            median_ms(dense, x, 1), median_ms(small, x, 1)  # warm-up
            dense_ms, small_ms = [], []
            for _ in range(args.rounds):  # interleaved: drifts in machine load hit both alike
                dense_ms.append(median_ms(dense, x, 1))
                small_ms.append(median_ms(small, x, 1))
            d, s = statistics.median(dense_ms), statistics.median(small_ms)
            rows.append((name, sparsity, report, predicted, predicted_macs, d, s))
            print(f"{name} {sparsity:.0%}: dense {d:.1f} ms, shrunk {s:.1f} ms, ratio {s / d:.3f}", flush=True)
    lines = [
        "# Channel pruning + `shrink`: smaller dense models",
        "",
        "Command: `python benchmarks/structured/shrink_latency.py " + " ".join(argv or sys.argv[1:]) + "`",
        "",
        f"CPU: {cpu_line()}. Forward at batch {args.batch}, {args.size}², eval mode, `torch.no_grad`; median of "
        f"{args.rounds} interleaved rounds. `ChannelPruning(s, scorer='l1', couple=True)`, one-shot at fit start "
        "(random weights). MACs per sample, convolutions and linear layers.",
        "",
        "| model | channels pruned | params (predicted) | params ÷ dense | MACs (predicted) | MACs ÷ dense "
        "| max out diff | dense ms | shrunk ms | latency ÷ dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sparsity, r, pred, pred_macs, d, s in rows:
        lines.append(
            f"| {name} | {sparsity:.0%} | {r.params_after:,} ({pred:,}) | {r.param_ratio:.3f} | "
            f"{r.flops_after / 1e6:.1f} M ({pred_macs / 1e6:.1f} M) | {r.flop_ratio:.3f} | {r.max_abs_diff:.1e} | "
            f"{d:.1f} | {s:.1f} | **{s / d:.3f}** |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
