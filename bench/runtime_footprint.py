"""How much code a device loads: lines of runtime/, lines of the modules a real ONNX Runtime
predict imports from this project, and the exception classes the project defines.

    python bench/runtime_footprint.py --bundle BUNDLE [--root CHECKOUT]

``--root`` measures another checkout (e.g. a ``git worktree`` of an older commit) with the same
bundle format it reads. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGES = ("runtime", "devices", "export", "train", "pipeline")

_PROBE = r"""
import json, sys
import numpy as np
from runtime import AdaptiveModel
m = AdaptiveModel.load(sys.argv[1])
x = np.zeros(m.input_shape[1:] + (m.input_shape[0],), dtype=np.uint8)
m.predict(x.squeeze(-1) if m.input_shape[0] == 1 else x)
print(json.dumps(sorted(getattr(mod, "__file__", None) or "" for name, mod in sys.modules.items()
                        if name.split(".")[0] in %r)))
""" % (PACKAGES,)


def count_lines(path: Path) -> int:
    """Lines of a source file (blank lines included, as `wc -l`)."""
    return len(path.read_text().splitlines())


def exception_classes(root: Path) -> list[str]:
    """Classes defined in the project's packages whose name ends in Error/Exception."""
    out = []
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                    out.append(f"{f.relative_to(root)}:{node.name}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args()
    root = args.root.resolve()
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(args.bundle)], cwd=root,
                           env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, check=True)
    loaded = [Path(f) for f in json.loads(probe.stdout.strip().splitlines()[-1]) if f]
    runtime_files = sorted((root / "runtime").rglob("*.py"))
    errors = exception_classes(root)
    print(json.dumps({
        "root": str(root),
        "runtime_lines": sum(count_lines(f) for f in runtime_files),
        "runtime_files": len(runtime_files),
        "predict_path_lines": sum(count_lines(f) for f in loaded),
        "predict_path_modules": [str(f.relative_to(root)) for f in loaded],
        "exception_classes": len(errors),
        "exception_class_names": errors,
    }, indent=2))


if __name__ == "__main__":
    main()
