"""Which artifact granularity? Per-call overhead vs. work per call, measured with ONNX Runtime.

Exports the default model (resnet20_adn, 1x28x28, 10 classes, untrained: the weights do not
change the latency) at both granularities of ``export.segments`` and times, at batch 1, the
chained run through every exit of every skip configuration with ``runtime.executor``
(the real runtime path). Both bundles are timed side by side in one interleaved loop, so
machine load affects them alike. Also times one ORT ``run()`` of an empty (Identity) graph:
the fixed per-call overhead.

    .venv/bin/python bench/granularity.py                 # 1 ORT thread, 300 rounds
    .venv/bin/python bench/granularity.py --threads 2 --rounds 500

The numbers and the decision are in docs/export.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _identity_session(shape, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from runtime.backends.onnxruntime_runner import session_options

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *shape[1:]])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    so = session_options(intra_op_threads=threads, inter_op_threads=1)
    return ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20_adn")
    ap.add_argument("--img-size", type=int, default=28)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    ap.add_argument("--rounds", type=int, default=300, help="interleaved timing rounds")
    ap.add_argument("--level", default="all", help="ORT graph optimisation level")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from export.portable import export_model
    from export.segments import GRANULARITIES
    from runtime.bundle import Bundle
    from runtime.executor import SegmentExecutor
    from train.models import create_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans,
                         img_size=args.img_size).eval()
    S = model.num_stages
    shape = (1, args.in_chans, args.img_size, args.img_size)
    opts = {"intra_op_threads": args.threads, "inter_op_threads": 1,
            "graph_optimization_level": args.level, "providers": ["CPUExecutionProvider"]}
    with tempfile.TemporaryDirectory(prefix="granularity-") as tmp:
        executors, sizes = {}, {}
        for g in GRANULARITIES:
            out = export_model(model, Path(tmp) / g, parity_inputs=torch.randn(8, *shape[1:]),
                               mean=[0.5] * args.in_chans, std=[0.25] * args.in_chans,
                               model_name=args.model, granularity=g, progress=None)
            bundle = Bundle.open(out)
            sizes[g] = (len(bundle.manifest.pieces), sum(a.size_bytes for a in bundle.manifest.artifact_files()))
            ex = SegmentExecutor(bundle, "onnx", options=opts)
            for cfg in ex.manifest.skip_configs:
                ex.warm(cfg)
            executors[g] = ex
        configs = executors[GRANULARITIES[0]].manifest.skip_configs
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        ident = _identity_session(shape, args.threads)
        feeds = {"x": x}
        times: dict[tuple[str, str], list[float]] = {(g, c): [] for g in executors for c in configs}
        call: list[float] = []
        for _ in range(10):  # warm-up
            for g, ex in executors.items():
                for c in configs:
                    ex.run_exits(x, c)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            ident.run(None, feeds)
            call.append(time.perf_counter() - t0)
            for c in configs:
                for g, ex in executors.items():
                    t0 = time.perf_counter()
                    ex.run_exits(x, c)
                    times[(g, c)].append(time.perf_counter() - t0)

    def med_us(v):
        return statistics.median(v) * 1e6

    calls = {g: {c: sum(len(seg) for seg in ex.manifest.execution[c]) for c in configs}
             for g, ex in executors.items()}
    print(f"# {' '.join([Path(sys.executable).name, 'bench/granularity.py', *(argv or sys.argv[1:])])}")
    print(f"# {args.model} {args.in_chans}x{args.img_size}x{args.img_size}, {args.num_classes} classes, batch 1, "
          f"onnxruntime {ort.__version__} CPU, {args.threads} intra-op thread(s), level '{args.level}', "
          f"{args.rounds} interleaved rounds, medians; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print(f"per-call overhead (Identity graph, 1 run()): {med_us(call):.1f} us")
    print(f"{'skip':<{S + 2}}" + "".join(f"{g + ' calls':>12}{g + ' us':>12}" for g in executors)
          + f"{'split/stage':>13}")
    ratios = []
    for c in configs:
        row = f"{c:<{S + 2}}"
        for g in executors:
            row += f"{calls[g][c]:>12}{med_us(times[(g, c)]):>12.1f}"
        r = med_us(times[("split", c)]) / med_us(times[("stage", c)])
        ratios.append(r)
        print(row + f"{r:>13.2f}")
    mean = {g: statistics.mean(med_us(times[(g, c)]) for c in configs) for g in executors}
    print(f"{'mean':<{S + 2}}" + "".join(f"{statistics.mean(calls[g].values()):>12.1f}{mean[g]:>12.1f}"
                                          for g in executors)
          + f"{mean['split'] / mean['stage']:>13.2f}")
    for g, (n, size) in sizes.items():
        print(f"{g}: {n} pieces, {size / 1024:.0f} KiB of ONNX")
    print(f"split is {mean['split'] - mean['stage']:.1f} us slower per image (all exits) on average; "
          f"ratio range {min(ratios):.2f}-{max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
