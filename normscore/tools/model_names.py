"""Model names, one format for ``normscore-bench`` and ``normscore-finetune``.

* ``smallcnn`` or ``smallcnn:WIDTH`` - :func:`normscore.tools.zoo.small_cnn` (``normscore-bench`` trains
  width 16 unless told, ``normscore-finetune`` width 32; a checkpoint brings its own width);
* a local pretrained model of :func:`normscore.tools.zoo.list_local_models` (``efficientnet_lite0``);
* any timm architecture, plain: ``resnet50``, ``vit_small_patch16_224``, ``resnet50.a1_in1k``;
* any torchvision classification model with the prefix ``tv:``: ``tv:resnet50``.

Older spellings still work and warn (:class:`DeprecationWarning`, and the command lines print a
note) with the name to use instead: ``small_cnn[:WIDTH]`` -> ``smallcnn[:WIDTH]``,
``timm:NAME`` -> ``NAME``, ``torchvision:NAME`` -> ``tv:NAME``.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["ModelName", "cli_model_name", "parse_model_name"]

_FORMAT = "smallcnn[:WIDTH], a local model (efficientnet_lite0), a timm name (resnet50) or tv:NAME (torchvision)"


@dataclass(frozen=True)
class ModelName:
    """A parsed model name.

    ``kind`` is ``"smallcnn"``, ``"local"``, ``"timm"`` or ``"torchvision"``; ``arch`` the
    architecture (the timm/torchvision name, the local model's name, or ``"smallcnn"``);
    ``width`` the smallcnn width (``None``: the default); ``deprecated`` the old spelling given,
    if any.
    """

    kind: str
    arch: str
    width: int | None = None
    deprecated: str | None = None

    @property
    def canonical(self) -> str:
        """The name in the current format (``smallcnn:16``, ``resnet50``, ``tv:resnet50``)."""
        if self.kind == "smallcnn":
            return "smallcnn" if self.width is None else f"smallcnn:{self.width}"
        if self.kind == "torchvision":
            return f"tv:{self.arch}"
        return self.arch

    def note(self) -> str | None:
        """The deprecation message for an old spelling, else ``None``."""
        if self.deprecated is None:
            return None
        return (
            f"model name {self.deprecated!r} is deprecated; write {self.canonical!r} "
            "(one format for normscore-bench and normscore-finetune: smallcnn[:WIDTH], a timm name, tv:NAME)."
        )


def _width(arg: str, given: str) -> int | None:
    if not arg:
        return None
    if not arg.isdigit() or int(arg) < 1:
        raise ConfigError(f"bad model name {given!r}: the smallcnn width must be a positive integer (smallcnn:16).")
    return int(arg)


def _check_torchvision(arch: str, given: str) -> None:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        from ..errors import did_you_mean

        raise ConfigError(
            f"unknown torchvision classification model {arch!r} (in {given!r}).{did_you_mean(arch, known)} "
            "See torchvision.models.list_models()."
        )


def _check_timm(arch: str, given: str) -> None:
    import timm

    if timm.is_model(arch.split(".")[0]) or timm.is_model(arch):
        return
    import difflib

    from .zoo import list_local_models

    base = arch.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.75)
    close += [n for n in (timm.list_models(f"*{base[:6]}*") if len(base) >= 3 else []) if n not in close]
    close = close[:5]
    raise ConfigError(
        f"unknown model {given!r}: not smallcnn, not a local model ({', '.join(list_local_models())}), "
        f"not a timm architecture{' (similar: ' + ', '.join(close) + ')' if close else ''}; torchvision "
        f"models take the prefix tv:, e.g. tv:resnet50. Model names: {_FORMAT}."
    )


def parse_model_name(name: str, *, check: bool = True, warn: bool = True) -> ModelName:
    """Parse a model name (see the module docstring).

    ``check`` verifies that a timm or torchvision architecture exists (a :class:`ConfigError`
    with similar names otherwise); ``warn`` issues a :class:`DeprecationWarning` for an old
    spelling.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a model name is a non-empty string ({_FORMAT}); got {name!r}.")
    given = name.strip()
    prefix, sep, arg = given.partition(":")
    old: str | None = None
    if prefix in ("smallcnn", "small_cnn"):
        old = given if prefix == "small_cnn" else None
        parsed = ModelName("smallcnn", "smallcnn", _width(arg, given), old)
    elif sep and prefix in ("tv", "torchvision"):
        if not arg:
            raise ConfigError(f"bad model name {given!r}: name the torchvision model, e.g. tv:resnet50.")
        old = given if prefix == "torchvision" else None
        if check:
            _check_torchvision(arg, given)
        parsed = ModelName("torchvision", arg, None, old)
    elif sep and prefix == "timm":
        if not arg:
            raise ConfigError(f"bad model name {given!r}: name the timm model, e.g. resnet50.")
        if check:
            _check_timm(arg, given)
        parsed = ModelName("timm", arg, None, given)
    elif sep:
        raise ConfigError(f"bad model name {given!r}: unknown prefix {prefix + ':'!r}. Model names: {_FORMAT}.")
    else:
        from .zoo import list_local_models

        if given in list_local_models():
            parsed = ModelName("local", given)
        else:
            if check:
                _check_timm(given, given)
            parsed = ModelName("timm", given)
    if warn and parsed.deprecated is not None:
        warnings.warn(parsed.note() or "", DeprecationWarning, stacklevel=2)
    return parsed


def cli_model_name(name: str, prog: str, *, check: bool = True) -> ModelName:
    """:func:`parse_model_name` for a command line: an old spelling prints a note on stderr
    (``prog: note: ...``) instead of a warning."""
    parsed = parse_model_name(name, check=check, warn=False)
    note = parsed.note()
    if note:
        print(f"{prog}: note: {note}", file=sys.stderr)
    return parsed
