"""Print the installed versions as JSON: run by the python of the new environment (bootstrap.sh).

argv: JSON list of package names to report.
"""

import json
import re
import sys
from importlib import metadata


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


installed: dict[str, str] = {}
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if name:
        installed.setdefault(canon(name), dist.version)
report = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
for name in json.loads(sys.argv[1]):
    if canon(name) in installed:
        report[canon(name)] = installed[canon(name)]
print(json.dumps(report, sort_keys=True))
