"""Every model kind users train: attention, recurrent, transposed and HF layers by default, real clients
(Lightning's demo Transformer and LSTM, tiny-config HF BERT / GPT-2), honest coverage, scorers on any forward."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import assert_enforced, every_callback, make_trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_pai import MaskSet, PruneAtInit, RigL, select_targets, sparsity_report
from lightning_pai.core.distributions import erdos_renyi_densities
from lightning_pai.core.report import coverage, effective_masks
from lightning_pai.core.targets import Layout, target_layouts

pl = pytest.importorskip("lightning.pytorch")
pytestmark = pytest.mark.usefixtures("one_thread")


class HFConv1D(nn.Module):
    """What `transformers.pytorch_utils.Conv1D` is (GPT-2's linear layer), without importing transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class Kinds(pl.LightningModule):
    """One of each linear-like layer kind on a (B, 6, 8) sequence: the default targets must cover all."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.deconv = nn.ConvTranspose1d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # packed in_proj_weight + out_proj
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)  # separate q/k/v_proj_weight
        self.lstm = nn.LSTM(8, 6, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(12, 8, batch_first=True)
        self.rnn = nn.RNN(8, 8, batch_first=True)
        self.hf = HFConv1D(8, 8)
        self.head = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(8)
        self.embed = nn.Embedding(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.deconv(torch.relu(self.conv1d(x.transpose(1, 2)))).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        memory = self.embed(torch.arange(5) % 5).unsqueeze(0).expand(x.shape[0], -1, -1)
        h = h + self.cross(h, memory, memory, need_weights=False)[0]
        h = self.gru(self.lstm(self.norm(h))[0])[0]
        h = self.hf(self.rnn(h)[0])
        return self.head(h.mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


KIND_TARGETS = {
    "conv1d.weight": "conv",
    "deconv.weight": "conv_transpose",
    "attn.in_proj_weight": "attention",
    "attn.out_proj.weight": "linear",
    "cross.q_proj_weight": "linear",
    "cross.k_proj_weight": "linear",
    "cross.v_proj_weight": "linear",
    "cross.out_proj.weight": "linear",
    "lstm.weight_ih_l0": "recurrent",
    "lstm.weight_hh_l0": "recurrent",
    "lstm.weight_ih_l0_reverse": "recurrent",
    "lstm.weight_hh_l0_reverse": "recurrent",
    "gru.weight_ih_l0": "recurrent",
    "gru.weight_hh_l0": "recurrent",
    "rnn.weight_ih_l0": "recurrent",
    "rnn.weight_hh_l0": "recurrent",
    "hf.weight": "conv1d",
    "head.weight": "linear",
}


def _kinds_data(n: int = 32) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 6, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)), 8)


def test_default_targets_cover_every_linear_like_layer_with_its_layout():
    torch.manual_seed(0)
    module = Kinds()
    targets = select_targets(module)
    assert list(targets) == list(KIND_TARGETS)
    layouts = target_layouts(module, list(targets))
    assert {n: layout.kind for n, layout in layouts.items()} == KIND_TARGETS
    assert layouts["attn.in_proj_weight"].blocks == 3 and layouts["lstm.weight_ih_l0"].blocks == 4
    assert layouts["gru.weight_hh_l0"].blocks == 3 and layouts["rnn.weight_ih_l0"].blocks == 1
    assert layouts["hf.weight"].fan_in(targets["hf.weight"].shape) == 8 and layouts["hf.weight"].out_dim == 1
    assert layouts["deconv.weight"].out_dim == 1 and layouts["deconv.weight"].in_dims == (0, 2)
    cover = coverage(module, targets)
    assert [n for n, _ in cover.untargeted] == ["embed.weight"]  # embeddings, norms and biases stay opt-in
    assert cover.non_embedding_fraction == 1.0
    assert set(select_targets(module, include=nn.MultiheadAttention)) == {
        "attn.in_proj_weight",
        "cross.q_proj_weight",
        "cross.k_proj_weight",
        "cross.v_proj_weight",
    }
    assert list(select_targets(module, include=nn.Embedding)) == ["embed.weight"]
    lstm = nn.LSTM(4, 6, num_layers=2, proj_size=3)
    assert list(select_targets(lstm))[:3] == ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0"]


def test_layout_matrix_views_round_trip():
    w = torch.randn(3, 5, 7, 2)  # ConvTranspose2d: (in, out, kh, kw)
    layout = Layout("conv_transpose", 1, (0, 2, 3))
    matrix = layout.as_matrix(w)
    assert matrix.shape == (5, 42) and torch.equal(layout.from_matrix(matrix, w.shape), w)
    assert torch.equal(matrix[2], w[:, 2].reshape(-1))  # row = one output channel's fan-in
    hf = Layout("conv1d", 1, (0,))
    v = torch.randn(8, 24)  # (in, out)
    assert torch.equal(hf.as_matrix(v), v.t())


def test_erk_reads_each_kind_as_its_matrices():
    """A transposed Conv1D gets the density of the same nn.Linear; in_proj_weight that of its three E x E blocks."""
    shapes = {"linear": (24, 8), "hf": (8, 24), "in_proj": (24, 8), "qkv_block": (8, 8)}
    layouts = {
        "linear": Layout("linear"),
        "hf": Layout("conv1d", 1, (0,)),
        "in_proj": Layout("attention", 0, (1,), 3),
        "qkv_block": Layout("linear"),
    }
    dens = erdos_renyi_densities(shapes, 0.3, layouts=layouts)
    assert dens["hf"] == pytest.approx(dens["linear"])
    assert dens["in_proj"] == pytest.approx(dens["qkv_block"])  # (8 + 8) / 64, not (24 + 8) / 192
    assert dens["in_proj"] / dens["linear"] == pytest.approx((16 / 64) / (32 / 192))


def test_effective_sparsity_reads_a_transposed_layer_the_right_way_round():
    a = torch.zeros(8, 4, dtype=torch.bool)  # HF Conv1D (in=8, out=4): only input 0 -> output 1 kept
    a[0, 1] = True
    b = torch.zeros(2, 4, dtype=torch.bool)  # Linear(4 -> 2): output 0 reads input 1 (alive), output 1 reads 3
    b[0, 1] = b[1, 3] = True
    eff = effective_masks({"a": a, "b": b}, {"a": Layout("conv1d", 1, (0,)), "b": Layout("linear")})
    assert eff["a"].shape == (8, 4) and int(eff["a"].sum()) == 1
    assert eff["b"].tolist() == [[False, True, False, False], [False, False, False, False]]


METHODS = every_callback()


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_prunes_every_kind_exactly(name):
    """8 steps (2 epochs of 4); exact kept counts, pruned weights exactly 0 after SGD+momentum+wd steps."""
    torch.manual_seed(0)
    module = Kinds()
    cb = METHODS[name]()
    trainer = make_trainer(callbacks=[cb], max_epochs=2, max_steps=-1)
    trainer.fit(module, _kinds_data())
    assert cb.masks.names == list(KIND_TARGETS)
    sizes = {n: p.numel() for n, p in cb.masks.params.items()}
    total = sum(sizes.values())
    kept = {n: int(m.sum()) for n, m in cb.masks.items()}
    if cb.card.family == "learned":  # each layer keeps its own top-k: within one of 20 % (or a learned density)
        if cb.card.exact_sparsity:
            assert all(abs(kept[n] - 0.2 * s) < 1 for n, s in sizes.items()), kept
        assert_enforced(cb, module, torch.randn(5, 6, 8))
        return
    assert sum(kept.values()) == total - round(0.8 * total)
    if cb.card.family == "gradual" and getattr(cb, "distribution", None) == "uniform":
        assert all(abs(kept[n] - 0.2 * s) < 1 for n, s in sizes.items())  # every layer at 80 % (within one)
    for n, m in cb.masks.items():
        p = module.get_parameter(n)
        assert torch.equal(p[~m].detach(), torch.zeros(int((~m).sum()))), n
        assert not m.any() or bool((p[m] != 0).any()), n


def test_erk_budgets_under_rigl_follow_the_layouts():
    torch.manual_seed(0)
    module = Kinds()
    cb = RigL(0.8, delta_t=1000, verbose=False)
    make_trainer(callbacks=[cb], max_steps=1).fit(module, _kinds_data())
    shapes = {n: tuple(p.shape) for n, p in cb.masks.params.items()}
    dens = erdos_renyi_densities(shapes, 0.2, layouts=cb.masks.layouts)
    for n, m in cb.masks.items():
        assert abs(int(m.sum()) - dens[n] * m.numel()) <= 1, n


# ----------------------------------------------------------------------------------------- real clients
class _Tokens(Dataset):
    """Synthetic language-model batches: ``(inputs, targets)`` token windows, like WikiText2's."""

    def __init__(self, vocab: int = 50, n: int = 16, length: int = 12) -> None:
        gen = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, vocab, (n, length + 1), generator=gen)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


def _demo_transformer():
    from lightning.pytorch.demos.transformer import LightningTransformer

    class Local(LightningTransformer):
        def prepare_data(self) -> None:  # the demo downloads WikiText2 here
            pass

        def train_dataloader(self):
            return DataLoader(_Tokens(), batch_size=4)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Local(vocab_size=50)


def _demo_lstm():
    from lightning.pytorch.demos.lstm import LightningLSTM

    class Local(LightningLSTM):
        def prepare_data(self) -> None:
            pass

        def train_dataloader(self):
            return DataLoader(_Tokens(), batch_size=4, drop_last=True)

    torch.manual_seed(0)
    return Local(vocab_size=50)


@pytest.mark.parametrize(
    ("factory", "callback"),
    [
        (_demo_transformer, lambda: PruneAtInit("magnitude", 0.9, verbose=False)),
        (_demo_transformer, lambda: PruneAtInit("snip", 0.9, verbose=False)),
        (_demo_transformer, lambda: PruneAtInit("synflow", 0.9, iterations=2, verbose=False)),  # two-input forward
        (_demo_lstm, lambda: RigL(0.9, delta_t=2, t_end=1.0, verbose=False)),
        (_demo_lstm, lambda: PruneAtInit("magnitude", 0.9, verbose=False)),
    ],
    ids=["transformer-magnitude", "transformer-snip", "transformer-synflow", "lstm-rigl", "lstm-magnitude"],
)
def test_lightning_demo_models(factory, callback, capsys):
    module = factory()
    cb = callback()
    cb.verbose = True
    trainer = make_trainer(callbacks=[cb], max_steps=6)
    trainer.fit(module)
    cover = coverage(module, cb.masks.names)
    assert cover.non_embedding_fraction >= 0.95  # was 43.9 % (Transformer) and 0.6 % (LSTM)
    kinds = {layout.kind for layout in cb.masks.layouts.values()}
    assert ("attention" in kinds) if "Transformer" in type(module).__mro__[1].__name__ else ("recurrent" in kinds)
    total = sum(m.numel() for _, m in cb.masks.items())
    assert sum(int(m.sum()) for _, m in cb.masks.items()) == total - round(0.9 * total)
    for n, m in cb.masks.items():
        assert torch.equal(module.get_parameter(n)[~m].detach(), torch.zeros(int((~m).sum()))), n
    out = capsys.readouterr().out
    assert "of the targeted weights; masks cover" in out and "not under masks: model." in out
    if isinstance(cb, RigL):
        assert cb.updates == 2


transformers = pytest.importorskip("transformers")


def _tiny_gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _tiny_bert():
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50, num_labels=3
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


class HFModule(pl.LightningModule):
    """A LightningModule around an HF model: dict batches, ``loss`` from the model's output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


class _HFBatches(Dataset):
    def __init__(self, lm: bool, n: int = 16, length: int = 10) -> None:
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 50, (n, length), generator=gen)
        self.labels = self.ids.clone() if lm else torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


@pytest.mark.parametrize("model", ["gpt2", "bert"])
@pytest.mark.parametrize("method", ["magnitude", "snip", "grasp", "synflow"])
def test_hf_models_from_tiny_configs(model, method, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    net = _tiny_gpt2() if model == "gpt2" else _tiny_bert()
    module = HFModule(net)
    cb = PruneAtInit(method, 0.8, iterations=2 if method == "synflow" else None, verbose=False)
    trainer = make_trainer(callbacks=[cb], max_steps=4)
    trainer.fit(module, DataLoader(_HFBatches(lm=model == "gpt2"), batch_size=4))
    names = cb.masks.names
    if model == "gpt2":  # its Conv1D layers, recognised without importing transformers' classes
        assert len(names) == 8 and all(cb.masks.layouts[n].kind == "conv1d" for n in names)
    else:
        assert len(names) == 14 and names[-1] == "model.classifier.weight"  # 12 encoder linears, pooler, head
    assert coverage(module, names).non_embedding_fraction >= 0.95  # GPT-2 used to have no target at all
    total = sum(m.numel() for _, m in cb.masks.items())
    assert sum(int(m.sum()) for _, m in cb.masks.items()) == total - round(0.8 * total)
    for n, m in cb.masks.items():
        assert torch.equal(module.get_parameter(n)[~m].detach(), torch.zeros(int((~m).sum()))), n


def test_synflow_on_a_forward_it_cannot_call_names_forward_fn():
    class NeedsState(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, hidden, extra):  # three required inputs, the batch has two tensors
            return self.fc(x) + hidden

        def training_step(self, batch, batch_idx):
            return self.fc(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    trainer = make_trainer(callbacks=[PruneAtInit("synflow", 0.5, iterations=1, verbose=False)], max_steps=1)
    with pytest.raises(ValueError, match=r"Cannot call the model's forward .* Pass `forward_fn\(module, batch\)"):
        trainer.fit(NeedsState(), data)
    assert trainer.global_step == 0
    ok = PruneAtInit(
        "synflow", 0.5, iterations=1, verbose=False, forward_fn=lambda m, b: (m(b[0], torch.zeros(2), None), b[1])
    )
    make_trainer(callbacks=[ok], max_steps=1).fit(NeedsState(), data)
    assert ok.masks.density == 0.5


def test_coverage_is_reported_and_a_mostly_untargeted_model_warns(capsys):
    class MostlyEmbedding(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(1000, 16)
            self.fc = nn.Linear(16, 2)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.fc(self.embed(batch[0]).mean(1)), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randint(0, 1000, (8, 5)), torch.randint(0, 2, (8,))), batch_size=4)
    logger = _Metrics()
    cb = PruneAtInit("magnitude", 0.9)
    with pytest.warns(UserWarning, match=r"masks cover 0\.2% of the model's >=2-D parameters .* `include=`"):
        make_trainer(callbacks=[cb], max_steps=1, logger=logger).fit(MostlyEmbedding(), data)
    out = capsys.readouterr().out
    assert "sparsity 0.9062 of the targeted weights; masks cover 0.2% of the model's >=2-D parameters" in out
    assert "not under masks: embed.weight (1000x16)" in out
    assert logger.metrics["sparsity/coverage_2d"] == pytest.approx(32 / 16032)
    assert logger.metrics["sparsity/coverage"] == pytest.approx(32 / 16034)
    report = sparsity_report(MostlyEmbedding(), include="fc.weight")
    assert report.coverage is not None and math.isclose(report.coverage.matrix_fraction, 32 / 16032)


class _Metrics(pl.loggers.Logger):
    def __init__(self):
        super().__init__()
        self.metrics: dict = {}

    @property
    def name(self):
        return "metrics"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def test_mask_set_layouts_default_without_a_module():
    masks = MaskSet({"w": nn.Parameter(torch.zeros(3, 4, 5))})
    assert masks.layouts["w"] == Layout("other", 0, (1, 2))


def test_hf_bert_finetune_example_runs(monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    monkeypatch.setattr(sys, "argv", ["hf_bert_finetune.py"])
    import hf_bert_finetune

    acc = hf_bert_finetune.main(["--epochs", "1", "--train-samples", "256", "--method", "gmp"])
    assert 0.0 <= acc <= 1.0
