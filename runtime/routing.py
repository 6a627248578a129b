"""Joint routing per input: at each kept exit, stop, or continue with a chosen variant of the next
span of stages (numpy only; docs/stopping.md, "The router").

A *span* runs stages ``first..last`` and ends at exit ``last``; its *variant* is the F/T string of
those stages ('T': the stage's skippable sub-path is skipped). A *path* is the variant string of
every stage run so far (``"FT"`` after exit 1 of a sample that ran stage 0 in full and skipped
stage 1's skippable sub-path). A policy keeps some exits (always the last one) and, at each kept
exit but the last, maps (path, confidence) to a ranked list of actions that ends with ``"stop"``:
the first action that fits the deadline is taken, and without a deadline the first one.

::

    rule = make_rule("router", params)           # params from export/routing_fit.py
    policy = rule.policy_for_budget(budget_ms)   # a budget selects the policy fitted for it
    policy.start                                 # variant of the first span
    policy.ranked("FT", 0.73)                    # ('T', 'stop') at exit 1 of path "FT"

The decision function :meth:`RouterPolicy.ranked` is the one the build's simulation uses, so a
policy does on the device what it did in calibration.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .errors import ConfigError
from .exits import top_prob
from .rules import RULES, StopContext, StoppingRule, _check_keys, _py
from .validate import Validator, type_name

__all__ = ["RouterPolicy", "RouterRule", "STOP", "DEFAULT_EPSILON", "spans_of"]

STOP = "stop"
#: The target deadline miss rate of a bundle (1%): a span runs only when the chance of finishing
#: it within the budget is at least 1 - epsilon.
DEFAULT_EPSILON = 0.01
_VARIANT_CHARS = frozenset("FT")


def spans_of(exits: Sequence[int]) -> list[tuple[int, int]]:
    """``[(first, last), ...]``: the spans of stages between consecutive kept exits."""
    out, first = [], 0
    for e in exits:
        out.append((first, int(e)))
        first = int(e) + 1
    return out


@dataclass(frozen=True)
class _Decision:
    breaks: tuple[float, ...]               # ascending confidence break points
    ranked: tuple[tuple[str, ...], ...]     # len(breaks) + 1 ranked action lists


class RouterPolicy:
    """One fitted policy: kept exits, the first span's variant and the decisions per path."""

    def __init__(self, exits: Sequence[int], start: str,
                 decisions: Mapping[str, Mapping[str, Any]], *, lam: float = 0.0,
                 stages: Optional[int] = None, where: str = "policy") -> None:
        v = Validator("stopping rule 'router'")
        ex = [v.int_(_py(e), f"{where}.exits[{i}]", lo=0) for i, e in
              enumerate(v.list_(list(exits) if isinstance(exits, (list, tuple)) else exits,
                                f"{where}.exits", min_len=1))]
        if any(b <= a for a, b in zip(ex, ex[1:])):
            v.fail(f"{where}.exits", f"expected strictly increasing exit indices, got {ex}")
        if stages is not None and ex[-1] != stages - 1:
            v.fail(f"{where}.exits", f"the last exit ({stages - 1}) must be kept, got {ex}")
        self.exits = tuple(ex)
        self.spans = spans_of(ex)
        self.lam = v.num(_py(lam), f"{where}.lam", lo=0.0)
        self.start = self._variant(v, start, self.spans[0], f"{where}.start")
        # the span that follows each kept exit but the last, by exit index
        self._next_span = {ex[i]: self.spans[i + 1] for i in range(len(ex) - 1)}
        if not isinstance(decisions, Mapping):
            v.fail(f"{where}.decisions", f"expected an object, got {type_name(decisions)}")
        self.decisions: dict[str, _Decision] = {}
        for path, d in decisions.items():
            pd = f"{where}.decisions[{path!r}]"
            if not isinstance(path, str) or not path or set(path) - _VARIANT_CHARS:
                v.fail(pd, "a path is a non-empty string of F/T")
            e = len(path) - 1
            if e not in self._next_span:
                v.fail(pd, f"the path ends at exit {e}, which is not a kept exit with a span "
                           f"after it (kept exits: {list(ex)})")
            d = _check_keys("router", d, ("breaks", "ranked"))
            breaks = [v.num(_py(b), f"{pd}.breaks[{i}]")
                      for i, b in enumerate(v.list_(d["breaks"], f"{pd}.breaks"))]
            if any(b < a for a, b in zip(breaks, breaks[1:])):
                v.fail(f"{pd}.breaks", "expected ascending break points")
            ranked = v.list_(d["ranked"], f"{pd}.ranked", min_len=1)
            if len(ranked) != len(breaks) + 1:
                v.fail(f"{pd}.ranked", f"expected {len(breaks) + 1} ranked lists (one per "
                                        f"interval between breaks), got {len(ranked)}")
            first, last = self._next_span[e]
            rows = []
            for i, r in enumerate(ranked):
                pr = f"{pd}.ranked[{i}]"
                r = v.list_(r, pr, min_len=1)
                if r[-1] != STOP or STOP in r[:-1]:
                    v.fail(pr, f"a ranked list ends with {STOP!r} (and has it once), got {r}")
                acts = [self._variant(v, a, (first, last), f"{pr}[{j}]")
                        for j, a in enumerate(r[:-1])]
                if len(set(acts)) != len(acts):
                    v.fail(pr, f"an action appears twice: {r}")
                rows.append(tuple(acts) + (STOP,))
            self.decisions[path] = _Decision(tuple(breaks), tuple(rows))

    @staticmethod
    def _variant(v: Validator, x: object, span: tuple[int, int], where: str) -> str:
        n = span[1] - span[0] + 1
        if not isinstance(x, str) or len(x) != n or set(x) - _VARIANT_CHARS:
            v.fail(where, f"expected the F/T variant of stages {span[0]}..{span[1]} "
                          f"({n} character{'s' if n != 1 else ''}), got {x!r}")
        return x  # type: ignore[return-value]

    # -- decisions -------------------------------------------------------------------------------

    def next_span(self, exit_index: int) -> Optional[tuple[int, int]]:
        """The span after kept exit ``exit_index`` (None after the last exit)."""
        return self._next_span.get(exit_index)

    def ranked(self, path: str, confidence: float) -> tuple[str, ...]:
        """The ranked actions at the exit that ends ``path``, for a sample with this
        confidence (top softmax probability); a path the policy never reaches stops."""
        d = self.decisions.get(path)
        if d is None:
            return (STOP,)
        return d.ranked[bisect_right(d.breaks, confidence)]

    def stop_threshold(self, path: str) -> Optional[float]:
        """The confidence from which on the first action at ``path`` is to stop (every
        interval above it stops first); None when even the top interval goes on. A path the
        policy never reaches stops at any confidence: 0."""
        d = self.decisions.get(path)
        if d is None:
            return 0.0
        i = len(d.ranked)
        while i > 0 and d.ranked[i - 1][0] == STOP:
            i -= 1
        if i == len(d.ranked):
            return None
        return 0.0 if i == 0 else float(d.breaks[i - 1])

    def interval(self, path: str, confidence: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`ranked`: the index of each confidence's interval (into
        ``self.decisions[path].ranked``; all 0 for an unknown path, whose one action is stop)."""
        d = self.decisions.get(path)
        if d is None:
            return np.zeros(np.shape(confidence), dtype=np.int64)
        return np.searchsorted(np.asarray(d.breaks, dtype=np.float64),
                               np.asarray(confidence, dtype=np.float64), side="right")

    def ranked_lists(self, path: str) -> tuple[tuple[str, ...], ...]:
        d = self.decisions.get(path)
        return ((STOP,),) if d is None else d.ranked

    def paths(self) -> list[str]:
        return list(self.decisions)

    def used_spans(self) -> set[tuple[int, int, str]]:
        """Every (first, last, variant) this policy may run."""
        out = {(self.spans[0][0], self.spans[0][1], self.start)}
        for path, d in self.decisions.items():
            first, last = self._next_span[len(path) - 1]
            out.update((first, last, a) for r in d.ranked for a in r if a != STOP)
        return out

    def to_dict(self) -> dict:
        return {"exits": list(self.exits), "start": self.start, "lam": self.lam,
                "decisions": {p: {"breaks": list(d.breaks), "ranked": [list(r) for r in d.ranked]}
                              for p, d in self.decisions.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, stages: Optional[int] = None,
                  where: str = "policy") -> "RouterPolicy":
        d = _check_keys("router", d, ("exits", "start", "decisions"), ("lam",))
        return cls(d["exits"], d["start"], d["decisions"], lam=d.get("lam", 0.0), stages=stages,
                   where=where)


class RouterRule(StoppingRule):
    """Joint routing (stop / continue with a chosen variant) over one or more fitted policies.

    ``policies``: fitted :class:`RouterPolicy` dicts; ``default``: the policy used without a
    budget; ``budgets``: ascending ``[budget_ms, policy index]`` pairs, a budget selecting the
    policy of the largest entry not above it (the first one below all entries); ``epsilon``:
    the target deadline miss rate. As a plain :class:`StoppingRule` on a fixed skip config it
    stops where the default policy's first choice is to stop.
    """

    name = "router"

    def __init__(self, policies: Sequence[Any], default: int = 0,
                 budgets: Sequence[Sequence[float]] = (), epsilon: float = DEFAULT_EPSILON,
                 statistic: str = "max_prob") -> None:
        v = Validator("stopping rule 'router'")
        pol = v.list_(list(policies) if isinstance(policies, (list, tuple)) else policies,
                      "params['policies']", min_len=1)
        self.policies = [p if isinstance(p, RouterPolicy)
                         else RouterPolicy.from_dict(p, where=f"params['policies'][{i}]")
                         for i, p in enumerate(pol)]
        stages = {p.exits[-1] for p in self.policies}
        if len(stages) != 1:
            v.fail("params['policies']", "every policy must end at the same last exit")
        self.stages = stages.pop() + 1
        self.default = v.int_(_py(default), "params['default']", lo=0, hi=len(self.policies) - 1)
        rows = []
        for i, b in enumerate(v.list_(list(budgets), "params['budgets']")):
            pb = f"params['budgets'][{i}]"
            b = v.list_(b, pb, min_len=2, max_len=2)
            rows.append((v.num(_py(b[0]), f"{pb}[0]", lo=0.0),
                         v.int_(_py(b[1]), f"{pb}[1]", lo=0, hi=len(self.policies) - 1)))
        if any(b[0] <= a[0] for a, b in zip(rows, rows[1:])):
            v.fail("params['budgets']", "expected strictly ascending budgets")
        self.budgets = rows
        self._budget_ms = [b for b, _ in rows]
        self.epsilon = v.num(_py(epsilon), "params['epsilon']", lo=1e-6, hi=0.5)
        if statistic != "max_prob":
            v.fail("params['statistic']", f"only 'max_prob' is supported, got {statistic!r}")
        self.statistic = statistic

    # -- policies ---------------------------------------------------------------------------------

    @property
    def default_policy(self) -> RouterPolicy:
        return self.policies[self.default]

    def policy_for_budget(self, budget_ms: Optional[float]) -> RouterPolicy:
        """The policy fitted for this budget (the default one without a budget or table)."""
        if budget_ms is None or not self.budgets:
            return self.policies[self.default]
        i = bisect_right(self._budget_ms, budget_ms) - 1
        return self.policies[self.budgets[max(i, 0)][1]]

    def used_spans(self) -> set[tuple[int, int, str]]:
        out: set[tuple[int, int, str]] = set()
        for p in self.policies:
            out |= p.used_spans()
        return out

    # -- StoppingRule -----------------------------------------------------------------------------

    def stop(self, k: int, probs: list[np.ndarray], ctx: Optional[StopContext]) -> np.ndarray:
        p, last = self._current(k, probs, ctx)
        n = p.shape[0]
        policy = self.default_policy
        if last or k == policy.exits[-1]:
            return np.ones(n, dtype=bool)
        if k not in policy.exits:
            return np.zeros(n, dtype=bool)  # a dropped exit: never stop there
        cfg = getattr(ctx, "skip_config", None) if ctx is not None else None
        # the path so far: the context's configuration, else the default policy's first span
        # followed by full stages
        path = (cfg or (policy.start + "F" * self.stages))[:k + 1]
        idx = policy.interval(path, top_prob(p))
        first = np.array([r[0] == STOP for r in policy.ranked_lists(path)])
        return first[idx]

    def params(self) -> dict:
        return {"statistic": self.statistic, "epsilon": self.epsilon, "default": self.default,
                "budgets": [[b, i] for b, i in self.budgets],
                "policies": [p.to_dict() for p in self.policies]}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "RouterRule":
        d = _check_keys(cls.name, params, ("policies",),
                        ("default", "budgets", "epsilon", "statistic"))
        return cls(d["policies"], d.get("default", 0), d.get("budgets", []),
                   d.get("epsilon", DEFAULT_EPSILON), d.get("statistic", "max_prob"))



def check_router_for_manifest(rule: RouterRule, stages: int, source: str) -> None:
    """ConfigError unless every policy of ``rule`` ends at the manifest's last exit."""
    if rule.stages != stages:
        raise ConfigError(source, "stopping.params.policies",
                          f"the router's policies end at exit {rule.stages - 1}, the model has "
                          f"{stages} exits")


RULES["router"] = RouterRule
