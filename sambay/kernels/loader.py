"""Builds the native kernels (csrc/) once per CPU, compiler, flags and sources, and loads them.

The kernels are compiled with -march=native, so a build is only right for the machine and the
sources it was made from. Each build therefore has its own folder,
$SAMBAY_CACHE/kernels/sambay_kernels-<key> (~/.cache/sambay by default), where the key hashes

- the CPU's instruction-set features (a build for AVX-512 dies with SIGILL on an AVX2 host, as a
  shared home directory or a moved container would otherwise load it),
- the compiler, its flags, and the torch and Python versions the extension is compiled against,
- the bytes of every source and header file.

Two checkouts with the same sources share one build, and neither rebuilds the other's: an existing
build's shared library is imported directly, so nothing looks at the paths it was compiled from.
Each build folder holds a copy of the sources it compiled and `manifest.json`, written last, which
says what the build is for; a build whose manifest names other CPU features is never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sambay.errors import SambayError
from sambay.files import atomic_write_text, read_json

CSRC = Path(__file__).parent / "csrc"
NAME = "sambay_kernels"
MANIFEST = "manifest.json"
FEATURES_ENV = "SAMBAY_CPU_FEATURES"  # comma-separated: stands in for this CPU's features (tests)

# The instruction-set extensions a compiler may use under -march=native (x86 /proc/cpuinfo `flags`,
# Arm `Features`). Only these enter the key: a kernel or microcode update that adds a mitigation
# flag must not cost a rebuild.
ISA_FEATURES = frozenset("""
    sse3 ssse3 sse4_1 sse4_2 sse4a popcnt abm movbe adx aes pclmulqdq sha_ni gfni vaes vpclmulqdq
    avx avx2 fma fma4 xop tbm f16c bmi1 bmi2 avx_vnni avx_vnni_int8 avx_ifma avx_ne_convert
    avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma avx512vbmi avx512_vbmi2 avx512_vnni
    avx512_bitalg avx512_vpopcntdq avx512_bf16 avx512_fp16 avx512_vp2intersect
    amx_tile amx_int8 amx_bf16 amx_fp16 amx_complex
    fp asimd asimdhp asimddp asimdfhm asimdrdm atomics sve sve2 svebf16 svei8mm bf16 i8mm
""".split())


@dataclass(frozen=True)
class Sources:
    """The bytes of csrc/'s .cpp and .h files, read once: what is hashed is what gets compiled."""

    files: dict[str, bytes]  # file name -> content

    @classmethod
    def read(cls, folder: Path = CSRC) -> Sources:
        return cls({p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".cpp", ".h")})

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}\0{len(self.files[name])}\0".encode())
            h.update(self.files[name])
        return h.hexdigest()

    def compiled(self) -> list[str]:
        """The translation units, in name order (headers come along through #include)."""
        return sorted(n for n in self.files if n.endswith(".cpp"))


def cpu_features(cpuinfo: str | None = None) -> tuple[str, ...]:
    """This CPU's instruction-set features (sorted), from /proc/cpuinfo where there is one, else
    torch's view of the CPU; $SAMBAY_CPU_FEATURES (comma-separated) stands in for them."""
    fake = os.environ.get(FEATURES_ENV)
    if fake is not None:
        return tuple(sorted({f.strip() for f in fake.split(",") if f.strip()}))
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    found = sorted(flags & ISA_FEATURES)
    if not found:  # no /proc/cpuinfo (macOS, Windows): torch's dispatch level of this CPU
        found = [f"torch:{torch.backends.cpu.get_cpu_capability()}"]
    return (platform.machine(), *found)


def compile_flags(target: str = sys.platform) -> list[str]:
    """Reassociation lets the compiler vectorize the dot products; unlike -ffast-math it keeps
    infinities, which the attention kernel's masking relies on. -fopenmp makes at::parallel_for (an
    inline OpenMP pragma) actually run on torch's threads: without it the kernels ran on one thread.
    Not linked: the symbols resolve to torch's own libgomp."""
    if target == "win32":
        return ["/O2"]
    flags = ["-O3", "-march=native", "-fno-math-errno", "-funsafe-math-optimizations", "-fno-finite-math-only"]
    return flags + (["-fopenmp"] if target.startswith("linux") else [])


def compiler_version() -> str:
    """The first line of `$CXX --version` (c++ by default, as torch's builder runs it); empty if
    there is no such compiler (the build then fails and says so)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{cxx}: {out.strip().splitlines()[0] if out.strip() else ''}"


def build_key(*, features: Sequence[str] | None = None, flags: Sequence[str] | None = None,
              sources: Sources | None = None, compiler: str | None = None) -> dict:
    """The manifest of the build this machine needs: what it is for, and `key`, a short hash of all
    of it that names the build's folder and module. Each part defaults to this machine's."""
    manifest = {
        "features": list(cpu_features() if features is None else features),
        "flags": list(compile_flags() if flags is None else flags),
        "compiler": compiler_version() if compiler is None else compiler,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "sources": (sources or Sources.read()).digest(),
    }
    manifest["key"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return manifest


def cache_root() -> Path:
    """$SAMBAY_CACHE/kernels (~/.cache/sambay/kernels): the parent of every build's folder."""
    return Path(os.environ.get("SAMBAY_CACHE", Path.home() / ".cache" / "sambay")) / "kernels"


def build_dir(manifest: dict | None = None) -> Path:
    """The folder of the build `manifest` describes (this machine's by default)."""
    return cache_root() / f"{NAME}-{(manifest or build_key())['key']}"


def module_name(manifest: dict) -> str:
    return f"{NAME}_{manifest['key']}"  # one per key: two builds can live in one process


def why_not_loadable(build: Path, manifest: dict) -> str | None:
    """Why the build folder cannot be loaded as the build `manifest` describes (None: it can)."""
    try:
        found = read_json(build / MANIFEST)
    except SambayError:
        return "its build manifest is damaged"
    if found is None:
        return ("no build for this CPU/compiler/sources yet" if not build.exists()
                else "an earlier build there did not finish")
    if found.get("features") != manifest["features"]:
        return f"the build there is for other CPU features ({', '.join(found.get('features') or [])})"
    if found != manifest:
        return "the build there is for another compiler, flags or sources"
    if not (build / f"{module_name(manifest)}{_lib_suffix()}").is_file():
        return "the build there has no library"
    return None


def load_native(*, sources: Sources | None = None, features: Sequence[str] | None = None,
                verbose: bool = False):
    """(module, None) with the kernels built for this machine, building them first if needed, or
    (None, error) where they cannot be had: SAMBAY_NATIVE=0, no compiler, a failed build. Prints on
    stderr for every build its reason and its progress; nothing when a build exists."""
    if os.environ.get("SAMBAY_NATIVE", "1") == "0":
        return None, "disabled by SAMBAY_NATIVE=0"
    try:
        sources = sources or Sources.read()
        manifest = build_key(sources=sources, features=features)
        build = build_dir(manifest)
        reason = why_not_loadable(build, manifest)
        if reason is not None:
            build.mkdir(parents=True, exist_ok=True)
            with _build_lock(build):
                if why_not_loadable(build, manifest) is not None:  # not built meanwhile by another process
                    _build(build, manifest, sources, reason, verbose)
        return _import(build, manifest), None
    except Exception as e:  # no compiler, no headers, ...: the caller falls back to the reference path
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        print(f"sambay: native kernels unavailable ({error}); using the slower PyTorch path", file=sys.stderr)
        return None, error


def _lib_suffix() -> str:
    return ".pyd" if sys.platform == "win32" else ".so"


def _import(build: Path, manifest: dict):
    """Imports the build's library (never recompiling: what torch's loader would do for a build
    made from another checkout's paths). Checks the manifest first: a build for other CPU features
    must not run here."""
    reason = why_not_loadable(build, manifest)
    if reason is not None:
        raise RuntimeError(f"{build}: {reason}")
    name = module_name(manifest)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, build / f"{name}{_lib_suffix()}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _build(build: Path, manifest: dict, sources: Sources, reason: str, verbose: bool) -> None:
    """Compiles the sources into `build` (under its lock), then writes the manifest: a folder with
    a manifest holds a finished build."""
    (build / MANIFEST).unlink(missing_ok=True)
    src = build / "src"
    src.mkdir(exist_ok=True)
    for name, data in sources.files.items():  # what the manifest hashes is what is compiled
        (src / name).write_bytes(data)
    print(f"sambay: compiling native CPU kernels ({reason}); this takes a minute or two, once per "
          f"CPU, compiler and version of the sources", file=sys.stderr, flush=True)
    start = time.monotonic()
    with _progress(start):
        _compile(name=module_name(manifest), sources=[str(src / n) for n in sources.compiled()],
                 flags=manifest["flags"], build=build, verbose=verbose)
    atomic_write_text(build / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"sambay: native kernels built in {time.monotonic() - start:.0f} s ({build})", file=sys.stderr,
          flush=True)


def _compile(*, name: str, sources: list[str], flags: list[str], build: Path, verbose: bool) -> None:
    # Imported here: only a build needs torch's builder (and the setuptools it imports).
    from torch.utils.cpp_extension import load

    load(name=name, sources=sources, extra_cflags=flags, build_directory=str(build), verbose=verbose)


@contextlib.contextmanager
def _progress(start: float, every: float | None = None) -> Iterator[None]:
    """While the compiler runs: the elapsed time on one updating line on a terminal, or a line
    every 20 s otherwise (a log), so a long first run is visibly not hung."""
    tty = sys.stderr.isatty()
    every = every or (2.0 if tty else 20.0)
    done = threading.Event()

    def report():
        while not done.wait(every):
            elapsed = f"sambay: compiling ... {time.monotonic() - start:.0f} s"
            print(f"\r{elapsed}" if tty else elapsed, end="" if tty else "\n", file=sys.stderr, flush=True)

    thread = threading.Thread(target=report, name="sambay-build-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Holds an exclusive lock on the build folder, which the OS releases if this process dies.
    torch's builder marks a build in progress with a `lock` file that a build stopped by Ctrl-C
    leaves behind, and every later load then waits for it forever. Under this lock no other
    sambay process is building, so such a file is stale and is removed."""
    try:
        import fcntl  # POSIX only
    except ImportError:  # Windows: torch's own lock file only
        yield
        return
    with open(build / ".sambay-build-lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (build / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
