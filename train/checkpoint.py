"""Checkpoints: written atomically, loaded with ``weights_only=True`` (nothing is unpickled)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from runtime.atomic import atomic_write_bytes
from runtime.errors import PipelineError

CHECKPOINT_FORMAT = 1


class CheckpointError(PipelineError, ValueError):
    """A file is not a checkpoint this tool wrote, or is refused (it holds objects other than
    tensors and plain data). The message starts with the file. Also a ValueError."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Serialise ``state`` and replace ``path`` atomically (a crash leaves the old file intact)."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _read(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with refusals and corrupt files as CheckpointError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        if type(exc).__name__ == "UnpicklingError":
            # torch's own message suggests weights_only=False, i.e. running the file's code: never.
            raise CheckpointError(f"{path}: not a readable checkpoint: it holds objects other than "
                                  "tensors and plain data, and checkpoints are only loaded with "
                                  "weights_only=True") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing anything but tensors/data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = _read(path, map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this tool (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__})")
    return state


def model_from_checkpoint(path: str | Path, use_ema: bool = True):
    """Rebuild the trained model (eval mode) and return ``(model, checkpoint_dict)``.

    ``model_name`` is a registered name, an installed plugin's name or a ``module:factory`` spec;
    a spec's module is imported (that runs its code: the checkpoint names it, see
    ``train/models/plugins.py``), a spec that is not ``identifier(.identifier)*:identifier`` is
    refused before any import. ``model_config`` holds the factory's keyword arguments (keys
    that an older checkpoint lacks get the value it was built with: ``checkpoint_model_config``).
    """
    from train.models import checkpoint_model_config, create_model
    from runtime.errors import UsageError

    state = load_checkpoint(path)
    missing = [k for k in ("model_name", "model_config", "model") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a model checkpoint (no {', '.join(missing)})")
    name, config = state["model_name"], state["model_config"]
    if not isinstance(name, str) or not isinstance(config, dict) \
            or not all(isinstance(k, str) and k.isidentifier() for k in config):
        raise CheckpointError(f"{path}: model_name must be a string and model_config a table of "
                              "keyword arguments")
    try:
        model = create_model(name, **checkpoint_model_config(name, config))
    except UsageError as exc:
        raise CheckpointError(f"{path}: cannot rebuild its model: {exc}") from None
    weights = state.get("ema") if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    model.eval()
    return model, state


# ---------------------------------------------------------------------------------------------
# initial weights (``--init-weights``) and the parts of a model, found through its cut points
# ---------------------------------------------------------------------------------------------

PARTS = ("stem", "stages", "last_stage", "heads")


@torch.no_grad()
def part_parameter_names(model, parts: tuple[str, ...] = ("heads",)) -> set[str]:
    """Names of the parameters that the given parts use, found by running the model's cut points
    (``forward_stem`` / ``forward_mandatory`` (both norm settings) / ``forward_skippable`` /
    ``forward_head``) on one zero image: works for any AdaptiveDepthNet.

    Parts: ``stem``, ``stages`` (every stage), ``last_stage``, ``heads`` (every exit head)."""
    from train.models.macs import used_params

    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; known: {PARTS}")
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(1, model.in_chans, model.img_size, model.img_size, device=p.device, dtype=p.dtype)
        ids: dict[int, int] = {}
        used, h = used_params(lambda: model.forward_stem(x))
        if "stem" in parts:
            ids.update(used)
        S = model.num_stages
        for k in range(S):
            take = "stages" in parts or ("last_stage" in parts and k == S - 1)
            used_skip, _ = used_params(lambda: model.forward_mandatory(k, h, True))
            used_mand, h = used_params(lambda: model.forward_mandatory(k, h, False))
            used_sk, h = used_params(lambda: model.forward_skippable(k, h))
            if take:
                ids.update(used_skip)
                ids.update(used_mand)
                ids.update(used_sk)
            used_head, _ = used_params(lambda: model.forward_head(k, h))
            if "heads" in parts:
                ids.update(used_head)
    finally:
        model.train(was)
    return {name for name, prm in model.named_parameters() if id(prm) in ids}


def _module_prefixes(names: set[str]) -> set[str]:
    return {n.rsplit(".", 1)[0] for n in names if "." in n}


def load_init_weights(model, path: str | Path) -> str:
    """Initialise ``model`` from ``path``, in place; returns a one-line report.

    ``path`` is a checkpoint of this tool (its EMA weights when it has them, else its weights) or
    a state dict file of the same architecture (``{"state_dict": ...}`` / ``{"model": ...}``
    wrappers and a ``module.`` prefix are removed), or, for the ResNet-ADN / ViT-ADN families, a
    torchvision-format state dict (``train.models.load_torchvision_state_dict``: twins copied,
    intermediate exits fresh). Exit-head tensors whose shape differs (another class count) are
    left freshly initialised; any other mismatch raises :class:`CheckpointError`. Files are read
    with ``weights_only=True``: nothing is unpickled.
    """
    from train.models.torchvision_weights import load_torchvision_state_dict, read_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"initial weights not found: {path}")
    raw = _read(path)
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT and "model" in raw:
        raw = raw.get("ema") if raw.get("ema") is not None else raw["model"]
    try:
        sd = read_state_dict(raw)
    except TypeError as exc:
        raise CheckpointError(f"{path}: not a state dict ({exc})") from None
    target = model.state_dict()
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    if not unexpected and not missing:
        heads = _module_prefixes(part_parameter_names(model, ("heads",)))
        fresh, bad = [], []
        for key, value in sd.items():
            if not isinstance(value, torch.Tensor):
                bad.append(f"{key} (not a tensor)")
            elif value.shape != target[key].shape:
                (fresh if key.rsplit(".", 1)[0] in heads else bad).append(key)
        if bad:
            raise CheckpointError(f"{path}: does not match {type(model).__name__}: shape of "
                                  f"{', '.join(bad[:5])}{'...' if len(bad) > 5 else ''} differs")
        with torch.no_grad():
            for key, value in sd.items():
                if key not in fresh:
                    target[key].copy_(value)
        note = f"; {len(fresh)} exit-head tensors left fresh (shape differs)" if fresh else ""
        return f"loaded {len(sd) - len(fresh)} tensors from {path}{note}"
    from train.models import ResNetADN, ViTADN

    if isinstance(model, (ResNetADN, ViTADN)):
        try:
            report = load_torchvision_state_dict(model, sd, strict=True)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return f"torchvision-format weights from {path}: {report}"
    raise CheckpointError(f"{path}: does not match {type(model).__name__}: missing "
                          f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                          f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
