"""bandit over the package: no finding of medium severity or above, unless waived with a reason."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bandit(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bandit", "-q", "-f", "json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


def test_bandit_finds_nothing_of_medium_severity_or_above() -> None:
    report = _bandit("-r", "pollen", "--severity-level", "medium")
    found = [
        f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}"
        for r in report["results"]
    ]
    assert not found, "\n".join(found)


def test_every_waiver_names_its_finding_and_why() -> None:
    """``# nosec Bnnn`` names the waived test; a comment above says ``# Waived Bnnn: why``."""
    bare = []
    for path in sorted((ROOT / "pollen").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "# nosec" not in line or line.lstrip().startswith("#"):
                continue
            named = re.search(r"# nosec (B\d{3})\s*$", line)
            above = []  # the comment lines right above the waived line
            for prev in reversed(lines[:i]):
                if not prev.lstrip().startswith("#"):
                    break
                above.append(prev)
            reason = named and any(re.search(rf"# Waived {named.group(1)}: \S", a) for a in above)
            if not reason:
                bare.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert not bare, f"waivers without a named test and a reason on the line above: {bare}"


def test_the_scan_sees_a_medium_finding(tmp_path: Path) -> None:
    """The scan itself works: pickle.loads in a scanned file is reported (B301, medium)."""
    sample = tmp_path / "sample.py"
    sample.write_text("import pickle\n\n\ndef f(b):\n    return pickle.loads(b)\n")
    report = _bandit(str(sample), "--severity-level", "medium")
    assert [r["test_id"] for r in report["results"]] == ["B301"]
