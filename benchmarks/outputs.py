"""What every load benchmark writes: a JSON report, its markdown table and its plot."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPUs, {cpu}, Python {platform.python_version()}"


def write(
    out: Path,
    name: str,
    report: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> None:
    """out/name.json, out/name.md and out/name.png; the table is printed as well."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / f"{name}.md").write_text(table)
    plot(report, out / f"{name}.png")
    print()
    print(table)
    print(f"wrote {out / name}.json, {name}.md, {name}.png")
