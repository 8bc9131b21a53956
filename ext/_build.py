"""Just-in-time build and loading of the ppap_ext operator libraries.

Two shared libraries are built with torch.utils.cpp_extension.load (ninja):

* ``ppap_ext_cpu``  - defines the ``ppap_ext`` op schemas and the CPU kernels;
  always built.
* ``ppap_ext_cuda`` - registers the CUDA kernels for the same ops; built only
  when ``torch.cuda.is_available()`` and nvcc is found, for the architectures
  of TORCH_CUDA_ARCH_LIST (default: the visible GPUs, with PTX of the highest;
  without a GPU "8.0;9.0+PTX").

Both are plain libraries (no Python module): loading one runs its
TORCH_LIBRARY registrations and the ops appear under ``torch.ops.ppap_ext``.
Builds go to ``ext/build/<name>`` (or ``$TORCH_EXTENSIONS_DIR/<name>``; the
CUDA folder's name carries the architectures, e.g. ``ppap_ext_cuda_sm80_90_ptx``,
so that machines with different GPUs sharing a checkout keep separate builds)
and are reused until a source or flag changes; ``MAX_JOBS`` limits the parallel
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
SHIM_NAME = "ppap_ext_shim"
CPU_SOURCES = ("ops_cpu.cpp", "topk_cpu.cpp", "crf_cpu.cpp")
CUDA_SOURCES = ("ops_cuda.cpp", "topk_cuda.cu", "crf_cuda.cu")
# The CUDA sources compiled as C++ against the host emulation of CUDA
# (csrc/shim/cuda_shim.h), for the tests: the kernels' logic runs on the CPU.
SHIM_SOURCES = ("shim/ops_shim.cpp", "shim/kernels_shim.cpp", "shim/cuda_shim.cpp")
# Used when no GPU is visible to pick architectures (e.g. compile-only checks).
# PTX of the highest architecture lets newer GPUs (Blackwell, ...) JIT-compile
# the kernels; without any PTX they fail at the first launch.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# OpenMP is what makes at::parallel_for parallel: it is a header template that
# runs serially unless the including file is compiled with _OPENMP.  The
# library then shares the libgomp that torch has already loaded (same soname).
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
# No contraction of a * b + c into fused multiply-adds, on either side: the
# lattice geometry (csrc/lattice_geometry.h) is shared by the CPU and CUDA
# kernels and must round the same way in both (nvcc contracts by default,
# which moved the CUDA CRF from pydensecrf by up to 2.4e-4 at 480x640, 27 classes).
CXX_FLAGS = ["-O3", "-ffp-contract=off", *OPENMP_FLAGS]
# Hidden symbols: the emulation defines the same ppap::*_cuda functions as the
# real CUDA library, which a GPU machine's test run loads into the same process.
SHIM_FLAGS = ["-DPPAP_CUDA_SHIM", "-fvisibility=hidden"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "--fmad=false", "-Xcompiler=-ffp-contract=off"]

_state_lock = threading.Lock()
_loaded: dict[str, str] = {}  # library name -> path of the loaded .so
_cuda_ready: str | None = None  # the CUDA library, once loaded and found to run on the GPUs


class BuildError(RuntimeError):
    """The extension could not be built or loaded (message is one line)."""



def cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" warning: on a machine without
    a GPU that is the normal case (the CPU library is all that is built), and a stray line under a one-line
    error reads like a second problem."""
    import logging
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as module
    finally:
        log.setLevel(level)
    return module

def build_root() -> Path:
    """Directory holding one build folder per library."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else _HERE / "build"


def nvcc_path() -> str | None:
    """Path of the nvcc that cpp_extension would use, or None."""
    CUDA_HOME = cpp_extension().CUDA_HOME

    if CUDA_HOME:
        candidate = Path(CUDA_HOME) / "bin" / "nvcc"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def cuda_buildable() -> bool:
    """True when the CUDA library should be built: a GPU and nvcc are present."""
    return torch.cuda.is_available() and torch.version.cuda is not None and nvcc_path() is not None


def cuda_unusable_reason() -> str | None:
    """Why CUDA tensors cannot use the kernels here (one line), or None when
    they can: a GPU is visible, PyTorch has CUDA, nvcc is present, and the
    architectures to build run on every visible GPU.  (The build itself may
    still fail; that raises BuildError on use.)"""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    if nvcc_path() is None:
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)"
    try:
        check_devices_supported(cuda_arch_list())
    except BuildError as exc:
        return str(exc).removeprefix("ext: ")
    return None


def cuda_usable() -> bool:
    """True when CUDA tensors can use the kernels (see cuda_unusable_reason)."""
    return cuda_unusable_reason() is None


def load_cpu() -> str:
    """Builds (if needed) and loads the CPU library; returns its path."""
    return _load(CPU_NAME, CPU_SOURCES, with_cuda=False)


def load_shim() -> str:
    """Builds (if needed) and loads the CUDA emulation library (tests only;
    needs no nvcc and no GPU): torch.ops.ppap_ext_shim.topk_neighbors and
    .dense_crf run the CUDA implementations on CPU tensors."""
    load_cpu()
    return _load(SHIM_NAME, SHIM_SOURCES, with_cuda=False, extra_cflags=SHIM_FLAGS)


def load_cuda() -> str:
    """Builds (if needed) and loads the CUDA library (after the CPU one).

    Raises BuildError if the library's architectures cannot run on a visible
    GPU (checked before building, and against the built gencode flags).
    """
    global _cuda_ready
    if _cuda_ready is not None:  # built, loaded and checked (every CUDA op call gets here)
        return _cuda_ready
    load_cpu()  # the schemas must exist before CUDA kernels register for them
    if torch.version.cuda is None:
        raise BuildError("ext: this PyTorch build has no CUDA support; CUDA kernels cannot be "
                         "built")
    if nvcc_path() is None:
        raise BuildError("ext: CUDA tensors need the CUDA kernels, but nvcc was not found; "
                         "install the CUDA toolkit or set CUDA_HOME")
    archs = cuda_arch_list()
    check_devices_supported(archs)
    path = _load(CUDA_NAME, CUDA_SOURCES, with_cuda=True, archs=archs)
    check_devices_supported(archs, built=_built_cuda_targets(Path(path).parent / "build.ninja"))
    _cuda_ready = path
    return path


def build_cuda_only() -> str:
    """Compiles and links the CUDA library without needing a GPU (for checks).

    Architectures come from TORCH_CUDA_ARCH_LIST (default DEFAULT_CUDA_ARCHS
    when no GPU is visible).  The library is loaded too, which only registers
    kernels.
    """
    return load_cuda()


def cuda_build_dir() -> Path:
    """The build folder of the CUDA library for the current architectures."""
    return build_root() / f"{CUDA_NAME}_{cuda_arch_tag(cuda_arch_list())}"


_CUDA_LIB_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")


def _cuda_link_flags(build_dir: Path) -> list[str]:
    """-L for the CUDA runtime of the toolkit that compiles the kernels.

    cpp_extension links `-lcudart` from CUDA_HOME/lib64 (or lib), which fails
    (a) where CUDA_HOME is derived from an nvcc symlink without resolving it
    (/usr/local/bin/nvcc -> /usr/local/cuda/bin/nvcc gives /usr/local) and
    (b) with NVIDIA's toolkit from PyPI (CUDA_HOME inside nvidia/cu13), whose
    lib/ holds only the runtime itself, libcudart.so.13, without the
    libcudart.so link that -lcudart looks for.  The runtime is searched in
    that toolkit only (CUDA_HOME, the resolved nvcc, nvcc's own TOP), never in
    another toolkit on the machine; a runtime present only as libcudart.so.N
    gets a libcudart.so link to it in the build folder.
    """
    CUDA_HOME = cpp_extension().CUDA_HOME

    homes = [Path(CUDA_HOME)] if CUDA_HOME else []
    nvcc = nvcc_path()
    if nvcc:
        homes.append(Path(nvcc).resolve().parent.parent)
        homes.extend(_nvcc_toolkit_dirs(nvcc))  # nvcc may be a wrapper script
    for home in dict.fromkeys(homes):
        for sub in _CUDA_LIB_DIRS:
            lib = home / sub
            if (lib / "libcudart.so").exists():
                return [f"-L{lib}"]
            runtime = _versioned_cudart(lib)
            if runtime is not None:
                link_dir = build_dir / "cudart"
                link_dir.mkdir(parents=True, exist_ok=True)
                staged = link_dir / f".libcudart.so.{os.getpid()}"  # replaced atomically:
                staged.unlink(missing_ok=True)                        # builds may race here
                staged.symlink_to(runtime)
                os.replace(staged, link_dir / "libcudart.so")
                return [f"-L{link_dir}"]
    return []


def _versioned_cudart(lib: Path) -> Path | None:
    """lib/libcudart.so.N (N: this PyTorch's CUDA major version if present,
    else the highest), resolved; None if there is none."""
    found = sorted(lib.glob("libcudart.so.*"), key=lambda p: [int(x) if x.isdigit() else -1
                                                              for x in p.name.split(".")[2:]])
    if not found:
        return None
    major = (torch.version.cuda or "").split(".")[0]
    exact = [p for p in found if p.name == f"libcudart.so.{major}"]
    return (exact or found)[-1].resolve()


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


# ------------------------------------------------------------- CUDA architectures
#
# TORCH_CUDA_ARCH_LIST entries are "M.m", "M.m+PTX" or "M.ma" / "M.mf"
# (architecture-specific / family variants), separated by ";" or spaces; a
# few names stand for lists.  An entry builds SASS for sm_Mm, and with +PTX
# also PTX for compute_Mm.  SASS runs on GPUs of the same major version and
# an equal or higher minor ("a" variants: the same version only); PTX is
# JIT-compiled by the driver for any equal or higher compute capability.

_NAMED_ARCHS = {  # the names of cpp_extension's TORCH_CUDA_ARCH_LIST for recent GPUs
    "Turing": "7.5+PTX",
    "Ampere": "8.0;8.6+PTX",
    "Ada": "8.9+PTX",
    "Hopper": "9.0+PTX",
    "Blackwell": "10.0;10.3;12.0;12.1+PTX",
}
_ARCH_RE = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")


def cuda_arch_list() -> str:
    """The TORCH_CUDA_ARCH_LIST the CUDA library is (to be) built for.

    TORCH_CUDA_ARCH_LIST if set (and not "native"); else the visible GPUs'
    compute capabilities, capped at what this PyTorch supports, with PTX of the
    highest (as cpp_extension derives it); else DEFAULT_CUDA_ARCHS.
    """
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs and archs != "native":
        return archs
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        torch_sms = [int(m.group(1)) for a in torch.cuda.get_arch_list()
                     if (m := re.match(r"sm_(\d+)", a))]
        cap_max = max(((sm // 10, sm % 10) for sm in torch_sms), default=None)
        caps = set()
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            caps.add(min(cap, cap_max) if cap_max else cap)
        entries = [f"{a}.{b}" for a, b in sorted(caps)]
        entries[-1] += "+PTX"
        return ";".join(entries)
    return DEFAULT_CUDA_ARCHS


def parse_arch_list(archs: str) -> list[tuple[int, int, str, bool]] | None:
    """[(major, minor, variant, with_ptx)] of an arch list; None if not understood."""
    text = archs.replace(" ", ";")
    for name in sorted(_NAMED_ARCHS, key=len, reverse=True):
        text = text.replace(name, _NAMED_ARCHS[name])
    entries = []
    for item in filter(None, text.split(";")):
        m = _ARCH_RE.match(item)
        if m is None:
            return None
        entries.append((int(m.group(1)), int(m.group(2)), m.group(3), m.group(4) is not None))
    return entries or None


def cuda_arch_tag(archs: str) -> str:
    """A file-name token for an arch list, e.g. "8.0;9.0+PTX" -> "sm80_90_ptx"."""
    entries = parse_arch_list(archs)
    if entries is None:
        return "arch_" + re.sub(r"[^0-9A-Za-z]+", "_", archs).strip("_").lower()
    return "sm" + "_".join(f"{a}{b}{v}" + ("_ptx" if ptx else "") for a, b, v, ptx in entries)


def _targets_of(entries) -> set[tuple[str, int, int, str]]:
    """{("sm" | "compute", major, minor, variant)} built for parsed entries."""
    targets = set()
    for major, minor, variant, ptx in entries:
        targets.add(("sm", major, minor, variant))
        if ptx:
            targets.add(("compute", major, minor, variant))
    return targets


def _built_cuda_targets(build_ninja: Path) -> set[tuple[str, int, int, str]] | None:
    """The targets of the -gencode flags in a build.ninja (None if unreadable)."""
    try:
        text = build_ninja.read_text()
    except OSError:
        return None
    found = re.findall(r"-gencode[= ]arch=compute_\w+,code=(sm|compute)_(\d+)(\d)([af]?)\b", text)
    targets = {(kind, int(major), int(minor), variant) for kind, major, minor, variant in found}
    return targets or None


def runs_on(targets, capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability can run code built for targets."""
    major, minor = capability
    for kind, t_major, t_minor, variant in targets:
        if variant == "a":
            if (t_major, t_minor) == (major, minor):
                return True
        elif kind == "sm":
            if t_major == major and t_minor <= minor:
                return True
        elif (t_major, t_minor) <= (major, minor):
            return True
    return False


def check_devices_supported(archs: str, built=None) -> None:
    """Raises a one-line BuildError if a visible GPU cannot run the build.

    `built`: the targets actually compiled (from build.ninja); by default those
    that `archs` asks for.  Without a visible GPU, or with an arch list this
    module does not understand, there is nothing to check.
    """
    if built is None:
        entries = parse_arch_list(archs)
        if entries is None:
            return
        built = _targets_of(entries)
    if not torch.cuda.is_available():
        return
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        if not runs_on(built, cap):
            have = ", ".join(f"{k}_{a}{b}{v}" for k, a, b, v in sorted(built))
            raise BuildError(
                f"ext: the CUDA kernels are built for TORCH_CUDA_ARCH_LIST={archs!r} ({have}), "
                f"which cannot run on GPU {i} ({torch.cuda.get_device_name(i)}, compute capability "
                f"{cap[0]}.{cap[1]}); set TORCH_CUDA_ARCH_LIST to include it, e.g. "
                f"TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}+PTX\", or unset it to build for the "
                "visible GPUs")


def _load(name: str, sources: tuple[str, ...], with_cuda: bool, archs: str | None = None,
          extra_cflags: list[str] | None = None) -> str:
    """Builds and loads library `name` once per process; `archs`: the
    TORCH_CUDA_ARCH_LIST of a CUDA build (it also names the build folder)."""
    with _state_lock:
        if name in _loaded:
            return _loaded[name]
        _check_toolchain(with_cuda)
        cflags = list(CXX_FLAGS) + list(extra_cflags or [])
        cuda_flags = list(NVCC_FLAGS)
        build_dir = build_root() / name
        if with_cuda:
            archs = archs or cuda_arch_list()
            tag = cuda_arch_tag(archs)
            build_dir = build_root() / f"{name}_{tag}"
            cflags.append(f"-DPPAP_CUDA_ARCHS={tag}")
            cuda_flags.append(f"-DPPAP_CUDA_ARCHS={tag}")
        build_dir.mkdir(parents=True, exist_ok=True)
        _wait_for_lock(build_dir / "lock", name)
        if not any(build_dir.glob(f"{name}*.so")):
            print(f"ext: compiling {name} in {build_dir} (first use; this takes a few minutes)",
                  file=sys.stderr, flush=True)
        saved_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        try:
            load = cpp_extension().load

            if with_cuda:  # cpp_extension reads the architectures from the environment
                os.environ["TORCH_CUDA_ARCH_LIST"] = archs
            path = load(
                name=name,
                sources=[str(CSRC / s) for s in sources],
                extra_cflags=cflags,
                extra_cuda_cflags=cuda_flags if with_cuda else None,
                extra_include_paths=[str(CSRC)],
                extra_ldflags=OPENMP_FLAGS + (_cuda_link_flags(build_dir) if with_cuda else []),
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=os.environ.get("PPAP_EXT_VERBOSE", "") not in ("", "0"),
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            raise _build_failure(name, build_dir, exc) from None
        finally:
            if with_cuda:
                if saved_archs is None:
                    os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = saved_archs
        _loaded[name] = str(path)
        return _loaded[name]


def _check_toolchain(with_cuda: bool) -> None:
    """Fails fast, in one line, on a missing compiler or ninja."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"ext: C++ compiler '{cxx}' not found; install g++ "
                         "(e.g. apt-get install g++) or set CXX")
    is_ninja_available = cpp_extension().is_ninja_available

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
