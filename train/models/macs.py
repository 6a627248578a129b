"""MACs and parameters per model piece, measured on the real graph with ``FlopCounterMode``.

MACs = FLOPs / 2 of what the counter sees: convolutions, linear/matmul/bmm and attention (norms,
activations and pooling are not counted, as in the ADN paper's GMACs). Counting runs in eval mode,
under ``torch.no_grad``, at batch 1.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .base import AdaptiveDepthNet, normalize_skip

InputSize = int | Sequence[int] | None


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


# The CPU fused attention kernel is missing from torch's flop registry.
_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_macs(fn: Callable[[], object]) -> int:
    """MACs of whatever ``fn()`` runs (FLOPs / 2 as counted by ``FlopCounterMode``)."""
    return _macs_and_output(fn)[0]


def _macs_and_output(fn: Callable[[], object]) -> tuple[int, object]:
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        out = fn()
    return counter.get_total_flops() // 2, out


def _input(model: AdaptiveDepthNet, input_size: InputSize) -> Tensor:
    size = model.img_size if input_size is None else input_size
    h, w = (size, size) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
    p = next(model.parameters())
    return torch.zeros(1, model.in_chans, h, w, device=p.device, dtype=p.dtype)


def _eval_no_grad(fn):
    @functools.wraps(fn)
    def wrapped(model: nn.Module, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)
    return wrapped


@_eval_no_grad
def piece_macs(model: AdaptiveDepthNet, input_size: InputSize = None) -> dict:
    """MACs of every piece: ``{"input_size": [H, W], "stem": int, "mandatory": [S], "mandatory_skipping": [S],
    "skippable": [S], "head": [S]}`` (``input_size``: side or (H, W); None -> ``model.img_size``)."""
    x = _input(model, input_size)
    out: dict = {"input_size": list(x.shape[-2:]), "mandatory": [], "mandatory_skipping": [],
                 "skippable": [], "head": []}
    out["stem"], h = _macs_and_output(lambda: model.forward_stem(x))
    for k in range(model.num_stages):
        out["mandatory_skipping"].append(count_macs(lambda: model.forward_mandatory(k, h, True)))
        macs, h = _macs_and_output(lambda: model.forward_mandatory(k, h, False))
        out["mandatory"].append(macs)
        macs, h = _macs_and_output(lambda: model.forward_skippable(k, h))
        out["skippable"].append(macs)
        out["head"].append(count_macs(lambda: model.forward_head(k, h)))
    return out


def macs_per_exit(model: AdaptiveDepthNet, skip: Sequence[bool] | str | None, input_size: InputSize = None,
                  *, pieces: dict | None = None) -> list[int]:
    """MACs to reach each exit k under ``skip``: stem + stages 0..k along the path + head k.

    Earlier heads are not included (add ``pieces["head"][j]`` for exits actually evaluated).
    """
    skip = normalize_skip(skip, model.num_stages)
    pieces = pieces or piece_macs(model, input_size)
    total, result = pieces["stem"], []
    for k, s in enumerate(skip):
        total += pieces["mandatory_skipping"][k] if s else pieces["mandatory"][k] + pieces["skippable"][k]
        result.append(total + pieces["head"][k])
    return result


class _ParamRecorder(TorchFunctionMode):
    """Records every parameter passed to a torch function."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stack = list(args) + list(kwargs.values())
        while stack:
            a = stack.pop()
            if isinstance(a, nn.Parameter):
                self.seen[id(a)] = a.numel()
            elif isinstance(a, (list, tuple)):
                stack.extend(a)
        return func(*args, **kwargs)


def used_params(fn: Callable[[], object]) -> tuple[dict[int, int], object]:
    """Run ``fn`` and return ({id(param): numel} of every parameter it touched, its result)."""
    with _ParamRecorder() as rec:
        out = fn()
    return rec.seen, out


@_eval_no_grad
def params_per_exit(model: AdaptiveDepthNet, skip: Sequence[bool] | str | None = None,
                    input_size: InputSize = None) -> list[int]:
    """Parameters used to reach each exit k under ``skip`` (stem + path + head k, twins when skipping)."""
    skip = normalize_skip(skip, model.num_stages)
    x = _input(model, input_size)
    path, h = used_params(lambda: model.forward_stem(x))
    result = []
    for k, s in enumerate(skip):
        used, h = used_params(lambda: model.forward_mandatory(k, h, s))
        path.update(used)
        if not s:
            used, h = used_params(lambda: model.forward_skippable(k, h))
            path.update(used)
        head, _ = used_params(lambda: model.forward_head(k, h))
        result.append(sum({**path, **head}.values()))
    return result
