"""Training losses for early-exit Adaptive Depth Networks.

Three pieces, combined by :class:`ADNLoss`:

* :func:`exit_cross_entropy` -- weighted cross-entropy over the exits of one sub-network.
* :func:`distillation_kl` -- sub-path self-distillation (ADN, Kang & Lee 2024): the base-net (every
  skippable sub-path skipped) learns from the *detached* super-net at temperature ``T``.
* :class:`DepthLoss` -- ``L_depth``, our reconstruction of the regulariser of "Optimal Depth of Neural
  Networks" (Qi 2025): the expected task loss plus ``lam`` x compute cost at the exit chosen by a soft
  stopping policy over the exits, plus an optional diminishing-returns penalty on the residual
  increments. The paper's exact formula is not available; docs/l_depth.md gives the derivation and
  every design choice (in particular which gradient paths are kept).

All losses compute in float32 whatever the logits' dtype (safe under autocast), return a scalar
tensor, and report their statistics as plain floats with a single device sync per call.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.config import DEPTH_ON, DISTILL_FROM
from train.models.base import is_mixed, normalize_skip

__all__ = [
    "default_exit_weights",
    "normalize_weights",
    "exit_cross_entropy",
    "distillation_kl",
    "costs_from_macs",
    "costs_from_latency",
    "stopping_distribution",
    "log_stopping_distribution",
    "confidence_features",
    "LearnedHalting",
    "DepthLoss",
    "ADNLoss",
    "DISTILL_FROM",
    "DEPTH_ON",
]

Halting = Literal["confidence", "learned"]
DistillFrom = Literal["same-exit", "final"]
DepthOn = Literal["super", "super+base"]


# ----------------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------------
def _check_logits(logits: Sequence[Tensor], name: str = "logits") -> int:
    if isinstance(logits, Tensor) or not isinstance(logits, Sequence):
        raise ValueError(f"{name} must be a list with one (N, C) tensor per exit, got {type(logits).__name__}")
    if len(logits) == 0:
        raise ValueError(f"{name} is empty: expected one (N, C) tensor per exit")
    shape = None
    for k, z in enumerate(logits):
        if not isinstance(z, Tensor) or z.dim() != 2:
            raise ValueError(f"{name}[{k}] must be an (N, C) tensor, got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        if shape is not None and z.shape != shape:
            raise ValueError(f"{name}[{k}] has shape {tuple(z.shape)}, exit 0 has {tuple(shape)}")
        shape = z.shape
    return len(logits)


def _check_targets(targets: Tensor, logits: Tensor) -> Tensor:
    """Class indices (N,) -> int64, or class probabilities (N, C) (mixup / cutmix) as they are."""
    n, c = logits.shape
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.dim() == 1 and not targets.is_floating_point() and not targets.is_complex():
        if targets.shape[0] != n:
            raise ValueError(f"targets has {targets.shape[0]} entries, logits have batch {n}")
        return targets.long()
    if targets.dim() == 2 and targets.is_floating_point():
        if tuple(targets.shape) != (n, c):
            raise ValueError(f"soft targets have shape {tuple(targets.shape)}, expected {(n, c)}")
        return targets.float()
    raise ValueError("targets must be class indices (N,) of an integer dtype or class "
                     f"probabilities (N, C) of a float dtype, got {targets.dtype} {tuple(targets.shape)}")


def _check_finite_nonneg(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_unit_interval(value: float, name: str) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _to_floats(stats: dict[str, Tensor | float]) -> dict[str, float]:
    """One device sync for all tensor statistics."""
    keys = [k for k, v in stats.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in stats.items() if not isinstance(v, Tensor)}
    if keys:
        values = torch.stack([stats[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in stats}


# ----------------------------------------------------------------------------------------------
# exit weights and per-exit cross-entropy
# ----------------------------------------------------------------------------------------------
def default_exit_weights(num_exits: int) -> list[float]:
    """Default exit weights: proportional to the exit index, ``w_k = k / (S (S + 1) / 2)``.

    Every exit is trained, the final exit (the super-net's full-depth prediction, the accuracy the
    ADN paper reports) gets the largest share: S=4 gives 0.1, 0.2, 0.3, 0.4.
    """
    if int(num_exits) != num_exits or num_exits < 1:
        raise ValueError(f"num_exits must be a positive integer, got {num_exits}")
    total = num_exits * (num_exits + 1) / 2
    return [(k + 1) / total for k in range(int(num_exits))]


def normalize_weights(weights: Sequence[float] | None, num_exits: int, name: str = "exit weights") -> list[float]:
    """Check ``weights`` (one finite, non-negative number per exit, positive sum); return them summing to 1.

    ``None`` gives :func:`default_exit_weights`.
    """
    if weights is None:
        return default_exit_weights(num_exits)
    w = [float(x) for x in weights]
    if len(w) != num_exits:
        raise ValueError(f"{name} has {len(w)} entries, expected one per exit ({num_exits})")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"{name} must be finite and >= 0, got {w}")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"{name} must not all be zero")
    return [x / total for x in w]


def exit_cross_entropy(logits: Sequence[Tensor], targets: Tensor, weights: Sequence[float] | None = None,
                       label_smoothing: float = 0.0) -> Tensor:
    """``sum_k w_k * CE(logits[k], targets)`` with the weights normalised to sum 1 (batch mean per exit).

    ``weights=None`` uses :func:`default_exit_weights` (proportional to the exit index). ``targets``
    are class indices (N,) or class probabilities (N, C) (mixup / cutmix).
    """
    num_exits = _check_logits(logits)
    targets = _check_targets(targets, logits[0])
    w = normalize_weights(weights, num_exits)
    label_smoothing = float(label_smoothing)
    if not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    terms = [wk * F.cross_entropy(z.float(), targets, label_smoothing=label_smoothing)
             for wk, z in zip(w, logits) if wk > 0]
    return torch.stack(terms).sum()


def distillation_kl(student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor], temperature: float = 1.0,
                    weights: Sequence[float] | None = None) -> Tensor:
    """Per-exit self-distillation: ``T^2 * sum_k w_k KL(softmax(t_k / T) || softmax(s_k / T))``.

    The teacher is detached here (no gradient ever reaches it), KL is summed over classes and
    averaged over the batch, the ``T^2`` factor keeps gradient magnitudes independent of ``T``.
    Exit k of the student learns from exit k of the teacher; weights as in :func:`exit_cross_entropy`.
    """
    num_exits = _check_logits(student_logits, "student_logits")
    if _check_logits(teacher_logits, "teacher_logits") != num_exits:
        raise ValueError(f"student has {num_exits} exits, teacher has {len(teacher_logits)}")
    if student_logits[0].shape != teacher_logits[0].shape:
        raise ValueError(f"student logits {tuple(student_logits[0].shape)} and teacher logits "
                         f"{tuple(teacher_logits[0].shape)} differ in shape")
    t = _check_positive(temperature, "temperature")
    w = normalize_weights(weights, num_exits)
    terms = []
    for wk, s, te in zip(w, student_logits, teacher_logits):
        if wk == 0:
            continue
        log_p_student = F.log_softmax(s.float() / t, dim=1)
        log_p_teacher = F.log_softmax(te.detach().float() / t, dim=1)
        terms.append(wk * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True))
    return torch.stack(terms).sum() * (t * t)


# ----------------------------------------------------------------------------------------------
# costs
# ----------------------------------------------------------------------------------------------
def _normalize_costs(costs: Sequence[float], name: str) -> list[float]:
    c = [float(x) for x in costs]
    if len(c) == 0:
        raise ValueError(f"{name} is empty: expected one cost per exit")
    if any(not math.isfinite(x) or x < 0 for x in c):
        raise ValueError(f"{name} must be finite and >= 0, got {c}")
    total = sum(c)
    if total <= 0:
        raise ValueError(f"{name} must not all be zero")
    return [x / total for x in c]


def costs_from_macs(macs_per_exit: Sequence[int], head_macs: Sequence[int] | None = None) -> list[float]:
    """Cumulative MACs to reach each exit -> per-segment cost shares summing to 1.

    ``macs_per_exit[k]`` is the compute spent when exit k's prediction is available (as returned by
    ``train.models.macs.macs_per_exit``: stem + stages 0..k + head k). That count leaves out the heads
    of earlier exits; an early-exit runtime evaluates them, so pass ``head_macs`` (one per exit, e.g.
    ``piece_macs(model)["head"]``) to add ``sum_{j<k} head_macs[j]`` to exit k. Segment k's cost is
    ``M_k - M_{k-1}`` (``M_{-1} = 0``), divided by ``M_{S-1}``.
    """
    m = [float(x) for x in macs_per_exit]
    if len(m) == 0:
        raise ValueError("macs_per_exit is empty")
    if head_macs is not None:
        heads = [float(x) for x in head_macs]
        if len(heads) != len(m):
            raise ValueError(f"head_macs has {len(heads)} entries, macs_per_exit has {len(m)}")
        m = [mk + sum(heads[:k]) for k, mk in enumerate(m)]
    if any(not math.isfinite(x) or x < 0 for x in m):
        raise ValueError(f"cumulative MACs must be finite and >= 0, got {m}")
    if any(b < a for a, b in zip(m, m[1:])):
        raise ValueError(f"cumulative MACs per exit must be non-decreasing, got {m}")
    segments = [m[0]] + [b - a for a, b in zip(m, m[1:])]
    return _normalize_costs(segments, "MACs per segment")


def costs_from_latency(latencies: Sequence[float], cumulative: bool = False) -> list[float]:
    """Measured device latencies -> per-segment cost shares summing to 1.

    ``latencies`` are per-segment times (segment k = what runs between exit k-1's decision and exit
    k's), or, with ``cumulative=True``, times to reach each exit. Any unit.
    """
    lat = [float(x) for x in latencies]
    if cumulative:
        if any(b < a for a, b in zip(lat, lat[1:])):
            raise ValueError(f"cumulative latencies must be non-decreasing, got {lat}")
        lat = lat[:1] + [b - a for a, b in zip(lat, lat[1:])]
    return _normalize_costs(lat, "latencies")


# ----------------------------------------------------------------------------------------------
# soft stopping policy
# ----------------------------------------------------------------------------------------------
def stopping_distribution(halt_prob: Tensor) -> Tensor:
    """Halting probabilities ``h`` (..., S) -> stopping distribution ``q`` (..., S).

    ``q_k = h_k * prod_{j<k} (1 - h_j)`` for k < S; the last exit takes the remaining mass
    ``prod_{j<S} (1 - h_j)`` (``h`` of the last exit is ignored), so ``q`` sums to 1.
    """
    if halt_prob.dim() < 1 or halt_prob.shape[-1] < 1:
        raise ValueError("halt_prob must have one entry per exit in its last dimension")
    h = halt_prob[..., :-1]
    survive = torch.cumprod(1 - h, dim=-1)
    ones = torch.ones_like(halt_prob[..., :1])
    before = torch.cat([ones, survive], dim=-1)        # prob. of reaching exit k, k = 0..S-1
    return torch.cat([h, ones], dim=-1) * before


def log_stopping_distribution(halt_logits: Tensor) -> Tensor:
    """Numerically stable ``log q`` (..., S) from the halting logits of the first S-1 exits (..., S-1)."""
    log_h = F.logsigmoid(halt_logits)
    log_survive = torch.cumsum(F.logsigmoid(-halt_logits), dim=-1)
    zeros = torch.zeros_like(halt_logits[..., :1])
    log_before = torch.cat([zeros, log_survive], dim=-1)
    return torch.cat([log_h, zeros], dim=-1) + log_before


class _TrueClassGate(torch.autograd.Function):
    """Forward: the runtime confidence (max softmax probability). Backward: the incoming gradient
    goes to the true-class probability, and only its part that *raises* it under gradient descent.

    So the halting path can tell an exit "be right and sure here, stopping here would pay", but can
    never reward it for being confidently wrong (raising a wrong class) or for sandbagging (lowering
    the true class to defer to a later exit). See docs/l_depth.md, "Gradient paths".
    """

    @staticmethod
    def forward(ctx, confidence: Tensor, true_prob: Tensor) -> Tensor:  # noqa: D102
        return confidence.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return None, grad.clamp(max=0.0)


def confidence_features(logits: Tensor, targets: Tensor | None = None) -> Tensor:
    """Per-sample halting statistics of one exit: (N, 3) = [max prob, top-2 margin, 1 - normalised entropy].

    All three increase with confidence and lie in [0, 1]. Margin and entropy are detached. The max
    prob carries, when ``targets`` are given and need a gradient, the one-sided true-class gradient of
    :class:`_TrueClassGate`; without targets (inference) everything is detached.
    """
    z = logits.float()
    c = z.shape[1]
    if c < 2:
        raise ValueError("halting statistics need at least 2 classes")
    p = F.softmax(z, dim=1)
    pd = p.detach()
    top2 = pd.topk(2, dim=1).values
    max_prob, margin = top2[:, 0], top2[:, 0] - top2[:, 1]
    entropy = -(pd * torch.log(pd.clamp_min(1e-12))).sum(1) / math.log(c)
    if targets is not None and torch.is_grad_enabled() and p.requires_grad:
        true_prob = p.gather(1, targets.view(-1, 1)).squeeze(1) if not targets.is_floating_point() \
            else (p * targets.float()).sum(1)
        max_prob = _TrueClassGate.apply(max_prob, true_prob)
    return torch.stack([max_prob, margin, 1 - entropy], dim=1)


class LearnedHalting(nn.Module):
    """Tiny trainable halting score: ``a_k = w . phi_k + b_k`` for exits k = 1..S-1.

    ``phi_k`` = :func:`confidence_features` of exit k; ``w`` (3 weights) is shared by the exits, ``b_k``
    is one bias per exit (the last exit needs none: it takes the remaining mass). Initialised to
    ``w = 0`` and ``b_k = -log(S - k)`` (1-based k), i.e. the uniform stopping distribution: no
    preferred depth at the start and a non-saturated sigmoid, so the halting gradient is strong.
    """

    num_features = 3

    def __init__(self, num_exits: int):
        super().__init__()
        if num_exits < 1:
            raise ValueError(f"num_exits must be >= 1, got {num_exits}")
        self.num_exits = int(num_exits)
        self.weight = nn.Parameter(torch.zeros(self.num_features))
        self.bias = nn.Parameter(torch.tensor([-math.log(num_exits - k) for k in range(1, num_exits)],
                                              dtype=torch.float32))

    def forward(self, features: Tensor) -> Tensor:
        """(N, S-1, 3) statistics -> (N, S-1) halting logits (float32, also under autocast)."""
        return (features.float() * self.weight.float()).sum(-1) + self.bias.float()


class DepthLoss(nn.Module):
    """``L_depth``: expected loss plus compute cost at the exit chosen by a soft stopping policy.

    ``L = mean_n sum_k q_nk (CE_nk + lam * C_k) + beta * D`` where ``q`` is the stopping distribution
    of the halting probabilities ``h_k`` (``confidence``: ``sigmoid((maxprob_k - tau) / temperature)``;
    ``learned``: :class:`LearnedHalting`, whose parameters are this module's parameters),
    ``C_k = c_1 + ... + c_k`` is the cumulative cost with ``costs`` normalised to sum 1 (the whole
    network costs 1, so ``lam`` is in nats of cross-entropy per full forward pass), and ``D`` is the
    diminishing-returns penalty on the residual increments. ``lam = 0`` leaves no cost term at all.

    Move it to the model's device with the model (``.to(device)``); with ``halting="learned"``, give
    its ``.parameters()`` to the optimiser.
    """

    def __init__(self, costs: Sequence[float], lam: float = 0.1, halting: Halting = "confidence",
                 tau: float = 0.8, temperature: float = 0.05, beta: float = 0.0):
        super().__init__()
        c = _normalize_costs(costs, "costs")
        self.lam = _check_finite_nonneg(lam, "lam")
        self.beta = _check_finite_nonneg(beta, "beta")
        if halting not in ("confidence", "learned"):
            raise ValueError(f"halting must be 'confidence' or 'learned', got {halting!r}")
        self.halting = halting
        self.tau = _check_unit_interval(tau, "tau")
        self.temperature = _check_positive(temperature, "temperature")
        self.register_buffer("segment_costs", torch.tensor(c, dtype=torch.float32), persistent=False)
        self.register_buffer("cumulative_costs", torch.cumsum(self.segment_costs, 0), persistent=False)
        self.halting_head = LearnedHalting(len(c)) if halting == "learned" else None

    @property
    def num_exits(self) -> int:
        return int(self.segment_costs.numel())

    def extra_repr(self) -> str:
        return (f"num_exits={self.num_exits}, lam={self.lam}, halting={self.halting!r}, tau={self.tau}, "
                f"temperature={self.temperature}, beta={self.beta}")

    # -- policy ------------------------------------------------------------------------------
    def _check(self, logits: Sequence[Tensor]) -> int:
        s = _check_logits(logits)
        if s != self.num_exits:
            raise ValueError(f"DepthLoss was built with {self.num_exits} costs (one per exit) "
                             f"but got logits for {s} exits")
        return s

    def halting_logits(self, logits: Sequence[Tensor], targets: Tensor | None = None) -> Tensor:
        """(N, S-1) halting logits of exits 1..S-1 (``targets`` only shape the training gradient)."""
        s = self._check(logits)
        n = logits[0].shape[0]
        if s == 1:
            return logits[0].new_zeros((n, 0), dtype=torch.float32)
        if targets is not None:
            targets = _check_targets(targets, logits[0])
        feats = torch.stack([confidence_features(z, targets) for z in logits[:-1]], dim=1)  # (N, S-1, 3)
        if self.halting_head is None:
            return (feats[..., 0] - self.tau) / self.temperature
        return self.halting_head(feats)

    def stopping_distribution(self, logits: Sequence[Tensor], targets: Tensor | None = None) -> Tensor:
        """(N, S) stopping distribution ``q`` over the exits."""
        return log_stopping_distribution(self.halting_logits(logits, targets)).exp()

    def diminishing_penalty(self, increments: Sequence[Tensor | None] | None) -> Tensor:
        """Mean over consecutive executed skippable sub-paths of ``mean_n relu(r_{k+1} - sg(r_k))``.

        Skipped sub-paths (``None``) are left out, so the pairs are consecutive *executed* ones. The
        earlier increment is detached: the penalty shrinks later refinements and never inflates
        earlier ones (a skippable sub-path must stay small enough to be skipped, see the docs).
        """
        zero = self.segment_costs.new_zeros(())
        if increments is None:
            return zero
        if len(increments) != self.num_exits:
            raise ValueError(f"increments has {len(increments)} entries, expected one per stage "
                             f"({self.num_exits}, None where skipped)")
        executed = [r.float().reshape(-1) for r in increments if r is not None]
        if len(executed) < 2:
            return zero
        pairs = [F.relu(b - a.detach()).mean() for a, b in zip(executed, executed[1:])]
        return torch.stack(pairs).mean()

    # -- loss --------------------------------------------------------------------------------
    def forward_tensors(self, logits: Sequence[Tensor], targets: Tensor,
                        increments: Sequence[Tensor | None] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """As :meth:`forward`, with the statistics left as 0-d tensors (no device sync)."""
        s = self._check(logits)
        targets = _check_targets(targets, logits[0])
        ce = torch.stack([F.cross_entropy(z.float(), targets, reduction="none") for z in logits], dim=1)  # (N, S)
        q = self.stopping_distribution(logits, targets)                                                  # (N, S)
        expected_ce = (q * ce).sum(1).mean()
        expected_cost = (q * self.cumulative_costs.to(q.device)).sum(1).mean()
        index = torch.arange(1, s + 1, device=q.device, dtype=q.dtype)
        expected_exit = (q.detach() * index).sum(1).mean()
        diminishing = self.diminishing_penalty(increments).to(ce.device)
        loss = expected_ce
        cost_term = torch.zeros_like(expected_cost)
        if self.lam > 0:
            cost_term = self.lam * expected_cost
            loss = loss + cost_term
        if self.beta > 0:
            loss = loss + self.beta * diminishing
        stats = {"l_depth": loss, "expected_ce": expected_ce, "expected_exit": expected_exit,
                 "expected_cost": expected_cost, "cost_term": cost_term, "diminishing": diminishing}
        return loss, stats

    def forward(self, logits: Sequence[Tensor], targets: Tensor,
                increments: Sequence[Tensor | None] | None = None) -> tuple[Tensor, dict[str, float]]:
        """``(L_depth, stats)``; stats: ``l_depth`` (the returned value), ``expected_ce``,
        ``expected_exit`` (1-based, under q), ``expected_cost`` (fraction of the full network),
        ``cost_term`` (``lam * expected_cost``), ``diminishing`` (the unweighted increment penalty)."""
        loss, stats = self.forward_tensors(logits, targets, increments)
        return loss, _to_floats(stats)


# ----------------------------------------------------------------------------------------------
# the combined training objective
# ----------------------------------------------------------------------------------------------
class ADNLoss(nn.Module):
    """ADN training loss over all exits, optionally with ``L_depth``.

    ``loss = alpha * CE(super) + (1 - alpha) * T^2 * KL(teacher detached || softmax(base/T))
    + L_depth(super)``, every term summed over exits with the exit weights. The teacher
    (``distill_from``): ``"same-exit"``, exit k of the base-net learns from exit k of the
    super-net; ``"final"``, every base-net exit and every earlier super-net exit learns from the
    super-net's final exit (the super-net's early exits then get ``alpha * CE + (1 - alpha) * KL``
    like the base-net's). ``depth_on="super+base"`` adds ``L_depth(base)`` (the deployed
    sub-network). Without ``base_logits`` (plain training, no sub-path distillation) the label
    term gets the full weight: ``loss = CE(super) [+ L_depth(super)]``.
    """

    def __init__(self, num_exits: int, exit_weights: Sequence[float] | None = None, alpha: float = 0.5,
                 temperature: float = 1.0, label_smoothing: float = 0.0, depth: DepthLoss | None = None,
                 distill_from: DistillFrom = "same-exit", depth_on: DepthOn = "super"):
        super().__init__()
        if distill_from not in DISTILL_FROM:
            raise ValueError(f"distill_from must be one of {DISTILL_FROM}, got {distill_from!r}")
        if depth_on not in DEPTH_ON:
            raise ValueError(f"depth_on must be one of {DEPTH_ON}, got {depth_on!r}")
        self.distill_from = distill_from
        self.depth_on = depth_on
        if int(num_exits) != num_exits or num_exits < 1:
            raise ValueError(f"num_exits must be a positive integer, got {num_exits}")
        self.num_exits = int(num_exits)
        self.exit_weights = normalize_weights(exit_weights, self.num_exits)
        self.alpha = _check_unit_interval(alpha, "alpha")
        self.temperature = _check_positive(temperature, "temperature")
        self.label_smoothing = float(label_smoothing)
        if not (0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if depth is not None:
            if not isinstance(depth, DepthLoss):
                raise ValueError(f"depth must be a DepthLoss or None, got {type(depth).__name__}")
            if depth.num_exits != self.num_exits:
                raise ValueError(f"depth loss has {depth.num_exits} costs, the model has {self.num_exits} exits")
        self.depth = depth

    def extra_repr(self) -> str:
        return (f"num_exits={self.num_exits}, exit_weights={[round(w, 4) for w in self.exit_weights]}, "
                f"alpha={self.alpha}, temperature={self.temperature}, label_smoothing={self.label_smoothing}, "
                f"distill_from={self.distill_from!r}, depth_on={self.depth_on!r}")

    def forward(self, super_logits: Sequence[Tensor], base_logits: Sequence[Tensor] | None, targets: Tensor,
                super_increments: Sequence[Tensor | None] | None = None,
                mixed_logits: Sequence[tuple[Sequence[bool] | str, Sequence[Tensor]]] = ()
                ) -> tuple[Tensor, dict[str, float]]:
        """``(loss, stats)``; stats: ``loss``, ``ce_super``, ``kl_base`` (T^2-scaled; 0 without a
        base-net; with ``distill_from="final"`` it includes ``kl_super``, the super-net's earlier
        exits' part) and, with a depth loss, its keys (``l_depth``, ``expected_exit``, ...;
        ``l_depth_base`` with ``depth_on="super+base"``).

        ``mixed_logits``: ``(skip config, exit logits)`` of mixed sub-networks, each distilled
        like the base-net (same teacher, weight ``1 - alpha``) at the exits whose stages so far
        are mixed (the others are the super-net's or the base-net's own exits); stat ``kl_mixed``."""
        if _check_logits(super_logits, "super_logits") != self.num_exits:
            raise ValueError(f"got super logits for {len(super_logits)} exits, expected {self.num_exits}")
        ce = exit_cross_entropy(super_logits, targets, self.exit_weights, self.label_smoothing)
        stats: dict[str, Tensor | float] = {}
        if base_logits is None:
            kl = torch.zeros_like(ce)
            loss = ce
        else:
            if _check_logits(base_logits, "base_logits") != self.num_exits:
                raise ValueError(f"got base logits for {len(base_logits)} exits, expected {self.num_exits}")
            if self.distill_from == "final":
                final = [super_logits[-1]] * self.num_exits
                kl = distillation_kl(base_logits, final, self.temperature, self.exit_weights)
                kl_super = self._kl_early_super(super_logits)
                kl = kl + kl_super
                stats["kl_super"] = kl_super
            else:
                kl = distillation_kl(base_logits, super_logits, self.temperature, self.exit_weights)
            loss = self.alpha * ce + (1 - self.alpha) * kl
        if mixed_logits:
            if base_logits is None:
                raise ValueError("mixed sub-networks are distilled like the base-net: base_logits is needed")
            kl_mixed = sum(self._kl_mixed(config, logits, super_logits) for config, logits in mixed_logits)
            loss = loss + (1 - self.alpha) * kl_mixed
            stats["kl_mixed"] = kl_mixed
        stats = {"loss": loss, "ce_super": ce, "kl_base": kl, **stats}
        if self.depth is not None:
            depth_loss, depth_stats = self.depth.forward_tensors(super_logits, targets, super_increments)
            if self.depth_on == "super+base" and base_logits is not None:
                base_depth, _ = self.depth.forward_tensors(base_logits, targets)
                depth_stats["l_depth_base"] = base_depth
                depth_loss = depth_loss + base_depth
            loss = loss + depth_loss
            stats["loss"] = loss
            stats.update(depth_stats)
        return loss, _to_floats(stats)

    def _kl_mixed(self, config: Sequence[bool] | str, logits: Sequence[Tensor], super_logits: Sequence[Tensor]) -> Tensor:
        """``T^2 sum_k w_k KL(teacher_k detached || exit k)`` over the exits after mixed prefixes."""
        if _check_logits(logits, "mixed_logits") != self.num_exits:
            raise ValueError(f"a mixed sub-network needs {self.num_exits} exits, got {len(logits)}")
        config = normalize_skip(config, self.num_exits)
        w = [wk if is_mixed(config[:k + 1]) else 0.0 for k, wk in enumerate(self.exit_weights)]
        if sum(w) == 0:
            raise ValueError(f"skip config {list(config)} is not mixed: it skips every stage or none")
        teacher = [super_logits[-1]] * self.num_exits if self.distill_from == "final" else super_logits
        return distillation_kl(logits, teacher, self.temperature, w) * sum(w)

    def _kl_early_super(self, super_logits: Sequence[Tensor]) -> Tensor:
        """``T^2 sum_{k<S-1} w_k KL(final detached || exit k)`` over the super-net's earlier exits."""
        w = self.exit_weights[:-1]
        if not w or sum(w) == 0:
            return torch.zeros((), device=super_logits[0].device)
        final = [super_logits[-1]] * len(w)
        return distillation_kl(super_logits[:-1], final, self.temperature, w) * sum(w)
