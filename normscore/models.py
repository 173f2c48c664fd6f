"""``normscore.models``: the local model zoo (``small_cnn``, ``load_model``, ``preprocess``,
``list_local_models``). The code lives in :mod:`normscore.tools.zoo`; this documented path is
the same module object (aliased), so attributes and monkeypatches are shared."""

import sys

from .tools import zoo

sys.modules[__name__] = zoo
