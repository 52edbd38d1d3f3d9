"""Moved to :mod:`lightning_pai.deploy.kernels`; kept so that old imports still work."""

from lightning_pai.deploy.kernels import *  # noqa: F403
from lightning_pai.deploy.kernels import __all__  # noqa: F401
