"""``python -m normscore.finetune`` = ``normscore-finetune``."""

import sys

from .cli import main

sys.exit(main())
