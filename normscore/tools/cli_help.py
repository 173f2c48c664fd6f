"""Shared pieces of the command lines (``normscore-bench``, ``normscore-finetune``)."""

from __future__ import annotations

import argparse
from typing import Any


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(str(a) for a in v) if v else "none"
    return str(v)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks and ends every option's help with its
    default (``(default: ...)``), unless the help already says it or there is none to show
    (flags, ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        d = action.default
        if (
            not action.option_strings
            or "default" in h
            or d is None
            or d is argparse.SUPPRESS
            or isinstance(d, bool)
            or action.nargs == 0
        ):
            return h
        return f"{h} (default: {_show(d).replace('%', '%%')})"
