"""One module per method; importing this package registers every block.

Modules are discovered rather than listed so that adding a method is adding one file.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")
