"""The step filter's decisions for every ABI it covers, by running its classic
BPF program here (pure logic; test_step_network.py runs it in real steps)."""

from __future__ import annotations

import errno
import struct

import pytest

from amber.sandbox import seccomp

ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
NEWUSER = seccomp.CLONE_NEWUSER


def run_filter(program: bytes, arch: int, nr: int, arg0: int = 0) -> int:
    """A classic BPF interpreter for the opcodes the filter uses."""
    data = struct.pack("=iIQ", nr, arch, 0) + struct.pack("=Q", arg0) + bytes(40)
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # ld w abs
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x54:  # and k
            acc &= k
        elif code == 0x15:  # jeq k
            pc += jt if acc == k else jf
        elif code == 0x45:  # jset k
            pc += jt if acc & k else jf
        elif code == 0x06:  # ret k
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


X86_64, I386 = 0xC000003E, 0x40000003
AARCH64, ARM = 0xC00000B7, 0x40000028
X32 = 0x40000000
CASES = [
    # (machine, arch, unshare, clone, clone3, keyctl, an ordinary call)
    ("x86_64", X86_64, 272, 56, 435, 250, 0),
    ("x86_64", I386, 310, 120, 435, 288, 3),
    ("x86_64", X86_64, X32 | 272, X32 | 56, X32 | 435, X32 | 250, X32 | 0),
    ("aarch64", AARCH64, 97, 220, 435, 219, 63),
    ("aarch64", ARM, 337, 120, 435, 311, 3),
]


@pytest.mark.parametrize(
    ("machine", "arch", "unshare", "clone", "clone3", "keyctl", "other"),
    CASES,
    ids=["x86_64", "i386", "x32", "aarch64", "arm"],
)
def test_the_filter_refuses_user_namespaces_and_keyrings_on_every_abi(
    monkeypatch: pytest.MonkeyPatch, machine, arch, unshare, clone, clone3, keyctl, other
) -> None:
    monkeypatch.setattr(seccomp.platform, "machine", lambda: machine)
    program = seccomp.program()
    verdict = lambda nr, arg0=0: run_filter(program, arch, nr, arg0)  # noqa: E731
    assert verdict(unshare, NEWUSER) == EPERM
    assert verdict(unshare, NEWUSER | 0x20000) == EPERM  # with CLONE_NEWNS too
    assert verdict(unshare, 0x20000) == ALLOW  # a mount namespace alone is the kernel's call
    assert verdict(clone, NEWUSER | 0x11) == EPERM
    assert verdict(clone, 0x01200011) == ALLOW  # fork(): CLONE_CHILD_SETTID | ... | SIGCHLD
    assert verdict(clone3) == ENOSYS
    assert verdict(keyctl) == EPERM
    assert verdict(other) == ALLOW
