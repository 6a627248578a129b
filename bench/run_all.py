"""All benchmarks in one run: ratios measured side by side, on one machine, in one process.

    .venv/bin/python bench/run_all.py                          # uses build/<this host>/ from `pipeline build`
    .venv/bin/python bench/run_all.py --build-dir build/jetson-orin-nano
    .venv/bin/python bench/run_all.py --checkpoint runs/fm/model.pt   # builds what it needs first
    .venv/bin/python bench/run_all.py --quick                  # fast smoke run (rough numbers)

What is measured (docs/benchmarks.md has the definitions):

1. segmented runtime at full depth / monolithic ONNX Runtime session (batch 1, mean latency);
2. adaptive (the calibrated rule, <= 0.5 point validation accuracy loss) / monolithic (batch 1),
   and the realised latency fraction next to the MACs fraction;
3. batch-32 adaptive throughput / batch-32 monolithic throughput;
4. training time per epoch: the ADN recipe / the same ResNet trained plainly;
5. TVM untuned (and tuned, with --tvm-tune-trials) / ONNX Runtime, per piece (bench/tvm_vs_ort.py);
6. budget adherence: p99 latency / budget and the miss rate, for three budgets.

Every comparison is interleaved (the variants take turns call by call, or block by block for
training), so load from other jobs on a shared machine hits all of them alike; only the ratios
are meant to be compared across runs. The machine fingerprint (devices.host.fingerprint), the
load average and the command line are printed with the table and stored in the JSON.

The trained model comes from a `pipeline build` output directory (``--build-dir``, default
``build/<this host's profile>``): the bundle measured on this machine (``host/`` for a device
that is not this machine, else ``bundle/``), the monolithic ONNX (``work/export/``) and the
checkpoint (``train/model.pt`` or the build's ``--checkpoint``). With ``--checkpoint`` the build
is run first (``pipeline.build.run_build`` for this host, cached under ``--work``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

SECTIONS = ("latency", "batch", "budget", "train", "tvm")


# ---------------------------------------------------------------------------------------------
# arguments, inputs
# ---------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--build-dir", type=Path, help="a `pipeline build` output directory "
                     "(<out>/<device>); default build/<this host's profile>")
    src.add_argument("--checkpoint", type=Path, help="a trained checkpoint (model.pt): build "
                     "the host bundle and the monolithic ONNX from it first (cached in --work)")
    p.add_argument("--work", type=Path, default=None,
                   help="where --checkpoint builds (default runs/bench/<checkpoint sha256[:12]>)")
    p.add_argument("--quick", action="store_true", help="fast smoke run: fewer images, steps, "
                   "rounds and TVM pieces (rough numbers)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads for "
                   "the runtime AND the monolithic session (default: the bundle's options)")
    p.add_argument("--train-threads", type=int, default=None,
                   help="torch threads for the training benchmark (default: the recipe's)")
    p.add_argument("--limit", type=int, default=None,
                   help="test images measured at batch 1 (default 3000, --quick 1000)")
    p.add_argument("--budgets", default=None, metavar="MS[,MS...]",
                   help="three budgets in ms (default: evenly between the first-exit and the "
                        "full-depth p95 of the bundle's latency table)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="timed training steps per variant (default 30, --quick 8)")
    p.add_argument("--tvm-pieces", type=int, default=None,
                   help="pieces compiled with TVM (default: the 3 'full' stage pieces, --quick 1)")
    p.add_argument("--tvm-tune-trials", type=int, default=0,
                   help="also tune with MetaSchedule, N trials per piece (slow: minutes)")
    p.add_argument("--skip", action="append", default=[], choices=SECTIONS,
                   help="leave a section out (repeatable)")
    p.add_argument("--json-out", type=Path, default=None,
                   help="results JSON (default runs/bench/run_all-<time>.json)")
    a = p.parse_args(argv)
    q = a.quick
    a.limit = a.limit or (1000 if q else 3000)
    a.train_steps = a.train_steps or (8 if q else 30)
    a.tvm_pieces = a.tvm_pieces if a.tvm_pieces is not None else (1 if q else 3)
    return a


def say(msg: str) -> None:
    print(f"# {msg}", flush=True)


def _quick_build_overrides(quick: bool) -> dict[str, Any]:
    o: dict[str, Any] = {"evaluate.rules": ["max_prob"], "evaluate.max_drops": [0.5],
                         "evaluate.measure_limit": 50, "evaluate.warmup": 5,
                         "evaluate.limit": 500}
    if quick:
        o.update({"profile.mode": "quick", "export.parity_samples": 16})
    return o


def build_from_checkpoint(args) -> Path:
    """Run `pipeline build` for this host from ``args.checkpoint`` (stages are cached)."""
    from devices.host import guess_profile
    from pipeline.build import run_build
    from pipeline.build_config import build_config
    from runtime.manifest import sha256_file

    ckpt = args.checkpoint
    if not ckpt.is_file():
        raise SystemExit(f"error: checkpoint not found: {ckpt}")
    work = args.work or REPO / "runs" / "bench" / sha256_file(ckpt)[:12]
    overrides = {"build.device": guess_profile(), "build.checkpoint": str(ckpt.resolve()),
                 "build.out": str(work), "build.archive": False,
                 "build.threads": args.threads, **_quick_build_overrides(args.quick)}
    say(f"building the host bundle from {ckpt} in {work} (cached stages are reused)")
    log = io.StringIO()
    result = run_build(build_config(None, overrides), log=lambda m: log.write(m + "\n"))
    for r in result.stages:
        say(f"  build {r.name:<10} {r.status:<8} {r.seconds:6.1f} s")
    return result.root


def default_build_dir() -> Path:
    from devices.host import guess_profile

    mine = REPO / "build" / guess_profile()
    if (mine / "bundle" / "manifest.json").is_file():
        return mine
    found = sorted(p.parent for p in (REPO / "build").glob("*/bundle/manifest.json"))
    if found:
        return found[0]
    raise SystemExit("error: no build found under build/ - run `pipeline build` first, or pass "
                     "--build-dir DIR or --checkpoint model.pt")


def locate(args) -> dict[str, Any]:
    """Paths of what the benchmarks need, from a build directory."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    root = build_from_checkpoint(args) if args.checkpoint else (args.build_dir or default_build_dir())
    root = Path(root)
    host = root / "host"
    bundle = host if (host / "manifest.json").is_file() else root / "bundle"
    mono = root / "work" / "export" / "monolithic.onnx"
    info = root / "work" / "export" / "monolithic.json"
    for need in (bundle / "manifest.json", mono, info):
        if not need.is_file():
            raise SystemExit(f"error: {need} missing: {root} is not a complete `pipeline build` "
                             "output (run the build to the end)")
    ckpt = args.checkpoint
    if ckpt is None:
        cfg = tomllib.loads((root / "build.toml").read_text()) if (root / "build.toml").is_file() \
            else {}
        given = (cfg.get("build") or {}).get("checkpoint")
        ckpt = Path(given) if given else root / "train" / "model.pt"
    return {"root": root, "bundle": bundle, "monolithic": mono,
            "monolithic_info": json.loads(info.read_text()), "checkpoint": Path(ckpt)}


def load_runtime(paths: dict, threads: Optional[int]):
    from pipeline.evaluate import MonolithicSession
    from runtime.model import AdaptiveModel

    opts = {"intra_op_threads": threads} if threads else None
    model = AdaptiveModel.load(paths["bundle"], runner_options=opts, warn=False)
    mono = MonolithicSession.like(model, paths["monolithic"])
    return model, mono


def load_test_split(model, limit: int):
    from pipeline.runtime_cmd import dataset_for_bundle, split_arrays

    name, ds = dataset_for_bundle(model.manifest)
    x, y = split_arrays(ds.test, limit)
    return name, x, y


# ---------------------------------------------------------------------------------------------
# 1 + 2: batch 1, monolithic vs segmented full depth vs adaptive
# ---------------------------------------------------------------------------------------------

def bench_latency(model, mono, x, y, mono_macs: int, quick: bool) -> dict[str, Any]:
    from pipeline.evaluate import measure_headline

    full = "F" * model.stages
    h = measure_headline(model, mono, x, y, full_config=full, budget_ms=None,
                         mono_macs=mono_macs, warmup=20 if quick else 100)
    v = h["variants"]
    mo, fd, ad = v["monolithic"], v["full_depth"], v["adaptive"]
    cal = model.manifest.annotations.get("calibration") or {}
    st = model.manifest.stopping
    lat_frac = ad["mean_ms"] / mo["mean_ms"]
    return {
        "n": h["n"], "measured": h,
        "full_depth_over_monolithic": fd["mean_ms"] / mo["mean_ms"],
        "full_depth_over_monolithic_p50": fd["p50_ms"] / mo["p50_ms"],
        "adaptive_over_monolithic": lat_frac,
        "adaptive_over_monolithic_p50": ad["p50_ms"] / mo["p50_ms"],
        "adaptive_over_full_depth": ad["mean_ms"] / fd["mean_ms"],
        "latency_fraction": lat_frac, "macs_fraction": ad["macs_fraction"],
        "latency_fraction_over_macs_fraction": lat_frac / ad["macs_fraction"],
        "accuracy": {"monolithic": mo["accuracy"], "full_depth": fd["accuracy"],
                     "adaptive": ad["accuracy"],
                     "test_drop_points": 100.0 * (fd["accuracy"] - ad["accuracy"])},
        "rule": {"name": st.rule, "params": st.params, "val_accuracy": st.val_accuracy,
                 "max_drop_points": cal.get("max_drop"),
                 "val_full_depth_accuracy": cal.get("full_depth_accuracy"),
                 "skip_config": cal.get("skip_config"), "mean_depth": ad.get("mean_depth"),
                 "exit_histogram": ad.get("exit_histogram")},
    }


# ---------------------------------------------------------------------------------------------
# 3: batch 32 throughput
# ---------------------------------------------------------------------------------------------

def bench_batch(model, mono, x, y, batch: int = 32, rounds: int = 3) -> dict[str, Any]:
    from runtime.model import softmax
    from runtime.preprocess import prepare_input

    m = model.manifest

    def mono_batch(xb):
        b, _ = prepare_input(xb, m.input.shape, m.input.mean, m.input.std)
        return softmax(mono.logits(b)).argmax(axis=1)

    def adaptive_batch(xb):
        return np.array([p.class_id for p in model.predict(xb)])

    variants = [("monolithic", mono_batch), ("adaptive", adaptive_batch)]
    starts = list(range(0, len(y) - batch + 1, batch))
    for _, fn in variants:  # warm-up
        for s in starts[:3]:
            fn(x[s:s + batch])
    secs = {n: 0.0 for n, _ in variants}
    correct = {n: 0 for n, _ in variants}
    seen = 0
    for r in range(rounds):
        for i, s in enumerate(starts):
            xb, yb = x[s:s + batch], y[s:s + batch]
            for j in range(len(variants)):
                name, fn = variants[(i + j + r) % len(variants)]
                t0 = time.perf_counter()
                pred = fn(xb)
                secs[name] += time.perf_counter() - t0
                if r == 0:
                    correct[name] += int((pred == yb).sum())
            seen += len(yb)
    n0 = len(starts) * batch
    thr = {k: seen / v for k, v in secs.items()}
    return {"batch": batch, "images": seen, "rounds": rounds,
            "throughput_per_s": thr, "accuracy": {k: c / n0 for k, c in correct.items()},
            "adaptive_over_monolithic_throughput": thr["adaptive"] / thr["monolithic"]}


# ---------------------------------------------------------------------------------------------
# 6: budgets
# ---------------------------------------------------------------------------------------------

def default_budget_list(model) -> list[float]:
    from devices.latency import STATS, cumulative_table
    from pipeline.evaluate import default_budgets

    table = cumulative_table(model.manifest, model.latency_device, model.table.backend, 1,
                             stats=STATS)
    return default_budgets(table, model.default_skip_config, 3)


def bench_budgets(model, x, y, budgets: list[float], warmup: int) -> dict[str, Any]:
    for b in budgets:
        for i in range(min(warmup, len(y))):
            model.predict(x[i], budget_ms=b)
    B = len(budgets)
    wall = np.zeros((B, len(y)))
    flagged = np.zeros((B, len(y)), dtype=bool)
    ok = np.zeros((B, len(y)), dtype=bool)
    depth = np.zeros((B, len(y)))
    configs: list[dict[str, int]] = [{} for _ in budgets]
    clock = time.perf_counter_ns
    for i in range(len(y)):
        for j in range(B):
            v = (i + j) % B
            t0 = clock()
            p = model.predict(x[i], budget_ms=budgets[v])
            wall[v, i] = (clock() - t0) * 1e-6
            flagged[v, i], ok[v, i], depth[v, i] = p.deadline_missed, p.class_id == y[i], p.depth
            configs[v][p.skip_config] = configs[v].get(p.skip_config, 0) + 1
    out = []
    for v, b in enumerate(budgets):
        p99 = float(np.percentile(wall[v], 99))
        out.append({"budget_ms": b, "p50_ms": float(np.percentile(wall[v], 50)),
                    "p99_ms": p99, "p99_over_budget": p99 / b,
                    "miss_rate": float((wall[v] > b).mean()),
                    "flagged_miss_rate": float(flagged[v].mean()),
                    "accuracy": float(ok[v].mean()), "mean_depth": float(depth[v].mean()),
                    "skip_configs": configs[v]})
    return {"n": len(y), "budgets": out}


# ---------------------------------------------------------------------------------------------
# 4: training time per epoch, ADN recipe vs plain ResNet
# ---------------------------------------------------------------------------------------------

def bench_training(ckpt: Path, steps: int, threads: Optional[int], quick: bool) -> dict[str, Any]:
    """Time ``steps`` optimizer steps of each variant on the same batches, in alternating
    blocks of 4, and scale the mean step time to the recipe's steps per epoch.

    * ADN recipe: exactly what train/trainer.py runs per step - the super-net forward (every
      exit), the base-net forward (every skippable sub-path skipped), ADNLoss (+ L_depth when the
      recipe has it), backward, optimizer and scheduler step.
    * plain: the same network trained as a plain ResNet - one forward through every stage with
      every sub-path (no base-net pass, intermediate exit heads not computed), cross-entropy on
      the final logits with the same label smoothing, the same optimizer, schedule, batches,
      augmentation and memory format.
    """
    import tempfile

    import torch
    import torch.nn.functional as F
    from torch import nn

    from train.checkpoint import load_checkpoint
    from train.config import TrainConfig
    from train.data import iterate_batches
    from train.models import create_model
    from train.schedule import build_optimizer, build_scheduler, param_groups
    from train.trainer import Trainer

    state = load_checkpoint(ckpt)
    saved = {k: v for k, v in (state.get("config") or {}).items()
             if k in TrainConfig.__dataclass_fields__}
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    saved.update(out=tmp, max_steps=None, ema=False)
    if threads:
        saved["threads"] = threads
    cfg = TrainConfig.from_dict(saved, source=str(ckpt))
    tr = Trainer(cfg, log=lambda _m: None)  # the recipe's model, loss, optimizer, data
    torch.manual_seed(cfg.seed)
    net = create_model(cfg.model, num_classes=len(tr.data.class_names), in_chans=tr.data.in_chans,
                       img_size=tr.data.img_size)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    S = net.num_stages

    class Plain(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            h = self.m.forward_stem(x)
            for k in range(S):
                h = self.m.forward_stage(k, h, False)
            return self.m.forward_head(S - 1, h)

    plain = Plain(net).train()
    p_opt = build_optimizer(param_groups([net], cfg.weight_decay), cfg)
    p_sched = build_scheduler(p_opt, cfg, tr.steps_per_epoch)

    def adn_step(x, y):
        tr.train_step(x, y)

    def plain_step(x, y):
        with torch.autocast(tr.ctx.device.type, dtype=torch.bfloat16, enabled=tr.bf16):
            loss = F.cross_entropy(plain(x), y, label_smoothing=cfg.label_smoothing)
        p_opt.zero_grad(set_to_none=True)
        loss.backward()
        p_opt.step()
        p_sched.step()

    warm, block = 2, 4
    gen = torch.Generator().manual_seed(0)
    it = iterate_batches(tr.data.train, cfg.batch_size, shuffle=True, generator=gen,
                         drop_last=True)
    batches = []
    for i, (images, labels) in enumerate(it):
        batches.append((tr._prepare(images, i), labels))
        if len(batches) >= warm + steps:
            break
    tr.step_module.train()
    variants = [("adn", adn_step), ("plain", plain_step)]
    times: dict[str, list[float]] = {"adn": [], "plain": []}
    for name, fn in variants:
        for x, y in batches[:warm]:
            fn(x, y)
    timed = batches[warm:]
    for bi, s in enumerate(range(0, len(timed), block)):
        for j in range(2):
            name, fn = variants[(bi + j) % 2]
            for x, y in timed[s:s + block]:
                t0 = time.perf_counter()
                fn(x, y)
                times[name].append(time.perf_counter() - t0)
    mean = {k: float(np.mean(v)) for k, v in times.items()}
    med = {k: float(np.median(v)) for k, v in times.items()}
    spe = tr.steps_per_epoch
    return {"model": cfg.model, "data": tr.data.name, "batch_size": cfg.batch_size,
            "steps_per_epoch": spe, "timed_steps": len(timed), "threads": torch.get_num_threads(),
            "self_distill": cfg.self_distill, "distill_from": cfg.distill_from,
            "depth_loss": cfg.depth_loss, "depth_lambda": cfg.depth_lambda,
            "step_s_mean": mean, "step_s_median": med,
            "epoch_s": {k: v * spe for k, v in mean.items()},
            "adn_over_plain": mean["adn"] / mean["plain"],
            "adn_over_plain_median": med["adn"] / med["plain"]}


# ---------------------------------------------------------------------------------------------
# 5: TVM vs ONNX Runtime per piece (bench/tvm_vs_ort.py)
# ---------------------------------------------------------------------------------------------

_ROW = re.compile(r"^(?P<piece>\S+)\s+(?P<ort>[\d.]+)\s+(?P<untuned>[\d.]+)\s+(?P<r1>[\d.]+)x"
                  r"(?:\s+(?P<tuned>[\d.]+)\s+(?P<r2>[\d.]+)x)?\s")


def bench_tvm(bundle: Path, manifest, pieces: int, threads: int, tune_trials: int,
              quick: bool) -> dict[str, Any]:
    import tvm_vs_ort

    ids = [p.id for p in manifest.pieces if p.id.endswith(".full")] or [p.id for p in manifest.pieces]
    chosen = ids[:pieces]
    files = [bundle / manifest.piece(i).find_artifacts("onnx")[0].file for i in chosen]
    argv: list[str] = []
    for f in files:
        argv += ["--onnx", str(f)]
    argv += ["--threads", str(threads), "--rounds", "3" if quick else "5",
             "--iters", "20" if quick else "60"]
    if tune_trials:
        argv += ["--tune-trials", str(tune_trials)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        tvm_vs_ort.main(argv)
    text = out.getvalue()
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            d = {"piece": m["piece"], "ort_ms": float(m["ort"]),
                 "tvm_untuned_ms": float(m["untuned"]),
                 "untuned_over_ort": float(m["untuned"]) / float(m["ort"])}
            if m["tuned"]:
                d.update(tvm_tuned_ms=float(m["tuned"]),
                         tuned_over_ort=float(m["tuned"]) / float(m["ort"]))
            rows.append(d)
    if not rows:
        raise RuntimeError("could not parse bench/tvm_vs_ort.py output:\n" + text[-2000:])
    return {"threads": threads, "tune_trials": tune_trials, "pieces": rows,
            "command": "bench/tvm_vs_ort.py " + " ".join(shlex.quote(a) for a in argv),
            "output": text}


# ---------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------

def _f(v: Optional[float], fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def table(res: dict[str, Any]) -> list[str]:
    """The ratio table: 'value' is the ratio named in the row (of means, throughputs, medians
    or p99 / budget); 'p50' is the ratio of the medians where both sides have one."""
    rows: list[tuple[str, str, str, str]] = []
    lat = res.get("latency")
    if lat:
        mv = lat["measured"]["variants"]
        rows.append(("segmented full depth / monolithic ORT, batch 1 (mean)",
                     _f(lat["full_depth_over_monolithic"]), _f(lat["full_depth_over_monolithic_p50"]),
                     f"mean {_f(mv['full_depth']['mean_ms'])} vs {_f(mv['monolithic']['mean_ms'])} ms"))
        a = lat["accuracy"]
        r = lat["rule"]
        rows.append(("adaptive / monolithic ORT, batch 1 (mean)",
                     _f(lat["adaptive_over_monolithic"]), _f(lat["adaptive_over_monolithic_p50"]),
                     f"{r['name'] or 'full'} (val max drop {r['max_drop_points']} pt); test acc "
                     f"{100 * a['adaptive']:.2f}% vs full {100 * a['full_depth']:.2f}% "
                     f"(drop {a['test_drop_points']:.2f} pt); mean depth {_f(r['mean_depth'], '.2f')}"))
        rows.append(("  realised latency fraction / MACs fraction",
                     _f(lat["latency_fraction_over_macs_fraction"]), "",
                     f"latency fraction {_f(lat['latency_fraction'])}, MACs fraction "
                     f"{_f(lat['macs_fraction'])}; adaptive / segmented full depth "
                     f"{_f(lat['adaptive_over_full_depth'])}"))
    bt = res.get("batch")
    if bt:
        t = bt["throughput_per_s"]
        rows.append((f"batch-{bt['batch']} adaptive / monolithic throughput",
                     _f(bt["adaptive_over_monolithic_throughput"]), "",
                     f"{t['adaptive']:.0f} vs {t['monolithic']:.0f} img/s; acc "
                     f"{100 * bt['accuracy']['adaptive']:.2f}% vs "
                     f"{100 * bt['accuracy']['monolithic']:.2f}%"))
    tr = res.get("train")
    if tr:
        rows.append(("training time per epoch: ADN recipe / plain ResNet (mean)", _f(tr["adn_over_plain"]),
                     _f(tr["adn_over_plain_median"]),
                     f"{tr['epoch_s']['adn']:.0f} vs {tr['epoch_s']['plain']:.0f} s/epoch "
                     f"({tr['steps_per_epoch']} steps x {tr['batch_size']}, {tr['timed_steps']} "
                     f"timed steps each, {tr['threads']} threads)"))
    tv = res.get("tvm")
    if tv:
        for p in tv["pieces"]:
            rows.append((f"TVM untuned / ORT, {p['piece']} (median)", _f(p["untuned_over_ort"], ".1f"),
                         _f(p["untuned_over_ort"], ".1f"),
                         f"{p['tvm_untuned_ms']:.3f} vs {p['ort_ms']:.3f} ms "
                         f"({tv['threads']} threads)"))
            if "tuned_over_ort" in p:
                rows.append((f"TVM tuned ({tv['tune_trials']} trials) / ORT, {p['piece']} (median)",
                             _f(p["tuned_over_ort"], ".2f"), _f(p["tuned_over_ort"], ".2f"),
                             f"{p['tvm_tuned_ms']:.3f} vs {p['ort_ms']:.3f} ms"))
    bu = res.get("budget")
    if bu:
        for b in bu["budgets"]:
            rows.append((f"budget {b['budget_ms']:g} ms: p99 / budget", _f(b["p99_over_budget"]), "",
                         f"miss rate {100 * b['miss_rate']:.1f}% (flagged "
                         f"{100 * b['flagged_miss_rate']:.1f}%); p99 {b['p99_ms']:.3f} ms; acc "
                         f"{100 * b['accuracy']:.2f}%; mean depth {b['mean_depth']:.2f}; "
                         + ",".join(sorted(b.get("skip_configs", {})))))
    w = max(len(r[0]) for r in rows) if rows else 10
    out = [f"{'ratio':<{w}}  {'value':>7}  {'p50':>7}  details", "-" * (w + 70)]
    out += [f"{a:<{w}}  {b:>7}  {c:>7}  {d}" for a, b, c, d in rows]
    return out


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/run_all.py", *raw])
    from devices.host import fingerprint
    from devices.profiler import frozen_heap

    fp = fingerprint()
    t_start = time.time()
    load0 = os.getloadavg()
    say(f"command: {command}")
    say(f"machine: {fp.get('cpu_model')} {fp.get('arch')}, {fp.get('usable_cores')} usable cores, "
        f"{fp.get('memory_gb')} GB; onnxruntime {fp.get('onnxruntime')}, numpy "
        f"{fp.get('numpy')}, tvm {fp.get('tvm')}; load average {load0[0]:.2f}")
    paths = locate(args)
    say(f"build: {paths['root']} (measured bundle {paths['bundle'].name}/, checkpoint "
        f"{paths['checkpoint']})")
    model, mono = load_runtime(paths, args.threads)
    data_name, x, y = load_test_split(model, args.limit)
    mono_macs = int(paths["monolithic_info"]["macs"])
    say(f"runtime: {model.backend} ({model.target}); rule {model.rule_name}; "
        f"{len(y)} {data_name} test images; ORT threads: {mono.options['intra_op_threads'] or 'auto'}")
    res: dict[str, Any] = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                           "quick": args.quick, "fingerprint": fp, "build_dir": str(paths["root"]),
                           "bundle": str(paths["bundle"]), "data": data_name,
                           "session_options": mono.options, "monolithic": paths["monolithic_info"]}
    timings = {}

    def run(section: str, fn):
        if section in args.skip:
            return
        t0 = time.perf_counter()
        say(f"[{section}] ...")
        try:  # the heap so far (data, sessions) stays out of the cyclic GC while timing
            with frozen_heap():
                res[section] = fn()
        except Exception as exc:  # noqa: BLE001 - one section failing must not lose the others
            res[section + "_error"] = f"{type(exc).__name__}: {exc}"
            say(f"[{section}] FAILED: {type(exc).__name__}: {exc}")
        timings[section] = round(time.perf_counter() - t0, 1)
        say(f"[{section}] {timings[section]} s")

    run("latency", lambda: bench_latency(model, mono, x, y, mono_macs, args.quick))
    run("batch", lambda: bench_batch(model, mono, x, y, 32, 2 if args.quick else 3))
    budgets = ([float(b) for b in args.budgets.split(",")] if args.budgets
               else default_budget_list(model))
    run("budget", lambda: bench_budgets(model, x[:min(len(y), 500 if args.quick else 1000)],
                                        y[:min(len(y), 500 if args.quick else 1000)], budgets,
                                        warmup=20))
    run("train", lambda: bench_training(paths["checkpoint"], args.train_steps,
                                        args.train_threads, args.quick))
    ort_threads = int(mono.options.get("intra_op_threads") or (os.cpu_count() or 1))
    run("tvm", lambda: bench_tvm(paths["bundle"], model.manifest, args.tvm_pieces, ort_threads,
                                 args.tvm_tune_trials, args.quick))
    load1 = os.getloadavg()
    res["seconds"] = timings
    res["load_average"] = {"start": load0, "end": load1}
    res["wall_s"] = round(time.time() - t_start, 1)

    print()
    print(f"# {res['date']}  {fp.get('cpu_model')} {fp.get('arch')} x{fp.get('usable_cores')}, "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f}; {model.manifest.model.name} on "
          f"{data_name}; {model.backend} ({model.target}); ORT intra-op threads "
          f"{mono.options['intra_op_threads'] or 'auto'}")
    print(f"# {command}")
    for line in table(res):
        print(line)
    for k in [k for k in res if k.endswith("_error")]:
        print(f"# {k[:-6]} failed: {res[k]}")
    out = args.json_out or REPO / "runs" / "bench" / f"run_all-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from runtime.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(res, indent=2, default=_json_default) + "\n")
    print(f"# results: {out}")
    return 1 if any(k.endswith("_error") for k in res) else 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
