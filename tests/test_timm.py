"""Every callback on timm backbones (ResNet, ViT, ConvNeXt); presets; sparse fine-tuning from a local file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_enforced, every_callback, scheduled_updates, topology_methods
from torch.utils.data import DataLoader, TensorDataset

timm = pytest.importorskip("timm")
pl = pytest.importorskip("pytorch_lightning")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from timm_finetune import TimmClassifier, make_pruning  # noqa: E402

from lightning_pai import select_targets  # noqa: E402
from lightning_pai.core.targets import preset_names  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "resnet18": ({}, 21, ("net.conv1.weight", "net.fc.weight")),
    "vit_tiny_patch16_224": ({"img_size": 32}, 50, ("net.patch_embed.proj.weight", "net.head.weight")),
    "convnext_atto": ({}, 41, ("net.stem.0.weight", "net.head.fc.weight")),
}

CALLBACKS = every_callback(PruneAtInit={"method": "snip"})  # 2 epochs of 3 steps; sparsity 0.8


def _data(n: int = 6, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    return DataLoader(ds, batch_size=2)


def _trainer(callbacks: list, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


@pytest.mark.parametrize("name", list(MODELS))
def test_default_targets_and_presets(name):
    kwargs, n_targets, (stem, head) = MODELS[name]
    module = TimmClassifier(name, 10, model_kwargs=kwargs)
    targets = select_targets(module)
    assert len(targets) == n_targets and list(targets)[0] == stem and list(targets)[-1] == head
    assert preset_names(module, "stem_and_head") == [stem, head]
    assert list(select_targets(module, include="head")) == [head]
    assert set(select_targets(module, exclude="stem_and_head")) == set(targets) - {stem, head}
    if name == "vit_tiny_patch16_224":  # qkv / proj / mlp linears of every block; no pos_embed or norms
        block_linears = ("attn.qkv.weight", "attn.proj.weight", "fc1.weight", "fc2.weight")
        assert sum(n.endswith(block_linears) for n in targets) == 48


@pytest.mark.parametrize("method", list(CALLBACKS))
@pytest.mark.parametrize("name", list(MODELS))
def test_every_callback_trains_a_timm_backbone(name, method):
    kwargs, n_targets, (stem, head) = MODELS[name]
    torch.manual_seed(0)
    module = TimmClassifier(name, 10, model_kwargs=kwargs)
    cb = CALLBACKS[method]()
    trainer = _trainer([cb])
    trainer.fit(module, _data())
    assert trainer.global_step == 6
    assert len(cb.masks) == n_targets
    total = sum(m.numel() for _, m in cb.masks.items())
    kept = sum(int(m.sum()) for _, m in cb.masks.items())
    if cb.card.exact_sparsity:
        assert abs(kept - round(0.2 * total)) <= len(cb.masks)  # 80 % (GMP, learned: per-layer rounding)
    assert_enforced(cb, module, torch.randn(2, 3, 32, 32))
    if method in topology_methods():  # e.g. RigL at steps 2 and 4 (not 6, the last), SET at epoch 0's end
        assert cb.updates == scheduled_updates(cb, 6, 3) > 0


def test_sparse_finetune_from_a_local_pretrained_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any download attempt would fail
    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)  # 1000 classes: the "pretrained" model
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    pretrained = {k: v.clone() for k, v in source.state_dict().items()}

    module = TimmClassifier("resnet18", 10, checkpoint=str(path))
    body = {k: v for k, v in module.net.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, pretrained[k]) for k, v in body.items())  # loaded, not re-initialised
    assert module.net.fc.weight.shape == (10, 512)  # new head

    cb = make_pruning("oneshot", 0.8)
    seen = {}

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    trainer = _trainer([cb, AtStart()], max_epochs=1)
    trainer.fit(module, _data())
    assert "net.conv1.weight" not in cb.masks.names and "net.fc.weight" not in cb.masks.names
    scores = torch.cat([pretrained[n[4:]].abs().flatten() for n in cb.masks.names])
    threshold = scores.kthvalue(len(scores) - round(0.2 * len(scores))).values
    for n, m in cb.masks.items():
        w0 = pretrained[n[4:]]
        assert torch.equal(seen[n][m], w0[m])  # survivors start from the pretrained values
        assert torch.equal(seen[n][~m], torch.zeros(int((~m).sum())))
        assert bool((w0[~m].abs() <= threshold).all()) and bool((w0[m].abs() >= threshold).all())
    assert sum(int(m.sum()) for _, m in cb.masks.items()) == len(scores) - round(0.8 * len(scores))
    params = dict(module.named_parameters())
    for n, m in cb.masks.items():  # fine-tuned, masks enforced
        assert not torch.equal(params[n][m], seen[n][m])
        assert torch.equal(params[n][~m], torch.zeros(int((~m).sum())))


def test_finetune_example_runs_end_to_end(tmp_path):
    import timm_finetune

    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    acc = timm_finetune.main(
        ["--checkpoint", str(path), "--synthetic", "--method", "gmp", "--train-samples", "64", "--batch-size", "16"]
    )
    assert 0.0 <= acc <= 1.0
