"""SEIF MoE layers as PyTorch modules, and swapping them into transformers models.

`SparseMoE` runs one SEIF MoE layer (spec §5) in torch: every routing kind (`topk`,
`group_topk`, `sparse_mixer`, `expert_choice`, `soft_moe`), capacity with both drop policies,
selection bias, every normalization, `weight_on: input`, shared experts with their gate, and every
expert activation. It is written from the spec, independently of the NumPy reference
(`seif.moe.moe_forward`), and the tests compare the two.

Numerics (spec §6): router logits, scores, choice values and weights are float32 whatever the
weight dtype; top-k takes the lower expert index on ties, NaN first, -0 == +0 (`topk_lowest_index`
is a stable sort, never `torch.topk`, whose tie order is undefined). Experts run in the weights'
dtype (or `compute_dtype`), their activations in float32; outputs are combined in float32 and
returned in the input's dtype.

Dispatch is sorted-token grouped: the (token, slot) assignments are sorted by expert once, so
each expert's rows are contiguous; outputs are weighted and accumulated into the result with
`index_add_` (a fixed order, no [T*k, H] staging copy). On CPU, when `libseif_ort.so` is built
(`make native`) and no gradient is needed, the routed experts' FFN runs in its C++ kernels
through a small C ABI ("native": `seif.runtime.native`; float32 rows and sums on fp32 / bf16 /
fp16 weights, the same bits for any thread count), because torch's CPU matmuls run the few rows
per expert far below memory bandwidth (bf16 at half the fp32 rate without AMX). Where the layer
is one `ai.seif.SeifMoE` operator and the router logits are not asked for, the whole layer
(router, routing, experts, shared experts) is one call to the kernel ONNX Runtime runs for that
operator, the same bits (`_whole_layer_inputs`): a decode step's ~20 small torch routing ops
cost about as much as a quarter of its experts on 2 cores. Otherwise the
projections run either as one `torch._grouped_mm` over all experts ("grouped_mm": where this
torch supports it for the device and dtype, probed once; CPU float32 / bf16 / fp16 in torch
2.13 need 16-byte aligned row strides) or expert by expert over the active experts only
("per_expert"), where each matmul picks its kernel from its row count (MKL GEMV/GEMM for 1-3
rows, oneDNN from 4 rows in float32: "per_expert+onednn"). By default the choice is made per
call from the dtype and the rows per expert (`_dispatch`).

    moe = seif.converters.torch.load_layer("mixtral.seif", 0)      # nn.Module
    y = moe(hidden_states)                                         # [T, H] or [B, S, H]

    replace_moe_blocks(model, "mixtral.seif")                      # transformers model, in place
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seif.errors import ConversionError, RoutingError
from seif.manifest import FFNSpec, LayerSpec

__all__ = [
    "SparseMoE",
    "find_moe_block",
    "grouped_mm_supported",
    "native_supported",
    "shared_outside_block",
    "load_layer",
    "replace_moe_blocks",
    "topk_lowest_index",
]

_TORCH_DTYPES = {
    "f32": torch.float32, "float32": torch.float32, "F32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "BF16": torch.bfloat16,
    "f16": torch.float16, "float16": torch.float16, "F16": torch.float16,
    "f64": torch.float64, "float64": torch.float64, "F64": torch.float64,
}


def _torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _TORCH_DTYPES:
        return _TORCH_DTYPES[dtype]
    raise ConversionError(f"unknown dtype {dtype!r} (use one of f32, bf16, f16, f64)")


def _from_numpy(a) -> torch.Tensor:
    """A torch copy of a NumPy array, keeping bf16 / f16 / f32 / f64; anything else (fp8, ints
    stored as weights) becomes float32."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":       # ml_dtypes; torch.from_numpy does not know it
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16)
    if a.dtype in (np.float16, np.float32, np.float64):
        return torch.from_numpy(np.array(a, copy=True))
    return torch.from_numpy(a.astype(np.float32))


# --------------------------------------------------------------------------- routing helpers
def topk_lowest_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest entries along the last axis, best first (spec §6.2).

    NaN ranks above everything (NaNs among themselves by index), larger first, equal values
    (+0 == -0 included) to the lower index. Built from two stable sorts, which compose
    lexicographically: first by value descending (NaN keyed as 0, -0 turned into +0 by adding
    +0), then by is-NaN descending; a stable sort keeps the index order among equal keys.
    """
    n = values.shape[-1]
    if isinstance(k, bool) or not 0 <= int(k) <= n:
        raise RoutingError(f"k = {k!r} is not in [0, {n}]")
    nan = torch.isnan(values)
    key = torch.where(nan, torch.zeros_like(values), values) + 0.0
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    if bool(nan.any()):
        nan_sorted = torch.gather(nan, -1, order).to(torch.uint8)
        order = torch.gather(order, -1,
                             torch.sort(nan_sorted, dim=-1, descending=True, stable=True).indices)
    return order[..., : int(k)]


def _scores(z: torch.Tensor, scoring: str, dim: int = -1) -> torch.Tensor:
    if scoring in ("softmax", "softmax_topk"):
        return torch.softmax(z, dim=dim) if z.numel() else z.clone()
    if scoring in ("sigmoid", "sigmoid_topk"):
        return torch.sigmoid(z)
    raise RoutingError(f"unknown scoring {scoring!r}")


def _activate(name: str, g: torch.Tensor | None, u: torch.Tensor, alpha: float,
              limit: float) -> torch.Tensor:
    """Spec §5.13, on float32 inputs."""
    if name == "swiglu":
        return F.silu(g) * u
    if name == "geglu":
        return F.gelu(g) * u
    if name == "geglu_tanh":
        return F.gelu(g, approximate="tanh") * u
    if name == "swiglu_oai":
        g = torch.clamp(g, max=limit)
        u = torch.clamp(u, min=-limit, max=limit)
        return (u + 1.0) * (g * torch.sigmoid(alpha * g))
    if name == "relu":
        return F.relu(u)
    if name == "gelu":
        return F.gelu(u)
    if name == "gelu_tanh":
        return F.gelu(u, approximate="tanh")
    if name == "silu":
        return F.silu(u)
    if name == "relu2":
        return torch.square(F.relu(u))
    raise RoutingError(f"unknown activation {name!r}")


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> bool:
    """Whether `torch._grouped_mm` runs (correctly) on `device` for `dtype` in this torch.
    Probed once per (device type, dtype) on a tiny aligned problem."""
    dev = torch.device(device)
    key = (dev.type, dtype)
    if key not in _GROUPED_OK:
        ok = False
        if hasattr(torch, "_grouped_mm"):
            try:
                gen = torch.Generator().manual_seed(0)
                a = torch.randn(6, 8, generator=gen).to(dev, dtype)
                b = torch.randn(3, 8, 8, generator=gen).to(dev, dtype)
                offs = torch.tensor([2, 2, 6], dtype=torch.int32, device=dev)
                got = torch._grouped_mm(a, b, offs=offs).float()
                want = torch.cat([a[:2].float() @ b[0].float(), a[2:6].float() @ b[2].float()])
                ok = got.shape == want.shape and bool(
                    torch.allclose(got, want, rtol=5e-2, atol=5e-2))
            except Exception:  # not built for this device/dtype: fall back, never fail
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


# Whole-model ONNX export (`seif.converters.onnx_torch`) sets this, only while it runs
# torch.onnx.export, to `hook(module, hidden_states)`: under torch.export each SparseMoE then
# calls that instead of its forward (one `seif::moe` custom op per block).
export_hook = None


# --------------------------------------------------------------------------- the module
class SparseMoE(nn.Module):
    """One SEIF MoE layer (spec §5) as an `nn.Module`.

    Build it with `from_params(layer_spec, MoEParams)` or `from_checkpoint(path, l)`; forward
    takes hidden states `[T, H]` or `[B, S, H]` and returns the same shape and dtype. With `[B, S,
    H]`, layers whose routing couples tokens (capacity, expert choice, Soft MoE) route each
    sequence as its own group (spec §5.1); others route all B*S tokens at once.

    Parameters (stacked per expert): `router_weight` [E, H] ([E*S, H] for soft_moe),
    `router_bias` [E], buffer `selection_bias` [E], `gate_proj` / `up_proj` [E, I, H],
    `down_proj` [E, H, I] (+ `*_bias`), shared experts `shared_gate_proj` / `shared_up_proj`
    [n, I_s, H], `shared_down_proj` [n, H, I_s] (+ biases) and `shared_expert_gate` [1, H],
    and `output_bias` [H] (SEIF 1.1, JetMoE: added last, spec §5.16).

    `native`: None (auto, with `grouped_mm` None) runs the routed experts in libseif_ort.so's
    kernels wherever `_native_refusal` allows (CPU, library built, no gradient needed, experts
    in their stored float32 / bf16 / fp16, contiguous; `SEIF_TORCH_NATIVE=0` turns auto off);
    True forces it (a `NativeError` says why when it cannot run); False never uses it.
    Where it runs and the layer fits one SeifMoE operator (`_whole_layer_inputs`: no output
    bias, one activation, no router logits asked for, one routing group), the router, the
    routing and the shared experts run in the library too, in one call whose output is the
    ai.seif.SeifMoE kernel's bit for bit; else routing, shared experts and the output bias
    stay in torch.
    `grouped_mm` (when native does not run): None chooses per call (`_dispatch`: on CPU the
    per-expert loop for float32 experts with 4+ rows on average, bf16 with 32+, else grouped),
    True forces `torch._grouped_mm` where supported (see `grouped_mm_supported`), False forces
    the per-expert loop; either explicit choice also keeps auto from picking native.
    `last_dispatch` says which ran last: "native", "grouped_mm", "per_expert", or
    "per_expert+onednn" (some expert of the loop used oneDNN).
    `return_router_logits` makes forward return `(out, router_logits)` (the calling convention
    of some transformers decoder layers).
    """

    def __init__(self, layer: LayerSpec, dtype: torch.dtype = torch.float32, *,
                 compute_dtype: torch.dtype | None = None, grouped_mm: bool | None = None,
                 native: bool | None = None, return_router_logits: bool = False):
        super().__init__()
        r = layer.routing
        r.check("routing", layer.num_experts)
        self.spec = layer
        self.compute_dtype = compute_dtype
        self.grouped_mm = grouped_mm
        self.native = native
        self.return_router_logits = return_router_logits
        self.last_dispatch: str | None = None
        E, H = layer.num_experts, layer.hidden_size
        rows = E * r.slots_per_expert if r.kind == "soft_moe" else E

        def param(*shape):
            return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)

        self.router_weight = param(rows, H)
        self.router_bias = param(rows) if r.router_bias else None
        self.register_buffer("selection_bias",
                             torch.zeros(E, dtype=dtype) if r.selection_bias else None)
        self._ffn_params("", layer.experts, E, param)
        se = layer.shared_experts
        if se is not None:
            self._ffn_params("shared_", se.ffn, se.count, param)
        self.shared_expert_gate = param(1, H) if se is not None and se.gate else None
        self.output_bias = param(H) if layer.output_bias else None

    def _ffn_params(self, prefix: str, ffn: FFNSpec, n: int, param) -> None:
        H, I = self.spec.hidden_size, ffn.intermediate_size
        shapes = {"gate": (n, I, H), "up": (n, I, H), "down": (n, H, I)}
        for proj in ("gate", "up", "down"):
            used = proj in ffn.projections
            setattr(self, f"{prefix}{proj}_proj", param(*shapes[proj]) if used else None)
            setattr(self, f"{prefix}{proj}_proj_bias",
                    param(n, shapes[proj][1]) if used and ffn.bias else None)

    def extra_repr(self) -> str:
        r = self.spec.routing
        return (f"layer={self.spec.index}, experts={self.spec.num_experts}, kind={r.kind}, "
                f"top_k={r.top_k}, activation={self.spec.experts.activation}")

    # -- construction
    @classmethod
    def from_params(cls, layer: LayerSpec, params, dtype=None, **kwargs) -> SparseMoE:
        """Build from `seif.moe.MoEParams` (NumPy arrays, any float dtype incl. ml_dtypes bf16).
        `dtype` (torch dtype or 'bf16'/'f32'/...) casts the expert weights (routed and shared);
        by default the experts' stored dtype is kept. Router weight and bias, selection bias
        and shared-expert gate always keep their stored dtype (the router runs in float32 on
        them whatever it is)."""
        dtype = _torch_dtype(dtype)
        if len(params.experts) != layer.num_experts:
            raise RoutingError(f"{len(params.experts)} expert weight sets for "
                               f"{layer.num_experts} experts")
        first = _from_numpy(params.experts[0]["up"]) if params.experts else None
        dtype = dtype or (first.dtype if first is not None else torch.float32)
        module = cls(layer, dtype, **kwargs)

        def put(name: str, array, keep_dtype: bool = False) -> None:
            target = getattr(module, name)
            value = _from_numpy(array)
            if target is None or tuple(value.shape) != tuple(target.shape):
                raise RoutingError(f"{name} is {list(value.shape)}; expected "
                                   f"{None if target is None else list(target.shape)}")
            if keep_dtype:          # router tensors keep their stored precision
                target.data = value
            else:
                target.data.copy_(value.to(dtype))

        put("router_weight", params.router_weight, True)
        if layer.routing.router_bias:
            put("router_bias", params.router_bias, True)
        elif params.router_bias is not None:
            raise RoutingError("router bias given but routing.router_bias is not set")
        if layer.routing.selection_bias:
            put("selection_bias", params.selection_bias, True)
        elif params.selection_bias is not None:
            raise RoutingError("selection bias given but routing.selection_bias is not set")
        module._put_ffns("", layer.experts, params.experts, put)
        se = layer.shared_experts
        if len(params.shared) != (se.count if se else 0):
            raise RoutingError(f"{len(params.shared)} shared expert weight sets for "
                               f"{se.count if se else 0}")
        if se is not None:
            module._put_ffns("shared_", se.ffn, params.shared, put)
            if se.gate:
                put("shared_expert_gate", params.shared_gate, True)
        if layer.output_bias:
            put("output_bias", params.output_bias, True)
        elif params.output_bias is not None:
            raise RoutingError("output bias given but the layer's output_bias is not set")
        return module

    @staticmethod
    def _put_ffns(prefix: str, ffn: FFNSpec, weights: list[dict], put) -> None:
        for proj in ffn.projections:
            put(f"{prefix}{proj}_proj", np.stack([w[proj] for w in weights]))
            if ffn.bias:
                put(f"{prefix}{proj}_proj_bias", np.stack([w[f"{proj}_bias"] for w in weights]))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, l: int, dtype=None, **kwargs) -> SparseMoE:
        """Build from layer `l` (the source model's decoder-layer index) of a SEIF checkpoint.
        Stored bf16/f16/f32 weights keep their dtype unless `dtype` is given; quantized
        weights (fp8-block, mxfp4, int-group) are dequantized to float32 (then cast)."""
        layer, params = _read_layer(path, l)
        return cls.from_params(layer, params, dtype, **kwargs)

    # -- forward
    def forward(self, hidden_states: torch.Tensor):
        if export_hook is not None and torch.compiler.is_exporting():
            return export_hook(self, hidden_states)
        H = self.spec.hidden_size
        if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != H:
            raise RoutingError(f"hidden states are {list(hidden_states.shape)}; expected "
                               f"[T, {H}] or [B, S, {H}]")
        shape, in_dtype = hidden_states.shape, hidden_states.dtype
        tensors = self._whole_layer_inputs(hidden_states)
        if tensors is not None:
            return self._forward_native(hidden_states.reshape(-1, H), tensors).reshape(shape)
        x = hidden_states.reshape(-1, H).float()
        logits = F.linear(x, self.router_weight.float(),
                          None if self.router_bias is None else self.router_bias.float())
        r = self.spec.routing
        coupled = r.capacity is not None or r.kind in ("expert_choice", "soft_moe")
        if hidden_states.dim() == 3 and coupled and shape[0] > 1:
            S = shape[1]
            out = torch.cat([self._forward_group(x[b * S:(b + 1) * S], logits[b * S:(b + 1) * S])
                             for b in range(shape[0])])
        else:
            out = self._forward_group(x, logits)
        out = out.to(in_dtype).reshape(shape)
        if self.return_router_logits:
            return out, logits.to(in_dtype)
        return out

    def _forward_group(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """One routing group: x [T, H] float32, logits [T, E(*S)] float32 -> [T, H] float32."""
        T, H = x.shape
        if T == 0:
            return x.new_zeros(0, H)
        kind = self.spec.routing.kind
        if kind in ("topk", "group_topk", "sparse_mixer"):
            out = self._token_choice(x, logits)
        elif kind == "expert_choice":
            out = self._expert_choice(x, logits)
        elif kind == "soft_moe":
            out = self._soft_moe(x, logits)
        else:
            raise RoutingError(f"unknown routing kind {kind!r}")
        if self.spec.shared_experts is not None:
            out = out + self._shared(x)
        if self.output_bias is not None:      # after routed + shared (spec §5.16)
            out = out + self.output_bias.float()
        return out

    # -- routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token-choice routing of x [T, H] as one group: (indices [T, k] int64 best first,
        weights [T, k] float32 after normalize and scale, kept [T, k] bool)."""
        x = x.reshape(-1, self.spec.hidden_size).float()
        logits = F.linear(x, self.router_weight.float(),
                          None if self.router_bias is None else self.router_bias.float())
        return self._route(logits)

    def _route(self, z: torch.Tensor):
        r, E = self.spec.routing, self.spec.num_experts
        T, k = z.shape[0], r.top_k
        if r.kind == "sparse_mixer":
            idx, w = _sparse_mixer(z, r.jitter_eps)
        else:
            late = r.scoring in ("softmax_topk", "sigmoid_topk")
            s = z if late else _scores(z, r.scoring)
            c = s if self.selection_bias is None else s + self.selection_bias.float()
            if r.kind == "group_topk":
                c = _group_mask(c, r.n_group, r.topk_group, r.group_score, r.group_mask)
            idx = topk_lowest_index(c, k)
            w = torch.gather(s, -1, idx)
            if late:
                w = _scores(w, r.scoring)
        if r.normalize != "none":
            if r.normalize == "sum":
                size = w.sum(dim=-1, keepdim=True)
            elif r.normalize == "lp":
                size = torch.pow(torch.pow(w.abs(), r.norm_p).sum(dim=-1, keepdim=True),
                                 1.0 / r.norm_p)
            else:
                raise RoutingError(f"unknown normalize {r.normalize!r}")
            eps = torch.tensor(r.epsilon, dtype=torch.float32)
            if r.epsilon_rule == "add":
                size = size + eps
            elif r.epsilon_rule == "clamp":
                size = torch.maximum(size, eps)
            else:
                raise RoutingError(f"unknown epsilon_rule {r.epsilon_rule!r}")
            w = w / size
        w = w * torch.tensor(r.scale, dtype=torch.float32)
        if r.capacity is not None:
            kept = _capacity_keep(idx, E, r.capacity.per_expert(T, E, k))
        else:
            kept = torch.ones_like(idx, dtype=torch.bool)
        return idx, w, kept

    def _token_choice(self, x, z):
        r = self.spec.routing
        idx, w, kept = self._route(z)
        T, k = idx.shape
        flat_e, flat_w, flat_kept = idx.reshape(-1), w.reshape(-1), kept.reshape(-1)
        slots = torch.nonzero(flat_kept).squeeze(1) if r.capacity is not None \
            else torch.arange(T * k, device=x.device)
        order = torch.sort(flat_e[slots], stable=True).indices     # group by expert, once
        slots = slots[order]
        experts = flat_e[slots]
        tokens = torch.div(slots, k, rounding_mode="floor")
        out = torch.zeros_like(x)
        self._experts_into(out, x, tokens, experts, flat_w[slots].unsqueeze(1),
                           r.weight_on == "input")
        if r.capacity is not None and r.capacity.drop_policy == "passthrough_scaled":
            dropped = torch.nonzero(~flat_kept).squeeze(1)
            dropped_tokens = torch.div(dropped, k, rounding_mode="floor")
            out.index_add_(0, dropped_tokens, flat_w[dropped].unsqueeze(1) * x[dropped_tokens])
        return out

    def _expert_choice(self, x, z):
        r, E = self.spec.routing, self.spec.num_experts
        T = x.shape[0]
        if r.scoring not in ("softmax", "sigmoid"):
            raise RoutingError(f"expert_choice scores with softmax or sigmoid, not {r.scoring!r}")
        s = _scores(z, r.scoring).t()                        # [E, T]
        C = r.capacity.per_expert(T, E, 1, clip=True)
        tok = topk_lowest_index(s, C)                        # [E, C]: expert-major = sorted
        g = torch.gather(s, -1, tok) * torch.tensor(r.scale, dtype=torch.float32)
        tokens, ws = tok.reshape(-1), g.reshape(-1, 1)
        experts = torch.arange(E, device=x.device).repeat_interleave(C)
        out = torch.zeros_like(x)
        return self._experts_into(out, x, tokens, experts, ws, r.weight_on == "input")

    def _soft_moe(self, x, z):
        E, S = self.spec.num_experts, self.spec.routing.slots_per_expert
        dispatch = torch.softmax(z, dim=0)                   # over tokens
        combine = torch.softmax(z, dim=1)                    # over slots
        slot_in = dispatch.t() @ x                           # [E*S, H], expert-major
        slot_out = self._experts(slot_in, torch.arange(E, device=x.device).repeat_interleave(S))
        return combine @ slot_out

    def _shared(self, x):
        se = self.spec.shared_experts
        out = torch.zeros_like(x)
        for s in range(se.count):
            out = out + self._ffn(x, "shared_", se.ffn, s)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(x @ self.shared_expert_gate.float().t()) * out
        return out

    # -- expert computation
    def _cdt(self) -> torch.dtype:
        return self.compute_dtype or self.up_proj.dtype

    def _ffn(self, x, prefix: str, ffn: FFNSpec, s: int) -> torch.Tensor:
        """FFN `s` of a stacked group (the shared experts) on x [N, H] float32 -> float32."""
        cdt = self._cdt()

        def proj(name, inp):
            w = getattr(self, f"{prefix}{name}_proj")[s].to(cdt)
            b = getattr(self, f"{prefix}{name}_proj_bias")
            return F.linear(inp, w, None if b is None else b[s].to(cdt)).float()

        xs = x.to(cdt)
        u = proj("up", xs)
        g = proj("gate", xs) if ffn.gated else None
        return proj("down", _activate(ffn.activation, g, u, ffn.alpha, ffn.limit).to(cdt))

    def _dispatch(self, cdt: torch.dtype, x: torch.Tensor, counts: torch.Tensor) -> str:
        """"native", "grouped_mm" or "per_expert", from the `native` and `grouped_mm` settings,
        the dtype and the rows per expert (`counts`) of this call.

        "native" first, wherever `_native_refusal` finds nothing against it (auto: `native`
        None and `grouped_mm` None): libseif_ort.so's GEMMs read the weights near memory
        bandwidth for any row count, bf16 included, where torch's CPU matmuls do not (see
        `_experts_native`). The rest chooses between the two torch dispatches.

        Auto (`grouped_mm=None`) on CPU: `torch._grouped_mm` runs one `mm` per expert there,
        the kernel the loop's F.linear runs too, with one Python call per projection instead
        of about ten per active expert (4-10% faster where experts get 1-3 rows; measured with
        benchmarks.moe_forward). The loop wins only where it can pick a faster kernel: float32
        experts with `ONEDNN_MIN_ROWS`+ rows on average, where oneDNN beats MKL (see
        `_linear`; deepseek T=64 / 256 / 1024 1.2-1.5x), and experts with `LOOP_MIN_ROWS`+
        rows in other dtypes: bf16 F.linear runs oneDNN already, yet `_grouped_mm`'s bf16 path
        measured 1.2x slower than it at 96 rows per expert (deepseek T=1024) while 5-8% faster
        at 6 (T=64). Other devices (CUDA) have a real grouped kernel and always use it."""
        if self._native_wanted(cdt, x):
            return "native"
        device = x.device
        if self.grouped_mm is False:
            return "per_expert"
        I, H = self.spec.experts.intermediate_size, self.spec.hidden_size
        item = torch.empty((), dtype=cdt).element_size()
        aligned = (H * item) % 16 == 0 and (I * item) % 16 == 0
        if not (aligned and grouped_mm_supported(device, cdt)):
            return "per_expert"
        if self.grouped_mm or device.type != "cpu" or I * H <= GROUPED_MAX_EXPERT_ELEMENTS:
            return "grouped_mm"
        onednn = cdt == torch.float32 and onednn_linear_supported(device, cdt)
        min_rows = ONEDNN_MIN_ROWS if onednn else LOOP_MIN_ROWS
        active = int(torch.count_nonzero(counts))
        return "per_expert" if int(counts.sum()) >= min_rows * active else "grouped_mm"

    def _experts(self, xs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Routed experts on rows xs [N, H] (float32) sorted by `experts` [N] -> [N, H] f32."""
        N, H = xs.shape
        out = xs.new_zeros(N, H, dtype=torch.float32)
        rows = torch.arange(N, device=xs.device)
        return self._experts_into(out, xs, rows, experts, None, False)

    def _experts_into(self, out: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor,
                      experts: torch.Tensor, ws: torch.Tensor | None,
                      on_input: bool) -> torch.Tensor:
        """out[tokens[i]] += ws[i] * expert_{experts[i]}(x[tokens[i]]) for every i (ws on the
        expert's input instead when `on_input`; ws None = 1). `experts` is sorted; out and x
        are float32. Returns out.

        Rows are gathered, weighted and accumulated expert by expert (index_add_, a fixed
        order) so that no [N, H] copies of the inputs or outputs are made on the loop path."""
        ffn, E = self.spec.experts, self.spec.num_experts
        if tokens.shape[0] == 0:
            return out
        cdt = self._cdt()
        counts = torch.bincount(experts, minlength=E)
        dispatch = self._dispatch(cdt, x, counts)
        if dispatch == "native":
            self._experts_native(out, x, tokens, ws, on_input, counts, ffn)
            self.last_dispatch = "native"
            return out
        if dispatch == "grouped_mm":
            xs = x[tokens]
            if on_input and ws is not None:
                xs = ws * xs
            try:
                ys = self._experts_grouped(xs.to(cdt).contiguous(), experts, counts, ffn, cdt)
            except RuntimeError:       # an unsupported layout after all: fall back, for good
                self.grouped_mm = False
            else:
                self.last_dispatch = "grouped_mm"
                if not on_input and ws is not None:
                    ys.mul_(ws)
                return out.index_add_(0, tokens, ys)
        self._experts_loop(out, x, tokens, ws, on_input, counts, ffn, cdt)
        return out

    def _native_on(self) -> bool:
        """`native` True, or auto: `native` and `grouped_mm` None and SEIF_TORCH_NATIVE not
        "0"."""
        if self.native is not None:
            return self.native
        return self.grouped_mm is None and os.environ.get("SEIF_TORCH_NATIVE", "") != "0"

    def _native_wanted(self, cdt: torch.dtype, x: torch.Tensor) -> bool:
        """Whether this call takes the native expert dispatch: where `_native_on` and
        `_native_refusal` finds nothing against the experts' tensors (`native` True: a
        NativeError with the reason where it cannot run)."""
        if not self._native_on():
            return False
        why_not = self._native_refusal(cdt, x, self._operator_inputs(_EXPERT_INPUTS))
        if why_not is None:
            return True
        if self.native:
            raise _native().NativeError(
                f"native=True, but the native expert kernels cannot run here: {why_not}")
        return False

    def _whole_layer_inputs(self, h: torch.Tensor) -> dict[str, torch.Tensor | None] | None:
        """The SeifMoE operator's tensors (by input name, hidden_states aside) where forward
        runs the whole layer in one native call (`_forward_native`), else None. It does where
        the native dispatch is on (`_native_on`), the layer is one SeifMoE operator (no output
        bias; `_native_attributes`), the router logits are not asked for, the tokens form one
        routing group (a batch of sequences with capacity, expert choice or soft MoE is routed
        sequence by sequence: not here), and `_native_refusal` finds nothing against any of
        the operator's tensors (the router's may have a dtype of their own). Otherwise forward
        takes the other dispatches (`native` True still runs the experts natively there, or
        says why not). Kept lean: it runs on every call, and at a decode step each
        Python-level check costs microseconds."""
        if not self._native_on():
            return None
        r = self.spec.routing
        if self.return_router_logits or self.output_bias is not None \
                or h.dtype not in NATIVE_DTYPES or h.numel() == 0:
            return None
        coupled = r.capacity is not None or r.kind in ("expert_choice", "soft_moe")
        if (h.dim() == 3 and coupled and h.shape[0] > 1) or self._native_attributes() is None:
            return None
        tensors = self._operator_inputs(_OPERATOR_INPUTS)
        return tensors if self._native_refusal(self._cdt(), h, tensors) is None else None

    def _operator_inputs(self, names: tuple[str, ...]) -> dict[str, torch.Tensor | None]:
        """This layer's tensors by SeifMoE input name (`names`, from _OPERATOR_INPUTS), read
        from the parameter and buffer tables directly (nn.Module's attribute fallback costs
        ~1 us a name)."""
        params, buffers = self._parameters, self._buffers
        out = {}
        for name in names:
            attr = _OPERATOR_ATTRS[name]
            out[name] = params[attr] if attr in params else \
                buffers[attr] if attr in buffers else getattr(self, attr, None)
        return out

    def _forward_native(self, x: torch.Tensor,
                        tensors: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """The layer on x [T, H] (its own dtype) in one call to libseif_ort.so's
        `seif_moe_forward`: the kernel ai.seif.SeifMoE runs in ONNX Runtime, so the output is
        that operator's, bit for bit (routing by the library's router, on logits from its own
        GEMM). Why: at decode sizes the routing's and the sort's ~20 small torch ops and the
        dtype conversions cost about 1 ms on 2 cores (deepseek layer, bf16, T=1: the experts
        alone 4.1 ms, the module 5.15)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        inputs = {name: _view(t) for name, t in tensors.items() if t is not None}
        inputs["hidden_states"] = _view(x)
        _native().moe_forward(self._native_attributes(), inputs, _view(out),
                              threads=torch.get_num_threads())
        self.last_dispatch = "native"
        return out

    def _native_attributes(self) -> dict | None:
        """The SeifMoE attributes of this layer (seif.converters.onnx.layer_attributes), or
        None where one SeifMoE node cannot hold it (`operator_refusal`); kept while `spec` is
        the same object."""
        cached = getattr(self, "_native_attrs", None)
        if cached is None or cached[0] is not self.spec:
            from seif.converters.onnx import layer_attributes, operator_refusal
            ok = operator_refusal(self.spec) is None
            cached = (self.spec, layer_attributes(self.spec) if ok else None)
            self._native_attrs = cached
        return cached[1]

    def _native_refusal(self, cdt: torch.dtype, x: torch.Tensor,
                        tensors: dict[str, torch.Tensor | None]) -> str | None:
        """Why the native kernels cannot run this call on `tensors` (SeifMoE input name ->
        tensor or None; None: they can). They need the library (with its C API), CPU tensors
        that need no gradient (they have no backward), eager mode (no torch.compile / export
        tracing), a native activation, experts in their stored dtype (float32, bfloat16 or
        float16) and contiguous tensors: the experts' of one dtype, the router's (router_bias:
        router_weight's), selection_bias's and shared_expert_gate's of any of the three."""
        if x.device.type != "cpu":
            return f"the input is on {x.device}, not the CPU"
        if torch.compiler.is_compiling():
            return "torch.compile / export is tracing"
        if not _native().available():
            return "libseif_ort.so (with its C API) is not built: `make native`"
        wt = tensors["up_proj"].dtype
        if cdt != wt:
            return f"compute_dtype {cdt} differs from the weights' {wt}"
        if wt not in NATIVE_DTYPES:
            return f"expert weights are {wt}, not float32, bfloat16 or float16"
        if self.spec.experts.activation not in NATIVE_ACTIVATIONS:
            return f"activation {self.spec.experts.activation!r} has no native kernel"
        grad = torch.is_grad_enabled()
        if grad and (x.requires_grad or any(t is not None and t.requires_grad
                                            for t in tensors.values())):
            return "a gradient is needed (the native kernels have no backward)"
        router = tensors.get("router_weight")
        for name, t in tensors.items():
            if t is None:
                continue
            own = router.dtype if name == "router_bias" else _OWN_DTYPE.get(name, wt)
            if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in NATIVE_DTYPES \
                    or (own is not None and t.dtype != own):
                return (f"{name} is not a contiguous CPU tensor of "
                        f"{own or 'float32, bfloat16 or float16'} (it is {t.dtype} on "
                        f"{t.device}, contiguous: {t.is_contiguous()})")
        return None

    def _experts_native(self, out: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor,
                        ws: torch.Tensor | None, on_input: bool, counts: torch.Tensor,
                        ffn: FFNSpec) -> None:
        """`_experts_into` through libseif_ort.so's `seif_moe_experts` (runtime/csrc/
        c_api.cpp): gather, expert FFNs and the weighted combine into `out` (each token's terms
        in the sorted order, as index_add_ adds them) in one call. Its AVX-512 / AVX2 GEMMs read
        fp32, bf16 or fp16 weights directly with float32 rows and sums, so bf16 experts are not
        held to torch's bf16 matmul (half its fp32 rate on CPUs without AMX) nor fp32 ones to
        its small-row GEMMs far below memory bandwidth; SwiGLU in float64 rounded once; torch's
        thread count, the same bits for any. No torch op runs between the gather and the
        combine: each would leave torch's OpenMP workers spinning on the cores the library's
        threads need (measured: deepseek fp32 T=1024 452 -> ~400 ms)."""
        # Locals: each tensor must outlive the call (a View holds only its address).
        x = x.contiguous()
        tokens = tokens.to(torch.int64).contiguous()
        ws = None if ws is None else ws.reshape(-1).float().contiguous()
        counts = counts.to(torch.int64).contiguous()
        _native().moe_experts(
            _view(x), _view(tokens), _view(ws), _view(counts), _view(self.up_proj),
            _view(self.down_proj), _view(out), weight_on_input=on_input, gate=_view(self.gate_proj),
            gate_bias=_view(self.gate_proj_bias), up_bias=_view(self.up_proj_bias),
            down_bias=_view(self.down_proj_bias), activation=ffn.activation, alpha=ffn.alpha,
            limit=ffn.limit, threads=torch.get_num_threads())

    def _weights(self, name: str, cdt):
        w = getattr(self, f"{name}_proj")
        b = getattr(self, f"{name}_proj_bias")
        return w.to(cdt), None if b is None else b.to(cdt)

    def _experts_grouped(self, xs, experts, counts, ffn, cdt):
        offs = torch.cumsum(counts, 0).to(torch.int32)

        def proj(name, inp):
            w, b = self._weights(name, cdt)
            y = torch._grouped_mm(inp, w.transpose(1, 2), offs=offs)
            return y if b is None else y + b[experts]

        u = proj("up", xs).float()
        g = proj("gate", xs).float() if ffn.gated else None
        h = _activate(ffn.activation, g, u, ffn.alpha, ffn.limit).to(cdt).contiguous()
        return proj("down", h).float()

    def _experts_loop(self, out, x, tokens, ws, on_input, counts, ffn, cdt) -> None:
        """One expert at a time, active experts only; each projection through `_linear`."""
        ends = torch.cumsum(counts, 0).tolist()
        start = 0
        weights = {p: self._weights(p, cdt) for p in ffn.projections}
        onednn = cdt == torch.float32 and onednn_linear_supported(x.device, cdt)
        used_onednn = False
        for e, end in enumerate(ends):
            if end == start:
                continue
            tok = tokens[start:end]
            w_e = None if ws is None else ws[start:end]
            rows = x.index_select(0, tok)
            if on_input and w_e is not None:
                rows = w_e * rows
            rows = rows.to(cdt)
            fast = onednn and end - start >= ONEDNN_MIN_ROWS

            def proj(name, inp, e=e, fast=fast):
                w, b = weights[name]
                return _linear(inp, w[e], None if b is None else b[e], fast)

            u = proj("up", rows).float()
            g = proj("gate", rows).float() if ffn.gated else None
            h = _activate(ffn.activation, g, u, ffn.alpha, ffn.limit).to(cdt)
            y = proj("down", h).float()
            if not on_input and w_e is not None:
                y = y.mul_(w_e)
            out.index_add_(0, tok, y)
            used_onednn = used_onednn or fast
            start = end
        self.last_dispatch = "per_expert+onednn" if used_onednn else "per_expert"


# What the native dispatch (libseif_ort.so's `seif_experts_forward`) runs.
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NATIVE_ACTIVATIONS = frozenset({"swiglu", "geglu", "geglu_tanh", "swiglu_oai", "relu", "gelu",
                                "gelu_tanh", "silu", "relu2"})


def _native():
    """seif.runtime.native, imported on first use (loading the library is lazy there too)."""
    from seif.runtime import native
    return native


# SeifMoE input name -> SparseMoE attribute, hidden_states aside (seif.converters.onnx.MOE_INPUTS).
_OPERATOR_ATTRS = {"router_weight": "router_weight", "router_bias": "router_bias",
                   "selection_bias": "selection_bias",
                   **{f"{pre}{p}_{kind}": f"{pre}{p}_proj{suffix}"
                      for pre in ("", "shared_") for p in ("gate", "up", "down")
                      for kind, suffix in (("proj", ""), ("bias", "_bias"))},
                   "shared_expert_gate": "shared_expert_gate"}
_OPERATOR_INPUTS = tuple(_OPERATOR_ATTRS)
_EXPERT_INPUTS = ("gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias")
# Inputs whose dtype may differ from the experts' (None: any); router_bias: router_weight's.
_OWN_DTYPE = {"router_weight": None, "selection_bias": None, "shared_expert_gate": None}


def _view(t: torch.Tensor | None):
    """The native.View of a CPU tensor (None stays None). The tensor must outlive the call:
    a View holds only its address."""
    if t is None:
        return None
    return _native().View(t.data_ptr(), tuple(t.shape), str(t.dtype).removeprefix("torch."),
                          t.is_contiguous())


def native_supported() -> bool:
    """Whether libseif_ort.so is built with the C API the native dispatch calls."""
    return _native().available()


# Experts with at least this many rows use oneDNN's matmul in float32 (see `_linear`).
ONEDNN_MIN_ROWS = 4

# Other dtypes (bf16, fp16; or float32 without oneDNN): the loop from this many rows on average.
LOOP_MIN_ROWS = 32

# One expert's [I, H] at or under this many weights: `grouped_mm=None` takes torch._grouped_mm
# on CPU (a matmul this small takes about as long as the Python call that launches it).
GROUPED_MAX_EXPERT_ELEMENTS = 1 << 16

_ONEDNN_OK: dict[tuple[str, torch.dtype], bool] = {}


def onednn_linear_supported(device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's linear (`torch.ops.mkldnn._linear_pointwise` on plain, unpacked
    weights) runs and agrees with `F.linear` on `device` for `dtype`; probed once."""
    dev = torch.device(device)
    key = (dev.type, dtype)
    if key not in _ONEDNN_OK:
        ok = False
        if dev.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                gen = torch.Generator().manual_seed(0)
                a = torch.randn(3, 16, generator=gen).to(dtype)
                w = torch.randn(5, 16, generator=gen).to(dtype)
                b = torch.randn(5, generator=gen).to(dtype)
                got = torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "").float()
                want = F.linear(a.float(), w.float(), b.float())
                ok = got.shape == want.shape and bool(
                    torch.allclose(got, want, rtol=1e-2, atol=1e-2))
            except Exception:  # not built in, or an API change: use F.linear, never fail
                ok = False
        _ONEDNN_OK[key] = ok
    return _ONEDNN_OK[key]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
            onednn: bool) -> torch.Tensor:
    """x @ w.T (+ b). `onednn`: oneDNN's matmul instead of torch's default (MKL sgemm for
    float32). Measured here on CPU (fp32, 2 threads, 64 experts' weights streamed from DRAM):
    MKL reads the weights at 25-30 GB/s (the read bandwidth) for 1-3 rows but at 14-16 GB/s
    for 4-24 rows (it packs the weight, so each byte crosses memory more than once); oneDNN
    holds 18-19 GB/s over 2-24 rows and is 5-20% faster than MKL up to 256 rows. So callers
    pass onednn for `ONEDNN_MIN_ROWS` rows or more. bf16 F.linear already runs oneDNN."""
    if onednn and x.is_contiguous() and w.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _group_mask(c: torch.Tensor, G: int, keep: int, score: str, mask: str) -> torch.Tensor:
    """Spec §5.5: keep the experts of the `keep` best of G contiguous groups."""
    T, E = c.shape
    P = E // G
    grouped = c.reshape(T, G, P)
    if score == "max":
        gs = grouped.amax(dim=-1)
    elif score == "top2_sum":
        top2 = torch.gather(grouped, -1, topk_lowest_index(grouped, 2))
        gs = top2[..., 0] + top2[..., 1]
    else:
        raise RoutingError(f"unknown group_score {score!r}")
    kept = torch.zeros(T, G, dtype=torch.bool, device=c.device)
    kept = kept.scatter_(-1, topk_lowest_index(gs, keep), True)
    kept = kept.repeat_interleave(P, dim=-1)
    if mask == "neg_inf":
        fill = float("-inf")
    elif mask == "zero":
        fill = 0.0
    else:
        raise RoutingError(f"unknown group_mask {mask!r}")
    return torch.where(kept, c, torch.tensor(fill, dtype=c.dtype, device=c.device))


def _sparse_mixer(z: torch.Tensor, jitter_eps: float):
    """Spec §5.11 (PhiMoE inference form), k = 2."""
    threshold = torch.tensor(2 * jitter_eps, dtype=torch.float32)
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype)
    magnitude = z.abs()
    eligible = z
    idx, w = [], []
    for _ in range(2):
        i = topk_lowest_index(eligible, 1)                       # [T, 1]
        m = torch.gather(eligible, -1, i)
        masked = (m - z) / torch.maximum(magnitude, m) > threshold   # NaN -> False
        probs = torch.softmax(torch.where(masked, neg_inf, eligible), dim=-1)
        idx.append(i)
        w.append(torch.gather(probs, -1, i))
        eligible = eligible.scatter(-1, i, float("-inf"))
    return torch.cat(idx, dim=-1), torch.cat(w, dim=-1)


def _capacity_keep(idx: torch.Tensor, E: int, C: int) -> torch.Tensor:
    """Spec §5.6: an assignment is kept when fewer than C earlier ones (choice-major,
    token-minor) went to the same expert."""
    T, k = idx.shape
    flat = idx.t().reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=idx.device) - starts[flat[order]]
    return (rank < C).view(k, T).t()


def _read_layer(path: str | os.PathLike, l: int):
    """(LayerSpec, MoEParams) of layer `l`, weights in their stored dtype (quantized ones
    dequantized to float32)."""
    import seif
    from seif.moe import MoEParams

    with seif.open(path) as ckpt:
        layer = ckpt.layer(l)

        def get(name: str):
            if ckpt.info(name).quantization is not None:
                return ckpt.dequantized(name)
            return ckpt.tensor(name)

        return layer, MoEParams.from_tensors(layer, get)


def load_layer(path: str | os.PathLike, l: int, dtype=None, **kwargs) -> SparseMoE:
    """`SparseMoE.from_checkpoint(path, l)`: layer `l` (source decoder-layer index) of a SEIF
    checkpoint as an nn.Module taking [T, H] or [B, S, H]."""
    return SparseMoE.from_checkpoint(path, l, dtype, **kwargs)


# --------------------------------------------------------------------------- transformers models
def _family(model_type: str | None):
    from seif.converters.transformers import FAMILIES
    return FAMILIES.get(model_type) if model_type else None


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    for candidate in (name, name[len("model."):] if name.startswith("model.") else None):
        if candidate is None:
            continue
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def find_moe_block(model: nn.Module, l: int, model_type: str | None = None,
                   source_prefix: str | None = None) -> tuple[str, nn.Module]:
    """(qualified name, module) of decoder layer `l`'s MoE block in a transformers model.

    The converter's family table says where the block's tensors live on disk (`block`, e.g.
    Mixtral's `model.layers.{l}.block_sparse_moe`); in memory transformers 5.x may name it
    differently (Mixtral: `mlp`), so a module path field of the family is used when the table
    has one, then the disk path, then the child of the decoder layer that holds `experts`.
    """
    model_type = model_type or getattr(getattr(model, "config", None), "model_type", None)
    family = _family(model_type)
    paths: list[str] = []
    config = getattr(model, "config", None)
    if family is not None and getattr(family, "stacks", ()):
        # One of several MoE stacks (Qwen3-Omni-MoE): its table entry, `l` in its numbering.
        from seif.converters.transformers import stack_layer
        family, l = stack_layer(family, l, source_prefix=source_prefix,
                                config=None if source_prefix else config)
    if family is not None:
        for attr in ("module", "module_path", "block_module"):
            paths.append(_block_path(getattr(family, attr, None), config, l))
    paths.append(source_prefix)
    if family is not None:
        paths.append(_block_path(family.block, config, l))
    paths = list(dict.fromkeys(p for p in paths if p))
    if not paths:
        raise ConversionError(f"family {model_type!r} is not in the transformers converter's "
                              "table and the layer names no source prefix; cannot locate its "
                              "MoE block")
    for path in paths:
        block = _submodule(model, path)
        if block is not None and _looks_like_moe(block):
            return path, block
    parent_path = paths[-1].rsplit(".", 1)[0]
    parent = _submodule(model, parent_path)
    if parent is not None:
        found = [(f"{parent_path}.{n}", m) for n, m in parent.named_children()
                 if _looks_like_moe(m)]
        if len(found) == 1:
            return found[0]
    raise ConversionError(f"cannot find the MoE block of layer {l} in this {model_type} model "
                          f"(looked at {', '.join(paths)} and the children of {parent_path})")


def shared_outside_block(family, l: int, block_name: str) -> str | None:
    """The module path of layer `l`'s shared experts when the family keeps them outside the MoE
    block (the converter table's `shared_prefix`, e.g. GraniteMoeShared's
    `model.layers.{l}.shared_mlp`), else None."""
    prefix = getattr(family, "shared_prefix", None) if family is not None else None
    if not isinstance(prefix, str):
        return None
    path = prefix.format(l=l)
    return None if path.startswith(block_name + ".") else path


def _block_path(value, config, l: int) -> str | None:
    """A family table path: a template with {l}, or a function (config, l) -> path."""
    if isinstance(value, str):
        return value.format(l=l)
    if callable(value) and config is not None:
        try:
            out = value(config, l)
        except Exception:
            return None
        return out if isinstance(out, str) else None
    return None


def _looks_like_moe(module: nn.Module) -> bool:
    """A SparseMoE, a block holding `experts`, or one holding its experts stacked in
    `input_linear` / `output_linear` beside a `router` (JetMoE's mlp, which has no `experts`)."""
    return isinstance(module, SparseMoE) or hasattr(module, "experts") or all(
        hasattr(module, a) for a in ("router", "input_linear", "output_linear"))


def _returns_tuple(block: nn.Module, hidden: int) -> bool:
    """Whether the block returns (hidden_states, router_output) (gpt-oss, Llama 4) rather than
    a tensor (most families); found by calling it once on two zero tokens."""
    if isinstance(block, SparseMoE):
        return block.return_router_logits
    try:
        p = next(block.parameters())
        with torch.no_grad():
            out = block(torch.zeros(1, 2, hidden, dtype=p.dtype, device=p.device))
    except Exception:
        return False
    return isinstance(out, tuple)


def replace_moe_blocks(model: nn.Module, seif_path: str | os.PathLike, *,
                       layers: Iterable[int] | None = None, dtype=None,
                       **kwargs) -> list[str]:
    """Swap the MoE blocks of a transformers model for `SparseMoE` modules built from the SEIF
    checkpoint at `seif_path` (in place); returns the qualified names replaced.

    Blocks are found through the transformers converter's family table for
    `model.config.model_type`. Each new module follows the replaced block's return convention
    (a tensor, or `(tensor, router_logits)`) and takes the dtype and device of its parameters
    unless `dtype` is given. `layers` limits the swap to these decoder-layer indices.
    """
    import seif

    wanted = None if layers is None else set(layers)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    replaced = []
    with seif.open(seif_path) as ckpt:
        stored = ckpt.manifest.model.model_type
        if stored and model_type and stored != model_type:
            raise ConversionError(f"the checkpoint is a {stored} model, the model a {model_type}",
                                  path=str(seif_path))
        specs = [s for s in ckpt.layers if wanted is None or s.index in wanted]
    family = _family(model_type)
    for spec in specs:
        name, block = find_moe_block(model, spec.index, model_type, spec.source_prefix)
        p = next(block.parameters(), None)
        target = _torch_dtype(dtype) or (p.dtype if p is not None else torch.float32)
        device = p.device if p is not None else torch.device("cpu")
        layer, params = _read_layer(seif_path, spec.index)
        if shared_outside_block(family, spec.index, name) is not None:
            # The decoder layer adds this family's shared MLP itself (GraniteMoeShared): the
            # swapped block must not add it a second time.
            layer = dataclasses.replace(layer, shared_experts=None)
            params.shared, params.shared_gate = [], None
        new = SparseMoE.from_params(
            layer, params, target,
            return_router_logits=_returns_tuple(block, spec.hidden_size), **kwargs).to(device)
        parent_name, _, attr = name.rpartition(".")
        parent = _submodule(model, parent_name) if parent_name else model
        setattr(parent, attr, new)
        replaced.append(name)
    return replaced
