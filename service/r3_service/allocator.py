"""The C allocator under the service: what it holds (`/metrics`), and the glibc settings that keep
a long run's resident memory flat (applied at start-up by `r3-serve`).

PyTorch's CPU tensors, the Rust tokenizer and CPython's large objects all come from `malloc`.
Under glibc each thread that allocates while another holds an arena gets one of its own (up to
8 per core), and freed memory inside an arena returns to the system only from its top: a batch's
activations freed under a small live block stay resident. Fewer arenas and a periodic
`malloc_trim` (which gives back every whole free page, not only the top) hold that flat. Elsewhere
(musl, macOS, a preloaded jemalloc) these calls are skipped and the figures are absent."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

M_ARENA_MAX = -8  # mallopt's parameter, from glibc's malloc.h

_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
           "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


@cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, when the process runs on it and its allocator is not replaced."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None
    return libc


def tune(arena_max: int) -> dict[str, int]:
    """Cap glibc's arenas at `arena_max` (0: leave them); call before the worker threads start.
    Returns what was applied."""
    libc = _glibc()
    if libc is None or not arena_max or libc.mallopt(M_ARENA_MAX, arena_max) != 1:
        return {}
    return {"arena_max": arena_max}


def trim() -> bool:
    """Give every whole free page of every arena back to the system (`malloc_trim(0)`)."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def heap() -> dict[str, int]:
    """glibc's own account, in bytes: `arena` (obtained from the system by sbrk and heaps, all
    arenas), `in_use` and `free` within them, `mmapped` (blocks mapped on their own); {} when
    not on glibc."""
    libc = _glibc()
    if libc is None:
        return {}
    info = libc.mallinfo2()
    return {"arena": info.arena, "in_use": info.uordblks, "free": info.fordblks, "mmapped": info.hblkhd}
