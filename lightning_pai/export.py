"""Moved to :mod:`lightning_pai.deploy.export`; kept so that old imports still work."""

from lightning_pai.deploy.export import *  # noqa: F403
from lightning_pai.deploy.export import __all__  # noqa: F401
