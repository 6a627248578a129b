"""Per-piece batch-1 latency on this machine: ONNX Runtime vs TVM untuned vs TVM tuned.

Reproduce (untuned only, then with a 64-trial MetaSchedule run per piece):

    .venv/bin/python bench/tvm_vs_ort.py
    .venv/bin/python bench/tvm_vs_ort.py --tune-trials 64 --tuning-db runs/tvm-tuning

Without --onnx it exports a small test piece (conv-bn-relu, conv-bn residual, relu, global pool,
linear; 3x32x32 input, 16 channels, outputs features and logits). All backends are loaded first
and then timed in interleaved rounds, so the ratios come from the same run and machine state.
ORT and TVM get the same thread count (--threads; TVM via TVM_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", action="append", type=Path, help="ONNX piece (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="threads for ORT and TVM (default 2)")
    p.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per piece (0: skip the tuned run)")
    p.add_argument("--tuning-db", type=Path, default=None, help="tuning database root (default: $ADN_TVM_TUNING_DB or ~/.cache)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--iters", type=int, default=100, help="calls per backend per round")
    p.add_argument("--out-dir", type=Path, default=None, help="keep the compiled libraries here")
    return p.parse_args(argv)


def export_test_piece(path: Path) -> Path:
    import torch
    from torch import nn

    class Piece(nn.Module):
        def __init__(self, c: int = 16) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
            self.b1 = nn.BatchNorm2d(c)
            self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.b2 = nn.BatchNorm2d(c)
            self.fc = nn.Linear(c, 10)

        def forward(self, x):
            h = torch.relu(self.b1(self.c1(x)))
            h = torch.relu(h + self.b2(self.c2(h)))
            return h, self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    m = Piece().eval()
    torch.onnx.export(
        m,
        (torch.randn(1, 3, 32, 32),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["features", "logits"],
        dynamic_axes={"x": {0: "N"}, "features": {0: "N"}, "logits": {0: "N"}},
    )
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before tvm is imported
    sys.path.insert(0, str(REPO))
    import numpy as np
    import onnxruntime as ort

    from export.tvm import compile_onnx
    from runtime.backends.tvm_runner import TVMPieceRunner

    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/tvm_vs_ort.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"# reproduce: {cmd}")
    print(f"# threads={args.threads} rounds={args.rounds} iters={args.iters} tune_trials={args.tune_trials}")

    tmp = tempfile.TemporaryDirectory(prefix="tvm-vs-ort-")
    work = args.out_dir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    pieces = args.onnx or [export_test_piece(work / "test_piece.onnx")]

    def say(msg: str) -> None:
        print(f"#   {msg}", flush=True)

    rows = []
    for onnx_path in pieces:
        print(f"# piece {onnx_path}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        feeds = {inp.name: x}
        backends = {"ort": lambda feeds=feeds: sess.run(None, feeds)}
        ref = sess.run(None, feeds)

        stem = onnx_path.stem
        t0 = time.perf_counter()
        art = compile_onnx(onnx_path, {"kind": "llvm"}, work / f"{stem}.untuned.so")
        print(f"#   tvm untuned: compiled in {time.perf_counter() - t0:.1f} s (batch {art.batch or 'symbolic'})")
        untuned = TVMPieceRunner(art.path)
        backends["tvm_untuned"] = lambda r=untuned, feeds=feeds: r.run(feeds)
        diffs = {"tvm_untuned": max(float(np.abs(a - b).max()) for a, b in zip(untuned.run(feeds), ref))}
        if args.tune_trials > 0:
            t0 = time.perf_counter()
            art_t = compile_onnx(
                onnx_path,
                {"kind": "llvm"},
                work / f"{stem}.tuned.so",
                tune_trials=args.tune_trials,
                tuning_db_dir=args.tuning_db,
                progress=say,
            )
            print(
                f"#   tvm tuned: {time.perf_counter() - t0:.0f} s, {art_t.tuned_tasks}/{art_t.total_tasks} tasks "
                f"with records, {art_t.tune_trials} trials, reused={art_t.tuning_reused}"
            )
            tuned = TVMPieceRunner(art_t.path)
            backends["tvm_tuned"] = lambda r=tuned, feeds=feeds: r.run(feeds)
            diffs["tvm_tuned"] = max(float(np.abs(a - b).max()) for a, b in zip(tuned.run(feeds), ref))

        times: dict[str, list[float]] = {k: [] for k in backends}
        for f in backends.values():  # warm up
            for _ in range(20):
                f()
        for _ in range(args.rounds):
            for name, f in backends.items():
                for _ in range(args.iters):
                    t = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t)
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        rows.append((stem, med, diffs))

    print()
    head = f"{'piece':<16}{'ORT ms':>9}{'TVM untuned ms':>16}{'ratio':>8}"
    if args.tune_trials > 0:
        head += f"{'TVM tuned ms':>14}{'ratio':>8}"
    head += "   max|diff| vs ORT"
    print(head)
    for stem, med, diffs in rows:
        line = f"{stem:<16}{med['ort']:>9.3f}{med['tvm_untuned']:>16.3f}{med['tvm_untuned'] / med['ort']:>7.1f}x"
        if "tvm_tuned" in med:
            line += f"{med['tvm_tuned']:>14.3f}{med['tvm_tuned'] / med['ort']:>7.1f}x"
        line += "   " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        print(line)
    print("# ratio = TVM latency / ORT latency (median of per-call batch-1 times incl. numpy copies)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
