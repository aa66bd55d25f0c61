"""``sageattn.build_info()``: what this installation is (flavour, toolkit, trees, revision) and
whether another sageattn distribution shares or hides it.

Every flavour (``sageattn-cu128``, ``sageattn-cu130``, a development ``sageattn``) installs the same
``sageattn/`` folder. Two of them in one environment do not coexist: in one site-packages the
second install overwrites the first one's files (and uninstalling either deletes files the other
needs); in two places on ``sys.path`` the first hides the second. pip says nothing in either case,
so this module looks at the installed distributions' records and says it.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from . import _loader

__all__ = ["build_info", "providers", "conflict_message"]

PACKAGE_DIR = Path(__file__).resolve().parent
_NAME = re.compile(r"sageattn([-_.].*)?$", re.I)


def providers(paths: list[str] | None = None) -> list[dict]:
    """Installed distributions that provide the ``sageattn`` package: ``name``, ``version`` and
    ``location`` (the folder holding their ``sageattn/``), first on ``paths`` (default
    ``sys.path``) first."""
    found: list[dict] = []
    seen = set()
    for dist in metadata.distributions(**({"path": paths} if paths is not None else {})):
        name = dist.metadata["Name"] or ""
        if not _NAME.match(name):
            continue
        if not any(f.parts[:1] == ("sageattn",) for f in dist.files or ()):
            continue
        location = str(Path(dist.locate_file("")).resolve())
        key = (name.lower(), location)
        if key not in seen:
            seen.add(key)
            found.append({"name": name, "version": dist.version, "location": location})
    return found


def conflict_message(found: list[dict], active_location: str, active_flavour: str | None) -> str | None:
    """Why ``found`` (from `providers`) is a broken installation, or None when it is not."""
    if len(found) < 2:
        return None
    names = ", ".join(f"{d['name']} {d['version']}" for d in found)
    keep = next((d["name"] for d in found
                 if active_flavour and d["name"].lower().endswith(f"-{active_flavour}")), found[0]["name"])
    fix = (f"keep one: pip uninstall -y {' '.join(sorted({d['name'] for d in found}))} && "
           f"pip install {keep}")
    same_place = [d for d in found if d["location"] == active_location]
    if len(same_place) > 1:
        return (f"{len(same_place)} sageattn distributions are installed in {active_location}: "
                f"{names}. They all write the same sageattn/ files, so the last one installed "
                f"replaced the others' (the kernels here are of flavour {active_flavour or 'unknown'}), "
                f"and uninstalling any of them deletes files the other needs; {fix}")
    hidden = [d for d in found if d["location"] != active_location]
    return (f"several sageattn distributions are installed: {names}. `import sageattn` loads the "
            f"one in {active_location}, which hides "
            + ", ".join(f"{d['name']} in {d['location']}" for d in hidden) + f"; {fix}")


def build_info() -> dict:
    """What this installation carries, and whether it is the only sageattn installed.

    Keys: ``distribution`` ("name version" of the distribution this package came from, None in a
    source tree), ``flavour`` (cu128, cu130; None for a development build), ``toolkit``,
    ``git_revision``, ``abi_version``, ``fatbin_options``, ``trees`` (per tree its SASS and PTX
    architectures and kernel count), ``distributions`` (every installed distribution providing
    ``sageattn``), ``conflict`` (None, or why those distributions shadow each other) and
    ``error`` (None, or what is missing). Never raises.
    """
    info = _loader.build_info()
    try:
        data = _loader.manifest()
    except _loader.PackageError:
        data = {}
    info["flavour"] = data.get("flavour")
    info["fatbin_options"] = data.get("fatbin_options")
    active = str(PACKAGE_DIR.parent)
    try:
        found = providers()
    except Exception as exc:  # a broken dist-info elsewhere must not break the report
        found = []
        info["conflict"] = f"could not list the installed distributions: {exc}"
    else:
        info["conflict"] = conflict_message(found, active, info["flavour"])
    mine = [d for d in found if d["location"] == active]
    # Several here: the files are those of the one whose flavour the kernels carry.
    mine = [d for d in mine if info["flavour"] and d["name"].lower().endswith(f"-{info['flavour']}")] or mine
    info["distribution"] = f"{mine[0]['name']} {mine[0]['version']}" if mine else None
    info["distributions"] = [f"{d['name']} {d['version']} ({d['location']})" for d in found]
    return info
