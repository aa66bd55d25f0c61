"""The checkout's own files as modules, for tests of code that is not part of the installed
package (tools/, examples/, the source tree's _abi.py)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_file(name: str, relative: str):
    """``REPO/relative`` imported afresh as module ``name``, registered in ``sys.modules``
    (dataclasses resolve their string annotations through it)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
