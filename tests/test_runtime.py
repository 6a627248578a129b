"""On-device runtime: AdaptiveModel loading, backend fallback, inputs, early exits, deadlines,
skip-config choice, batching, thread safety, and the no-torch guarantee."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from runtime import AdaptiveModel, FakeClock, Prediction
from runtime.bundle import Bundle
from runtime.errors import ConfigError
from export.manifest_builder import add_artifact_file
from runtime.manifest import (MANIFEST_NAME, Deployment, DeploymentTarget, LatencyEntry,
                              Requirements, Stopping, save_manifest, utc_now_iso)
from runtime.model import BackendFallbackWarning, BackendUnavailableError, select_backend
from runtime.rules import MaxProbRule

ROOT = Path(__file__).resolve().parents[1]
DATA_SPEC = "synthetic:chans=1,size=28"
THREADS = {"intra_op_threads": 1}


# ---------------------------------------------------------------------------------------------
# fixtures: a real (tiny) bundle, exported and compiled once per module
# ---------------------------------------------------------------------------------------------

def build_bundles(root: Path) -> tuple[Path, Path]:
    """(portable bundle, x86-host onnxruntime bundle) of a fresh resnet20_adn (1x28x28, 10 classes)
    with perturbed norms (so exits disagree, like a trained model). About 3 s."""
    import torch
    from torch import nn

    from export.compile import compile_bundle
    from export.portable import export_checkpoint
    from train.checkpoint import save_checkpoint
    from train.data import load_dataset
    from train.models import create_model

    torch.set_num_threads(1)
    data = load_dataset(DATA_SPEC)
    torch.manual_seed(0)
    model = create_model("resnet20_adn", num_classes=data.num_classes, in_chans=1, img_size=28)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    state = {"model_name": "resnet20_adn", "model_config": model.model_config(),
             "model": model.state_dict(), "ema": None, "dataset": data.info(), "eval": None,
             "config": {"data": DATA_SPEC}}
    ckpt = save_checkpoint(state, root / "model.pt")
    portable = export_checkpoint(ckpt, root / "portable", parity_samples=4, progress=None)
    host = compile_bundle(portable, "x86-host", backends=["onnxruntime"], out_dir=root / "host",
                          progress=None)
    return portable, host


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    return build_bundles(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def model(bundles) -> AdaptiveModel:
    return AdaptiveModel.load(bundles[1], runner_options=THREADS)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """uint8 NHWC validation-like images of the synthetic data set."""
    from train.data import load_dataset

    ds = load_dataset(DATA_SPEC)
    return ds.test.images[:48].permute(0, 2, 3, 1).contiguous().numpy()


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(bundle: Path, fn) -> None:
    b = Bundle.open(bundle, verify=False)
    m = b.manifest.copy()
    fn(m)
    save_manifest(m, b.root / MANIFEST_NAME)
    Bundle.open(bundle, verify=True)


def quantile_rule(model: AdaptiveModel, images: np.ndarray) -> MaxProbRule:
    """A max_prob rule whose thresholds split the samples over all exits."""
    probs = model.exit_probabilities(images)
    t = [float(np.quantile(probs[k].max(axis=1), 0.6)) for k in range(model.stages - 1)]
    return MaxProbRule(t)


def latency_entries(manifest, device: str, per_piece_ms: float = 10.0, batch: int = 1,
                    kind: str = "estimated") -> list[LatencyEntry]:
    now = utc_now_iso()
    fp = {"test": True}
    out = []
    for p in manifest.pieces:
        out.append(LatencyEntry(device=device, backend="onnxruntime", target="x86_64-cpu",
                                batch=batch, piece=p.id, p50_ms=per_piece_ms,
                                p90_ms=per_piece_ms, p95_ms=per_piece_ms, p99_ms=per_piece_ms,
                                mean_ms=per_piece_ms, kind=kind, created=now, fingerprint=fp))
    return out


class SteppingExecutor:
    """Wraps the real executor; every segment 'takes' ``ms`` on a FakeClock."""

    def __init__(self, inner, clock: FakeClock, ms: float) -> None:
        self.inner, self.clock, self.ms = inner, clock, ms
        self.backend, self.target = inner.backend, inner.target

    def run_segment(self, cfg, k, tensors):
        out = self.inner.run_segment(cfg, k, tensors)
        self.clock.advance(self.ms)
        return out

    def run_exits(self, x, cfg, upto=None):
        return self.inner.run_exits(x, cfg, upto)


def fake_time_model(bundle: Path, seg_ms: float, **kw) -> tuple[AdaptiveModel, FakeClock]:
    real = AdaptiveModel.load(bundle, runner_options=THREADS)
    clock = FakeClock()
    m = AdaptiveModel(real.bundle, SteppingExecutor(real.executor, clock, seg_ms),
                      choice=real.choice, clock=clock, **kw)
    return m, clock


# ---------------------------------------------------------------------------------------------
# loading and predictions
# ---------------------------------------------------------------------------------------------

def test_load_and_predict_single_and_batch(model, bundles, images):
    assert model.backend == "onnxruntime" and model.target == "x86_64-cpu"
    assert model.choice.skipped == {}
    p = model.predict(images[0])
    assert isinstance(p, Prediction)
    assert p.exit_index == model.stages - 1 and p.depth == model.stages  # uncalibrated: full
    assert p.class_name == model.class_names[p.class_id] and p.skip_config == "FFF"
    assert p.probabilities.shape == (10,) and abs(float(p.probabilities.sum()) - 1) < 1e-5
    assert p.latency_ms > 0 and p.deadline_missed is False and p.stopped_by == "last_exit"
    json.dumps(p.to_dict())
    ps = model.predict(images[:5])
    assert isinstance(ps, list) and len(ps) == 5
    np.testing.assert_allclose(ps[0].probabilities, p.probabilities, atol=1e-5)
    # the portable bundle runs with onnxruntime on the ONNX files, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm = AdaptiveModel.load(bundles[0], runner_options=THREADS)
    assert pm.backend == "onnx" and pm.choice.library == "onnxruntime"
    # a compiled bundle's runner options come from its deployment record (the manifest),
    # never from device profiles installed on this machine
    assert model.choice.options["providers"] == ["CPUExecutionProvider"]
    dep = model.manifest.deployment
    assert dep.profile == "x86-host" and model.choice.device == "x86-host"
    assert dep.target("onnxruntime", model.choice.target).requires.arch == "x86_64"
    assert dep.target("onnx", "portable").runner_options == model.choice.options
    np.testing.assert_allclose(pm.predict(images[0]).probabilities, p.probabilities, atol=1e-5)


def test_input_conventions_agree(model, images):
    """uint8 HWC / HW / NHW and float NCHW (already normalised) give the same answer."""
    ref = model.predict(images[:3])
    gray = images[:3, :, :, 0]
    mean, std = model.manifest.input.mean[0], model.manifest.input.std[0]
    x = ((images[:3].astype(np.float64) / 255 - mean) / std).transpose(0, 3, 1, 2)
    for variant in (gray, x.astype(np.float32), x, x.astype(np.float16)):
        got = model.predict(variant)
        tol = 2e-3 if variant.dtype == np.float16 else 1e-5
        for a, b in zip(ref, got):
            assert a.class_id == b.class_id and a.exit_index == b.exit_index
            np.testing.assert_allclose(a.probabilities, b.probabilities, atol=tol)
    single = model.predict(gray[0])
    assert isinstance(single, Prediction) and single.class_id == ref[0].class_id
    assert isinstance(model.predict(x[0].astype(np.float32)), Prediction)


def test_batch_answers_equal_batch_one(model, images):
    rule = quantile_rule(model, images)
    batch = model.predict(images, rule=rule)
    exits = {p.exit_index for p in batch}
    assert len(exits) == model.stages, f"rule should spread samples over all exits, got {exits}"
    for i, b in enumerate(batch):
        one = model.predict(images[i], rule=rule)
        assert (one.exit_index, one.class_id, one.skip_config) == \
            (b.exit_index, b.class_id, b.skip_config), i
        np.testing.assert_allclose(one.probabilities, b.probabilities, atol=1e-5)
    assert [p.stopped_by for p in batch if p.exit_index < model.stages - 1] == \
        ["rule"] * sum(p.exit_index < model.stages - 1 for p in batch)


def test_rules_by_name_and_calibrated_rule(bundles, images, tmp_path):
    b = copy_bundle(bundles[1], tmp_path / "cal")
    m0 = AdaptiveModel.load(b, runner_options=THREADS)
    rule = quantile_rule(m0, images)
    edit_manifest(b, lambda m: setattr(m, "stopping", Stopping(
        rule="max_prob", params=rule.params(), val_accuracy=0.5, mean_latency_ms=1.0,
        created=utc_now_iso())))
    m = AdaptiveModel.load(b, runner_options=THREADS)
    assert m.rule_name == "max_prob"
    default = m.predict(images[:16])
    explicit = m0.predict(images[:16], rule=rule)
    assert [p.exit_index for p in default] == [p.exit_index for p in explicit]
    assert [p.exit_index for p in m.predict(images[:16], rule="max_prob")] == \
        [p.exit_index for p in explicit]
    assert {p.exit_index for p in m.predict(images[:16], rule="full")} == {m.stages - 1}
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        m.predict(images[0], rule="nope")
    with pytest.raises(ValueError, match="needs calibrated parameters"):
        m.predict(images[0], rule="entropy")


# ---------------------------------------------------------------------------------------------
# deadlines (fake clock)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timed_bundle(bundles, tmp_path_factory) -> Path:
    """The host bundle with an estimated table: every piece (= segment) 10 ms at batch 1."""
    b = copy_bundle(bundles[1], tmp_path_factory.mktemp("timed") / "b")
    edit_manifest(b, lambda m: m.replace_latency(latency_entries(m, "x86-host", 10.0)))
    return b


def test_deadline_exits_with_fake_clock(timed_bundle, images):
    m, _ = fake_time_model(timed_bundle, 10.0)
    assert m.latency.source == "estimated"
    for budget, exit_, missed in ((35, 2, False), (30, 2, False), (25, 1, False),
                                  (15, 0, False), (10, 0, False), (5, 0, True), (0, 0, True)):
        p = m.predict(images[0], budget_ms=budget, skip_config="FFF")
        assert (p.exit_index, p.deadline_missed) == (exit_, missed), budget
        assert p.latency_ms == pytest.approx(10.0 * (exit_ + 1))
        assert p.stopped_by == ("last_exit" if exit_ == 2 else "deadline")
    # a batch shares the call's budget. The table has batch 1 only: a batch of 4 is first
    # estimated at 4 x 10 ms per segment (conservative) -> exit 0 (predicted miss), which then
    # takes 10 ms: within the budget, so not flagged ...
    ps = m.predict(images[:4], budget_ms=25, skip_config="FFF")
    assert [(p.exit_index, p.deadline_missed) for p in ps] == [(0, False)] * 4
    for _ in range(2):
        m.predict(images[:4], skip_config="FFF")
    # ... then what batches of 4 really take here (10 ms on the fake clock) is used
    ps = m.predict(images[:4], budget_ms=25, skip_config="FFF")
    assert [(p.exit_index, p.deadline_missed) for p in ps] == [(1, False)] * 4
    # no budget: full depth, never missed
    assert m.predict(images[0]).exit_index == 2


def test_deadline_missed_when_segments_take_longer_than_the_table(timed_bundle, images):
    m, _ = fake_time_model(timed_bundle, 30.0)  # table says 10 ms, segments take 30
    p = m.predict(images[0], budget_ms=25, skip_config="FFF")
    assert p.exit_index == 0 and p.deadline_missed and p.latency_ms == pytest.approx(30.0)


def test_deadline_follows_a_slower_device_as_measurements_accumulate(timed_bundle, images):
    """The table says 10 ms, segments take 30: the deadline's 99% quantile blends the table with
    the online window, w = n / (n + SPAN_PRIOR), so it moves towards 30 ms as calls accumulate
    (a lone stall cannot do that: see test_device_robustness)."""
    from runtime.deadline import SPAN_PRIOR

    m, _ = fake_time_model(timed_bundle, 30.0)
    assert m.latency.segment_quantile("FFF", 1, 1, 0.99) == pytest.approx(10.0)
    for _ in range(5):
        m.predict(images[0], skip_config="FFF")
    w = 5 / (5 + SPAN_PRIOR)
    assert m.latency.segment_quantile("FFF", 1, 1, 0.99) == pytest.approx(10 + 20 * w)
    # p50 keeps the table (the skip-config choice and the costs the rules see)
    assert m.latency.segment_ms("FFF", 1, stat="p50") == pytest.approx(10.0)
    for _ in range(95):
        m.predict(images[0], skip_config="FFF")
    w = 100 / (100 + SPAN_PRIOR)
    assert m.latency.segment_quantile("FFF", 1, 1, 0.99) == pytest.approx(10 + 20 * w)
    # so a 45 ms budget now stops after exit 0 on time instead of missing at exit 1
    p = m.predict(images[0], budget_ms=45, skip_config="FFF")
    assert (p.exit_index, p.deadline_missed) == (0, False)


def test_deadline_measure_as_you_go_without_table(bundles, images):
    m, _ = fake_time_model(bundles[1], 10.0)
    assert not m.table and m.latency.source == "online"
    assert m.latency.segment_ms("FFF", 0) is None  # nothing known: the first segment just runs
    first = m.predict(images[0], budget_ms=5, skip_config="FFF")
    # after one measured segment the others are estimated from MACs, so it stops at exit 0
    assert (first.exit_index, first.deadline_missed) == (0, True)
    for _ in range(5):
        m.predict(images[0], skip_config="FFF")
    assert m.latency.segment_ms("FFF", 1) == pytest.approx(10.0)
    for budget, exit_ in ((15, 0), (25, 1), (30, 2)):
        p = m.predict(images[0], budget_ms=budget, skip_config="FFF")
        assert (p.exit_index, p.deadline_missed) == (exit_, False), budget
    assert m.latency.segment_ms("TTT", 2) is not None  # MACs-proportional for unseen configs
    assert m.latency.segment_ms("FFF", 1, batch=4) == pytest.approx(40.0)  # batch-1 x n
    # a bundle with a table can ignore it: latency="online"
    m2, _ = fake_time_model(bundles[1], 10.0, latency="online")
    assert m2.latency.source == "online"


# ---------------------------------------------------------------------------------------------
# skip configuration for a budget
# ---------------------------------------------------------------------------------------------

def test_skip_config_chosen_from_latency_table(bundles, images, tmp_path):
    b = copy_bundle(bundles[1], tmp_path / "skip")
    full = {"FFF": 30.0, "FFT": 26.0, "FTF": 24.0, "FTT": 20.0, "TFF": 22.0, "TFT": 18.0,
            "TTF": 16.0, "TTT": 12.0}
    acc = {"FFF": 0.95, "FFT": 0.93, "FTF": 0.94, "FTT": 0.90, "TFF": 0.91, "TFT": 0.85,
           "TTF": 0.88, "TTT": 0.80}

    def add(m):
        now, entries = utc_now_iso(), []
        for cfg, total in full.items():
            for k in range(m.stages):
                v = total * (k + 1) / m.stages
                entries.append(LatencyEntry(device="x86-host", backend="onnxruntime",
                                            target="x86_64-cpu", batch=1, exit=k, skip_config=cfg,
                                            p50_ms=v * 0.8, p90_ms=v * 0.9, p95_ms=v, p99_ms=v,
                                            mean_ms=v * 0.8, kind="estimated", created=now))
        m.replace_latency(entries)

    edit_manifest(b, add)
    m = AdaptiveModel.load(b, runner_options=THREADS)
    # no per-config accuracy yet: MACs order (full depth first), fastest if none fits
    assert m.choose_skip_config(None) == "FFF"
    assert m.choose_skip_config(100) == "FFF"
    assert m.choose_skip_config(5) == "TTT"
    edit_manifest(b, lambda man: man.annotations.update(skip_accuracy=acc))
    m = AdaptiveModel.load(b, runner_options=THREADS)
    assert m.choose_skip_config(30) == "FFF"
    assert m.choose_skip_config(25) == "FTF"       # 0.94 fits at 24 ms, FFT (26) does not
    assert m.choose_skip_config(21) == "FTT"       # TFF (0.91) needs 22 ms; FTT (0.90) 20 ms
    assert m.choose_skip_config(17) == "TTF"
    assert m.choose_skip_config(1) == "TTT"        # nothing fits: the fastest
    # predict uses it; an explicit skip_config overrides
    assert m.predict(images[0], budget_ms=1e6).skip_config == "FFF"
    assert m.predict(images[0], budget_ms=1e6, skip_config="TFT").skip_config == "TFT"
    with pytest.raises(ValueError, match="unknown skip config 'FFX'"):
        m.predict(images[0], skip_config="FFX")


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------

def test_thread_safety_matches_sequential(model, images):
    rule = quantile_rule(model, images)
    n_threads, per_thread = 8, 50
    idx = [[(t * 7 + i) % len(images) for i in range(per_thread)] for t in range(n_threads)]
    expected = {i: model.predict(images[i], rule=rule) for i in set(sum(idx, []))}
    barrier = threading.Barrier(n_threads)

    def work(t):
        barrier.wait()
        return [model.predict(images[i], rule=rule) for i in idx[t]]

    with ThreadPoolExecutor(n_threads) as pool:
        results = list(pool.map(work, range(n_threads)))
    for t in range(n_threads):
        for i, got in zip(idx[t], results[t]):
            want = expected[i]
            assert (got.exit_index, got.class_id) == (want.exit_index, want.class_id)
            np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda x: x[0, :, :, 0][None, None, None], "5-D"),                 # wrong rank
    (lambda x: x[0].astype(np.int64), "unsupported dtype int64"),
    (lambda x: x[0].astype(np.complex64), "unsupported dtype complex64"),
    (lambda x: x[0].astype(bool), "unsupported dtype bool"),
    (lambda x: np.repeat(x[:2], 3, axis=3), "wrong channel count: got 3"),
    (lambda x: np.zeros((32, 32, 1), np.uint8), "wrong image size: got H x W = 32 x 32"),
    (lambda x: np.zeros((2, 1, 27, 28), np.float32), "wrong image size"),
    (lambda x: np.zeros((2, 3, 28, 28), np.float32), "wrong channel count: got 3"),
    (lambda x: np.full((1, 1, 28, 28), np.nan, np.float32), "non-finite.*NaN"),
    (lambda x: np.full((1, 28, 28), np.inf, np.float64), "non-finite.*inf"),
    # the batch-1 float32 (C, H, W) shortcut: one NaN or infinity among finite values
    (lambda x: np.where(np.arange(784).reshape(1, 28, 28) == 500, np.nan,
                        np.zeros((1, 28, 28))).astype(np.float32), "non-finite.*NaN"),
    (lambda x: np.where(np.arange(784).reshape(1, 28, 28) == 7, -np.inf,
                        np.zeros((1, 28, 28))).astype(np.float32), "non-finite"),
    (lambda x: x[:0], "empty batch"),
    (lambda x: np.zeros((0, 1, 28, 28), np.float32), "empty batch"),
    (lambda x: "image.png", "expected a numpy array"),
])
def test_bad_inputs_give_clear_errors(model, images, make, match):
    with pytest.raises(ValueError, match=match):
        model.predict(make(images))


def test_bad_arguments_give_clear_errors(model, images):
    with pytest.raises(ValueError, match="budget_ms: must be >= 0"):
        model.predict(images[0], budget_ms=-1)
    with pytest.raises(ValueError, match="budget_ms: expected a finite"):
        model.predict(images[0], budget_ms=float("nan"))
    with pytest.raises(ValueError, match="unknown skip config"):
        model.predict(images[0], skip_config="FF")
    with pytest.raises(ValueError, match="unknown rule"):
        model.predict(images[0], rule="fastest")
    with pytest.raises(ValueError, match="expected a StoppingRule"):
        model.predict(images[0], rule=3)


# ---------------------------------------------------------------------------------------------
# backend choice and fallback
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def jetson_like(bundles, tmp_path) -> Path:
    """The host bundle relabelled for jetson-orin-nano (tensorrt, onnxruntime, tvm), with
    tensorrt artifacts (engines not built) and aarch64 TVM libraries."""
    b = copy_bundle(bundles[1], tmp_path / "jetson")
    (b / "tvm").mkdir()

    def relabel(m):
        m.device = "jetson-orin-nano"
        host_ort = m.deployment.target("onnxruntime", "x86_64-cpu")
        m.deployment = Deployment(profile="jetson-orin-nano",
                                  backend_order=["tensorrt", "onnxruntime", "tvm"], targets=[
            DeploymentTarget(backend="tensorrt", target="sm_87-trt10",
                             requires=Requirements(gpu=True, gpu_compute_capability="8.7",
                                                   tensorrt_major=10)),
            host_ort,
            DeploymentTarget(backend="tvm", target="aarch64-cortex-a78ae",
                             requires=Requirements(arch="aarch64"),
                             runner_options={"device": "cpu"}),
            m.deployment.target("onnx", "portable")])
        for p in m.pieces:
            onnx = p.find_artifacts("onnx")[0].file
            add_artifact_file(m, b, p.id, onnx, backend="tensorrt", target="sm_87-trt10",
                                options={"profile_options": {"precision": "fp16"}})
            shutil.copyfile(b / onnx, b / f"tvm/{p.id}.so")
            add_artifact_file(m, b, p.id, f"tvm/{p.id}.so", backend="tvm",
                                target="aarch64-cortex-a78ae",
                                options={"target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                                    "mcpu": "cortex-a78ae"}, "device": "cpu"})

    edit_manifest(b, relabel)
    return b


def test_backend_fallback_when_first_backend_unavailable(jetson_like, images, model,
                                                         monkeypatch):
    with pytest.warns(BackendFallbackWarning, match="skipped: tensorrt"):
        m = AdaptiveModel.load(jetson_like, runner_options=THREADS)
    assert m.backend == "onnxruntime" and list(m.choice.skipped) == ["tensorrt"]
    assert m.choice.order[:3] == ("tensorrt", "onnxruntime", "tvm")
    assert "pipeline engines --bundle" in m.choice.skipped["tensorrt"]
    np.testing.assert_allclose(m.predict(images[0]).probabilities,
                               model.predict(images[0]).probabilities, atol=1e-5)
    # forcing a backend that cannot run says why
    with pytest.raises(BackendUnavailableError, match="compiled for aarch64.*this host is x86_64"):
        AdaptiveModel.load(jetson_like, backend="tvm")
    # with the tensorrt package "installed" and no GPU, the deployment record says why
    import runtime.selection as sel
    real = sel.importable
    monkeypatch.setattr(sel, "importable", lambda mod: mod == "tensorrt" or real(mod))
    monkeypatch.setattr(sel, "has_gpu", lambda: False)
    choice = select_backend(Bundle.open(jetson_like), arch="x86_64")
    assert choice.backend == "onnxruntime"
    assert choice.skipped["tensorrt"] == ("target sm_87-trt10 needs an NVIDIA GPU and none is "
                                          "visible on this machine")
    # ... and with a GPU, the reason is the missing engines
    monkeypatch.setattr(sel, "has_gpu", lambda: True)
    choice = select_backend(Bundle.open(jetson_like), arch="x86_64")
    assert choice.skipped["tensorrt"].startswith("TensorRT engines not built")
    # on an aarch64 host the compiled x86 onnxruntime artifacts are skipped too; the TVM
    # libraries fit, and with no runner for them the portable ONNX is the last resort
    choice = select_backend(Bundle.open(jetson_like), arch="aarch64")
    assert "compiled for x86_64 (target x86_64-cpu), this host is aarch64" in \
        choice.skipped["onnxruntime"]
    assert choice.backend in ("tvm", "onnx")


def test_bundle_without_deployment_record_uses_default_order(bundles, tmp_path):
    b = copy_bundle(bundles[1], tmp_path / "odd")

    def strip(m):
        m.device, m.deployment = "my-private-board", None

    edit_manifest(b, strip)
    choice = select_backend(Bundle.open(b))
    assert choice.backend == "onnxruntime"
    assert choice.order == ("tensorrt", "onnxruntime", "tvm", "onnx")
    assert any("'my-private-board' has no deployment record" in n for n in choice.notes)
    with pytest.raises(BackendUnavailableError, match="unknown backend 'cuda'"):
        select_backend(Bundle.open(b), backend="cuda")


def test_corrupt_bundle_is_refused(bundles, tmp_path):
    from runtime.errors import BundleIntegrityError

    b = copy_bundle(bundles[1], tmp_path / "bad")
    f = next((b / "onnxruntime").rglob("*.onnx"))
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch"):
        AdaptiveModel.load(b)


# ---------------------------------------------------------------------------------------------
# no torch, allowed imports only
# ---------------------------------------------------------------------------------------------

def test_runtime_never_imports_torch(bundles, images, tmp_path, pipeline_env):
    np.save(tmp_path / "x.npy", images[:4])
    code = f"""
import sys, numpy as np
import runtime
from runtime import AdaptiveModel
m = AdaptiveModel.load({str(bundles[1])!r}, runner_options={{"intra_op_threads": 1}})
x = np.load({str(tmp_path / 'x.npy')!r})
ps = m.predict(x, budget_ms=1000.0)
p = m.predict(x[0], rule="full")
bad = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "train", "export", "tvm",
                                                          "tensorrt", "onnx", "PIL", "click",
                                                          "devices", "pipeline"))
assert "onnxruntime" in sys.modules
print("BAD", bad, len(ps), p.exit_index)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=pipeline_env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BAD [] 4 2" in out.stdout, out.stdout


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level, function-level) top-level package names imported by a source file."""
    tree = ast.parse(path.read_text(), str(path))
    top, lazy = set(), set()

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            nested = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                (lazy if nested else top).update(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                (lazy if nested else top).add(child.module.split(".")[0])
            visit(child, nested)

    visit(tree, False)
    return top, lazy


def test_runtime_sources_import_only_allowed_modules():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    files = sorted((ROOT / "runtime").rglob("*.py"))
    assert files
    for f in files:
        top, lazy = _imports(f)
        assert top <= stdlib | {"numpy", "runtime"}, (f, top - stdlib)
        # runtime/ imports nothing else of this project: the manifest is its only contract
        assert lazy <= stdlib | {"numpy", "runtime", "onnxruntime", "tvm", "tensorrt"}, \
            (f, lazy - stdlib)
    # devices/ may import runtime/ (never the reverse) and is otherwise stdlib-only
    for f in ("__init__.py", "profile.py", "registry.py", "host.py", "estimate.py"):
        top, _ = _imports(ROOT / "devices" / f)
        assert top <= stdlib | {"devices", "runtime", "tomli"}, (f, top - stdlib)


# ---------------------------------------------------------------------------------------------
# deadline: a first exit predicted not to fit
# ---------------------------------------------------------------------------------------------

class _AlwaysStop(MaxProbRule):
    """A max_prob rule (subclass: asked through stop()) that stops every sample at exit 0."""

    def __init__(self) -> None:
        super().__init__(0.0)


def test_first_exit_predicted_miss_answers_exit_zero_flagged_only_if_it_ran_over(
        timed_bundle, images):
    """The table says 10 ms per segment, budget 5 ms: exit 0 cannot fit, so only segment 0
    runs and answers (docs/runtime.md, Deadlines), although deeper exits would fit after it;
    the rule still decides how the answer is labelled. It is flagged missed only when it
    really ran over: not at 1 ms a segment, yes at 10 ms."""
    m, _ = fake_time_model(timed_bundle, 1.0)
    p = m.predict(images[0], budget_ms=5, skip_config="FFF")
    assert (p.exit_index, p.deadline_missed, p.stopped_by) == (0, False, "deadline")
    assert p.latency_ms == pytest.approx(1.0)
    p = m.predict(images[0], budget_ms=5, skip_config="FFF", rule=_AlwaysStop())
    assert (p.exit_index, p.deadline_missed, p.stopped_by) == (0, False, "rule")
    ps = m.predict(images[:3], budget_ms=5, skip_config="FFF", rule=quantile_rule(m, images))
    assert {(q.exit_index, q.deadline_missed) for q in ps} == {(0, False)}
    slow, _ = fake_time_model(timed_bundle, 10.0)
    p = slow.predict(images[0], budget_ms=5, skip_config="FFF")
    assert (p.exit_index, p.deadline_missed, p.stopped_by) == (0, True, "deadline")
    # a first exit that fits is not flagged when deeper ones run and fit too
    p = m.predict(images[0], budget_ms=35, skip_config="FFF")
    assert (p.exit_index, p.deadline_missed, p.stopped_by) == (2, False, "last_exit")


# ---------------------------------------------------------------------------------------------
# the batch-1 hot path gives exactly what the general path gives
# ---------------------------------------------------------------------------------------------

def test_batch_one_input_shortcut_equals_prepare_input(model, images):
    from runtime.preprocess import prepare_input

    mean, std = model.manifest.input.mean, model.manifest.input.std
    x = ((images[:2].astype(np.float64) / 255 - mean[0]) / std[0]).transpose(0, 3, 1, 2)
    for arr in (images[0], images[0, :, :, 0], x[0].astype(np.float32),
                np.asfortranarray(x[1].astype(np.float32)), images[:2], x.astype(np.float32)):
        got, batched = model._prepare(arr)
        want, want_batched = prepare_input(arr, model.input_shape, mean, std)
        assert batched == want_batched and got.dtype == np.float32 and got.flags.c_contiguous
        assert np.array_equal(got, want), arr.shape
    every = np.arange(28 * 28, dtype=np.int64).reshape(28, 28) % 256  # every pixel value
    for arr in (every.astype(np.uint8), every.astype(np.uint8)[::-1].T):
        got, _ = model._prepare(arr)
        np.testing.assert_array_equal(got, prepare_input(arr, model.input_shape, mean, std)[0])
    # a 3-channel model: the per-channel table gives normalize()'s values too
    from runtime.model import normalisation_table
    from runtime.preprocess import normalize

    rgb_mean, rgb_std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    rgb = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    rgb[0, 0, :, :] = np.arange(16 * 3).reshape(16, 3) * 5  # many values in every channel
    got = normalisation_table(rgb_mean, rgb_std)[rgb, np.arange(3)].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got, normalize(rgb, rgb_mean, rgb_std))
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(normalisation_table([0.3], [0.7])[:, 0],
                                  normalize(levels, [0.3], [0.7]).reshape(-1))
    huge = np.full((1, 28, 28), 3e38, np.float32)  # finite (its sum would overflow)
    for arr in (huge, x[0], x[0].astype(np.float16), images[0].astype(np.float32)[None, :, :, 0]):
        got, _ = model._prepare(arr)
        np.testing.assert_array_equal(got, prepare_input(arr, model.input_shape, mean, std)[0])
    for bad in (np.nan, np.inf, -np.inf):
        arr = np.zeros((1, 28, 28), np.float32)
        arr[0, 3, 4] = bad
        with pytest.raises(ValueError, match="non-finite"):
            model._prepare(arr)


def test_fast_paths_answer_like_the_general_loop(model, images):
    """Batch 1 without a budget and a rule that never stops early takes a shorter path; a
    budget that is never reached goes through the general loop: same answers."""
    from runtime.model import _prediction

    for i in range(8):
        for rule in (None, "full"):
            a = model.predict(images[i], rule=rule, skip_config="FTF")
            b = model.predict(images[i], rule=rule, skip_config="FTF", budget_ms=1e9)
            assert (a.exit_index, a.class_id, a.stopped_by, a.deadline_missed, a.budget_ms) == \
                (b.exit_index, b.class_id, b.stopped_by, False, None)
            np.testing.assert_array_equal(a.probabilities, b.probabilities)
            assert a.depth == model.stages and a.skip_config == "FTF" and a.latency_ms > 0
        one = model.predict(images[i:i + 1], rule="full", skip_config="FTF")
        assert isinstance(one, list) and one[0].class_id == a.class_id
    p = _prediction(3, "three", np.ones(5, np.float32), 1, "FFF", 2.5, True, 4.0, "deadline")
    q = Prediction(class_id=3, class_name="three", probabilities=np.ones(5, np.float32),
                   exit_index=1, depth=2, skip_config="FFF", latency_ms=2.5,
                   deadline_missed=True, budget_ms=4.0, stopped_by="deadline")
    assert repr(p) == repr(q) and p.to_dict() == q.to_dict()
    with pytest.raises(AttributeError):
        p.class_id = 4  # still frozen


def test_inline_threshold_rules_equal_their_stop_method(model, images):
    """max_prob and entropy are decided inline; subclasses go through rule.stop(): same answers."""
    from runtime.rules import EntropyRule

    probs = model.exit_probabilities(images)
    from runtime.exits import normalised_entropy

    qs = [float(np.quantile(probs[k].max(axis=1), 0.5)) for k in range(model.stages - 1)]
    ent = [float(np.quantile(normalised_entropy(probs[k]), 0.4)) for k in range(model.stages - 1)]

    class SubMax(MaxProbRule):
        pass

    class SubEnt(EntropyRule):
        pass

    for fast, slow in ((MaxProbRule(qs), SubMax(qs)), (MaxProbRule(qs[0]), SubMax(qs[0])),
                       (MaxProbRule([None, qs[1]]), SubMax([None, qs[1]])),
                       (EntropyRule(ent), SubEnt(ent))):
        exits = set()
        for i in range(len(images)):
            a, b = model.predict(images[i], rule=fast), model.predict(images[i], rule=slow)
            assert (a.exit_index, a.class_id, a.stopped_by) == \
                (b.exit_index, b.class_id, b.stopped_by), (fast, i)
            np.testing.assert_array_equal(a.probabilities, b.probabilities)
            exits.add(a.exit_index)
        batch = model.predict(images, rule=fast)
        assert [p.exit_index for p in batch] == \
            [model.predict(images[i], rule=slow).exit_index for i in range(len(images))]
        assert len(exits) > 1, fast
    with pytest.raises(ValueError, match="no threshold for exit 1"):
        model.predict(images[0], rule=MaxProbRule([1.0]))  # one entry, two decisions
    # the batch-1 max_prob shortcut: the top softmax probability is 1 / sum(exp(z - max z)) in
    # float32, bit for bit, ties and extreme logits included
    from runtime.model import softmax

    rng = np.random.default_rng(0)
    for i in range(3000):
        z = (rng.standard_normal((1, 10)) * (10.0 ** rng.integers(-3, 4))).astype(np.float32)
        if i % 7 == 0:
            z[0, 3] = z[0, 5] = z.max()
        e = np.array(z, dtype=np.float32)
        e -= e.max()
        np.exp(e, out=e)
        assert np.float32(1.0) / e.sum() == softmax(z).max(), z


def test_rules_get_a_context_with_this_configurations_costs(bundles, images, tmp_path):
    """Lookahead and user rules get segment_ms from the latency figures; the built-in rules
    that only read num_exits share a lazy one (costs computed only if read)."""
    from runtime.rules import StopContext

    b = copy_bundle(bundles[1], tmp_path / "ctx")
    edit_manifest(b, lambda m: m.replace_latency(latency_entries(m, "x86-host", 7.0)))
    m = AdaptiveModel.load(b, runner_options=THREADS)
    seen: list[StopContext] = []

    class Spy(MaxProbRule):
        def stop(self, k, probs, ctx=None):
            seen.append(ctx)
            return super().stop(k, probs, ctx)

    m.predict(images[0], rule=Spy(1.0), skip_config="FTF")
    assert len(seen) == m.stages - 1
    assert isinstance(seen[0], StopContext) and seen[0].num_exits == m.stages
    assert list(seen[0].segment_ms) == [7.0] * m.stages and seen[0].skip_config == "FTF"
    lazy = m._stop_context(MaxProbRule(0.5), "FTF")
    assert lazy is m._stop_context(MaxProbRule(0.9), "FTF")  # one per configuration
    assert lazy.num_exits == m.stages and list(lazy.segment_ms) == [7.0] * m.stages
    assert list(lazy.cumulative_ms) == [7.0, 14.0, 21.0]


def _online_reference(window: np.ndarray, stat: str, min_samples: int) -> float:
    """OnlineLatency's documented percentile: np.percentile of the window where rare stalls
    (beyond the stall fence, at most max(1, floor((1 - q) n)) of them) count as the fence;
    below min_samples the maximum, a lone stall as the fence."""
    from runtime.deadline import STALL_FACTOR, STALL_MIN_MS

    s = np.sort(window)
    n, med = len(s), float(s[(len(s) - 1) // 2])
    fence = max(STALL_FACTOR * med, med + STALL_MIN_MS)
    over = int((s > fence).sum())
    if n < min_samples and stat != "p50":
        return fence if over == 1 else float(s[-1])
    q = float(stat[1:]) / 100
    if 0 < over <= max(1, int((1 - q) * n + 1e-9)):
        s = np.minimum(s, fence)
    return float(np.percentile(s, 100 * q))


def test_online_latency_percentiles_equal_numpy():
    from runtime.deadline import OnlineLatency

    rng = np.random.default_rng(0)
    online = OnlineLatency(window=50, min_samples=5)
    values = rng.lognormal(size=400)  # heavy-tailed: some windows have rare "stalls"
    capped = 0
    for i, v in enumerate(values):
        online.record(("c", 0, 1), v)
        window = values[max(0, i - 49):i + 1]
        for stat in ("p50", "p90", "p95", "p99"):
            want = _online_reference(window, stat, 5)
            assert online.stat(("c", 0, 1), stat) == want, (i, stat)
            plain = float(np.percentile(window, float(stat[1:]))) if len(window) >= 5 or \
                stat == "p50" else float(window.max())
            capped += want != plain
        assert online.stat(("c", 0, 1), "mean") == pytest.approx(float(window.mean()), rel=1e-12)
    assert 0 < capped  # the stall rule did apply somewhere (else this tests plain numpy only)
    assert online.count(("c", 0, 1)) == 50 and online.stat(("x",), "p95") is None
    with pytest.raises(ValueError, match="stat must be one of"):
        online.stat(("c", 0, 1), "p42")
    online.clear()
    assert online.keys() == [] and online.stat(("c", 0, 1)) is None


# ---------------------------------------------------------------------------------------------
# artifacts run from their verified bytes
# ---------------------------------------------------------------------------------------------

def test_unloadable_onnx_with_matching_checksum_is_a_bundle_error(bundles, tmp_path):
    import runtime.manifest as rm
    from runtime.errors import BundleIntegrityError

    b = copy_bundle(bundles[1], tmp_path / "junk")

    def junk(m):
        art = m.piece("stage1.full").find_artifacts("onnxruntime")[0]
        (b / art.file).write_bytes(b"not an onnx model at all")
        art.sha256, art.size_bytes = rm.sha256_file(b / art.file), 24

    edit_manifest(b, junk)
    with pytest.raises(BundleIntegrityError, match=r"stage1\.full\.onnx: onnxruntime .* cannot "
                                                   r"load this file although its checksum"):
        AdaptiveModel.load(b, runner_options=THREADS)
    lazy = AdaptiveModel.load(b, runner_options=THREADS, warm=False)
    with pytest.raises(BundleIntegrityError, match=r"stage1\.full\.onnx"):
        lazy.predict(np.zeros((28, 28), np.uint8), skip_config="FFF")


def test_tvm_pieces_load_a_private_copy_of_their_verified_bytes(bundles, images, model,
                                                                tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    import tempfile

    from export.compile import compile_bundle
    from runtime.backends.tvm_runner import _private_copy
    from runtime.errors import BundleIntegrityError

    private = tmp_path / "private-tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    p = _private_copy(b"\x7fELF-bytes", "x/../stage0.full.so")
    assert p.read_bytes() == b"\x7fELF-bytes" and p.parent.parent == private
    assert (p.stat().st_mode & 0o777, p.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert p.name == "x_.._stage0.full.so"

    out = compile_bundle(bundles[0], "x86-host", backends=["tvm"], out_dir=tmp_path / "tvm",
                         progress=None)
    for entry in private.iterdir():
        if entry != p.parent:
            shutil.rmtree(entry)
    with pytest.raises(ConfigError, match="options.intra_op_threads: unknown tvm runner option"):
        AdaptiveModel.load(out, backend="tvm", runner_options=THREADS).predict(images[:1])
    m = AdaptiveModel.load(out, backend="tvm")
    assert m.backend == "tvm"
    got = m.predict(images[:4], rule="full")
    for a, b in zip(got, model.predict(images[:4], rule="full")):
        assert a.class_id == b.class_id
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-4)
    assert sorted(private.iterdir()) == [p.parent]  # the copies are removed once loaded
    # lazily opened: a library replaced after load() is refused, never loaded
    lazy = AdaptiveModel.load(out, backend="tvm", warm=False)
    f = out / lazy.bundle.artifact("stage2.full", "tvm").file
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    f.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch"):
        lazy.predict(images[0], skip_config="FFF")


# ---------------------------------------------------------------------------------------------
# device names and TensorRT engines
# ---------------------------------------------------------------------------------------------

def test_unknown_device_is_an_error_listing_the_known_ones(bundles, images):
    from runtime.model import UnknownDeviceError

    with pytest.raises(UnknownDeviceError, match=r"unknown device 'nosuch-board' for this "
                                                 r"bundle; it knows: none \(a portable bundle\)"):
        AdaptiveModel.load(bundles[0], device="nosuch-board")
    with pytest.raises(UnknownDeviceError, match=r"'nosuch-board' for this bundle; it knows: "
                                                 r"x86-host"):
        select_backend(Bundle.open(bundles[1]), device="nosuch-board")
    # the bundle's own profile: the latency table is read under its name
    m = AdaptiveModel.load(bundles[1], device="x86-host", runner_options=THREADS)
    assert m.choice.device == "x86-host" and m.latency_device == "x86-host"


def test_bundle_for_a_profile_unknown_here_runs_from_its_deployment_record(bundles, tmp_path):
    b = copy_bundle(bundles[1], tmp_path / "private-board")

    def rename(m):
        m.device = m.deployment.profile = "my-private-board"

    edit_manifest(b, rename)
    choice = select_backend(Bundle.open(b), device="my-private-board")  # = the bundle's own
    assert choice.backend == "onnxruntime" and choice.device == "my-private-board"
    assert choice.options["providers"] == ["CPUExecutionProvider"] and not choice.notes


def test_tensorrt_engines_checked_against_this_gpu_when_known(jetson_like, monkeypatch):
    import runtime.backends.tensorrt_runner as rm
    import runtime.selection as sel

    real = sel.importable
    monkeypatch.setattr(sel, "importable", lambda mod: mod == "tensorrt" or real(mod))
    monkeypatch.setattr(sel, "has_gpu", lambda: True)
    bundle = Bundle.open(jetson_like)
    pieces = sel._pieces_used(bundle.manifest)
    other = jetson_like / "engines" / "sm_86_trt10.3.0"
    other.mkdir(parents=True)
    for pid in pieces:  # engines exist, but for another GPU
        (other / f"{pid}.plan").write_bytes(b"engine")
    # GPU / TensorRT version not readable cheaply: the lazy check (the runner decides)
    monkeypatch.setattr(rm, "_gpu_and_tensorrt", lambda: (None, None))
    assert select_backend(bundle, arch="x86_64").backend == "tensorrt"
    # readable: an sm_87 GPU with TensorRT 10.3 has no engines in this bundle
    monkeypatch.setattr(rm, "_gpu_and_tensorrt", lambda: ("8.7", "10.3.0"))
    choice = select_backend(bundle, arch="x86_64")
    assert choice.backend == "onnxruntime"
    why = choice.skipped["tensorrt"]
    assert "sm_87_trt10.3.0 does not exist (engines exist only for: sm_86_trt10.3.0)" in why
    assert "pipeline engines --bundle" in why
