"""Early-Bird tickets inside one fit: the Lightning adapter of the engine's ``EarlyBirdSession``."""

from __future__ import annotations

from typing import Any

from typing_extensions import Unpack

from lightning_pai.callbacks.base import SparseCallback, TargetOptions
from lightning_pai.core.channel_session import EarlyBirdSession
from lightning_pai.core.channels import ChannelReport


class EarlyBird(SparseCallback):
    """Draw an Early-Bird ticket (You et al. 2020, "Drawing early-bird tickets", ICLR, arXiv:1909.11957).

    The network trains densely with network slimming's penalty ``l1 Σ|γ|`` on its BatchNorm scales (``γ``'s
    gradient gets ``l1 sign(γ)``, the reference's ``--sr --s 1e-4``). Before the first epoch and after every
    epoch the ticket mask prunes ``sparsity`` (the paper's ``p``) of the channels by one global ranking of
    ``|γ|``; the last ``window`` masks are kept, and the ticket is drawn once the largest normalised Hamming
    distance (the fraction of differing entries) between the newest mask and the others is at most ``epsilon``
    (the reference's ``early_bird_emerge``). The ticket's channels are then pruned (rows, biases, ``γ``/``β``
    and the next layers' inputs are masked: the outputs are those of the slim network) and the slim network
    trains for the rest of the fit, without the penalty — from its trained weights, or rewound to fit start with
    ``rewind_to="init"`` (optimizer state cleared; the learning-rate schedule continues).

    Which channels can be pruned is :class:`~lightning_pai.ChannelPruning`'s analysis: layers with a BatchNorm on
    their channels that no residual addition couples (``couple=True`` adds those, jointly). Details and the
    differences from the reference: :class:`~lightning_pai.core.channel_session.EarlyBirdSession`.

    Results: :attr:`drawn_epoch` (epochs trained before the ticket was drawn, None until then), :attr:`distances`
    (the largest distance of each check; None while the window fills), logged as ``earlybird/distance`` and
    ``earlybird/drawn_epoch``; :meth:`report` gives the channels and the parameters and MACs left.

    Args:
        sparsity: Fraction of the channels the ticket prunes (``p``: 0.3, 0.5, 0.7 in the paper).
        l1: Weight of the L1 penalty on ``γ`` while searching (the reference's ``--s 1e-4``).
        window: Number of consecutive masks compared (the reference's 5).
        epsilon: Largest mask distance counted as stable (the reference's 0.1).
        rewind_to: None (keep the trained weights) or ``"init"`` (rewind to fit start).
        couple: Let the ticket prune layers coupled by residual additions, jointly.
        **common: ``include``/``exclude`` (the layers whose channels may be pruned), ``verbose``, ``resume``,
            ``frozen`` (see :class:`~lightning_pai.TargetOptions`).

    Example::

        eb = EarlyBird(sparsity=0.5)
        Trainer(max_epochs=40, callbacks=[eb]).fit(model, data)
        print(eb.drawn_epoch, eb.report(model))
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        l1: float = 1e-4,
        window: int = 5,
        epsilon: float = 0.1,
        rewind_to: str | None = None,
        couple: bool = False,
        **common: Unpack[TargetOptions],
    ) -> None:
        super().__init__(**common)
        self.sparsity, self.l1, self.window, self.epsilon = sparsity, l1, window, epsilon
        self.rewind_to, self.couple = rewind_to, couple
        self.sparsity = self.session.sparsity  # builds the session: every argument is checked here

    def build_session(self) -> EarlyBirdSession:
        """The engine session for these arguments."""
        return EarlyBirdSession(
            type(self).__name__,
            sparsity=self.sparsity,
            l1=self.l1,
            window=self.window,
            epsilon=self.epsilon,
            rewind_to=self.rewind_to,
            couple=self.couple,
            **self.session_options(),
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, window=self.window, epsilon=self.epsilon)

    @property
    def drawn_epoch(self) -> int | None:
        """Epochs trained before the ticket was drawn (None: not drawn yet)."""
        self._collect_handoff()
        return self.session.drawn_epoch

    @property
    def distances(self) -> list[float | None]:
        """The largest mask distance of every check (fit start, then each epoch end; None while the window fills)."""
        self._collect_handoff()
        return list(self.session.distances)

    def report(self, module: Any = None) -> ChannelReport:
        """Channels kept per layer, and the parameters and MACs left once the pruned channels are removed."""
        self._collect_handoff()
        return self.session.report(module)
