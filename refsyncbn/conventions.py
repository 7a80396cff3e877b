"""Framework conventions: momentum meaning, running-variance correction, weighting.

A :class:`Convention` is a frozen record of the rules in which SyncBatchNorm
implementations differ. The presets reproduce each framework as read from its
source; the table in README.md summarises them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CHAINERMN",
    "CONVENTIONS",
    "FLAX",
    "KERAS",
    "MINDSPORE",
    "PADDLE",
    "REFERENCE",
    "TORCH",
    "Convention",
    "get_convention",
]

MomentumMeaning = Literal["retain", "update"]
RunningVar = Literal["biased", "unbiased_global", "unbiased_local"]
Weighting = Literal["count", "equal"]
ParamGrads = Literal["local", "sum", "mean"]
SingleValue = Literal["raise", "raise_alone", "biased"]
EmptyRank = Literal["skip", "nan"]

_CHOICES = {
    "momentum_meaning": ("retain", "update"),
    "running_var": ("biased", "unbiased_global", "unbiased_local"),
    "weighting": ("count", "equal"),
    "param_grads": ("local", "sum", "mean"),
    "single_value": ("raise", "raise_alone", "biased"),
    "empty_rank": ("skip", "nan"),
}


@dataclass(frozen=True)
class Convention:
    """The rules one SyncBatchNorm implementation follows.

    Parameters
    ----------
    name : str
        Preset name (free text for custom conventions).
    momentum : float
        Default momentum, in this convention's own meaning.
    momentum_meaning : {"retain", "update"}
        ``"retain"``: ``new = old * momentum + batch * (1 - momentum)`` (Paddle,
        MindSpore, Keras, Flax, ChainerMN "decay"); ``"update"``:
        ``new = old * (1 - momentum) + batch * momentum`` (PyTorch).
    running_var : {"biased", "unbiased_global", "unbiased_local"}
        Variance fed to the running average: the biased batch variance, the
        unbiased one with the group count ``m / (m - 1)``, or the unbiased one
        with this rank's local count ``n / (n - 1)`` (ChainerMN).
    weighting : {"count", "equal"}
        How ranks with different local batch sizes combine: by element count
        (exact global-batch statistics) or with equal weight per non-empty rank
        (the mean of per-rank ``E[x]`` and ``E[x^2]``).
    eps : float
        Default epsilon added to the variance.
    param_grads : {"local", "sum", "mean"}
        Default reduction of ``dweight``/``dbias`` over the group: this rank's
        contribution, the group sum, or the group sum divided by the number of
        ranks in the group.
    single_value : {"raise", "raise_alone", "biased"}
        What training does when the group holds one value per channel:
        raise ``ValueError``; ``"raise_alone"``: raise only when the group has
        one rank, otherwise the unbiased correction divides by zero and the
        running variance becomes NaN (PyTorch: ``SyncBatchNorm.forward``
        checks ``size == 1 and world_size < 2``); or fall back to the biased
        variance (``m / max(m - 1, 1)``, Chainer's rule).
    empty_rank : {"skip", "nan"}
        With equal weighting, what a rank without valid elements does: it is
        skipped (the mean over the non-empty ranks) or makes every statistic
        of the group NaN (Flax: ``x.mean(where=mask)`` of nothing is NaN, and
        ``lax.pmean`` spreads it). Count weighting always skips it.
    """

    name: str
    momentum: float
    momentum_meaning: MomentumMeaning
    running_var: RunningVar
    weighting: Weighting
    eps: float
    param_grads: ParamGrads = "local"
    single_value: SingleValue = "biased"
    empty_rank: EmptyRank = "skip"

    def __post_init__(self):
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                msg = f"Convention.{field} is {value!r}; expected one of {allowed}"
                raise ValueError(msg)
        if not 0.0 <= self.momentum <= 1.0:
            msg = f"Convention.momentum is {self.momentum!r}; expected a float in [0, 1]"
            raise ValueError(msg)
        if self.eps < 0:
            msg = f"Convention.eps is {self.eps!r}; expected a float >= 0"
            raise ValueError(msg)

    def batch_weight(self, momentum: float) -> float:
        """Weight of the new batch statistic in the running average."""
        return momentum if self.momentum_meaning == "update" else 1.0 - momentum


REFERENCE = Convention("reference", 0.9, "retain", "biased", "count", 1e-5)
"""The seed documents' rule: ``rv = rv * 0.9 + var * 0.1``, biased
running variance, exact count weighting, eps 1e-5, local parameter gradients."""

TORCH = Convention(
    "torch", 0.1, "update", "unbiased_global", "count", 1e-5, single_value="raise_alone"
)
"""PyTorch ``nn.SyncBatchNorm`` (torch/nn/modules/_functions.py): per-rank
(mean, invstd, count) merged by count (empty ranks contribute nothing),
``running = (1 - m) * running + m * batch`` with m = 0.1, running variance
unbiased with the GLOBAL count; a single value per channel raises ValueError
("Expected more than 1 value per channel when training") only in a one-rank
group (``size == 1 and world_size < 2``); with more ranks the running
variance becomes NaN (``0 / (count - 1)``)."""

PADDLE = Convention("paddle", 0.9, "retain", "biased", "equal", 1e-5)
"""Paddle ``nn.SyncBatchNorm`` and ``sparse.nn.SyncBatchNorm`` (sync_batch_norm
kernel): all-reduce of per-rank E[x] and E[x^2] divided by the number of ranks,
i.e. equal weight per rank; ``running = running * 0.9 + batch * 0.1``; biased
running variance."""

MINDSPORE = Convention("mindspore", 0.9, "retain", "unbiased_global", "count", 1e-5, "sum")
"""MindSpore ``nn.SyncBatchNorm``: ``moving = moving * 0.9 + batch * 0.1``; the
running variance is unbiased with the group count (its CPU BatchNorm, measured;
the Ascend kernel uses the local count, the GPU kernel the biased variance);
count weighting (GPU kernel); parameter gradients are all-reduced (summed)."""

KERAS = Convention("keras", 0.99, "retain", "biased", "count", 1e-3)
"""Keras 3 ``BatchNormalization(synchronized=True)``: all-reduced sums and
counts (count weighting), ``moving = moving * 0.99 + batch * 0.01``, biased
variance, eps 1e-3."""

FLAX = Convention("flax", 0.99, "retain", "biased", "equal", 1e-5, empty_rank="nan")
"""Flax ``nn.BatchNorm(axis_name=...)`` (flax/linen/normalization.py
``_compute_stats``): ``lax.pmean`` of per-device E[x] and E[x^2] (equal weight
per device), momentum 0.99 retained, biased variance; a device with no valid
element (``mean(where=mask)`` of nothing is NaN) makes the group's statistics
NaN."""

CHAINERMN = Convention("chainermn", 0.9, "retain", "unbiased_local", "equal", 2e-5, "mean")
"""ChainerMN ``MultiNodeBatchNormalization``: per-rank means averaged over
ranks (equal weight), decay 0.9, running variance unbiased with the LOCAL count
``n / max(n - 1, 1)``, eps 2e-5, parameter gradients averaged over ranks."""

CONVENTIONS = {c.name: c for c in (REFERENCE, TORCH, PADDLE, MINDSPORE, KERAS, FLAX, CHAINERMN)}


def get_convention(convention) -> Convention:
    """A :class:`Convention` from a preset name or a Convention.

    Examples
    --------
    >>> get_convention("torch").momentum
    0.1
    """
    if isinstance(convention, Convention):
        return convention
    try:
        return CONVENTIONS[convention]
    except (KeyError, TypeError):
        msg = (
            f"convention is {convention!r}; expected a Convention or one of "
            f"{', '.join(CONVENTIONS)}"
        )
        raise ValueError(msg) from None
