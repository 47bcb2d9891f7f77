"""Poison and fuzzed instances made by flipping bytes of real files (../shared/data).

The poison instance of issue 9: Modality's VR ``CS`` becomes ``CW`` (``S`` 0x53 -> ``W``
0x57, one bit; the issue's sender flipped two), an unknown VR that pydicom refuses to
convert (``NotImplementedError: Unknown Value Representation 'CW' in tag (0008,0060)``).
"""

from __future__ import annotations

import random
from pathlib import Path

_MODALITY_CS = b"\x08\x00\x60\x00CS"


def poison_bytes(data: bytes) -> bytes:
    """``data`` (explicit VR little endian) with Modality's VR flipped to ``CW``."""
    at = data.index(_MODALITY_CS)
    return data[:at] + b"\x08\x00\x60\x00CW" + data[at + len(_MODALITY_CS) :]


def write_poison(source: Path, target: Path) -> Path:
    """Write the poisoned copy of ``source`` to ``target``; returns ``target``."""
    target.write_bytes(poison_bytes(source.read_bytes()))
    return target


def mutate(data: bytes, rng: random.Random, start: int = 0) -> tuple[str, bytes]:
    """One seeded mutation of ``data`` past offset ``start``: what was done, and the bytes.

    Mutations: flip 1-4 bits, overwrite a length field with a huge or odd value, truncate,
    duplicate or delete a span, or splice random bytes in.
    """
    n = len(data)
    kind = rng.choice(["bits", "length", "truncate", "delete", "duplicate", "splice", "vr"])
    buf = bytearray(data)
    if kind == "bits":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(start, n)
            buf[i] ^= 1 << rng.randrange(8)
        return kind, bytes(buf)
    if kind == "length":
        # an explicit VR 16-bit length (after a 2-letter VR) or a 32-bit one
        i = rng.randrange(start, n - 4)
        value = rng.choice([0xFFFF, 0xFFFE, 0x7FFF, 1, 3, 0xFFFFFFFF, 0x40000000, 0x10000])
        width = 4 if value > 0xFFFF else 2
        buf[i : i + width] = value.to_bytes(width, "little")
        return kind, bytes(buf)
    if kind == "truncate":
        return kind, bytes(buf[: rng.randrange(start, n)])
    if kind == "delete":
        i = rng.randrange(start, n - 1)
        return kind, bytes(buf[:i] + buf[i + rng.randint(1, 64) :])
    if kind == "duplicate":
        i = rng.randrange(start, n - 1)
        span = buf[i : i + rng.randint(1, 64)]
        return kind, bytes(buf[:i] + span + buf[i:])
    if kind == "vr":
        # replace a VR-looking pair of capitals by random capitals
        spots = [i for i in range(max(start, 4), min(n - 2, start + 4096)) if 65 <= buf[i] <= 90]
        if spots:
            i = rng.choice(spots)
            buf[i] = rng.randint(65, 90)
        return kind, bytes(buf)
    i = rng.randrange(start, n)
    return kind, bytes(buf[:i] + rng.randbytes(rng.randint(1, 32)) + buf[i:])
