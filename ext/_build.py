"""Just-in-time build and loading of the ppap_ext operator libraries.

Two shared libraries are built with torch.utils.cpp_extension.load (ninja):

* ``ppap_ext_cpu``  - defines the ``ppap_ext`` op schemas and the CPU kernels;
  always built.
* ``ppap_ext_cuda`` - registers the CUDA kernels for the same ops; built only
  when ``torch.cuda.is_available()`` and nvcc is found.

Both are plain libraries (no Python module): loading one runs its
TORCH_LIBRARY registrations and the ops appear under ``torch.ops.ppap_ext``.
Builds go to ``ext/build/<name>`` (or ``$TORCH_EXTENSIONS_DIR/<name>``) and
are reused until a source or flag changes; ``MAX_JOBS`` limits the parallel
compile jobs as usual.  Failures are reported as a one-line ``BuildError``
naming a log file with the full compiler output.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
CSRC = _HERE / "csrc"
CPU_NAME = "ppap_ext_cpu"
CUDA_NAME = "ppap_ext_cuda"
CPU_SOURCES = ("ops_cpu.cpp", "topk_cpu.cpp", "crf_cpu.cpp")
CUDA_SOURCES = ("ops_cuda.cpp", "topk_cuda.cu", "crf_cuda.cu")
# Used when no GPU is visible to pick architectures (e.g. compile-only checks).
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# OpenMP is what makes at::parallel_for parallel: it is a header template that
# runs serially unless the including file is compiled with _OPENMP.  The
# library then shares the libgomp that torch has already loaded (same soname).
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
CXX_FLAGS = ["-O3", *OPENMP_FLAGS]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]

_state_lock = threading.Lock()
_loaded: dict[str, str] = {}  # library name -> path of the loaded .so


class BuildError(RuntimeError):
    """The extension could not be built or loaded (message is one line)."""


def build_root() -> Path:
    """Directory holding one build folder per library."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else _HERE / "build"


def nvcc_path() -> str | None:
    """Path of the nvcc that cpp_extension would use, or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidate = Path(CUDA_HOME) / "bin" / "nvcc"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def cuda_buildable() -> bool:
    """True when the CUDA library should be built: a GPU and nvcc are present."""
    return torch.cuda.is_available() and torch.version.cuda is not None and nvcc_path() is not None


def load_cpu() -> str:
    """Builds (if needed) and loads the CPU library; returns its path."""
    return _load(CPU_NAME, CPU_SOURCES, with_cuda=False)


def load_cuda() -> str:
    """Builds (if needed) and loads the CUDA library (after the CPU one)."""
    load_cpu()  # the schemas must exist before CUDA kernels register for them
    if torch.version.cuda is None:
        raise BuildError("ext: this PyTorch build has no CUDA support; CUDA kernels cannot be built")
    if nvcc_path() is None:
        raise BuildError("ext: CUDA tensors need the CUDA kernels, but nvcc was not found; "
                         "install the CUDA toolkit or set CUDA_HOME")
    return _load(CUDA_NAME, CUDA_SOURCES, with_cuda=True)


def build_cuda_only() -> str:
    """Compiles and links the CUDA library without needing a GPU (for checks).

    Architectures come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU
    is visible).  The library is loaded too, which only registers kernels.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return load_cuda()


def _cuda_link_flags() -> list[str]:
    """-L for the toolkit's libcudart.so.

    cpp_extension derives CUDA_HOME from the nvcc on PATH without resolving
    symlinks (/usr/local/bin/nvcc -> /usr/local/cuda/bin/nvcc gives
    /usr/local), then links -lcudart from a directory that lacks it.  The
    real toolkit directory is added; extra -L entries are harmless.
    """
    from torch.utils.cpp_extension import CUDA_HOME

    homes = [Path(CUDA_HOME)] if CUDA_HOME else []
    nvcc = nvcc_path()
    if nvcc:
        homes.append(Path(nvcc).resolve().parent.parent)
        homes.extend(_nvcc_toolkit_dirs(nvcc))  # nvcc may be a wrapper script
    homes.append(Path("/usr/local/cuda"))
    for home in homes:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (home / sub / "libcudart.so").exists():
                return [f"-L{home / sub}"]
    return []


def _nvcc_toolkit_dirs(nvcc: str) -> list[Path]:
    """The toolkit root nvcc itself reports (its TOP variable in --dryrun)."""
    import subprocess

    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], text=True,
                             capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    tops = re.findall(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, flags=re.MULTILINE)
    return [Path(t.strip()).resolve() for t in tops[:1]]


def _cuda_arch_tag() -> str:
    """A token naming the target architectures.

    cpp_extension does not rebuild when TORCH_CUDA_ARCH_LIST changes, so the
    token goes into the compile flags, whose changes do trigger a rebuild.
    """
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs and torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        archs = ";".join(f"{a}.{b}" for a, b in sorted(caps))
    if not archs:
        archs = DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return re.sub(r"[^0-9A-Za-z]+", "_", archs)


def _load(name: str, sources: tuple[str, ...], with_cuda: bool) -> str:
    with _state_lock:
        if name in _loaded:
            return _loaded[name]
        _check_toolchain(with_cuda)
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        _wait_for_lock(build_dir / "lock", name)
        cflags = list(CXX_FLAGS)
        cuda_flags = list(NVCC_FLAGS)
        if with_cuda:
            tag = f"-DPPAP_CUDA_ARCHS={_cuda_arch_tag()}"
            cflags.append(tag)
            cuda_flags.append(tag)
        if not any(build_dir.glob(f"{name}*.so")):
            print(f"ext: compiling {name} in {build_dir} (first use; this takes a few minutes)",
                  file=sys.stderr, flush=True)
        try:
            from torch.utils.cpp_extension import load

            path = load(
                name=name,
                sources=[str(CSRC / s) for s in sources],
                extra_cflags=cflags,
                extra_cuda_cflags=cuda_flags if with_cuda else None,
                extra_include_paths=[str(CSRC)],
                extra_ldflags=OPENMP_FLAGS + (_cuda_link_flags() if with_cuda else []),
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=os.environ.get("PPAP_EXT_VERBOSE", "") not in ("", "0"),
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            raise _build_failure(name, build_dir, exc) from None
        _loaded[name] = str(path)
        return _loaded[name]


def _check_toolchain(with_cuda: bool) -> None:
    """Fails fast, in one line, on a missing compiler or ninja."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"ext: C++ compiler '{cxx}' not found; install g++ "
                         "(e.g. apt-get install g++) or set CXX")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        # `pip install ninja` puts the binary next to the interpreter, which is
        # not on PATH when the venv's python is run without activation.
        venv_bin = Path(sys.executable).parent
        if (venv_bin / "ninja").is_file():
            os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
        if not is_ninja_available():
            raise BuildError("ext: ninja not found; pip install ninja")
    if with_cuda and nvcc_path() is None:
        raise BuildError("ext: nvcc not found; install the CUDA toolkit or set CUDA_HOME")


def _lock_wait_seconds() -> float:
    return float(os.environ.get("PPAP_EXT_LOCK_TIMEOUT", "1800"))


def _wait_for_lock(lock: Path, name: str) -> None:
    """Turns a build lock that would block forever into a clear error.

    Recent PyTorch holds an OS-level lock on ``lock`` (released when the holder
    dies), so a leftover file is harmless and only a live (or hung) builder
    blocks; older PyTorch treats the mere existence of the file as "building",
    so a file left by a killed build blocks forever.  Either way we wait at
    most PPAP_EXT_LOCK_TIMEOUT seconds (default 1800), then explain.
    """
    if not lock.exists():
        return
    deadline = time.monotonic() + _lock_wait_seconds()
    announced = False
    while True:
        if _lock_is_free(lock):
            return
        if time.monotonic() > deadline:
            raise BuildError(
                f"ext: build lock {lock} is still held after {_lock_wait_seconds():.0f} s; if no "
                f"other build of {name} is running (check `ps`), delete it: rm {lock}")
        if not announced:
            print(f"ext: waiting for another process building {name} (lock {lock})",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(1.0)


def _lock_is_free(lock: Path) -> bool:
    import torch.utils.cpp_extension as cpp_ext

    if hasattr(cpp_ext, "FileLock"):  # OS-level lock: probe it without blocking
        from filelock import FileLock, Timeout

        try:
            with FileLock(str(lock), timeout=0):
                return True
        except Timeout:
            return False
    # Existence-based baton: a file with no recent activity is left over from
    # a killed build and would block cpp_extension forever.
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return True
    stale_after = float(os.environ.get("PPAP_EXT_STALE_LOCK", "600"))
    if age > stale_after:
        raise BuildError(f"ext: stale build lock {lock} ({age / 60:.0f} min old, left by an "
                         f"interrupted build); delete it and retry: rm {lock}")
    return False


def _build_failure(name: str, build_dir: Path, exc: Exception) -> BuildError:
    """Saves the full error to a log file and returns a one-line BuildError."""
    log = build_dir / "build_error.log"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        log.write_text(text)
        where = f"full log: {log}"
    except OSError:
        where = "(could not write the log; rerun with PPAP_EXT_VERBOSE=1)"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # Prefer the compiler's own diagnostic over ninja's summary line.
    first = next((ln for ln in lines if "error:" in ln.lower()),
                 lines[0] if lines else type(exc).__name__)
    if len(first) > 300:
        first = first[:300] + "..."
    return BuildError(f"ext: building {name} failed: {first} -- {where}")
