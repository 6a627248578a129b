"""An aarch64 Python sysroot run under qemu-user, to test the runtime on arm64 from an x86-64 host.

``build_sysroot()`` builds it once per machine and caches it: Debian's arm64 ``python3.11``
packages (downloaded with ``apt-get download`` against a private package list, without touching
the system's apt configuration) unpacked with ``dpkg -x``, plus PyPI's aarch64 wheels of numpy,
onnxruntime and click at the versions installed in this interpreter, unzipped into
``<sysroot>/site-packages``. It returns a :class:`Sysroot` that says how to run a Python command
in it (``qemu-aarch64-static -L <sysroot> <sysroot>/usr/bin/python3.11 ...``).

qemu 7.2 hands the guest the host's x86 ``/proc/cpuinfo``, on which onnxruntime's CPU detection
segfaults at import; ``qemu -L`` looks paths up in the sysroot first, so the sysroot carries a
fake ARM (Cortex-A76) ``proc/cpuinfo``.

Cache: ``$ADP_AARCH64_CACHE`` or ``~/.cache/adaptive-depth-pipeline``, one directory per key
(builder version, Debian release, package names, wheel versions). A sysroot is built in a
temporary directory next to it and renamed into place when complete, so an interrupted build is
never reused. Any failed download or check raises :class:`SysrootBuildError` naming the command.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Mapping, Sequence

BUILDER_VERSION = 1
QEMU = "qemu-aarch64-static"
PYTHON_VERSION = "3.11"  # Debian bookworm's python3; the wheels are cp311
# The interpreter and the shared libraries it, its extension modules and the wheels link against.
DEBIAN_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libgcc-s1", "libstdc++6", "libexpat1", "zlib1g", "libffi8", "libssl3",
    "libbz2-1.0", "liblzma5", "libcrypt1", "libuuid1",
)
WHEELS = ("numpy", "onnxruntime", "click")
WHEEL_PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_27_aarch64",
                   "manylinux_2_28_aarch64")
# What a Raspberry Pi 5 class core (Cortex-A76) reports; one processor entry is enough.
FAKE_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

"""
INFO_NAME = "sysroot-info.json"


class SysrootBuildError(RuntimeError):
    """A step of the sysroot build failed; the message holds the command and its output."""


@dataclass(frozen=True)
class Sysroot:
    """A built aarch64 sysroot and how to run its Python under qemu-user."""
    root: Path
    qemu: str

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / f"python{PYTHON_VERSION}"

    @property
    def site_packages(self) -> Path:
        return self.root / "site-packages"

    @property
    def info(self) -> dict:
        """Versions of what the sysroot holds (Debian packages, wheels)."""
        return json.loads((self.root / INFO_NAME).read_text())

    def command(self, *args: str | os.PathLike) -> list[str]:
        """argv running ``python3.11 ARGS`` (aarch64) under qemu."""
        return [self.qemu, "-L", str(self.root), str(self.python), *map(str, args)]

    def env(self, pythonpath: Sequence[str | os.PathLike] = (),
            base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for :meth:`command`: the wheels, then ``pythonpath``, on ``PYTHONPATH``;
        no user site, no host ``PYTHONHOME``/``PYTHONSTARTUP``."""
        env = dict(os.environ if base is None else base)
        for var in ("PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "QEMU_LD_PREFIX"):
            env.pop(var, None)
        env["PYTHONPATH"] = os.pathsep.join([str(self.site_packages), *map(str, pythonpath)])
        env["PYTHONNOUSERSITE"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def run(self, *args: str | os.PathLike, pythonpath: Sequence[str | os.PathLike] = (),
            cwd: str | os.PathLike | None = None, timeout: float = 600,
            extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``python3.11 ARGS`` under qemu, capturing text output (not checked)."""
        env = {**self.env(pythonpath), **(extra_env or {})}
        return subprocess.run(self.command(*args), env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)


def qemu_binary() -> str | None:
    """Path of ``qemu-aarch64-static``, or None when it is not installed."""
    return shutil.which(QEMU)


def default_cache_root() -> Path:
    env = os.environ.get("ADP_AARCH64_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adaptive-depth-pipeline"


def pinned_versions(names: Sequence[str] = WHEELS) -> dict[str, str]:
    """Versions of ``names`` installed in this interpreter (the x86 side of the comparison)."""
    return {n: metadata.version(n) for n in names}


def debian_release() -> str:
    """VERSION_CODENAME of /etc/os-release (e.g. ``bookworm``)."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise SysrootBuildError("/etc/os-release has no VERSION_CODENAME: not a Debian machine?")


def cache_key(versions: Mapping[str, str], release: str) -> str:
    blob = json.dumps([BUILDER_VERSION, release, PYTHON_VERSION, DEBIAN_PACKAGES,
                       sorted(versions.items()), WHEEL_PLATFORMS, FAKE_CPUINFO])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run(cmd: Sequence[str], cwd: Path | None = None, timeout: float = 900) -> str:
    """Run a build command; on failure raise with the exact command and its output."""
    try:
        r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SysrootBuildError(f"command failed: {' '.join(cmd)}\n{exc}") from None
    if r.returncode != 0:
        raise SysrootBuildError(f"command failed (exit {r.returncode}): {' '.join(cmd)}\n"
                                f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r.stdout


def _apt_options(work: Path) -> list[str]:
    """apt options for arm64 with private lists/cache (the system's sources, nothing written
    to the system's apt state)."""
    lists, cache = work / "lists", work / "apt"
    for d in (lists / "partial", cache / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    return ["-oAPT::Architecture=arm64", "-oAPT::Architectures=arm64",
            f"-oDir::State::Lists={lists}", f"-oDir::Cache={cache}",
            "-oDir::State::status=/dev/null", "-oAPT::Sandbox::User=root",
            "-oAcquire::Languages=none", "-q"]


def download_debs(work: Path) -> list[Path]:
    """``apt-get update`` + ``apt-get download`` of DEBIAN_PACKAGES (arm64) into work/debs."""
    opts = _apt_options(work)
    debs = work / "debs"
    debs.mkdir()
    _run(["apt-get", *opts, "update"])
    _run(["apt-get", *opts, "download", *DEBIAN_PACKAGES], cwd=debs)
    found = sorted(debs.glob("*.deb"))
    if len(found) != len(DEBIAN_PACKAGES):
        raise SysrootBuildError(f"apt-get download gave {len(found)} packages for "
                                f"{len(DEBIAN_PACKAGES)} names: {[p.name for p in found]}")
    return found


def unpack_debs(debs: Sequence[Path], root: Path) -> dict[str, str]:
    """``dpkg -x`` every package into ``root``; returns {package: version}."""
    versions = {}
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(root)])
        name, version = _run(["dpkg-deb", "-W", "--showformat=${Package} ${Version}",
                              str(deb)]).split()
        versions[name] = version
    return versions


def download_wheels(work: Path, versions: Mapping[str, str]) -> list[Path]:
    """``pip download`` the cp311 aarch64 wheels of ``versions`` (no dependencies)."""
    dest = work / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
           "--only-binary=:all:", "--no-deps", "--implementation", "cp",
           "--python-version", PYTHON_VERSION, "-d", str(dest)]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    _run(cmd + [f"{n}=={v}" for n, v in versions.items()])
    found = sorted(dest.glob("*.whl"))
    if len(found) != len(versions):
        raise SysrootBuildError(f"pip download gave {[p.name for p in found]} for {dict(versions)}")
    return found


def unpack_wheels(wheels: Sequence[Path], site_packages: Path) -> None:
    """Unzip the wheels (a wheel is a zip of its site-packages content), keeping exec bits."""
    site_packages.mkdir(parents=True)
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                path = Path(z.extract(info, site_packages))
                mode = info.external_attr >> 16
                if mode and not info.is_dir():
                    path.chmod(mode & 0o777 | 0o400)


def smoke_check(sysroot: Sysroot) -> dict:
    """Import numpy, onnxruntime and click in the sysroot; must report machine aarch64."""
    code = ("import json, platform, numpy, onnxruntime, click; print(json.dumps({'machine': "
            "platform.machine(), 'python': platform.python_version(), 'numpy': numpy.__version__,"
            " 'onnxruntime': onnxruntime.__version__, 'providers': "
            "onnxruntime.get_available_providers()}))")
    # no .pyc written here: they would carry the temporary build path
    r = sysroot.run("-c", code, timeout=300, extra_env={"PYTHONDONTWRITEBYTECODE": "1"})
    if r.returncode != 0:
        raise SysrootBuildError(f"smoke check failed (exit {r.returncode}): "
                                f"{' '.join(sysroot.command('-c', code))}\n{r.stdout}\n{r.stderr}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    if got["machine"] != "aarch64":
        raise SysrootBuildError(f"the sysroot's python reports machine {got['machine']!r}")
    return got


def _remove_stale_builds(cache_root: Path, max_age_s: float = 6 * 3600) -> None:
    """Remove temporary build directories left by killed builds."""
    now = time.time()
    for p in cache_root.glob(".build-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def build_sysroot(cache_root: Path | None = None, versions: Mapping[str, str] | None = None,
                  log=None) -> Sysroot:
    """The cached sysroot for ``versions`` (default: this interpreter's numpy, onnxruntime,
    click), building it first if needed (about a minute, mostly downloads)."""
    qemu = qemu_binary()
    if qemu is None:
        raise SysrootBuildError(f"{QEMU} is not installed (Debian package qemu-user-static)")
    versions = dict(versions or pinned_versions())
    cache_root = Path(cache_root or default_cache_root())
    dest = cache_root / f"aarch64-sysroot-{cache_key(versions, debian_release())}"
    if dest.is_dir():
        return Sysroot(dest, qemu)
    cache_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(cache_root)
    work = Path(tempfile.mkdtemp(prefix=f".build-{dest.name}-", dir=cache_root))
    say = log or (lambda msg: None)
    try:
        root = work / "root"
        say(f"aarch64 sysroot: downloading Debian arm64 packages into {work}")
        debs = unpack_debs(download_debs(work), root)
        say("aarch64 sysroot: downloading aarch64 wheels " + ", ".join(
            f"{n}=={v}" for n, v in versions.items()))
        unpack_wheels(download_wheels(work, versions), root / "site-packages")
        (root / "proc").mkdir()
        (root / "proc" / "cpuinfo").write_text(FAKE_CPUINFO)
        checked = smoke_check(Sysroot(root, qemu))
        info = {"debian_release": debian_release(), "debian_packages": debs, "wheels": versions,
                "checked": checked, "host": platform.machine(),
                "qemu": _run([qemu, "--version"]).splitlines()[0]}
        (root / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        try:
            root.rename(dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent build that finished first
                raise
        say(f"aarch64 sysroot: ready at {dest}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Sysroot(dest, qemu)


if __name__ == "__main__":  # python tests/aarch64_sysroot.py: build (or find) and describe it
    s = build_sysroot(log=print)
    print(json.dumps({"root": str(s.root), "command": s.command("-c", "..."), **s.info}, indent=2))
