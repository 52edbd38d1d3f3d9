"""The compiled kernels' cache: only a private directory, only a library this user built and nobody changed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lightning_pai.deploy import kernels as ckernels

pytestmark = pytest.mark.skipif(not ckernels.available(), reason="no C compiler: lightning_pai.ckernels unavailable")

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *p = getenv("LP_PLANT_MARKER");
    if (p) { FILE *f = fopen(p, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
"""


@pytest.fixture
def fresh(monkeypatch):
    """``fresh()``: load the kernels as a new process would (the module's state restored afterwards)."""
    monkeypatch.setattr(ckernels, "_LIB", ckernels._LIB)

    def load() -> bool:
        monkeypatch.setattr(ckernels, "_state", {})
        return ckernels.available()

    return load


def _built_name(tmp_path: Path, monkeypatch, fresh) -> str:
    """The file name the library gets on this machine (built once into a private cache)."""
    monkeypatch.setenv("LIGHTNING_PAI_CACHE", str(tmp_path / "private"))
    assert fresh()
    (lib,) = (tmp_path / "private" / "kernels").glob("lp_kernels_*.so")
    return lib.name


def _plant(kernels: Path, name: str) -> None:
    """A library with a constructor that leaves a marker, under the expected name, with a forged digest."""
    src = kernels / "planted.c"
    src.write_text(PLANTED)
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", str(src), "-o", str(kernels / name)], check=True)
    digest = hashlib.sha256((kernels / name).read_bytes()).hexdigest()
    (kernels / name).with_suffix(".sha256").write_text(digest)


@pytest.mark.parametrize("how", ["world-writable", "another user's"])
def test_a_planted_library_in_a_shared_cache_is_never_loaded(tmp_path, monkeypatch, fresh, how):
    name = _built_name(tmp_path, monkeypatch, fresh)
    shared = tmp_path / "shared"
    kernels = shared / "kernels"
    kernels.mkdir(parents=True)
    _plant(kernels, name)
    if how == "world-writable":
        for d in (shared, kernels):
            d.chmod(0o777)
    else:
        if os.getuid() != 0:
            pytest.skip("changing a directory's owner needs root")
        for d in (shared, kernels):
            os.chown(d, 12345, 12345)
    marker = tmp_path / "planted-code-ran"
    monkeypatch.setenv("LP_PLANT_MARKER", str(marker))
    monkeypatch.setenv("LIGHTNING_PAI_CACHE", str(shared))
    with pytest.warns(UserWarning, match="is not private"):
        assert fresh()  # built privately for this process instead
    assert not marker.exists()
    x = torch.randn(20, 70)
    assert torch.equal(ckernels.transpose(x), x.t().contiguous())  # our own kernels, not the planted ones


def test_a_tampered_library_in_the_private_cache_is_rebuilt(tmp_path, monkeypatch, fresh):
    name = _built_name(tmp_path, monkeypatch, fresh)
    lib = tmp_path / "private" / "kernels" / name
    _plant(lib.parent, name)  # replaced (with a matching digest written by someone else: the owner is us)
    lib.with_suffix(".sha256").write_text("0" * 64)  # ... but the recorded digest is ours
    marker = tmp_path / "planted-code-ran"
    monkeypatch.setenv("LP_PLANT_MARKER", str(marker))
    assert fresh()
    assert not marker.exists()
    assert hashlib.sha256(lib.read_bytes()).hexdigest() == lib.with_suffix(".sha256").read_text()  # rebuilt


def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path):
    """A library truncated to 30 % (a full disk, a killed copy) crashed every later process with SIGBUS."""
    cache = tmp_path / "cache"
    code = "from lightning_pai.deploy import kernels as ckernels; import torch; x = torch.randn(9, 7); " + (
        "assert ckernels.available() and torch.equal(ckernels.transpose(x), x.t().contiguous())"
    )
    env = dict(os.environ, LIGHTNING_PAI_CACHE=str(cache))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    (lib,) = (cache / "kernels").glob("lp_kernels_*.so")
    data = lib.read_bytes()
    lib.write_bytes(data[: int(0.3 * len(data))])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert hashlib.sha256(lib.read_bytes()).hexdigest() == lib.with_suffix(".sha256").read_text()  # rebuilt


def test_without_a_home_no_shared_temp_directory_is_used(monkeypatch, fresh):
    monkeypatch.delenv("LIGHTNING_PAI_CACHE", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    before = set(os.listdir(tempfile.gettempdir()))
    assert fresh()
    after = set(os.listdir(tempfile.gettempdir()))
    assert not (Path(tempfile.gettempdir()) / "lightning_pai").exists() or "lightning_pai" in before
    assert not [n for n in after - before if n.startswith("lightning_pai_kernels_")]  # the private build is removed


def _isas_of_this_cpu() -> list[str]:
    flags = set(ckernels._cpu_signature().split())
    return [name for name, (_, needs) in ckernels.ISAS.items() if set(needs) <= flags]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("isa", _isas_of_this_cpu())
def test_each_instruction_set_gets_its_own_library_and_the_same_products(tmp_path, monkeypatch, fresh, isa):
    monkeypatch.setenv("LIGHTNING_PAI_CACHE", str(tmp_path))
    monkeypatch.setenv("LIGHTNING_PAI_KERNEL_ISA", isa)
    assert fresh()
    assert ckernels.build_info().endswith(f"(ISA {isa})")
    assert (" -mno-avx512f" in ckernels.build_info()) == (isa == "avx2")
    gen = torch.Generator().manual_seed(0)
    for out, inp, n in ((37, 300, 64), (64, 129, 200), (5, 16, 3)):  # full tiles, a partial tile, one column
        w = torch.randn(out, inp, generator=gen) * (torch.rand(out, inp, generator=gen) < 0.2)
        b, x = torch.randn(out, generator=gen), torch.randn(n, inp, generator=gen)
        csr = w.to_sparse_csr()
        crow, col = csr.crow_indices().int(), csr.col_indices().int()
        y = ckernels.csr_matmul_t(crow, col, csr.values(), b, x.t().contiguous(), "relu")
        torch.testing.assert_close(y, torch.relu(x @ w.t() + b).t(), atol=1e-5, rtol=1e-5)
    other = "native" if isa == "avx2" else "avx2"
    if other in _isas_of_this_cpu():
        monkeypatch.setenv("LIGHTNING_PAI_KERNEL_ISA", other)
        assert fresh()
        assert len(list((tmp_path / "kernels").glob("lp_kernels_*.so"))) == 2  # the two builds do not collide


def test_an_instruction_set_the_cpu_lacks_or_an_unknown_one_builds_native(tmp_path, monkeypatch, fresh):
    monkeypatch.setenv("LIGHTNING_PAI_CACHE", str(tmp_path))
    monkeypatch.setenv("LIGHTNING_PAI_KERNEL_ISA", "avx1024")
    with pytest.warns(UserWarning, match="LIGHTNING_PAI_KERNEL_ISA='avx1024' is not one of"):
        assert fresh()
    assert ckernels.build_info().endswith("(ISA native)")
    monkeypatch.setattr(ckernels, "_cpu_signature", lambda: "flags : fpu sse sse2")
    monkeypatch.setenv("LIGHTNING_PAI_KERNEL_ISA", "avx512")
    with pytest.warns(UserWarning, match=r"needs the CPU flags \['avx512f'\]"):
        assert ckernels.isa() == "native"
