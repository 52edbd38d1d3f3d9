"""Converted models run on code that reads their layers (T5, ViT, nn.TransformerEncoder) and compile."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from lightning_pai import conversion_report, to_sparse_inference
from lightning_pai.core.masks import MaskSet
from lightning_pai.deploy import DenseWeightView, SparseConv2d, SparseLinear, SparseMatmul
from lightning_pai.deploy import kernels as ckernels

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR) tensor support is in beta")
needs_c = pytest.mark.skipif(not ckernels.available(), reason="no C compiler: the compiled kernels are unavailable")
TOL = {"atol": 1e-5, "rtol": 1e-5}


def magnitude_prune(model: nn.Module, sparsity: float, include=None) -> MaskSet:
    """Each targeted layer keeps its largest ``1 - sparsity`` fraction of weights by magnitude; zeros applied."""
    masks = MaskSet.from_module(model, include=include)
    new = {}
    for name, p in masks.params.items():
        keep = max(1, round(p.numel() * (1 - sparsity)))
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[p.detach().abs().flatten().topk(keep).indices] = True
        new[name] = flat.view(p.shape)
    masks.load_state_dict(new)
    masks.apply_()
    return masks


def forbid_dense_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any materialisation of a converted layer's dense weight fail the test."""

    def refuse(self: SparseMatmul) -> torch.Tensor:
        raise AssertionError(f"the dense weight of a {type(self).__name__} was materialised")

    monkeypatch.setattr(SparseMatmul, "dense_weight", refuse)


# ------------------------------------------------------------------------------------------- the weight surface
def test_weight_view_has_the_dense_metadata_and_values_on_demand():
    torch.manual_seed(0)
    layer = nn.Linear(32, 12)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    masks = magnitude_prune(nn.ModuleDict({"fc": layer, "conv": conv}), 0.8)
    sparse = SparseLinear(layer.weight, layer.bias, masks["fc.weight"], kernel="sum")
    weight = sparse.weight
    assert isinstance(weight, torch.Tensor) and isinstance(weight, DenseWeightView)
    assert (weight.shape, weight.dtype, weight.device, weight.requires_grad) == (
        torch.Size([12, 32]), torch.float32, torch.device("cpu"), False,
    )  # fmt: skip
    assert (sparse.in_features, sparse.out_features, tuple(sparse.bias.shape)) == (32, 12, (12,))
    assert "DenseWeightView(shape=(12, 32)" in repr(weight) and f"nnz={int(masks['fc.weight'].sum())}" in repr(weight)
    x = torch.randn(5, 32)
    assert torch.equal(weight.clone(), layer.weight.detach())  # values rebuilt exactly from the kept weights
    assert_close(F.linear(x, weight, sparse.bias), layer(x).detach(), **TOL)  # an op on the view is computed dense
    assert "weight" not in sparse.state_dict()  # a view, not state: the buffers stay the only storage
    if ckernels.available():
        sconv = SparseConv2d.from_conv(conv, masks["conv.weight"])
        assert sconv.weight.shape == conv.weight.shape and sconv.weight.dtype == torch.float32
        assert (sconv.in_channels, sconv.out_channels, sconv.groups, sconv.kernel_size) == (3, 8, 1, (3, 3))
        assert torch.equal(sconv.weight + 0, conv.weight.detach())


def test_old_bias_shape_loads():
    layer = SparseLinear(torch.eye(4), torch.arange(4.0), kernel="sum")
    state = layer.state_dict()
    state["bias"] = state["bias"].unsqueeze(1) * 2  # as saved before the bias was stored flat
    layer.load_state_dict(state)
    assert torch.equal(layer.bias, torch.arange(4.0) * 2)


# ---------------------------------------------------------------------------- nn.TransformerEncoder, fast path
def encoder(d_model: int = 256, ffn: int = 1024) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model, 4, ffn, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@needs_c
@pytest.mark.parametrize("training", [False, True])
def test_transformer_encoder_runs_converted_with_the_fast_path_on(training, monkeypatch):
    torch.manual_seed(0)
    assert torch.backends.mha.get_fastpath_enabled()
    model = encoder().eval()
    masks = magnitude_prune(model, 0.95, include=["*linear1.weight", "*linear2.weight"])
    x = torch.randn(8, 16, 256)
    sparse = to_sparse_inference(model, masks, example_inputs=x)  # crossovers measured on this machine
    converted = conversion_report(sparse).converted
    assert sorted(converted) == [f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    first = sparse.layers[0]
    assert isinstance(first.linear1, SparseLinear) and first.linear1.weight.shape == (1024, 256)
    forbid_dense_weights(monkeypatch)  # the fast-path checks read the weights' metadata only
    model.train(training)
    sparse.train(training)
    with torch.no_grad():
        want, got = model(x), sparse(x)
    assert_close(got, want, **TOL)


# ---------------------------------------------------------------------------------------------- Hugging Face
def tiny_t5():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=128, d_model=256, d_kv=32, d_ff=1024, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


@needs_c
def test_hf_t5_runs_converted(monkeypatch):
    torch.manual_seed(0)
    model = tiny_t5().eval()
    masks = magnitude_prune(model, 0.95, include=["*DenseReluDense.wi.weight", "*DenseReluDense.wo.weight"])
    batch = {"input_ids": torch.randint(1, 128, (4, 16)), "decoder_input_ids": torch.randint(1, 128, (4, 16))}
    sparse = to_sparse_inference(model, masks, example_inputs=batch)
    report = conversion_report(sparse)
    assert len(report.converted) == 8 and report.max_abs_diff < 1e-5  # wi and wo of 2 + 2 blocks
    forbid_dense_weights(monkeypatch)  # T5 reads wo.weight.dtype before every wo call
    with torch.no_grad():
        assert_close(sparse(**batch).logits, model(**batch).logits, **TOL)


@needs_c
def test_hf_vit_runs_converted(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=1024, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    include = ["*patch_embeddings.projection.weight", "*mlp.fc1.weight", "*mlp.fc2.weight"]
    masks = magnitude_prune(model, 0.95, include=include)
    images = torch.randn(8, 3, 32, 32)
    sparse = to_sparse_inference(model, masks, crossover=1.0, example_inputs=images)
    projection = sparse.vit.embeddings.patch_embeddings.projection
    assert isinstance(projection, SparseConv2d) and projection.weight.dtype == torch.float32  # ViT may read it
    assert len(conversion_report(sparse).converted) == 5
    forbid_dense_weights(monkeypatch)
    with torch.no_grad():
        assert_close(sparse(images).logits, model(images).logits, **TOL)


# ------------------------------------------------------------------------------------------------ compiling
def lenet() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class Block(nn.Module):
    def __init__(self, d: int = 256, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.norm = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "factory", "shape"),
    [
        ("lenet", lenet, (64, 784)),
        ("mlp stack", lambda: nn.Sequential(Block(), Block()), (8, 8, 256)),
        ("conv", conv_net, (4, 3, 16, 16)),
    ],
)
def test_torch_compile_fullgraph(name, factory, shape):
    if name == "conv" and not ckernels.available():
        pytest.skip("direct sparse convolution needs the compiled kernels")
    torch.manual_seed(0)
    model = factory().eval()
    masks = magnitude_prune(model, 0.95)
    x = torch.randn(*shape)
    sparse = to_sparse_inference(model, masks, crossover=1.0, example_inputs=x)
    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(sparse, fullgraph=True, backend=capture)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert_close(got, want, **TOL)
    (graph,) = graphs
    called = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    ours = {t for t in called if t.startswith("lightning_pai.")}
    expected = {"lightning_pai.sparse_mm_t.default"} | (
        {"lightning_pai.sparse_conv2d.default"} if name == "conv" else set()
    )
    assert ours == expected  # each converted layer is one custom op in the graph
    with torch.no_grad():  # the model's LayerNorms have trainable parameters: no graph may be recorded
        assert_close(torch.compile(sparse, fullgraph=True)(x), want, **TOL)  # and inductor runs it


def test_fake_implementations_give_the_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    magnitude_prune(layer, 0.5)
    sparse = SparseLinear(layer.weight, layer.bias, kernel="sum")
    buffers = [sparse.crow_indices, sparse.col_indices, sparse.values, sparse.bias]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        xt = mode.from_tensor(torch.randn(16, 9))
        out = torch.ops.lightning_pai.sparse_mm_t(*buffers, xt, 16, "csr", "sum", "relu")
    assert (tuple(out.shape), out.dtype) == ((6, 9), torch.float32)
    torch.library.opcheck(torch.ops.lightning_pai.sparse_mm_t, (*buffers, torch.randn(16, 9), 16, "csr", "sum", "none"))
