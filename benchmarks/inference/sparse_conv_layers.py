"""Direct sparse convolution layer by layer: ``nn.Conv2d`` time / ``SparseConv2d`` time on ResNet-18's conv shapes.

One process, 2 threads; best of several calls each (other processes only ever add time), random masks at each
density, 1 and 16 images of the layer's ImageNet input size. Needs the compiled kernels (a C compiler).

Usage::

    python benchmarks/inference/sparse_conv_layers.py  # writes benchmarks/inference/results/sparse_conv_layers.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from lightning_pai.deploy import SparseConv2d
from lightning_pai.deploy import kernels as ckernels

RESULTS = Path(__file__).resolve().parent / "results"
#: (in channels, out channels, kernel, stride, input size): every distinct conv of torchvision's ResNet-18.
SHAPES = [
    (3, 64, 7, 2, 224),
    (64, 64, 3, 1, 56),
    (64, 128, 3, 2, 56),
    (128, 128, 3, 1, 28),
    (64, 128, 1, 2, 56),
    (128, 256, 3, 2, 28),
    (256, 256, 3, 1, 14),
    (128, 256, 1, 2, 28),
    (256, 512, 3, 2, 14),
    (512, 512, 3, 1, 7),
    (256, 512, 1, 2, 14),
]


def best(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):  # warm-up (oneDNN builds its kernels on the first calls of a shape)
        module(x)
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.05, 0.02])
    parser.add_argument("--images", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not ckernels.available():
        raise SystemExit("SparseConv2d needs lightning_pai.core.kernels (a C compiler); none is usable here.")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    header = " | ".join(f"{1 - d:.0%} sparse" for d in args.densities)
    lines = [
        "# Direct sparse convolution, layer by layer",
        "",
        f"`python benchmarks/inference/sparse_conv_layers.py`: torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. "
        "Ratio = best `nn.Conv2d` time / best `SparseConv2d` time (> 1: sparse faster), random masks.",
        "",
        f"| conv (in -> out, kernel, stride, input) | images | dense ms | {header} |",
        "|---|---:|---:|" + "---:|" * len(args.densities),
    ]
    for cin, cout, k, stride, size in SHAPES:
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False).eval()
        for images in args.images:
            x = torch.randn(images, cin, size, size)
            with torch.inference_mode():
                dense = best(conv, x, args.repeats)
                ratios = []
                for density in args.densities:
                    sparse = SparseConv2d.from_conv(conv, torch.rand(conv.weight.shape) < density)
                    ratios.append(dense / best(sparse, x, args.repeats))
            row = f"| {cin} -> {cout}, {k}x{k}, /{stride}, {size}x{size} | {images} | {dense * 1e3:.2f} | "
            lines.append(row + " | ".join(f"{r:.2f}" for r in ratios) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "sparse_conv_layers.md").write_text(text)
        print(f"wrote {RESULTS / 'sparse_conv_layers.md'}")


if __name__ == "__main__":
    main()
