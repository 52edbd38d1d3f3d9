"""Channel pruning: the channel groups of traced models, exact counts, exact zeros, the removal's numbers by hand,
the Early-Bird stopping rule, 2-process DDP and crash-and-resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from channel_helpers import WIDTHS, BNNet, image_loader, trainer
from helpers import run_script
from torch import nn
from torch.nn import functional as F

from lightning_pai import ChannelPruning, EarlyBird
from lightning_pai.callbacks._compat import CallbackBase
from lightning_pai.core.channel_scorers import list_channel_scorers, select_channels
from lightning_pai.core.channel_session import EarlyBirdWindow, mask_distance
from lightning_pai.core.channels import (
    channel_groups,
    channel_keep,
    element_masks,
    layer_positions,
    predicted_shrunk_macs,
    predicted_shrunk_params,
)

SCRIPT = Path(__file__).with_name("channels_ddp_script.py")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


def _fit(cb, module=None, callbacks=(), loader=None, **kwargs):
    module = module if module is not None else _net()
    kwargs.setdefault("max_steps", 8)
    trainer(callbacks=[cb, *callbacks], **kwargs).fit(module, loader if loader is not None else image_loader())
    return module


def _net(seed: int = 0, **kwargs) -> BNNet:
    torch.manual_seed(seed)
    return BNNet(**kwargs)


# ------------------------------------------------------------------------------------------ channel groups
def test_groups_of_resnet18_couple_residual_additions_only():
    torchvision = pytest.importorskip("torchvision")
    graph = channel_groups(torchvision.models.resnet18())
    free = {g.key for g in graph.groups if g.reason is None and not g.coupled}
    coupled = {g.members for g in graph.groups if g.coupled}
    assert free == {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)}  # every BasicBlock's conv1
    assert ("conv1", "layer1.0.conv2", "layer1.1.conv2") in coupled  # the stem and layer1 share the identity path
    assert ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2") in coupled
    assert graph.group_of("fc").reason == "reaches the model's output"
    stem = graph.group_of("conv1")
    assert ("bn1", 0) in stem.norms and ("layer1.0.bn2", 0) in stem.norms
    assert ("layer2.0.downsample.0", 0, 1) in stem.consumers
    assert graph.group_of("layer4.0.conv2").consumers[-1] == ("fc", 0, 1)  # through avgpool and flatten


def test_flatten_cat_grouped_and_cross_channel_norms():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 6, 3, padding=1)
            self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
            self.c, self.gn = nn.Conv2d(10, 5, 1), nn.GroupNorm(1, 5)
            self.d = nn.Conv2d(5, 3, 1)
            self.fc = nn.Linear(3 * 4, 2)

        def forward(self, x):
            h = torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)
            h = self.c(self.dw(h))
            h = F.adaptive_avg_pool2d(self.d(torch.relu(self.gn(h))), 2)
            return self.fc(h.flatten(1))

    graph = channel_groups(Net())
    assert "grouped or depthwise" in graph.group_of("a").reason  # feeds the depthwise conv
    assert "grouped or depthwise" in graph.group_of("dw").reason
    assert "GroupNorm" in graph.group_of("c").reason
    d = graph.group_of("d")
    assert d.reason is None and d.consumers == (("fc", 0, 4),)  # 3 channels x 2 x 2 positions


def test_global_pools_and_squeezes_flatten_only_down_to_batch_and_channels():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 5, 3), nn.Conv2d(1, 6, 3)
            self.fa, self.fb, self.fc = nn.Linear(4, 2), nn.Linear(5, 2), nn.Linear(6, 2)

        def forward(self, x):
            a = self.fa(self.a(x).mean((2, 3)))  # (B, 4): channels only
            b = self.fb(F.adaptive_avg_pool2d(self.b(x), 1).squeeze(-1).squeeze(-1))  # (B, 5)
            c = self.fc(self.c(x).mean(-1))  # (B, 6, H): the linear layer reads H, not the channels
            return a + b + c.mean(1)

    graph = channel_groups(Net())
    assert graph.group_of("a").consumers == (("fa", 0, 1),) and graph.group_of("a").reason is None
    assert graph.group_of("b").consumers == (("fb", 0, 1),) and graph.group_of("b").reason is None
    assert "on an axis other than its features" in graph.group_of("c").reason


def test_untraceable_model_error_names_the_fix_and_include_traces_around_it():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent control flow

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
            self.head = Head()

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    with pytest.raises(
        ValueError, match=r"torch.fx cannot trace `Net.forward`.*name the\s+layers to prune with `include=`"
    ):
        channel_groups(Net(), layers=["head.fc"])
    graph = channel_groups(Net(), layers=["features.0", "features.3"])  # the head becomes an opaque call
    assert graph.group_of("features.0").reason is None
    assert "flows into `head`" in graph.group_of("features.3").reason


# ------------------------------------------------------------------------------------------ exact counts
@pytest.mark.parametrize("scorer", list_channel_scorers())
@pytest.mark.parametrize("distribution", ["uniform", "global"])
def test_exact_kept_channel_counts(scorer, distribution):
    cb = ChannelPruning(0.5, scorer=scorer, distribution=distribution, batches=2, verbose=False)
    module = _fit(cb, max_steps=2)
    keep = channel_keep(module, cb.masks)
    assert sum(int(keep[n].sum()) for n in WIDTHS) == 10  # round(0.5 * 20)
    if distribution == "uniform":
        assert {n: int(keep[n].sum()) for n in WIDTHS} == {"c1": 4, "c2": 6}
    assert all(keep[n].any() for n in WIDTHS)
    assert bool(keep["fc"].all())  # the classifier reaches the output: never pruned
    assert cb.report(module).sparsity == 0.5


def test_global_ranking_keeps_one_channel_per_layer():
    scores = {"a": torch.tensor([0.1, 0.2, 0.3]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    keep = select_channels(scores, 0.5, "global")  # keep 4 (round(3.5)): the top 4 are all in b
    assert keep["a"].tolist() == [False, False, True] and keep["b"].tolist() == [False, True, True, True]
    current = {"a": torch.tensor([True, True, False]), "b": torch.ones(4, dtype=torch.bool)}
    keep = select_channels(scores, 0.5, "global", current)  # pruned channels stay pruned
    assert keep["a"].tolist() == [False, True, False] and int(keep["b"].sum()) == 3


def test_gradual_schedule_reaches_the_cubic_targets_and_only_shrinks():
    cb = ChannelPruning(0.5, scorer="l2", start=2, end=10, frequency=2, verbose=False)
    seen = []

    class Record(CallbackBase):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(channel_keep(pl_module, cb.masks, cb.session.graph))

    module = _fit(cb, callbacks=[Record()], max_steps=12)
    kept = [sum(int(k[n].sum()) for n in WIDTHS) for k in seen]
    targets = {s: round(20 * (1 - cb.session.target(s))) for s in (4, 6, 8, 10)}  # updates at 4, 6, 8, 10
    assert [kept[s - 1] for s in targets] == list(targets.values())
    assert kept[-1] == 10 and kept[0] == 20
    for before, after in zip(seen, seen[1:]):
        assert all(bool((after[n] <= before[n]).all()) for n in WIDTHS)  # masks only shrink
    assert cb.session.updates == 5 and module is not None  # at 2 (the cubic's s_i = 0), 4, 6, 8, 10


# ------------------------------------------------------------------------------------------ exact zeros
def test_pruned_rows_bias_gamma_beta_and_inputs_stay_zero_under_sgd_momentum_weight_decay():
    cb = ChannelPruning(0.5, scorer="l1", verbose=False)
    module = _fit(cb, max_steps=10)
    keep = channel_keep(module, cb.masks)
    params = dict(module.named_parameters())
    for layer, norm in (("c1", "b1"), ("c2", "b2")):
        drop = ~keep[layer]
        for name in (f"{layer}.weight", f"{layer}.bias", f"{norm}.weight", f"{norm}.bias"):
            assert torch.count_nonzero(params[name][drop]) == 0, name
            assert torch.count_nonzero(params[name][~drop]) > 0, name
    assert torch.count_nonzero(params["c2.weight"][:, ~keep["c1"]]) == 0  # the next layer's inputs
    fc_in = (~keep["c2"]).repeat_interleave(4)
    assert torch.count_nonzero(params["fc.weight"][:, fc_in]) == 0
    state = module.trainer.optimizers[0].state
    for name, mask in cb.masks.items():
        assert torch.count_nonzero(state[params[name]]["momentum_buffer"][~mask]) == 0, name


def _shrunk(module: BNNet, keep: dict) -> BNNet:
    """A smaller BNNet with only the kept channels, copied by hand."""
    k1, k2 = keep["c1"], keep["c2"]
    small = BNNet()
    small.c1, small.b1 = nn.Conv2d(1, int(k1.sum()), 3, padding=1), nn.BatchNorm2d(int(k1.sum()))
    small.c2, small.b2 = nn.Conv2d(int(k1.sum()), int(k2.sum()), 3, padding=1), nn.BatchNorm2d(int(k2.sum()))
    small.fc = nn.Linear(int(k2.sum()) * 4, 3)
    with torch.no_grad():
        small.c1.weight.copy_(module.c1.weight[k1])
        small.c1.bias.copy_(module.c1.bias[k1])
        small.c2.weight.copy_(module.c2.weight[k2][:, k1])
        small.c2.bias.copy_(module.c2.bias[k2])
        for big, little, k in ((module.b1, small.b1, k1), (module.b2, small.b2, k2)):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(little, attr).copy_(getattr(big, attr)[k])
        small.fc.weight.copy_(module.fc.weight[:, k2.repeat_interleave(4)])
        small.fc.bias.copy_(module.fc.bias)
    return small


def test_masked_model_computes_what_the_hand_built_smaller_model_computes():
    cb = ChannelPruning(0.5, scorer="bn_gamma", distribution="global", start=4, l1=1e-3, verbose=False)
    module = _fit(cb, max_steps=10)
    keep = channel_keep(module, cb.masks)
    small = _shrunk(module, keep)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    module.eval(), small.eval()
    with torch.no_grad():
        assert torch.allclose(module(x), small(x), atol=1e-6, rtol=0)
        module.train(), small.train()  # batch statistics: a removed channel never mixes into the others
        assert torch.allclose(module(x), small(x), atol=1e-6, rtol=0)
    report = cb.report(module)
    assert report.params[1] == sum(p.numel() for p in small.parameters())
    assert report.params[0] == sum(p.numel() for p in BNNet().parameters())


def test_report_says_channels_and_predicts_params_and_macs_by_hand():
    module = _net()
    graph = channel_groups(module)
    keep = {"c1": torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool), "c2": torch.arange(12) < 6}
    shapes = {n: p.shape for n, p in module.named_parameters()}
    masks = element_masks(graph, keep, shapes)
    assert {n: int(m.sum()) for n, m in channel_keep(module, masks, graph).items()} == {"c1": 4, "c2": 6, "fc": 3}
    # c1: 4x1x3x3 + 4, b1: 8 - 4 - 4... kept γ/β 4 + 4, c2: 6x4x3x3 + 6, b2: 6 + 6, fc: 3 x (6 x 4) + 3
    by_hand = (36 + 4) + (4 + 4) + (216 + 6) + (6 + 6) + (72 + 3)
    assert predicted_shrunk_params(module, masks, graph) == by_hand == 357
    assert predicted_shrunk_params(module, None, graph) == sum(p.numel() for p in module.parameters()) == 1143
    positions = layer_positions(module, torch.zeros(2, 1, 8, 8))
    assert positions == {"c1": 64, "c2": 16, "fc": 1}  # 8x8, then 4x4 after the max pool
    # MACs: c1 64 x 4 x 9, c2 16 x 6 x 4 x 9, fc 3 x 24
    assert predicted_shrunk_macs(module, masks, positions, graph) == 64 * 36 + 16 * 216 + 72
    assert predicted_shrunk_macs(module, None, positions, graph) == 64 * 72 + 16 * 864 + 144
    cb = ChannelPruning(0.5, scorer="l1", verbose=False)
    module = _fit(cb, max_steps=2)
    report = cb.report(module)
    text = str(report)
    assert "Channels kept / total" in text and "parameters 357 of 1,143" in text and "MACs" in text
    assert "channels removed" in report.summary()
    assert report.metrics()["channels/global"] == 0.5
    assert report.metrics()["channels/params_kept"] == pytest.approx(357 / 1143)
    assert "fc: reaches the model's output" in text


def test_channel_keep_needs_whole_channels_and_every_coupled_member():
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.bn0(self.stem(x)))
            h = torch.relu(self.bn1(self.conv(h)) + h)
            return self.fc(h.mean((2, 3)))

    module = Res()
    graph = channel_groups(module)
    group = graph.group_of("stem")
    assert group.members == ("stem", "conv") and group.reason is None
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in module.named_parameters()}
    for name in ("stem.weight", "stem.bias", "bn0.weight", "bn0.bias"):
        masks[name][1] = False  # only one member pruned: the sum still carries channel 1
    assert channel_keep(module, masks, graph)["stem"].all()
    for name in ("conv.weight", "conv.bias", "bn1.weight"):
        masks[name][1] = False
    assert channel_keep(module, masks, graph)["stem"].all()  # bn1's β still feeds channel 1
    masks["bn1.bias"][1] = False
    assert channel_keep(module, masks, graph)["conv"].tolist() == [True, False, True, True]


def test_coupled_layers_are_left_alone_unless_couple_and_then_pruned_jointly():
    class Res(BNNet):
        def __init__(self) -> None:
            super().__init__()
            self.c3, self.b3 = nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12)

        def forward(self, x):
            x = F.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
            h = torch.relu(self.b2(self.c2(x)))
            h = torch.relu(self.b3(self.c3(h)) + h)
            return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))

    torch.manual_seed(0)
    cb = ChannelPruning(0.5, scorer="l1", verbose=False)
    module = _fit(cb, module=Res(), max_steps=2)
    keep = channel_keep(module, cb.masks)
    assert int(keep["c1"].sum()) == 4 and keep["c2"].all() and keep["c3"].all()
    assert "couple=True" in str(cb.report(module))
    torch.manual_seed(0)
    cb = ChannelPruning(0.5, scorer="l1", couple=True, verbose=False)
    module = _fit(cb, module=Res(), max_steps=2)
    keep = channel_keep(module, cb.masks)
    assert int(keep["c2"].sum()) == 6 and torch.equal(keep["c2"], keep["c3"])


# ------------------------------------------------------------------------------------------ Early-Bird
def test_earlybird_window_stops_at_the_exact_epoch_of_a_hand_built_sequence():
    def mask(flips: int) -> torch.Tensor:  # 20 entries, the first `flips` of a base mask flipped
        base = torch.arange(20) % 2 == 0
        base[:flips] = ~base[:flips]
        return base

    assert mask_distance(mask(0), mask(3)) == 0.15
    sequence = [8, 4, 0, 6, 3, 1, 1]  # mask i differs from mask j in |flips_i - flips_j| of 20 entries
    expected = [None, None, [0.4, 0.2], [0.1, 0.3], [0.15, 0.15], [0.25, 0.1], [0.1, 0.0]]  # newest vs the others
    for epsilon, first in ((0.1, 6), (0.15, 4), (0.09, None)):
        window = EarlyBirdWindow(size=3, epsilon=epsilon)
        emerged = []
        for flips, distances in zip(sequence, expected):
            assert window.push(mask(flips)) == (None if distances is None else pytest.approx(distances))
            emerged.append(window.emerged)
        # the first epoch whose max distance is <= epsilon (0.1 <= 0.1: the reference's `dist > 0.1` test)
        assert (emerged.index(True) if any(emerged) else None) == first
    assert len(window.masks) == 3 and window.masks[-1].tolist() == mask(1).tolist()  # first in, first out
    assert EarlyBirdWindow(3, 0.1).push(mask(0)) is None


class _Crash(CallbackBase):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def _earlybird() -> EarlyBird:
    return EarlyBird(0.5, l1=1e-2, window=3, epsilon=0.15, verbose=False)


def test_earlybird_draws_early_on_an_easy_task_and_trains_the_slim_network():
    eb = _earlybird()
    module = _fit(eb, max_epochs=10, max_steps=-1, loader=image_loader(128, 16, shuffle=True))
    assert eb.drawn_epoch is not None and eb.drawn_epoch < 5
    assert eb.distances[:2] == [None, None] and eb.distances[eb.drawn_epoch] <= 0.15
    assert all(d > 0.15 for d in eb.distances[2 : eb.drawn_epoch])
    keep = channel_keep(module, eb.masks)
    assert sum(int(keep[n].sum()) for n in WIDTHS) == 10
    params = dict(module.named_parameters())
    for layer, norm in (("c1", "b1"), ("c2", "b2")):
        assert torch.count_nonzero(params[f"{norm}.weight"][~keep[layer]]) == 0
    assert eb.report(module).sparsity == 0.5


def test_earlybird_rewind_to_init_restarts_the_slim_network_from_the_initial_weights():
    eb = EarlyBird(0.5, l1=1e-2, window=3, epsilon=0.15, rewind_to="init", verbose=False)
    module = _net()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    seen: dict = {}

    class Snapshot(CallbackBase):
        def on_train_epoch_start(self, trainer, pl_module):
            if eb.drawn_epoch is not None and not seen:
                seen.update({k: v.clone() for k, v in pl_module.state_dict().items()})
                seen["optimizer state"] = len(trainer.optimizers[0].state)

    _fit(eb, module=module, callbacks=[Snapshot()], max_epochs=10, max_steps=-1, loader=image_loader(128, 16))
    assert eb.drawn_epoch is not None and seen["optimizer state"] == 0  # cleared at the draw
    for name, value in initial.items():
        mask = eb.masks[name].cpu() if name in eb.masks.names else torch.ones_like(value, dtype=torch.bool)
        assert torch.equal(seen[name], value * mask), name  # BN statistics too; pruned entries zero


def test_earlybird_crash_and_resume_gives_the_same_window_draw_and_masks(tmp_path):
    loader = lambda: image_loader(128, 16)  # noqa: E731  (one data order: the runs must match exactly)
    torch.manual_seed(1)
    full = _earlybird()
    _fit(full, max_epochs=8, max_steps=-1, loader=loader())
    assert full.drawn_epoch is not None and full.drawn_epoch >= 3

    torch.manual_seed(1)
    first = _earlybird()
    ckpt = __import__("lightning.pytorch", fromlist=["callbacks"]).callbacks.ModelCheckpoint(
        dirpath=tmp_path, save_top_k=-1, every_n_epochs=1
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(first, callbacks=[_Crash(3), ckpt], max_epochs=8, max_steps=-1, loader=loader(), enable_checkpointing=True)
    path = next(tmp_path.glob("epoch=1-*.ckpt"))  # after 2 epochs: the window holds 3 masks, no ticket yet
    resumed = _earlybird()
    trainer(callbacks=[resumed], max_epochs=8).fit(_net(5), loader(), ckpt_path=path)
    assert resumed.drawn_epoch == full.drawn_epoch
    assert resumed.distances == full.distances
    window, reference = resumed.session.window.state_dict(), full.session.window.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(window["masks"], reference["masks"]))
    assert all(torch.equal(resumed.masks[n], full.masks[n]) for n in full.masks.names)


def test_gradual_channel_pruning_crash_and_resume_gives_the_same_masks(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    make = lambda: ChannelPruning(0.5, scorer="taylor", start=2, end=14, frequency=4, verbose=False)  # noqa: E731
    full = make()
    _fit(full, max_steps=16)

    class Stop(CallbackBase):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 11:
                raise RuntimeError("crash")

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    with pytest.raises(RuntimeError, match="crash"):
        _fit(make(), callbacks=[Stop(), ckpt], max_steps=16, enable_checkpointing=True)
    resumed = make()
    trainer(callbacks=[resumed], max_steps=16).fit(_net(5), image_loader(), ckpt_path=tmp_path / "epoch=1-step=8.ckpt")
    assert resumed.session.updates == full.session.updates == 4  # at 2, 6, 10, 14
    assert all(torch.equal(resumed.masks[n], full.masks[n]) for n in full.masks.names)


# ------------------------------------------------------------------------------------------ DDP
def test_two_process_ddp_gives_identical_channel_masks(tmp_path):
    run_script(SCRIPT, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(r0["masks"][n], r1["masks"][n]) for n in r0["masks"])
    assert all(torch.equal(r0["keep"][n], r0["local"][n]) for n in WIDTHS)  # rank zero's own choice won
    assert not all(torch.equal(r1["keep"][n], r1["local"][n]) for n in WIDTHS)  # rank one's scores differed
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])
    assert r0["drawn"] is not None and r0["drawn"] == r1["drawn"]
    assert all(torch.equal(r0["eb_masks"][n], r1["eb_masks"][n]) for n in r0["eb_masks"])
    assert all(torch.equal(a, b) for a, b in zip(r0["window"]["masks"], r1["window"]["masks"]))
    assert r0["distances"] == r1["distances"]


# ------------------------------------------------------------------------------------------ bad input
class _NoBN(BNNet):
    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = nn.Identity(), nn.Identity()


@pytest.mark.parametrize(
    ("make", "module", "message"),
    [
        (
            lambda: ChannelPruning(0.95, distribution="uniform"),
            BNNet,
            r"would remove every channel of `c1` \(8 channels\); every layer keeps at least one channel",
        ),
        (lambda: ChannelPruning(0.96, distribution="global"), BNNet, "fewer than one per layer"),
        (lambda: ChannelPruning(0.5, scorer="bn_gamma"), _NoBN, "has no BatchNorm on the channels"),
        (lambda: EarlyBird(0.5), _NoBN, "has no BatchNorm on the channels"),
    ],
)
def test_bad_input_fails_before_training(make, module, message):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=message):
        trainer(callbacks=[make()], max_steps=2).fit(module(), image_loader())


def test_bad_arguments_fail_in_init():
    with pytest.raises(ValueError, match="Unknown `scorer` 'fisher'. Valid channel scorers: bn_gamma, l1, l2, taylor"):
        ChannelPruning(0.5, scorer="fisher")
    with pytest.raises(ValueError, match="`distribution` must be one of 'global', 'uniform'"):
        ChannelPruning(0.5, distribution="erk")
    with pytest.raises(ValueError, match="`window`"):
        EarlyBird(0.5, window=1)
    with pytest.raises(ValueError, match="`rewind_to` must be one of 'init' or None"):
        EarlyBird(0.5, rewind_to="epoch:1")
    with pytest.raises(ValueError, match="`sparsity`"):
        ChannelPruning(1.0)


def test_readme_channel_example_builds_its_callbacks():
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Channel pruning and Early-Bird tickets\n", 1)[1].split("\n## ", 1)[0]
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(re.findall(r"```python\n(.*?)```", section, flags=re.S)[0], "README: channels", "exec"), namespace)
    assert namespace["ChannelPruning"] is ChannelPruning and namespace["EarlyBird"] is EarlyBird
