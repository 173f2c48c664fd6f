"""Import every built-in detector module so that each registers itself.

A detector module is any public module of this package that is not part of the machinery
(:data:`MACHINERY`): adding a detector is writing one file ``normscore/detectors/<name>.py``
whose classes use ``@register``; nothing else needs to list it. The modules are imported in
sorted order, so the registry's order does not depend on the file system.
"""

import importlib
import pkgutil
from pathlib import Path

#: the package's modules that hold no detectors (the base class, its helpers, the engines)
MACHINERY = frozenset(
    {"base", "constraints", "decision", "dset", "engines", "fitting", "ldg_scoring", "persistence", "registry", "sync"}
)

_MODULES = tuple(
    sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if not m.name.startswith("_") and m.name not in MACHINERY
    )
)

for _name in _MODULES:
    importlib.import_module(f"{__package__}.{_name}")
