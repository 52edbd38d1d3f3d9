"""2-process CPU DDP fits of ChannelPruning and EarlyBird; run as ``python tests/channels_ddp_script.py OUTDIR``.

The channel scorer ``rank_random_channels`` gives each rank other scores, so identical masks on both ranks can only
come from rank zero's masks being broadcast. Each rank writes ``OUTDIR/rank{r}.pt``: its masks, the masks its own
scores would have given, its channel keeps and weights, and its EarlyBird masks, window and drawn epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from channel_helpers import BNNet, image_loader, trainer

from lightning_pai import ChannelPruning, EarlyBird
from lightning_pai.core.channel_scorers import register_channel_scorer, select_channels
from lightning_pai.core.channels import channel_keep

_LOCAL: dict[str, object] = {}


@register_channel_scorer("rank_random_channels", overwrite=True)
def rank_random_channels(ctx):
    """Uniform channel scores from a generator seeded with this process's rank."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    gen = torch.Generator().manual_seed(100 + rank)
    scores = {g.key: torch.rand(g.width, generator=gen) for g in ctx.groups}
    _LOCAL["local"] = select_channels(scores, 0.5, "uniform")
    return scores


def main(outdir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = BNNet()
    cb = ChannelPruning(0.5, scorer="rank_random_channels", verbose=False)
    fit = trainer(devices=2, strategy="ddp", max_steps=6, callbacks=[cb])
    fit.fit(module, image_loader(64, 8, shuffle=True))
    rank = fit.global_rank
    result = {
        "rank": rank,
        "masks": cb.masks.state_dict(),
        "local": _LOCAL["local"],
        "keep": channel_keep(module, cb.masks),
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
    }
    torch.manual_seed(0)
    module = BNNet()
    eb = EarlyBird(0.5, l1=1e-2, window=3, epsilon=0.15, verbose=False)
    fit = trainer(devices=2, strategy="ddp", max_epochs=8, callbacks=[eb])
    fit.fit(module, image_loader(128, 8, shuffle=True))
    result.update(
        eb_masks=eb.masks.state_dict(),
        drawn=eb.drawn_epoch,
        window=eb.session.window.state_dict(),
        distances=eb.distances,
    )
    torch.save(result, Path(outdir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
