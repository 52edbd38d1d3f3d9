"""Numerical checks of the PaI scorers (SNIP, GraSP, SynFlow) and of the pruning driver, in plain PyTorch.

Every expected value is computed independently in the test (closed forms, ``torch.func`` forward-over-reverse
Hessian-vector products, hand-worked examples); nothing is compared against the implementation itself.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn import functional as F

from lightning_pai.core import (
    ABLATIONS,
    ScoringContext,
    get_scorer,
    list_scorers,
    prune,
    register_scorer,
    round_sparsities,
    select_targets,
    topk_mask,
)
from lightning_pai.core.select import raise_to_floors

pytestmark = pytest.mark.usefixtures("one_thread")


def _clone_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _assert_grads_none(module: nn.Module) -> None:
    for n, p in module.named_parameters():
        assert p.grad is None, f"{n}.grad was written; scorers must use torch.autograd.grad"


def _kept(masks) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in masks.items()}


# ================================================================== SNIP
# y = W2 W1 x (two bias-free linear layers), L = mean((y_hat - y)^2) over the n x o entries.
W1 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]])  # h x d = 2 x 3
W2 = torch.tensor([[2.0, -1.0], [0.5, 1.0]])  # o x h = 2 x 2
BATCH1 = (torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
BATCH2 = (torch.tensor([[0.0, 1.0, 1.0], [2.0, 0.0, -1.0]]), torch.tensor([[-1.0, 1.0], [1.0, 0.0]]))


def _linear2() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(W1)
        net[1].weight.copy_(W2)
    return net


def _mse_loss(module, batch):
    x, y = batch
    return F.mse_loss(module(x), y)


def _hand_grads(x, y):
    """Closed form for L = sum(E^2) / (n o), E = X W1^T W2^T - Y (rows are samples).

    With H = X W1^T and c = 2 / (n o): dL/dY_hat = c E, so dL/dW2 = c E^T H and dL/dW1 = c W2^T E^T X.
    """
    h = x @ W1.T
    e = h @ W2.T - y
    c = 2.0 / e.numel()
    return c * W2.T @ e.T @ x, c * e.T @ h


def test_snip_matches_closed_form_single_batch():
    # Worked by hand for BATCH1: H = [[2, -2], [-3, 1]], Y_hat = [[6, -1], [-7, -0.5]],
    # E = [[5, -1], [-7, -2.5]], c = 2/4, dL/dW2 = c E^T H = [[15.5, -8.5], [2.75, -0.25]] and
    # dL/dW1 = c W2^T E^T X = [[12.375, -7.625, 9.5], [-5.25, 2.25, -6]]; score = |w * g|.
    expected_w1 = torch.tensor([[12.375, 15.25, 4.75], [0.0, 2.25, 6.0]])
    expected_w2 = torch.tensor([[31.0, 8.5], [1.375, 0.25]])
    g1, g2 = _hand_grads(*BATCH1)
    torch.testing.assert_close((W1 * g1).abs(), expected_w1, rtol=0, atol=0)
    torch.testing.assert_close((W2 * g2).abs(), expected_w2, rtol=0, atol=0)

    net = _linear2()
    ctx = ScoringContext(params=select_targets(net), module=net, batches=[BATCH1], loss_fn=_mse_loss)
    scores = get_scorer("snip")(ctx)
    assert set(scores) == {"0.weight", "1.weight"}
    torch.testing.assert_close(scores["0.weight"], expected_w1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores["1.weight"], expected_w2, rtol=1e-6, atol=1e-6)
    _assert_grads_none(net)


def test_snip_sums_gradients_over_batches_before_abs():
    ga, gb = _hand_grads(*BATCH1), _hand_grads(*BATCH2)
    expected = {
        "0.weight": (W1 * (ga[0] + gb[0])).abs(),
        "1.weight": (W2 * (ga[1] + gb[1])).abs(),
    }
    # The batches' gradients disagree in sign somewhere, so summing |w g_b| would give different numbers.
    per_batch_abs = (W1 * ga[0]).abs() + (W1 * gb[0]).abs()
    assert not torch.allclose(per_batch_abs, expected["0.weight"])

    net = _linear2()
    before = _clone_params(net)
    ctx = ScoringContext(params=select_targets(net), module=net, batches=[BATCH1, BATCH2], loss_fn=_mse_loss)
    scores = get_scorer("snip")(ctx)
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-6, atol=1e-6)
    _assert_grads_none(net)
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n])

    # Through the driver as well: still no .grad, and the masks keep the top SNIP scores.
    ctx = ScoringContext(params=select_targets(net), module=net, batches=[BATCH1, BATCH2], loss_fn=_mse_loss)
    masks = prune(ctx, "snip", sparsity=0.5)
    _assert_grads_none(net)
    flat = torch.cat([expected[n].reshape(-1) for n in expected])
    kept = torch.cat([masks[n].reshape(-1) for n in expected])
    assert int(kept.sum()) == 5  # round(0.5 * 10)
    assert flat[kept].min() > flat[~kept].max()


# ================================================================= GraSP
def _tanh_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():  # larger weights: tanh away from its linear regime, more curvature
        for p in net.parameters():
            p.mul_(3.0)
    return net


def _grasp_batches():
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen))
        for _ in range(2)
    ]


def _grasp_reference(net, batches, temperature):
    """theta * (H g), g = grad of sum_b CE(logits_b / T, y_b) w.r.t. the target weights (biases held fixed).

    As in the official GraSP code, g and H are taken over the pruned weights only. H g is computed here by
    forward-over-reverse differentiation (``jvp`` of ``grad``), independently of the scorer's double backward.
    Returns (scores, G) with G(theta) = ||g(theta)||^2.
    """
    names = list(select_targets(net))
    theta = {n: p.detach().clone() for n, p in net.named_parameters() if n in names}

    def loss(th):
        return sum(F.cross_entropy(functional_call(net, th, (x,)) / temperature, y) for x, y in batches)

    g = grad(loss)(theta)
    _, hg = jvp(grad(loss), (theta,), (g,))

    def grad_norm_sq(th):
        gt = grad(loss)(th)
        return sum((v * v).sum() for v in gt.values())

    return {n: theta[n] * hg[n] for n in names}, grad_norm_sq, theta


@pytest.mark.parametrize("temperature", [None, 1.0, 7.5])
def test_grasp_equals_theta_times_hessian_gradient_product(temperature):
    net, batches = _tanh_mlp(), _grasp_batches()
    before = _clone_params(net)
    extras = {} if temperature is None else {"temperature": temperature}
    ctx = ScoringContext(params=select_targets(net), module=net, batches=batches, extras=extras)
    scores = get_scorer("grasp")(ctx)
    ref, _, _ = _grasp_reference(net, batches, 200.0 if temperature is None else temperature)
    for n, r in ref.items():
        assert scores[n].shape == r.shape
        scale = float(r.detach().abs().max())
        assert scale > 0
        torch.testing.assert_close(scores[n].double(), r, rtol=1e-5, atol=1e-6 * scale)
    _assert_grads_none(net)
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n])
    if temperature is not None:  # the temperature is really used: T = 200 gives other numbers
        ref200, _, _ = _grasp_reference(net, batches, 200.0)
        assert not torch.allclose(ref200["0.weight"], ref["0.weight"], rtol=1e-2)


def test_grasp_sign_convention_keeps_weights_whose_removal_hurts_gradient_flow_most():
    """Sign check of the higher-is-kept GraSP score.

    Derivation. Let G(theta) = g^T g with g = grad L. Then grad G = 2 H g. Removing weight i is the step
    delta = -theta_i e_i, so to first order
        Delta G_i = G(theta - theta_i e_i) - G(theta) ~= 2 delta^T H g = -2 theta_i (H g)_i = -2 s_i,
    where s = theta * H g is the scorer's output. Wang et al. 2020 (eq. 8) score S(-theta) = -theta * H g = -s
    and remove the weights with the *highest* S, i.e. the lowest s: those whose removal decreases the
    gradient norm least (Delta G_i = 2 S_i is largest, possibly positive). So keeping the highest s is the
    paper's rule, and the weight kept first (argmax s) is the one whose removal *reduces* ||g||^2 the most,
    while the weight pruned first (argmin s) is the one whose removal reduces it least / increases it.
    """
    net, batches = _tanh_mlp(), _grasp_batches()
    temperature = 1.0
    ctx = ScoringContext(params=select_targets(net), module=net, batches=batches, extras={"temperature": temperature})
    scores = get_scorer("grasp")(ctx)
    _, grad_norm_sq, theta = _grasp_reference(net, batches, temperature)

    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).double() for n in names])
    assert flat.max() > 0 > flat.min()  # signed score: both signs present, so the sign convention matters
    sizes = [scores[n].numel() for n in names]

    def locate(k):
        for n, size in zip(names, sizes):
            if k < size:
                return n, k
            k -= size
        raise AssertionError

    g0 = grad_norm_sq(theta)

    def delta_g(name, idx, fraction):
        """G after scaling weight (name, idx) by (1 - fraction), minus G before."""
        th = {n: v.clone() for n, v in theta.items()}
        th[name].view(-1)[idx] *= 1.0 - fraction
        return float((grad_norm_sq(th) - g0).detach())

    top, bottom = locate(int(flat.argmax())), locate(int(flat.argmin()))
    eps = 1e-6
    for (name, idx), s in ((top, flat.max()), (bottom, flat.min())):
        # First-order estimate verified by a finite difference: Delta G ~= -2 * eps * s_i.
        assert delta_g(name, idx, eps) / eps == pytest.approx(-2.0 * float(s), rel=1e-3)
    assert delta_g(*top, eps) < 0 < delta_g(*bottom, eps)
    # Full removal on this net agrees with the first-order ranking.
    assert delta_g(*top, 1.0) < delta_g(*bottom, 1.0)

    # The driver keeps the highest s: the top weight survives, the bottom one is pruned first.
    ctx = ScoringContext(params=select_targets(net), module=net, batches=batches, extras={"temperature": temperature})
    masks = prune(ctx, "grasp", sparsity=0.5)
    assert bool(masks[top[0]].view(-1)[top[1]])
    assert not bool(masks[bottom[0]].view(-1)[bottom[1]])
    kept = torch.cat([masks[n].reshape(-1) for n in names])
    assert flat[kept].min() > flat[~kept].max()


# =============================================================== SynFlow
def _synflow_net() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Dropout(p=0.5), nn.Linear(4, 2, bias=False))


def test_synflow_matches_closed_form_and_uses_eval_mode():
    net = _synflow_net()
    net.train()
    a1, a2 = net[0].weight.detach().double().abs(), net[3].weight.detach().double().abs()
    assert (net[0].weight < 0).any() and (net[3].weight < 0).any()  # the |.| matters
    # R = 1^T |W2| relu(|W1| 1) = sum_{k,i,j} |W2[k,i]| |W1[i,j]|, so
    # dR/dW1[i,j] = sum_k |W2[k,i]| and dR/dW2[k,i] = sum_j |W1[i,j]| (at |theta|).
    expected = {
        "0.weight": a1 * a2.sum(0)[:, None],
        "3.weight": a2 * a1.sum(1)[None, :],
    }
    before = _clone_params(net)
    scorer = get_scorer("synflow")
    first = scorer(ScoringContext(params=select_targets(net), module=net, input_shape=(3,)))
    net.train()  # a stochastic dropout would make a second call differ
    second = scorer(ScoringContext(params=select_targets(net), module=net, batches=[(torch.zeros(7, 3), None)]))
    for n, e in expected.items():
        torch.testing.assert_close(first[n].double(), e, rtol=1e-12, atol=0)
        assert torch.equal(first[n], second[n])
    for n, p in net.named_parameters():  # the |theta| substitution is undone
        assert torch.equal(p, before[n]) and p.dtype == torch.float32
    _assert_grads_none(net)


def test_synflow_deep_mlp_finite_although_float32_overflows():
    # nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so E|w| = 1/(2 sqrt(fan_in)) and each
    # layer multiplies the all-ones flow by about fan_in * E|w| = sqrt(width)/2 = 8 at width 256:
    # R ~ 8^50 ~ 1e45 > float32 max (3.4e38). (At width 64 the factor is 4 and 4^50 ~ 1e30 would not overflow.)
    depth, width = 50, 256
    torch.manual_seed(3)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=False), nn.ReLU()]
    net = nn.Sequential(*layers)

    with torch.no_grad():
        x = torch.ones(1, width)
        for m in net:
            if isinstance(m, nn.Linear):
                x = x @ m.weight.abs().T
        r32 = x.sum()
        x = torch.ones(1, width, dtype=torch.float64)
        for m in net:
            if isinstance(m, nn.Linear):
                x = x @ m.weight.double().abs().T
        r64 = float(x.sum())
    assert torch.isinf(r32), "choose a deeper/wider net: float32 R must overflow for this test"
    assert math.isfinite(r64)

    scores = get_scorer("synflow")(ScoringContext(params=select_targets(net), module=net, input_shape=(width,)))
    assert len(scores) == depth
    for n, s in scores.items():
        assert torch.isfinite(s).all(), n
        # Conservation (Tanaka et al. 2020): R is linear in each bias-free layer's weights with theta >= 0,
        # so sum(theta * dR/dtheta) over one layer equals R.
        assert float(s.detach().double().sum()) == pytest.approx(r64, rel=1e-9), n


def test_synflow_float64_overflow_raises():
    net = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(12)])
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1e30)  # R ~ (4e30)^12 > float64 max
    with pytest.raises(FloatingPointError, match="overflowed"):
        get_scorer("synflow")(ScoringContext(params=select_targets(net), module=net, input_shape=(4,)))


# ========================================================= state restored
BUILTIN_SCORERS = {"magnitude", "random", "snip", "grasp", "synflow"}


def test_builtin_scorers_registered():
    assert BUILTIN_SCORERS <= set(list_scorers())


def _state_net():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()
    with torch.no_grad():  # non-default running statistics
        for _ in range(3):
            net(torch.randn(10, 6) + 1.0)
    net[1].weight.requires_grad_(False)  # a frozen norm parameter
    net[4].bias.requires_grad_(False)  # a frozen bias
    net[0].weight.requires_grad_(False)  # a frozen *target*: the driver unfreezes it while scoring
    net[3].eval()  # mixed train/eval flags
    return net


@pytest.mark.parametrize("method", list_scorers())
@pytest.mark.parametrize("iterations", [1, 3])
def test_prune_restores_model_state(method, iterations):
    net = _state_net()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    assert int(state["1.num_batches_tracked"]) == 3
    flags = [(n, m.training) for n, m in net.named_modules()]
    requires = [(n, p.requires_grad) for n, p in net.named_parameters()]
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(2)]
    ctx = ScoringContext(params=select_targets(net), module=net, batches=batches, seed=1)
    masks = prune(ctx, method, sparsity=0.75, iterations=iterations)
    assert sum(_kept(masks).values()) == round(0.25 * (48 + 24))

    after = net.state_dict()
    assert set(after) == set(state)
    for k, v in state.items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k], v), f"{method}: {k} changed"
    assert [(n, m.training) for n, m in net.named_modules()] == flags
    assert [(n, p.requires_grad) for n, p in net.named_parameters()] == requires
    _assert_grads_none(net)


@pytest.mark.parametrize("method", list_scorers())
def test_scores_are_plain_detached_tensors(method):
    """Scores are data, not graph nodes: a score with a ``grad_fn`` keeps the scoring graph (and its saved
    model-sized float64 tensors, for SynFlow) alive for as long as the scores live."""
    net = _state_net()
    for p in net.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))]
    params = select_targets(net)
    scores = get_scorer(method)(ScoringContext(params=params, module=net, batches=batches))
    assert set(scores) == set(params)
    for n, s in scores.items():
        assert s.shape == params[n].shape and s.is_floating_point(), n
        assert not s.requires_grad and s.grad_fn is None, f"{method}: scores of {n} are attached to a graph"


# ============================================================= iterative
def test_round_sparsities_values():
    expo = round_sparsities(0.99, 4, "exponential")
    assert expo == pytest.approx([1 - 0.01 ** (r / 4) for r in range(1, 5)], rel=1e-12, abs=1e-12)
    assert expo[-1] == pytest.approx(0.99, abs=1e-12)
    # Each exponential round removes the same fraction of what is left: density ratio 0.01 ** (1/4).
    dens = [1.0] + [1 - s for s in expo]
    assert [dens[r + 1] / dens[r] for r in range(4)] == pytest.approx([0.01**0.25] * 4, rel=1e-9)
    assert round_sparsities(0.99, 4, "linear") == pytest.approx([0.2475, 0.495, 0.7425, 0.99], rel=1e-12)
    assert round_sparsities(0.5, 1) == [0.5]


def _mlp(seed=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))  # targets: 600 + 300 = 900


@pytest.mark.parametrize("score_kind", ["magnitude", "fresh_random"])
def test_iterative_prune_masks_shrink_and_pruned_weights_are_zero(score_kind):
    net = _mlp()
    original = _clone_params(net)
    x = torch.randn(4, 20)
    records = []

    def recorder(ctx):
        masks = None if ctx.masks is None else {n: m.clone() for n, m in ctx.masks.items()}
        if masks is not None:
            for n, p in ctx.params.items():
                assert torch.all(p[~masks[n]] == 0), f"round {len(records)}: pruned weights of {n} not zeroed"
                assert torch.equal(p[masks[n]], original[n][masks[n]]), "kept weights must be untouched"
            # The forward really runs with the pruned weights removed.
            ref = F.linear(
                F.relu(F.linear(x, original["0.weight"] * masks["0.weight"], original["0.bias"])),
                original["2.weight"] * masks["2.weight"],
                original["2.bias"],
            )
            torch.testing.assert_close(ctx.module(x), ref)
        records.append(masks)
        if score_kind == "magnitude":
            return {n: p.detach().abs() for n, p in ctx.params.items()}
        # New random scores every round: nesting then relies on the driver, not on zeroed weights scoring low.
        gen = torch.Generator().manual_seed(100 + len(records))
        return {n: torch.rand(p.shape, generator=gen) for n, p in ctx.params.items()}

    register_scorer("test_record", recorder, overwrite=True)
    ctx = ScoringContext(params=select_targets(net), module=net)
    final = prune(ctx, "test_record", sparsity=0.99, iterations=5)

    n_total = 900
    assert sum(_kept(final).values()) == round(0.01 * n_total) == 9
    assert len(records) == 5 and records[0] is None
    sequence = records[1:] + [final]
    expected_kept = [round((1 - s) * n_total) for s in round_sparsities(0.99, 5)]
    assert expected_kept == [round(0.01 ** (r / 5) * n_total) for r in range(1, 6)] == [358, 143, 57, 23, 9]
    assert [sum(_kept(m).values()) for m in sequence] == expected_kept
    for prev, nxt in zip(sequence, sequence[1:]):
        for n in prev:
            assert not (nxt[n] & ~prev[n]).any(), "a pruned weight came back"
    # The caller applies the masks: the weights themselves are exactly the originals.
    for n, p in net.named_parameters():
        assert torch.equal(p, original[n])
    _assert_grads_none(net)


# ============================================================= ablations
def _scaled_net(seed=7):
    """Three layers with different weight scales, so a global threshold gives uneven per-layer counts."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        net[2].weight.mul_(0.7)
        net[4].weight.mul_(1.5)
    return net


def _run(net, sparsity=0.7, seed=0, **kwargs):
    return prune(ScoringContext(params=select_targets(net), module=net, seed=seed), "magnitude", sparsity, **kwargs)


def test_shuffle_keeps_layer_counts_moves_positions_and_is_seeded():
    net = _scaled_net()
    normal = _run(net)
    shuffled = _run(net, seed=3, ablation="shuffle")
    again = _run(net, seed=3, ablation="shuffle")
    other = _run(net, seed=4, ablation="shuffle")
    assert _kept(shuffled) == _kept(normal)
    for n in normal:
        assert not torch.equal(shuffled[n], normal[n]), n
        assert torch.equal(shuffled[n], again[n]), n
    assert any(not torch.equal(other[n], shuffled[n]) for n in normal)


def test_invert_keeps_per_layer_counts_but_smallest_weights():
    net = _scaled_net()
    normal = _run(net, distribution="global")
    inverted = _run(net, distribution="global", ablation="invert")
    counts = _kept(normal)
    assert len(set(counts.values())) == 3  # uneven: the per-layer counts come from the global threshold
    assert _kept(inverted) == counts
    for n, p in select_targets(net).items():
        a = p.detach().abs()
        assert torch.equal(inverted[n], topk_mask(-a, counts[n])), n
        assert a[inverted[n]].max() < a[~inverted[n]].min()
    # Not the same as a global "keep the smallest": that would give other per-layer counts.
    flat = torch.cat([p.detach().abs().reshape(-1) for p in select_targets(net).values()])
    global_low = topk_mask(-flat, sum(counts.values()))
    sizes = [p.numel() for p in select_targets(net).values()]
    assert [int(c.sum()) for c in global_low.split(sizes)] != list(counts.values())


def test_reinit_redraws_targets_seeded_keeps_biases_and_masks():
    base = _scaled_net()
    original = _clone_params(base)
    normal = _run(copy.deepcopy(base))
    rng_before = torch.get_rng_state()

    net_a, net_b, net_c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    masks_a = _run(net_a, seed=11, ablation="reinit")
    masks_b = _run(net_b, seed=11, ablation="reinit")
    _run(net_c, seed=12, ablation="reinit")
    assert torch.equal(torch.get_rng_state(), rng_before), "reinit must not consume the global RNG"

    for n in normal:
        assert torch.equal(masks_a[n], normal[n]), "masks come from the original weights"
        assert torch.equal(masks_b[n], normal[n])
    params_a, params_b, params_c = (dict(m.named_parameters()) for m in (net_a, net_b, net_c))
    for n, orig in original.items():
        if n.endswith("bias"):
            assert torch.equal(params_a[n], orig), f"{n} must not change"
            continue
        w = params_a[n].detach()
        assert (w != orig).float().mean() > 0.95, f"{n} not re-drawn"  # a permutation keeps ~1 fixed point
        assert torch.equal(w, params_b[n]), "same seed, same weights"
        assert not torch.equal(w, params_c[n]), "other seed, other weights"
        # the re-draw is a permutation of the layer's own initial values: exactly the original (scaled)
        # distribution, whereas `reset_parameters()` would have drawn U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert torch.equal(w.detach().reshape(-1).sort().values, orig.reshape(-1).sort().values)
        assert float(w.std()) == pytest.approx(float(orig.std()), rel=1e-6)


def test_reinit_keeps_a_torchvision_resnet_convs_init_scale():
    """torchvision inits ResNet convs with kaiming_normal_(fan_out); `reset_parameters()` gives a 2.5x smaller std."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    name = "layer1.0.conv1.weight"
    original = net.get_parameter(name).detach().clone()
    ctx = ScoringContext(params={name: net.get_parameter(name)}, module=net, seed=3)
    prune(ctx, "magnitude", 0.5, "global", ablation="reinit")
    new = net.get_parameter(name).detach()
    fan_out_std = math.sqrt(2.0 / (64 * 3 * 3))  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
    assert float(original.std()) == pytest.approx(fan_out_std, rel=0.05)
    assert float(new.std()) == pytest.approx(float(original.std()), rel=1e-6)  # 0.059, not reset_parameters' 0.024
    assert (new != original).float().mean() > 0.99
    reset = torch.nn.Conv2d(64, 64, 3, bias=False)  # what the previous implementation drew from
    assert float(original.std()) / float(reset.weight.std()) > 2.2


def test_bad_ablation_name():
    net = _scaled_net()
    with pytest.raises(ValueError, match="`ablation`") as info:
        _run(net, ablation="permute")
    for name in ABLATIONS:
        assert repr(name) in str(info.value)
    assert set(ABLATIONS) == {"shuffle", "reinit", "invert"}


# =========================================================== min_density
def _collapsing_net():
    """Targets of 5000, 2500 and 500 weights; the middle layer's weights are tiny."""
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(50, 100, bias=False), nn.Linear(100, 25, bias=False), nn.Linear(25, 20, bias=False))
    with torch.no_grad():
        net[1].weight.mul_(1e-3)
    return net


def test_min_density_prevents_layer_collapse():
    net = _collapsing_net()
    sizes = {n: p.numel() for n, p in select_targets(net).items()}
    total = round(0.01 * sum(sizes.values()))
    assert total == 80

    collapsed = _run(net, sparsity=0.99)
    assert sum(_kept(collapsed).values()) == total
    assert _kept(collapsed)["1.weight"] == 0  # global magnitude removes the tiny layer entirely

    for min_density in (0.01, 0.005):
        masks = _run(net, sparsity=0.99, min_density=min_density)
        kept = _kept(masks)
        floors = {n: math.ceil(min_density * s) for n, s in sizes.items()}
        assert all(kept[n] >= floors[n] for n in sizes), (min_density, kept, floors)
        assert sum(kept.values()) == total
        # The donors give up their lowest-scored weights; the rescued layer keeps its largest ones.
        assert kept == raise_to_floors(_kept(collapsed), floors)
        for n, p in select_targets(net).items():
            assert torch.equal(masks[n], topk_mask(p.detach().abs(), kept[n])), n
    # min_density = overall density with sizes that are multiples of 100: every layer exactly at its floor.
    assert _kept(_run(net, sparsity=0.99, min_density=0.01)) == {"0.weight": 50, "1.weight": 25, "2.weight": 5}
    assert _kept(_run(net, sparsity=0.99, min_density=0.005))["1.weight"] == 13  # ceil(12.5)


def test_raise_to_floors_hand_example():
    # total 12; lifting b to 3 costs 3 weights, taken from the margins above the floors (a: 9, c: 1) in
    # proportion: a -> 10 - 2.7 = 7.3, c -> 2 - 0.3 = 1.7; largest remainder rounding: a 7, c 2.
    assert raise_to_floors({"a": 10, "b": 0, "c": 2}, {"a": 1, "b": 3, "c": 1}) == {"a": 7, "b": 3, "c": 2}
    assert raise_to_floors({"a": 5, "b": 4}, {"a": 2, "b": 4}) == {"a": 5, "b": 4}  # already at the floors
    with pytest.raises(ValueError, match="min_density"):
        raise_to_floors({"a": 2, "b": 1}, {"a": 2, "b": 2})


def test_min_density_above_overall_density_raises():
    net = _collapsing_net()
    with pytest.raises(ValueError, match="`min_density`"):
        _run(net, sparsity=0.99, min_density=0.02)
    # Equal to the overall density but infeasible after rounding up per layer: still a clear error.
    net = nn.Sequential(nn.Linear(15, 10, bias=False), nn.Linear(10, 15, bias=False))  # 150 + 150, keep 3
    with pytest.raises(ValueError, match="min_density"):
        _run(net, sparsity=0.99, min_density=0.01)


def test_force_scores_every_weight_and_revives_pruned_ones():
    """FORCE: each round scores |θ ⊙ ∂L/∂(c ⊙ θ)| with θ the initial weights, pruned ones included, so a weight
    pruned in round r can be kept again in a later round; the forward runs on the pruned network."""
    from lightning_pai.core.saliency import force

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    records = []

    def probe(ctx):
        records.append(None if ctx.masks is None else {n: m.clone() for n, m in ctx.masks.items()})
        scores = force(ctx)
        if ctx.masks is not None:  # the gradient is the pruned network's, the scores use the initial weights
            for n, p in ctx.params.items():
                assert torch.all(p[~ctx.masks[n]] == 0)
                assert torch.equal(ctx.extras["initial_weights"][n], original[n])
        return scores

    register_scorer("test_force_probe", probe, overwrite=True, revives=True)
    loss = lambda module, batch: F.cross_entropy(module(batch[0]), batch[1])  # noqa: E731
    ctx = ScoringContext(params=select_targets(net), module=net, batches=[(x, y)], loss_fn=loss)
    final = prune(ctx, "test_force_probe", sparsity=0.95, iterations=6)
    sequence = [m for m in records[1:]] + [final]
    revived = sum(
        int((later[n] & ~earlier[n]).sum())
        for i, earlier in enumerate(sequence)
        for later in sequence[i + 1 :]
        for n in earlier
    )
    assert revived > 0  # a weight pruned in one round is kept in a later one
    assert sum(int(m.sum()) for m in final.values()) == round(0.05 * (8 * 32 + 32 * 4))
    assert all(torch.equal(p, original[n]) for n, p in net.named_parameters())  # the model is left as it was
    # Iter-SNIP on the same problem never revives
    snip_records = []

    def snip_probe(ctx):
        snip_records.append(None if ctx.masks is None else {n: m.clone() for n, m in ctx.masks.items()})
        return get_scorer("snip")(ctx)

    register_scorer("test_snip_probe", snip_probe, overwrite=True)
    prune(ScoringContext(params=select_targets(net), module=net, batches=[(x, y)], loss_fn=loss), "test_snip_probe",
          sparsity=0.95, iterations=6)  # fmt: skip
    seq = snip_records[1:]
    assert all(not (b[n] & ~a[n]).any() for a, b in zip(seq, seq[1:]) for n in a)
