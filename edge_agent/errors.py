"""The one exception root of edge-agent, and its branches."""

from __future__ import annotations

from collections.abc import Sequence


class EdgeAgentError(Exception):
    """Root of every error edge-agent raises on purpose."""


class ConfigError(EdgeAgentError, ValueError):
    """The configuration is invalid. Carries every problem found, each with its field path."""

    def __init__(self, problems: Sequence[tuple[str, str]], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        lines = [f"{path}: {message}" if path else message for path, message in self.problems]
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(lines))

    def lines(self) -> list[str]:
        return [f"{path}: {message}" if path else message for path, message in self.problems]


class ModelError(EdgeAgentError):
    """A model card or model file is missing, malformed, or does not match its checksum."""


class EngineError(EdgeAgentError, RuntimeError):
    """An inference engine failed to load or to run."""


class EngineTimeoutError(EngineError, TimeoutError):
    """An engine call did not return within its model's ``infer_timeout_seconds``.

    Transient: a stalled driver or an unusually slow call can come back, so the work is worth trying again
    later; the batcher reports the model as having a problem while the call is still out.
    """


class DecodeError(EdgeAgentError, ValueError):
    """A DICOM instance could not be decoded into pixels the model can use."""


class JournalError(EdgeAgentError, RuntimeError):
    """The state database could not be opened or written."""


class BusError(EdgeAgentError, ConnectionError):
    """The message bus could not be reached or did not acknowledge."""


class TLSFileError(EdgeAgentError, ValueError):
    """A certificate, key or CA file cannot be used. ``option`` names it: ca_file, cert_file or key_file."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}")


class StateDirLockedError(EdgeAgentError):
    """Another edge-agent holds the state directory's lock (two daemons would sweep each other's spool)."""
