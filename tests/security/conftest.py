"""Shared helpers of the security tests: a pickle payload that would leave a marker file if it ran."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


class Payload:
    """Unpickling this calls ``os.system("touch MARKER")``: the classic pickle code-execution payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def payload(tmp_path: Path):
    """``(object whose unpickling runs a command, marker path that the command would create)``."""
    marker = tmp_path / "PWNED"
    return Payload(marker), marker
