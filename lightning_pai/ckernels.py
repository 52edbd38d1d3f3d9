"""Moved to :mod:`lightning_pai.core.kernels`; kept so that old imports still work."""

from lightning_pai.core.kernels import *  # noqa: F403
from lightning_pai.core.kernels import __all__  # noqa: F401
