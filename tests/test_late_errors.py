"""Errors that used to come late or say the wrong thing (issue 22): each is raised before the first training step,
names the argument and says what to do."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from helpers import (
    TARGET_SHAPES,
    assert_enforced,
    every_callback,
    import_ns,
    make_dataloader,
    make_module,
    make_trainer,
)
from torch import nn

from lightning_pai import PruneAtInit, RigL, Sparsifier, select_targets
from lightning_pai.core.masks import MaskSet
from lightning_pai.core.report import effective_masks, sparsity_report

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

CALLBACKS = every_callback()  # 16 optimizer steps (2 epochs of 8 batches), sparsity 0.8
#: What the targets keep at sparsity 0.8 with `conv.weight` frozen and skipped: fc1 (32x56) and fc2 (4x32).
TRAINABLE_TOTAL = 32 * 56 + 4 * 32
SKIPPED_LINE = "skipped 1 frozen parameter (requires_grad=False), left dense: conv.weight"


def _frozen_first_layer():
    module = make_module(seed=0)
    module.conv.weight.requires_grad_(False)
    return module, module.conv.weight.detach().clone()


def _fit(cb, module, **kwargs):
    trainer = make_trainer(callbacks=[cb], max_epochs=2, max_steps=-1, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, make_dataloader())
    return trainer, [str(w.message) for w in caught]


# --------------------------------------------------------------------------------------------------- (a) frozen
@pytest.mark.parametrize("name", list(CALLBACKS))
def test_frozen_parameters_are_skipped_by_every_method(name):
    module, frozen_before = _frozen_first_layer()
    cb = CALLBACKS[name]()
    trainer, messages = _fit(cb, module)
    assert trainer.global_step == 16
    assert torch.equal(module.conv.weight, frozen_before)  # not pruned, not trained
    assert cb.masks.names == ["fc1.weight", "fc2.weight"]
    kept = sum(int(m.sum()) for _, m in cb.masks.items())
    if cb.card.exact_sparsity:
        assert abs(kept - 0.2 * TRAINABLE_TOTAL) <= 3, kept
    assert_enforced(cb, module)
    warning = [m for m in messages if "frozen" in m]
    assert warning == [
        f"`{name}`: {SKIPPED_LINE}. Pass `frozen='prune'` to prune them too, or exclude them to silence this "
        "warning (`exclude=['conv.weight']`)."
    ]
    report = cb.report(module)
    assert report.skipped == ("conv.weight",)
    assert str(report).splitlines()[-1] == "Skipped 1 frozen parameter (requires_grad=False), left dense: conv.weight."


def test_an_excluded_frozen_parameter_is_not_reported_as_skipped():
    module, _ = _frozen_first_layer()
    cb = RigL(0.8, delta_t=2, t_end=1.0, exclude="conv.weight", verbose=False)
    trainer, messages = _fit(cb, module)
    assert trainer.global_step == 16
    assert not [m for m in messages if "frozen" in m]
    assert cb.report(module).skipped == ()


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_frozen_prune_works_or_refuses_before_training_naming_the_parameter(name):
    module, frozen_before = _frozen_first_layer()
    cb = CALLBACKS[name](frozen="prune")
    conflict = cb.session.frozen_conflict()
    if conflict is None:
        trainer, _ = _fit(cb, module)
        assert trainer.global_step == 16
        assert cb.masks.names == list(TARGET_SHAPES)
        mask = cb.masks["conv.weight"]
        assert 0 < int(mask.sum()) < mask.numel()  # pruned, not skipped
        assert torch.equal(module.conv.weight[mask], frozen_before[mask])  # kept weights: still frozen
        assert_enforced(cb, module)
        return
    trainer = make_trainer(callbacks=[cb], max_epochs=2, max_steps=-1)
    message = (
        f"`{name}` {conflict}, which a frozen parameter (`requires_grad=False`) cannot follow; frozen targets: "
        "conv.weight. Leave them dense with `frozen='skip'` (the default), exclude them (`exclude=['conv.weight']`), "
        "or unfreeze them before fitting."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.fit(module, make_dataloader())
    assert trainer.global_step == 0
    assert torch.equal(module.conv.weight, frozen_before)


def test_frozen_prune_covers_the_methods_whose_masks_need_no_gradient():
    works = {name for name, factory in CALLBACKS.items() if factory(frozen="prune").session.frozen_conflict() is None}
    learned = {name for name, factory in CALLBACKS.items() if factory().card.family == "learned"}
    # scores learn over frozen weights too
    assert learned == {"EdgePopup", "Supermask", "MovementPruning", "TrainableThresholds", "ContinuousSparsification"}
    assert works == {"PruneAtInit", "LotteryTicket", "GradualMagnitudePruning"} | learned
    assert CALLBACKS["RigL"](frozen="prune").session.frozen_conflict() == (
        "regrows weights during training (a frozen weight regrown from zero would stay zero)"
    )


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_frozen_error_refuses_before_training(name):
    module, frozen_before = _frozen_first_layer()
    trainer = make_trainer(callbacks=[CALLBACKS[name](frozen="error")], max_epochs=2, max_steps=-1)
    message = (
        "1 target is frozen (`requires_grad=False`): conv.weight. Pass `frozen='skip'` to leave frozen parameters "
        "dense, `frozen='prune'` to prune them anyway, `exclude=['conv.weight']`, or unfreeze them before fitting."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.fit(module, make_dataloader())
    assert trainer.global_step == 0
    assert torch.equal(module.conv.weight, frozen_before)


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_frozen_is_checked_in_init(name):
    with pytest.raises(ValueError, match=re.escape("`frozen` must be one of 'skip', 'prune', 'error'; got 'keep'.")):
        CALLBACKS[name](frozen="keep")


def test_sparsifier_skips_frozen_parameters_too():
    module, frozen_before = _frozen_first_layer()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=re.escape(f"`RigL`: {SKIPPED_LINE}.")):
        sparsifier = Sparsifier(RigL(0.8, delta_t=2, verbose=False), module, optimizer, total_steps=8)
    for x, y in make_dataloader():
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        sparsifier.step()
    assert sparsifier.masks.names == ["fc1.weight", "fc2.weight"]
    assert torch.equal(module.conv.weight, frozen_before)
    assert sparsifier.report().skipped == ("conv.weight",)
    assert sparsifier.global_step == 8


def test_hf_trainer_skips_frozen_parameters_too(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lightning_pai.hf import SparsityCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertForSequenceClassification(config)
    for p in model.bert.encoder.layer[0].parameters():  # the bottom layer frozen, as in partial fine-tuning
        p.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.bert.encoder.layer[0].named_parameters()}
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 20, (6,), generator=gen), "labels": torch.tensor(i % 2)} for i in range(32)]
    callback = SparsityCallback(RigL(0.8, delta_t=2, t_end=1.0, verbose=False))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=8, max_steps=4,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    skipped = [f"bert.encoder.layer.0.{n}" for n in ("attention.self.query.weight", "attention.self.key.weight")]
    with pytest.warns(
        UserWarning,
        match=re.escape(
            f"`RigL`: skipped 6 frozen parameters (requires_grad=False), left dense: {skipped[0]}, {skipped[1]}"
        ),
    ):
        trainer.train()
    assert trainer.state.global_step == 4
    assert not any(n.startswith("bert.encoder.layer.0.") for n in callback.masks.names)
    assert len(callback.masks) == 8  # layer 1's q, k, v, o, intermediate, output; the pooler; the classifier
    assert all(torch.equal(p, frozen[n]) for n, p in model.bert.encoder.layer[0].named_parameters())


def test_select_targets_frozen_modes():
    module, _ = _frozen_first_layer()
    assert list(select_targets(module)) == list(TARGET_SHAPES)  # the engine's default keeps them
    assert list(select_targets(module, frozen="skip")) == ["fc1.weight", "fc2.weight"]
    assert list(select_targets(module, exclude="conv.weight", frozen="error")) == ["fc1.weight", "fc2.weight"]
    for p in module.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=re.escape("Every target is frozen (`requires_grad=False`): conv.weight, ")):
        select_targets(module, frozen="skip")


# ----------------------------------------------------------------------------------------------------- (b) lazy
def _lazy_module(kind: str):
    pl = import_ns("lightning.pytorch")

    class LazyModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.x = nn.LazyLinear(8) if kind == "linear" else nn.LazyConv1d(8, 3)
            self.fc = nn.LazyLinear(4)

        def forward(self, x):
            return self.fc(torch.relu(self.x(x if kind == "conv" else x.flatten(1))).flatten(1))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return LazyModule()


@pytest.mark.parametrize(("kind", "cls"), [("linear", "nn.LazyLinear"), ("conv", "nn.LazyConv1d")])
def test_uninitialized_lazy_parameters_fail_at_setup(kind, cls):
    module = _lazy_module(kind)
    trainer = make_trainer(callbacks=[RigL(0.8, delta_t=2, verbose=False)], max_steps=4)
    kinds = cls if cls == "nn.LazyLinear" else f"{cls}, nn.LazyLinear"
    message = (
        f"Parameters `x.weight`, `fc.weight` are uninitialized ({kinds}): run one forward pass (e.g. "
        "`model(example_batch)`) before fitting, so that lazy modules get their shapes, or exclude them "
        "(`exclude=['x.weight', 'fc.weight']`)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.fit(module, make_dataloader())
    assert trainer.global_step == 0


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lazy_modules_train_after_one_forward(kind):
    module = _lazy_module(kind)
    module(next(iter(make_dataloader()))[0])  # materialises the lazy weights
    cb = RigL(0.8, delta_t=2, t_end=1.0, verbose=False)
    make_trainer(callbacks=[cb], max_steps=4).fit(module, make_dataloader())
    assert cb.masks.names == ["x.weight", "fc.weight"]
    assert cb.report().sparsity == pytest.approx(0.8, abs=0.01)


@pytest.mark.parametrize(
    ("layer", "cls"), [(nn.LazyLinear(4), "nn.LazyLinear"), (nn.LazyConv2d(4, 3), "nn.LazyConv2d")]
)
def test_select_targets_names_a_lazy_parameter(layer, cls):
    model = nn.Sequential(layer, nn.ReLU(), nn.LazyLinear(2) if cls == "nn.LazyLinear" else nn.Flatten())
    first = (
        "Parameters `0.weight`, `2.weight` are uninitialized (nn.LazyLinear)"
        if cls == "nn.LazyLinear"
        else "Parameter `0.weight` is uninitialized (nn.LazyConv2d)"
    )
    with pytest.raises(ValueError, match=re.escape(first + ": run one forward pass (e.g. `model(example_batch)`)")):
        select_targets(model)
    if cls == "nn.LazyConv2d":  # excluded: nothing left to prune, and the message says so
        with pytest.raises(ValueError, match="The model has no prunable parameter"):
            select_targets(model, exclude="0.weight")


# ------------------------------------------------------------------------------------------- (c) forward_fn hint
def _tiny_t5(**config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kwargs = dict(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2)
    cfg = transformers.T5Config(decoder_start_token_id=0, pad_token_id=0, **{**kwargs, **config})
    return transformers.T5ForConditionalGeneration(cfg)


def _t5_batch():
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, 32, (2, 5), generator=gen),
        "labels": torch.randint(1, 32, (2, 3), generator=gen),
    }


@pytest.mark.parametrize("method", ["synflow", "snip"])
def test_encoder_decoder_forward_failure_names_forward_fn(method):
    model = _tiny_t5()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as info:
        Sparsifier(PruneAtInit(method, 0.5, verbose=False), model, optimizer, data=[_t5_batch()])
    message = str(info.value)
    assert message.startswith(
        "Cannot call the model's forward on the batch's inputs (keyword arguments ['input_ids']: every key of the "
        "batch but labels/label/targets/target/y): ValueError: "
    )
    assert "Pass `forward_fn(module, batch) -> (logits, targets)`" in message
    assert isinstance(info.value.__cause__, ValueError)  # HF's own error, chained
    assert "input_ids" in str(info.value.__cause__)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing pruned


@pytest.mark.parametrize("method", ["synflow", "snip"])
def test_encoder_decoder_scores_with_the_hinted_forward_fn(method):
    model = _tiny_t5()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method_cb = PruneAtInit(
        method, 0.5, verbose=False, forward_fn=lambda m, b: (m(**b).logits.flatten(0, 1), b["labels"].flatten())
    )
    sparsifier = Sparsifier(method_cb, model, optimizer, data=[_t5_batch()])
    assert len(sparsifier.masks) == 16  # 3 attentions x (q, k, v, o) + 2 feed-forwards x (wi, wo); lm_head is tied
    assert sparsifier.report().sparsity == pytest.approx(0.5, abs=1e-3)


def test_a_runtime_error_in_forward_is_not_rewrapped():
    from lightning_pai.core.scorers import call_forward

    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        call_forward(nn.Linear(3, 2), torch.ones(1, 4))


# ------------------------------------------------------------------------------------------------ (d) tied heads
def _tiny_gpt2(tie: bool = True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize(
    ("make", "owner"), [(_tiny_gpt2, "transformer.wte.weight"), (_tiny_t5, "shared.weight")], ids=["gpt2", "t5"]
)
def test_excluding_a_tied_head_says_it_is_tied(make, owner):
    model = make()
    message = (
        "`exclude` entry 'head' (the preset; here 'lm_head.weight') matches no parameter among the targets: "
        f"`lm_head.weight` is the same tensor as `{owner}` (tied weights), and a shared tensor is selected under its "
        f"first name. `{owner}` (nn.Embedding) is not a target, so it is dense already: drop 'head' from `exclude`."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        select_targets(model, exclude="head")
    with pytest.raises(ValueError, match=re.escape(message)):  # the same from a method, before training
        Sparsifier(
            PruneAtInit("magnitude", 0.5, exclude="head", verbose=False),
            model,
            torch.optim.SGD(model.parameters(), 0.1),
        )


def test_including_a_tied_head_names_the_tensor_to_select():
    model = _tiny_gpt2()
    message = (
        "`include` entry 'lm_head.weight' matches no parameter: `lm_head.weight` is the same tensor as "
        "`transformer.wte.weight` (tied weights), and a shared tensor is selected under its first name. Include it as "
        "'transformer.wte.weight' (one tensor: pruning it prunes both)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        select_targets(model, include="lm_head.weight")
    assert list(select_targets(model, include="transformer.wte.weight")) == ["transformer.wte.weight"]


def test_an_untied_head_is_excluded_as_before():
    model = _tiny_gpt2(tie=False)
    assert "lm_head.weight" in select_targets(model)
    assert "lm_head.weight" not in select_targets(model, exclude="head")


# ----------------------------------------------------------------------------------------- (e) effective sparsity
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg)


def test_effective_sparsity_refuses_a_llama_whose_widths_all_match():
    model = _tiny_llama()
    masks = MaskSet.from_module(model)
    gen = torch.Generator().manual_seed(0)
    masks.update_({n: torch.rand(m.shape, generator=gen) > 0.8 for n, m in masks.items()})
    plain = effective_masks(dict(masks.items()), masks.layouts)  # what used to be reported: a number, and wrong
    assert sum(int(m.sum()) for m in plain.values()) < sum(int(m.sum()) for _, m in masks.items())
    with pytest.raises(ValueError) as info:
        sparsity_report(model, masks, effective=True)
    message = str(info.value)
    assert message.startswith(
        "Cannot check that the 15 targets of `LlamaForCausalLM` (model.layers.0.self_attn.q_proj.weight, "
        "model.layers.0.self_attn.k_proj.weight, model.layers.0.self_attn.v_proj.weight, ...) form a plain chain, "
        "and without `example_inputs`, effective sparsity is only defined for a plain chain of layers: torch.fx "
        "cannot trace its forward ("
    )
    assert message.endswith(
        "Pass `example_inputs=` (one input of the model) to compute it on any graph by synaptic flow, or use "
        "`effective=False` (the masks' own sparsity is exact)."
    )
    assert sparsity_report(model, masks).sparsity == pytest.approx(
        1 - sum(int(m.sum()) for _, m in masks.items()) / masks.total
    )


class _Attention(nn.Module):
    """q/k/v/o projections of one width, all nn.Linear: traceable, and not a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        attn = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
        return self.o(attn @ self.v(x))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.c(h + torch.relu(self.b(h)))


TAIL = (
    "and without `example_inputs`, effective sparsity is only defined for a plain chain of layers. Pass "
    "`example_inputs=`"
)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            _Attention(),
            "The chain breaks at `k.weight`: its input comes from the model's input, not from `q.weight` "
            "(parallel branches), ",
        ),
        (
            _Residual(),
            "The chain breaks at `c.weight`: `add` combines 2 tensors (a residual, concatenation, product or "
            "several outputs), ",
        ),
        (
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2)),
            "The chain breaks at `4.weight`: `3` (LayerNorm) runs between it and the previous target `2.weight` "
            "and mixes their units (only activations, dropout, pooling, batch norm and flattening keep them), ",
        ),
    ],
    ids=["attention", "residual", "layernorm"],
)
def test_effective_sparsity_names_the_layer_where_the_chain_breaks(model, message):
    with pytest.raises(ValueError, match=re.escape(message + TAIL)):
        sparsity_report(model, MaskSet.from_module(model), effective=True)


def test_effective_sparsity_of_a_plain_chain_is_unchanged():
    # The hand example of test_engine (2 -> 3 -> 3 -> 1), now with activations and dropout between the layers.
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Dropout(0.1), nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 1))
    m1 = torch.tensor([[0, 0], [1, 0], [1, 1]], dtype=torch.bool)
    m2 = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    m3 = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    masks = MaskSet.from_module(model)
    masks.update_({"0.weight": m1, "3.weight": m2, "5.weight": m3})
    report = sparsity_report(model, masks, effective=True)
    assert [r.effective_kept for r in report.rows] == [3, 3, 2]
    assert report.effective_sparsity == pytest.approx(1 - 8 / 18)


def test_effective_sparsity_of_a_conv_chain_matches_the_mask_computation():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    )
    conv = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    conv[1] = False  # channel 1 is dead: its 4 flattened positions feed nothing
    masks = MaskSet.from_module(model)
    masks.update_({"0.weight": conv, "5.weight": torch.ones(3, 8, dtype=torch.bool)})
    report = sparsity_report(model, masks, effective=True)
    assert [r.effective_kept for r in report.rows] == [9, 12]


def test_effective_sparsity_of_the_tiny_module_and_without_a_module():
    module = make_module(seed=0)
    cb_masks = MaskSet.from_module(module)
    assert sparsity_report(module, cb_masks, effective=True).effective_sparsity == 0.0
    with pytest.raises(ValueError, match=re.escape("`effective=True` needs the `module`")):
        sparsity_report(None, cb_masks, effective=True)
