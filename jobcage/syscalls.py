"""The few Linux system calls Python 3.11's os module lacks: setns, unshare, mount,
umount2 (os.setns and os.unshare arrive in 3.12). One libc handle for the package."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 2

# The interpreter's own symbols, libc's included: ctypes.util.find_library("c") would
# run `ldconfig -p` in every `jobcage run` (docs/performance.md).
libc = ctypes.CDLL(None, use_errno=True)
libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
libc.unshare.argtypes = (ctypes.c_int,)
libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
)
libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def check(result: int, what: str) -> None:
    """Raise OSError with errno for a libc call that returned non-zero."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
