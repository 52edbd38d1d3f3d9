"""Step time of a masked training step: masking by multiplication (old) vs. NaN-safe masking (``zero_masked_``).

``tensor * mask`` keeps ``0 * NaN = NaN``, so a NaN gradient at a pruned weight made the weight NaN. The masks are
now applied by :func:`lightning_pai.core.masks.zero_masked_`, which multiplies each tensor's *bit patterns* (its
bytes seen as integers of the same width) by the 0/1 mask: ``torch.where(mask, t, 0)`` semantics in place. This
script measures what that costs on ResNet-18 (torchvision) in a plain PyTorch loop driven by
:class:`lightning_pai.Sparsifier` (``PruneAtInit("magnitude", 0.9)``, SGD with momentum and weight decay):

* whole optimizer steps (forward, backward, gradient masking, SGD step), the two masking variants interleaved
  step by step in a new (seeded) random order every round, for both places the gradients are masked: inside
  backward (the per-parameter post-accumulate hooks, the default on one process) and after backward
  (``MaskSet.mask_grads_``, used under DDP and on RigL's update steps);
* the masking calls alone on the same gradients (``mask_grads_``, ``apply_``), and two other where-semantics
  candidates for reference: a per-tensor ``masked_fill_`` and ``torch.where(mask, g, 0, out=g)``.

The "multiply" variant is the previous code path, recovered by making ``lightning_pai.core.masks._as_bits`` return
the tensor itself (``torch._foreach_mul_`` of the float values by the uint8 masks, as before).

Usage::

    python benchmarks/training_cost/masking_cost.py                      # ~1-2 min on 2 cores
    python benchmarks/training_cost/masking_cost.py --rounds 40 --batch-size 8 --size 64 --threads 2

Timings are only meaningful on an otherwise idle machine; the process CPU / wall ratio is printed.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import lightning_pai
import lightning_pai.core.masks as masks_module
from lightning_pai import PruneAtInit, Sparsifier

RESULTS = Path(__file__).resolve().parent / "results" / "masking_cost.md"
NEW_BITS = masks_module._as_bits
VARIANTS = ("multiply", "where")
PATHS = ("in_backward", "after_backward")


def use(variant: str) -> None:
    """Switch the masking implementation: ``"where"`` (the library's) or ``"multiply"`` (the previous one)."""
    masks_module._as_bits = NEW_BITS if variant == "where" else (lambda t: t)


def cpu_flags() -> str:
    """The vector-extension flags of the CPU (``grep -o 'avx512f\\|avx2' /proc/cpuinfo | sort -u``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return " ".join(sorted(set(re.findall(r"\b(avx512f|avx2)\b", text)))) or "none of avx2/avx512f"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds (each: one step of every variant)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed rounds first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=50, help="calls per isolated masking timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    sparsifier = Sparsifier(PruneAtInit("magnitude", args.sparsity, verbose=False), model, optimizer)
    masks = sparsifier.masks

    def step(path: str) -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        masks.grad_hooks_active = path == "in_backward"  # False: `before_step` calls `mask_grads_` instead
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.step()
        return time.perf_counter() - start

    combos = [(p, v) for p in PATHS for v in VARIANTS]
    times: dict[tuple[str, str], list[float]] = {c: [] for c in combos}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    order = random.Random(args.seed)
    for r in range(args.warmup + args.rounds):
        for path, variant in order.sample(combos, len(combos)):  # a new order each round: drift and the step
            # before a variant's step (cache, allocator) do not favour any variant
            use(variant)
            t = step(path)
            if r >= args.warmup:
                times[(path, variant)].append(t)
    use("where")
    busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)

    # Exactness after the whole run: pruned weights exactly zero.
    pruned_nonzero = sum(int((p.detach()[~masks[n]] != 0).sum()) for n, p in masks.params.items())

    # The masking calls alone, on the last step's (masked) gradients refilled with dense values.
    with torch.no_grad():
        for p in masks.params.values():
            p.grad = torch.randn_like(p)
    isolated = {}
    for variant in VARIANTS:
        use(variant)
        isolated[f"`mask_grads_()`, {variant}"] = median_ms(masks.mask_grads_, args.calls)
        isolated[f"`apply_()`, {variant}"] = median_ms(masks.apply_, args.calls)
    use("where")
    grads = [p.grad for p in masks.params.values()]
    keep = [masks[n] for n in masks.names]
    drop = [~m for m in keep]
    zero = torch.zeros(())
    isolated["per-tensor `g.masked_fill_(~mask, 0)` (inverted masks cached)"] = median_ms(
        lambda: [g.masked_fill_(d, 0) for g, d in zip(grads, drop)], args.calls
    )
    isolated["per-tensor `torch.where(mask, g, 0, out=g)`"] = median_ms(
        lambda: [torch.where(m, g, zero, out=g) for g, m in zip(grads, keep)], args.calls
    )

    def med(c):
        return 1e3 * statistics.median(times[c])

    rows = [
        ("CPU", f"{cpu_model()}; flags: {cpu_flags()}"),
        ("torch threads; process cpu/wall over the timed loop", f"{args.threads}; {busy:.2f}"),
        ("masked weights", f"{masks.total:,} ({len(masks)} tensors), sparsity {1 - masks.density:.4f}"),
    ]
    for path in PATHS:
        old, new = times[(path, "multiply")], times[(path, "where")]
        ratios = [b / a for a, b in zip(old, new)]
        q = statistics.quantiles(ratios, n=4)
        rows.append(
            (f"step, gradients masked {path.replace('_', ' ')}: multiply (old)", f"{med((path, 'multiply')):.2f} ms")
        )
        rows.append((f"step, gradients masked {path.replace('_', ' ')}: where (new)", f"{med((path, 'where')):.2f} ms"))
        rows.append(
            (
                f"**ratio new / old, {path.replace('_', ' ')}** (median of per-round ratios, IQR)",
                f"**{statistics.median(ratios):.3f}** ({q[0]:.3f}-{q[2]:.3f})",
            )
        )
    rows += [(name, f"{ms:.2f} ms/call") for name, ms in isolated.items()]
    rows.append(("pruned weights not exactly zero after the run", str(pruned_nonzero)))

    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]])
    lines = [
        "# Masking cost: multiply (old) vs. NaN-safe bit-pattern masking (new), ResNet-18",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"lightning_pai {lightning_pai.__version__}",
        f"- setup: resnet18(num_classes=10), batch {args.batch_size} of 3x{args.size}x{args.size}, SGD(momentum=0.9, "
        f"weight_decay=5e-4), Sparsifier(PruneAtInit('magnitude', {args.sparsity})); {args.warmup} warm-up + "
        f"{args.rounds} timed rounds of one step per (path, variant), seeded random order per round; isolated calls: "
        f"median of {args.calls}",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
