"""One callback base class for both Lightning namespaces.

``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer`` each accept only callbacks that are
instances of their own ``Callback`` class. Our callbacks derive from every installed one, so the
same object works with either trainer (and with LightningCLI's type checks).
"""

from __future__ import annotations

import importlib

_bases: list[type] = []
for _mod in ("lightning.pytorch", "pytorch_lightning"):
    try:
        _bases.append(importlib.import_module(_mod).Callback)
    except ImportError:  # pragma: no cover - depends on the environment
        pass
if not _bases:  # pragma: no cover
    raise ImportError(
        "lightning_pai needs `pytorch-lightning` (or `lightning`) installed: pip install pytorch-lightning"
    )

CallbackBase: type = type(
    "CallbackBase", tuple(_bases), {"__doc__": "Lightning ``Callback`` of every installed namespace."}
)

_STRATEGIES_SUPPORTED = ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy")
_STRATEGIES_UNSUPPORTED = ("DeepSpeedStrategy", "FSDPStrategy", "XLAStrategy")


def check_strategy(strategy: object, callback: str) -> None:
    """Raise unless ``strategy`` is single-device, the DDP family, or FSDP2 (``ModelParallelStrategy``).

    Raises:
        RuntimeError: For FSDP1, DeepSpeed and other strategies, naming the supported ones.

    """
    names = [c.__name__ for c in type(strategy).__mro__]
    if any(n in _STRATEGIES_UNSUPPORTED for n in names) or not any(n in _STRATEGIES_SUPPORTED for n in names):
        hint = ""
        if "FSDPStrategy" in names:
            hint = (
                " For sharded training use FSDP2: `ModelParallelStrategy(data_parallel_size=N, "
                "tensor_parallel_size=1)` with `fully_shard(..., mesh=self.device_mesh['data_parallel'])` in "
                "your LightningModule's `configure_model`."
            )
        raise RuntimeError(
            f"`{callback}` supports single-device training, the DDP family (strategy='ddp', 'ddp_spawn', "
            f"'ddp_fork', 'ddp_notebook') and FSDP2 (`ModelParallelStrategy`); got `{type(strategy).__name__}`, "
            f"whose parameter wrapping the masks cannot follow.{hint}"
        )


def rank_zero_warn(message: str) -> None:
    """``warnings.warn`` on rank zero only (Lightning's helper, from whichever namespace is installed)."""
    for name in ("lightning.pytorch.utilities", "pytorch_lightning.utilities"):
        try:
            importlib.import_module(name).rank_zero_warn(message)
            return
        except (ImportError, AttributeError):  # pragma: no cover - depends on the environment
            continue
