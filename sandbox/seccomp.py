"""The seccomp filter of every step: no new user namespaces, no kernel keyrings.

A user namespace inside a step would hand its processes a full capability
set over new kernel surface (mounts, netfilter, ...) that the step's own
namespace withholds. bubblewrap's ``--disable-userns`` cannot be combined
with the id-map handshake (``--userns-block-fd``), so the step gets this
classic BPF program through ``--seccomp`` instead: ``unshare`` and ``clone``
with CLONE_NEWUSER fail with EPERM; ``clone3``, whose flags a filter cannot
read, fails with ENOSYS, so that libc falls back to ``clone``; the keyring
calls (``add_key``, ``request_key``, ``keyctl``) fail with EPERM. Everything
else is allowed. The compat ABIs (i386 on x86_64, x32, arm on arm64) get
the same rules by their own numbers, so 32-bit programs keep working but
cannot slip past.
"""

from __future__ import annotations

import errno
import os
import platform
import struct

__all__ = ["filter_fd", "supported"]

CLONE_NEWUSER = 0x10000000

# (audit arch, unshare, clone, clone3, add_key, request_key, keyctl) per ABI.
_X86_64 = (0xC000003E, 272, 56, 435, 248, 249, 250)
_I386 = (0x40000003, 310, 120, 435, 286, 287, 288)
_AARCH64 = (0xC00000B7, 97, 220, 435, 217, 218, 219)
_ARM = (0x40000028, 337, 120, 435, 309, 310, 311)
_ABIS = {"x86_64": (_X86_64, _I386), "aarch64": (_AARCH64, _ARM)}
_X32_BIT = 0x40000000

# BPF opcodes (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K, _AND_K = 0x20, 0x15, 0x45, 0x06, 0x54
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg0's low word)


def supported() -> bool:
    """Whether this machine's ABIs are known (else steps run without the filter)."""
    return platform.machine() in _ABIS


def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _abi_rules(abi: tuple[int, ...], mask_x32: bool) -> list[bytes]:
    """Rules for one ABI, entered with the arch loaded; falls through if it is another."""
    _arch, unshare, clone, clone3, *keys = abi
    deny_eperm, deny_nosys = _ERRNO | errno.EPERM, _ERRNO | errno.ENOSYS
    body = [_insn(_LD_W_ABS, _NR)]
    if mask_x32:
        body.append(_insn(_AND_K, ~_X32_BIT & 0xFFFFFFFF))
    body.append(_insn(_JEQ_K, clone3, 0, 1))
    body.append(_insn(_RET_K, deny_nosys))
    for key_call in keys:
        body += [_insn(_JEQ_K, key_call, 0, 1), _insn(_RET_K, deny_eperm)]
    # unshare or clone: EPERM when arg0 (the flags) has CLONE_NEWUSER.
    body += [_insn(_JEQ_K, unshare, 1, 0), _insn(_JEQ_K, clone, 0, 3)]
    body += [_insn(_LD_W_ABS, _ARG0), _insn(_JSET_K, CLONE_NEWUSER, 0, 1)]
    body.append(_insn(_RET_K, deny_eperm))
    body.append(_insn(_RET_K, _ALLOW))
    # Enter only for this ABI's arch; the arch is still loaded in the jump.
    return [_insn(_JEQ_K, _arch, 0, len(body)), *body]


def program() -> bytes:
    """The filter for this machine's ABIs; any other arch is allowed through
    (the kernel runs no other ABI on these machines)."""
    native, compat = _ABIS[platform.machine()]
    insns = [_insn(_LD_W_ABS, _ARCH)]
    insns += _abi_rules(native, mask_x32=native is _X86_64)
    insns += [_insn(_LD_W_ABS, _ARCH)]
    insns += _abi_rules(compat, mask_x32=False)
    insns.append(_insn(_RET_K, _ALLOW))
    return b"".join(insns)


def filter_fd() -> int | None:
    """A descriptor bwrap reads the filter from (``--seccomp``), or None where unsupported."""
    if not supported():
        return None
    fd = os.memfd_create("amber-seccomp", os.MFD_CLOEXEC)
    data = program()
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
