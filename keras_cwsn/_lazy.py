"""Module-level `__getattr__` that imports a package's public names on first use (PEP 562)."""

import importlib


def lazy_getattr(package, exports):
    """Return a `__getattr__` resolving `name` from `package.<module>` for `exports = {module: names}`."""

    def __getattr__(name):
        for module, names in exports.items():
            if name in names:
                return getattr(importlib.import_module(f"{package}.{module}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
