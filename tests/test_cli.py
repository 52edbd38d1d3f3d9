"""LightningCLI: every callback from YAML (examples/configs) and from command-line flags, end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from helpers import TARGET_TOTAL, assert_enforced, make_dataloader, make_module

pytest.importorskip("jsonargparse")
pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.cli import LightningCLI  # noqa: E402

import lightning_pai  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])  # LightningCLI(args=...) warns when sys.argv has pytest's flags


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.yaml"))
TinyModule = type(make_module("pytorch_lightning"))


class TinyData(pl.LightningDataModule):
    """The tests' synthetic data: 8 batches of 8."""

    def train_dataloader(self):
        return make_dataloader()


def _run(args: list[str]) -> LightningCLI:
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    quiet += ["--trainer.enable_checkpointing=false", "--trainer.accelerator=cpu", "--trainer.logger=false"]
    return LightningCLI(TinyModule, TinyData, args=["fit", *args, *quiet], save_config_callback=None)


def test_every_example_config_names_a_registered_method():
    names = {yaml.safe_load(p.read_text())["trainer"]["callbacks"][0]["class_path"] for p in CONFIGS}
    assert names <= {f"lightning_pai.{cls.__name__}" for cls in lightning_pai.list_methods()}
    assert len(CONFIGS) >= 9


@pytest.mark.parametrize("cls", lightning_pai.list_methods(), ids=lambda cls: cls.__name__)
def test_every_registered_method_runs_from_command_line_flags(cls):
    """Registry-derived: the method's example configuration, given as LightningCLI flags, prunes to 80 %."""
    card = cls.card
    args = {**({card.sparsity_argument: 0.8} if card.sparsity_argument else {}), **card.example, "verbose": False}
    flags = [f"--trainer.callbacks+=lightning_pai.{cls.__name__}"]
    flags += [
        f"--trainer.callbacks.{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in args.items()
    ]
    cli = _run(["--trainer.max_epochs=2", *flags])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, cls)]
    assert cli.trainer.global_step == 16
    assert card.sparsity_argument is None or getattr(cb, card.sparsity_argument) == 0.8
    kept = sum(int(m.sum()) for _, m in cb.masks.items())
    assert abs(kept - 0.2 * TARGET_TOTAL) <= 3 if card.exact_sparsity else 0 < kept < TARGET_TOTAL


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_runs_through_the_cli(config):
    # The configs' epochs (8) at 8 batches each: every schedule reaches its final sparsity.
    cli = _run([f"--config={config}"])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, lightning_pai.SparseCallback)]
    class_path = yaml.safe_load(config.read_text())["trainer"]["callbacks"][0]["class_path"]
    assert f"lightning_pai.{type(cb).__name__}" == class_path
    assert cli.trainer.global_step == 64
    kept = sum(int(m.sum()) for _, m in cb.masks.items())
    if cb.card.exact_sparsity:
        assert abs(kept - (1 - cb.final_sparsity) * TARGET_TOTAL) <= 3
    assert_enforced(cb, cli.model)


def test_callback_from_command_line_flags():
    cli = _run(
        [
            "--trainer.max_steps=6",
            "--trainer.callbacks+=lightning_pai.RigL",
            "--trainer.callbacks.sparsity=0.7",
            "--trainer.callbacks.delta_t=2",
            "--trainer.callbacks.t_end=1.0",
            "--trainer.callbacks.exclude=fc2.weight",
            "--trainer.callbacks.verbose=false",
        ]
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, lightning_pai.RigL)]
    assert (cb.sparsity, cb.delta_t, cb.t_end, cb.exclude) == (0.7, 2, 1.0, "fc2.weight")
    assert cb.updates == 2 and "fc2.weight" not in cb.masks.names
    assert sum(int(m.sum()) for _, m in cb.masks.items()) == round(0.3 * (TARGET_TOTAL - 128))


def test_subclass_defaults_are_the_papers_in_the_resolved_config(capsys):
    with pytest.raises(SystemExit):
        _run(["--trainer.callbacks+=lightning_pai.SET", "--trainer.callbacks+=lightning_pai.SNFS", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    set_args, snfs_args = (c["init_args"] for c in printed["trainer"]["callbacks"])
    assert (set_args["distribution"], set_args["zeta"], set_args["update_on"]) == ("er", 0.3, "epoch")
    assert (snfs_args["distribution"], snfs_args["prune_rate"], snfs_args["min_rate"]) == ("uniform", 0.5, 0.005)


def test_the_demo_cli_parses_its_configs(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import cli

    for config in CONFIGS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["fit", f"--config={config}", "--print_config"])
        assert exit_info.value.code in (0, None)
    assert "cli" in sys.modules
