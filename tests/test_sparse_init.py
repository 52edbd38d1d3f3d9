"""Initialisation for a pruned network: sparse fan-in (Evci et al. 2022) and approximate isometry (Lee et al. 2020)."""

import pytest
import torch
from helpers import make_dataloader, make_module, make_trainer
from torch import nn

from lightning_pai import PruneAtInit
from lightning_pai.core.pruning import sparse_init_
from lightning_pai.core.targets import select_targets, target_layouts


def pruned_mlp(density: float = 0.1):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 200))
    params = select_targets(net)
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=gen) < density for n, p in params.items()}
    return net, params, masks, target_layouts(net, list(params))


def test_sparse_fan_in_variance_follows_each_units_kept_inputs():
    net, params, masks, layouts = pruned_mlp()
    sparse_init_(params, masks, layouts, "sparse_fan_in", seed=3)
    for n, p in params.items():
        w, m = p.detach(), masks[n]
        assert not w[~m].any()  # pruned weights are zero
        fan = m.sum(1).clamp(min=1).float()
        # per row: E[w^2] over kept weights ≈ 2 / k_i; pooled over rows, (w^2 k_i / 2) averages 1
        normalised = (w**2 * fan.unsqueeze(1) / 2)[m]
        assert normalised.mean() == pytest.approx(1.0, abs=0.1)
    # the dense network's Kaiming std would be sqrt(2 / 400): 3x smaller than sqrt(2 / 40) at 10 %
    first = params["0.weight"].detach()[masks["0.weight"]]
    assert first.std() == pytest.approx((2 / (0.1 * 400)) ** 0.5, rel=0.1)


def test_isometry_makes_the_masked_matrices_orthonormal():
    net, params, masks, layouts = pruned_mlp(0.5)
    before = {n: torch.dist(p.detach().t() @ p.detach(), torch.eye(p.shape[1])) for n, p in params.items()}
    sparse_init_(params, masks, layouts, "isometry", seed=0, steps=400)
    for n, p in params.items():
        w, m = p.detach(), masks[n]
        assert not w[~m].any()
        rows, cols = w.shape
        gram = w.t() @ w if rows >= cols else w @ w.t()
        error = torch.dist(gram, torch.eye(min(rows, cols)))
        assert error < 0.25 * before[n]  # much closer to isometry than the sparse Kaiming draw
    with pytest.raises(ValueError, match="`weight_init` must be one of 'sparse_fan_in', 'isometry'"):
        sparse_init_(params, masks, layouts, "orthogonal")


def test_prune_at_init_applies_it_on_the_decided_masks():
    cb = PruneAtInit("magnitude", 0.8, weight_init="sparse_fan_in", verbose=False)
    module = make_module(seed=0)
    make_trainer(callbacks=[cb], max_steps=1).fit(module, make_dataloader())
    reference = make_module(seed=0)  # the same init, the same magnitude masks, then the same seeded draw
    layouts = target_layouts(reference, cb.masks.names)
    params = {n: reference.get_parameter(n) for n in cb.masks.names}
    sparse_init_(params, dict(cb.masks.items()), layouts, "sparse_fan_in", seed=cb.seed)
    for n in cb.masks.names:  # one SGD step later the kept weights moved, the pruned ones are still zero
        assert not module.get_parameter(n)[~cb.masks[n]].any()
        assert torch.allclose(module.get_parameter(n), params[n], atol=0.2)
    with pytest.raises(ValueError, match="`weight_init` must be one of 'sparse_fan_in', 'isometry' or None"):
        PruneAtInit("magnitude", 0.8, weight_init="kaiming")


@pytest.mark.parametrize("name", ["RigL", "SET", "SNFS", "GraNet", "DSR", "DeepR"])
def test_dst_callbacks_take_it_for_their_initial_masks(name):
    import lightning_pai

    cb = getattr(lightning_pai, name).example(0.8, weight_init="isometry")
    captured, masks = {}, {}

    class Probe(lightning_pai.callbacks._compat.CallbackBase):  # the weights and masks the first step starts from
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not captured:
                captured.update({n: pl_module.get_parameter(n).detach().clone() for n in cb.masks.names})
                masks.update(cb.masks.state_dict())

    module = make_module(seed=0)
    make_trainer(callbacks=[cb, Probe()], max_steps=4).fit(module, make_dataloader())
    layouts = target_layouts(module, cb.masks.names)
    start = {n: torch.nn.Parameter(torch.empty_like(w)) for n, w in captured.items()}
    sparse_init_(start, masks, layouts, "sparse_fan_in", seed=cb.seed)  # the draw the isometry starts from
    for n, w in captured.items():
        assert not w[~masks[n]].any()
        assert isometry_error(w, layouts[n]) <= isometry_error(start[n].detach(), layouts[n]) + 1e-5


def isometry_error(w, layout):
    rows = layout.as_matrix(w)
    gram = rows.t() @ rows if rows.shape[0] >= rows.shape[1] else rows @ rows.t()
    return float(torch.dist(gram, torch.eye(min(rows.shape))))
