"""Losses: exit CE, sub-path self-distillation, L_depth (soft optimal stopping) and their gradients."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from train.losses import (
    ADNLoss,
    DepthLoss,
    LearnedHalting,
    costs_from_latency,
    costs_from_macs,
    default_exit_weights,
    distillation_kl,
    exit_cross_entropy,
    log_stopping_distribution,
    stopping_distribution,
)
from train.models.base import AdaptiveDepthNet

NUM_CLASSES = 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: a second intra-op thread only adds synchronisation (10x CPU time on a
    busy 2-core machine), so these tests run single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyADN(AdaptiveDepthNet):
    """3 stages of linear layers: mandatory (linear + twin LayerNorms) then skippable residual MLP."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16, num_stages: int = 3):
        super().__init__()
        self.num_stages, self.num_classes, self.in_chans, self.img_size = num_stages, num_classes, 1, 4
        self.stem = nn.Linear(16, width)
        self.mandatory = nn.ModuleList(nn.Linear(width, width) for _ in range(num_stages))
        # [normal, skip-aware] norms, the second used only when the stage's skippable path is skipped
        self.norms = nn.ModuleList(nn.ModuleList([nn.LayerNorm(width), nn.LayerNorm(width)])
                                   for _ in range(num_stages))
        self.skippable = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
                                       for _ in range(num_stages))
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(num_stages))

    def forward_stem(self, x):
        return torch.relu(self.stem(x.flatten(1)))

    def forward_mandatory(self, k, h, skipping):
        return h + torch.relu(self.norms[k][int(skipping)](self.mandatory[k](h)))

    def forward_skippable(self, k, h):
        return h + self.skippable[k](h)

    def forward_head(self, k, h):
        return self.heads[k](h)


def _toy_batch(n: int = 64, seed: int = 0, noise: float = 0.0):
    """Labels of a random linear teacher, a fraction ``noise`` of them replaced by random classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    teacher = torch.randn(16, NUM_CLASSES, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    return x, torch.where(flip, torch.randint(0, NUM_CLASSES, (n,), generator=g), y)


def _model(seed: int = 0) -> TinyADN:
    torch.manual_seed(seed)
    return TinyADN()


def _forward(model, x):
    super_logits, increments = model(x, None, return_increments=True)
    base_logits = model(x, "TTT")
    return super_logits, base_logits, increments


# ------------------------------------------------------------------------------------------------
# exit cross-entropy and distillation
# ------------------------------------------------------------------------------------------------
def test_exit_cross_entropy_matches_hand_computation():
    y = torch.tensor([0])
    z1 = torch.zeros(1, 4)                                  # CE = log 4
    z2 = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]])     # p_y = 3 / 6 -> CE = log 2
    got = exit_cross_entropy([z1, z2], y, weights=[1.0, 3.0])  # normalised to 0.25, 0.75
    assert got.item() == pytest.approx(0.25 * math.log(4) + 0.75 * math.log(2), rel=1e-6)
    # default: proportional to the exit index -> 1/3, 2/3
    assert default_exit_weights(2) == pytest.approx([1 / 3, 2 / 3])
    assert default_exit_weights(4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    got = exit_cross_entropy([z1, z2], y)
    assert got.item() == pytest.approx(math.log(4) / 3 + 2 * math.log(2) / 3, rel=1e-6)
    # a zero weight drops an exit completely
    assert exit_cross_entropy([z1, z2], y, [0.0, 5.0]).item() == pytest.approx(math.log(2), rel=1e-6)


def test_distillation_matches_formula_and_never_reaches_the_teacher():
    torch.manual_seed(1)
    student = [torch.randn(5, 4, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(5, 4, requires_grad=True) for _ in range(2)]
    t = 2.0
    loss = distillation_kl(student, teacher, temperature=t, weights=[1.0, 1.0])
    expected = 0.0
    for s, te in zip(student, teacher):
        p = torch.softmax(te / t, 1)
        expected += 0.5 * (p * (p.log() - torch.log_softmax(s / t, 1))).sum(1).mean()
    assert loss.item() == pytest.approx(t * t * expected.item(), rel=1e-5)
    grads = torch.autograd.grad(loss, student + teacher, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:2])
    assert all(g is None for g in grads[2:])
    # identical distributions -> zero
    assert distillation_kl(teacher, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_adn_loss_distillation_term_does_not_reach_the_super_net():
    model = _model()
    x, y = _toy_batch(16)
    super_logits, base_logits, _ = _forward(model, x)
    # alpha = 0: only the KL term; its gradient reaches the base-net logits, never the super-net's
    loss, _ = ADNLoss(3, alpha=0.0)(super_logits, base_logits, y)
    grads = torch.autograd.grad(loss, list(super_logits) + list(base_logits), allow_unused=True)
    assert all(g is None or not g.any() for g in grads[:3])   # (the CE term is there with weight 0)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[3:])


def test_adn_loss_combination_and_plain_training():
    model = _model()
    x, y = _toy_batch(16)
    s, b, inc = _forward(model, x)
    fn = ADNLoss(3, alpha=0.3, temperature=2.0)
    loss, stats = fn(s, b, y)
    ce = exit_cross_entropy(s, y)
    kl = distillation_kl(b, s, 2.0)
    assert loss.item() == pytest.approx(0.3 * ce.item() + 0.7 * kl.item(), rel=1e-5)
    assert stats["ce_super"] == pytest.approx(ce.item(), rel=1e-5)
    assert stats["kl_base"] == pytest.approx(kl.item(), rel=1e-5)
    # no base-net: the label loss gets the full weight
    loss, stats = fn(s, None, y)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5) and stats["kl_base"] == 0.0
    # with a depth loss: its keys are reported and its value added
    depth = DepthLoss([1, 1, 1], lam=0.2)
    loss, stats = ADNLoss(3, depth=depth)(s, None, y, inc)
    for key in ("loss", "ce_super", "kl_base", "l_depth", "expected_exit", "expected_cost", "diminishing"):
        assert key in stats and math.isfinite(stats[key]), key
    assert loss.item() == pytest.approx(ce.item() + stats["l_depth"], rel=1e-5)


def test_distilling_from_the_final_exit():
    model = _model()
    x, y = _toy_batch(16)
    s, b, _ = _forward(model, x)
    fn = ADNLoss(3, alpha=0.4, temperature=2.0, distill_from="final")
    loss, stats = fn(s, b, y)
    w = default_exit_weights(3)
    # every base exit learns from the super-net's final exit; so do the super-net's earlier exits
    kl_base = distillation_kl(b, [s[-1]] * 3, 2.0)
    kl_super = distillation_kl(s[:2], [s[-1]] * 2, 2.0, w[:2]) * sum(w[:2])
    assert stats["kl_super"] == pytest.approx(kl_super.item(), rel=1e-5)
    assert stats["kl_base"] == pytest.approx(kl_base.item() + kl_super.item(), rel=1e-5)
    ce = exit_cross_entropy(s, y)
    assert loss.item() == pytest.approx(0.4 * ce.item() + 0.6 * stats["kl_base"], rel=1e-5)
    # alpha = 0: the gradient reaches the base-net and the super-net's earlier exits, never the
    # teacher (the super-net's final exit)
    loss, _ = ADNLoss(3, alpha=0.0, distill_from="final")(s, b, y)
    grads = torch.autograd.grad(loss, list(s) + list(b), allow_unused=True)
    assert grads[2] is None or not grads[2].any()
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:2] + grads[3:])


def test_mixed_subnetworks_are_distilled_at_their_mixed_exits():
    model = _model()
    x, y = _toy_batch(16)
    s, b, _ = _forward(model, x)
    tff, ftt = model(x, "TFF"), model(x, "FTT")
    fn = ADNLoss(3, alpha=0.3, temperature=2.0, distill_from="final")
    plain, _ = fn(s, b, y)
    loss, stats = fn(s, b, y, mixed_logits=[((True, False, False), tff), ((False, True, True), ftt)])
    w = default_exit_weights(3)
    # exit 0 of TFF is the base-net's, exit 0 of FTT the super-net's: only later exits count
    expected = sum(distillation_kl(m, [s[-1]] * 3, 2.0, [0.0, w[1], w[2]]).item() * (w[1] + w[2])
                   for m in (tff, ftt))
    assert stats["kl_mixed"] == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 0.7 * expected, rel=1e-5)
    grads = torch.autograd.grad(loss, list(tff) + [s[-1]], allow_unused=True)
    assert grads[0] is None and grads[1].abs().sum() > 0 and grads[2].abs().sum() > 0
    same_exit, st = ADNLoss(3, distill_from="same-exit")(s, b, y, mixed_logits=[("TFF", tff)])
    assert st["kl_mixed"] == pytest.approx(
        distillation_kl(tff, s, 1.0, [0.0, w[1], w[2]]).item() * (w[1] + w[2]), rel=1e-5)
    with pytest.raises(ValueError, match="not mixed"):
        fn(s, b, y, mixed_logits=[((True, True, True), b)])
    with pytest.raises(ValueError, match="base_logits"):
        fn(s, None, y, mixed_logits=[((True, False, False), tff)])


def test_depth_on_the_base_net_adds_its_own_term():
    model = _model()
    x, y = _toy_batch(16)
    s, b, inc = _forward(model, x)
    depth = DepthLoss([1, 1, 1], lam=0.2)
    only_super, st_super = ADNLoss(3, depth=depth)(s, b, y, inc)
    both, st_both = ADNLoss(3, depth=depth, depth_on="super+base")(s, b, y, inc)
    base_term, _ = depth(b, y)
    assert "l_depth_base" not in st_super
    assert st_both["l_depth_base"] == pytest.approx(base_term.item(), rel=1e-5)
    assert both.item() == pytest.approx(only_super.item() + base_term.item(), rel=1e-5)
    with pytest.raises(ValueError, match="depth_on"):
        ADNLoss(3, depth_on="base")
    with pytest.raises(ValueError, match="distill_from"):
        ADNLoss(3, distill_from="first")


# ------------------------------------------------------------------------------------------------
# the stopping distribution and L_depth
# ------------------------------------------------------------------------------------------------
def test_stopping_distribution_hand_computed():
    h = torch.tensor([[0.5, 0.25, 0.9], [0.0, 1.0, 0.3], [1.0, 0.5, 0.5]])
    q = stopping_distribution(h)
    expected = torch.tensor([[0.5, 0.5 * 0.25, 0.5 * 0.75],   # last h ignored: takes the rest
                             [0.0, 1.0, 0.0],
                             [1.0, 0.0, 0.0]])
    assert torch.allclose(q, expected)
    assert torch.allclose(q.sum(1), torch.ones(3))
    # log-space version from halting logits agrees (and is stable for large logits)
    inner = torch.tensor([[0.5, 0.25], [0.1, 0.7]])
    q_log = log_stopping_distribution(torch.logit(inner)).exp()
    assert torch.allclose(q_log, stopping_distribution(torch.cat([inner, torch.ones(2, 1)], 1)), atol=1e-6)
    big = log_stopping_distribution(torch.tensor([[80.0, -80.0], [-80.0, -80.0]])).exp()
    assert torch.isfinite(big).all() and torch.allclose(big.sum(1), torch.ones(2))
    # a single exit takes everything
    assert torch.equal(stopping_distribution(torch.tensor([[0.3]])), torch.tensor([[1.0]]))


def test_halting_gradient_is_the_look_ahead_comparison():
    """dL/dh_k = P(reach k) * (g_k - V_{k+1}): halt more iff stopping beats continuing under the policy."""
    torch.manual_seed(0)
    a = torch.randn(1, 3, requires_grad=True)          # halting logits of exits 1..3 (S = 4)
    g = torch.rand(1, 4) * 3                            # loss + lam * cost at each exit
    loss = (log_stopping_distribution(a).exp() * g).sum()
    grad_a, = torch.autograd.grad(loss, [a])
    h = torch.sigmoid(a.detach())[0].tolist()
    gv = g[0].tolist()
    reach, expected = 1.0, []
    for k in range(3):
        # value of continuing past k under the current policy: stop at j > k with prob q_j / reach_{k+1}
        q_next, r = [], 1.0
        for j in range(k + 1, 4):
            q_next.append(r * (h[j] if j < 3 else 1.0))
            r *= 1 - h[j] if j < 3 else 0.0
        v_next = sum(q * x for q, x in zip(q_next, gv[k + 1:]))
        expected.append(reach * (gv[k] - v_next) * h[k] * (1 - h[k]))   # chain rule through the sigmoid
        reach *= 1 - h[k]
    assert grad_a[0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_depth_loss_hand_computed_two_exits():
    # exit 1: logits [d, 0] -> max prob sigmoid(d); exit 2 fixed; label 0
    d, tau, temp, lam = 1.0, 0.6, 0.1, 0.5
    z1 = torch.tensor([[d, 0.0]])
    z2 = torch.tensor([[2.0, 0.0]])
    y = torch.tensor([0])
    fn = DepthLoss([1.0, 3.0], lam=lam, tau=tau, temperature=temp)   # shares 0.25, 0.75 -> C = 0.25, 1
    loss, stats = fn([z1, z2], y)
    p1 = 1 / (1 + math.exp(-d))
    h1 = 1 / (1 + math.exp(-(p1 - tau) / temp))
    ce1, ce2 = -math.log(p1), -math.log(1 / (1 + math.exp(-2.0)))
    expected = h1 * (ce1 + lam * 0.25) + (1 - h1) * (ce2 + lam * 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["expected_exit"] == pytest.approx(h1 * 1 + (1 - h1) * 2, rel=1e-5)
    assert stats["expected_cost"] == pytest.approx(h1 * 0.25 + (1 - h1), rel=1e-5)
    assert stats["l_depth"] == pytest.approx(expected, rel=1e-5)


def test_lam_zero_removes_the_cost_term():
    model = _model()
    x, y = _toy_batch(32)
    s, _, _ = _forward(model, x)
    a = DepthLoss([1, 1, 1], lam=0.0, tau=0.3, temperature=0.1)
    b = DepthLoss([5, 1, 0.1], lam=0.0, tau=0.3, temperature=0.1)
    la, sa = a(s, y)
    lb, sb = b(s, y)
    assert sa["cost_term"] == 0.0
    assert la.item() == pytest.approx(sa["expected_ce"]) and la.item() == pytest.approx(lb.item())
    ga = torch.autograd.grad(la, list(model.parameters()), retain_graph=True, allow_unused=True)
    gb = torch.autograd.grad(lb, list(model.parameters()), allow_unused=True)
    for u, v in zip(ga, gb):
        assert (u is None) == (v is None) and (u is None or torch.allclose(u, v))
    # lam > 0 adds exactly lam * expected cost
    lc, sc = DepthLoss([1, 1, 1], lam=0.7, tau=0.3, temperature=0.1)(s, y)
    assert lc.item() == pytest.approx(sa["expected_ce"] + 0.7 * sc["expected_cost"], rel=1e-5)


def test_halting_path_never_rewards_confident_mistakes():
    # exit 1 is confidently wrong (class 1), stopping there is very cheap: the raw max-prob gradient
    # would push class 1 further up; ours must only push it down (and the true class up).
    z1 = torch.tensor([[0.0, 3.0, 0.0, 0.0]], requires_grad=True)
    z2 = torch.tensor([[3.0, 0.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0])
    fn = DepthLoss([0.01, 0.99], lam=50.0, tau=0.8, temperature=0.05)
    loss, _ = fn([z1, z2], y)
    g1, = torch.autograd.grad(loss, [z1])
    assert g1[0, 1] > 0          # descent lowers the wrong class
    assert g1[0, 0] < 0          # ... and raises the true one
    # the same gradient flows when exit 1 is right: stopping there pays, so it becomes more confident
    z1r = torch.tensor([[3.0, 0.0, 0.0, 0.0]], requires_grad=True)
    loss_r, _ = fn([z1r, z2], y)
    only_ce = torch.autograd.grad(fn.stopping_distribution([z1r, z2]).detach()[0, 0]
                                  * torch.nn.functional.cross_entropy(z1r, y), [z1r])[0]
    g1r, = torch.autograd.grad(loss_r, [z1r])
    assert g1r[0, 0] < only_ce[0, 0]  # halting path adds a push towards the (right) class


def test_diminishing_term_sign():
    fn = DepthLoss([1, 1, 1], beta=1.0)
    dec = [torch.tensor([0.5, 0.6]), torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2])]
    assert fn.diminishing_penalty(dec).item() == 0.0
    inc = [torch.tensor([0.1, 0.1]), torch.tensor([0.2, 0.3]), torch.tensor([0.4, 0.3])]
    # pairs: mean(0.1, 0.2) = 0.15 and mean(0.2, 0.0) = 0.1 -> 0.125
    assert fn.diminishing_penalty(inc).item() == pytest.approx(0.125)
    # skipped sub-paths are left out: consecutive *executed* ones are compared
    assert fn.diminishing_penalty([torch.tensor([0.1]), None, torch.tensor([0.3])]).item() == pytest.approx(0.2)
    assert fn.diminishing_penalty([None, None, torch.tensor([0.3])]).item() == 0.0
    # the gradient only shrinks the later increment
    r1, r2 = torch.tensor([0.1], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    g = torch.autograd.grad(fn.diminishing_penalty([r1, r2, None]), [r1, r2], allow_unused=True)
    assert g[0] is None and g[1].item() > 0
    # and it is added with weight beta
    z = [torch.zeros(2, 4)] * 3
    y = torch.tensor([0, 1])
    loss_b, stats = DepthLoss([1, 1, 1], beta=2.0)(z, y, inc)
    loss_0, _ = DepthLoss([1, 1, 1], beta=0.0)(z, y, inc)
    assert stats["diminishing"] == pytest.approx(0.125)
    assert loss_b.item() == pytest.approx(loss_0.item() + 0.25, rel=1e-6)


@pytest.mark.parametrize("halting", ["confidence", "learned"])
def test_gradients_reach_every_trainable_parameter(halting):
    model = _model()
    x, y = _toy_batch(16)
    depth = DepthLoss([1, 2, 3], lam=0.3, halting=halting, tau=0.3, temperature=0.1, beta=0.1)
    fn = ADNLoss(3, depth=depth)
    s, b, inc = _forward(model, x)
    loss, stats = fn(s, b, y, inc)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
    loss.backward()
    params = dict(model.named_parameters())
    params.update({f"loss.{n}": p for n, p in fn.named_parameters()})
    if halting == "learned":
        assert any(n.startswith("loss.depth.halting_head") for n in params)
    else:
        assert not list(fn.parameters())
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def _train_expected_exit(lam: float, halting: str, steps: int = 30) -> tuple[float, float]:
    # noisy labels: the exits cannot all become confident everywhere, so where to stop matters
    x, y = _toy_batch(256, noise=0.5)
    model = _model(seed=3)
    depth = DepthLoss([1, 1, 1], lam=lam, halting=halting)   # default tau = 0.8, temperature = 0.05
    fn = ADNLoss(3, depth=depth)
    opt = torch.optim.Adam(list(model.parameters()) + list(fn.parameters()), lr=1e-2)
    for _ in range(steps):
        s, b, inc = _forward(model, x)
        loss, _ = fn(s, b, y, inc)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, stats = depth(model(x), y)
    return stats["expected_exit"], stats["expected_ce"]


@pytest.mark.parametrize("halting", ["confidence", "learned"])
def test_larger_lam_lowers_expected_exit(halting):
    e0, ce0 = _train_expected_exit(0.0, halting)
    e1, ce1 = _train_expected_exit(2.0, halting)
    assert e1 < e0 - 0.25, (e0, e1)
    assert math.isfinite(ce0) and math.isfinite(ce1)


# ------------------------------------------------------------------------------------------------
# costs and bad arguments
# ------------------------------------------------------------------------------------------------
def test_costs_from_macs_and_latency():
    assert costs_from_macs([100, 300, 400]) == pytest.approx([0.25, 0.5, 0.25])
    # earlier heads evaluated by the runtime are added to later exits
    # -> [90, 300, 400]: segments 90, 210, 100
    assert costs_from_macs([90, 290, 380], head_macs=[10, 10, 10]) == pytest.approx([0.225, 0.525, 0.25])
    assert sum(costs_from_macs([3, 7, 11, 13])) == pytest.approx(1.0)
    assert costs_from_latency([2.0, 1.0, 1.0]) == pytest.approx([0.5, 0.25, 0.25])
    assert costs_from_latency([2.0, 3.0, 4.0], cumulative=True) == pytest.approx([0.5, 0.25, 0.25])
    fn = DepthLoss([2, 1, 1])
    assert fn.cumulative_costs.tolist() == pytest.approx([0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        costs_from_macs([100, 50, 200])
    with pytest.raises(ValueError):
        costs_from_macs([])


def test_bad_arguments_raise_value_errors():
    z = [torch.zeros(2, 4)] * 3
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="costs"):
        DepthLoss([1, 1])(z, y)
    with pytest.raises(ValueError, match="lam"):
        DepthLoss([1, 1, 1], lam=-0.1)
    with pytest.raises(ValueError, match="beta"):
        DepthLoss([1, 1, 1], beta=-1)
    with pytest.raises(ValueError, match="costs"):
        DepthLoss([1, -1, 1])
    with pytest.raises(ValueError, match="halting"):
        DepthLoss([1, 1, 1], halting="oracle")
    with pytest.raises(ValueError, match="temperature"):
        DepthLoss([1, 1, 1], temperature=0)
    with pytest.raises(ValueError, match="increments"):
        DepthLoss([1, 1, 1])(z, y, [None])
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            ADNLoss(3, alpha=alpha)
    with pytest.raises(ValueError, match="exit weights"):
        ADNLoss(3, exit_weights=[1, 1])
    with pytest.raises(ValueError, match="exit weights"):
        exit_cross_entropy(z, y, [1, -1, 1])
    with pytest.raises(ValueError, match="depth loss"):
        ADNLoss(2, depth=DepthLoss([1, 1, 1]))
    with pytest.raises(ValueError, match="exits"):
        ADNLoss(2)(z, None, y)
    with pytest.raises(ValueError, match="targets"):
        exit_cross_entropy(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="targets"):
        exit_cross_entropy(z, torch.tensor([0.0, 1.0]))
    # integer targets of any int dtype are fine
    assert torch.isfinite(DepthLoss([1, 1, 1])(z, y.int())[0])
    with pytest.raises(ValueError, match="temperature"):
        distillation_kl(z, z, temperature=-1.0)


def test_learned_halting_starts_uniform_and_soft_targets_work():
    head = LearnedHalting(4)
    q = log_stopping_distribution(head(torch.rand(5, 3, 3))).exp()
    assert torch.allclose(q, torch.full((5, 4), 0.25), atol=1e-6)
    # class-probability targets (mixup / cutmix) are accepted everywhere
    torch.manual_seed(0)
    z = [torch.randn(6, 4, requires_grad=True) for _ in range(3)]
    soft = torch.softmax(torch.randn(6, 4), 1)
    loss, stats = ADNLoss(3, depth=DepthLoss([1, 1, 1], halting="learned"))(z, [t.detach() for t in z], soft)
    loss.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in z)
