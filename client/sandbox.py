"""Confine a hospital's ClientApp process with Linux Landlock: it may read the code, the model cache
and the data folders, write only its state dir (and the model cache), and open TCP connections only
to its SuperNode's local runtime port. Everything else — the node's private key, the coordinator's
certificates, other folders, any other host or port — is refused by the kernel (``EACCES``).

Landlock (Linux >= 5.13; TCP rules from ABI 4, Linux 6.7) is an unprivileged, per-process allow-list
that survives into every thread and child. It needs no root and no extra package: three system
calls, bound here with ``ctypes`` exactly as the kernel documents them (``linux/landlock.h``).
A machine without it gets :class:`SandboxUnavailable` — the caller decides, never a silent no-op.
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path
from typing import Iterable, Optional

# linux/landlock.h
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446    # the same numbers on x86_64 and aarch64
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_PR_SET_NO_NEW_PRIVS = 38

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ALL_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_FILE_ONLY = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (1 << 14) | (1 << 15)   # + TRUNCATE, IOCTL_DEV
READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

# What any Python process with torch needs to read besides its own code: shared libraries, CPU and
# memory facts, devices, the dynamic loader's cache, time zone and certificate stores.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/proc", "/sys", "/etc/ld.so.cache", "/etc/localtime",
               "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/resolv.conf",
               "/etc/ssl", "/etc/os-release")
SYSTEM_WRITE = ("/dev",)   # /dev/null, /dev/shm (torch's shared memory), /dev/nvidia* on a GPU


class SandboxUnavailable(RuntimeError):
    """This kernel has no Landlock (or not the ABI a rule needs)."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The kernel's Landlock ABI (0: none)."""
    if platform.system() != "Linux":
        return 0
    libc = _libc()
    version = libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(0, int(version))


def _fs_all(abi: int) -> int:
    return _FS_ALL_ABI.get(abi, (1 << 16) - 1)


def confine(*, read: Iterable[str | os.PathLike], write: Iterable[str | os.PathLike],
            connect_ports: Optional[Iterable[int]] = None) -> int:
    """Restrict this process (and its future threads and children) for good. ``read``: paths it may
    read and execute below; ``write``: paths it may also write, create and delete below;
    ``connect_ports``: the only TCP ports it may connect to (None: TCP not restricted; needs ABI 4).
    Paths that do not exist are skipped. Returns the ABI used."""
    abi = abi_version()
    if abi < 1:
        raise SandboxUnavailable("this kernel has no Landlock (Linux >= 5.13 with landlock in its LSM list)")
    if connect_ports is not None and abi < 4:
        raise SandboxUnavailable(f"Landlock ABI {abi} cannot restrict TCP connections (needs ABI 4, Linux 6.7)")
    libc = _libc()
    fs_all = _fs_all(abi)
    attr = _RulesetAttr(handled_access_fs=fs_all,
                        handled_access_net=(NET_BIND_TCP | NET_CONNECT_TCP) if connect_ports is not None else 0,
                        scoped=(SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise SandboxUnavailable(f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}")
    try:
        for paths, access in ((read, READ), (write, fs_all)):
            for path in paths:
                _allow_path(libc, ruleset, Path(path), access & fs_all)
        for port in connect_ports or ():
            rule = _NetPortAttr(allowed_access=NET_CONNECT_TCP, port=int(port))
            if libc.syscall(_ADD_RULE, ruleset, _RULE_NET_PORT, ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
                raise SandboxUnavailable(f"landlock_add_rule(port {port}): {os.strerror(ctypes.get_errno())}")
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise SandboxUnavailable(f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
        if libc.syscall(_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) < 0:
            raise SandboxUnavailable(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)
    return abi


def _allow_path(libc, ruleset: int, path: Path, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not path.is_dir():
            access &= _FILE_ONLY
        rule = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
        if libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
            raise SandboxUnavailable(f"landlock_add_rule({path}): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def covering(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> Optional[str]:
    """The first of ``roots`` that contains ``path`` (after resolving links), or None."""
    target = Path(path).resolve()
    for root in roots:
        r = Path(root).resolve()
        if target == r or r in target.parents:
            return str(root)
    return None
