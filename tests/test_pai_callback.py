"""PruneAtInit with the data-driven and data-free PaI scorers inside a real Trainer."""

from __future__ import annotations

import pytest
import torch
from helpers import TARGET_SHAPES, TARGET_TOTAL, make_dataloader, make_module, make_trainer
from torch import nn

from lightning_pai import PruneAtInit, ScoringContext, compute_masks, get_scorer
from lightning_pai.callbacks._compat import CallbackBase


class _Probe(CallbackBase):
    """Records the model's state at fit start, before PruneAtInit runs (put it first in `callbacks`)."""

    def on_fit_start(self, trainer, pl_module):
        self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.flags = [m.training for m in pl_module.modules()]
        self.requires_grad = [p.requires_grad for p in pl_module.parameters()]


class _After(CallbackBase):
    def on_fit_start(self, trainer, pl_module):
        self.after = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.flags = [m.training for m in pl_module.modules()]
        self.requires_grad = [p.requires_grad for p in pl_module.parameters()]


def _bn_module():
    module = make_module(seed=0)
    module.bn = nn.BatchNorm1d(32)
    module.fc2.bias.requires_grad_(False)

    def forward(x):
        h = torch.relu(module.conv(x)).flatten(1)
        return module.fc2(torch.relu(module.bn(module.fc1(h))))

    module.forward = forward
    return module


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_scoring_leaves_model_state_alone(method):
    module = _bn_module()
    probe, after = _Probe(), _After()
    cb = PruneAtInit(method, 0.9, iterations=3 if method == "synflow" else 1, batches=2, verbose=False)
    trainer = make_trainer(max_steps=1, callbacks=[probe, cb, after])
    trainer.fit(module, make_dataloader())
    assert sum(cb.masks.kept().values()) == round(0.1 * TARGET_TOTAL)
    for k, v in probe.before.items():
        expected = v * cb.masks[k] if k in TARGET_SHAPES else v
        assert torch.equal(after.after[k], expected), k  # BN running stats, biases, kept weights untouched
    assert after.flags == probe.flags and after.requires_grad == probe.requires_grad


def test_snip_uses_training_step_loss_and_first_batches():
    module = make_module(seed=1)
    reference = make_module(seed=1)
    loader = make_dataloader(batch_size=8)
    batches = [b for _, b in zip(range(2), loader)]
    ctx = ScoringContext({n: reference.get_parameter(n) for n in TARGET_SHAPES}, module=reference, batches=batches)
    expected = compute_masks(get_scorer("snip")(ctx), 0.8, "global")  # default loss = CE = training_step's
    cb = PruneAtInit("snip", 0.8, batches=2, verbose=False)
    make_trainer(max_steps=1, callbacks=[cb]).fit(module, loader)  # training_step calls self.log: silenced
    assert all(torch.equal(cb.masks[n].cpu(), expected[n]) for n in TARGET_SHAPES)


def test_loss_fn_alternative_is_used():
    calls = []

    def loss_fn(logits, targets):
        calls.append(logits.shape)
        return nn.functional.cross_entropy(logits, targets)

    cb = PruneAtInit("snip", 0.8, loss_fn=loss_fn, batches=3, verbose=False)
    make_trainer(max_steps=1, callbacks=[cb]).fit(make_module(), make_dataloader(batch_size=8))
    assert calls == [torch.Size([8, 4])] * 3


def test_synflow_defaults_to_100_shrinking_rounds(monkeypatch):
    from lightning_pai.core.saliency import synflow
    from lightning_pai.core.scorers import _SCORERS

    rounds = []

    def counting(ctx):
        rounds.append(sum(int(m.sum()) for m in ctx.masks.values()) if ctx.masks else TARGET_TOTAL)
        return synflow(ctx)

    monkeypatch.setitem(_SCORERS._entries, "synflow", counting)
    cb = PruneAtInit("synflow", 0.99, verbose=False)
    assert cb.iterations == 100
    make_trainer(max_steps=1, callbacks=[cb]).fit(make_module(), make_dataloader())
    assert len(rounds) == 100
    assert rounds == sorted(rounds, reverse=True)  # kept count only shrinks round to round
    assert sum(cb.masks.kept().values()) == round(0.01 * TARGET_TOTAL)


def test_manual_optimization_requires_loss_fn():
    module = make_module()
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="manual optimization.*`loss_fn=`"):
        make_trainer(max_steps=1, callbacks=[PruneAtInit("snip", 0.5, verbose=False)]).fit(module, make_dataloader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iterations": 0}, "`iterations`"),
        ({"schedule": "cosine"}, "`schedule` must be one of 'exponential', 'linear'"),
        ({"ablation": "flip"}, "`ablation` must be one of 'shuffle', 'reinit', 'invert' or None"),
        ({"batches": 0}, "`batches`"),
        ({"min_density": 0.5}, "`min_density`"),
        ({"min_density": -0.1}, "`min_density`"),
        ({"method": "snipp"}, "Unknown `method` 'snipp'.*grasp.*snip.*synflow"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    args = {"method": "snip", "sparsity": 0.9, **kwargs}
    with pytest.raises(ValueError, match=match):
        PruneAtInit(**args)


@pytest.mark.parametrize("ablation", ["shuffle", "invert", "reinit"])
def test_ablations_keep_per_layer_counts(ablation):
    base = PruneAtInit("magnitude", 0.9, verbose=False)
    make_trainer(max_steps=1, callbacks=[base]).fit(make_module(seed=3), make_dataloader())
    module = make_module(seed=3)
    fc2_bias = module.fc2.bias.detach().clone()
    cb = PruneAtInit("magnitude", 0.9, ablation=ablation, verbose=False)
    make_trainer(max_steps=0, callbacks=[cb]).fit(module, make_dataloader())
    assert cb.masks.kept() == base.masks.kept()
    if ablation == "reinit":
        assert all(torch.equal(cb.masks[n], base.masks[n]) for n in TARGET_SHAPES)
        assert torch.equal(module.fc2.bias, fc2_bias)
        fresh = make_module(seed=3)
        assert not torch.equal(module.fc1.weight[cb.masks["fc1.weight"]], fresh.fc1.weight[cb.masks["fc1.weight"]])
    else:
        assert not all(torch.equal(cb.masks[n], base.masks[n]) for n in TARGET_SHAPES)
    if ablation == "invert":
        w = make_module(seed=3).fc1.weight.abs()
        kept, dropped = w[cb.masks["fc1.weight"]], w[~cb.masks["fc1.weight"]]
        assert kept.max() <= dropped.min()


def test_lamp_with_a_signed_scorer_is_rejected_before_training():
    """LAMP squares its scores: with GraSP's signed θ⊙Hg it would keep the most negative (most prunable) weights."""
    from lightning_pai import get_distribution, scorer_info

    assert scorer_info("grasp")["signed"] and not scorer_info("snip")["signed"]
    with pytest.raises(ValueError, match=r"`distribution='lamp'` ranks non-negative magnitudes; `method='grasp'`"):
        PruneAtInit("grasp", 0.9, distribution="lamp")
    lamp = get_distribution("lamp")
    signed = {"a": torch.tensor([-3.0, 0.1, 0.2, 2.0]), "b": torch.tensor([0.5, -0.4])}
    with pytest.raises(ValueError, match="scores have negative values"):
        lamp(signed, 0.5)  # a custom signed scorer is caught at selection time too
    assert sum(lamp({n: s.abs() for n, s in signed.items()}, 0.5).values()) == 3


def test_scorer_metadata_drives_the_callback(monkeypatch):
    """A registered data-free scorer needs no dataloader; its default rounds come from its registration."""
    from lightning_pai import register_scorer
    from lightning_pai.core.scorers import _SCORERS

    calls = []

    @register_scorer("ones_twice", needs="nothing", iterations=2, overwrite=True)
    def ones_twice(ctx):
        calls.append(ctx.batches)
        gen = torch.Generator().manual_seed(len(calls))
        return {n: torch.rand(p.shape, generator=gen) for n, p in ctx.params.items()}

    try:
        cb = PruneAtInit("ones_twice", 0.5, verbose=False)
        assert cb.iterations == 2
        trainer = make_trainer(max_steps=1, callbacks=[cb])
        trainer.fit(make_module(seed=0), make_dataloader())
        assert len(calls) == 2 and all(len(b) == 0 for b in calls)  # no batch was drawn for it
        with pytest.raises(ValueError, match="`needs` must be one of 'nothing', 'shape', 'data'"):
            register_scorer("bad", ones_twice, needs="labels")
    finally:
        _SCORERS.unregister("ones_twice")
