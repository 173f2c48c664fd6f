"""Import every built-in detector module so that each registers itself."""

from . import logits, norms  # noqa: F401
