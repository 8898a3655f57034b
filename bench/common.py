"""Helpers shared by the benchmarks."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_line() -> str:
    """One line naming the machine a result was measured on."""
    return f"{platform.node()}: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"


REFERENCE_JSON = Path(__file__).resolve().parent / "blt_cpu_reference.json"


def reference_json() -> dict:
    """The CPU reference shape (a copy of the team's ``shared/bench/blt_cpu_reference.json``)."""
    import json

    return json.loads(REFERENCE_JSON.read_text())
