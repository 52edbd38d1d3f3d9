"""Moved to :mod:`lightning_pai.core.kernels` (the masked-dense and truly sparse training paths use it too).

This name stays an alias of that module (the same module object, so its state is shared).
"""

import sys

from lightning_pai.core import kernels as _kernels

sys.modules[__name__] = _kernels
