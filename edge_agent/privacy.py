"""Pseudonyms for the identifiers a finding carries: keyed HMAC-SHA256, so only the key's holder can link them.

Issue 10, "privacy on the bus": with ``privacy.pseudonymise`` every subscriber of the findings stream sees
pseudonyms instead of UIDs, accession numbers and AE titles. The same input always gives the same pseudonym
(so a series' revisions, or the findings of two models on one series, still join), and nobody without the key
can compute the pseudonym of a UID they know: a plain hash could be checked against a guessed UID, a keyed one
cannot. The key is read from a file or the environment, never from the YAML, and is never logged.

Pure apart from reading the key file: config.py checks the key while it validates the configuration.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

KEY_ENV = "EDGE_AGENT_PRIVACY_KEY"
# HMAC-SHA256's own block of strength (RFC 2104 section 3: a key shorter than the output weakens it).
MIN_KEY_BYTES = 32
# 128 bits of the HMAC as the integer of a "2.25." UID, as a UUID-derived UID has (PS3.5 B.2): at most
# 5 + 39 = 44 characters, inside the 64 a UID may have.
_UID_BITS = 128
# Accession numbers are SH (16 characters) and AE titles AE (16 characters): 64 bits, as 16 hex digits.
_TEXT_BYTES = 8
# Separates the kind of identifier from its value, so that an accession number and an AE title with the same
# text get different pseudonyms; it cannot occur in a UID, an accession number (SH) or an AE title.
_SEPARATOR = b"\x1f"


class PrivacyKeyError(ValueError):
    """The key for pseudonyms is missing, unreadable or too short; ``option`` says where it was looked for."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}")


def read_key(key_file: Path | None, env: Mapping[str, str]) -> bytes:
    """The pseudonym key: the file's bytes (without a final line break) if ``key_file`` is set, else the
    environment variable's. Raises PrivacyKeyError naming the option, never showing the key."""
    if key_file is not None:
        try:
            raw = key_file.read_bytes()
        except OSError as exc:
            raise PrivacyKeyError("key_file", f"cannot read {key_file}: {exc.strerror}") from None
        key = raw.removesuffix(b"\n").removesuffix(b"\r")
        option, where = "key_file", f"{key_file} holds"
    else:
        text = env.get(KEY_ENV, "")
        if not text:
            raise PrivacyKeyError(
                "key_file", f"pseudonymise is on but there is no key: name a key file here or set {KEY_ENV}"
            )
        key = text.encode("utf-8")
        option, where = KEY_ENV, "holds"
    if len(key) < MIN_KEY_BYTES:
        raise PrivacyKeyError(
            option, f"{where} {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} (openssl rand -hex 32)"
        )
    return key


class Pseudonymiser:
    """Keyed, deterministic pseudonyms. Empty values stay empty: there is nothing to hide in them."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a pseudonym key needs at least {MIN_KEY_BYTES} bytes")
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "Pseudonymiser(<key hidden>)"

    def _digest(self, kind: bytes, value: str) -> bytes:
        mac = self._mac.copy()
        mac.update(kind + _SEPARATOR + value.encode("utf-8"))
        return mac.digest()

    def uid(self, value: str) -> str:
        """A UID's pseudonym: a valid UID under the 2.25 (UUID) root, so UID-shaped fields stay UID-shaped."""
        if not value:
            return value
        number = int.from_bytes(self._digest(b"uid", value)[: _UID_BITS // 8], "big")
        return f"2.25.{number}"

    def accession(self, value: str) -> str:
        """An accession number's pseudonym: 16 upper-case hex digits (fits SH)."""
        return self._digest(b"accession", value)[:_TEXT_BYTES].hex().upper() if value else value

    def ae_title(self, value: str) -> str:
        """An AE title's pseudonym: 16 upper-case hex digits (a valid AE title)."""
        return self._digest(b"ae", value)[:_TEXT_BYTES].hex().upper() if value else value
