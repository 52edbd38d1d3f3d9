"""CPU kernels for sparse inference, compiled from C at first use with the system's C compiler.

PyTorch's CSR kernels pay, at inference sizes, for things a fixed-layout inference kernel does not need: a
zero-filled output, a bias added in a second pass, inputs streamed from memory once per stored weight when the
batch is wide (a ``1024 x 4096`` input does not fit in cache), and transposes done element by element. This
module compiles (once per machine, cached) a small C library (``kernels.c`` beside it, shipped as package data)
that :mod:`lightning_pai.deploy` uses instead
when it is available:

- ``csr_matmul_t``: ``Y^T = act(W X^T + b)`` for a CSR ``W`` (int32 indices, float32 values) and a
  ``(in, n)`` input ``X^T``; the ``n`` columns are processed in tiles of 64 that stay in cache while every row
  of ``W`` is applied to them (``y[r, t] = b[r] + sum_k v_k x[c_k, t]``, accumulated in registers, each output
  written once), tiles and row blocks split over PyTorch's OpenMP threads;
- ``sparse_conv``: direct sparse convolution (Park et al. 2017, "Faster CNNs with Direct Sparse Convolutions
  and Guided Pruning"): with the zero-padded input flattened per channel, every kernel tap ``(c, dy, dx)`` of a
  stride-1 convolution reads a contiguous run of it shifted by ``c H_p W_p + dy W_p + dx``, so
  ``y[r, t] = b[r] + sum_k v_k x[o_k + t]`` over the output grid (strided convolutions first split the input into
  stride x stride phase planes); the same register-tiled inner loop as ``csr_matmul_t``;
- ``csr_sddmm``: ``out[k] = sum_t a[r, t] b[c_k, t]`` at the kept positions ``(r, c_k)`` of a CSR structure (a
  sampled dense-dense product, the weight gradient of a truly sparse training layer,
  :mod:`lightning_pai.core.sparse_ops`), four kept entries sharing each load of ``a``'s row;
- ``mask_bits_``: a keep-mask applied in place, ``t[i] = m[i] ? t[i] : +0.0`` on the bits (NaN-safe), one byte of mask
  per element (the masked-dense training path's gradient masking, :func:`lightning_pai.core.masks.zero_masked_`);
- ``transpose``: a cache-blocked out-of-place 2-D transpose;
- ``layer_norm_t``: LayerNorm over the *leading* dimension of a ``(features, n)`` matrix, i.e. LayerNorm of
  ``X`` given ``X^T``, so that a chain of sparse layers and LayerNorms never transposes (two passes: the mean,
  then the mean of squared deviations, as PyTorch; ``y = (x - mean) / sqrt(var + eps) * w + b``).

The library is built with ``cc -O3 -march=native -fopenmp -shared`` (``CC`` overrides the compiler) into
``$LIGHTNING_PAI_CACHE/kernels`` (default ``~/.cache/lightning_pai/kernels``), in a file named after a hash of
the source, the compiler, the flags, the instruction set and the CPU's feature flags, so a home directory shared
by different machines gets one build per CPU kind. The inner loops use the widest vectors of the instruction set
built for (16 floats with AVX-512, 8 with AVX2, 4 with SSE or NEON) and as many accumulators as its register
file holds (8 in flight); ``LIGHTNING_PAI_KERNEL_ISA=avx2`` builds the AVX2 variant on an AVX-512 machine (to
measure what CPUs without AVX-512 get), ``avx512`` insists on AVX-512, ``native`` (the default) takes what the
CPU has (:data:`ISAS`, :func:`build_info`). Only a private cache is used — directories created 0700, a directory
owned by another user or writable by its group or others refused — and a cached library is loaded only if
it is a regular file of this user whose sha256 is the one recorded when it was built (a truncated,
corrupted or replaced file is rebuilt). Without a home directory, or with a cache that is not private, the
library is built for the running process in a fresh private temporary directory (never in a shared one).
It links the OpenMP runtime PyTorch has already loaded (``libgomp.so.1``), so it shares PyTorch's thread pool
instead of adding a second one. Set ``LIGHTNING_PAI_NO_CKERNELS=1`` to never compile;
without a working compiler :func:`available` is ``False`` and the sparse layers use ``torch.sparse``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

#: The C source, shipped beside this module as package data.
_SOURCE = (Path(__file__).with_name("kernels.c")).read_text()

#: ``act`` codes of the kernels (``CsrPlan``, ``sparse_conv``).
ACTIVATIONS = {None: 0, "relu": 1}
_BASE_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11")
#: ``LIGHTNING_PAI_KERNEL_ISA``: the instruction set the kernels are built for, as ``(extra compiler flags, CPU
#: flags it needs)``. ``native``: everything the CPU has; ``avx2``: AVX2 + FMA without AVX-512 (what an
#: AVX-512 machine compiles for a CPU without it, to measure that case); ``avx512``: native, required to include
#: AVX-512F.
ISAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "native": ((), ()),
    "avx2": (("-mno-avx512f",), ("avx2", "fma")),
    "avx512": ((), ("avx512f",)),
}
_lock = threading.Lock()
_LIB: ctypes.CDLL | None = None  # what library() returned last (csr_apply's fast path)
_state: dict[str, object] = {}
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
#: Multiply-adds (or copied floats) below which a kernel runs on the calling thread alone.
_MIN_PARALLEL_WORK = 1 << 15


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa() -> str:
    """The instruction set the kernels are (to be) built for: ``LIGHTNING_PAI_KERNEL_ISA`` (see :data:`ISAS`).

    ``native`` when unset, unknown (with a warning), or naming flags this CPU lacks (with a warning: the
    library would stop at an illegal instruction).
    """
    wanted = os.environ.get("LIGHTNING_PAI_KERNEL_ISA", "").strip().lower() or "native"
    if wanted not in ISAS:
        warnings.warn(
            f"lightning_pai: LIGHTNING_PAI_KERNEL_ISA={wanted!r} is not one of {sorted(ISAS)}; building 'native'.",
            stacklevel=2,
        )
        return "native"
    have = set(_cpu_signature().split())
    missing = [f for f in ISAS[wanted][1] if f not in have]
    if missing:
        warnings.warn(
            f"lightning_pai: LIGHTNING_PAI_KERNEL_ISA={wanted!r} needs the CPU flags {missing}, which this CPU "
            "lacks; building 'native'.",
            stacklevel=2,
        )
        return "native"
    return wanted


def _compile(cc: str, flags: tuple[str, ...], out: Path) -> bool:
    """Build the library into ``out`` (atomically) and record its digest beside it (:func:`_manifest`)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp, "lp_kernels.c"), Path(tmp, "lp_kernels.so")
        src.write_text(_SOURCE)
        try:
            done = subprocess.run([cc, *flags, str(src), "-o", str(lib), "-lm"], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        if done.returncode != 0:
            return False
        partial = out.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(lib, partial)
        os.chmod(partial, 0o600)
        digest = _file_digest(partial)
        os.replace(partial, out)  # atomic: concurrent processes (DDP ranks) never load a half-written file
        note = _manifest(out).with_suffix(f".{os.getpid()}.tmp")
        note.write_text(digest)
        os.chmod(note, 0o600)
        os.replace(note, _manifest(out))
    return True


def _manifest(path: Path) -> Path:
    """Where the sha256 of a built library is recorded (beside it, in the same private directory)."""
    return path.with_suffix(".sha256")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _private_dir(path: Path) -> bool:
    """Create ``path`` (mode 0700) if missing; whether it is a real directory of this user that nobody else can write.

    A symbolic link, a directory owned by another user, or one that its group or others may write (where
    someone else could plant a library) is refused.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return False
    owner_ok = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return stat.S_ISDIR(info.st_mode) and owner_ok and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _trusted(path: Path) -> bool:
    """Whether ``path`` is a library this user built and nobody changed since.

    A regular file of this user, writable by nobody else, whose sha256 is the one recorded when it was built
    (a truncated, corrupted or replaced file is not).
    """
    try:
        for f in (path, _manifest(path)):
            info = os.lstat(f)
            if not stat.S_ISREG(info.st_mode) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return False
            if hasattr(os, "getuid") and info.st_uid != os.getuid():
                return False
        return _manifest(path).read_text().strip() == _file_digest(path)
    except OSError:
        return False


def _default_cache() -> Path | None:
    """``~/.cache/lightning_pai``, or None without a home directory (never a shared temp directory)."""
    try:
        return Path.home() / ".cache" / "lightning_pai"
    except (RuntimeError, KeyError):
        return None


def _cache_dir() -> tuple[Path | None, str]:
    """The private directory the library is kept in between processes, or None (then: a per-process build)."""
    configured = os.environ.get("LIGHTNING_PAI_CACHE")
    cache = Path(configured) if configured else _default_cache()
    if cache is None:
        return None, "there is no home directory to cache it in"
    kernels = cache / "kernels"
    if _private_dir(cache) and _private_dir(kernels):
        return kernels, ""
    return None, (
        f"the cache directory {kernels} is not private (it must be a directory of this user that its group and "
        "others cannot write; set LIGHTNING_PAI_CACHE to such a directory)"
    )


def _load() -> ctypes.CDLL | None:
    if os.environ.get("LIGHTNING_PAI_NO_CKERNELS", "") not in ("", "0"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    cache, why = _cache_dir()
    scratch = None
    if cache is None:  # build in a fresh directory only this process knows; it is removed once loaded
        if why.startswith("the cache"):
            warnings.warn(f"lightning_pai: {why}; building the sparse kernels for this process only.", stacklevel=3)
        scratch = tempfile.mkdtemp(prefix="lightning_pai_kernels_")
        cache = Path(scratch)
    try:
        return _build_and_open(cc, version, cache)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)  # the loaded library stays mapped


def _build_and_open(cc: str, version: str, cache: Path) -> ctypes.CDLL | None:
    portable = tuple(f for f in _BASE_FLAGS if f != "-march=native")
    chosen = isa()
    native = _BASE_FLAGS + ISAS[chosen][0]
    # without OpenMP: one thread; without -march=native: compilers that do not know it
    for flags in (native + ("-fopenmp",), native, portable):
        key = (_SOURCE, cc, version, *flags, _cpu_signature(), chosen)
        digest = hashlib.sha256("\0".join(key).encode()).hexdigest()
        path = cache / f"lp_kernels_{digest[:16]}.so"
        try:
            if not _trusted(path) and not (_compile(cc, flags, path) and _trusted(path)):
                continue
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        lib.lp_sparse_conv.argtypes = [_i64] * 5 + [_ptr] * 5 + [_i64, _ptr, _i64, ctypes.c_int, ctypes.c_int]
        lib.lp_phase_planes.argtypes = [_i64] * 3 + [_ptr] + [_i64] * 10 + [_ptr, ctypes.c_int]
        lib.lp_csr_apply.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, ctypes.c_int]
        lib.lp_csr_matmul.argtypes = [_i64] * 3 + [_ptr] * 5 + [_i64, _ptr, _i64, ctypes.c_int, ctypes.c_int]
        lib.lp_mask_bits.argtypes = [_i64, _ptr, ctypes.c_int, _ptr, ctypes.c_int]
        lib.lp_csr_sddmm.argtypes = [_i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, ctypes.c_int]
        lib.lp_transpose.argtypes = [_i64, _i64, _ptr, _i64, _ptr, _i64, ctypes.c_int]
        lib.lp_layer_norm_t.argtypes = [_i64, _i64, _ptr, _i64, _ptr, _ptr, ctypes.c_float, _ptr, _i64,
                                        ctypes.c_int]  # fmt: skip
        _state["build"] = f"{cc.rsplit('/', 1)[-1]} {' '.join(flags)} (ISA {chosen})"
        return lib
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernel library (built on the first call, then cached), or ``None`` if unavailable."""
    global _LIB
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    _LIB = _state["lib"]
    return _state["lib"]  # type: ignore[return-value]


def build_info() -> str | None:
    """How the loaded library was built (compiler, flags, ISA), or ``None`` when there is none."""
    return _state.get("build") if library() is not None else None  # type: ignore[return-value]


def available() -> bool:
    """Whether the compiled kernels can be used in this process (compiling them on the first call)."""
    return library() is not None


def _threads(work: int) -> int:
    """PyTorch's intra-op thread count for ``work`` multiply-adds (or copied floats), 1 for small calls.

    Waking the thread pool costs microseconds: small calls are faster on the calling thread alone.
    """
    return 1 if work < _MIN_PARALLEL_WORK else torch.get_num_threads()


def _ptr_or_none(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Csr(ctypes.Structure):
    _fields_ = [("rows", _i64), ("in_features", _i64), ("nnz", _i64), ("crow", _ptr), ("col", _ptr),
                ("val", _ptr), ("bias", _ptr), ("act", ctypes.c_int)]  # fmt: skip


class CsrPlan:
    """A CSR weight prepared for :func:`csr_apply`: its pointers packed once, its tensors kept alive.

    Args:
        crow: ``(rows + 1,)`` int32 row offsets.
        col: ``(nnz,)`` int32 column indices.
        values: ``(nnz,)`` float32 values.
        bias: ``(rows,)`` float32 (contiguous) or ``None``.
        in_features: Columns of the matrix.
        activation: ``None`` or ``"relu"`` (applied to the output in the same pass).
    """

    __slots__ = ("_struct", "_tensors", "nnz", "rows")

    def __init__(
        self,
        crow: Tensor,
        col: Tensor,
        values: Tensor,
        bias: Tensor | None,
        in_features: int,
        activation: str | None = None,
    ) -> None:
        self.rows, self.nnz = crow.shape[0] - 1, values.shape[0]
        self._tensors = (crow, col, values, bias)  # the pointers below stay valid while the plan lives
        self._struct = _Csr(
            self.rows, in_features, self.nnz, crow.data_ptr(), col.data_ptr(), values.data_ptr(),
            _ptr_or_none(bias), ACTIVATIONS[activation],
        )  # fmt: skip


def csr_apply(plan: CsrPlan, xt: Tensor) -> Tensor:
    """``act(W @ xt + bias[:, None])`` for a prepared CSR ``W`` and a float32 ``(in, n)`` input with contiguous rows.

    Returns:
        The ``(rows, n)`` contiguous float32 result.
    """
    n = xt.shape[1]
    y = torch.empty(plan.rows, n, dtype=torch.float32)
    lib = _LIB or library()
    lib.lp_csr_apply(ctypes.byref(plan._struct), n, xt.data_ptr(), xt.stride(0), y.data_ptr(), _threads(plan.nnz * n))
    return y


def csr_matmul_t(
    crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, xt: Tensor, activation: str | None = None
) -> Tensor:
    """``act(W @ xt + bias[:, None])`` for a CSR ``W`` given as int32 ``crow``/``col`` and float32 ``values``.

    Args:
        crow: ``(rows + 1,)`` int32 row offsets.
        col: ``(nnz,)`` int32 column indices.
        values: ``(nnz,)`` float32 values.
        bias: ``(rows,)`` float32 or ``None``.
        xt: ``(in, n)`` float32 input whose rows are contiguous (``xt.stride(1) == 1``).
        activation: ``None`` or ``"relu"`` (applied to the output in the same pass).

    Returns:
        The ``(rows, n)`` contiguous float32 result.
    """
    lib = _LIB or library()
    assert lib is not None, "call available() first"
    rows, n = crow.shape[0] - 1, xt.shape[1]
    y = torch.empty(rows, n, dtype=torch.float32)
    lib.lp_csr_matmul(
        rows, xt.shape[0], n, crow.data_ptr(), col.data_ptr(), values.data_ptr(), _ptr_or_none(bias), xt.data_ptr(),
        xt.stride(0), y.data_ptr(), n, ACTIVATIONS[activation], _threads(values.shape[0] * n),
    )  # fmt: skip
    return y


def csr_sddmm(crow: Tensor, col: Tensor, a: Tensor, bt: Tensor) -> Tensor:
    """``(a @ bt.T)`` at the kept positions of a CSR structure, in its order (an SDDMM).

    The weight gradient of a sparse layer, ``dW = dYᵀ X`` at the kept weights, is ``csr_sddmm(crow, col, dYᵀ, Xᵀ)``:
    ``out[k] = Σ_t a[r, t] · bt[col[k], t]`` for the ``k`` of row ``r``.

    Args:
        crow: ``(rows + 1,)`` int32 row offsets.
        col: ``(nnz,)`` int32 column indices.
        a: ``(rows, n)`` float32 with contiguous rows.
        bt: ``(cols, n)`` float32 with contiguous rows.

    Returns:
        The ``(nnz,)`` float32 products.
    """
    lib = _LIB or library()
    assert lib is not None, "call available() first"
    n, nnz = a.shape[1], col.shape[0]
    out = torch.empty(nnz, dtype=torch.float32)
    lib.lp_csr_sddmm(
        crow.shape[0] - 1, n, crow.data_ptr(), col.data_ptr(), a.data_ptr(), a.stride(0), bt.data_ptr(), bt.stride(0),
        out.data_ptr(), _threads(nnz * n),
    )  # fmt: skip
    return out


def sparse_conv(
    crow: Tensor,
    offsets: Tensor,
    values: Tensor,
    bias: Tensor | None,
    planes: Tensor,
    out_size: tuple[int, int],
    grid_width: int,
    activation: str | None = None,
) -> Tensor:
    """Direct sparse convolution over flattened input planes (see :class:`lightning_pai.deploy.SparseConv2d`).

    On the output grid ``t = i * grid_width + j``: ``g[n, r, t] = act(b[r] + sum_k v_k planes[n, o_k + t])``;
    the result keeps the columns ``j < out_w`` of it.

    Args:
        crow: ``(rows + 1,)`` int32 row offsets of the ``(out_channels, ...)`` CSR weight.
        offsets: ``(nnz,)`` int32: for each stored weight, where its input channel and kernel tap start in an
            image's flattened planes.
        values: ``(nnz,)`` float32 values.
        bias: ``(rows,)`` float32 or ``None``.
        planes: ``(batch, features)`` float32 rows (row stride ``planes.stride(0)``, columns contiguous), one
            flattened image per row, e.g. from :func:`phase_planes`; every ``offsets[k] + (out_h - 1) *
            grid_width + out_w - 1`` must lie inside a row, and 64 floats past the last row must be readable (a
            partial tile reads them).
        out_size: ``(out_h, out_w)``.
        grid_width: Width of the grid the offsets address (``>= out_w``).
        activation: ``None`` or ``"relu"``.

    Returns:
        The contiguous ``(batch, rows, out_h, out_w)`` float32 result.
    """
    lib = library()
    assert lib is not None, "call available() first"
    rows, batch = crow.shape[0] - 1, planes.shape[0]
    out_h, out_w = out_size
    y = torch.empty(batch, rows, out_h, out_w, dtype=torch.float32, device=planes.device)
    lib.lp_sparse_conv(
        batch, rows, out_h, out_w, grid_width, crow.data_ptr(), offsets.data_ptr(), values.data_ptr(),
        _ptr_or_none(bias), planes.data_ptr(), planes.stride(0), y.data_ptr(), rows * out_h * out_w,
        ACTIVATIONS[activation], _threads(values.shape[0] * out_h * grid_width * batch),
    )  # fmt: skip
    return y


def phase_planes(
    x: Tensor, padding: tuple[int, int], step: tuple[int, int], phases: tuple[int, int], size: tuple[int, int]
) -> Tensor:
    """Zero-padded, strided phase planes of a float32 ``(n, c, h, w)`` input, flattened per image, plus slack.

    ``out[n, c, a, b, i, j] = x[n, c, step_h i + a - top, step_w j + b - left]`` (zero outside the input) for
    ``a < phases[0]``, ``b < phases[1]``, ``(i, j) < size``; ``padding = (top, left)``. The result is a
    ``(n, c * phases_h * phases_w * size_h * size_w)`` view of a buffer with 64 more floats at its end (so that
    :func:`sparse_conv` may read whole tiles past the last image).

    Args:
        x: ``(n, c, h, w)`` float32 input; columns contiguous, ``x.stride(0) == c * x.stride(1)``.
        padding: ``(top, left)`` zero padding.
        step: ``(step_h, step_w)``: the convolution's stride.
        phases: ``(phases_h, phases_w)``: phases per axis (the stride, or 1 for a 1x1 kernel).
        size: ``(size_h, size_w)`` of each phase plane.

    Returns:
        The ``(n, features)`` planes.
    """
    lib = library()
    assert lib is not None, "call available() first"
    n, c, h, w = x.shape
    (qh, qw), (ph, pw) = phases, size
    features = c * qh * qw * ph * pw
    buf = torch.empty(n * features + 64, dtype=torch.float32, device=x.device)
    lib.lp_phase_planes(
        n * c, h, w, x.data_ptr(), x.stride(1), x.stride(2), padding[0], padding[1], step[0], step[1], qh, qw, ph,
        pw, buf.data_ptr(), _threads(n * features),
    )  # fmt: skip
    return buf[: n * features].view(n, features)


def mask_bits_(t: Tensor, mask: Tensor) -> bool:
    """``t`` zeroed in place where the 0/1 ``mask`` is 0 (bit for bit untouched elsewhere), if the kernel applies.

    The kernel takes a contiguous CPU ``t`` of 2-, 4- or 8-byte elements and a contiguous ``mask`` of as many
    bool or uint8 entries; it reads one mask byte per element in one vectorised pass (PyTorch's multiply of a
    float's bits by a uint8 mask converts every element on the way, about twice as slow). ``t``'s version counter
    is bumped as by an in-place PyTorch op, so autograd still refuses a saved tensor that was changed.

    Returns:
        Whether ``t`` was masked (False: nothing was done; the caller masks another way).
    """
    if (
        t.device.type != "cpu"
        or mask.device.type != "cpu"
        or t.element_size() not in (2, 4, 8)
        or mask.element_size() != 1
        or mask.numel() != t.numel()
        or not (t.is_contiguous() and mask.is_contiguous())
    ):
        return False  # decided before the library is looked up: GPU training never builds it
    lib = _LIB or library()
    if lib is None:
        return False
    n = t.numel()
    lib.lp_mask_bits(n, t.data_ptr(), t.element_size(), mask.data_ptr(), _threads(n))
    increment_version(t)  # as an in-place PyTorch op does: autograd then refuses a saved tensor changed under it
    return True


def transpose(x: Tensor) -> Tensor:
    """``x.t().contiguous()`` for a float32 2-D ``x`` whose rows are contiguous (blocked, threaded)."""
    lib = library()
    assert lib is not None, "call available() first"
    rows, cols = x.shape
    y = torch.empty(cols, rows, dtype=torch.float32, device=x.device)
    lib.lp_transpose(rows, cols, x.data_ptr(), x.stride(0), y.data_ptr(), rows, _threads(x.numel()))
    return y


def layer_norm_t(xt: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over dim 0 of a float32 ``(features, n)`` matrix with contiguous rows; returns ``(features, n)``."""
    lib = library()
    assert lib is not None, "call available() first"
    features, n = xt.shape
    y = torch.empty(features, n, dtype=torch.float32, device=xt.device)
    lib.lp_layer_norm_t(
        features, n, xt.data_ptr(), xt.stride(0), _ptr_or_none(weight), _ptr_or_none(bias), eps, y.data_ptr(), n,
        _threads(xt.numel()),
    )  # fmt: skip
    return y


__all__ = [
    "ACTIVATIONS",
    "available",
    "build_info",
    "CsrPlan",
    "csr_apply",
    "csr_matmul_t",
    "csr_sddmm",
    "ISAS",
    "isa",
    "layer_norm_t",
    "mask_bits_",
    "library",
    "phase_planes",
    "sparse_conv",
    "transpose",
]
