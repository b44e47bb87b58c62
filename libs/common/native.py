"""The KV codec's C kernels (`rans_simd.c`: the entropy coder; `transform_simd.c`: int4's product
with its transform and the rounding), built on first use into one library in the user's cache.

`cc -O3` compiles both sources into `cache_root()/thunderserve_simd-<hash>.so` (a second or so,
once per source version; an atomic rename, so processes building at once each leave a whole
library). Every kernel carries its own target attribute, so the library loads on any x86-64, and
`rans_simd_level()` says which kernels this CPU runs: 2 AVX-512 (F/BW/VL/DQ), 1 AVX2. Where there is
no compiler, no x86-64 or neither instruction set, the callers run their numba / torch paths.
THUNDERSERVE_SIMD=0 forces those paths, =avx2 caps the level at AVX2 (for tests and measurements).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from thunderserve.common.config import cache_root, env

log = logging.getLogger(__name__)

SOURCES = ("rans_simd.c", "transform_simd.c")
LEVELS = {2: "avx512", 1: "avx2"}

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# name -> (argument types, result type) of every exported kernel
_SIGNATURES = {
    "rans_simd_level": ([], _INT),
    "rans_simd_encode_rows": ([_INT, _P, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _I64], _I64),
    "rans_simd_decode_rows": ([_INT, _P, _I64, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64], _I64),
    "rans_simd_row_stats": ([_INT, _P, _I64, _I64, _P, _P, _P, _P], _I64),
    "transform_simd_fits": ([_I64, _INT], _INT),
    "transform_simd_rows": ([_INT, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, ctypes.c_double, _P, _P,
                             _P, _P, _P], _INT),
}


@functools.cache
def kernels() -> tuple[ctypes.CDLL, int] | None:
    """The built library and the kernel level to use (2: AVX-512, 1: AVX2), or None (see above)."""
    setting = str(env("SIMD", "1")).lower()
    if setting == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    here = Path(__file__).parent
    flags = ["-O3", "-shared", "-fPIC"]
    try:
        digest = hashlib.sha256(" ".join(flags).encode())
        for name in SOURCES:
            digest.update((here / name).read_bytes())
        so = cache_root() / f"thunderserve_simd-{digest.hexdigest()[:16]}.so"
        if not so.exists():
            cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
            if cc is None:
                log.info("no C compiler: the KV codec runs its numba and torch paths")
                return None
            so.parent.mkdir(parents=True, exist_ok=True)
            tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
            sources = [str(here / name) for name in SOURCES]
            subprocess.run([cc, *flags, "-o", str(tmp), *sources, "-lm"], check=True, capture_output=True, timeout=300)
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the KV codec's C kernels could not be built (%s): using the numba and torch paths", exc)
        return None
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    level = min(int(lib.rans_simd_level()), 1 if setting == "avx2" else 2)
    return (lib, level) if level >= 1 else None


def level_name() -> str | None:
    """"avx512", "avx2", or None where the kernels do not run."""
    found = kernels()
    return LEVELS[found[1]] if found else None
