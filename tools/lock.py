"""Pin the whole dependency tree: `constraints.txt` (versions) and two hash-locked requirement files.

Why hashes in requirement files and not in constraints.txt: pip checks hashes only in hash-checking
mode, which needs a hash for every requirement it installs, and ignores them in a constraints
file. torch cannot have one (the same version is a CPU build here and a CUDA build elsewhere, with
different files and different dependencies), so `make` installs the hash-locked files first with
`--no-deps` (every package but torch, checked against every file PyPI has for its version, so one
lock serves every platform) and then torch by version alone, whose dependencies are then already
there (on a CUDA machine it adds its own CUDA libraries); `pip check` (tools/pip_check.py) proves nothing is missing.

Run by `make lock` in a fresh environment of requirements-dev.txt and requirements-gpu.txt; it asks
PyPI's simple JSON API (PEP 691) for the hashes, so it needs the network.

    python -m tools.lock
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections import deque
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

from tools.pip_check import WITHOUT_DEPENDENCIES

ROOT = Path(__file__).resolve().parents[1]
INDEX = "https://pypi.org/simple"
# Pinned by version only: its builds differ by platform (see above).
UNHASHED = {"torch"}
HEADER = """\
# Every package of the runtime and the test tools, pinned: make installs with -c constraints.txt.
# Regenerate with `make lock` after changing requirements*.txt. torch has a CPU and a CUDA build of
# one version, so it is pinned by version alone (no local tag, no hash).
"""
LOCK_HEADER = """\
# {what}, hash-locked (every file PyPI has for each version), written by `make lock`.
# make installs it with --require-hashes --no-deps, then torch by version from constraints.txt.
"""


def roots(requirements: Path) -> list[Requirement]:
    """The requirements a file names (following `-r`), without comments."""
    found: list[Requirement] = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found += roots(requirements.parent / line[3:].strip())
        elif line:
            found.append(Requirement(line))
    return found


def closure(requirements: Path) -> set[str]:
    """Every installed distribution the file's requirements need, extras and markers applied."""
    seen: set[str] = set()
    queue = deque((req, "") for req in roots(requirements))
    while queue:
        req, extra = queue.popleft()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in [*req.extras, ""]:
            key = f"{name}[{wanted}]"
            if key in seen:
                continue
            seen.add(key)
            needs = [Requirement(dep) for dep in metadata.requires(name) or []]
            unneeded = WITHOUT_DEPENDENCIES.get(name, set())  # installed without them (tools/pip_check.py)
            queue.extend((dep, wanted) for dep in needs if canonicalize_name(dep.name) not in unneeded)
    return {key.split("[")[0] for key in seen}


def hashes(name: str, version: str) -> list[str]:
    """The sha256 of every file (wheels for each platform, the sdist) PyPI has for the version."""
    request = urllib.request.Request(f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    found = []
    for file in files:
        filename = file["filename"]
        try:
            parsed = (
                parse_wheel_filename(filename)[1] if filename.endswith(".whl") else parse_sdist_filename(filename)[1]
            )
        except ValueError:
            continue
        if str(parsed) == version and "sha256" in file["hashes"]:
            found.append(file["hashes"]["sha256"])
    if not found:
        raise SystemExit(f"no file of {name}=={version} on {INDEX}")
    return sorted(found)


def write_lock(path: Path, what: str, names: set[str], versions: dict[str, str]) -> None:
    lines = [LOCK_HEADER.format(what=what)]
    for name in sorted(names - UNHASHED):
        digests = " \\\n    ".join(f"--hash=sha256:{digest}" for digest in hashes(name, versions[name]))
        lines.append(f"{name}=={versions[name]} \\\n    {digests}\n")
    path.write_text("".join(lines))


def main() -> None:
    versions = {
        canonicalize_name(dist.metadata["Name"]): re.sub(r"\+.*", "", dist.version) for dist in metadata.distributions()
    }
    runtime = closure(ROOT / "requirements.txt")
    gpu = closure(ROOT / "requirements-gpu.txt")
    everything = closure(ROOT / "requirements-dev.txt") | gpu
    pins = "".join(f"{name}=={versions[name]}\n" for name in sorted(everything))
    (ROOT / "constraints.txt").write_text(HEADER + pins)
    write_lock(ROOT / "requirements.lock", "The runtime (requirements.txt)", runtime, versions)
    write_lock(ROOT / "requirements-gpu.lock", "What a CUDA GPU adds to the runtime", gpu - runtime, versions)
    write_lock(ROOT / "requirements-dev.lock", "The test and lint tools beyond the runtime", everything - gpu, versions)


if __name__ == "__main__":
    main()
