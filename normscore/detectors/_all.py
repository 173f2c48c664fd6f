"""Import every built-in detector module so that each registers itself (one module per line)."""

import importlib

_MODULES = (
    "logits",
    "norms",
    "featurenorm",
    "gradients",
    "shaping",
    "distances",
    "fusion",
    "separation",
)

for _name in _MODULES:
    importlib.import_module(f"{__package__}.{_name}")
