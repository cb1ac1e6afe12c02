"""Objects of R's lazy-load data (an R package's ``data/Rdata.rdx`` and ``.rdb``), read
without R: enough of R's serialisation format for character and numeric vectors,
lists and their attributes (what janeaustenr ships).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

class RVector(list):
    """An R vector read by :class:`_RUnserializer`, with its attributes (``names``...)."""

    attrs: dict


class _RUnserializer:
    """Just enough of R's XDR serialisation (versions 2 and 3) to read data
    objects: vectors, pairlists, symbols, environments, attributes, references."""

    PAIRLISTS = (2, 3, 5, 6, 17)  # LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP

    def __init__(self, raw: bytes):
        if raw[:2] != b"X\n":
            raise ValueError("not an R XDR serialisation")
        self.raw, self.pos, self.refs = raw, 2, []
        version = self._int()
        self._int(), self._int()
        if version == 3:
            length = self._int()
            self.pos += length  # the native encoding's name
        elif version != 2:
            raise ValueError(f"R serialisation version {version} is not supported")

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.raw, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        if n == -1:
            high, low = self._int(), self._int()
            n = (high << 32) + low
        return n

    @staticmethod
    def _attrs(pairlist) -> dict:
        if isinstance(pairlist, tuple) and pairlist[0] == "pairlist":
            return {tag: value for tag, value in pairlist[1]}
        return {}

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 241, 253, 252, 251, 250):  # NULL and special environments
            return None
        if kind == 255:  # a reference to an earlier symbol or environment
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP: its name follows as a CHARSXP
            symbol = self.read()
            self.refs.append(symbol)
            return symbol
        if kind in (247, 248, 249):  # persistent / package / namespace names
            self._int()
            names = [self.read() for _ in range(self._int())]
            self.refs.append(("namespace", names))
            return self.refs[-1]
        if kind == 4:  # ENVSXP
            env: dict = {}
            self.refs.append(env)
            self._int()
            env.update(enclos=self.read(), frame=self.read(), hashtab=self.read(),
                       attrib=self.read())
            return env
        if kind in self.PAIRLISTS:  # attr, tag, car, then the cdr: read as a loop
            items = []
            while True:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                items.append((tag, self.read()))
                flags = self._int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if kind not in self.PAIRLISTS:
                    self.pos -= 4
                    self.read()  # the last cdr (normally NULL)
                    return ("pairlist", items)
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None  # NA_character_
            text = self.raw[self.pos:self.pos + n]
            self.pos += n
            latin1 = (flags >> 12) & (1 << 2)
            return text.decode("latin-1" if latin1 else "utf-8", errors="replace")
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self._length()
            values = RVector(struct.unpack_from(f">{n}i", self.raw, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # REALSXP
            n = self._length()
            values = RVector(struct.unpack_from(f">{n}d", self.raw, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            values = RVector(self.read() for _ in range(self._length()))
        elif kind == 238:  # ALTREP (compact sequences, wrappers): class info, state, attributes
            info, state, attrs = self.read(), self.read(), self.read()
            name = info[1][0][1] if isinstance(info, tuple) and info[0] == "pairlist" else None
            if name in ("wrap_integer", "wrap_real", "wrap_string", "wrap_logical") \
                    and isinstance(state, list):
                values = RVector(state[0])
            elif name in ("compact_intseq", "compact_realseq") and isinstance(state, list):
                n, start, step = state[0], state[1], state[2]
                values = RVector(start + step * i for i in range(int(n)))
            else:
                raise ValueError(f"the R ALTREP class {name} is not supported")
            values.attrs = self._attrs(attrs)
            return values
        else:
            raise ValueError(f"R object type {kind} is not supported")
        values.attrs = self._attrs(self.read()) if has_attr else {}
        return values


def read_r_lazyload(rdx: Path) -> dict[str, object]:
    """The objects of an R lazy-load database (``NAME.rdx`` + ``NAME.rdb``) by name,
    read without R (``ValueError`` for what this reader does not handle)."""
    raw = rdx.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:])
    index = _RUnserializer(raw).read()
    names = getattr(index, "attrs", {}).get("names") or []
    if not isinstance(index, list) or "variables" not in names:
        raise ValueError(f"{rdx} is not an R lazy-load index")
    fields = dict(zip(names, index))
    variables = fields["variables"]
    compressed = (fields.get("compressed") or [1])[0]
    blob = rdx.with_suffix(".rdb").read_bytes()
    out = {}
    for name, span in zip(variables.attrs.get("names", []), variables):
        offset, length = int(span[0]), int(span[1])
        record = blob[offset:offset + length]
        size, body = int.from_bytes(record[:4], "big"), record[4:]
        if compressed in (2, 3):  # a type byte says how this record is compressed
            kind, body = body[:1], body[1:]
            decompress = {b"Z": zlib.decompress, b"2": bz2.decompress,
                          b"X": lzma.decompress, b"0": bytes}.get(kind)
            if decompress is None:
                raise ValueError(f"{rdx}: unknown compression {kind!r} of {name}")
            body = decompress(body)
        elif compressed:
            body = zlib.decompress(body)
        if len(body) != size:
            raise ValueError(f"{rdx}: the object {name} decompressed to {len(body)} bytes, "
                             f"expected {size}")
        out[name] = _RUnserializer(body).read()
    return out
