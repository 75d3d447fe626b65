"""Killed / survived mutants per module, from what `mutmut run` left in mutants/ (the
`make mutation` summary). Exits 1 when a module kills less than the target share."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# mutmut's exit codes (mutmut/stats.py): 1 and 3 a failing test, 0 none, 36 and the SIGXCPU
# codes a timeout (the mutant made a test hang: detected, so killed too).
KILLED = {1, 3}
TIMEOUT = {36, 24, -24, 152, 255}
SURVIVED = {0}
TARGET = 0.90


def main(root: Path = Path("mutants")) -> int:
    short = False
    print(
        f"{'module':<24}{'mutants':>8}{'killed':>8}{'timeout':>8}{'survived':>9}{'other':>7}  score"
    )
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(
            "killed"
            if c in KILLED
            else "timeout"
            if c in TIMEOUT
            else "survived"
            if c in SURVIVED
            else "other"
            for c in codes.values()
        )
        total = sum(counts.values())
        if not total:
            continue
        detected = counts["killed"] + counts["timeout"]
        score = detected / total
        short = short or score < TARGET
        module = str(meta.relative_to(root)).removesuffix(".meta")
        print(
            f"{module:<24}{total:>8}{counts['killed']:>8}{counts['timeout']:>8}"
            f"{counts['survived']:>9}{counts['other']:>7}  {score:.1%}"
        )
    print("survivors: .venv/bin/mutmut results; one of them: .venv/bin/mutmut show NAME")
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
