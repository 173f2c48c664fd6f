"""``normscore.training``: the classifier training loop (``train_classifier``,
``evaluate_accuracy``, ``deterministic_training``). The code lives in
:mod:`normscore.tools.trainer`; this documented path is the same module object (aliased)."""

import sys

from .tools import trainer

sys.modules[__name__] = trainer
