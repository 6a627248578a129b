"""Robust on a real device: onnxruntime threads clamped to the usable cores, missing execution
providers reported, unknown runner options refused, online latency statistics that survive a
stall (docs/runtime.md, "Threads and execution providers", "Stalls")."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import runtime.backends.onnxruntime_runner as ortr
import runtime.host as rhost
from runtime import AdaptiveModel, FakeClock
from runtime.deadline import STALL_FACTOR, OnlineLatency, stall_fence
from runtime.errors import ConfigError
from test_runtime import THREADS, build_bundles


# ---------------------------------------------------------------------------------------------
# a real (tiny) ONNX file for onnxruntime sessions
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """y = relu(x @ W): float32 (N, 8) -> (N, 4), opset 17."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(32, dtype=np.float32).reshape(8, 4) / 32.0 - 0.5
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which once-per-process warnings were already given."""
    monkeypatch.setattr(ortr, "_WARNED", set())


def _run_ok(runner) -> None:
    x = np.ones((2, 8), np.float32)
    (y,) = runner.run({"x": x})
    w = np.arange(32, dtype=np.float32).reshape(8, 4) / 32.0 - 0.5
    np.testing.assert_allclose(y, np.maximum(x @ w, 0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# usable cores
# ---------------------------------------------------------------------------------------------

def test_usable_cores_affinity_capped_by_cgroup_quota(monkeypatch):
    monkeypatch.setattr(rhost.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    for quota, want in ((None, 3), (8.0, 3), (2.0, 2), (1.5, 1), (0.5, 1)):
        monkeypatch.setattr(rhost, "cgroup_cpu_quota", lambda q=quota: q)
        assert rhost.usable_cores() == want, quota
    monkeypatch.delattr(rhost.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(rhost.os, "cpu_count", lambda: 5)
    monkeypatch.setattr(rhost, "cgroup_cpu_quota", lambda: None)
    assert rhost.usable_cores() == 5


def test_cgroup_quota_v2_and_v1(tmp_path):
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    # v2: the tightest limit along the path; "max" is no limit
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "cpu.max").write_text("max 100000\n")
    (root / "a" / "b" / "cpu.max").write_text("150000 100000\n")
    proc.write_text("0::/a/b\n")
    assert rhost.cgroup_cpu_quota(str(proc), str(root)) == pytest.approx(1.5)
    (root / "a" / "cpu.max").write_text("100000 100000\n")
    assert rhost.cgroup_cpu_quota(str(proc), str(root)) == pytest.approx(1.0)
    (root / "a" / "b" / "cpu.max").write_text("max 100000\n")
    (root / "a" / "cpu.max").write_text("max 100000\n")
    assert rhost.cgroup_cpu_quota(str(proc), str(root)) is None
    # v1: cpu,cpuacct controller, quota -1 = unlimited
    v1 = root / "cpu,cpuacct" / "x"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("5:memory:/x\n4:cpu,cpuacct:/x\n")
    assert rhost.cgroup_cpu_quota(str(proc), str(root)) == pytest.approx(2.0)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert rhost.cgroup_cpu_quota(str(proc), str(root)) is None
    # unreadable: no limit known
    assert rhost.cgroup_cpu_quota(str(tmp_path / "missing"), str(root)) is None


# ---------------------------------------------------------------------------------------------
# thread clamp (real onnxruntime sessions)
# ---------------------------------------------------------------------------------------------

def test_threads_clamped_to_usable_cores_with_one_warning(tiny_onnx, monkeypatch, fresh_warnings):
    monkeypatch.setattr(ortr, "usable_cores", lambda: 2)
    with pytest.warns(ortr.ThreadClampWarning) as rec:
        r = ortr.ORTPieceRunner(tiny_onnx, intra_op_threads=6, inter_op_threads=4)
    assert [str(w.message) for w in rec] == [
        "onnxruntime: intra_op_threads 6 > 2 usable cores; using 2, without worker spinning "
        "(allow_spinning=true keeps it)",
        "onnxruntime: inter_op_threads 4 > 2 usable cores; using 2"]
    assert issubclass(ortr.ThreadClampWarning, RuntimeWarning)
    assert (r.intra_op_threads, r.inter_op_threads, r.threads_requested) == (2, 2, (6, 4))
    so = r.session.get_session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (2, 2)
    # clamped: the workers do not spin (they would take the cores the calls need) ...
    assert r.allow_spinning is False
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    _run_ok(r)
    # once per process: the other pieces of the bundle open silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r2 = ortr.ORTPieceRunner(tiny_onnx, intra_op_threads=6, inter_op_threads=4)
        assert r2.intra_op_threads == 2
        # within the cores: untouched
        r3 = ortr.ORTPieceRunner(tiny_onnx, intra_op_threads=1, inter_op_threads=1)
        # ... unless asked to; within the cores onnxruntime's default stands
        r4 = ortr.ORTPieceRunner(tiny_onnx, intra_op_threads=6, allow_spinning=True)
    assert (r3.intra_op_threads, r3.session.get_session_options().intra_op_num_threads) == (1, 1)
    assert (r3.allow_spinning, r4.allow_spinning) == (None, True)


def test_unset_threads_follow_a_restricted_cpu_set(tiny_onnx, monkeypatch, fresh_warnings):
    monkeypatch.setattr(ortr, "usable_cores", lambda: 2)
    monkeypatch.setattr(ortr.os, "cpu_count", lambda: 64)  # e.g. a container on a big host
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = ortr.ORTPieceRunner(tiny_onnx, intra_op_threads=0)
    assert r.intra_op_threads == 2 and r.session.get_session_options().intra_op_num_threads == 2
    # all the machine's cores are usable: onnxruntime's own default (0)
    monkeypatch.setattr(ortr.os, "cpu_count", lambda: 2)
    assert ortr.clamp_threads(0, 0) == (0, 0)


def test_session_options_clamp_for_the_monolithic_baseline_too(monkeypatch, fresh_warnings):
    monkeypatch.setattr(ortr, "usable_cores", lambda: 2)
    with pytest.warns(ortr.ThreadClampWarning):
        so = ortr.session_options(intra_op_threads=12, inter_op_threads=1)
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert ortr.session_options(intra_op_threads=12, clamp=False).intra_op_num_threads == 12


# ---------------------------------------------------------------------------------------------
# execution providers, options
# ---------------------------------------------------------------------------------------------

def test_missing_execution_provider_is_reported(tiny_onnx, fresh_warnings):
    import onnxruntime as ort

    wanted = "TensorrtExecutionProvider"
    if wanted in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the TensorRT execution provider")
    with pytest.warns(ortr.ProviderUnavailableWarning,
                      match=rf"{wanted} unavailable: {wanted} not in this onnxruntime .* build "
                            r"\(it has: .*CPUExecutionProvider.*\); running on "
                            r"CPUExecutionProvider"):
        r = ortr.ORTPieceRunner(tiny_onnx, providers=[wanted, "CPUExecutionProvider"],
                                intra_op_threads=1)
    assert r.providers == ["CPUExecutionProvider"] == r.session.get_providers()
    assert r.providers_missing == [wanted]
    assert r.providers_requested == [wanted, "CPUExecutionProvider"]
    _run_ok(r)
    # nothing asked for beyond the CPU: nothing missing, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = ortr.ORTPieceRunner(tiny_onnx, providers=["CPUExecutionProvider"], intra_op_threads=1)
    assert r.providers_missing == [] and r.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("options, field, match", [
    ({"intra_op_thread": 2}, "options.intra_op_thread",
     "unknown onnxruntime runner option (known: allow_spinning, graph_optimization_level, "
     "inter_op_threads, intra_op_threads, provider_options, providers)"),
    ({"device": "cuda"}, "options.device", "unknown onnxruntime runner option"),
    ({"intra_op_threads": "two"}, "options.intra_op_threads", "expected an integer >= 0"),
    ({"intra_op_threads": -1}, "options.intra_op_threads", "expected an integer >= 0"),
    ({"intra_op_threads": True}, "options.intra_op_threads", "expected an integer >= 0"),
    ({"providers": "CPUExecutionProvider"}, "options.providers", "list of execution provider"),
    ({"graph_optimization_level": "max"}, "options.graph_optimization_level",
     "expected one of disable, basic, extended, all"),
    ({"allow_spinning": "no"}, "options.allow_spinning", "expected true, false or null"),
])
def test_unknown_or_bad_runner_options_are_refused(tiny_onnx, options, field, match):
    with pytest.raises(ConfigError) as err:
        ortr.ORTPieceRunner(tiny_onnx, **options)
    assert err.value.field == field and err.value.file == str(tiny_onnx)
    assert match in str(err.value) and str(err.value).startswith(f"{tiny_onnx}: {field}: ")


def test_export_provenance_in_artifact_options_never_reaches_the_runner(tiny_onnx):
    """Artifact options mix runner options with what export recorded; the registry keeps the
    runner's own keys (v1 bundles), and the runner refuses anything else."""
    from runtime.backends import open_runner, runner_options

    artifact_options = {"intra_op_threads": 1, "opset": 17, "exporter": "torchscript",
                        "saved_optimization_level": "extended",
                        "optimized_with": {"onnxruntime": "1.x"}}
    kept = runner_options("onnxruntime", artifact_options, strict=False)
    assert kept == {"intra_op_threads": 1}
    _run_ok(open_runner("onnxruntime", tiny_onnx, kept))
    with pytest.raises(ConfigError, match="options.exporter: unknown onnxruntime runner option"):
        open_runner("onnxruntime", tiny_onnx, artifact_options)


# ---------------------------------------------------------------------------------------------
# the real scenario: a bundle with the Jetson profile's onnxruntime options on this host
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """(portable, x86-host, jetson-orin-nano) bundles of a tiny resnet20_adn."""
    from export.compile import compile_bundle

    root = tmp_path_factory.mktemp("robust")
    portable, host = build_bundles(root)
    jetson = compile_bundle(portable, "jetson-orin-nano", backends=["onnxruntime"],
                            out_dir=root / "jetson", progress=None)
    return portable, host, jetson


@pytest.fixture(scope="module")
def images():
    from train.data import load_dataset

    ds = load_dataset("synthetic:chans=1,size=28")
    return ds.test.images[:8].permute(0, 2, 3, 1).contiguous().numpy()


def test_jetson_profile_options_on_a_smaller_host(bundles, images, monkeypatch, fresh_warnings):
    """A jetson-orin-nano bundle on this host: its aarch64 onnxruntime artifacts cannot load, so
    the portable ONNX runs with the profile's onnxruntime options (CUDA provider, 6 threads) on
    2 usable cores and no CUDA provider: clamped, reported, runs."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA execution provider")
    monkeypatch.setattr(ortr, "usable_cores", lambda: 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = AdaptiveModel.load(bundles[2])
    assert m.backend == "onnx" and m.choice.options["intra_op_threads"] == 6
    got = {type(w.message).__name__: str(w.message) for w in caught}
    assert got["ThreadClampWarning"] == ("onnxruntime: intra_op_threads 6 > 2 usable cores; "
                                         "using 2, without worker spinning "
                                         "(allow_spinning=true keeps it)")
    assert "CUDAExecutionProvider" in got["ProviderUnavailableWarning"]
    assert sum(isinstance(w.message, ortr.ThreadClampWarning) for w in caught) == 1  # once
    runners = list(m.executor._runners.values())
    assert runners and all(r.intra_op_threads == 2 and r.threads_requested == (6, 1)
                           and r.providers == ["CPUExecutionProvider"]
                           and r.providers_missing == ["CUDAExecutionProvider"] for r in runners)
    p = m.predict(images[0])
    assert p.exit_index == m.stages - 1
    # a typo in runner_options is refused when the first session opens
    with pytest.raises(ConfigError, match=r"options\.intra_op_thread: unknown onnxruntime"):
        AdaptiveModel.load(bundles[1], runner_options={"intra_op_thread": 1})


# ---------------------------------------------------------------------------------------------
# online latency statistics survive a stall
# ---------------------------------------------------------------------------------------------

KEY = ("FFF", 0, 1)


def _jitter(n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(v) for v in 0.3 + 0.02 * rng.standard_normal(n)]


def test_one_stall_does_not_become_the_tail():
    online = OnlineLatency()
    values = _jitter(300)
    values[3] = 60.0  # a 60 ms preemption among 0.3 ms timings, early on
    for i, v in enumerate(values):
        online.record(KEY, v)
        fence = stall_fence(sorted(values[max(0, i - 255):i + 1]))
        for stat in ("p90", "p95", "p99"):
            assert online.stat(KEY, stat) <= fence, (i, stat)
        if i >= 3:
            assert online.stalls(KEY) == (1 if i < 256 + 3 else 0)
    assert fence < 1.3 and online.stat(KEY, "p95") < 0.4
    assert online.stat(KEY, "mean") == pytest.approx(np.mean(values[-256:]))  # mean: plain


def test_frequent_stalls_and_a_slower_regime_are_the_distribution():
    online = OnlineLatency()
    rng = np.random.default_rng(1)
    for v in _jitter(256):  # 10% of the calls stall: they are the p95
        online.record(KEY, 60.0 if rng.random() < 0.1 else v)
    assert online.stat(KEY, "p95") >= 50.0
    online.clear()
    for v in _jitter(256):
        online.record(KEY, v)
    for i in range(20):  # the segment now takes 1.5 ms (throttling): followed as fast as numpy
        online.record(KEY, 1.5)
        window = (_jitter(256) + [1.5] * (i + 1))[-256:]
        assert online.stat(KEY, "p95") == float(np.percentile(window, 95)), i
    assert online.stat(KEY, "p95") == 1.5


def test_full_window_percentiles_equal_numpy_with_rare_stalls():
    online = OnlineLatency()
    rng = np.random.default_rng(2)
    values = [60.0 if rng.random() < 0.02 else float(rng.lognormal(-1.2, 0.3))
              for _ in range(1500)]
    for i, v in enumerate(values):
        online.record(KEY, v)
        if i >= 255:
            window = values[i - 255:i + 1]
            for stat in ("p50", "p90", "p95", "p99"):
                assert online.stat(KEY, stat) == float(np.percentile(window, float(stat[1:])))


def test_short_window_rules():
    online = OnlineLatency(min_samples=5)
    online.record(KEY, 0.3)
    assert online.stat(KEY, "p95") == 0.3
    online.record(KEY, 60.0)  # below min_samples: the maximum, a lone stall as the fence
    assert online.stat(KEY, "p95") == pytest.approx(max(STALL_FACTOR * 0.3, 0.8))
    online.record(KEY, 60.0)  # two of three: not a lone stall
    assert online.stat(KEY, "p95") == 60.0


# ---------------------------------------------------------------------------------------------
# the deadline after a stall (fake clock)
# ---------------------------------------------------------------------------------------------

class ScriptedExecutor:
    """Wraps the real executor; segment k of call i 'takes' ``script(i, k)`` ms on a FakeClock
    (a call is counted when its segment 0 runs)."""

    def __init__(self, inner, clock: FakeClock, script) -> None:
        self.inner, self.clock, self.script = inner, clock, script
        self.backend, self.target = inner.backend, inner.target
        self.calls = -1

    def run_segment(self, cfg, k, tensors):
        out = self.inner.run_segment(cfg, k, tensors)
        if k == 0:
            self.calls += 1
        self.clock.advance(self.script(self.calls, k))
        return out

    def run_exits(self, x, cfg, upto=None):
        return self.inner.run_exits(x, cfg, upto)


@pytest.mark.parametrize("stall_call, stall_segment", [(1, 0), (2, 1), (5, 2), (40, 1)])
def test_a_stall_does_not_cut_short_or_flag_later_calls(bundles, images, stall_call,
                                                        stall_segment):
    """Segments take 0.3 ms; one of them stalls 60 ms; budget 2 ms. The call that stalls runs
    over (and says so); every later call runs to full depth within the budget, unflagged."""
    real = AdaptiveModel.load(bundles[1], runner_options=THREADS)
    clock = FakeClock()
    ex = ScriptedExecutor(real.executor, clock, lambda i, k: 60.0 if (i, k) == (
        stall_call, stall_segment) else 0.3)
    m = AdaptiveModel(real.bundle, ex, choice=real.choice, clock=clock, latency="online")
    m.predict(images[0])  # a warm-up call, as the example app makes (call 0)
    for i in range(1, 80):
        p = m.predict(images[i % len(images)], budget_ms=2.0, skip_config="FFF")
        if i == stall_call:
            assert p.latency_ms > 2.0 and p.deadline_missed, i  # really ran over
            continue
        assert (p.exit_index, p.deadline_missed, p.stopped_by) == (2, False, "last_exit"), i
        assert p.latency_ms == pytest.approx(0.9)
    for k in range(m.stages):
        assert m.latency.segment_ms("FFF", k, 1, "p95") == pytest.approx(0.3)


def test_queued_latency_values_are_seen_by_every_read():
    """record_later (the batch-1 full-depth path) queues without the lock; any read, and the
    next record_many, applies the queue first, in order, so no figure is stale."""
    import threading

    on = OnlineLatency(window=8)
    v0 = on.version
    on.record_later([(("F", 0, 1), 1.0), (("F", 0, 1), 3.0)])
    assert on.version > v0  # reading the version applies the queue
    assert on.count(("F", 0, 1)) == 2 and on.stat(("F", 0, 1), "p50") == pytest.approx(2.0)
    on.record_later([(("F", 1, 1), 5.0)])
    assert on.keys() == [("F", 0, 1), ("F", 1, 1)]
    on.record_later([(("F", 0, 1), 9.0)])
    on.record_many([(("F", 0, 1), 11.0)])  # after the queued 9.0: the window keeps the order
    assert list(on._data[("F", 0, 1)]) == [1.0, 3.0, 9.0, 11.0]
    # the queue never grows past PENDING_LIMIT
    for i in range(OnlineLatency.PENDING_LIMIT + 5):
        on.record_later([(("G", 0, 1), float(i))])
    assert len(on._pending) < OnlineLatency.PENDING_LIMIT
    # concurrent writers and readers lose nothing that fits the window
    big = OnlineLatency(window=100_000)

    def write(t):
        for i in range(2000):
            big.record_later([((t,), float(i))])
            if i % 97 == 0:
                big.stat((t,), "p95")

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [big.count((t,)) for t in range(4)] == [2000] * 4
