"""Compare the report (file argv[1]) with the pins (JSON argv[2]); fail naming each mismatch.

Run by the python of the new environment at the end of the bootstrap (bootstrap.sh).
"""

import json
import re
import sys


def norm(v: str) -> str:
    # "2.0" and "2.0.0" are the same release; anything fancier compares as text.
    m = re.fullmatch(r"v?(\d+(?:\.\d+)*)(.*)", v.strip().lower())
    if not m:
        return v.strip().lower()
    release = [int(x) for x in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    return ".".join(map(str, release)) + m.group(2)


with open(sys.argv[1]) as f:
    report = json.load(f)
problems = []
for name, want in sorted(json.loads(sys.argv[2]).items()):
    have = report.get(name)
    if have is None:
        problems.append(f"{name}: not installed (pinned {want})")
    elif name == "python":
        if have.split(".")[:2] != want.split(".")[:2]:
            problems.append(f"python: environment has {have}, wanted {want}")
    elif norm(have) != norm(want):
        problems.append(f"{name}: installed {have}, pinned {want}")
if problems:
    print("version mismatch in the new environment:", file=sys.stderr)
    for p in problems:
        print("  " + p, file=sys.stderr)
    sys.exit(1)
print("versions verified: " + ", ".join(f"{k} {v}" for k, v in sorted(report.items())))
