"""MoE layer forward on CPU: SEIF's torch module and ORT kernel vs com.microsoft.MoE, transformers'
eager block and the hardware floor, as % of that floor.

`python -m benchmarks.moe_forward [--quick] [--json FILE] [--markdown FILE]`

Two layers, one set of random weights each, shared by every implementation (no implementation
gets a better layout for free beyond what its own API demands):

- deepseek: E=64, k=6, H=2048, I=1408, softmax top-k without renormalisation (DeepSeek-V2-Lite /
  Qwen-MoE style routed experts; no shared experts, which com.microsoft.MoE does not have);
- mixtral: E=8, k=2, H=2048, I=5632, softmax top-k renormalised over the k (Mixtral).

Implementations, each in fp32 and bf16 unless noted:

- SEIF torch: `converters.torch.SparseMoE.from_params` (its own dispatch, chosen per call
  from the rows per expert: the footer gives `last_dispatch` per T);
- SEIF ORT: one `ai.seif.SeifMoE` node run by ONNX Runtime with `libseif_ort.so` registered
  (bf16: a Cast to bf16 in front, back to fp32 after, bf16 weights);
- ORT MoE: `com.microsoft.MoE` (fp32 only on CPU) after a MatMul router, fc1 = gate/up rows
  interleaved (`swiglu_fusion=1`), fc2 = down;
- HF eager: transformers' `Qwen3MoeSparseMoeBlock` (deepseek: softmax top-k, norm_topk_prob=False)
  or `MixtralSparseMoeBlock` (mixtral), `experts_implementation="eager"`, same weights.

The floor: `max(U * bytes_per_expert / BW, 2 * T * k * params_per_expert / peak)`, U = experts the
routing of the benchmark's own input touched (counted, not the U(T) formula), BW = read bandwidth
(torch sum over a 1 GiB array, far beyond the LLC), peak = torch matmul rate of a 4096^2 square in
the benchmark dtype, both measured in this run (best of a few repeats: the floor is the
hardware's best). Router and activation work are not in the floor. "% of floor" = floor / time.

Weights and tokens are rounded to bf16-representable values so that the fp32 and bf16 runs see
the same numbers and the bf16 router (SeifMoE wants one weight dtype) routes like the fp32 one.
Times are medians over repeats after a warm-up; the repeat count shrinks as a call gets slower.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKENS = (1, 4, 16, 64, 256, 1024)
QUICK_TOKENS = (1, 16, 256)
IMPLS = ("SEIF torch", "SEIF ORT", "ORT MoE", "HF eager", "ORT function")
# The portable function body computes every expert densely (a reference, not a fast path):
# it is timed only up to this many tokens, so the full run stays within minutes.
FUNCTION_BODY_MAX_T = 256


@dataclass(frozen=True)
class Shape:
    name: str
    experts: int
    top_k: int
    hidden: int
    inter: int
    normalize: str          # "none" | "sum" (softmax top-k, renormalised or not)
    hf: str                 # "qwen3_moe" | "mixtral": the transformers block with that routing

    @property
    def params_per_expert(self) -> int:
        return 3 * self.hidden * self.inter

    def spec(self):
        from seif.manifest import FFNSpec, LayerSpec, RoutingSpec

        return LayerSpec(index=0, num_experts=self.experts, hidden_size=self.hidden,
                         routing=RoutingSpec(top_k=self.top_k, normalize=self.normalize),
                         experts=FFNSpec(self.inter, "swiglu"))

    def describe(self) -> str:
        return (f"{self.name}: E={self.experts}, k={self.top_k}, H={self.hidden}, "
                f"I={self.inter}")


SHAPES = (Shape("deepseek", 64, 6, 2048, 1408, "none", "qwen3_moe"),
          Shape("mixtral", 8, 2, 2048, 5632, "sum", "mixtral"))


# =========================================================================== the machine
def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    import onnxruntime
    import torch

    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": mem_kb / 2**20,
            "torch_threads": torch.get_num_threads(), "versions": versions}


def load() -> float:
    return os.getloadavg()[0]


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: torch sum over an fp32 array of `nbytes` (best of repeats)."""
    import torch

    a = torch.ones(nbytes // 4, dtype=torch.float32)
    a.sum()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - start)
    return a.numel() * 4 / best


def measure_peak(dtype, n: int = 4096, repeats: int = 3) -> float:
    """Matmul rate in FLOP/s of an n x n square in `dtype` (torch, best of repeats)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# =========================================================================== the weights
def _bf16_exact(t):
    import torch

    return t.to(torch.bfloat16).float()


def make_params(shape: Shape, seed: int = 0):
    """Random MoEParams (fp32 NumPy, bf16-representable): experts N(0, 1/fan_in), router
    uniform in +-sqrt(3/H) (same variance). Per-expert arrays are views of stacked arrays."""
    import torch

    from seif.moe import MoEParams

    gen = torch.Generator().manual_seed(seed)
    E, H, I = shape.experts, shape.hidden, shape.inter

    def normal(*s):
        return _bf16_exact(torch.randn(*s, generator=gen) / math.sqrt(s[-1])).numpy()

    bound = math.sqrt(3.0 / H)
    router = _bf16_exact((torch.rand(E, H, generator=gen) * 2 - 1) * bound).numpy()
    gate, up, down = normal(E, I, H), normal(E, I, H), normal(E, H, I)
    return MoEParams(router_weight=router,
                     experts=[{"gate": gate[e], "up": up[e], "down": down[e]} for e in range(E)])


def params_of(module):
    """MoEParams whose arrays are views of a float32 SparseMoE's tensors (no copies)."""
    from seif.moe import MoEParams

    g, u, d = (getattr(module, f"{p}_proj").detach().numpy() for p in ("gate", "up", "down"))
    return MoEParams(router_weight=module.router_weight.detach().float().numpy(),
                     experts=[{"gate": g[e], "up": u[e], "down": d[e]} for e in range(len(g))])


# =========================================================================== implementations
@dataclass
class Impl:
    name: str
    fn: Callable[[np.ndarray], object]   # x float32 [T, H] (bf16-exact) -> output
    keep: object = None                  # buffers that must outlive the session


def seif_torch(module, dtype) -> Impl:
    import torch

    def fn(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(dtype))

    return Impl("SEIF torch", fn)


def _model(nodes, inits, H: int, domains: dict[str, int]):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "moe", [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT,
                                                     ["T", H])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["T", H])],
        initializer=inits)
    opsets = [helper.make_opsetid("", 21)] + [helper.make_opsetid(d, v)
                                               for d, v in domains.items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _ort_value(t):
    """An OrtValue over a CPU torch tensor's memory (no copy; bf16 through its int16 bits)."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.int16).numpy(),
                                                               TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


def _session(model, library: Path | None, initializers: dict | None = None):
    """An ORT session. `initializers` (name -> torch tensor) are handed over in memory
    (add_external_initializers: no protobuf copy, no 2 GB limit; ORT copies them once)."""
    import onnxruntime as ort
    from onnx import TensorProto

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    if library is not None:
        so.register_custom_ops_library(str(library))
    values = {name: _ort_value(t) for name, t in (initializers or {}).items()}
    for name, value in values.items():
        etype = (TensorProto.BFLOAT16 if value.data_type() == "tensor(bfloat16)"
                 else TensorProto.FLOAT)
        init = TensorProto(name=name, data_type=etype, dims=value.shape(),
                           data_location=TensorProto.EXTERNAL)
        for key, entry in (("location", f"mem_{name}"), ("offset", "0"),
                           ("length", str(value.tensor_size_in_bytes()))):
            item = init.external_data.add()
            item.key, item.value = key, entry
        model.graph.initializer.append(init)
    if values:
        so.add_external_initializers(list(values), list(values.values()))
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def seif_ort(module, shape: Shape, dtype, library: Path | None) -> Impl:
    """One ai.seif.SeifMoE node. The weights are the SparseMoE's own tensors, bound as graph
    inputs (OrtValues over the same memory, no copy; the kernel pre-packs nothing, so it reads
    them exactly as it reads initializers). The router is cast to the expert dtype (the kernel
    wants one weight dtype; its values are bf16-exact, so routing does not change).

    With `library=None` the same node runs as its model-local function body (standard ONNX
    ops, what stock ORT runs without libseif_ort.so): "ORT function"."""
    import torch
    from onnx import TensorProto, helper

    bf16 = dtype == torch.bfloat16
    etype = TensorProto.BFLOAT16 if bf16 else TensorProto.FLOAT
    weights = {"router_weight": module.router_weight.detach().to(dtype),
               "gate_proj": module.gate_proj, "up_proj": module.up_proj,
               "down_proj": module.down_proj}
    src, dst, nodes = "hidden_states", "output", []
    if bf16:
        nodes.append(helper.make_node("Cast", ["hidden_states"], ["x"], to=etype))
        src, dst = "x", "y"
    inputs = [src, "router_weight", "", "", "gate_proj", "up_proj", "down_proj"]
    nodes.append(helper.make_node("SeifMoE", inputs, [dst], domain="ai.seif", kind="topk",
                                  top_k=shape.top_k, scoring="softmax",
                                  normalize=shape.normalize, activation="swiglu"))
    if bf16:
        nodes.append(helper.make_node("Cast", ["y"], ["output"], to=TensorProto.FLOAT))
    model = _model(nodes, [], shape.hidden, {"ai.seif": 1})
    model.graph.input.extend(helper.make_tensor_value_info(n, etype, list(t.shape))
                             for n, t in weights.items())
    if library is None:
        from seif.converters.onnx import _functions
        model.functions.extend(_functions(module.spec))
    sess = _session(model, library)
    feeds = {n: _ort_value(t) for n, t in weights.items()}

    def fn(x):
        import onnxruntime as ort

        feeds["hidden_states"] = ort.OrtValue.ortvalue_from_numpy(x)
        return sess.run_with_ort_values(["output"], feeds)[0].numpy()

    return Impl("SEIF ORT" if library is not None else "ORT function", fn, keep=weights)


def ort_moe(module, shape: Shape) -> Impl:
    """com.microsoft.MoE (fp32): MatMul router -> MoE(swiglu, swiglu_fusion=1). Weights are
    initializers (the kernel may pre-pack them); ORT keeps its own copy."""
    import torch
    from onnx import helper

    E, H, I = shape.experts, shape.hidden, shape.inter
    fc1 = torch.empty(E, 2 * I, H, dtype=torch.float32)
    fc1[:, 0::2] = module.gate_proj.detach().float()      # rows g0, u0, g1, u1, ...
    fc1[:, 1::2] = module.up_proj.detach().float()
    tensors = {"router_t": module.router_weight.detach().float().t().contiguous(),
               "fc1": fc1, "fc2": module.down_proj.detach().float()}
    nodes = [helper.make_node("MatMul", ["hidden_states", "router_t"], ["logits"]),
             helper.make_node("MoE", ["hidden_states", "logits", "fc1", "", "fc2"], ["output"],
                              domain="com.microsoft", k=shape.top_k, activation_type="swiglu",
                              swiglu_fusion=1,
                              normalize_routing_weights=int(shape.normalize == "sum"))]
    sess = _session(_model(nodes, [], H, {"com.microsoft": 1}), None, tensors)
    del fc1, tensors      # ORT copied them at session creation
    return Impl("ORT MoE", lambda x: sess.run(None, {"hidden_states": x})[0])


def hf_eager(module, shape: Shape, dtype) -> Impl:
    """transformers' own MoE block with the same weights (down_proj shares SEIF's tensor)."""
    import torch
    from torch import nn

    if shape.hf == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        config = MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.inter,
                               num_local_experts=shape.experts,
                               num_experts_per_tok=shape.top_k, hidden_act="silu")
        assert shape.normalize == "sum"
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (
            Qwen3MoeSparseMoeBlock as Block,
        )

        config = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.inter,
                                num_experts=shape.experts, num_experts_per_tok=shape.top_k,
                                norm_topk_prob=shape.normalize == "sum", hidden_act="silu")
    config._experts_implementation = "eager"
    with torch.device("meta"):
        block = Block(config)

    def param(t):
        return nn.Parameter(t, requires_grad=False)

    block.gate.weight = param(module.router_weight.detach().to(dtype))
    block.experts.gate_up_proj = param(torch.cat([module.gate_proj.detach(),
                                                  module.up_proj.detach()], dim=1))
    block.experts.down_proj = param(module.down_proj.detach())
    block.eval()

    def fn(x):
        with torch.inference_mode():
            return block(torch.from_numpy(x).to(dtype)[None])[0]

    return Impl("HF eager", fn)


# =========================================================================== timing
class Flush:
    """Evicts the caches between timed calls by reading `nbytes` (>> LLC): otherwise a small
    T, whose few experts fit in the LLC, is timed with its weights cache-hot on every repeat
    (a real model reads other layers' weights in between). 0 = no flushing.

    The read is a single-threaded NumPy sum, not a torch one: torch's OpenMP workers keep
    spinning on the other core for milliseconds after a parallel sum, and the next timed call
    (an ONNX Runtime session with its own thread pool) then ran on one core for part of its
    time (measured, SEIF ORT deepseek fp32 T=1, floor 7.5 ms: 11.9 ms after a torch flush,
    8.1 ms with a 50 ms pause after it, 7.8 ms after this flush; only the kernel's first
    parallel phase was slow)."""

    def __init__(self, nbytes: int):
        self.buf = np.ones(nbytes // 4, dtype=np.float32) if nbytes else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.sum()


def time_call(fn: Callable[[], object], target_s: float, min_reps: int,
              max_reps: int = 30, flush: Callable[[], None] = lambda: None
              ) -> tuple[float, int, float]:
    """(median seconds, repeats, best seconds): one warm-up call, then enough calls to fill
    `target_s` (at least `min_reps`), each after `flush()` (not timed)."""
    flush()
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    reps = max(min_reps, min(max_reps, round(target_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        flush()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), reps, min(times)


def _as_numpy(y) -> np.ndarray:
    import torch

    if isinstance(y, torch.Tensor):
        return y.detach().float().numpy()
    return np.asarray(y, dtype=np.float32)


def _touched(module, x: np.ndarray) -> int:
    import torch

    with torch.inference_mode():
        idx, _, _ = module.route(torch.from_numpy(x))
    return int(torch.unique(idx).numel())


def _tokens(rng: np.random.Generator, T: int, H: int) -> np.ndarray:
    import torch

    return _bf16_exact(torch.from_numpy(rng.standard_normal((T, H), dtype=np.float32))).numpy()


def bench_block(shape: Shape, module, dtype_name: str, tokens: Sequence[int],
                library: Path | None, target_s: float, min_reps: int,
                check_tokens: int, flush: Flush, selected: Sequence[str] = IMPLS) -> dict:
    """Every implementation at every T for one layer and dtype; `module` is the SparseMoE in
    that dtype (its tensors back every other implementation). Per T, the implementations run
    one after another (warm-up, then repeats), so they see the same machine state."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    impls: list[Impl] = [seif_torch(module, dtype)]
    skipped: dict[str, str] = {}
    if library is not None:
        impls.append(seif_ort(module, shape, dtype, library))
    else:
        skipped["SEIF ORT"] = "libseif_ort.so not built"
    if dtype_name == "fp32":
        impls.append(ort_moe(module, shape))
    else:
        skipped["ORT MoE"] = "fp32 only on CPU"
    try:
        impls.append(hf_eager(module, shape, dtype))
    except ImportError as e:
        skipped["HF eager"] = f"transformers missing ({e})"
    if dtype_name == "fp32":
        impls.append(seif_ort(module, shape, dtype, None))
        skipped["ORT function"] = f"timed for T <= {FUNCTION_BODY_MAX_T} only (dense body)"
    else:
        skipped["ORT function"] = "fp32 only here"
    rng = np.random.default_rng(1234)
    block = {"layer": shape.name, "dtype": dtype_name,
             "bytes_per_expert": shape.params_per_expert * dtype.itemsize,
             "flops_per_token": 2 * shape.top_k * shape.params_per_expert,
             "load_before": load(), "skipped": skipped, "rows": []}

    # Agreement with SEIF torch (guards against a mismatched weight layout or routing).
    xc = _tokens(rng, check_tokens, shape.hidden)
    ref = _as_numpy(impls[0].fn(xc))
    block["rel_err"] = {i.name: float(np.linalg.norm(_as_numpy(i.fn(xc)) - ref)
                                      / np.linalg.norm(ref)) for i in impls[1:]}
    for impl in impls:
        if impl.name not in selected:
            skipped[impl.name] = "not selected (--impls)"
    for T in tokens:
        x = _tokens(rng, T, shape.hidden)
        row = {"T": T, "touched": _touched(module, x), "times": {}, "reps": {}, "best": {}}
        for impl in impls:
            if impl.name not in selected:
                continue
            if impl.name == "ORT function" and T > FUNCTION_BODY_MAX_T:
                continue
            seconds, reps, best = time_call(lambda impl=impl, x=x: impl.fn(x), target_s,
                                            min_reps, flush=flush)
            row["times"][impl.name], row["reps"][impl.name] = seconds, reps
            row["best"][impl.name] = best
            if impl.name == "SEIF torch":
                row["dispatch"] = module.last_dispatch
        block["rows"].append(row)
    block["dispatch"] = _dispatch_summary(block["rows"], module.last_dispatch)
    block["load_after"] = load()
    return block


def _dispatch_summary(rows: list[dict], last: str | None) -> str | None:
    """SEIF torch's dispatch per T ("grouped_mm (T=1, 4), per_expert+onednn (T=64)"): the
    module chooses it per call from the rows per expert; one name when every T used it."""
    by: dict[str, list[str]] = {}
    for row in rows:
        if "dispatch" in row:
            by.setdefault(str(row["dispatch"]), []).append(str(row["T"]))
    if len(by) <= 1:
        return next(iter(by), last)
    return ", ".join(f"{name} (T={', '.join(ts)})" for name, ts in by.items())


# =========================================================================== the run
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _hardware(dtypes: Sequence[str], bw_bytes: int, peak_n: int) -> dict:
    import torch

    return {"load": load(), "bandwidth": measure_bandwidth(bw_bytes),
            "peak": {d: measure_peak(getattr(torch, DTYPES[d]), peak_n)
                     for d in dict.fromkeys(("fp32", *dtypes))}}


def run(shapes: Sequence[Shape] = SHAPES, tokens: Sequence[int] = TOKENS,
        dtypes: Sequence[str] = ("fp32", "bf16"), *, target_s: float = 1.0, min_reps: int = 2,
        bw_bytes: int = 1 << 30, peak_n: int = 4096, library: Path | None | str = "auto",
        check_tokens: int = 16, flush_bytes: int = 1 << 30, impls: Sequence[str] = IMPLS,
        progress: Callable[[str], None] | None = None) -> dict:
    """The whole benchmark; returns raw results (times, touched experts, hardware readings).
    Bandwidth and matmul peak are read before every block and at the end; the floor uses the
    best reading of the run (the hardware's best; on a shared machine a single reading can
    land on a busy moment and would make every implementation look closer to the floor)."""
    import torch

    from converters.torch import SparseMoE

    if library == "auto":
        from runtime.library import library_path

        library = library_path()
    say = progress or (lambda s: None)
    started = time.perf_counter()
    flush = Flush(flush_bytes)
    result = {"machine": machine(), "load_start": load(), "blocks": [], "hardware": [],
              "library": str(library) if library else None, "flush_bytes": flush_bytes,
              "shapes": {s.name: s.describe() for s in shapes}}
    for shape in shapes:
        say(f"{shape.describe()}: building weights (load {load():.2f})")
        params = make_params(shape)
        m32 = SparseMoE.from_params(shape.spec(), params, torch.float32)
        del params
        for i, dtype_name in enumerate(dtypes):
            if dtype_name == "fp32":
                module = m32
            else:
                module = SparseMoE.from_params(shape.spec(), params_of(m32), torch.bfloat16)
            if i == len(dtypes) - 1:
                m32 = None              # the last block: keep one copy of the weights only
            result["hardware"].append(_hardware(dtypes, bw_bytes, peak_n))
            say(f"{shape.describe()} {dtype_name} (load {load():.2f})")
            result["blocks"].append(bench_block(shape, module, dtype_name, tokens, library,
                                                target_s, min_reps, check_tokens, flush,
                                                impls))
            del module
    result["hardware"].append(_hardware(dtypes, bw_bytes, peak_n))
    result["bandwidth"] = max(h["bandwidth"] for h in result["hardware"])
    result["peak"] = {d: max(h["peak"][d] for h in result["hardware"])
                      for d in dict.fromkeys(("fp32", *dtypes))}
    result["load_end"] = load()
    result["seconds"] = time.perf_counter() - started
    return result


def floor_seconds(result: dict, block: dict, row: dict) -> tuple[float, str]:
    """max(touched bytes / BW, flops / peak) with the run's best BW and peak; which bound.

    peak is the fastest matmul rate measured in any dtype: bf16 weights can be widened in
    registers and multiplied at the fp32 rate (the SEIF ORT kernel does), so torch's own bf16
    matmul rate (about half the fp32 one on CPUs without AMX) would put the bf16 floor too low
    and let implementations score over 100% of a "floor"."""
    mem = row["touched"] * block["bytes_per_expert"] / result["bandwidth"]
    compute = row["T"] * block["flops_per_token"] / max(result["peak"].values())
    return (mem, "memory") if mem >= compute else (compute, "compute")


# =========================================================================== output
COLUMNS = ("T", "U", "floor ms", "bound", *[f"{n} ms" for n in IMPLS],
           *[f"{n} %floor" for n in IMPLS], "ORT MoE / SEIF ORT", "HF eager / SEIF torch")


def table_rows(result: dict, block: dict) -> list[list[str]]:
    out = []
    for row in block["rows"]:
        floor, bound = floor_seconds(result, block, row)
        t = row["times"]

        def ms(n, t=t):
            return "—" if n not in t else f"{t[n] * 1e3:.2f}"

        def pct(n, t=t, floor=floor):
            return "—" if n not in t else f"{100 * floor / t[n]:.0f}%"

        def ratio(a, b, t=t):
            return "—" if a not in t or b not in t else f"{t[a] / t[b]:.2f}x"

        out.append([str(row["T"]), str(row["touched"]), f"{floor * 1e3:.2f}", bound,
                    *[ms(n) for n in IMPLS], *[pct(n) for n in IMPLS],
                    ratio("ORT MoE", "SEIF ORT"), ratio("HF eager", "SEIF torch")])
    return out


def block_title(result: dict, block: dict) -> str:
    return (f"{result['shapes'][block['layer']]}, {block['dtype']} "
            f"(load {block['load_before']:.2f} -> {block['load_after']:.2f})")


def block_footer(block: dict) -> str:
    errs = ", ".join(f"{k} {v:.1e}" for k, v in block["rel_err"].items())
    skipped = "; ".join(f"{k}: {v}" for k, v in block["skipped"].items())
    return (f"SEIF torch dispatch: {block['dispatch']}; relative L2 difference from SEIF "
            f"torch: {errs}" + (f"; not run: {skipped}" if skipped else ""))


def header_lines(result: dict) -> list[str]:
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    hw = result["hardware"]
    bws = " ".join(f"{h['bandwidth'] / 1e9:.1f}" for h in hw)
    peaks = "; ".join(f"{d} " + " ".join(f"{h['peak'][d] / 1e9:.0f}" for h in hw)
                      for d in result["peak"])
    best = ", ".join(f"{d} {p / 1e9:.0f}" for d, p in result["peak"].items())
    return [f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.1f} GiB; "
            f"torch threads {m['torch_threads']}; {versions}",
            f"floor uses read bandwidth {result['bandwidth'] / 1e9:.1f} GB/s and the best "
            f"matmul peak of any dtype ({best} GFLOP/s; best of {len(hw)} readings: BW GB/s "
            f"{bws}; GFLOP/s {peaks})",
            f"load average (1 min): start {result['load_start']:.2f}, end "
            f"{result['load_end']:.2f}; run took {result['seconds']:.0f} s",
            f"times in ms (median; caches flushed by reading "
            f"{result['flush_bytes'] / 2**20:.0f} MiB before every call); "
            "% of floor = floor / time; ratios are time / time"]


@dataclass(frozen=True)
class Report:
    """How one benchmark turns its result into tables (shared by moe_forward and jax_forward)."""

    columns: Sequence[str]
    header: Callable[[dict], list[str]]
    title: Callable[[dict, dict], str]
    rows: Callable[[dict, dict], list[list[str]]]
    footer: Callable[[dict], str]

    def print(self, result: dict) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=240)
        for line in self.header(result):
            console.print(line)
        for block in result["blocks"]:
            table = Table(title=self.title(result, block))
            for col in self.columns:
                table.add_column(col, justify="right")
            for cells in self.rows(result, block):
                table.add_row(*cells)
            console.print(table)
            console.print(self.footer(block))

    def markdown(self, result: dict) -> str:
        lines = [f"- {line}" for line in self.header(result)]
        for block in result["blocks"]:
            lines += ["", f"**{self.title(result, block)}**", "",
                      "| " + " | ".join(self.columns) + " |",
                      "|" + "|".join("---:" for _ in self.columns) + "|"]
            lines += ["| " + " | ".join(cells) + " |" for cells in self.rows(result, block)]
            lines += ["", self.footer(block)]
        return "\n".join(lines) + "\n"


REPORT = Report(COLUMNS, header_lines, block_title, table_rows, block_footer)
print_tables = REPORT.print
markdown = REPORT.markdown


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"T in {QUICK_TOKENS}, fewer repeats")
    parser.add_argument("--layers", nargs="+", choices=[s.name for s in SHAPES])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--tokens", nargs="+", type=int, help=f"default {TOKENS}")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                        help="time only these (SEIF torch is still built: it is the reference "
                             "of the agreement check)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--markdown", type=Path, help="also write Markdown tables here")
    args = parser.parse_args(argv)
    shapes = [s for s in SHAPES if not args.layers or s.name in args.layers]
    kwargs: dict = dict(tokens=QUICK_TOKENS, target_s=0.3) if args.quick else {}
    if args.tokens:
        kwargs["tokens"] = tuple(args.tokens)
    result = run(shapes, dtypes=args.dtypes, impls=args.impls,
                 progress=lambda s: print(s, flush=True), **kwargs)
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(result))


if __name__ == "__main__":
    main()
