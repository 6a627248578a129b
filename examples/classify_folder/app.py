"""Classify every image of a folder on the device, under a latency budget.

    python app.py --bundle BUNDLE --images DIR --budget-ms 2

A small on-device app: it uses only ``runtime/`` (numpy + one backend, never torch). Images are
read with ``runtime.images``: PGM/PPM and ``.npy`` arrays with numpy alone, and anything PIL
reads (PNG, JPEG, BMP, ...) when PIL is installed; images of another size are resized and
cropped as training did when the bundle records how (``input.raw.preprocess``). It prints one
line per image and a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

try:  # the runtime as installed (pip install the project: numpy + onnxruntime), else this checkout
    import runtime  # noqa: F401
except ImportError:  # pragma: no cover - running from a source tree without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runtime import AdaptiveModel  # noqa: E402
from runtime.images import image_suffixes, load_image  # noqa: E402


def read_image(path: Path, channels: int, size: tuple[int, int], resize: bool,
               preprocess=None) -> np.ndarray:
    """uint8 (H, W) for 1-channel models, (H, W, C) otherwise, of the model's size.

    ``preprocess``: the bundle's ``input.raw.preprocess`` (models trained on image folders):
    an image of another size is resized and cropped exactly as training did (numpy,
    ``runtime.preprocess``); without it, ``resize`` stretches it to the model's size."""
    return load_image(path, (channels, *size), resize=resize, preprocess=preprocess)


def list_images(folder: Path) -> list[Path]:
    suffixes = image_suffixes()
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Classify the images of a folder with an adaptive-"
                                             "depth bundle, under a latency budget.")
    ap.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    ap.add_argument("--images", required=True, type=Path, help="folder of images (searched "
                                                                "recursively)")
    ap.add_argument("--budget-ms", type=float, default=None,
                    help="deadline per image in ms (default: none; the calibrated rule decides)")
    ap.add_argument("--rule", default=None, help="stopping rule name (default: the calibrated one)")
    ap.add_argument("--backend", default=None, help="force a backend (default: the device "
                                                    "profile's order, with fallback)")
    ap.add_argument("--threads", type=int, default=None, help="backend threads per session")
    ap.add_argument("--resize", action="store_true",
                    help="resize images to the model's size (bundles trained on image folders "
                         "resize and crop other sizes as training did, always)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    args = ap.parse_args(argv)

    if not args.images.is_dir():
        print(f"error: {args.images}: not a folder", file=sys.stderr)
        return 2
    # the runtime's warnings (threads clamped, a provider missing) as one line each
    warnings.formatwarning = lambda message, category, *_a, **_k: \
        f"warning: {category.__name__}: {message}\n"
    t_load = time.perf_counter()
    try:
        model = AdaptiveModel.load(args.bundle, backend=args.backend, warn=False,
                                   runner_options={"intra_op_threads": args.threads}
                                   if args.threads else None)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        print(f"error: cannot load {args.bundle}: {exc}", file=sys.stderr)
        return 2
    C, H, W = model.input_shape
    preprocess = model.manifest.input.raw.preprocess  # how training resized other sizes
    blank = np.zeros((H, W) if C == 1 else (H, W, C), dtype=np.uint8)
    model.predict(blank, rule="full")  # warm-up: the first run pays for lazy initialisation
    load_ms = (time.perf_counter() - t_load) * 1e3
    S = model.stages
    images = list_images(args.images)
    if not images:
        print(f"error: no images in {args.images}", file=sys.stderr)
        return 2
    print(f"# running: {model.describe_backend()}", file=sys.stderr)
    print(f"# {model.manifest.model.name}: {S} exits, backend {model.backend} ({model.target}), "
          f"rule {model.rule_name or 'none (full depth)'}, budget "
          f"{'none' if args.budget_ms is None else f'{args.budget_ms:g} ms'}; {len(images)} images; "
          f"loaded in {load_ms:.0f} ms")
    lat, exits, missed, failed = [], [], 0, 0
    counts: dict[str, int] = {}
    for path in images:
        name = str(path.relative_to(args.images))
        try:
            arr = read_image(path, C, (H, W), args.resize, preprocess)
            p = model.predict(arr, budget_ms=args.budget_ms, rule=args.rule)
        except (ValueError, OSError) as exc:
            failed += 1
            reason = getattr(exc, "reason", None) or str(exc)  # ImageError: without the path
            print(f"{name}: ERROR {reason}")
            continue
        lat.append(p.latency_ms)
        exits.append(p.exit_index)
        missed += int(p.deadline_missed)
        counts[p.class_name] = counts.get(p.class_name, 0) + 1
        if args.json:
            print(json.dumps({"image": name, **{k: v for k, v in p.to_dict().items()
                                               if k != "probabilities"}}))
        else:
            print(f"{name}: {p.class_name} (class {p.class_id}, p={p.confidence:.3f})  exit "
                  f"{p.exit_index} (depth {p.depth}/{S})  {p.latency_ms:.3f} ms"
                  + ("  DEADLINE MISSED" if p.deadline_missed else ""))
    n = len(lat)
    if n:
        a = np.asarray(lat)
        hist = np.bincount(np.asarray(exits), minlength=S).tolist()
        print(f"# summary: {n} images classified"
              + (f", {failed} failed" if failed else "")
              + f"; latency mean {a.mean():.3f} ms, p50 {np.percentile(a, 50):.3f} ms, p99 "
              f"{np.percentile(a, 99):.3f} ms, max {a.max():.3f} ms; exits {hist} (mean depth "
              f"{np.mean(exits) + 1:.2f}/{S})"
              + ("" if args.budget_ms is None else
                 f"; within the {args.budget_ms:g} ms budget: {n - missed}/{n}"))
        print("# classes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(),
                                                                     key=lambda kv: -kv[1])))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
