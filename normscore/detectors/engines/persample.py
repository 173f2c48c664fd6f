"""Per-sample parameter gradients from one batched backward pass, used layer by layer.

The gradient engine behind LDG (Wu et al., arXiv:2310.17163). For a per-sample objective
``f(x)`` (LDG: ``logsumexp`` of the logits) and a set of layers, one forward pass and one
batched backward pass (:func:`normscore.taps.capture` with a :class:`~normscore.taps.BackwardSpec`;
eval mode makes samples independent, so the gradient of ``sum_i f(x_i)`` gives every sample's
own gradient) deliver, for each layer, its input ``a`` and output gradient ``d``. From them the
layer's **per-sample** parameter gradient is formed in closed form, one layer (and, under a
memory budget, one chunk of samples) at a time, and handed to a *consumer* (a projection
``G_l @ V_l``, statistics, ``G_l^T Y``); a sample's full gradient vector is never held.

Closed forms (``p`` runs over positions / tokens, ``B`` samples):

* ``nn.Linear``: ``dW_i = sum_p d_ip a_ip^T``, ``db_i = sum_p d_ip`` (inputs ``[B, in]`` or
  ``[B, ..., in]``; a leading dimension ``k*B`` - windows or heads merged sample-major, as in
  timm's Swin - is folded back into positions);
* ``nn.Conv1d`` / ``nn.Conv2d`` (any stride, dilation, padding mode, groups incl. depthwise):
  ``dW_i = sum_p d_ip unfold(a_i)_p^T`` per group (``F.unfold`` + batched GEMM),
  ``db_i = sum_p d_ip``;
* ``BatchNorm{1,2,3}d`` in eval mode with running statistics:
  ``dgamma_i = sum_p d_ip * (a_ip - mu) / sqrt(var + eps)``, ``dbeta_i = sum_p d_ip``;
* ``nn.LayerNorm`` / ``nn.GroupNorm``: the same with the per-sample (per-token / per-group)
  normalisation;
* any other **leaf** module with parameters (e.g. timm ``LayerScale``, ``PReLU``, timm's
  channels-first ``LayerNorm2d``, subclasses that override ``forward``): a per-sample
  vector-Jacobian product of that module alone (``torch.func.vmap`` of ``vjp`` on its own
  forward, recomputed from the captured input). Exact, but slower than the closed forms.

Projections ``G_l @ V_l`` of layers with one output position per sample (pooled linear heads,
convolutions with 1x1 maps) skip the formation: ``<d a^T, V_k> = d^T V_k a`` is computed as
``a @ V.view(out, in, K)`` contracted with ``d``.

Which layers are covered and why others are not: :mod:`.layers`.

Two feature maps share this machinery:

* :class:`ExactGradients` - ``phi(x) = grad_theta f(x)`` (dimension ``|theta|``).
* :class:`KroneckerSketch` - a structured random projection that never forms the gradient:
  for a weight ``dW = sum_p d_p a_p^T`` the sketch ``R_o^T dW R_i = sum_p (R_o^T d_p)(R_i^T a_p)^T``
  costs ``O(P (out r_o + in r_i + r_o r_i))`` per sample (for convolutions ``R_i^T a_p`` is a
  convolution of the input with ``r_i`` random filters, so the input is never unfolded);
  vector parameters (biases, norm affines, generic modules) are projected with a dense
  Gaussian matrix. ``E ||sketch||^2 = ||grad||^2``.

The streamed linear algebra that consumes these maps (LDG's subspace) is in :mod:`.subspace`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import Adapter
from ...errors import AdapterError
from ...taps import BackwardSpec, CaptureSpec, Features, capture
from .layers import LayerSlot

__all__ = [
    "ExactGradients",
    "KroneckerSketch",
    "LayerMap",
    "SketchShape",
    "logsumexp_objective",
    "plan_sketch",
]

#: elements (float32, 512 MB) a layer's per-sample work may hold at once before the batch is
#: chunked. Larger chunks matter: each chunk's projection re-reads the layer's rows of ``V``.
DEFAULT_CHUNK_ELEMS = 1 << 27


def logsumexp_objective(logits: torch.Tensor) -> torch.Tensor:
    """``f(x) = log sum_c exp(z_c)`` per sample (LDG's objective; no label involved)."""
    return torch.logsumexp(logits, dim=1)


# ---------------------------------------------------------------------------------------------
# closed-form per-sample gradients


def _fold_rows(a: torch.Tensor, g: torch.Tensor, batch: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a sample-major merged leading dimension ``k * batch`` into positions."""
    if a.shape[0] % batch == 0 and a.ndim >= 2:
        return a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])
    raise AdapterError(
        f"layer {name!r} received a leading dimension of {a.shape[0]} for a batch of {batch}; per-sample "
        "gradients need the batch (optionally merged sample-major with windows/heads) in front. Exclude the "
        "layer with params=[...]."
    )


def _conv_geometry(m: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple, tuple, tuple]:
    """Pre-pad ``a`` if needed and return it as 4-D with (kernel, dilation, padding, stride)."""
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
        pad = (0,) * len(m.kernel_size)
    else:
        pad = tuple(m.padding)
    k, d, s = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
    if isinstance(m, nn.Conv1d):
        return a.unsqueeze(2), (1, *k), (1, *d), (0, *pad), (1, *s)
    return a, k, d, pad, s


def _vec_grads(slot: LayerSlot, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients ``[b, size]`` of norm layers (closed form) and generic leaves (vmap)."""
    m, kind, b = slot.module, slot.kind, a.shape[0]
    if kind == "batchnorm":
        shape = (1, -1) + (1,) * (a.ndim - 2)
        xhat = (a - m.running_mean.float().view(shape)) * torch.rsqrt(m.running_var.float().view(shape) + m.eps)
        red = tuple(range(2, a.ndim))
        parts = {"weight": (g * xhat).sum(red) if red else g * xhat, "bias": g.sum(red) if red else g}
    elif kind == "layernorm":
        nd = len(m.normalized_shape)
        dims = tuple(range(a.ndim - nd, a.ndim))
        mu = a.mean(dims, keepdim=True)
        var = a.var(dims, unbiased=False, keepdim=True)
        xhat = (a - mu) * torch.rsqrt(var + m.eps)
        red = tuple(range(1, a.ndim - nd))
        parts = {
            "weight": ((g * xhat).sum(red) if red else g * xhat).reshape(b, -1),
            "bias": (g.sum(red) if red else g).reshape(b, -1),
        }
    elif kind == "groupnorm":
        c = a.shape[1]
        ag = a.reshape(b, m.num_groups, -1)
        mu = ag.mean(2, keepdim=True)
        var = ag.var(2, unbiased=False, keepdim=True)
        xhat = ((ag - mu) * torch.rsqrt(var + m.eps)).reshape(a.shape)
        red = tuple(range(2, a.ndim))
        parts = {
            "weight": (g * xhat).sum(red) if red else (g * xhat).reshape(b, c),
            "bias": g.sum(red) if red else g.reshape(b, c),
        }
    else:
        return _generic_grads(slot, a, g)
    return _cat([parts[p].reshape(b, -1) for p in slot.params])


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _Forward(nn.Module):
    """Calls ``module.forward`` directly, so hooks on ``module`` do not fire."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.forward(x)


def _generic_grads(slot: LayerSlot, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    from torch.func import functional_call, vjp, vmap

    wrapper = _Forward(slot.module)
    dtype = next(iter(slot.param(p) for p in slot.params)).dtype
    params = {f"m.{p}": slot.param(p).detach() for p in slot.params}
    xa = a.to(dtype)
    ga = g.to(dtype)

    def one(pp, xi, gi):
        out, fn = vjp(lambda q: functional_call(wrapper, q, (xi.unsqueeze(0),)), pp)
        if not isinstance(out, torch.Tensor) or out.shape[1:] != gi.shape:
            raise AdapterError(f"layer {slot.name!r}: re-running the module did not reproduce its output shape.")
        return fn(gi.unsqueeze(0))[0]

    with torch.enable_grad():
        grads = vmap(one, in_dims=(None, 0, 0))(params, xa, ga)
    b = a.shape[0]
    return torch.cat([grads[f"m.{p}"].reshape(b, -1).float() for p in slot.params], dim=1)


def _weight_grad(slot: LayerSlot, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(dW [b, out, in'], db [b, out])`` of a Linear or Conv layer (closed form)."""
    m, b = slot.module, a.shape[0]
    if slot.kind == "linear":
        a2 = a.reshape(b, -1, a.shape[-1])
        g2 = g.reshape(b, -1, g.shape[-1])
        dw = torch.bmm(g2.transpose(1, 2), a2) if a2.shape[1] > 1 else g2[:, 0, :, None] * a2[:, 0, None, :]
        return dw, g2.sum(1)
    a4, k, d, pad, s = _conv_geometry(m, a)
    grp = m.groups
    g4 = g.reshape(b, m.out_channels, *([1] if isinstance(m, nn.Conv1d) else []), *g.shape[2:])
    cin_g = m.in_channels // grp
    ksz = math.prod(k)
    pos = g4.shape[2] * g4.shape[3]
    if ksz > 1 and (cin_g <= 4 or (pos >= 196 and (s == (1, 1) or ksz >= 25))):
        dw = _weight_grad_conv(a4, g4, k, d, pad, s, grp)
    else:
        cols = F.unfold(a4, k, dilation=d, padding=pad, stride=s)  # [b, cin*k, P]
        if g4.shape[2] * g4.shape[3] != cols.shape[2]:
            raise AdapterError(f"layer {slot.name!r}: unfolded positions do not match the output.")
        cw = cols.reshape(b, grp, cols.shape[1] // grp, -1)
        gw = g4.reshape(b, grp, m.out_channels // grp, -1)
        dw = torch.matmul(gw, cw.transpose(2, 3)).reshape(b, m.out_channels, -1)
    return dw, g4.flatten(2).sum(2)


def _weight_grad_conv(a4: torch.Tensor, g4: torch.Tensor, k: tuple, d: tuple, pad: tuple, s: tuple, grp: int):
    """Per-sample conv weight gradients as one grouped convolution (no unfold).

    ``dW[b, o, c, i, j] = sum_p d[b, o, p] a[b, c, p * s + (i, j) * d]``: the input (channels of
    one group as the batch, ``(sample, group)`` as channels) convolved with the output gradient
    as kernel, with stride and dilation swapped. Used where it beats unfold + GEMM on CPU
    (few input channels per group - stems, depthwise - or large maps at stride 1); the choice
    depends only on the layer's shapes, so results are deterministic.
    """
    b, cin, h, w = a4.shape
    out_ch = g4.shape[1]
    cg = cin // grp
    inp = a4.reshape(b, grp, cg, h, w).permute(2, 0, 1, 3, 4).reshape(cg, b * grp, h, w)
    ker = g4.reshape(b * out_ch, 1, g4.shape[2], g4.shape[3])
    res = F.conv2d(inp, ker, padding=pad, dilation=s, stride=d, groups=b * grp)[:, :, : k[0], : k[1]]
    return res.reshape(cg, b, out_ch, k[0], k[1]).permute(1, 2, 0, 3, 4).reshape(b, out_ch, cg * k[0] * k[1])


def _single_position(s: LayerSlot, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(a [B, in'], d [B, out])`` if the layer has one output position per sample and one group."""
    m, b = s.module, a.shape[0]
    if s.kind == "linear":
        if a.numel() != b * a.shape[-1]:
            return None
        return a.reshape(b, -1), g.reshape(b, -1)
    if m.groups != 1 or g[0].numel() != m.out_channels:
        return None
    a4, k, d, pad, st = _conv_geometry(m, a)
    cols = F.unfold(a4, k, dilation=d, padding=pad, stride=st)
    return cols.reshape(b, -1), g.reshape(b, -1)


def _chunk_size(per_sample: int, budget: int, b: int) -> int:
    return max(1, min(b, budget // max(per_sample, 1)))


# ---------------------------------------------------------------------------------------------
# layer maps


Consumer = Callable[[int, int, torch.Tensor], "dict[str, torch.Tensor] | None"]


class LayerMap:
    """A per-layer feature map of per-sample gradients, driven by one batched backward pass.

    Subclasses define ``dims`` (feature dimension per slot) and ``_features(i, a, g)`` returning
    ``[b, dims[i]]`` for a chunk of samples. ``backward_spec(consumer)`` builds the taps
    :class:`BackwardSpec`: for every layer call it feeds ``consumer(slot_index, row0, F)`` with
    chunks ``F`` of rows ``row0 ...`` and concatenates the per-sample dicts it returns (summed
    over layers by the taps under equal keys).
    """

    slots: list[LayerSlot]
    dims: list[int]

    def __init__(self, slots: list[LayerSlot], *, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> None:
        self.slots = slots
        self.chunk_elems = int(chunk_elems)
        self.objective = logsumexp_objective

    @property
    def dim(self) -> int:
        return int(sum(self.dims))

    @property
    def offsets(self) -> list[int]:
        out, o = [], 0
        for d in self.dims:
            out.append(o)
            o += d
        return out

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def _per_sample_elems(self, i: int, a: torch.Tensor) -> int:  # pragma: no cover - overridden
        return self.dims[i]

    def _features(self, i: int, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def features(self, i: int, a: torch.Tensor, g: torch.Tensor, batch: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Chunks ``(row0, F [b, dims[i]])`` of slot ``i``'s features for one layer call.

        ``batch`` (the number of samples of the pass, 0 = unknown) lets Linear/LayerNorm layers
        that see windows or heads merged into the leading dimension fold them back per sample.
        """
        slot = self.slots[i]
        if a is None:
            raise AdapterError(f"layer {slot.name!r} was called without a tensor input.")
        a = a.detach().float()
        g = g.detach().float()
        if batch and a.shape[0] != batch:
            if slot.kind not in ("linear", "layernorm") or (
                slot.kind == "layernorm" and len(slot.module.normalized_shape) != 1
            ):
                raise AdapterError(
                    f"layer {slot.name!r} received a leading dimension of {a.shape[0]} for a batch of "
                    f"{batch}; exclude it with params=[...]."
                )
            a, g = _fold_rows(a, g, batch, slot.name)
        b = a.shape[0]
        step = _chunk_size(self._per_sample_elems(i, a), self.chunk_elems, b)
        for r0 in range(0, b, step):
            yield r0, self._features(i, a[r0 : r0 + step], g[r0 : r0 + step])

    def _spec(self, layer_callback: Callable[[int, torch.Tensor, torch.Tensor, int], dict]) -> BackwardSpec:
        """A fresh :class:`BackwardSpec` calling ``layer_callback(i, a, g, batch)`` for every call
        of slot ``i``. The batch size is recorded by the objective in a cell private to this spec
        (one spec per capture call), so concurrent calls do not share state."""
        cell = [0]

        def objective(logits: torch.Tensor) -> torch.Tensor:
            cell[0] = int(logits.shape[0])
            return self.objective(logits)

        def make(i: int):
            def cb(module, a, g):
                return layer_callback(i, a, g, cell[0])

            return cb

        return BackwardSpec(objective=objective, layers={s.name: make(i) for i, s in enumerate(self.slots)})

    def backward_spec(self, consumer: Consumer) -> BackwardSpec:
        """A fresh :class:`BackwardSpec` feeding ``consumer`` and concatenating the per-sample
        dicts it returns."""

        def per_layer(i: int, a: torch.Tensor, g: torch.Tensor, batch: int) -> dict:
            out: dict[str, list[torch.Tensor]] = {}
            for r0, feats in self.features(i, a, g, batch):
                res = consumer(i, r0, feats)
                for k, v in (res or {}).items():
                    out.setdefault(k, []).append(v)
            return {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in out.items()}

        return self._spec(per_layer)

    def run(
        self, adapter: Adapter, x: torch.Tensor, consumer: Consumer, *, extra: CaptureSpec | None = None
    ) -> Features:
        """One forward + one batched backward pass on ``x`` (validated) feeding ``consumer``."""
        spec = CaptureSpec(logits=True, backward=self.backward_spec(consumer))
        if extra is not None:
            spec = spec | CaptureSpec(extra.logits, extra.penultimate, extra.blocks, extra.input)
        return capture(adapter, x, spec, validated=True)

    def projection_spec(self, weights: torch.Tensor, key: str) -> BackwardSpec:
        """A fresh :class:`BackwardSpec` whose features ``key`` are ``phi(x) @ weights`` ``[B, K]``."""
        views = [weights[o : o + d] for o, d in zip(self.offsets, self.dims)]
        return self._spec(lambda i, a, g, batch: {key: self._project(i, a, g, views[i], batch)})

    def _project(self, i: int, a: torch.Tensor, g: torch.Tensor, w: torch.Tensor, batch: int) -> torch.Tensor:
        parts = [feats.to(w.dtype) @ w for _, feats in self.features(i, a, g, batch)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def materialize(self, adapter: Adapter, x: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` as a dense ``[B, dim]`` matrix (small models and tests only)."""
        out = torch.zeros(x.shape[0], self.dim)
        offs = self.offsets

        def consumer(i: int, r0: int, feats: torch.Tensor) -> None:
            o = offs[i]
            out[r0 : r0 + feats.shape[0], o : o + self.dims[i]] += feats.cpu()

        self.run(adapter, x, consumer)
        return out


class ExactGradients(LayerMap):
    """``phi(x) = grad_theta f(x)``, concatenated over the slots' parameters (module order,
    ``weight`` before ``bias``)."""

    def __init__(self, slots: list[LayerSlot], *, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> None:
        super().__init__(slots, chunk_elems=chunk_elems)
        self.dims = [s.size for s in slots]

    def _per_sample_elems(self, i: int, a: torch.Tensor) -> int:
        s = self.slots[i]
        if s.kind == "conv":
            m = s.module
            pos = max(1, a[0].numel() // max(m.in_channels, 1))
            return s.size + m.in_channels * math.prod(m.kernel_size) * pos
        return s.size + a[0].numel()

    def _project(self, i: int, a: torch.Tensor, g: torch.Tensor, w: torch.Tensor, batch: int) -> torch.Tensor:
        """Direct route for Linear/Conv layers with one output position per sample (pooled
        heads, 1x1 maps): ``<d a^T, V_k> = d^T V_k a`` as ``a @ V.view(out, in, K)`` then a
        contraction with ``d`` - the same multiply-adds as the projection GEMM, without writing
        the per-sample gradients. Other layers form the gradient chunk and multiply."""
        s = self.slots[i]
        if (
            s.kind in ("linear", "conv")
            and "weight" in s.params
            and a is not None
            and (not batch or a.shape[0] == batch)
        ):
            vecs = _single_position(s, a.detach().float(), g.detach().float())
            if vecs is not None:
                av, gv = vecs
                out_ch, n_in = gv.shape[1], av.shape[1]
                ww = w[: out_ch * n_in].view(out_ch, n_in, -1)
                u = torch.matmul(av.to(w.dtype).unsqueeze(0), ww)  # [out, B, K]
                res = torch.einsum("bo,obk->bk", gv.to(w.dtype), u)
                if "bias" in s.params:
                    res = res + gv.to(w.dtype) @ w[out_ch * n_in :]
                return res
        return super()._project(i, a, g, w, batch)

    def _features(self, i: int, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        s = self.slots[i]
        if s.kind in ("linear", "conv"):
            dw, db = _weight_grad(s, a, g)
            parts = {"weight": dw, "bias": db}
            return _cat([parts[p].reshape(a.shape[0], -1) for p in s.params])
        return _vec_grads(s, a, g)


# ---------------------------------------------------------------------------------------------
# the Kronecker sketch


def _gaussian(rows: int, cols: int, seed: int, device: torch.device | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    return (torch.randn(rows, cols, generator=g) / math.sqrt(cols)).to(device)


@dataclass(frozen=True)
class SketchShape:
    """Sketch sizes of one slot: weight ``r_o x r_i`` (0 = no weight part) and vector ``r_v``.

    ``r_o == out`` and ``r_i == in'`` means the weight part is kept exactly; ``r_v == n_vec``
    means the vector part is kept exactly.
    """

    r_o: int
    r_i: int
    r_v: int

    @property
    def dim(self) -> int:
        return self.r_o * self.r_i + self.r_v


def _weight_dims(slot: LayerSlot) -> tuple[int, int]:
    m = slot.module
    if slot.kind == "linear" and "weight" in slot.params:
        return m.out_features, m.in_features
    if slot.kind == "conv" and "weight" in slot.params:
        return m.out_channels, (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return 0, 0


def plan_sketch(slots: list[LayerSlot], budget: int) -> list[SketchShape]:
    """Split a total sketch dimension ``budget`` over slots in proportion to their sizes."""
    total = sum(s.size for s in slots)
    out = []
    for s in slots:
        o, i = _weight_dims(s)
        nw = o * i
        nv = s.size - nw
        if nw:
            t = max(1.0, budget * nw / total)
            if t >= nw:
                ro, ri = o, i
            else:
                ro = max(1, min(o, round(math.sqrt(t * o / i))))
                ri = max(1, min(i, round(t / ro)))
        else:
            ro = ri = 0
        rv = 0
        if nv:
            rv = min(nv, max(1, round(budget * nv / total)))
        out.append(SketchShape(ro, ri, rv))
    return out


class KroneckerSketch(LayerMap):
    """Structured random projection of per-sample gradients that never forms them.

    Weight part of a Linear/Conv slot: ``R_o^T dW R_i`` with Gaussian ``R_o [out, r_o]`` and
    ``R_i [in', r_i]`` (entries ``N(0, 1/r)``), computed as ``sum_p (R_o^T d_p)(R_i^T a_p)^T``.
    Vector part (bias, norm affines, generic leaves): the exact per-sample gradient times a
    Gaussian ``[n_vec, r_v]``. Parts kept exactly when the plan says so. Random matrices are
    regenerated from ``seed`` and the slot index, so a saved sketch needs only its shapes.
    """

    def __init__(
        self,
        slots: list[LayerSlot],
        shapes: list[SketchShape],
        *,
        seed: int = 0,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    ) -> None:
        super().__init__(slots, chunk_elems=chunk_elems)
        if len(shapes) != len(slots):
            raise ValueError("one sketch shape per slot is needed")
        self.shapes = list(shapes)
        self.seed = int(seed)
        self.dims = [sh.dim for sh in self.shapes]
        self._mats: dict[int, tuple] = {}

    def _matrices(self, i: int, device: torch.device) -> tuple:
        got = self._mats.get(i)
        if got is not None and got[0] == device:
            return got[1]
        s, sh = self.slots[i], self.shapes[i]
        o, n_in = _weight_dims(s)
        base = (self.seed * 1_000_003 + i * 7919) * 4
        ro = ri = rv = None
        if sh.r_o * sh.r_i and (sh.r_o, sh.r_i) != (o, n_in):
            ro = _gaussian(o, sh.r_o, base + 1, device)
            ri = _gaussian(n_in, sh.r_i, base + 2, device)
        nv = s.size - o * n_in
        if sh.r_v and sh.r_v != nv:
            rv = _gaussian(nv, sh.r_v, base + 3, device)
        mats = (ro, ri, rv)
        self._mats[i] = (device, mats)
        return mats

    def _per_sample_elems(self, i: int, a: torch.Tensor) -> int:
        s, sh = self.slots[i], self.shapes[i]
        pos = max(1, a[0].numel() // max(a.shape[1] if a.ndim > 1 else 1, 1))
        return a[0].numel() + pos * (sh.r_o + sh.r_i) * 2 + sh.dim + (s.size if sh.r_o * sh.r_i == 0 else 0)

    def _features(self, i: int, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        s = self.slots[i]
        b = a.shape[0]
        ro, ri, rv = self._matrices(i, a.device)
        parts = []
        o, _ = _weight_dims(s)
        if o:
            if ro is None:  # kept exactly
                dw, db = _weight_grad(s, a, g)
                parts.append(dw.reshape(b, -1))
            else:
                parts.append(self._sketch_weight(s, a, g, ro, ri).reshape(b, -1))
                db = None
            if "bias" in s.params:
                if db is None:
                    db = g.reshape(b, o, -1).sum(2) if s.kind == "conv" else g.reshape(b, -1, o).sum(1)
                vec = db
            else:
                vec = None
        else:
            vec = _vec_grads(s, a, g)
        if vec is not None:
            parts.append(vec if rv is None else vec @ rv)
        return torch.cat(parts, dim=1)

    @staticmethod
    def _sketch_weight(s: LayerSlot, a: torch.Tensor, g: torch.Tensor, ro: torch.Tensor, ri: torch.Tensor):
        b = a.shape[0]
        m = s.module
        if s.kind == "linear":
            a2 = a.reshape(b, -1, a.shape[-1])
            g2 = g.reshape(b, -1, g.shape[-1])
            u = g2 @ ro  # [b, P, r_o]
            w = a2 @ ri  # [b, P, r_i]
            return torch.bmm(u.transpose(1, 2), w)
        a4, k, d, pad, st = _conv_geometry(m, a)
        grp = m.groups
        r_i = ri.shape[1]
        cin_g = m.in_channels // grp
        filt = ri.t().reshape(r_i, cin_g, *k).repeat(grp, 1, 1, 1)
        w = F.conv2d(a4, filt, stride=st, padding=pad, dilation=d, groups=grp)  # [b, grp*r_i, *out]
        pos = w.shape[2] * w.shape[3]
        w = w.reshape(b, grp, r_i, pos)
        gg = g.reshape(b, grp, m.out_channels // grp, pos)
        rog = ro.reshape(grp, m.out_channels // grp, -1)
        u = torch.einsum("bgop,gor->bgrp", gg, rog)
        r_o = u.shape[2]
        u = u.permute(0, 2, 1, 3).reshape(b, r_o, grp * pos)
        w = w.permute(0, 2, 1, 3).reshape(b, r_i, grp * pos)
        return torch.bmm(u, w.transpose(1, 2))
