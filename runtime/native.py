"""Building and locating the native kernel library (runtime/native/pimc_ops.cc).

The library is compiled from the project's own source on first use (or by
``pimc native --build``) into a cache folder, keyed by a hash of the source and
the compiler flags, and registered with
``SessionOptions.register_custom_ops_library``; its kernels then take
precedence over the model-local function bodies.

onnxruntime's Python wheel ships no C/C++ headers.  They are looked up in this
order:

1. ``$PIMC_ORT_INCLUDE``: a folder holding ``onnxruntime_cxx_api.h``;
2. the system include paths: ``/usr/include/onnxruntime``,
   ``/usr/local/include/onnxruntime``, ``/usr/include``, ``/usr/local/include``;
3. pimc's cache, ``$PIMC_CACHE/ort-headers`` (default ``~/.cache/pimc``),
   filled by ``pimc native --fetch-headers``: it downloads Debian's
   ``libonnxruntime-dev`` package (trixie, API version 21, accepted by newer
   onnxruntime releases) with ``apt-get download`` through a private apt
   configuration that reuses the machine's Debian mirror, without touching the
   system's sources, and unpacks only its headers.

Where no headers or no C++ compiler are found, pimc says so once on stderr and
runs the function bodies.  ``PIMC_NATIVE=0`` disables the native library;
``PIMC_NATIVE_PORTABLE=1`` builds it without ``-march=native`` (no AVX: the portable
loops, same values).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pimc.core.errors import PimcError

SOURCE = Path(__file__).parent / "native" / "pimc_ops.cc"
# Built on the machine that runs it, so -march=native (AVX2 where there is one);
# -ffp-contract=off keeps a*b+c unfused, as in the ONNX function bodies.  The cache
# key includes the CPU's flags, so a shared cache never serves another CPU's build.
FLAGS = ["-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared"]
# PIMC_NATIVE_PORTABLE=1: build for the baseline x86-64 (or the compiler's default target)
# instead, without AVX: the portable loops of every kernel (the tests compare the two builds).
PORTABLE_FLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared"]
HEADER = "onnxruntime_cxx_api.h"
SYSTEM_DIRS = ["/usr/include/onnxruntime", "/usr/local/include/onnxruntime", "/usr/include", "/usr/local/include"]
DEBIAN_SUITE, DEBIAN_PACKAGE = "trixie", "libonnxruntime-dev"

_state: dict = {}


def cache_dir() -> Path:
    return Path(os.environ.get("PIMC_CACHE", Path.home() / ".cache" / "pimc"))


def find_headers() -> Path | None:
    cands = []
    if os.environ.get("PIMC_ORT_INCLUDE"):
        cands.append(Path(os.environ["PIMC_ORT_INCLUDE"]))
    cands += [Path(d) for d in SYSTEM_DIRS]
    cands.append(cache_dir() / "ort-headers" / "usr" / "include" / "onnxruntime")
    for d in cands:
        if (d / HEADER).is_file():
            return d
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def build(force: bool = False) -> Path:
    """Compile the library if needed; return its path.  Raises PimcError when impossible."""
    inc = find_headers()
    if inc is None:
        raise PimcError("onnxruntime C++ headers not found (set PIMC_ORT_INCLUDE, install libonnxruntime-dev, "
                        "or run 'pimc native --fetch-headers')")
    cxx = _compiler()
    if cxx is None:
        raise PimcError("no C++ compiler found (set CXX or install g++)")
    flags = PORTABLE_FLAGS if os.environ.get("PIMC_NATIVE_PORTABLE", "0") == "1" else FLAGS
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags + [str(inc), cxx, _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / "native" / key / "libpimc_ops.so"
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags, f"-I{inc}", str(SOURCE), "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        raise PimcError(f"building the native kernels failed: {' '.join(cmd)}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'no output'}")
    os.replace(tmp, out)
    return out


def api_versions(inc: Path | None = None) -> tuple[int | None, int]:
    """(the C API version of the headers, the newest C API version the installed
    onnxruntime serves).  onnxruntime's C API is versioned and backward compatible:
    a library built against API N runs on any onnxruntime whose API version is >= N
    (the version is onnxruntime's minor release number: 1.31 serves 1..31)."""
    import re

    import onnxruntime
    inc = inc or find_headers()
    header = None
    if inc is not None and (inc / "onnxruntime_c_api.h").is_file():
        m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", (inc / "onnxruntime_c_api.h").read_text(errors="ignore"))
        header = int(m.group(1)) if m else None
    return header, int(onnxruntime.__version__.split(".")[1])


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def native_library() -> Path | None:
    """The built library, or None (said once on stderr) when it cannot be had."""
    if "path" in _state:
        return _state["path"]
    path = None
    if os.environ.get("PIMC_NATIVE", "1") != "0":
        try:
            path = build()
        except PimcError as e:
            print(f"pimc: note: native kernels unavailable, using the ONNX function bodies: {e}", file=sys.stderr)
    _state["path"] = path
    return path


def isa(lib: Path) -> str:
    """Which integer product the built library's fused array ops use: "vnni" (AVX-512 VNNI)
    or "portable" (plain loops; a CPU without AVX-512 VNNI, or PIMC_NATIVE_PORTABLE=1)."""
    import ctypes
    f = ctypes.CDLL(str(lib)).PimcNativeIsa
    f.restype = ctypes.c_char_p
    return f().decode()


def fetch_headers(verbose: bool = True) -> Path:
    """Download Debian's libonnxruntime-dev and unpack its headers into the cache."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise PimcError("--fetch-headers needs apt-get and dpkg-deb (a Debian-based system); "
                        "otherwise set PIMC_ORT_INCLUDE to onnxruntime's include folder")
    mirror = _debian_mirror()
    root = cache_dir() / "apt"
    for d in ("lists/partial", "cache/archives/partial", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    signed = f"[signed-by={keyring}] " if Path(keyring).is_file() else ""
    (root / "etc" / "sources.list").write_text(f"deb {signed}{mirror} {DEBIAN_SUITE} main\n")
    opts = [f"-oDir::Etc::SourceList={root}/etc/sources.list", "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={root}/lists", f"-oDir::Cache={root}/cache", "-oDebug::NoLocking=1",
            "-oAPT::Sandbox::User=root"]
    for cmd in (["apt-get", *opts, "update"], ["apt-get", *opts, "download", DEBIAN_PACKAGE]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
        if r.returncode != 0:
            raise PimcError(f"'{' '.join(cmd[:1] + cmd[-1:])}' failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    debs = sorted(root.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        raise PimcError(f"apt-get download {DEBIAN_PACKAGE} produced no package file")
    dest = cache_dir() / "ort-headers"
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(dest)], check=True)
    inc = dest / "usr" / "include" / "onnxruntime"
    if not (inc / HEADER).is_file():
        raise PimcError(f"{debs[-1].name} holds no {HEADER}")
    if verbose:
        print(f"headers from {debs[-1].name} in {inc}")
    return inc


def _debian_mirror() -> str:
    """The first Debian mirror configured on this machine (deb822 or one-line format)."""
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for f in files:
        if not f.is_file():
            continue
        for line in f.read_text(errors="ignore").splitlines():
            line = line.strip()
            if line.startswith("URIs:") and "debian" in line and "security" not in line:
                return line.split()[1]
            if line.startswith("deb ") and "debian" in line and "security" not in line:
                parts = [p for p in line.split() if p.startswith("http")]
                if parts:
                    return parts[0]
    return "http://deb.debian.org/debian"
