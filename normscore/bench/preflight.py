"""The up-front check of a benchmark run: the model weights and every data split it reads,
before anything runs; one :class:`~normscore.errors.MissingResourceError` lists every missing
piece."""

from __future__ import annotations

from ..data import check_dataset
from ..errors import MissingResourceError
from .config import BenchConfig, retrains_head, trains_model
from .models import weights_problem

__all__ = ["missing_error", "missing_pieces"]


def missing_pieces(
    cfg: BenchConfig, model_name: str, splits: list[tuple[str, str]], *, load: bool
) -> list[tuple[str, str]]:
    """``(what, problem)`` for every missing piece: the model weights, then each data split.
    Data sets without a cheap check are loaded only with ``load=True``."""
    out = []
    # a new head on a pretrained model needs the pretrained weights
    w = weights_problem(model_name, checkpoint=cfg.checkpoint, train=trains_model(cfg) and not retrains_head(cfg))
    if w:
        out.append((f"model weights ({model_name})", w))
    for ds, sp in splits:
        p = check_dataset(ds, sp, data_root=cfg.data_root, load=load)
        if p:
            out.append((f"data {ds}:{sp}", p.removeprefix(f"{ds}:{sp}: ")))
    return out


def missing_error(problems: list[tuple[str, str]], *, ran: bool) -> MissingResourceError:
    """One error listing every ``(what, problem)``; splits with the same problem are grouped and
    a shared explanation (the lines after a problem's first, e.g. a data layout) is said once."""
    groups: dict[str, list[str]] = {}
    for what, msg in problems:
        groups.setdefault(msg, []).append(what)
    lines, notes = [], []
    for msg, whats in groups.items():
        first, _, rest = msg.partition("\n")
        label = whats[0] if len(whats) == 1 else _group_label(whats)
        lines.append(f"  - {label + ': ' if label else ''}{first}")
        if rest.strip() and rest not in notes:
            notes.append(rest)
    n = len(lines)
    head = f"{n} missing piece{'s' if n != 1 else ''}" + ("" if ran else "; nothing was run")
    return MissingResourceError("\n".join([f"{head}:", *lines, *notes]))


def _group_label(whats: list[str]) -> str:
    """``data imagenet:train, val, ...`` for several splits of one data set."""
    sets = [w.removeprefix("data ").partition(":") for w in whats]
    if all(w.startswith("data ") for w in whats) and len({d for d, _, _ in sets}) == 1:
        return f"data {sets[0][0]}:{', '.join(sp for _, _, sp in sets)}"
    return ", ".join(whats)
