"""Bit-packed masks, the compressed sparse state-dict format, and make_permanent."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from lightning_pai.core.masks import MaskSet
from lightning_pai.core.packing import pack_mask, packed_size, unpack_mask
from lightning_pai.deploy.export import (
    FORMAT_NAME,
    FORMAT_VERSION,
    dense_state_dict,
    load_sparse,
    make_permanent,
    save_sparse,
    sparse_state_dict,
)

SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (8,), (9,), (17,), (3, 5, 7), (2, 3, 4, 5), (300, 784)]


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_pack_roundtrip_and_numpy_format(shape, p):
    g = torch.Generator().manual_seed(hash((shape, p)) % 2**31)
    mask = torch.rand(shape, generator=g) < p
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(mask.numel() / 8) == packed_size(mask.numel())
    # documented format: numpy's packbits with little-endian bit order over the row-major flattening
    np.testing.assert_array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1), bitorder="little"))
    restored = unpack_mask(packed, shape)
    assert restored.dtype == torch.bool and restored.shape == torch.Size(shape)
    assert torch.equal(restored, mask)


def test_pack_bit_order_is_little_endian():
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert pack_mask(mask).tolist() == [1, 2]  # weight 0 -> bit 0 of byte 0; weight 9 -> bit 1 of byte 1
    assert pack_mask(torch.ones(8, dtype=torch.bool)).tolist() == [255]
    assert pack_mask(torch.tensor(True)).tolist() == [1]


def test_pack_non_contiguous_mask():
    mask = torch.rand(13, 6) < 0.5
    assert torch.equal(unpack_mask(pack_mask(mask.t()), (6, 13)), mask.t())


def test_pack_errors():
    with pytest.raises(TypeError, match="bool"):
        pack_mask(torch.ones(3))
    with pytest.raises(TypeError, match="uint8"):
        unpack_mask(torch.ones(1, dtype=torch.int32), (3,))
    with pytest.raises(ValueError, match=r"ceil\(9 / 8\) = 2 bytes"):
        unpack_mask(torch.zeros(1, dtype=torch.uint8), (9,))


# ------------------------------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def prune_randomly(model: nn.Module, sparsity: float, seed: int = 0) -> MaskSet:
    """Random masks at ``sparsity`` on the default targets, applied; BatchNorm statistics made non-trivial."""
    g = torch.Generator().manual_seed(seed)
    masks = MaskSet.from_module(model)
    masks.load_state_dict({n: torch.rand(p.shape, generator=g) >= sparsity for n, p in masks.params.items()})
    masks.apply_()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.num_batches_tracked.fill_(1234)
    return masks


def assert_state_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


MODELS = {"mlp": mlp, "conv_bn": ConvBN, "resnet18": lambda: torchvision.models.resnet18(num_classes=10)}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "inferred"])
def test_save_load_bit_exact(name, with_masks, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]()
    masks = prune_randomly(model, 0.9)
    path = tmp_path / "sparse.pt"
    save_sparse(model, path, masks if with_masks else None)
    state = load_sparse(path)
    assert_state_equal(state, model.state_dict())
    fresh = MODELS[name]()
    fresh.load_state_dict(state)  # strict
    assert_state_equal(fresh.state_dict(), model.state_dict())
    payload = torch.load(path, weights_only=True)
    compressed = {n for n, v in payload["tensors"].items() if isinstance(v, dict)}
    assert compressed == set(masks.names)
    for n in compressed:  # kept values, in mask order
        entry = payload["tensors"][n]
        assert torch.equal(entry["values"], model.state_dict()[n][masks[n]])
        assert entry["shape"] == list(masks[n].shape) and entry["dtype"] == "float32"


def test_metadata_and_order_survive():
    model = ConvBN()
    prune_randomly(model, 0.5)
    state = dense_state_dict(sparse_state_dict(model))
    assert list(state) == list(model.state_dict())
    assert state._metadata == model.state_dict()._metadata
    assert state._metadata["bn1"]["version"] == 2


@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.98])
def test_file_size(sparsity, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512))
    masks = prune_randomly(model, sparsity)
    save_sparse(model, tmp_path / "sparse.pt", masks)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    sparse_bytes, dense_bytes = (tmp_path / "sparse.pt").stat().st_size, (tmp_path / "dense.pt").stat().st_size
    kept = sum(masks.kept().values())
    expected = kept * 4 + masks.total / 8 + (1024 + 512) * 4  # values + 1 bit per weight + dense biases
    assert expected <= sparse_bytes <= expected + 4096  # plus pickle/zip overhead
    assert sparse_bytes / dense_bytes < (1 - sparsity) + 0.125 / 4 + 0.01
    if sparsity == 0.9:
        assert sparse_bytes / dense_bytes <= 0.15


def test_half_values(tmp_path):
    model = mlp()
    masks = prune_randomly(model, 0.9)
    save_sparse(model, tmp_path / "a.pt", masks, dtype=torch.float16)
    save_sparse(model, tmp_path / "b.pt", masks)
    assert (tmp_path / "a.pt").stat().st_size < 0.7 * (tmp_path / "b.pt").stat().st_size
    state = load_sparse(tmp_path / "a.pt")
    w = model.state_dict()["0.weight"]
    assert state["0.weight"].dtype == torch.float32
    torch.testing.assert_close(state["0.weight"], w, atol=1e-3, rtol=1e-3)
    assert torch.equal(state["0.weight"] != 0, masks["0.weight"])
    assert torch.equal(state["0.bias"], model.state_dict()["0.bias"])  # only the masked values are cast


def test_in_memory_and_file_objects():
    model = mlp()
    masks = prune_randomly(model, 0.8)
    payload = sparse_state_dict(model.state_dict(), masks)
    assert payload["header"] == {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    assert_state_equal(dense_state_dict(payload), model.state_dict())
    buf = io.BytesIO()
    save_sparse(model.state_dict(), buf)  # plain state dict, masks inferred from zeros of 2-D *weight tensors
    buf.seek(0)
    assert_state_equal(load_sparse(buf), model.state_dict())


def test_inferred_masks_only_when_smaller():
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, :5] = 0.0  # 5 zeros out of 235200: compressing would cost more
        model[2].weight[:, :200] = 0.0  # density 1/3
    payload = sparse_state_dict(model)
    kinds = {n: isinstance(v, dict) for n, v in payload["tensors"].items()}
    assert kinds == {"0.weight": False, "0.bias": False, "2.weight": True, "2.bias": False, "4.weight": False,
                     "4.bias": False}  # fmt: skip


def test_negative_zero_comes_back_as_zero():
    model = nn.Linear(8, 4)
    mask = torch.rand(4, 8) < 0.5
    with torch.no_grad():
        model.weight.copy_(-model.weight.abs() - 0.1)
        model.weight.mul_(mask)  # leaves -0.0 at pruned positions
    state = dense_state_dict(sparse_state_dict(model, {"weight": mask}))
    assert torch.equal(state["weight"], model.weight.detach())
    assert not torch.signbit(state["weight"][~mask]).any()


def test_errors(tmp_path):
    model = mlp()
    masks = prune_randomly(model, 0.5)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    with pytest.raises(ValueError, match="not a lightning_pai sparse state dict.*plain state dict"):
        load_sparse(tmp_path / "dense.pt")
    payload = sparse_state_dict(model, masks)
    payload["header"] = {"format": "something.else", "version": 1}
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lightning_pai sparse state dict"):
        load_sparse(tmp_path / "other.pt")
    payload["header"] = {"format": FORMAT_NAME, "version": FORMAT_VERSION + 1}
    with pytest.raises(ValueError, match=f"version {FORMAT_VERSION + 1}.*Upgrade"):
        dense_state_dict(payload)
    with pytest.raises(KeyError, match="nope.weight"):
        sparse_state_dict(model, {"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        sparse_state_dict(model, {"0.weight": torch.ones(3, dtype=torch.bool)})
    dense_model = mlp()
    with pytest.raises(ValueError, match="nonzero values where its mask is False"):
        sparse_state_dict(dense_model, masks)
    with pytest.raises(TypeError, match="floating"):
        sparse_state_dict(model, masks, dtype=torch.int8)


# ---------------------------------------------------------------------------------------------- permanent
def test_make_permanent():
    torch.manual_seed(0)
    model = ConvBN()
    masks = MaskSet.from_module(model)
    masks.load_state_dict({n: torch.rand(p.shape) < 0.3 for n, p in masks.params.items()})
    before = {n: t.clone() for n, t in model.state_dict().items()}
    plain = make_permanent(model, masks)
    assert_state_equal(model.state_dict(), before)  # the original is untouched (not yet masked)
    model_masked = ConvBN()
    model_masked.load_state_dict(before)
    params = dict(model_masked.named_parameters())
    MaskSet({n: params[n] for n in masks.names}, masks.state_dict()).apply_()
    assert_state_equal(plain.state_dict(), model_masked.state_dict())
    for n in masks:
        p = dict(plain.named_parameters())[n]
        assert type(p) is nn.Parameter
        assert int((p != 0).sum()) == int(masks[n].sum()) and bool((p[~masks[n]] == 0).all())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in plain.modules())
    x = torch.randn(2, 3, 8, 8)
    plain.eval(), model_masked.eval()
    assert torch.equal(plain(x), model_masked(x))


def test_make_permanent_removes_torch_prune():
    from torch.nn.utils import prune

    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.9)
    expected = model[0].weight.detach().clone()
    mask = {"0.weight_orig": model[0].weight_mask.bool()}
    plain = make_permanent(model, {})
    assert set(plain.state_dict()) == set(mlp().state_dict())
    assert torch.equal(plain[0].weight, expected) and not plain[0]._forward_pre_hooks
    assert int((plain[0].weight == 0).sum()) == round(0.9 * 784 * 300)
    with pytest.raises(KeyError, match="0.weight_orig"):
        make_permanent(plain, mask)
    with pytest.raises(ValueError, match="shape"):
        make_permanent(plain, {"0.weight": torch.ones(3, dtype=torch.bool)})


def _saved_lenet(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    masks = {n: torch.rand(p.shape) < 0.1 for n, p in model.named_parameters() if p.dim() == 2}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    path = tmp_path / "model.sparse.pt"
    save_sparse(model, path, masks)
    return model, path


@pytest.mark.parametrize("record", ["values", "mask", "bias"])
def test_a_flipped_byte_in_any_record_is_refused(tmp_path, record):
    """Every record carries a sha256: changed value, mask or plain-tensor bytes fail to load, naming the entry."""
    model, path = _saved_lenet(tmp_path)
    payload = torch.load(path, weights_only=True)
    if record == "bias":
        payload["tensors"]["0.bias"].view(torch.uint8)[5] ^= 0x10
        name = "0.bias"
    else:
        payload["tensors"]["2.weight"][record].view(torch.uint8)[3] ^= 0x01
        name = "2.weight"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=rf"Entry '{name}' does not match the checksum written with it"):
        load_sparse(path)


def test_checksums_are_written_and_version_1_files_are_still_read(tmp_path):
    model, path = _saved_lenet(tmp_path)
    payload = torch.load(path, weights_only=True)
    assert payload["header"]["version"] == 2
    assert set(payload["checksums"]) == set(model.state_dict())  # one per record
    old = {"header": {**payload["header"], "version": 1}, "tensors": payload["tensors"], "metadata": None}
    torch.save(old, path)
    restored = load_sparse(path)
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())
