"""Moved to :mod:`lightning_pai.deploy` (``convert`` and ``modules``); kept so that old imports still work."""

from lightning_pai.deploy.convert import *  # noqa: F403
from lightning_pai.deploy.convert import __all__ as _convert_all
from lightning_pai.deploy.modules import *  # noqa: F403
from lightning_pai.deploy.modules import __all__ as _modules_all

__all__ = [*_convert_all, *_modules_all]
