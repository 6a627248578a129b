"""Plain JSON values from numpy / tensor / float data (no NaN or inf; string keys)."""
from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """Dicts, lists, numbers and strings only: arrays and scalars of numpy (or any object with
    ``tolist()``, e.g. torch tensors) become lists/numbers, non-finite floats become None, other
    objects their ``str``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    return str(value)
