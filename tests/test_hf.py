"""The Hugging Face ``Trainer`` with ``lightning_pai.hf.SparsityCallback``: a tiny BERT built from a config."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import masks_equal

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning_pai import PruneAtInit, RigL, Sparsifier, get_scorer  # noqa: E402
from lightning_pai.hf import STATE_FILE, SparsityCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
KEY, VOCAB, LENGTH = 7, 50, 12


class TokenTask(torch.utils.data.Dataset):
    """Random sequences; the label says whether token ``KEY`` occurs."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(KEY + 1, VOCAB, (n, LENGTH), generator=gen)
        positive = torch.rand(n, generator=gen) < 0.5
        self.ids[positive, torch.randint(0, LENGTH, (n,), generator=gen)[positive]] = KEY
        self.labels = positive.long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": self.labels[i],
        }


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,  # deterministic scoring passes
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def _args(outdir, **kwargs) -> transformers.TrainingArguments:
    defaults = dict(
        output_dir=str(outdir),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=8,
        num_train_epochs=2,  # 8 steps per epoch
        learning_rate=1e-3,
        weight_decay=0.01,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(**{**defaults, **kwargs})


def _targets_kept(callback) -> int:
    return sum(int(m.sum()) for _, m in callback.masks.items())


def test_rigl_fine_tunes_a_tiny_bert_at_the_exact_kept_count(tmp_path):
    model = _bert()
    callback = SparsityCallback(RigL(sparsity=0.9, delta_t=2, t_end=1.0, verbose=False))
    trainer = transformers.Trainer(model, _args(tmp_path), train_dataset=TokenTask(), callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 16
    total = callback.masks.total
    assert _targets_kept(callback) == round(0.1 * total)
    params = dict(model.named_parameters())
    assert "bert.encoder.layer.0.attention.self.query.weight" in callback.masks.names
    assert "bert.embeddings.word_embeddings.weight" not in callback.masks.names
    for n, m in callback.masks.items():  # AdamW with weight decay: pruned weights exactly zero
        assert torch.equal(params[n].detach()[~m], torch.zeros(int((~m).sum())))
    assert callback.method.updates == 7  # every 2 steps, never at the last (16)
    logged = [entry for entry in trainer.state.log_history if "dst/grown" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6, 8, 10, 12, 14]


def test_resuming_from_an_hf_checkpoint_restores_the_masks(tmp_path):
    args = dict(save_strategy="steps", save_steps=6)
    full = SparsityCallback(RigL(sparsity=0.9, delta_t=2, t_end=1.0, verbose=False))
    transformers.Trainer(_bert(), _args(tmp_path / "full"), train_dataset=TokenTask(), callbacks=[full]).train()

    class Crash(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 9:
                raise RuntimeError("simulated crash")

    crashed = SparsityCallback(RigL(sparsity=0.9, delta_t=2, t_end=1.0, verbose=False))
    run = tmp_path / "run"
    trainer = transformers.Trainer(_bert(), _args(run, **args), train_dataset=TokenTask(), callbacks=[crashed, Crash()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    saved = torch.load(run / "checkpoint-6" / STATE_FILE, weights_only=True)
    assert saved["updater"]["updates"] == 3

    seen = {}

    class Probe(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.setdefault(state.global_step, resumed.masks.state_dict())

    resumed = SparsityCallback(RigL(sparsity=0.9, delta_t=2, t_end=1.0, verbose=False))
    trainer = transformers.Trainer(_bert(), _args(run, **args), train_dataset=TokenTask(), callbacks=[resumed, Probe()])
    trainer.train(resume_from_checkpoint=str(run / "checkpoint-6"))
    assert min(seen) == 6 and masks_equal(seen[6], saved["masks"])  # restored, not recomputed
    assert resumed.method.updates == 7
    assert masks_equal(dict(resumed.masks.items()), dict(full.masks.items()))  # the same run as without the crash


def test_a_checkpoint_without_the_methods_state_is_an_error(tmp_path):
    transformers.Trainer(
        _bert(), _args(tmp_path, save_strategy="steps", save_steps=4, max_steps=4), train_dataset=TokenTask()
    ).train()
    callback = SparsityCallback(RigL(sparsity=0.9, delta_t=2, verbose=False))
    trainer = transformers.Trainer(_bert(), _args(tmp_path), train_dataset=TokenTask(), callbacks=[callback])
    with pytest.raises(FileNotFoundError, match="saved without `SparsityCallback`"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_snip_scores_with_the_models_own_loss(tmp_path):
    """SNIP at train begin on the Trainer's first batch with ``outputs.loss``: the plain loop's masks on that batch."""
    seen = []

    def recording_snip(ctx):
        seen.append(ctx.batches[0])
        return get_scorer("snip")(ctx)

    callback = SparsityCallback(PruneAtInit(recording_snip, 0.8, verbose=False))
    transformers.Trainer(_bert(), _args(tmp_path, max_steps=1), train_dataset=TokenTask(), callbacks=[callback]).train()
    (batch,) = seen
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["labels"].shape == (8,)
    plain, model = PruneAtInit("snip", 0.8, verbose=False), _bert()
    Sparsifier(plain, model, torch.optim.SGD(model.parameters(), lr=0.0), data=[batch])
    # the plain loop scored cross-entropy of the logits, the Trainer the model's own loss: the same function here
    assert masks_equal(dict(callback.masks.items()), dict(plain.masks.items()))
    assert sum(int(m.sum()) for _, m in callback.masks.items()) == round(0.2 * callback.masks.total)
