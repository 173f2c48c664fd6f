"""``python -m normscore.demo``: the short real demo. The code lives in :mod:`normscore.bench.demo`;
this documented path runs it, and imported it is the same module object (aliased)."""

import sys

from .bench import demo

if __name__ == "__main__":
    raise SystemExit(demo.main())
sys.modules[__name__] = demo
