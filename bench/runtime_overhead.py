"""Per-call overhead of the segmented runtime at batch 1, against the whole model as ONE session.

Reproduce (builds a tiny untrained resnet20_adn bundle, 1x28x28, once under --work-dir; latency
does not depend on training):

    .venv/bin/python bench/runtime_overhead.py --threads 1
    .venv/bin/python bench/runtime_overhead.py --threads 2
    # another copy of runtime/ (e.g. before the batch-1 work, commit 2299ef9), same bundle:
    mkdir -p /tmp/rt_before && git archive 2299ef9 runtime | tar -x -C /tmp/rt_before
    .venv/bin/python bench/runtime_overhead.py --threads 1 --runtime-root /tmp/rt_before

Variants, measured side by side: every image goes through every variant in turn, in a fresh
random order for every image (a fixed rotation would always run the same variant before a
given one, and the sessions it leaves in the caches favour or penalise it), so background load
on a shared machine and cache state hit them alike. Each call is timed with
``time.perf_counter_ns`` around it.

* ``mono``: the whole model (skip config FF..F, last exit only) as one ONNX Runtime session,
  given the preprocessed float input, then softmax + argmax; the baseline (1.00x);
* ``mono_run``: the same session's ``run`` alone (no softmax/argmax);
* ``mono_u8``: the same session given the uint8 image, preprocessed with
  ``runtime.preprocess.prepare_input`` (what ``pipeline.evaluate.MonolithicSession.predict``,
  the ``pipeline build`` report's baseline, does);
* ``raw_chain``: the pieces' runners (``runner.run``) called directly in a loop (the floor
  of segmentation: no executor, no rule);
* ``executor``: ``SegmentExecutor.run_segment`` for every segment (bare chained pieces);
* ``full_f32`` / ``full_u8``: ``AdaptiveModel.predict(x, rule="full", skip_config=FF..F)`` with
  the preprocessed float input (C, H, W) or the uint8 image (H, W, C) (preprocessing included);
* ``merged_u8``: ``AdaptiveModel.predict(x, rule="full", skip_config=FF..F)`` on the uint8 image
  with a copy of the bundle that has the merged piece of full depth (``host-merged``: stages
  0..S-1 plus the last head as one artifact, what ``pipeline build`` ships): the runtime's full
  depth path as a build runs it, one backend call;
* ``early_f32`` / ``early_u8``: ``AdaptiveModel.predict(x, rule=max_prob)`` with thresholds set
  so that about half the images stop before the last exit.

``--table``: use a copy of the bundle with a latency table (``pipeline profile
--estimate-only``), as a built bundle has one; without it the runtime measures as it goes.

The piece sessions and the monolithic session get the same ONNX Runtime session options
(``runtime.backends.onnxruntime_runner.session_options`` with ``--threads`` intra-op threads).
Printed: median / mean / p90 per variant (us), the ratios to ``mono`` (of the medians and of
the means) and the median over blocks of the per-block median ratio (robust to drift).
The measuring process never imports torch (the bundle is built in a child process).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_SPEC = "synthetic:chans=1,size=28"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per session (all "
                   "variants alike; default 1)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-runtime-overhead",
                   help="where the bundle and the monolithic ONNX are built (once)")
    p.add_argument("--images", type=int, default=256, help="distinct test images cycled through")
    p.add_argument("--calls", type=int, default=4000, help="timed calls per variant")
    p.add_argument("--warmup", type=int, default=300, help="untimed calls per variant first")
    p.add_argument("--blocks", type=int, default=10, help="blocks for the per-block ratios")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    p.add_argument("--runtime-root", type=Path, default=None,
                   help="directory holding another runtime/ package to measure instead")
    p.add_argument("--no-spinning", action="store_true", help="session.intra_op.allow_spinning=0 "
                   "for every session (default: ORT's default, spinning)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image variant order")
    p.add_argument("--table", action="store_true", help="the bundle copy with a latency table")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# build (child process: torch)
# ---------------------------------------------------------------------------------------------

def build(work: Path) -> None:
    import torch
    from torch import nn

    from export.compile import compile_bundle
    from export.portable import export_checkpoint
    from pipeline.evaluate import export_monolithic
    from train.checkpoint import save_checkpoint
    from train.data import load_dataset
    from train.models import create_model

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    data = load_dataset(DATA_SPEC)
    torch.manual_seed(0)
    model = create_model("resnet20_adn", num_classes=data.num_classes, in_chans=1, img_size=28)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # perturbed norms, so the exits disagree like a trained model's
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    state = {"model_name": "resnet20_adn", "model_config": model.model_config(),
             "model": model.state_dict(), "ema": None, "dataset": data.info(), "eval": None,
             "config": {"data": DATA_SPEC}}
    ckpt = save_checkpoint(state, work / "model.pt")
    portable = export_checkpoint(ckpt, work / "portable", parity_samples=4, progress=None)
    compile_bundle(portable, "x86-host", backends=["onnxruntime"], out_dir=work / "host",
                   progress=None)
    export_monolithic(ckpt, work / "monolithic.onnx", parity_samples=8)
    images = data.test.images[:1024].permute(0, 2, 3, 1).contiguous().numpy()
    import numpy as np
    np.save(work / "images.npy", images)
    build_table_copy(work)
    build_merged_copy(work)
    (work / "DONE").write_text("ok\n")


def build_table_copy(work: Path) -> None:
    """``host-table``: the host bundle with an estimated latency table for x86-host."""
    import shutil

    shutil.rmtree(work / "host-table", ignore_errors=True)
    shutil.copytree(work / "host", work / "host-table")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-m", "pipeline", "profile", "--bundle",
                    str(work / "host-table"), "--estimate-only", "--device", "x86-host",
                    "--no-plot"], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)


def build_merged_copy(work: Path) -> None:
    """``host-merged``: the host bundle plus the merged piece of full depth FF..F (stages
    0..S-1 as one artifact, export/merge.py), which ``predict(rule="full")`` then runs."""
    import shutil

    from export.merge import add_merged_pieces
    from runtime.bundle import Bundle

    shutil.rmtree(work / "host-merged", ignore_errors=True)
    shutil.copytree(work / "host", work / "host-merged")
    S = Bundle.open(work / "host-merged", verify=False).manifest.stages
    add_merged_pieces(work / "host-merged", [(0, S - 1, "F" * S)])


def ensure_built(work: Path) -> None:
    if (work / "DONE").is_file():
        if not (work / "host-table").is_dir():  # built by an earlier version of this script
            build_table_copy(work)
        if not (work / "host-merged").is_dir():
            build_merged_copy(work)
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    print(f"building the test bundle under {work} ...", file=sys.stderr)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-only",
                    "--work-dir", str(work)], check=True, env=env, cwd=REPO)


# ---------------------------------------------------------------------------------------------
# measurement (no torch)
# ---------------------------------------------------------------------------------------------

def early_rule(model, images, target_early: float = 0.5):
    """max_prob thresholds: ~target/2 of the images stop at exit 0, as many at exit 1 (S=3)."""
    import numpy as np

    from runtime.rules import MaxProbRule

    probs = model.exit_probabilities(images, batch_size=64)
    S = probs.shape[0]
    per_exit = target_early / (S - 1)
    remaining = np.ones(probs.shape[1], dtype=bool)
    thresholds = []
    for k in range(S - 1):
        top = probs[k].max(axis=1)
        want = per_exit * probs.shape[1]  # how many stop here
        frac = min(1.0, want / max(1, remaining.sum()))
        t = float(np.quantile(top[remaining], 1.0 - frac))
        thresholds.append(t)
        remaining &= ~(top >= t)
    return MaxProbRule(thresholds)


def measure(args) -> dict:
    import numpy as np
    import onnxruntime as ort

    from runtime import AdaptiveModel
    from runtime.backends.onnxruntime_runner import available_providers, session_options
    from runtime.model import softmax
    from runtime.preprocess import prepare_input

    import runtime
    work = args.work_dir
    threads = args.threads
    runner_options = {"intra_op_threads": threads}
    if args.no_spinning:
        runner_options["allow_spinning"] = False
    model = AdaptiveModel.load(work / ("host-table" if args.table else "host"),
                               runner_options=runner_options)
    if args.table and not model.table:
        raise SystemExit("the bundle copy has no latency table for this device/backend")
    m = model.manifest
    S = model.stages
    full = "F" * S
    ex = model.executor
    first = m.execution[full][0][0]
    opts = {**ex.bundle.artifact(first, ex.backend, ex.target).options, **ex.options}
    so = session_options(opts.get("intra_op_threads"), opts.get("inter_op_threads"),
                         opts.get("graph_optimization_level", "all"))
    if args.no_spinning:  # (session_options(allow_spinning=False) in this tree; the same entry)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    mono = ort.InferenceSession(str(work / "monolithic.onnx"), sess_options=so,
                                providers=available_providers(opts.get("providers")))
    mono_in = mono.get_inputs()[0].name
    mono_out = [mono.get_outputs()[0].name]

    images = np.load(work / "images.npy")[:args.images]
    x_u8 = [images[i] for i in range(len(images))]
    x_f32 = [prepare_input(img, model.input_shape, m.input.mean, m.input.std)[0][0]
             for img in x_u8]  # (C, H, W) float32
    x_f32b = [x[None] for x in x_f32]  # (1, C, H, W) for the sessions
    rule = early_rule(model, images)

    # the pieces' runners, called directly (floor of segmentation)
    raw_steps = [(r.run, list(r.input_names), list(r.output_names))
                 for seg in m.execution[full] for r in (ex.runner(pid) for pid in seg)]
    in_name = m.input.name

    def v_mono(i):
        p = softmax(mono.run(mono_out, {mono_in: x_f32b[i]})[0])
        return int(np.argmax(p[0]))

    def v_mono_run(i):
        return mono.run(mono_out, {mono_in: x_f32b[i]})[0]

    shape, mean, std = model.input_shape, m.input.mean, m.input.std

    def v_mono_u8(i):
        batch, _ = prepare_input(x_u8[i], shape, mean, std)
        p = softmax(mono.run(mono_out, {mono_in: batch})[0])
        return int(np.argmax(p[0]))

    def v_raw_chain(i):
        t = {in_name: x_f32b[i]}
        for run, ins, outs in raw_steps:
            t.update(zip(outs, run({n: t[n] for n in ins})))
        return t["logits"]

    def v_executor(i):
        t = {in_name: x_f32b[i]}
        for k in range(S):
            z = ex.run_segment(full, k, t)
        return z

    def v_full_f32(i):
        return model.predict(x_f32[i], rule="full", skip_config=full)

    def v_full_u8(i):
        return model.predict(x_u8[i], rule="full", skip_config=full)

    merged = AdaptiveModel.load(work / "host-merged", runner_options=runner_options)
    assert merged.executor.has_merged(0, S - 1, full)

    def v_merged_u8(i):
        return merged.predict(x_u8[i], rule="full", skip_config=full)

    def v_early_f32(i):
        return model.predict(x_f32[i], rule=rule, skip_config=full)

    def v_early_u8(i):
        return model.predict(x_u8[i], rule=rule, skip_config=full)

    variants = {"mono": v_mono, "mono_run": v_mono_run, "mono_u8": v_mono_u8,
                "raw_chain": v_raw_chain,
                "executor": v_executor, "full_f32": v_full_f32, "full_u8": v_full_u8,
                "merged_u8": v_merged_u8,
                "early_f32": v_early_f32, "early_u8": v_early_u8}
    if args.variants:
        keep = ["mono"] + [v for v in args.variants.split(",") if v != "mono"]
        variants = {k: variants[k] for k in keep}
    names = list(variants)
    fns = [variants[k] for k in names]
    V, n_img = len(fns), len(x_u8)

    # sanity: full depth agrees with the monolithic model
    for i in range(8):
        a = v_full_u8(i)
        assert a.class_id == v_mono(i) and a.exit_index == S - 1, i
    exit_of = np.array([v_early_u8(i).exit_index for i in range(n_img)])  # deterministic
    exits = np.bincount(exit_of, minlength=S)

    for j in range(V):  # warm-up
        for c in range(args.warmup):
            fns[j](c % n_img)
    times = np.zeros((V, args.calls), dtype=np.int64)
    clock = time.perf_counter_ns
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    for c in range(args.calls):
        i = c % n_img
        for j in rng.permutation(V):
            fn = fns[j]
            t0 = clock()
            fn(i)
            times[j, c] = clock() - t0
    seconds = time.perf_counter() - t_start
    us = times / 1000.0
    blocks = np.array_split(np.arange(args.calls), args.blocks)
    base = names.index("mono")
    out = {"threads": threads, "no_spinning": bool(args.no_spinning), "calls": args.calls,
           "latency": model.latency.source, "images": n_img, "seconds": seconds,
           "runtime": str(Path(runtime.__file__).resolve().parent),
           "onnxruntime": ort.__version__, "early_exit_histogram": exits.tolist(),
           "early_thresholds": rule.thresholds, "variants": {}}
    for j, name in enumerate(names):
        a = us[j]
        block_ratio = [float(np.median(a[b]) / np.median(us[base][b])) for b in blocks]
        out["variants"][name] = {
            "median_us": float(np.median(a)), "mean_us": float(a.mean()),
            "p90_us": float(np.percentile(a, 90)),
            "ratio_median": float(np.median(a) / np.median(us[base])),
            "ratio_mean": float(a.mean() / us[base].mean()),
            "block_ratio_median": float(np.median(block_ratio)),
            "block_ratio_range": [float(min(block_ratio)), float(max(block_ratio))]}
        if name.startswith("early"):  # median cost of the calls answered at each exit
            at = exit_of[np.arange(args.calls) % n_img]
            out["variants"][name]["ratio_median_by_exit"] = [
                float(np.median(a[at == k]) / np.median(us[base])) if (at == k).any() else None
                for k in range(S)]
    return out


def report(out: dict, argv: list[str]) -> None:
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/runtime_overhead.py", *argv])
    print(f"# {cmd}")
    print(f"# runtime: {out['runtime']}  onnxruntime {out['onnxruntime']}  threads "
          f"{out['threads']}{' (no spinning)' if out['no_spinning'] else ''}  latency figures: "
          f"{out['latency']}  {out['calls']} "
          f"calls/variant over {out['images']} images, interleaved in random order "
          f"({out['seconds']:.1f} s)")
    print(f"# early rule: max_prob thresholds {[round(t, 4) for t in out['early_thresholds']]}, "
          f"exit histogram {out['early_exit_histogram']} "
          f"({100.0 * (1 - out['early_exit_histogram'][-1] / sum(out['early_exit_histogram'])):.0f}"
          f"% early)")
    print(f"{'variant':<11} {'median us':>10} {'mean us':>10} {'p90 us':>10} "
          f"{'x mono(med)':>12} {'x mono(mean)':>13} {'block med [min..max]':>24}")
    for name, d in out["variants"].items():
        lo, hi = d["block_ratio_range"]
        print(f"{name:<11} {d['median_us']:10.1f} {d['mean_us']:10.1f} {d['p90_us']:10.1f} "
              f"{d['ratio_median']:12.3f} {d['ratio_mean']:13.3f} "
              f"{d['block_ratio_median']:9.3f} [{lo:.3f}..{hi:.3f}]")
    for name, d in out["variants"].items():
        if "ratio_median_by_exit" in d:
            print(f"# {name}: median x mono of the calls answered at exit 0, 1, ...: "
                  + ", ".join("-" if r is None else f"{r:.3f}" for r in d["ratio_median_by_exit"])
                  + " (mean over the mix of exits = x mono(mean) above)")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.build_only:
        sys.path.insert(0, str(REPO))
        build(args.work_dir)
        return
    ensure_built(args.work_dir)
    root = args.runtime_root.resolve() if args.runtime_root else REPO
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(root))
    out = measure(args)
    if "torch" in sys.modules:
        print("# WARNING: torch got imported in the measuring process", file=sys.stderr)
    report(out, argv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
