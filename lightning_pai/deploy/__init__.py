"""Deployment: sparse files, permanent masks, and inference-only sparse models that run (and compile) fast.

- :mod:`~lightning_pai.deploy.export`: ``sparse_state_dict`` / ``save_sparse`` / ``load_sparse`` (kept weights
  only, checksummed), ``dense_state_dict``, ``make_permanent``; ``save_diff`` / ``load_diff`` (only the entries
  a gradient-only method such as FISH trained, applied onto the pretrained model);
- :mod:`~lightning_pai.deploy.convert`: ``to_sparse_inference`` (layers replaced where measured faster) and
  its ``ConversionReport``;
- :mod:`~lightning_pai.deploy.modules`: the sparse layers it swaps in;
- :mod:`~lightning_pai.deploy.ops`: their computations, also as ``torch.library`` custom ops for
  ``torch.compile``;
- :mod:`~lightning_pai.deploy.shrink`: ``shrink`` (pruned channels physically removed: a smaller dense model),
  ``save_shrunk`` / ``load_shrunk``;
- :mod:`~lightning_pai.core.kernels`: the compiled CPU kernels (``kernels.c``), built once per machine into a
  private cache.

Every public name is also importable from ``lightning_pai``.
"""

from lightning_pai.deploy.convert import (
    ConversionReport,
    KernelTimes,
    LayerConversion,
    clear_crossover_cache,
    conversion_report,
    is_two_four,
    measure_conv_crossover,
    measure_crossover,
    measure_kernel_times,
    to_sparse_inference,
)
from lightning_pai.deploy.export import (
    dense_state_dict,
    load_diff,
    load_sparse,
    make_permanent,
    save_diff,
    save_sparse,
    sparse_state_dict,
)
from lightning_pai.deploy.modules import (
    DenseWeightView,
    SemiStructuredLinear,
    SparseConv1x1,
    SparseConv2d,
    SparseLinear,
    SparseMatmul,
    TransposedLayerNorm,
)
from lightning_pai.deploy.shrink import ShrinkReport, load_shrunk, save_shrunk, shrink

__all__ = [
    "ConversionReport",
    "DenseWeightView",
    "KernelTimes",
    "LayerConversion",
    "SemiStructuredLinear",
    "ShrinkReport",
    "SparseConv1x1",
    "SparseConv2d",
    "SparseLinear",
    "SparseMatmul",
    "TransposedLayerNorm",
    "clear_crossover_cache",
    "conversion_report",
    "dense_state_dict",
    "is_two_four",
    "load_shrunk",
    "load_diff",
    "load_sparse",
    "make_permanent",
    "measure_conv_crossover",
    "measure_crossover",
    "measure_kernel_times",
    "save_diff",
    "save_shrunk",
    "save_sparse",
    "shrink",
    "sparse_state_dict",
    "to_sparse_inference",
]
