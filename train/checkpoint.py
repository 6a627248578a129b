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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing anything but tensors/data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        if type(exc).__name__ == "UnpicklingError":
            # torch's own message suggests weights_only=False, i.e. running the file's code: never.
            raise CheckpointError(f"{path}: not a readable checkpoint: it holds objects other than "
                                  "tensors and plain data, and checkpoints are only loaded with "
                                  "weights_only=True") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this tool (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__})")
    return state


def model_from_checkpoint(path: str | Path, use_ema: bool = True):
    """Rebuild the trained model (eval mode) and return ``(model, checkpoint_dict)``."""
    from train.models import create_model

    state = load_checkpoint(path)
    missing = [k for k in ("model_name", "model_config", "model") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a model checkpoint (no {', '.join(missing)})")
    model = create_model(state["model_name"], **state["model_config"])
    weights = state.get("ema") if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    model.eval()
    return model, state
