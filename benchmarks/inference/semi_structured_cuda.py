"""2:4 semi-structured sparsity on CUDA: dense float16 matmul against ``to_sparse_semi_structured``.

Needs a CUDA GPU with sparse tensor cores (compute capability 8.0+, e.g. A100/H100); on any other machine it
exits with a message and status 1. Prints, with CUDA-event timings (median of ``--repeats`` after warm-up):

1. per matmul shape (``F.linear`` of ``rows x in`` by a ``out x in`` weight, float16): dense ms, 2:4 ms, ratio;
2. end to end: the transformer MLP stack of ``benchmarks/inference/sparse_inference.py`` (4 blocks of Linear(d, 4d) ->
   GELU -> Linear(4d, d), residual, LayerNorm) with 2:4 masks (the 2 largest |w| of every 4 inputs), dense
   float16 against ``to_sparse_inference`` (which picks 2:4 for exact 2:4 masks on CUDA), ratio, and the max
   deviation from the dense float16 model.

Usage::

    python benchmarks/inference/semi_structured_cuda.py               # d = 1024, batch 64 x 128 tokens
    python benchmarks/inference/semi_structured_cuda.py --d 2048 --rows 16384
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from lightning_pai.deploy import conversion_report, to_sparse_inference


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Mask keeping the 2 largest |w| of every 4 consecutive inputs of each output row."""
    out, inp = weight.shape
    groups = weight.abs().reshape(out, inp // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(out, inp)


def cuda_ms(fn, repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.norm = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1024, help="model width (hidden = 4 d)")
    parser.add_argument("--rows", type=int, default=64 * 128, help="tokens per call (batch x sequence)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("semi_structured_cuda.py needs a CUDA GPU (2:4 sparse tensor cores); none is available here.")
        return 1
    if torch.cuda.get_device_capability() < (8, 0):
        print(f"{torch.cuda.get_device_name()} has compute capability {torch.cuda.get_device_capability()}; "
              "2:4 semi-structured sparsity needs 8.0+ (Ampere or newer).")  # fmt: skip
        return 1
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, float16, {args.rows} rows")
    print("\n| out x in | dense ms | 2:4 ms | dense / 2:4 |\n|---|---:|---:|---:|")
    x = {}
    for out, inp in [(4 * args.d, args.d), (args.d, 4 * args.d), (args.d, args.d)]:
        w = torch.randn(out, inp, device="cuda", dtype=torch.float16)
        w = w * two_four(w)
        ws = to_sparse_semi_structured(w)
        x[inp] = x.get(inp, torch.randn(args.rows, inp, device="cuda", dtype=torch.float16))
        with torch.inference_mode():
            dense = cuda_ms(lambda w=w, i=inp: F.linear(x[i], w), args.repeats)
            sparse = cuda_ms(lambda ws=ws, i=inp: F.linear(x[i], ws), args.repeats)
        print(f"| {out}x{inp} | {dense:.3f} | {sparse:.3f} | {dense / sparse:.2f} |")

    model = nn.Sequential(*[Block(args.d) for _ in range(args.blocks)]).cuda().half().eval()
    masks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("fc1.weight", "fc2.weight")):
                masks[name] = two_four(p)
                p.mul_(masks[name])
    sparse_model = to_sparse_inference(model, masks, crossover=0.0)  # 2:4 layers only
    impl = {r.implementation for r in conversion_report(sparse_model).rows}
    tokens = torch.randn(args.rows // 64, 64, args.d, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        err = float((sparse_model(tokens) - model(tokens)).abs().max())
        dense = cuda_ms(lambda: model(tokens), args.repeats)
        sparse = cuda_ms(lambda: sparse_model(tokens), args.repeats)
    print(f"\nend to end, {args.blocks} blocks d={args.d} ({', '.join(sorted(impl))}): dense {dense:.3f} ms, "
          f"2:4 {sparse:.3f} ms, dense / 2:4 = {dense / sparse:.2f}, max |diff| {err:.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
