"""Errors a user can act on.

Every problem with a file the user gave (topology, scenario, calibration) is an :class:`InputError` that
names the file, the key path inside it and what to do. The CLIs print ``str(err)`` as one line and exit 2.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: ``<file>: <key.path>: <what is wrong>; <what to do>``."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file = file
        self.key = key
        self.message = message
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}"


class ProtocolError(Exception):
    """A clear exception surfaced by the protocol itself (verdict ``error``).

    ``cause`` is a diagnosis code from :mod:`mooncake_protocol.diagnosis` when the error maps to a known
    failure mode, else ``None``.
    """

    def __init__(self, message: str, cause: str | None = None) -> None:
        self.cause = cause
        super().__init__(message)
