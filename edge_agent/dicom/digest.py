"""What a received instance's content is known by: a digest of its dataset as encoded, File Meta excluded.

The File Meta group is written by the receiving side (it names the sender's AE title), so a PACS re-sending
the same instance from another node would differ there, not in the dataset. The receiver takes the digest
as the bytes arrive (incoming.py); the first 16 hex digits of it end the instance's spool name, so that after a
power cut a file whose journal row was lost can show that it is whole (spool.py, housekeeping.py); the
journal keeps it whole, to tell a re-send of the same content from a changed one (series.py).

The digest is BLAKE3, written ``blake3:`` and 64 hex digits: 0.13 ms for a 0.5 MB CT slice where SHA-256,
the digest before it, took 0.34 ms (one core of the 2-core machine bench/ingest.py runs on). Spools and
journals from before hold SHA-256 digests, 64 hex digits with no prefix: a stored file named with one is
still recognised as whole (``header.content_digest(path, legacy_sha256=True)``), and a held instance whose
row holds one, re-sent after the upgrade, counts as changed content (a digest of another kind never equals
this one), so its series is inferred again: a second finding, never a lost one.
"""

from __future__ import annotations

import hashlib

import blake3

PREFIX = "blake3:"
_HEX = frozenset("0123456789abcdef")


def hasher(data: bytes = b"") -> blake3.blake3:
    """A hasher to feed the dataset's bytes to, in order (``data`` first)."""
    return blake3.blake3(data)


def legacy_hasher() -> hashlib._Hash:
    """The SHA-256 hasher spool names were made with before BLAKE3 (only to recognise those files)."""
    return hashlib.sha256()


def finish(h: blake3.blake3) -> str:
    """The digest, as the journal keeps it."""
    return PREFIX + h.hexdigest()


def name_part(digest: str) -> str:
    """The 16 hex digits a spool name carries of ``digest`` (this kind, or a bare SHA-256 from before).

    Raises ValueError for anything else.
    """
    hex_digits = digest.removeprefix(PREFIX)
    part = hex_digits[:16]
    if len(hex_digits) != 64 or not _HEX.issuperset(hex_digits):
        raise ValueError("not a content digest")
    return part
