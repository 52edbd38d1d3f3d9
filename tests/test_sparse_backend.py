"""``backend="sparse"``: truly sparse linear layers train exactly as the masked-dense path does.

The ops are checked against a dense masked matmul (gradcheck in float64, opcheck); SET, RigL and PruneAtInit with
SGD (momentum, weight decay) and AdamW are run 100 steps with each backend on the same batches and must end with the
same masks, weights and optimizer state; checkpoints load across backends and into plain dense models; a resumed run
continues the uninterrupted one; 2-process DDP agrees with the masked path; bad input fails before training.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import run_script
from sparse_ddp_script import MLP, loader
from torch import nn
from torch.nn import functional as F

from lightning_pai import SET, DynamicSparseTraining, PruneAtInit, RigL, Sparsifier
from lightning_pai.core.sparse_ops import sparse_linear
from lightning_pai.core.sparse_train import SparseMaskSet, SparseTrainLinear, to_dense_training, to_sparse_training

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 100
METHODS = {
    "SET": lambda backend: SET(0.8, update_on="step", delta_t=10, verbose=False, backend=backend),
    "RigL": lambda backend: RigL(0.8, delta_t=10, t_end=1.0, verbose=False, backend=backend),
    "PruneAtInit": lambda backend: PruneAtInit("magnitude", 0.8, verbose=False, backend=backend),
}
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 4))


def _batches(n: int = STEPS, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 20, generator=gen), torch.randint(0, 4, (size,), generator=gen)) for _ in range(n)]


def _run(method: str, backend: str, optimizer: str = "sgd", stop_after: int | None = None, state=None):
    """A plain loop of :data:`STEPS` steps; with ``stop_after``, the checkpoint at that step instead of the end."""
    model = _model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    batches = _batches()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    cb = METHODS[method](backend)
    sparsifier = Sparsifier(
        cb, model, opt, data=batches, total_steps=STEPS, state=None if state is None else state["sparsifier"]
    )
    if state is not None:
        opt.load_state_dict(state["optimizer"])  # as a resumed loop does once the method is set up
    for x, y in batches[sparsifier.global_step :]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sparsifier.step()
        if sparsifier.global_step == stop_after:
            return {"model": model.state_dict(), "optimizer": opt.state_dict(), "sparsifier": sparsifier.state_dict()}
    sparsifier.close()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "sparsifier": sparsifier.state_dict()}


def _assert_same_run(a: dict, b: dict, atol: float = 2e-5) -> None:
    """Same masks (exactly), weights and optimizer state (within float tolerance), same topology updates."""
    masks_a, masks_b = a["sparsifier"]["session"]["masks"], b["sparsifier"]["session"]["masks"]
    assert masks_a.keys() == masks_b.keys()
    for n in masks_a:
        assert torch.equal(masks_a[n], masks_b[n]), n
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=atol, rtol=0, msg=k)
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        for key, value in state_a[i].items():
            assert tuple(torch.as_tensor(value).shape) == tuple(torch.as_tensor(state_b[i][key]).shape), (i, key)
            torch.testing.assert_close(torch.as_tensor(value), torch.as_tensor(state_b[i][key]), atol=atol, rtol=0)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    updater_a, updater_b = a["sparsifier"]["session"].get("updater"), b["sparsifier"]["session"].get("updater")
    assert (updater_a or {}).get("updates") == (updater_b or {}).get("updates")


# ----------------------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 11), (2, 3, 11)])
def test_op_matches_dense_masked_matmul_and_gradchecks(bias, shape):
    """Forward and every gradient equal the dense masked matmul's; float64 gradcheck of the eager path and the op."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(7, 11, generator=gen) < 0.35
    mask[2] = False  # an empty row
    layer = to_sparse_training(nn.Linear(11, 7, bias=bias).double(), mask)
    b = layer._buffers
    structure = (b["crow_indices"], b["col_indices"], b["t_crow"], b["t_col"], b["t_perm"])
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    bias_t = layer.bias.detach().clone().requires_grad_() if bias else None
    dense = torch.zeros(7, 11, dtype=torch.float64).masked_scatter(mask, values.detach()).requires_grad_()
    y = sparse_linear(x, values, *structure, bias_t, 11)
    ref = F.linear(x, dense * mask, bias_t)
    torch.testing.assert_close(y, ref)
    grad = torch.randn_like(y)
    inputs = (x, values) + ((bias_t,) if bias else ())
    got = torch.autograd.grad(y, inputs, grad)
    want = torch.autograd.grad(ref, (x, dense) + ((bias_t,) if bias else ()), grad)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1][mask])  # dW at the kept positions only (SDDMM), in CSR order
    if bias:
        torch.testing.assert_close(got[2], want[2])
    op = torch.ops.lightning_pai.sparse_linear
    for fn in (sparse_linear, op):
        assert torch.autograd.gradcheck(lambda x, v, bb, fn=fn: fn(x, v, *structure, bb, 11), (x, values, bias_t))
    torch.library.opcheck(op.default, (x, values, *structure, bias_t, 11))


@pytest.mark.parametrize("n", [1, 5, 16, 17, 64, 131])
@pytest.mark.parametrize("batch_major", [True, False])
def test_compiled_cpu_kernels_equal_pytorchs_and_the_dense_product(n, batch_major):
    """float32: the compiled forward (bias fused), SDDMM and transpose equal PyTorch's kernels and a dense reference.

    Covers tails of the vector width and the 64-column tile (n = 1, 5, 17, 131), an empty row and a full row.
    """
    from lightning_pai.core import sparse_ops
    from lightning_pai.deploy import kernels as compiled

    if not compiled.available():
        pytest.skip("no C compiler: the compiled kernels are not built")
    assert sparse_ops._kernels(torch.empty(0)) is not sparse_ops.KERNELS["default"]  # the CPU uses the compiled ones
    gen = torch.Generator().manual_seed(n)
    mask = torch.rand(37, 29, generator=gen) < 0.3
    mask[3], mask[5] = False, True
    layer = to_sparse_training(nn.Linear(29, 37), mask)
    b = layer._buffers
    assert b["crow_indices"].dtype == torch.int32 and b["col_indices"].dtype == torch.int32
    structure = (b["crow_indices"], b["col_indices"], b["t_crow"], b["t_col"], b["t_perm"])
    x = torch.randn(n, 29, generator=gen) if batch_major else torch.randn(29, n, generator=gen).t()
    dense = torch.zeros(37, 29).masked_scatter(mask, layer.values.detach())
    grad = torch.randn(n, 37, generator=gen)

    def run(kernels):
        saved = sparse_ops.KERNELS.get("cpu")
        sparse_ops.KERNELS["cpu"] = kernels
        try:
            xx, v, bb = (t.detach().clone().requires_grad_() for t in (x, layer.values, layer.bias))
            y = sparse_linear(xx, v, *structure, bb, 29)
            return (y, *torch.autograd.grad(y, (xx, v, bb), grad))
        finally:
            sparse_ops.KERNELS["cpu"] = saved

    ours, torchs = run(sparse_ops.compiled_cpu_kernels()), run(sparse_ops.KERNELS["default"])
    xr = x.detach().clone().requires_grad_()
    wr = dense.clone().requires_grad_()
    yr = F.linear(xr, wr, layer.bias.detach())
    want = (yr, *torch.autograd.grad(yr, (xr, wr), grad), grad.sum(0))
    want = (want[0], want[1], want[2][mask], want[3])
    for a, b_, w in zip(ours, torchs, want):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)
    t = torch.randn(n, 29, generator=gen)
    assert torch.equal(sparse_ops.compiled_cpu_kernels().transpose(t), t.t().contiguous())


def test_sparse_run_on_pytorchs_kernels_equals_the_masked_run(monkeypatch):
    """Without the compiled kernels (no C compiler), the sparse backend still trains like the masked one."""
    from lightning_pai.core import sparse_ops

    monkeypatch.setitem(sparse_ops.KERNELS, "cpu", sparse_ops.KERNELS["default"])
    _assert_same_run(_run("RigL", "sparse"), _run("RigL", "masked"))


def test_module_state_dict_is_dense_and_round_trips():
    """A SparseTrainLinear saves a dense ``weight`` (zeros where pruned), loads one, and turns back into nn.Linear."""
    torch.manual_seed(0)
    linear = nn.Linear(9, 5)
    weight = linear.weight
    original = weight.detach().clone()
    mask = torch.rand(5, 9) < 0.4
    layer = to_sparse_training(linear, mask)
    assert type(layer) is SparseTrainLinear and layer is linear and layer.nnz == int(mask.sum())
    assert "weight" not in dict(layer.named_parameters()) and layer.values.numel() == int(mask.sum())
    state = layer.state_dict()
    assert list(state) == ["weight", "bias"]
    torch.testing.assert_close(state["weight"], original * mask)
    plain = nn.Linear(9, 5)
    plain.load_state_dict(state)  # into an ordinary dense layer
    x = torch.randn(4, 9)
    torch.testing.assert_close(plain(x), layer(x))
    layer.load_state_dict({"weight": 2 * original, "bias": layer.bias.detach()})  # and back: kept entries only
    torch.testing.assert_close(layer.dense_weight(), 2 * original * mask)
    torch.testing.assert_close(layer.mask(), mask)
    to_dense_training(layer)
    assert type(linear) is nn.Linear and linear.weight is weight
    torch.testing.assert_close(linear.weight.detach(), 2 * original * mask)


# --------------------------------------------------------------------------- equality with the masked path
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_sparse_backend_equals_masked_dense_after_100_steps(method, optimizer):
    masked = _run(method, "masked", optimizer)
    sparse = _run(method, "sparse", optimizer)
    _assert_same_run(masked, sparse)
    if method != "PruneAtInit":
        assert sparse["sparsifier"]["session"]["updater"]["updates"] == 9
        changed = masked["sparsifier"]["session"]["updater"]["fired"]
        assert sum(int(f.sum()) for f in changed.values()) > sum(
            int(m.sum()) for m in masked["sparsifier"]["session"]["masks"].values()
        )  # the topology moved


def test_sparse_training_state_during_the_run():
    """While training: values and optimizer state sized to the kept count, the dense gradient only on update steps,
    a correct report; after ``close``: ordinary dense layers and a dense optimizer again."""
    model = _model()
    opt = OPTIMIZERS["adamw"](model.parameters())
    batches = _batches(40)
    method = RigL(0.8, delta_t=10, t_end=1.0, verbose=False, backend="sparse")
    sparsifier = Sparsifier(method, model, opt, data=batches, total_steps=40)
    masks = sparsifier.masks
    assert isinstance(masks, SparseMaskSet)
    captured = []
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        captured.append(model[0].dense_grad is not None)
        sparsifier.step()
    assert [t + 1 for t, c in enumerate(captured) if c] == [10, 20, 30]  # update steps only
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, layer in masks.layers.items():
        assert id(layer.values) in params and layer.nnz == int(masks[name].sum()) == masks.kept()[name]
        assert opt.state[layer.values]["exp_avg"].shape == (layer.nnz,)
        torch.testing.assert_close(layer.mask(), masks[name])
    report = sparsifier.report()
    assert report.sparsity == pytest.approx(0.8, abs=1e-3)
    assert report.coverage.matrix_fraction == 1.0  # the sparse layers count as their dense weights
    sparsifier.close()
    assert all(type(m) is nn.Linear for m in model if isinstance(m, nn.Linear))
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert opt.state[model[0].weight]["exp_avg"].shape == model[0].weight.shape
    assert torch.all(model[0].weight[~sparsifier.masks["0.weight"]] == 0)


# ----------------------------------------------------------------------------- checkpoints and resuming
@pytest.mark.parametrize("first, second", [("sparse", "sparse"), ("masked", "sparse"), ("sparse", "masked")])
def test_resume_mid_run_across_backends(first, second):
    """A run saved at step 50 and resumed (same or other backend) ends where the uninterrupted run ends."""
    whole = _run("RigL", "masked", "sgd")
    saved = _run("RigL", first, "sgd", stop_after=50)
    assert "0.weight" in saved["model"] and saved["model"]["0.weight"].shape == (48, 20)
    assert saved["optimizer"]["state"][0]["momentum_buffer"].shape == (48, 20)  # dense-shaped, as a masked run's
    resumed = _run("RigL", second, "sgd", state=saved)
    _assert_same_run(whole, resumed)


def test_sparse_checkpoint_loads_into_a_plain_dense_model():
    """The model and optimizer state saved mid-run load into an ordinary model and optimizer, no lightning_pai."""
    saved = _run("SET", "sparse", "adamw", stop_after=30)
    reference = _run("SET", "masked", "adamw", stop_after=30)
    plain = _model()
    plain.load_state_dict(saved["model"])
    opt = OPTIMIZERS["adamw"](plain.parameters())
    opt.load_state_dict(saved["optimizer"])
    x = torch.randn(5, 20)
    other = _model()
    other.load_state_dict(reference["model"])
    torch.testing.assert_close(plain(x), other(x), atol=1e-5, rtol=0)
    assert opt.state[plain[0].weight]["exp_avg"].shape == (48, 20)


def test_lightning_fit_sparse_equals_masked_and_resumes(tmp_path):
    """Under a Trainer: same result as the masked backend; a fit resumed from a mid-run checkpoint ends the same."""

    class Crash(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 14:
                raise RuntimeError("crash")

    modules = {}

    def fit(backend, ckpt=None, crash=False):
        cb = RigL(0.8, delta_t=4, t_end=1.0, verbose=False, backend=backend)
        torch.manual_seed(0)
        module = modules[crash] = MLP()
        saving = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=12, save_top_k=-1)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=24,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=crash,
            logger=False,
            callbacks=[cb, *([Crash(), saving] if crash else [])],
        )
        trainer.fit(module, loader(4), ckpt_path=ckpt)  # epochs of 4 steps
        return cb, module, trainer

    cb_m, module_m, trainer_m = fit("masked")
    cb_s, module_s, trainer_s = fit("sparse")
    assert cb_s.updates == cb_m.updates == 5
    for n in cb_m.masks.names:
        assert torch.equal(cb_m.masks[n], cb_s.masks[n])
    for k, v in module_m.state_dict().items():
        torch.testing.assert_close(module_s.state_dict()[k], v, atol=2e-5, rtol=0)
    assert type(module_s.net[0]) is nn.Linear  # dense again after the fit
    with pytest.raises(RuntimeError, match="crash"):
        fit("sparse", crash=True)
    assert type(modules[True].net[0]) is nn.Linear  # an interrupted fit skips `teardown`: dense again all the same
    path = tmp_path / "epoch=2-step=12.ckpt"  # saved after step 12 (its update included); the crash came at 14
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["state_dict"]["net.0.weight"].shape == (48, 20)
    assert ckpt["optimizer_states"][0]["state"][0]["momentum_buffer"].shape == (48, 20)
    cb_r, module_r, _ = fit("sparse", ckpt=path)
    for n in cb_m.masks.names:
        assert torch.equal(cb_m.masks[n], cb_r.masks[n])
    for k, v in module_m.state_dict().items():
        torch.testing.assert_close(module_r.state_dict()[k], v, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- DDP
def test_ddp_two_processes_sparse_equals_masked(tmp_path):
    run_script(Path(__file__).with_name("sparse_ddp_script.py"), tmp_path)
    for method in ("RigL", "SET"):
        runs = {(b, r): torch.load(tmp_path / f"{method}_{b}_{r}.pt") for b in ("masked", "sparse") for r in (0, 1)}
        for rank in (0, 1):
            masked, sparse = runs["masked", rank], runs["sparse", rank]
            assert masked["updates"] == sparse["updates"] == 5 and sparse["steps"] == 24
            assert sparse["type"] == "Linear"
            for n in masked["masks"]:
                assert torch.equal(masked["masks"][n], sparse["masks"][n]), (method, n)
            for k, v in masked["model"].items():
                torch.testing.assert_close(sparse["model"][k], v, atol=2e-5, rtol=0)
            for i, state in masked["optimizer"]["state"].items():
                got = sparse["optimizer"]["state"][i]["momentum_buffer"]
                torch.testing.assert_close(got, state["momentum_buffer"], atol=2e-5, rtol=0)
        for k, v in runs["sparse", 0]["model"].items():
            assert torch.equal(v, runs["sparse", 1]["model"][k]), k  # replicas identical


# ----------------------------------------------------------------------------------------------- HF Conv1D
def _conv1d_model() -> nn.Module:
    """GPT-2's transposed linear layers (``y = x @ W + b``, ``W`` of shape ``(in, out)``) in a small MLP."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    return nn.Sequential(conv1d(48, 20), nn.ReLU(), conv1d(4, 48))


def test_hf_conv1d_sparse_equals_masked():
    """HF ``Conv1D`` layers train sparse too: same masks, weights (``(in, out)``) and optimizer state as masked."""
    runs = {}
    for backend in ("masked", "sparse"):
        model = _conv1d_model()
        opt = OPTIMIZERS["adamw"](model.parameters())
        batches = _batches(30)
        method = RigL(0.7, delta_t=5, t_end=1.0, verbose=False, backend=backend)
        sparsifier = Sparsifier(method, model, opt, data=batches, total_steps=30)
        if backend == "sparse":
            layer = model[0]
            assert type(layer).__name__ == "SparseTrainConv1D" and layer.mask().shape == (20, 48)
            torch.testing.assert_close(layer.mask(), sparsifier.masks["0.weight"])
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            sparsifier.step()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sparsifier": sparsifier.state_dict()}
        sparsifier.close()
        assert type(model[0]).__name__ == "Conv1D" and model[0].weight.shape == (20, 48)
        runs[backend] = state
    assert runs["sparse"]["optimizer"]["state"][0]["exp_avg"].shape == (20, 48)
    _assert_same_run(runs["masked"], runs["sparse"])


def test_plain_loop_ddp_order(tmp_path):
    """A plain loop wraps DDP after the Sparsifier (DDP leaves the sparse layers alone); wrapped before: refused."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = _model()
        opt = OPTIMIZERS["sgd"](model.parameters())
        wrapped = nn.parallel.DistributedDataParallel(_model())
        with pytest.raises(ValueError, match=r"wrapped in DistributedDataParallel before the Sparsifier.*0\.weight"):
            Sparsifier(SET(0.8, verbose=False, backend="sparse"), wrapped, opt, data=_batches(2), total_steps=2)
        sparsifier = Sparsifier(SET(0.8, verbose=False, backend="sparse"), model, opt, data=_batches(2), total_steps=2)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert {"0.values", "0.weight"} <= ddp.parameters_to_ignore
        x, y = _batches(1)[0]
        F.cross_entropy(ddp(x), y).backward()
        sparsifier.step()
        assert model[0].values.grad is not None
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_backend_fails_before_training():
    with pytest.raises(ValueError, match=r"`backend` must be one of 'masked', 'sparse'; got 'csr'"):
        RigL(0.8, backend="csr")
    with pytest.raises(ValueError, match=r"backend='sparse'.*reads dense gradients or momentum at every step"):
        DynamicSparseTraining(0.8, growth="momentum", redistribution="momentum", backend="sparse")

    class Conv(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv1d(2, 4, 3), nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            raise AssertionError("trained")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = PruneAtInit("magnitude", 0.5, verbose=False, backend="sparse")
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, callbacks=[cb])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2, 4)), batch_size=2)
    with pytest.raises(ValueError, match=r"conv\.weight \(Conv1d\).*`backend` is one of 'masked', 'sparse'"):
        trainer.fit(Conv(), data)
    tied = _model()
    tied[4].weight = nn.Parameter(torch.randn(4, 24))
    tied.append(nn.Linear(24, 4))
    tied[5].weight = tied[4].weight
    with pytest.raises(ValueError, match=r"4\.weight \(tied to another layer's weight\)"):
        Sparsifier(SET(0.8, verbose=False, backend="sparse"), tied, OPTIMIZERS["sgd"](tied.parameters()), _batches(2))


def test_autocast_bf16_matches_masked_layer():
    """Under CPU autocast (bf16) the sparse layer computes in bf16 like nn.Linear; gradients reach the fp32 values."""
    torch.manual_seed(0)
    layer, reference = nn.Linear(16, 8), nn.Linear(16, 8)
    reference.load_state_dict(layer.state_dict())
    mask = torch.rand(8, 16) < 0.3
    with torch.no_grad():
        reference.weight.mul_(mask)
    to_sparse_training(layer, mask)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = layer(x), reference(x)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), atol=1e-2, rtol=1e-2)
    y.float().sum().backward()
    want.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32
    torch.testing.assert_close(layer.values.grad, reference.weight.grad[mask], atol=1e-2, rtol=1e-2)
