"""Process-wide allocator settings for the model and codec processes.

glibc's malloc serves large blocks (from 128 KiB, a threshold that only grows as such blocks are
freed) with fresh `mmap`s and gives them back on `free`, so every new tensor of a few MB costs a
page fault per 4 KiB and the kernel's zeroing of those pages. A KV codec pass over one 2,000-token
SmolLM2 layer allocates a dozen such temporaries: on this machine that doubled the decode time and
made timings depend on the allocation history (docs/benchmarks.md, "KV codec"). Keeping freed
memory in the heap lets the next tensor reuse pages that are already mapped. The PyTorch CPU
tuning guide recommends jemalloc or tcmalloc for the same reason; this needs neither.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap before returning it
TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and keep freed memory mapped; True if applied
    (glibc only: elsewhere the call does nothing and returns False)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    if not ok:
        log.debug("mallopt refused an allocator setting")
    return ok
