"""Tests for devices/ (profiles, registry, host detection, roofline estimates) and the
``pipeline devices`` CLI.  Fast (< 10 s), no GPU, no torch, no TVM needed."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import devices
from devices import host as dhost
from devices.estimate import estimate, estimate_bytes_moved, estimate_latency_ms
from devices.profile import ProfileError, ProfileNotFoundError, validate_profile
from devices.registry import list_profiles, load_profile, shipped_profile_dir
from pipeline.devices_cli import devices as devices_cli

ROOT = Path(__file__).resolve().parents[1]
_REAL_NVIDIA_GPUS = dhost.nvidia_gpus.__wrapped__  # uncached, before the fixture patches it
SHIPPED = {
    "jetson-orin-nano": ["tensorrt", "onnxruntime", "tvm"],
    "jetson-orin-nx": ["tensorrt", "onnxruntime", "tvm"],
    "jetson-agx-orin": ["tensorrt", "onnxruntime", "tvm"],
    "jetson-xavier-nx": ["tensorrt", "onnxruntime", "tvm"],
    "raspberry-pi-5": ["onnxruntime", "tvm"],
    "raspberry-pi-4": ["onnxruntime", "tvm"],
    "x86-host": ["onnxruntime", "tvm"],
    "nvidia-gpu": ["tensorrt", "onnxruntime", "tvm"],
}


@pytest.fixture(autouse=True)
def _isolate_user_dirs(monkeypatch, tmp_path_factory):
    """Never read the developer's real ~/.config profiles; no nvidia-smi surprises."""
    empty = tmp_path_factory.mktemp("no-user-profiles")
    monkeypatch.setenv("PIPELINE_PROFILE_DIR", str(empty))
    monkeypatch.setattr(dhost, "nvidia_gpus", lambda timeout_s=5.0: ())


# A complete, valid user profile; tests break one field at a time.
VALID = """
schema_version = 1
name = "my-board"
aliases = ["mine"]
description = "test board"
arch = "aarch64"
latency_budget_ms = 40.0

[hardware]
cpu_model = "Arm Cortex-A76"
cpu_cores = 4
memory_gb = 4
isa = ["neon"]

[peak]
cpu_fp32_gflops = 100.0
memory_bandwidth_gbs = 10.0

[[backends]]
name = "onnxruntime"
[backends.options]
providers = ["CPUExecutionProvider"]
intra_op_threads = 4

[[backends]]
name = "tvm"
[backends.options.target]
kind = "llvm"
mtriple = "aarch64-linux-gnu"
mcpu = "cortex-a76"
mattr = ["+neon"]
"""


def write(tmp_path: Path, text: str, name: str = "my-board.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------ shipped profiles


def test_every_shipped_profile_loads_and_validates():
    files = sorted(p.stem for p in shipped_profile_dir().glob("*.toml"))
    assert files == sorted(SHIPPED)
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) == set(SHIPPED)
    for name, order in SHIPPED.items():
        p = profiles[name]
        assert p.backend_order() == order, name
        assert p.latency_budget_ms > 0
        assert p.arch in ("x86_64", "aarch64")
        assert p.peak.cpu_fp32_gflops > 0 and p.peak.memory_bandwidth_gbs > 0
        assert p.source == f"builtin:{name}.toml"
        assert p.backend("tvm").options["target"]["kind"] in ("llvm", "cuda")
        assert p.backend("nope") is None
        # to_dict is JSON-serialisable and round-trips through validation
        d = json.loads(json.dumps(p.to_dict()))
        assert validate_profile(d) == p


def test_jetson_profiles_content():
    nano = load_profile("jetson-orin-nano")
    assert nano.hardware.cpu_cores == 6 and nano.hardware.cpu_core_type == "cortex-a78ae"
    assert nano.hardware.gpu_compute_capability == "8.7" and nano.hardware.cuda_arch == "sm_87"
    assert nano.hardware.gpu_cuda_cores == 1024 and nano.hardware.dla_cores == 0
    assert nano.peak.memory_bandwidth_gbs == 68.0
    assert nano.software.tensorrt_major == 10
    target = nano.tvm_target()
    assert target["kind"] == "cuda" and target["arch"] == "sm_87"
    # TVM's own nvidia/jetson-orin-nano tag says "carmel"; Orin is Cortex-A78AE.
    assert target["host"]["mcpu"] == "cortex-a78ae"
    trt = nano.backend("tensorrt").options
    assert set(trt) >= {"precision", "workspace_mb", "min_batch", "opt_batch", "max_batch",
                        "builder_optimization_level", "timing_cache"}
    assert "dla_core" not in trt
    assert load_profile("jetson-agx-orin").hardware.dla_cores == 2
    xavier = load_profile("jetson-xavier-nx")
    assert xavier.tvm_target()["arch"] == "sm_72" and xavier.software.tensorrt_major == 8
    for name in ("raspberry-pi-4", "raspberry-pi-5"):
        p = load_profile(name)
        assert not p.hardware.has_gpu
        assert p.backend("onnxruntime").options["providers"] == ["CPUExecutionProvider"]


def test_aliases_resolve():
    assert load_profile("jetson").name == "jetson-orin-nano"
    assert load_profile("JETSON").name == "jetson-orin-nano"
    assert load_profile("host").name == "x86-host"
    assert load_profile("rpi5").name == "raspberry-pi-5"


def test_unknown_name_lists_available_names_and_aliases():
    with pytest.raises(ProfileNotFoundError) as ei:
        load_profile("jetson-tx9")
    msg = str(ei.value)
    assert "jetson-tx9" in msg and "\n" not in msg
    for name in SHIPPED:
        assert name in msg
    assert "jetson -> jetson-orin-nano" in msg and "host -> x86-host" in msg


# ---------------------------------------------------------------- host detection


def test_x86_host_detects_this_machine():
    p = load_profile("host")
    assert p.hardware.cpu_cores == os.cpu_count()
    assert p.arch == dhost.machine_arch()
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert p.arch == "x86_64"
        assert p.tvm_target()["mtriple"] == "x86_64-linux-gnu"
        assert p.tvm_target()["mcpu"].startswith("x86-64")
        assert "sse2" in p.hardware.isa
    assert set(p.hardware.isa) == set(dhost.isa_flags())
    assert p.tvm_target()["num-cores"] >= 1
    assert "hardware.cpu_cores" in p.detected["filled"]
    assert p.is_host_compatible()  # the host profile always runs here
    assert p.peak.cpu_fp32_gflops > 0


def test_fingerprint_and_compatibility():
    fp = dhost.fingerprint()
    for key in ("arch", "cpu_model", "cpu_cores", "isa", "memory_gb", "python", "numpy", "onnxruntime", "tvm"):
        assert key in fp
    assert fp["cpu_cores"] == os.cpu_count()
    assert fp["python"] == platform.python_version()
    json.dumps(fp)
    nano = load_profile("jetson")
    assert nano.is_host_compatible({"arch": "aarch64", "isa": ["neon", "fp16", "dotprod", "sve"]})
    assert not nano.is_host_compatible({"arch": "aarch64", "isa": ["neon"]})  # e.g. a Pi 4
    assert not nano.is_host_compatible({"arch": "x86_64", "isa": ["avx2"]})
    assert not nano.is_host_compatible(
        {"arch": "aarch64", "isa": ["neon", "fp16", "dotprod"], "gpus": [{"compute_capability": "7.2"}]},
        check_gpu=True,
    )
    assert dhost.guess_profile({"board": "NVIDIA Jetson Orin Nano Developer Kit"}) == "jetson-orin-nano"
    assert dhost.guess_profile({"board": "Raspberry Pi 5 Model B Rev 1.0"}) == "raspberry-pi-5"


def test_user_profile_can_override_detection(tmp_path):
    path = write(tmp_path, """
        name = "small-host"
        extends = "x86-host"
        [hardware]
        cpu_cores = 1
    """, "small-host.toml")
    p = load_profile(str(path))
    assert p.hardware.cpu_cores == 1 and p.aliases == ()
    assert "hardware.cpu_cores" not in p.detected["filled"]
    assert p.extends == "x86-host"


# ----------------------------------------------------------------------- nvidia-gpu


@pytest.mark.skipif(sys.platform == "win32", reason="shell script stand-in for nvidia-smi")
def test_nvidia_smi_parsing(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in *compute_cap*) echo "NVIDIA H100 80GB HBM3, 9.0, 81559";;'
        ' *) echo "NVIDIA H100 80GB HBM3, 81559";; esac\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert _REAL_NVIDIA_GPUS() == (
        {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_gb": 79.6},
    )
    fake.write_text("#!/bin/sh\nexit 9\n")  # broken driver: no GPUs, no exception
    assert _REAL_NVIDIA_GPUS() == ()



def test_nvidia_gpu_default_and_selected_compute_capability(monkeypatch):
    p = load_profile("nvidia-gpu")
    assert p.hardware.gpu_compute_capability == "9.0" and p.tvm_target()["arch"] == "sm_90"
    assert p.detected["source"] == "default"
    for spec in ("nvidia-gpu:sm_86", "nvidia-gpu:8.6", "gpu:86"):
        q = load_profile(spec)
        assert q.hardware.gpu_compute_capability == "8.6", spec
        assert q.tvm_target()["arch"] == "sm_86"
        assert q.hardware.gpu_name == "NVIDIA A10"
    q = load_profile("nvidia-gpu", compute_capability="7.5")
    assert q.peak.gpu_memory_bandwidth_gbs == 320.0 and q.hardware.gpu_arch == "turing"
    # unknown generation: peak numbers borrowed from the nearest lower variant, and said so
    q = load_profile("nvidia-gpu:sm_120")
    assert q.tvm_target()["arch"] == "sm_120" and q.detected["peak_from"] == "sm_90"
    assert q.hardware.gpu_arch == "blackwell" and q.hardware.gpu_cuda_cores is None
    with pytest.raises(ProfileError, match="invalid compute capability"):
        load_profile("nvidia-gpu:ampere")
    with pytest.raises(ProfileError, match="detect = 'nvidia-gpu'"):
        load_profile("jetson", compute_capability="8.7")
    # detection through nvidia-smi wins over the default
    monkeypatch.setattr(
        dhost, "nvidia_gpus",
        lambda timeout_s=5.0: ({"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "memory_gb": 24.0},),
    )
    q = load_profile("nvidia-gpu")
    assert q.hardware.gpu_compute_capability == "8.9" and q.hardware.gpu_name == "NVIDIA GeForce RTX 4090"
    assert q.detected["source"] == "nvidia-smi"


# ------------------------------------------------------------------ broken profiles


def _error(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as ei:
        load_profile(str(path))
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "old,new,expected",
    [
        # wrong type
        ('intra_op_threads = 4', 'intra_op_threads = "4"',
         "my-board.toml: backends[0].options.intra_op_threads: expected an integer, got string"),
        ('cpu_cores = 4', 'cpu_cores = 4.5', "my-board.toml: hardware.cpu_cores: expected an integer, got number"),
        ('cpu_cores = 4', 'cpu_cores = true', "hardware.cpu_cores: expected an integer, got boolean"),
        ('mattr = ["+neon"]', 'mattr = "+neon"', "backends[1].options.target.mattr: expected an array, got string"),
        ('mattr = ["+neon"]', 'mattr = ["+neon", 3]', "backends[1].options.target.mattr[1]: expected a string, got integer"),
        # missing required field
        ('cpu_cores = 4\n', '', "my-board.toml: hardware.cpu_cores: missing required field"),
        ('memory_bandwidth_gbs = 10.0\n', '', "peak.memory_bandwidth_gbs: missing required field"),
        ('latency_budget_ms = 40.0\n', '', "latency_budget_ms: missing required field"),
        # unknown backend name
        ('name = "tvm"', 'name = "openvino"',
         "my-board.toml: backends[1].name: unknown backend 'openvino' (expected one of: "),
        # negative budget
        ('latency_budget_ms = 40.0', 'latency_budget_ms = -5',
         "my-board.toml: latency_budget_ms: expected a number > 0, got -5"),
        # other field-level checks
        ('intra_op_threads = 4', 'intra_op_threads = 4\nthreads = 2',
         "backends[0].options.threads: unknown key (allowed: graph_optimization_level, inter_op_threads,"),
        ('arch = "aarch64"', 'arch = "riscv64"', "arch: expected one of 'x86_64', 'aarch64', got 'riscv64'"),
        ('mtriple = "aarch64-linux-gnu"', 'mtriple = "x86_64-linux-gnu"',
         "backends[1].options.target.mtriple: 'x86_64-linux-gnu' does not match arch 'aarch64'"),
        ('providers = ["CPUExecutionProvider"]', 'providers = ["CUDAExecutionProvider"]',
         "backends[0].options.providers[0]: CUDAExecutionProvider needs a GPU"),
        ('name = "tvm"', 'name = "onnxruntime"', "backends[1].name: backend 'onnxruntime' listed twice"),
    ],
)
def test_broken_profile_names_the_field(tmp_path, old, new, expected):
    assert old in VALID
    msg = _error(tmp_path, VALID.replace(old, new, 1))
    assert expected in msg


def test_tensorrt_option_checks(tmp_path):
    base = VALID.replace('arch = "aarch64"', 'arch = "aarch64"\n').replace(
        'isa = ["neon"]', 'isa = ["neon"]\ngpu_compute_capability = "8.7"\ndla_cores = 1'
    ).replace("memory_bandwidth_gbs = 10.0", "memory_bandwidth_gbs = 10.0\ngpu_fp32_gflops = 1000.0\ndla_int8_tops = 5.0")
    trt = '\n[[backends]]\nname = "tensorrt"\n[backends.options]\n'
    assert load_profile(str(write(tmp_path, base + trt + 'precision = "int8"\ndla_core = 0\n'))).backend(
        "tensorrt").options["dla_core"] == 0
    assert "backends[2].options.precision: expected one of 'fp32', 'fp16', 'int8', 'best', got 'fp8'" in _error(
        tmp_path, base + trt + 'precision = "fp8"\n')
    assert "backends[2].options.dla_core: DLA core 1 does not exist" in _error(tmp_path, base + trt + "dla_core = 1\n")
    assert "backends[2].options.dla_core: DLA runs fp16 or int8 only" in _error(
        tmp_path, base + trt + 'precision = "fp32"\ndla_core = 0\n')
    assert "backends[2].options.opt_batch: need min_batch <= opt_batch <= max_batch" in _error(
        tmp_path, base + trt + "min_batch = 4\nopt_batch = 2\nmax_batch = 8\n")
    assert "backends[2].options.timing_cache: expected true or false, got string" in _error(
        tmp_path, base + trt + 'timing_cache = "yes"\n')
    assert "backends[2].options.builder_optimization_level: expected an integer <= 5, got 9" in _error(
        tmp_path, base + trt + "builder_optimization_level = 9\n")
    # tensorrt without a GPU
    assert "backends[2].name: tensorrt needs a GPU" in _error(tmp_path, VALID + trt)


def test_invalid_toml_and_missing_file(tmp_path):
    path = write(tmp_path, "name = \n")
    with pytest.raises(ProfileError, match="invalid TOML"):
        load_profile(str(path))
    with pytest.raises(ProfileNotFoundError, match="not found"):
        load_profile(str(tmp_path / "nope.toml"))


# ----------------------------------------------------------------- user profiles


def test_user_profile_by_path(tmp_path):
    p = load_profile(str(write(tmp_path, VALID)))
    assert p.name == "my-board" and p.aliases == ("mine",)
    assert p.source == str((tmp_path / "my-board.toml").resolve())
    assert p.backend_order() == ["onnxruntime", "tvm"]


def test_user_profile_via_env_dir(tmp_path, monkeypatch):
    write(tmp_path, VALID)
    monkeypatch.setenv("PIPELINE_PROFILE_DIR", str(tmp_path))
    assert load_profile("my-board").name == "my-board"
    assert load_profile("mine").name == "my-board"
    names = [p.name for p in list_profiles()]
    assert "my-board" in names and set(SHIPPED) <= set(names)
    # explicit user_dirs argument works too
    monkeypatch.delenv("PIPELINE_PROFILE_DIR")
    assert load_profile("mine", user_dirs=[tmp_path]).name == "my-board"


def test_extends_deep_merges_a_shipped_profile(tmp_path):
    path = write(tmp_path, """
        name = "orin-nano-super"
        extends = "jetson-orin-nano"
        description = "Orin Nano in MAXN SUPER mode"
        [peak]
        memory_bandwidth_gbs = 102.0
        [[backends]]
        name = "tensorrt"
        [backends.options]
        precision = "int8"
        [[backends]]
        name = "onnxruntime"
    """, "super.toml")
    p = load_profile(str(path))
    assert p.peak.memory_bandwidth_gbs == 102.0
    assert p.peak.gpu_fp32_gflops == 1280.0  # inherited
    assert p.hardware.cpu_core_type == "cortex-a78ae"
    assert p.backend_order() == ["tensorrt", "onnxruntime"]  # child list gives order
    assert p.backend("tensorrt").options["precision"] == "int8"
    assert p.backend("tensorrt").options["workspace_mb"] == 1024  # merged by name
    assert p.aliases == ()  # aliases are not inherited


def test_user_profile_shadows_and_extends_shipped_one_of_same_name(tmp_path, monkeypatch):
    write(tmp_path, """
        name = "jetson-orin-nano"
        aliases = ["jetson"]
        extends = "jetson-orin-nano"
        latency_budget_ms = 20.0
    """, "jetson-orin-nano.toml")
    monkeypatch.setenv("PIPELINE_PROFILE_DIR", str(tmp_path))
    p = load_profile("jetson")
    assert p.latency_budget_ms == 20.0 and p.hardware.gpu_cuda_cores == 1024
    assert p.source == str((tmp_path / "jetson-orin-nano.toml").resolve())
    assert [q.latency_budget_ms for q in list_profiles() if q.name == "jetson-orin-nano"] == [20.0]


def test_extends_errors(tmp_path):
    a = write(tmp_path, 'name = "a"\nextends = "b.toml"\n', "a.toml")
    write(tmp_path, 'name = "b"\nextends = "a.toml"\n', "b.toml")
    with pytest.raises(ProfileError, match="circular extends"):
        load_profile(str(a))
    c = write(tmp_path, 'name = "c"\nextends = "no-such-board"\n', "c.toml")
    with pytest.raises(ProfileError, match=r"c\.toml: extends: unknown profile 'no-such-board'"):
        load_profile(str(c))


# ----------------------------------------------------------------------- estimates


def test_roofline_grows_with_macs_and_switches_bound():
    pi = load_profile("raspberry-pi-4")
    small = estimate(1_000_000, 1_000, pi, "onnxruntime")
    big = estimate(1_000_000_000, 1_000, pi, "onnxruntime")
    assert big.latency_ms > small.latency_ms
    assert big.bound == "compute" and big.kind == "estimated"
    # compute time = 2 * MACs / (peak * efficiency)
    assert big.compute_ms == pytest.approx(2e9 / (115.2e9 * big.compute_efficiency) * 1e3)
    # few MACs, many bytes -> memory-bound; time = bytes / (bandwidth * efficiency)
    mem = estimate(1_000, 100_000_000, pi, "onnxruntime")
    assert mem.bound == "memory"
    assert mem.memory_ms == pytest.approx(1e8 / (12.8e9 * mem.memory_efficiency) * 1e3)
    assert mem.latency_ms == pytest.approx(mem.memory_ms + mem.overhead_ms)
    assert estimate_latency_ms(1_000_000_000, 1_000, pi, "onnxruntime") == big.latency_ms
    assert any("not measured" in a for a in big.assumptions)
    json.dumps(big.to_dict())


def test_roofline_units_precisions_and_batch():
    nano = load_profile("jetson")
    trt = estimate(1_000_000_000, 10_000, nano, "tensorrt")
    assert (trt.unit, trt.precision) == ("gpu", "fp16")
    assert estimate(1_000_000_000, 10_000, nano, "onnxruntime").unit == "gpu"
    assert estimate(1_000_000_000, 10_000, nano, "tensorrt", precision="fp32").latency_ms > trt.latency_ms
    # the GPU is much faster than the CPU on compute-bound work
    cpu = estimate(1_000_000_000, 10_000, nano, "onnxruntime", unit="cpu")
    assert cpu.unit == "cpu" and cpu.latency_ms > 5 * trt.latency_ms
    agx = load_profile("jetson-agx-orin")
    dla = estimate(1_000_000_000, 10_000, agx, "tensorrt", unit="dla", precision="int8")
    assert dla.unit == "dla" and dla.peak_gflops == 26250.0
    with pytest.raises(ValueError, match="no DLA"):
        estimate(1, 1, nano, "tensorrt", unit="dla")
    with pytest.raises(ValueError, match="no GPU"):
        estimate(1, 1, load_profile("pi5"), "tensorrt")
    # batch: compute scales, shared weight bytes do not
    b1 = estimate(10_000, 50_000_000, nano, "tensorrt", shared_bytes=40_000_000)
    b8 = estimate(10_000, 50_000_000, nano, "tensorrt", batch=8, shared_bytes=40_000_000)
    assert b8.memory_ms == pytest.approx(b1.memory_ms * (40 + 8 * 10) / 50)
    assert estimate_bytes_moved(1000, 500, dtype_bytes=2) == (1000 + 2 * 500) * 2


@settings(max_examples=60, deadline=None)
@given(
    macs=st.integers(0, 10**12),
    extra=st.integers(0, 10**12),
    nbytes=st.integers(0, 10**10),
    backend=st.sampled_from(["onnxruntime", "tvm"]),
)
def test_roofline_is_monotone_in_macs(macs, extra, nbytes, backend):
    p = _pi5()
    a = estimate(macs, nbytes, p, backend)
    b = estimate(macs + extra, nbytes, p, backend)
    assert b.latency_ms >= a.latency_ms >= a.overhead_ms > 0
    assert a.latency_ms == pytest.approx(max(a.compute_ms, a.memory_ms) + a.overhead_ms)


@functools.lru_cache(maxsize=1)
def _pi5():
    return load_profile("raspberry-pi-5", user_dirs=[])


# ---------------------------------------------------------------------------- CLI


def test_cli_list_table_and_json():
    r = CliRunner().invoke(devices_cli, [])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["NAME", "ALIASES", "ARCH", "BACKENDS", "BUDGET_MS"]
    for name in SHIPPED:
        assert any(line.startswith(name + " ") for line in lines), name
    assert "tensorrt > onnxruntime > tvm" in r.output
    r = CliRunner().invoke(devices_cli, ["--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert {d["name"] for d in data} == set(SHIPPED)
    assert all(d["backends"] and d["latency_budget_ms"] > 0 for d in data)


def test_cli_show_jetson():
    r = CliRunner().invoke(devices_cli, ["show", "jetson"])
    assert r.exit_code == 0, r.output
    assert "jetson-orin-nano" in r.output and "cortex-a78ae" in r.output and "tensorrt" in r.output
    r = CliRunner().invoke(devices_cli, ["show", "jetson", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["name"] == "jetson-orin-nano"
    assert [b["name"] for b in data["backends"]] == ["tensorrt", "onnxruntime", "tvm"]
    r = CliRunner().invoke(devices_cli, ["show", "nvidia-gpu", "--cc", "8.6", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["hardware"]["gpu_compute_capability"] == "8.6"


def test_cli_show_user_profile(tmp_path):
    path = write(tmp_path, VALID)
    r = CliRunner().invoke(devices_cli, ["show", "--profile", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["name"] == "my-board"
    r = CliRunner().invoke(devices_cli, ["show", "mine", "--profile", str(tmp_path)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(devices_cli, ["--profile", str(path)])
    assert r.exit_code == 0 and "my-board" in r.output


@pytest.mark.parametrize(
    "args",
    [["show", "no-such-device"], ["show", "nvidia-gpu", "--cc", "banana"], ["show", "--profile", "/nonexistent.toml"]],
)
def test_cli_errors_are_one_line_without_traceback(args):
    r = CliRunner().invoke(devices_cli, args)
    assert r.exit_code != 0
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)
    out = r.output.strip()
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1 and out.startswith("Error: ")


def test_cli_broken_user_profile_is_one_line(tmp_path):
    path = write(tmp_path, VALID.replace("latency_budget_ms = 40.0", "latency_budget_ms = -1"))
    r = CliRunner().invoke(devices_cli, ["show", str(path)])
    assert r.exit_code != 0
    assert r.output.strip() == f"Error: {path.resolve()}: latency_budget_ms: expected a number > 0, got -1"


def test_cli_host_and_estimate():
    r = CliRunner().invoke(devices_cli, ["host", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["cpu_cores"] == os.cpu_count()
    r = CliRunner().invoke(devices_cli, ["estimate", "pi4", "--macs", "300000000", "--bytes", "20000000"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ESTIMATED ")
    r = CliRunner().invoke(devices_cli, ["estimate", "jetson", "--macs", "1", "--bytes", "1", "--backend", "tvm", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["kind"] == "estimated"


# ------------------------------------------------------------- import hygiene


def test_importing_devices_does_not_import_torch_or_build_code():
    code = textwrap.dedent("""
        import sys
        import devices, devices.profile, devices.registry, devices.host, devices.estimate
        devices.list_profiles()
        devices.fingerprint()
        p = devices.load_profile("jetson")
        devices.estimate_latency_ms(10**9, 10**6, p, "tensorrt")
        bad = sorted(m for m in sys.modules
                     if m.split(".")[0] in ("torch", "tvm", "train", "export", "tensorrt", "onnx"))
        print(bad)
        sys.exit(1 if bad else 0)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_devices_sources_never_import_forbidden_packages():
    import ast

    for path in (ROOT / "devices").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("torch", "tvm", "train", "export"), f"{path}: imports {n}"


@pytest.mark.skipif(not os.environ.get("DEVICES_TEST_TVM"), reason="set DEVICES_TEST_TVM=1 (imports tvm: slow)")
def test_tvm_accepts_every_target():  # pragma: no cover - opt-in
    code = textwrap.dedent("""
        import devices
        from tvm.target import Target, codegen
        profiles = devices.list_profiles() + [devices.load_profile("nvidia-gpu:" + c) for c in ("7.5", "8.6", "8.9")]
        for p in profiles:
            t = Target(p.tvm_target())
            host = t.host or t
            cpu = str(host.attrs["mcpu"])
            assert codegen.llvm_is_valid_cpu(cpu, str(host.attrs["mtriple"])), (p.name, cpu)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
