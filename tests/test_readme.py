"""The README's Python examples run as pasted (in a temporary directory, on a few CPU steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python example under {heading!r}"
    return blocks[0]


def test_readme_custom_rule_example_runs():
    text = README.read_text().split("### A new method is a combination of registered rules\n", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", text.split("\n## ", 1)[0], flags=re.S)
    (block,) = [b for b in blocks if "register_growth_rule" in b]
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(block, "README: custom rule", "exec"), namespace)
    method = namespace["method"]
    plan = method.plan()
    assert plan.rewire.growth == "gradient_times_momentum" and plan.when.every == 10
    assert plan.needs() == {"grads", "momentum"}
    from helpers import make_dataloader, make_module, make_trainer

    make_trainer(max_steps=40, callbacks=[method]).fit(make_module(seed=0), make_dataloader())
    assert method.updates == 3 and method.updater.dense_gradients  # 10, 20, 30 (t_end); SGD momentum is read
    assert abs(method.masks.density - 0.1) < 1e-3


@pytest.mark.parametrize("heading", ["Add sparsity to your existing trainer", "timm backbones and sparse fine-tuning"])
def test_readme_example_runs(heading, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # lightning_logs/ and resnet18.pth land here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(_block_after(heading), f"README: {heading}", "exec"), namespace)
    callbacks = [v for v in namespace.values() if type(v).__module__.startswith("lightning_pai")]
    trainers = [v for v in namespace.values() if type(v).__name__ == "Trainer"]
    if heading.startswith("Add"):
        (trainer,) = trainers
        (cb,) = [c for c in trainer.callbacks if type(c).__name__ == "RigL"]
        assert trainer.global_step == 48 and cb.updates == 3  # 3 epochs of 16 steps: at 10, 20, 30 (t_end 36)
    else:
        (cb,) = callbacks
        assert abs(cb.masks.density - 0.2) < 1e-3
    assert cb.masks.density == pytest.approx(0.1 if heading.startswith("Add") else 0.2, abs=1e-3)


def test_readme_deployment_example_runs(tmp_path, monkeypatch, one_thread):
    """The deployment examples: compressed file, bit-exact reload, make_permanent, measured sparse inference on
    Lightning's demo Transformer (d_model 256, FFN 1024, 95 %) and on a Hugging Face T5, layers converted."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = README.read_text().split("## From sparse training to a smaller, faster model\n", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", text.split("\n## ", 1)[0], flags=re.S)
    demo, t5 = [b for b in blocks if "to_sparse_inference(" in b]
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(demo, "README: deployment", "exec"), namespace)  # asserts the sparse outputs itself
    import torch

    from lightning_pai import conversion_report

    plain, fast, masks = namespace["plain"], namespace["fast"], namespace["callback"].masks
    assert abs(masks.density - 0.05) < 1e-3
    report = conversion_report(fast)
    ffn = [f"model.transformer.{part}.layers.{i}.linear{j}" for part in ("encoder", "decoder") for i in (0, 1)
           for j in (1, 2)]  # fmt: skip
    assert set(ffn) <= set(report.converted)  # measured faster on this machine at 95 %: converted
    assert all("(measured at 512 rows" in r.reason for r in report.rows)  # the example batch's 16 x 32 rows
    assert report.max_abs_diff < 1e-5
    assert all(torch.equal(p, q) for p, q in zip(plain.state_dict().values(), namespace["model"].state_dict().values()))
    with torch.inference_mode():
        batch = namespace["batch"]
        assert torch.allclose(namespace["compiled"](*batch), plain(*batch), atol=1e-5)
    exec(compile(t5, "README: deployment on T5", "exec"), namespace)
    assert len(conversion_report(namespace["fast_t5"]).converted) == 8  # wi and wo of the 2 + 2 T5 blocks


def _blocks_under(heading: str) -> list[str]:
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def loop_examples(tmp_path_factory):
    """The three loop examples (plain PyTorch, Fabric on 2 processes, HF Trainer), each run as a script as pasted."""
    from helpers import run_script

    blocks = _blocks_under("Any training loop: plain PyTorch, Lightning Fabric, the Hugging Face Trainer")
    assert len(blocks) == 3
    out = {}
    for name, block in zip(("plain", "fabric", "hf"), blocks):
        folder = tmp_path_factory.mktemp(name)
        (folder / "example.py").write_text(block)
        out[name] = (folder, run_script(folder / "example.py").stdout)  # (retries gloo's rare exit abort once)
    return out


def test_readme_plain_loop_example_runs(loop_examples):
    folder, stdout = loop_examples["plain"]
    assert "sparsity 0.9000 of the targeted weights" in stdout
    assert "topology updates: 3" in stdout  # 48 steps: updates at 10, 20, 30 (t_end = 36)
    import torch

    saved = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert saved["sparsifier"]["step"] == 48 and saved["sparsifier"]["session"]["updater"]["updates"] == 3


def test_readme_fabric_example_runs_on_two_processes(loop_examples):
    _, stdout = loop_examples["fabric"]
    line = next(x for x in stdout.splitlines() if x.startswith("kept per layer on each rank:"))
    rows = eval(line.split(":", 1)[1])  # [[rank 0 counts], [rank 1 counts]]
    assert len(rows) == 2 and rows[0] == rows[1]
    assert sum(rows[0]) == round(0.05 * (32 * 256 + 256 * 2))


def test_readme_hf_trainer_example_runs(loop_examples):
    folder, stdout = loop_examples["hf"]
    assert "density of the attention and feed-forward matrices: 0.1000" in stdout
    assert (folder / "hf_out" / "checkpoint-8" / "lightning_pai_state.pt").exists()


def test_readme_fish_example_runs(tmp_path, monkeypatch, one_thread, capsys):
    """FISH on the tiny BERT with the HF Trainer: the exact budget, and the sizes the README states, as measured."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    heading = "Parameter-efficient fine-tuning with FISH masks"
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(_block_after(heading), "README: FISH", "exec"), namespace)  # asserts the rebuilt model itself
    report = namespace["fish"].report()
    assert report.trainable == int(0.005 * report.total) == 189
    assert report.head == ["classifier.weight", "classifier.bias"]
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    printed = re.findall(r"```text\n(.*?)```", section, flags=re.S)[0]
    out = capsys.readouterr().out
    assert report.summary() in out and report.summary() in printed
    stated = re.search(r"diff ([\d,]+) bytes, full state_dict ([\d,]+) bytes", printed).groups()
    diff, full = (int(v.replace(",", "")) for v in stated)
    assert f"diff {diff:,} bytes, full state_dict {full:,} bytes" in out  # the README's numbers are this run's


def test_readme_shrink_example_runs(tmp_path, monkeypatch, one_thread, capsys):
    """The shrink example: ChannelPruning 50 % on ResNet-18, the printed numbers, the predicted size, the file."""
    pytest.importorskip("torch_pruning")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "shrink(model" in b]
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(block, "README: shrink", "exec"), namespace)  # asserts the predicted parameter count itself
    out = capsys.readouterr().out
    assert "parameters 11,181,642 -> 2,801,450 (0.251x)" in out and "(0.266x)" in out
    small, again = namespace["small"], namespace["again"]
    x = namespace["x"]
    with torch.no_grad():
        assert torch.equal(again.eval()(x), small(x))
