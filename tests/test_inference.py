"""to_sparse_inference: sparse layers compute the dense outputs, the crossover is respected, the rest is reported."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_pai.core.masks import MaskSet
from lightning_pai.deploy import (
    ConversionReport,
    KernelTimes,
    SparseConv1x1,
    SparseConv2d,
    SparseLinear,
    SparseMatmul,
    TransposedLayerNorm,
    conversion_report,
    convert,
    is_two_four,
    measure_crossover,
    measure_kernel_times,
    to_sparse_inference,
)
from lightning_pai.deploy import kernels as ckernels

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR) tensor support is in beta")

TOL = {"atol": 1e-5, "rtol": 1e-4}
HAS_C = ckernels.available()
needs_c = pytest.mark.skipif(not HAS_C, reason="no C compiler: lightning_pai.core.kernels unavailable")
#: What kernel="auto" picks for float32 CSR on the CPU at batch 64.
AUTO_CPU = "c" if HAS_C else "sum"


class Conv1D(nn.Module):
    """What transformers' GPT-2 ``Conv1D`` is: ``weight`` of shape ``(in, nf)``, ``y = x W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(size_out)


class GPTMLP(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        return self.ln(x + self.c_proj(torch.nn.functional.gelu(self.c_fc(x))))


def lenet() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(8, 16, 1)
        self.pw2 = nn.Conv2d(16, 8, 1, bias=False)
        self.k3 = nn.Conv2d(8, 8, 3, padding=1)  # not a matmul: left dense
        self.down = nn.Conv2d(8, 12, 1, stride=2)  # strided: left dense
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.pw1(x))
        x = self.k3(torch.relu(self.pw2(x)))
        return self.head(self.down(x).mean((-2, -1)))


def prune(model: nn.Module, sparsity: float, include=None, seed: int = 0) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    masks = MaskSet.from_module(model, include=include)
    masks.load_state_dict({n: torch.rand(p.shape, generator=g) >= sparsity for n, p in masks.params.items()})
    masks.apply_()
    return masks


def kinds(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if n}


# ----------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("kernel", ["auto", "c", "sum", "mm"])
@pytest.mark.parametrize("shape", [(1, 784), (64, 784), (2, 5, 784), (784,), (130, 784)], ids=str)
def test_lenet_outputs(kernel, shape, one_thread):
    if kernel == "c" and not HAS_C:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    model = lenet().eval()
    masks = prune(model, 0.9)
    sparse = to_sparse_inference(model, masks, crossover=1.0, kernel=kernel)
    assert [n for n, t in kinds(sparse).items() if t == "SparseLinear"] == ["0", "2", "4"]
    assert conversion_report(sparse).converted == ["0", "2", "4"]
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        got = sparse(x)
    assert got.shape == expected.shape
    assert_close(got, expected, **TOL)
    assert sparse[0].nnz == int(masks["0.weight"].sum())
    assert isinstance(model[0], nn.Linear)  # the original is untouched


def test_masks_none_infers_zeros_and_matches(one_thread):
    torch.manual_seed(0)
    model = lenet()
    masks = prune(model, 0.95)
    sparse = to_sparse_inference(model, crossover=0.5)
    report = conversion_report(sparse)
    assert report.converted == ["0", "2", "4"]
    assert [r.density for r in report.rows] == [
        masks.kept()[f"{i}.weight"] / masks[f"{i}.weight"].numel() for i in "024"
    ]
    assert [sparse[i].nnz for i in (0, 2, 4)] == [masks.kept()[f"{i}.weight"] for i in (0, 2, 4)]
    x = torch.randn(16, 784)
    with torch.no_grad():
        assert_close(sparse(x), model(x), **TOL)


def test_weights_outside_mask_count_as_zero(one_thread):
    torch.manual_seed(0)
    model = lenet()
    masks = MaskSet.from_module(model)
    masks.load_state_dict({n: torch.rand(p.shape) < 0.1 for n, p in masks.params.items()})
    sparse = to_sparse_inference(model, masks, crossover=1.0)  # weights not zeroed: the mask decides
    masks.apply_()
    x = torch.randn(8, 784)
    with torch.no_grad():
        assert_close(sparse(x), model(x), **TOL)


def test_conv_net(one_thread):
    torch.manual_seed(0)
    model = ConvNet().eval()
    masks = prune(model, 0.8)
    sparse = to_sparse_inference(model, masks, crossover=1.0)
    direct = "SparseConv2d" if HAS_C else "Conv2d"  # kxk and strided convs: direct sparse convolution, compiled
    assert kinds(sparse) == {"pw1": "SparseConv1x1", "pw2": "SparseConv1x1", "k3": direct, "down": direct,
                             "head": "SparseLinear"}  # fmt: skip
    report = {r.name: r for r in conversion_report(sparse).rows}
    assert report["pw1"].kind == "Conv2d 1x1" and report["pw1"].shape == (16, 8)
    assert report["k3"].kind == "Conv2d" and report["k3"].shape == (8, 8, 3, 3)
    if HAS_C:
        assert report["k3"].implementation == report["down"].implementation == "direct/c"
        assert sparse.k3.nnz == int(masks["k3.weight"].sum())
    else:
        assert "need the compiled kernels" in report["k3"].reason
    for x in (torch.randn(3, 8, 6, 5), torch.randn(1, 8, 4, 4), torch.randn(8, 4, 4)):
        with torch.no_grad():
            assert_close(sparse(x), model(x), **TOL)
        with torch.no_grad():
            assert_close(sparse.pw1(x), model.pw1(x), **TOL)


CONV_CASES = [  # (in, out, kernel, stride, padding, dilation, bias, input hw)
    (5, 7, 3, 1, 1, 1, True, (9, 11)),
    (5, 7, 3, 2, 1, 1, False, (16, 16)),
    (3, 8, 7, 2, 3, 1, True, (23, 20)),  # a ResNet stem
    (6, 4, 1, 2, 0, 1, True, (9, 9)),  # a ResNet downsample
    (6, 4, 1, 1, 1, 1, True, (5, 6)),  # 1x1 with padding: the border is the bias
    (4, 6, 5, 3, 2, 2, True, (17, 19)),
    (4, 6, (3, 5), (1, 2), "same", 1, True, (8, 13)),
    (4, 6, (3, 5), (2, 1), (0, 2), (2, 1), False, (15, 7)),
    (2, 3, 3, 1, 0, 1, True, (3, 3)),  # a single output pixel
]


@needs_c
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_conv2d_matches_conv2d(case, threads):
    cin, cout, k, stride, padding, dilation, bias, hw = case
    if padding == "same":
        stride = 1
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias).eval()
    mask = torch.rand(conv.weight.shape) < 0.3
    with torch.no_grad():
        conv.weight.mul_(mask)
    sparse = SparseConv2d.from_conv(conv, mask)
    relu = SparseConv2d.from_conv(conv, mask, activation="relu")
    assert sparse.nnz == int(mask.sum())
    x = torch.randn(3, cin, *hw)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            expected = conv(x)
            got = sparse(x)
            assert got.shape == expected.shape and got.is_contiguous()
            assert_close(got, expected, **TOL)
            assert torch.equal(relu(x), got.relu())
            assert_close(sparse(x[0]), expected[0], **TOL)  # unbatched
            assert_close(sparse(x.to(memory_format=torch.channels_last)), expected, **TOL)
            view = torch.randn(3, cin, hw[0], hw[1] + 1)[..., 1:]  # a strided view
            assert_close(sparse(view), conv(view), **TOL)
            assert torch.equal(sparse(x), got)  # the cached tap offsets give the same result
            assert_close(copy.deepcopy(sparse).double()(x.double()), conv.double()(x.double()))  # F.conv2d fallback
    finally:
        torch.set_num_threads(old)


@needs_c
def test_sparse_conv2d_errors():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    sparse = SparseConv2d.from_conv(conv)
    with torch.no_grad(), pytest.raises(RuntimeError, match="input of shape"):
        sparse(torch.randn(1, 4, 2, 2))  # smaller than the kernel
    with torch.no_grad(), pytest.raises(RuntimeError, match="input of shape"):
        sparse(torch.randn(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="inference-only"):
        sparse(torch.randn(1, 4, 8, 8, requires_grad=True))


def test_torchvision_resnet(one_thread):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    masks = prune(model, 0.9)
    sparse = to_sparse_inference(model, masks, crossover=1.0)
    report = conversion_report(sparse)
    convs = [r for r in report.rows if r.kind.startswith("Conv2d")]
    assert len(convs) == 20
    if HAS_C:
        assert report.dense == [] and all(isinstance(sparse.get_submodule(r.name), SparseConv2d) for r in convs)
    else:
        assert report.converted == ["fc"]
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert_close(sparse(x), model(x), **TOL)


def test_conv1d_like(one_thread):
    torch.manual_seed(0)
    model = GPTMLP().eval()
    masks = prune(model, 0.9, include=["c_fc.weight", "c_proj.weight"])
    sparse = to_sparse_inference(model, masks, crossover=1.0)
    norm = "TransposedLayerNorm" if HAS_C else "LayerNorm"  # the "c" kernel keeps the transposed layout
    assert kinds(sparse) == {"c_fc": "SparseLinear", "c_proj": "SparseLinear", "ln": norm}
    rows = conversion_report(sparse).rows
    assert [(r.kind, r.shape) for r in rows] == [("Conv1D", (128, 32)), ("Conv1D", (32, 128))]
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert_close(sparse(x), model(x), **TOL)
    # without masks, Conv1D-like modules are found by their ``nf`` attribute and 2-D (in, nf) weight
    assert conversion_report(to_sparse_inference(model, crossover=1.0)).converted == ["c_fc", "c_proj"]


@pytest.mark.parametrize("contiguous", [False, True])
def test_chained_layout(contiguous, one_thread):
    torch.manual_seed(0)
    model = lenet()
    prune(model, 0.9)
    sparse = to_sparse_inference(model, crossover=1.0, contiguous_outputs=contiguous)
    with torch.no_grad():
        y = sparse(torch.randn(4, 784))
        hidden = sparse[1](sparse[0](torch.randn(4, 784)))
    assert y.is_contiguous() == contiguous
    # the transposed output of one sparse layer is the next one's contiguous (in, rows) input: no copy
    assert hidden.t().is_contiguous() == (not contiguous)


def test_bsr_layout(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 6))
    blocks = torch.rand(8, 16) < 0.25
    mask = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)
    masks = {"0.weight": mask, "2.weight": torch.rand(6, 32) < 0.2}
    with torch.no_grad():
        model[0].weight.mul_(mask)
        model[2].weight.mul_(masks["2.weight"])
    sparse = to_sparse_inference(model, masks, crossover=1.0, layout="bsr", blocksize=4)
    report = conversion_report(sparse).rows
    assert (report[0].converted, report[0].implementation) == (True, "bsr4/mm+relu")  # the ReLU is fused
    assert kinds(sparse) == {"0": "SparseLinear", "1": "Identity", "2": "Linear"}
    assert report[0].density == pytest.approx(float(blocks.float().mean()))
    assert not report[1].converted and "do not tile 6x32" in report[1].reason
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert_close(sparse(x), model(x), **TOL)


# -------------------------------------------------------------------------------------- compiled kernels
def random_csr(rows: int, cols: int, density: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A random ``(rows, cols)`` matrix with rows 0 and ``rows // 2`` empty, and its int32 CSR buffers."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    dense[0] = 0
    dense[rows // 2] = 0
    csr = dense.to_sparse_csr()
    return dense, csr.crow_indices().int(), csr.col_indices().int(), csr.values()


@needs_c
@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 200])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_csr_matmul_matches_dense(n, threads):
    dense, crow, col, values = random_csr(37, 300, 0.1)
    bias = torch.randn(37)
    x = torch.randn(300, n)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plain = ckernels.csr_matmul_t(crow, col, values, None, x)
        biased = ckernels.csr_matmul_t(crow, col, values, bias, x)
        relu = ckernels.csr_matmul_t(crow, col, values, bias, x, "relu")
        wide = torch.randn(300, n + 7)  # a strided (in, n) view: rows contiguous, row stride n + 7
        strided = ckernels.csr_matmul_t(crow, col, values, bias, wide[:, 3 : 3 + n])
    finally:
        torch.set_num_threads(old)
    assert plain.shape == (37, n) and plain.is_contiguous()
    assert_close(plain, dense @ x, **TOL)
    assert_close(biased, dense @ x + bias[:, None], **TOL)
    assert_close(relu, (dense @ x + bias[:, None]).relu(), **TOL)
    assert torch.equal(relu, biased.relu())
    assert torch.equal(biased[0], bias[0].expand(n))  # an empty row is its bias, exactly
    assert_close(strided, dense @ wide[:, 3 : 3 + n] + bias[:, None], **TOL)
    # a large product goes over the threaded path (work >= 2**15 multiply-adds) with the same result
    big_dense, *big = random_csr(512, 256, 0.2, seed=1)
    big_x = torch.randn(256, 300)
    assert_close(ckernels.csr_matmul_t(*big, None, big_x), big_dense @ big_x, **TOL)


@needs_c
def test_c_transpose_and_layer_norm_t():
    x = torch.randn(130, 77)
    assert torch.equal(ckernels.transpose(x), x.t().contiguous())
    assert torch.equal(ckernels.transpose(x[:, 5:40]), x[:, 5:40].t().contiguous())
    norm = nn.LayerNorm(77)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        expected = norm(x)
    got = ckernels.layer_norm_t(x.t().contiguous(), norm.weight.detach(), norm.bias.detach(), norm.eps)
    assert_close(got.t(), expected, **TOL)
    plain = ckernels.layer_norm_t(x.t().contiguous(), None, None, 1e-5)
    assert_close(plain.t(), torch.nn.functional.layer_norm(x, (77,)), **TOL)


class Block(nn.Module):
    """A transformer MLP block: ``LayerNorm(x + fc2(GELU(fc1(x))))``."""

    def __init__(self, d: int = 48, hidden: int = 96) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.norm = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


@pytest.mark.parametrize("fuse", [True, False])
def test_fused_relu_and_transposed_layer_norm(fuse, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48), nn.ReLU(), Block(), Block()).eval()
    with torch.no_grad():
        for block in (model[2], model[3]):
            block.norm.weight.uniform_(0.5, 1.5)
            block.norm.bias.normal_()
    prune(model, 0.9)
    x = torch.randn(3, 11, 48)
    sparse = to_sparse_inference(model, crossover=1.0, fuse=fuse, example_inputs=x)
    report = conversion_report(sparse)
    assert report.contiguous_outputs is False and report.max_abs_diff < 1e-5  # the trial run took the views
    found = kinds(sparse)
    assert found["1"] == ("Identity" if fuse else "ReLU")
    assert conversion_report(sparse).rows[0].implementation == f"csr/{AUTO_CPU}" + ("+relu" if fuse else "")
    transposed = fuse and HAS_C
    assert found["2.norm"] == found["3.norm"] == ("TransposedLayerNorm" if transposed else "LayerNorm")
    assert torch.equal(sparse[2].norm.weight, model[2].norm.weight)
    unchecked = to_sparse_inference(model, crossover=1.0, fuse=False)  # no example_inputs: outputs copied
    assert sparse.state_dict().keys() == unchecked.state_dict().keys()
    with torch.no_grad():
        expected, got = model(x), sparse(x)
        # the residual stream stays transposed from the first layer to the output: no copy between layers
        assert got.is_contiguous() == (not transposed)
        assert unchecked(x).is_contiguous() and conversion_report(unchecked).contiguous_outputs
        assert_close(got, expected, **TOL)
        assert_close(sparse(x[:1, :1]), model(x[:1, :1]), **TOL)  # one row: matrix-vector path


def test_transposed_layer_norm_falls_back_to_layer_norm():
    torch.manual_seed(0)
    norm = nn.LayerNorm(16)
    fast = TransposedLayerNorm.from_layer_norm(norm)
    assert fast.weight is norm.weight and fast.bias is norm.bias and fast.eps == norm.eps
    x = torch.randn(5, 16)
    for inp in (x, x.t().contiguous().t()):  # contiguous, transposed view
        with torch.no_grad():
            assert_close(fast(inp), nn.functional.layer_norm(inp, (16,), norm.weight.to(inp), norm.bias.to(inp)))
    with torch.no_grad():
        view64 = x.double().t().contiguous().t()  # float64: nn.LayerNorm's own kernel
        assert_close(copy.deepcopy(fast).double()(view64), copy.deepcopy(norm).double()(view64))
    y = fast(x.t().contiguous().t().requires_grad_())  # autograd: the plain LayerNorm, which backpropagates
    y.sum().backward()


def test_without_compiled_kernels_torch_kernels_are_used(monkeypatch, one_thread):
    monkeypatch.setitem(ckernels._state, "lib", None)
    assert not ckernels.available()
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    prune(model, 0.9)
    sparse = to_sparse_inference(model, crossover=1.0)
    assert {r.implementation for r in conversion_report(sparse).rows} == {"csr/sum"}
    assert type(sparse[0].norm) is nn.LayerNorm
    with pytest.raises(ValueError, match="kernel='c'.*C compiler"):
        SparseLinear(torch.randn(4, 4), kernel="c")
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        assert_close(sparse(x), model(x), **TOL)


@needs_c
def test_c_layers_fall_back_after_dtype_change(one_thread):
    torch.manual_seed(0)
    model = lenet()
    prune(model, 0.9)
    sparse = to_sparse_inference(model, crossover=1.0, kernel="c")
    x = torch.randn(6, 784)
    with torch.no_grad():
        assert_close(sparse.double()(x.double()), model.double()(x.double()))  # float64: torch.sparse kernels


@needs_c
def test_kernel_library_build_and_opt_out(tmp_path, monkeypatch):
    """A fresh cache builds the library once (file named by a hash); the opt-out and a missing compiler disable it."""
    monkeypatch.setenv("LIGHTNING_PAI_CACHE", str(tmp_path))
    monkeypatch.setattr(ckernels, "_LIB", ckernels._LIB)  # restored afterwards, like _state

    def fresh() -> bool:
        monkeypatch.setattr(ckernels, "_state", {})  # as in a new process
        return ckernels.available()

    assert fresh()
    built = list((tmp_path / "kernels").glob("lp_kernels_*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert fresh()
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("*.so")] == [mtime]  # reused, not rebuilt
    x = torch.randn(20, 70)
    assert torch.equal(ckernels.transpose(x), x.t().contiguous())  # the library just loaded works
    monkeypatch.setenv("LIGHTNING_PAI_NO_CKERNELS", "1")
    assert not fresh()
    monkeypatch.delenv("LIGHTNING_PAI_NO_CKERNELS")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LIGHTNING_PAI_CACHE", str(tmp_path / "other"))
    assert not fresh()
    assert not (tmp_path / "other").exists()


# --------------------------------------------------------------------------------------------- crossover
def test_crossover_bounds(one_thread):
    torch.manual_seed(0)
    model = ConvNet()
    masks = prune(model, 0.5)
    none = to_sparse_inference(model, masks, crossover=0.0)
    assert conversion_report(none).converted == []
    assert kinds(none) == kinds(model)
    assert all(">= crossover 0.000 (given)" in r.reason for r in conversion_report(none).rows if r.kind != "Conv2d")
    every = to_sparse_inference(model, masks, crossover=1.0)
    if HAS_C:
        assert conversion_report(every).converted == ["pw1", "pw2", "k3", "down", "head"]  # every eligible layer
    else:
        assert conversion_report(every).converted == ["pw1", "pw2", "head"]
        assert conversion_report(every).dense == ["k3", "down"]


def test_crossover_threshold_per_layer(one_thread):
    torch.manual_seed(0)
    model = lenet()
    densities = {"0.weight": 0.05, "2.weight": 0.3, "4.weight": 0.6}
    masks = {n: torch.rand(p.shape) < densities[n] for n, p in model.named_parameters() if n in densities}
    sparse = to_sparse_inference(model, masks, crossover=0.4)
    report = conversion_report(sparse)
    assert report.converted == ["0", "2"] and report.dense == ["4"]
    assert [r.density for r in report.rows] == [int(m.sum()) / m.numel() for m in masks.values()]
    assert kinds(sparse)["4"] == "Linear"


def test_measured_crossover(one_thread):
    value = measure_crossover(40, 60, 8, budget_s=0.05)
    assert 0.0 <= value <= 1.0
    assert measure_crossover(40, 60, 8, budget_s=0.05) == value  # cached per shape
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 40), nn.ReLU(), nn.Linear(40, 40), nn.Linear(40, 40))
    masks = prune(model, 0.95)
    sparse = to_sparse_inference(model, masks, batch_size=8)
    rows = conversion_report(sparse).rows
    candidates = ("c", "mm") if HAS_C else ("auto",)  # at 8 rows PyTorch's candidate is torch.addmm
    for row in rows:
        chained = row.name == "2" and rows[0].converted  # "0" -> ReLU -> "2": "2" gets "0"'s transposed output
        assert row.reason.endswith("(measured at 8 rows" + (", chained)" if chained else ")"))
        # cached: the timings the conversion made, at the layer's own density
        times = measure_kernel_times(
            *row.shape, 8, kernels=candidates, densities=(row.density,), transposed_input=chained
        )
        assert times.probes == (row.density,)
        best, predicted = times.fastest(row.density)
        assert row.converted == (best != "dense")
        assert dict(row.timings) == {k if k == "dense" else f"csr/{k}": t for k, t in predicted.items()}
        assert row.timings[0][1] == min(predicted.values())  # fastest first, and that one was taken
        assert row.implementation.split("+")[0] == row.timings[0][0]

    probes = measure_kernel_times(40, 60, 8, kernels=candidates, budget_s=0.05)  # at 0.05 and 0.3: a line
    kernel = next(iter(probes.sparse))
    assert probes.crossover(kernel) == measure_crossover(40, 60, 8, budget_s=0.05)  # the same timings, cached
    (t0, t1), (d0, d1) = probes.sparse[kernel], probes.probes
    assert probes.predict(kernel, d1) == t1 and probes.predict(kernel, 1.0) == pytest.approx(
        t1 + max(0.0, (t1 - t0) / (d1 - d0)) * (1.0 - d1)
    )
    with pytest.raises(ValueError, match="two densities"):
        times.crossover(kernel)  # timed at one density only
    x = torch.randn(8, 60)
    with torch.no_grad():
        assert_close(sparse(x), model(x), **TOL)


@needs_c
@pytest.mark.parametrize("fastest", ["dense", "c", "sum"])
def test_measured_conversion_takes_the_fastest_of_dense_and_both_sparse_kernels(monkeypatch, one_thread, fastest):
    """Where the compiled kernel is slower than torch.sparse (an AVX2 build once was), the layer gets torch.sparse."""
    seconds = {"dense": 2e-3, "c": 3e-3, "sum": 4e-3} | {fastest: 1e-3}
    fake = KernelTimes(seconds["dense"], {k: (seconds[k], seconds[k]) for k in ("c", "sum")})
    asked = []

    def measure(*args, kernels, **kwargs):
        asked.append((args, kernels, kwargs["transposed_input"]))
        return fake

    monkeypatch.setattr(convert, "measure_kernel_times", measure)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 40), nn.ReLU(), nn.Linear(40, 20))
    masks = prune(model, 0.9)
    sparse = to_sparse_inference(model, masks, batch_size=32)
    report = conversion_report(sparse)
    expected = "dense" if fastest == "dense" else f"csr/{fastest}"
    assert asked == [((40, 60, 32), ("c", "sum"), False), ((20, 40, 32), ("c", "sum"), fastest != "dense")]
    assert [r.implementation for r in report.rows] == [expected + ("+relu" if fastest != "dense" else ""), expected]
    for row in report.rows:
        assert row.converted == (fastest != "dense")
        assert row.timings[0] == (expected, 1e-3) and len(row.timings) == 3
        assert row.reason.startswith(f"at density {row.density:.3f}: {expected} 1 ms < ")
    x = torch.randn(32, 60)
    with torch.no_grad():
        assert_close(sparse(x), model(x), **TOL)


class Scaled2(nn.Module):
    """Two positional inputs (or keywords): ``fc(flatten(conv(x))) * scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 6 * 5, 4)

    def forward(self, x, scale):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1)) * scale


@pytest.mark.parametrize("call", ["tuple", "dict"])
def test_example_inputs_measure_each_layer_at_its_own_size(call, one_thread):
    torch.manual_seed(0)
    model = Scaled2().train()
    prune(model, 0.95, include=["conv.weight", "fc.weight"])
    stats = model.norm.running_mean.clone(), int(model.norm.num_batches_tracked)
    x = torch.randn(2, 3, 6, 5)
    example = (x, 2.0) if call == "tuple" else {"x": x, "scale": 2.0}
    sparse = to_sparse_inference(model, example_inputs=example, inplace=True)
    assert sparse is model
    reasons = {r.name: r.reason for r in conversion_report(sparse).rows}
    assert reasons["fc"].endswith("(measured at 2 rows)")  # not batch_size=64
    if HAS_C:
        assert reasons["conv"].endswith("(measured on 2x3x6x5)")
    # the recording pass ran in eval mode: the training flags and BatchNorm statistics are as they were
    assert model.training and model.norm.training
    assert torch.equal(model.norm.running_mean, stats[0]) and int(model.norm.num_batches_tracked) == stats[1]
    without = to_sparse_inference(Scaled2(), masks={"conv.weight": torch.rand(8, 3, 3, 3) < 0.05})
    if HAS_C:
        assert conversion_report(without).rows[0].reason.endswith("(measured on 1x3x32x32)")


# ----------------------------------------------------------------------------------- unsupported / errors
class Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.scaled = Scaled(16, 16)
        self.conv = nn.Conv1d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = self.attn(h, h, h, need_weights=False)[0]
        h = self.conv(self.scaled(h).transpose(1, 2)).transpose(1, 2)
        return self.fc(h)


def test_unsupported_left_dense_and_reported(one_thread):
    torch.manual_seed(0)
    model = Mixed().eval()
    include = ["emb.weight", "attn.in_proj_weight", "attn.out_proj.weight", "scaled.weight", "conv.weight"]
    include += ["fc.weight", "fc.bias"]
    masks = prune(model, 0.9, include=include)
    sparse = to_sparse_inference(model, masks, crossover=1.0)
    report = {r.name: r for r in conversion_report(sparse).rows}
    assert set(report) == {"emb", "attn.in_proj_weight", "attn.out_proj", "scaled", "conv", "fc", "fc.bias"}
    assert [n for n, r in report.items() if r.converted] == ["fc"]
    assert "MultiheadAttention" in report["attn.out_proj"].reason
    assert "overrides nn.Linear.forward" in report["scaled"].reason
    assert "not an nn.Linear" in report["emb"].reason and "not an nn.Linear" in report["conv"].reason
    assert (
        report["fc.bias"].reason == report["attn.in_proj_weight"].reason == "not a layer's `weight` (no sparse kernel)"
    )
    assert report["emb"].density == pytest.approx(0.1, abs=0.03)
    assert type(sparse.attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert "| fc | Linear | 4x16 |" in str(conversion_report(sparse))
    tokens = torch.randint(0, 20, (2, 9))
    with torch.no_grad():
        assert_close(sparse(tokens), model(tokens), **TOL)


def test_inference_only_error():
    model = lenet()
    prune(model, 0.9)
    sparse = to_sparse_inference(model, crossover=1.0)
    x = torch.randn(2, 784, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only.*torch.no_grad"):
        sparse(x)
    with torch.no_grad():
        assert sparse(x).shape == (2, 10)
    with torch.inference_mode():
        assert sparse(x.detach()).shape == (2, 10)
    y = sparse(x.detach())  # grad mode but nothing requires grad: fine, and nothing to backpropagate
    assert not y.requires_grad


def test_copy_save_move_inplace(one_thread):
    torch.manual_seed(0)
    model = lenet()
    prune(model, 0.9)
    sparse = to_sparse_inference(model, crossover=1.0)
    x = torch.randn(3, 784)
    with torch.no_grad():
        expected = sparse(x)  # builds the cached sparse tensors
        assert torch.equal(copy.deepcopy(sparse)(x), expected)
        assert torch.equal(pickle.loads(pickle.dumps(sparse))(x), expected)
        buf = io.BytesIO()
        torch.save(sparse.state_dict(), buf)
        buf.seek(0)
        other = to_sparse_inference(model, crossover=1.0)
        with torch.no_grad():
            for mod in other.modules():
                if isinstance(mod, SparseMatmul):
                    mod.values.zero_()
        assert other(x).abs().sum() > 0  # biases only
        other.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(other(x), expected)  # in-place buffer copies reach the cached sparse tensors
        assert_close(copy.deepcopy(sparse).double()(x.double()), expected.double(), **TOL)
    same = to_sparse_inference(model, crossover=1.0, inplace=True)
    assert same is model and isinstance(model[0], SparseLinear)
    root = to_sparse_inference(nn.Linear(5, 3), crossover=1.0, masks={"weight": torch.rand(3, 5) < 0.5})
    assert isinstance(root, SparseLinear) and conversion_report(root).converted == [""]


def test_argument_errors():
    model = lenet()
    with pytest.raises(ValueError, match="crossover"):
        to_sparse_inference(model, crossover=1.5)
    with pytest.raises(ValueError, match="layout"):
        to_sparse_inference(model, layout="coo")
    with pytest.raises(ValueError, match="kernel"):
        to_sparse_inference(model, kernel="fast")
    with pytest.raises(ValueError, match="batch_size"):
        to_sparse_inference(model, batch_size=0)
    with pytest.raises(KeyError, match="nope.weight"):
        to_sparse_inference(model, {"nope.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        to_sparse_inference(model, {"0.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no conversion report"):
        conversion_report(model)
    with pytest.raises(ValueError, match="CSR layout on the CPU"):
        SparseLinear(torch.randn(4, 4), layout="bsr", kernel="sum")
    assert isinstance(conversion_report(to_sparse_inference(model, crossover=0.0)), ConversionReport)
    assert SparseConv1x1(torch.randn(4, 4)).density == 1.0


# --------------------------------------------------------------------------------------------------- 2:4
def two_four_mask(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
    return torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, cols)


def test_is_two_four():
    mask = two_four_mask(8, 16)
    assert is_two_four(mask) and float(mask.float().mean()) == 0.5
    broken = mask.clone()
    broken[0, :4] = torch.tensor([True, True, True, False])
    assert not is_two_four(broken)
    assert not is_two_four(torch.ones(8, 6, dtype=torch.bool)) and not is_two_four(torch.ones(8, dtype=torch.bool))


def test_two_four_on_cpu_uses_crossover(one_thread):
    model = nn.Sequential(nn.Linear(64, 64))
    sparse = to_sparse_inference(model, {"0.weight": two_four_mask(64, 64)}, crossover=0.6)
    assert conversion_report(sparse).rows[0].implementation == f"csr/{AUTO_CPU}"  # no 2:4 kernels without CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured sparsity needs CUDA")
def test_two_four_cuda():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need compute capability 8.0+")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).cuda().eval()
    masks = {"0.weight": two_four_mask(512, 256).cuda(), "2.weight": two_four_mask(128, 512, 1).cuda()}
    with torch.no_grad():
        for i in (0, 2):
            model[i].weight.mul_(masks[f"{i}.weight"])
    sparse = to_sparse_inference(model, masks, crossover=0.0)
    assert [r.implementation for r in conversion_report(sparse).rows] == ["2:4/float16", "2:4/float16"]
    x = torch.randn(64, 256, device="cuda")
    with torch.no_grad():
        assert_close(sparse(x), model(x), atol=2e-2, rtol=2e-2)
        half = copy.deepcopy(model).half()
        assert_close(sparse(x), half(x.half()).float(), atol=5e-3, rtol=5e-3)
