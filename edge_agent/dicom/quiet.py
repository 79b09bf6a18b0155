"""pydicom's warnings, caught where pydicom reads a file, instead of raised or printed.

pydicom warns about recoverable oddities (excess padding, a wrong VR, a UID that breaks the UI rules); the file
still reads. Under a warnings-as-errors policy they would turn a readable instance into a refused one, and their
text quotes element values (UIDs, names), so only their categories are ever repeated (logs.py withholds what
pydicom logs on its own logger).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

# warnings.catch_warnings swaps process-global state and is not thread-safe before Python 3.14, and pydicom
# reads on several threads (decoding in a thread pool, headers on the receiver's commit thread). pydicom and the
# pylibjpeg decoders hold the GIL while they work (measured: two threads decode no faster than one), so
# serialising these reads costs no throughput.
_LOCK = threading.Lock()


@contextlib.contextmanager
def pydicom_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Inside: pydicom's warnings are recorded in the list yielded, none raised or printed (one thread at a time)."""
    with _LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def kinds(caught: list[warnings.WarningMessage]) -> list[str]:
    """The categories of the warnings caught, sorted (never their text)."""
    return sorted({w.category.__name__ for w in caught})
