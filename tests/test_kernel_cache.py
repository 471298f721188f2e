"""The native kernels' build cache (sambay.kernels.loader): one build per CPU, compiler, flags and
sources. Nothing here compiles: the compile step is faked, except in the one test that loads the
real build (made by the first test that needs the kernels) from a copy of the package."""

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sambay.kernels import loader

CPUINFO = """processor\t: 0
flags\t\t: fpu vme sse4_2 avx avx2 fma f16c hypervisor md_clear avx512f avx512bw
processor\t: 1
flags\t\t: fpu vme sse4_2 avx avx2 fma f16c hypervisor md_clear avx512f avx512bw
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMBAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SAMBAY_NATIVE", raising=False)
    monkeypatch.delenv(loader.FEATURES_ENV, raising=False)
    return tmp_path / "cache" / "kernels"


@pytest.fixture
def sources():
    return loader.Sources({"a.cpp": b"int a() { return 1; }\n", "a.h": b"#pragma once\n"})


class FakeCompiler:
    """Stands in for torch's builder: records each build and leaves a library file behind, which
    `imported` records instead of importing."""

    def __init__(self, monkeypatch):
        self.builds, self.imported = [], []
        monkeypatch.setattr(loader, "_compile", self.compile)
        monkeypatch.setattr(loader.importlib.util, "spec_from_file_location", self.spec)

    def compile(self, *, name, sources, flags, build, verbose):
        assert not (build / "lock").exists()  # the build lock removed a stale one
        self.builds.append((name, build, [Path(s).name for s in sources]))
        (build / f"{name}{loader._lib_suffix()}").write_bytes(b"built here")

    def spec(self, name, path):
        self.imported.append((name, Path(path)))
        return importlib.machinery.ModuleSpec(name, _FakeLoader(Path(path)))


class _FakeLoader:
    def __init__(self, path):
        self.path = path

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.content = self.path.read_bytes()


@pytest.fixture
def compiler(monkeypatch):
    fake = FakeCompiler(monkeypatch)
    yield fake
    for name, _ in fake.imported:
        sys.modules.pop(name, None)


def key(**parts):
    defaults = dict(features=("x86_64", "avx2", "fma"), flags=["-O3"], compiler="c++ 12",
                    sources=loader.Sources({"a.cpp": b"1"}))
    return loader.build_key(**{**defaults, **parts})["key"]


def test_the_key_changes_with_features_flags_compiler_and_source_bytes():
    base = key()
    assert key() == base
    assert key(features=("x86_64", "avx2", "fma", "avx512f")) != base
    assert key(flags=["-O2"]) != base
    assert key(compiler="c++ 13") != base
    assert key(sources=loader.Sources({"a.cpp": b"2"})) != base
    assert key(sources=loader.Sources({"b.cpp": b"1"})) != base  # a renamed file is another source
    assert key(sources=loader.Sources({"a.cpp": b"1", "a.h": b""})) != base  # headers count too


def test_features_come_from_cpuinfo_isa_flags_only(monkeypatch):
    monkeypatch.delenv(loader.FEATURES_ENV, raising=False)
    feats = loader.cpu_features(CPUINFO)
    assert set(feats[1:]) == {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw"}  # no md_clear
    monkeypatch.setenv(loader.FEATURES_ENV, "avx2, fma")
    assert loader.cpu_features(CPUINFO) == ("avx2", "fma")


def test_flags_keep_native_tuning_and_openmp_on_linux():
    flags = loader.compile_flags("linux")
    assert {"-O3", "-march=native", "-fno-math-errno", "-funsafe-math-optimizations",
            "-fno-finite-math-only", "-fopenmp"} <= set(flags)
    assert "-fopenmp" not in loader.compile_flags("darwin")


def test_two_checkouts_with_the_same_sources_share_one_key(tmp_path):
    copy = tmp_path / "elsewhere" / "csrc"
    shutil.copytree(loader.CSRC, copy)
    here, there = loader.Sources.read(), loader.Sources.read(copy)
    assert here == there and loader.build_key(sources=here) == loader.build_key(sources=there)
    (copy / "gemv.cpp").write_bytes((copy / "gemv.cpp").read_bytes() + b"\n")
    assert loader.build_key(sources=loader.Sources.read(copy))["key"] != loader.build_key(sources=here)["key"]


def test_a_build_happens_once_says_why_and_is_then_loaded_silently(cache, sources, compiler, capfd):
    module, error = loader.load_native(sources=sources)
    assert error is None and module.content == b"built here"
    assert len(compiler.builds) == 1
    name, build, compiled = compiler.builds[0]
    manifest = loader.build_key(sources=sources)
    assert build == cache / f"sambay_kernels-{manifest['key']}" and name == f"sambay_kernels_{manifest['key']}"
    assert compiled == ["a.cpp"] and (build / "src" / "a.h").read_bytes() == b"#pragma once\n"
    assert json.loads((build / "manifest.json").read_text()) == manifest
    err = capfd.readouterr().err
    assert "no build for this CPU/compiler/sources yet" in err and "built in" in err

    sys.modules.pop(name)  # as a new process would
    module, error = loader.load_native(sources=sources)
    assert error is None and module.content == b"built here" and len(compiler.builds) == 1
    assert capfd.readouterr().err == ""


def test_a_build_for_other_cpu_features_is_never_loaded(cache, sources, compiler, capfd):
    manifest = loader.build_key(sources=sources)
    foreign = cache / f"sambay_kernels-{manifest['key']}"  # where this CPU's build would be ...
    foreign.mkdir(parents=True)
    lib = foreign / f"sambay_kernels_{manifest['key']}{loader._lib_suffix()}"
    lib.write_bytes(b"AVX-512 code")
    other = {**manifest, "features": ["x86_64", "avx2", "avx512f"]}  # ... but made for another CPU
    (foreign / "manifest.json").write_text(json.dumps(other))
    assert "other CPU features" in loader.why_not_loadable(foreign, manifest)

    module, error = loader.load_native(sources=sources)
    assert error is None and module.content == b"built here"  # rebuilt for this CPU, then loaded
    assert len(compiler.builds) == 1 and "other CPU features" in capfd.readouterr().err
    assert json.loads((foreign / "manifest.json").read_text())["features"] == manifest["features"]


def test_faked_features_build_under_their_own_key(cache, sources, compiler, monkeypatch):
    loader.load_native(sources=sources)
    monkeypatch.setenv(loader.FEATURES_ENV, "avx2,fma")
    module, error = loader.load_native(sources=sources)
    assert error is None and len(compiler.builds) == 2
    assert compiler.builds[0][1] != compiler.builds[1][1]
    assert json.loads((compiler.builds[1][1] / "manifest.json").read_text())["features"] == ["avx2", "fma"]


def test_a_build_stopped_midway_is_redone_without_waiting_on_its_lock(cache, sources, compiler, capfd):
    """torch's builder leaves its `lock` file behind when a build is stopped (Ctrl-C during the
    first compile): the next load must build, not wait for that file forever (FakeCompiler checks
    that it is gone)."""
    build = loader.build_dir(loader.build_key(sources=sources))
    build.mkdir(parents=True)
    (build / "lock").touch()
    module, error = loader.load_native(sources=sources)
    assert error is None and len(compiler.builds) == 1
    assert "did not finish" in capfd.readouterr().err


def test_a_failed_build_falls_back_with_one_line(cache, sources, monkeypatch, capfd):
    def fails(**kwargs):
        raise RuntimeError("Error building extension\nc++: not found")

    monkeypatch.setattr(loader, "_compile", fails)
    module, error = loader.load_native(sources=sources)
    assert module is None and error == "RuntimeError: c++: not found"
    err = capfd.readouterr().err
    assert "native kernels unavailable (RuntimeError: c++: not found)" in err
    assert not (loader.build_dir(loader.build_key(sources=sources)) / "manifest.json").exists()


def test_disabled_by_environment(cache, sources, compiler, monkeypatch):
    monkeypatch.setenv("SAMBAY_NATIVE", "0")
    assert loader.load_native(sources=sources) == (None, "disabled by SAMBAY_NATIVE=0")
    assert compiler.builds == []


def test_a_copy_of_the_package_loads_the_existing_build_without_compiling(tmp_path):
    """Two checkouts never rebuild each other's kernels: a copy of the package elsewhere loads the
    build this checkout's tests made (made here first if there is none yet)."""
    module, error = loader.load_native()
    if module is None:
        pytest.skip(error)
    shutil.copytree(Path(loader.__file__).parents[1], tmp_path / "sambay",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from sambay.kernels import loader; m, e = loader.load_native(); "
            "print(loader.__file__); print(sorted(m.fast_paths()) if m else e)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(tmp_path / "sambay" / "kernels" / "loader.py"), str(sorted(module.fast_paths()))]
    assert out.stderr == ""  # no "compiling" line: the build was found, not redone
