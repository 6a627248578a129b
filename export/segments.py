"""Cut any :class:`AdaptiveDepthNet` into exportable pieces, using only the base-class methods.

Compilers cannot skip work inside one graph, so the network is cut between exits and the
runtime chains the pieces. Segment ``k`` takes the features after stage ``k-1`` (the image for
``k = 0``, which also runs the stem), runs stage ``k`` with its skippable sub-path on or off and
exit head ``k``, and returns ``(features_k, logits_k)``; the last segment returns the logits only.

Two granularities produce the same 2^S execution plans:

* ``"stage"`` (default, see docs/export.md for the measurement): two pieces per stage,
  ``stage{k}.full`` (mandatory + skippable + head) and ``stage{k}.skip`` (mandatory with the
  skip-aware twin norms + head). One call per segment.
* ``"split"``: ``stage{k}.mandatory`` / ``stage{k}.mandatory_skipnorm`` / ``stage{k}.skippable`` /
  ``head{k}``: four distinct graphs per stage, 2-3 calls per segment.

``per_path=True`` (stage granularity; a model whose norm statistics were re-estimated per path,
:mod:`train.path_norms`): stage ``k >= 1`` gets one piece per path ``config[:k + 1]``,
``stage{k}.{full|skip}.{prefix}`` with ``prefix = config[:k]`` (2 + 4 + 8 pieces for three
stages), each carrying that path's statistics; stage 0 keeps ``stage0.full`` / ``stage0.skip``.

Tensors pass by name: ``x`` is the model input, ``features{k}`` the features after stage ``k``,
``mid{k}`` the features after stage ``k``'s mandatory sub-path (split granularity, non-skipped
path only) and ``logits`` the exit's logits (replaced by every segment).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from train.models.base import AdaptiveDepthNet, all_skip_configs, skip_to_str
from train.models.macs import used_params
from train.path_norms import model_for_path

GRANULARITIES = ("stage", "split")
DEFAULT_GRANULARITY = "stage"
INPUT_NAME = "x"
LOGITS = "logits"


def features_name(k: int) -> str:
    return f"features{k}"


def _input_name(k: int) -> str:
    return INPUT_NAME if k == 0 else features_name(k - 1)


class PieceModule(nn.Module):
    """A torch module computing one piece from the parent model's base-class methods."""

    def __init__(self, model: AdaptiveDepthNet, fn: Callable[[AdaptiveDepthNet, Tensor], object]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, h: Tensor):  # type: ignore[override]
        return self._fn(self.model, h)


@dataclass
class PieceDef:
    """One piece: its manifest description and the torch function computing it.

    ``fn(model, tensor) -> tensor | tuple`` maps the single input (``input_name``) to the outputs
    in ``output_names`` order. ``path`` (per-path plans): the skip variants of stages 0..stage
    whose norm statistics the piece runs with (``train.path_norms.model_for_path``).
    """

    id: str
    kind: str  # manifest piece kind: stage | mandatory | skippable | head
    stage: int
    skip: bool | None
    input_name: str
    output_names: list[str]
    fn: Callable[[AdaptiveDepthNet, Tensor], object] = field(repr=False)
    path: str | None = None

    @property
    def returns_logits(self) -> bool:
        return LOGITS in self.output_names

    @property
    def prefix(self) -> str | None:
        """The manifest's ``prefix``: the variants of the stages before this one that the piece
        is specific to (None: it serves every path)."""
        return self.path[:-1] if self.path is not None and self.stage > 0 else None

    def bind(self, model: AdaptiveDepthNet) -> AdaptiveDepthNet:
        """The model instance this piece computes with (the path's statistics, if any)."""
        return model_for_path(model, self.path)  # type: ignore[return-value]

    def module(self, model: AdaptiveDepthNet) -> PieceModule:
        return PieceModule(self.bind(model), self.fn)

    def __call__(self, model: AdaptiveDepthNet, h: Tensor) -> list[Tensor]:
        out = self.fn(self.bind(model), h)
        return list(out) if isinstance(out, (tuple, list)) else [out]


@dataclass
class SegmentPlan:
    """Pieces and, per skip config ('FTF'), the piece ids to run per segment."""

    granularity: str
    num_stages: int
    pieces: list[PieceDef]
    execution: dict[str, list[list[str]]]

    def piece(self, piece_id: str) -> PieceDef:
        for p in self.pieces:
            if p.id == piece_id:
                return p
        raise KeyError(piece_id)


# ---------------------------------------------------------------------------------------------
# the piece functions (closures over k only; the model is an argument so a piece can be bound
# to any instance of the architecture)
# ---------------------------------------------------------------------------------------------

def _enter(model: AdaptiveDepthNet, k: int, h: Tensor) -> Tensor:
    return model.forward_stem(h) if k == 0 else h


def _stage_fn(k: int, skip: bool, last: bool):
    def fn(model: AdaptiveDepthNet, h: Tensor):
        h = model.forward_stage(k, _enter(model, k, h), skip)
        logits = model.forward_head_for(k, h, skip)
        return logits if last else (h, logits)
    return fn


def _mandatory_fn(k: int, skipping: bool):
    def fn(model: AdaptiveDepthNet, h: Tensor):
        return model.forward_mandatory(k, _enter(model, k, h), skipping)
    return fn


def _skippable_fn(k: int):
    def fn(model: AdaptiveDepthNet, h: Tensor):
        return model.forward_skippable(k, h)
    return fn


def _head_fn(k: int, skipped: bool = False):
    def fn(model: AdaptiveDepthNet, h: Tensor):
        return model.forward_head_for(k, h, skipped)
    return fn


def stage_piece_id(k: int, skip: bool, prefix: str | None = None) -> str:
    """Id of stage k's piece in one variant: ``stage1.skip``; one specific to the path
    ``prefix`` before it (variants of stages 0..k-1): ``stage1.skip.F``."""
    name = f"stage{k}.{'skip' if skip else 'full'}"
    return f"{name}.{prefix}" if prefix else name


def stage_pieces(num_stages: int, per_path: bool = False) -> list[PieceDef]:
    """``stage{k}.full`` / ``stage{k}.skip``: one piece per stage variant, head included
    (``per_path``: one per variant and path before it, ``stage{k}.{full|skip}.{prefix}``)."""
    pieces = []
    for k in range(num_stages):
        last = k == num_stages - 1
        outs = [LOGITS] if last else [features_name(k), LOGITS]
        prefixes = ["".join(p) for p in itertools.product("FT", repeat=k)] if per_path else [None]
        for prefix in prefixes:
            for skip in (False, True):
                path = None if prefix is None else prefix + ("T" if skip else "F")
                pieces.append(PieceDef(stage_piece_id(k, skip, prefix), "stage", k, skip,
                                       _input_name(k), list(outs), _stage_fn(k, skip, last),
                                       path=path))
    return pieces


def split_pieces(num_stages: int, head_twins: bool = False) -> list[PieceDef]:
    """Mandatory / mandatory-with-twin-norms / skippable / head pieces per stage
    (``head_twins``: a ``head{k}.skip`` piece too, for heads with per-variant norms)."""
    pieces = []
    for k in range(num_stages):
        pieces += [
            PieceDef(f"stage{k}.mandatory", "mandatory", k, False, _input_name(k), [f"mid{k}"],
                     _mandatory_fn(k, False)),
            PieceDef(f"stage{k}.mandatory_skipnorm", "mandatory", k, True, _input_name(k),
                     [features_name(k)], _mandatory_fn(k, True)),
            PieceDef(f"stage{k}.skippable", "skippable", k, False, f"mid{k}", [features_name(k)],
                     _skippable_fn(k)),
            PieceDef(f"head{k}", "head", k, None, features_name(k), [LOGITS], _head_fn(k)),
        ]
        if head_twins and k < num_stages - 1:
            pieces.append(PieceDef(f"head{k}.skip", "head", k, True, features_name(k), [LOGITS],
                                   _head_fn(k, True)))
    return pieces


def segment_plan(num_stages: int, granularity: str = DEFAULT_GRANULARITY,
                 head_twins: bool = False, per_path: bool = False) -> SegmentPlan:
    """Pieces and execution plans for all 2^S skip configs of an S-stage model
    (``head_twins``: the exit heads keep per-variant norms, see ``forward_head_for``;
    ``per_path``: one piece per skip path, see the module docstring)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    if num_stages < 1:
        raise ValueError(f"a model needs at least one stage, got {num_stages}")
    if per_path and granularity != "stage":
        raise ValueError(f"pieces per path need granularity 'stage', got {granularity!r}")
    pieces = (stage_pieces(num_stages, per_path) if granularity == "stage"
              else split_pieces(num_stages, head_twins))
    execution: dict[str, list[list[str]]] = {}
    for cfg in all_skip_configs(num_stages):
        segs = []
        for k, skip in enumerate(cfg):
            if granularity == "stage":
                segs.append([stage_piece_id(k, skip, skip_to_str(cfg)[:k] if per_path else None)])
            elif skip:
                head = f"head{k}.skip" if head_twins and k < num_stages - 1 else f"head{k}"
                segs.append([f"stage{k}.mandatory_skipnorm", head])
            else:
                segs.append([f"stage{k}.mandatory", f"stage{k}.skippable", f"head{k}"])
        execution[skip_to_str(cfg)] = segs
    return SegmentPlan(granularity, num_stages, pieces, execution)


# ---------------------------------------------------------------------------------------------
# running pieces in torch (the parity reference and the source of example inputs)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def run_plan_torch(model: AdaptiveDepthNet, plan: SegmentPlan, x: Tensor, skip_config: str,
                   ) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Chain the torch pieces of ``skip_config``; returns (logits per exit, all named tensors)."""
    tensors: dict[str, Tensor] = {INPUT_NAME: x}
    exits = []
    for seg in plan.execution[skip_config]:
        for pid in seg:
            p = plan.piece(pid)
            tensors.update(zip(p.output_names, p(model, tensors[p.input_name])))
        exits.append(tensors[LOGITS])
    return exits, tensors


@torch.no_grad()
def piece_inputs(model: AdaptiveDepthNet, plan: SegmentPlan, x: Tensor) -> dict[str, Tensor]:
    """The real input of every piece for image batch ``x``: piece id -> tensor.

    Inputs are taken on the all-F path (every stage runs in full), where every tensor name a
    piece reads exists. The chained check (``export.parity.check_chains``) then covers the
    inputs every other skip config produces.
    """
    _, tensors = run_plan_torch(model, plan, x, "F" * plan.num_stages)
    return {p.id: tensors[p.input_name] for p in plan.pieces}


# ---------------------------------------------------------------------------------------------
# parameters per piece
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def piece_params(model: AdaptiveDepthNet, plan: SegmentPlan, inputs: dict[str, Tensor]) -> dict[str, int]:
    """Parameters each piece uses (twin norms count only for the skip variants)."""
    out = {}
    for p in plan.pieces:
        used, _ = used_params(lambda: p(model, inputs[p.id][:1]))
        out[p.id] = sum(used.values())
    return out


def piece_macs_table(plan: SegmentPlan, macs: dict) -> dict[str, int]:
    """Batch-1 MACs per piece from ``train.models.macs.piece_macs`` (stem counted in stage 0)."""
    out = {}
    for p in plan.pieces:
        k = p.stage
        stem = macs["stem"] if k == 0 else 0
        if p.kind == "stage":
            body = macs["mandatory_skipping"][k] if p.skip else macs["mandatory"][k] + macs["skippable"][k]
            out[p.id] = stem + body + macs["head"][k]
        elif p.kind == "mandatory":
            out[p.id] = stem + (macs["mandatory_skipping"][k] if p.skip else macs["mandatory"][k])
        elif p.kind == "skippable":
            out[p.id] = macs["skippable"][k]
        else:
            out[p.id] = macs["head"][k]
    return out


def prefix_order(configs: Sequence[str]) -> list[str]:
    """Every distinct config prefix ('F', 'T', 'FF', ...), shortest first (for cached chaining)."""
    seen: dict[str, None] = {}
    for n in range(1, max(len(c) for c in configs) + 1):
        for c in configs:
            seen.setdefault(c[:n], None)
    return list(seen)
