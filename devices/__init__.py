"""Device profiles: what each deployment target is, and how to compile for it.

Profiles are TOML data files (``devices/profiles/*.toml``, plus user profiles),
validated on load::

    from devices import load_profile, list_profiles
    p = load_profile("jetson")             # alias of jetson-orin-nano
    p.backend_order()                      # ['tensorrt', 'onnxruntime', 'tvm']
    p.backend("tvm").options["target"]     # TVM JSON-dict target

On-device code imports this package: it must never import torch, train/ or export/
(nor tvm, whose import pulls torch in a full dev venv).  Stdlib only.
"""

from .estimate import Estimate, estimate, estimate_bytes_moved, estimate_latency_ms
from .host import fingerprint
from .profile import (
    BACKENDS,
    BackendSpec,
    Hardware,
    PeakSpec,
    Profile,
    ProfileError,
    ProfileNotFoundError,
    Software,
    validate_profile,
)
from .registry import list_profiles, load_profile, profile_index, user_profile_dirs

__all__ = [
    "BACKENDS",
    "BackendSpec",
    "Estimate",
    "Hardware",
    "PeakSpec",
    "Profile",
    "ProfileError",
    "ProfileNotFoundError",
    "Software",
    "estimate",
    "estimate_bytes_moved",
    "estimate_latency_ms",
    "fingerprint",
    "list_profiles",
    "load_profile",
    "profile_index",
    "user_profile_dirs",
    "validate_profile",
]
