"""A strict, streaming tar reader, and a fast tar header writer.

Python's ``tarfile`` reads a whole PAX header into memory whatever its
declared size and accepts much that a hostile layer could use, so layers and
archives are parsed here: one header at a time, every length bounded before
anything is read, unknown entry types refused. Headers are written here too
(POSIX ustar plus PAX records, the format every image tool reads): tarfile
costs tens of microseconds per entry, a visible share of an export.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from amber.daemon.oci.spec import OciError

BLOCK = 512
MAX_NAME = 4096  # PATH_MAX: longer paths cannot exist on Linux
MAX_PAX = 1 << 20

REGULAR, HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO = (
    "file",
    "hardlink",
    "symlink",
    "chardev",
    "blockdev",
    "dir",
    "fifo",
)
_TYPES = {
    b"0": REGULAR,
    b"\0": REGULAR,
    b"7": REGULAR,  # contiguous file: a regular file everywhere but on old Masscomp
    b"1": HARDLINK,
    b"2": SYMLINK,
    b"3": CHAR,
    b"4": BLOCKDEV,
    b"5": DIRECTORY,
    b"6": FIFO,
}
_ZERO_BLOCK = bytes(BLOCK)
_OCTAL = re.compile(rb"[0-7]+")
_HIGH_BYTES = bytes(range(0x80, 0x100))
_PAX_TIME = re.compile(rb"(-?)(\d{1,20})(?:\.(\d{0,30}))?")


@dataclass
class Member:
    """One tar entry, with PAX and GNU extensions already applied."""

    name: bytes
    type: str  # REGULAR, HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int  # bytes of data that follow (0 for all but regular files)
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[bytes, bytes] = field(default_factory=dict)
    offset: int = 0  # where the data starts in the (uncompressed) stream

    def xattrs(self) -> dict[bytes, bytes]:
        prefix = b"SCHILY.xattr."
        return {k[len(prefix) :]: v for k, v in self.pax.items() if k.startswith(prefix)}


class TarReader:
    """Iterate over the members of a tar stream; read each one's data in turn.

    The data of a member must be read (or is skipped) before the next member
    is produced. ``seekable`` streams skip data with ``seek``.
    """

    def __init__(
        self,
        stream: BinaryIO,
        *,
        seekable: bool = False,
        max_name: int = MAX_NAME,
        max_pax: int = MAX_PAX,
    ):
        self._stream = stream
        self._seekable = seekable
        self._max_name = max_name
        self._max_pax = max_pax
        self._remaining = 0
        self._padding = 0
        self._global: dict[bytes, bytes] = {}
        self.pos = 0
        self.ended = False

    def __iter__(self) -> Iterator[Member]:
        while True:
            member = self._next()
            if member is None:
                return
            yield member

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member's data (b"" at its end)."""
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        data = self._read_exact(n, "file data")
        self._remaining -= n
        return data

    # -- internals ------------------------------------------------------------

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._stream.read(n)
        if len(data) < n:
            parts = [data]
            got = len(data)
            while got < n:
                more = self._stream.read(n - got)
                if not more:
                    raise OciError(f"tar stream ends inside {what} at offset {self.pos + got}")
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.pos += n
        return data

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self._seekable:
            self._stream.seek(n, io.SEEK_CUR)
            self.pos += n
            return
        while n:
            chunk = self._read_exact(min(n, 1 << 20), "skipped data")
            n -= len(chunk)

    def _block(self) -> bytes | None:
        """The next header block; None at a clean end of stream."""
        data = self._stream.read(BLOCK)
        if not data:
            return None
        if len(data) < BLOCK:
            rest = self._stream.read(BLOCK - len(data))
            data += rest
            if len(data) < BLOCK:
                raise OciError(f"tar stream ends inside a header at offset {self.pos}")
        self.pos += BLOCK
        return data

    def _data(self, size: int, limit: int, what: str) -> bytes:
        if size > limit:
            raise OciError(f"{what} of {size} bytes is over the limit of {limit}")
        data = self._read_exact(size, what)
        self._skip(_pad(size))
        return data

    def _next(self) -> Member | None:
        if self.ended:
            return None
        self._skip(self._remaining + self._padding)
        self._remaining = self._padding = 0
        pax: dict[bytes, bytes] | None = None
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            block = self._block()
            if block is None or block == _ZERO_BLOCK:
                self.ended = True
                return None
            header = _parse_header(block, self.pos - BLOCK)
            flag = header["type"]
            if flag == b"x":
                if pax is not None:
                    raise OciError(f"two PAX headers in a row at offset {self.pos}")
                pax = _parse_pax(self._data(header["size"], self._max_pax, "PAX header"))
            elif flag == b"g":
                self._global.update(
                    _parse_pax(self._data(header["size"], self._max_pax, "global PAX header"))
                )
            elif flag == b"L":
                if long_name is not None:
                    raise OciError(f"two GNU long names in a row at offset {self.pos}")
                long_name = self._data(header["size"], self._max_name + 1, "GNU long name")
                long_name = long_name.rstrip(b"\0")
            elif flag == b"K":
                if long_link is not None:
                    raise OciError(f"two GNU long link names in a row at offset {self.pos}")
                long_link = self._data(header["size"], self._max_name + 1, "GNU long link name")
                long_link = long_link.rstrip(b"\0")
            else:
                return self._member(header, {**self._global, **(pax or {})}, long_name, long_link)

    def _member(
        self,
        h: dict,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> Member:
        pax = {k: v for k, v in pax.items() if v}  # an empty value unsets a record
        name = pax.get(b"path", long_name if long_name is not None else h["name"])
        linkname = pax.get(b"linkpath", long_link if long_link is not None else h["linkname"])
        for value, what in ((name, "name"), (linkname, "link name")):
            if len(value) > self._max_name:
                raise OciError(f"tar entry {what} of {len(value)} bytes is over {self._max_name}")
            if b"\0" in value:
                raise OciError(f"tar entry {what} {value[:100]!r} contains a NUL byte")
        if any(k.startswith(b"GNU.sparse.") for k in pax):
            raise OciError(f"{_show(name)}: sparse tar entries are not supported")
        kind = _TYPES.get(h["type"])
        if kind is None:
            raise OciError(f"{_show(name)}: unsupported tar entry type {h['type']!r}")
        if kind == REGULAR and h["type"] == b"\0" and name.endswith(b"/"):
            kind = DIRECTORY  # pre-POSIX archives mark directories by a trailing slash
        size = _pax_int(pax, b"size", h["size"], name)
        mtime_ns = h["mtime"] * 1_000_000_000
        if b"mtime" in pax:
            mtime_ns = _pax_time_ns(pax[b"mtime"], name)
        if kind != REGULAR:
            size = 0  # header-only types carry no data whatever the size field says
        self._remaining = size
        self._padding = _pad(size)
        return Member(
            name=name,
            type=kind,
            mode=h["mode"] & 0o7777,
            uid=_pax_int(pax, b"uid", h["uid"], name),
            gid=_pax_int(pax, b"gid", h["gid"], name),
            mtime_ns=mtime_ns,
            size=size,
            linkname=linkname,
            devmajor=h["devmajor"],
            devminor=h["devminor"],
            pax=pax,
            offset=self.pos,
        )


def _pad(size: int) -> int:
    return -size % BLOCK


def _show(name: bytes) -> str:
    return repr(name[:200].decode("utf-8", "backslashreplace"))


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


def _number(field_: bytes, what: str, offset: int) -> int:
    if field_ and field_[0] & 0x80:  # base-256 (GNU): big numbers and negative times
        if field_[0] == 0xFF:
            return int.from_bytes(field_, "big", signed=True)
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    text = _cstr(field_).strip(b" ")
    if not text:
        return 0
    if not _OCTAL.fullmatch(text):
        raise OciError(f"bad {what} field {field_!r} in the tar header at offset {offset}")
    return int(text, 8)


def _signed_sum(block: bytes) -> int:
    """The checksum as some old tars computed it, with bytes taken as signed."""
    rest = block[:148] + block[156:]
    high = len(rest) - len(rest.translate(None, _HIGH_BYTES))
    return sum(rest) + 8 * 0x20 - 256 * high


def _parse_header(block: bytes, offset: int) -> dict:
    stored = _number(block[148:156], "checksum", offset)
    unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
    if stored != unsigned and stored != _signed_sum(block):
        raise OciError(f"tar header checksum mismatch at offset {offset} (not a tar stream?)")
    name = _cstr(block[0:100])
    if block[257:265] == b"ustar\x0000":
        prefix = _cstr(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    return {
        "name": name,
        "mode": _number(block[100:108], "mode", offset),
        "uid": _number(block[108:116], "uid", offset),
        "gid": _number(block[116:124], "gid", offset),
        "size": _number(block[124:136], "size", offset),
        "mtime": _number(block[136:148], "mtime", offset),
        "type": block[156:157],
        "linkname": _cstr(block[157:257]),
        "devmajor": _number(block[329:337], "devmajor", offset),
        "devminor": _number(block[337:345], "devminor", offset),
    }


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX records: ``"<len> <key>=<value>\\n"``, each length checked."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if not any(data[pos:]):
            break  # NUL padding after the last record
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > 0 else b""
        if not digits.isdigit():
            raise OciError("malformed PAX record length")
        length = int(digits)
        end = pos + length
        if length <= len(digits) + 3 or end > len(data) or data[end - 1 : end] != b"\n":
            raise OciError("malformed PAX record")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise OciError("malformed PAX record (no key)")
        records[key] = value
        pos = end
    return records


def _pax_int(pax: dict[bytes, bytes], key: bytes, default: int, name: bytes) -> int:
    value = pax.get(key)
    if value is None:
        return default
    if not value.isdigit() or len(value) > 20:
        raise OciError(f"{_show(name)}: bad PAX {key.decode()} {value[:40]!r}")
    return int(value)


def _pax_time_ns(value: bytes, name: bytes) -> int:
    match = _PAX_TIME.fullmatch(value)
    if not match:
        raise OciError(f"{_show(name)}: bad PAX mtime {value[:40]!r}")
    sign, seconds, fraction = match.groups()
    ns = int(seconds) * 1_000_000_000 + int(((fraction or b"") + b"000000000")[:9])
    return -ns if sign else ns


# -- writing ------------------------------------------------------------------

_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12x")
_OCTAL_8 = 8**7
_OCTAL_12 = 8**11
_PAX_NAME = b"././@PaxHeader"
_MAGIC = b"ustar\x0000"
_NO_DEVICE = bytes(16)
_TAIL = bytes(155 + 12)  # prefix (unused: long names go in PAX records) and the pad
_UNAMES = bytes(64)
# The checksum is counted with its own field as 8 spaces; the magic is constant.
_CHECK_BASE = 8 * 0x20 + sum(_MAGIC)
_PAX_HEADERS: dict[int, bytes] = {}  # PAX header block by data size: a few sizes recur
_OWNERS: dict[tuple[int, int, int], tuple[bytes, int]] = {}  # mode, uid, gid fields; their sum


def pax_time(mtime_ns: int) -> bytes:
    """A PAX ``mtime`` value that keeps every nanosecond."""
    sign = b"-" if mtime_ns < 0 else b""
    seconds, ns = divmod(abs(mtime_ns), 1_000_000_000)
    return b"%s%d.%09d" % (sign, seconds, ns)


def _record(key: bytes, value: bytes) -> bytes:
    """One PAX record; its length prefix counts its own digits."""
    body = b" %s=%s\n" % (key, value)
    n = len(body)
    digits = len(b"%d" % (n + 1))
    if len(b"%d" % (n + digits)) != digits:
        digits += 1  # adding the prefix carried into one more digit
    return b"%d%s" % (n + digits, body)


def _ustar(
    name: bytes,
    type_: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes,
    devmajor: int,
    devminor: int,
) -> bytes:
    # Joined from pieces, the checksum summed over the parts that vary: a
    # struct and a sum over all 512 bytes cost several times as much.
    is_device = type_ in (b"3", b"4")  # tarfile and GNU tar leave the fields empty otherwise
    if not (
        0 <= mode < _OCTAL_8
        and 0 <= uid < _OCTAL_8
        and 0 <= gid < _OCTAL_8
        and 0 <= size < _OCTAL_12
        and 0 <= mtime < _OCTAL_12
        and len(name) <= 100
        and len(linkname) <= 100
        and len(type_) == 1
        and (not is_device or (0 <= devmajor < _OCTAL_8 and 0 <= devminor < _OCTAL_8))
    ):
        values = (mode, uid, gid, size, mtime)
        return _ustar_packed(name, type_, linkname, values, (devmajor, devminor), is_device)
    device = b"%07o\0%07o\0" % (devmajor, devminor) if is_device else _NO_DEVICE
    owner = _OWNERS.get((mode, uid, gid))
    if owner is None:  # a layer's files share a few modes and owners: each formatted once
        field = b"%07o\0%07o\0%07o\0" % (mode, uid, gid)
        owner = _OWNERS[(mode, uid, gid)] = (field, sum(field))
        if len(_OWNERS) > 4096:
            _OWNERS.clear()
    times = b"%011o\0%011o\0" % (size, mtime)
    check = _CHECK_BASE + sum(name) + owner[1] + sum(times) + type_[0]
    if linkname:
        check += sum(linkname)
    if is_device:
        check += sum(device)
    return b"".join(
        (
            name.ljust(100, b"\0"),
            owner[0],
            times,
            b"%06o\0 " % check,
            type_,
            linkname.ljust(100, b"\0"),
            _MAGIC,
            _UNAMES,
            device,
            _TAIL,
        )
    )


def _ustar_packed(
    name: bytes,
    type_: bytes,
    linkname: bytes,
    numbers: tuple[int, int, int, int, int],
    devices: tuple[int, int],
    is_device: bool,
) -> bytes:
    """``_ustar`` for values its fields do not hold (cut to the field's width)."""
    mode, uid, gid, size, mtime = numbers
    devmajor, devminor = devices
    block = bytearray(
        _USTAR.pack(
            name, b"%07o\0" % mode, b"%07o\0" % uid, b"%07o\0" % gid,
            b"%011o\0" % size, b"%011o\0" % mtime, b" " * 8, type_, linkname,
            b"ustar\0", b"00", b"", b"",
            b"%07o\0" % devmajor if is_device else b"", b"%07o\0" % devminor if is_device else b"",
            b"",
        )
    )  # fmt: skip
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _pax_header(size: int) -> bytes:
    block = _PAX_HEADERS.get(size)
    if block is None:
        block = _ustar(_PAX_NAME, b"x", 0o644, 0, 0, size, 0, b"", 0, 0)
        if size < 4096:
            _PAX_HEADERS[size] = block
    return block


def _ascii_field(value: bytes) -> bytes:
    """What old readers see when the real value is in a PAX record."""
    return bytes(c if 32 <= c < 127 else 0x3F for c in value[:100])


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def header(
    name: bytes,
    type_: bytes,
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime_ns: int = 0,
    size: int = 0,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    pax: dict[bytes, bytes] | None = None,
) -> bytes:
    """The header block(s) of one entry: ustar, preceded by a PAX header when
    a value does not fit (long or non-ASCII names, big ids or sizes,
    nanoseconds) or extra records (xattrs) are given. Names are raw bytes;
    when they are not UTF-8 the PAX header says ``hdrcharset=BINARY``.
    """
    records: list[bytes] = []
    seconds, ns = divmod(mtime_ns, 1_000_000_000)
    if ns or not 0 <= seconds < _OCTAL_12:
        records.append(_record(b"mtime", pax_time(mtime_ns)))
        seconds = min(max(seconds, 0), _OCTAL_12 - 1)
    binary = False
    if len(name) > 100 or not name.isascii():
        records.append(_record(b"path", name))
        binary = not _utf8(name)
        name = _ascii_field(name)
    if linkname and (len(linkname) > 100 or not linkname.isascii()):
        records.append(_record(b"linkpath", linkname))
        binary = binary or not _utf8(linkname)
        linkname = _ascii_field(linkname)
    if not 0 <= uid < _OCTAL_8:
        records.append(_record(b"uid", b"%d" % uid))
        uid = 0
    if not 0 <= gid < _OCTAL_8:
        records.append(_record(b"gid", b"%d" % gid))
        gid = 0
    if not 0 <= size < _OCTAL_12:
        records.append(_record(b"size", b"%d" % size))
        if size >= _OCTAL_12:
            size = 0
    if pax:
        for key, value in pax.items():
            records.append(_record(key, value))
    main = _ustar(name, type_, mode, uid, gid, size, seconds, linkname, devmajor, devminor)
    if not records:
        return main
    if binary:
        records.insert(0, _record(b"hdrcharset", b"BINARY"))
    data = b"".join(records)
    return b"".join((_pax_header(len(data)), data, bytes(-len(data) % BLOCK), main))


def padding(size: int) -> bytes:
    return bytes(_pad(size))


END_OF_ARCHIVE = bytes(2 * BLOCK)
