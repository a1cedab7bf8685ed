"""The typed model of ``seif.json``: parse, validate, serialize.

The manifest is the single source of truth for what a checkpoint holds. Parsing is strict about
types and closed vocabularies (an unknown routing kind must be refused, not guessed), and lenient
about unknown *optional* keys, so a reader of v1.0 can load a v1.3 checkpoint (spec §7).
Field names here are the JSON field names; `tests/test_schema.py` checks they agree with
`spec/seif-v1.schema.json`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from . import dtypes
from .errors import FeatureError, FormatError, VersionError

# The version written for a checkpoint that uses only SEIF 1.0 rules (the reference writer keeps
# writing it, so such checkpoints are byte-identical to what 1.0 writers produced), and the
# newest MINOR this reader implements. A checkpoint using a feature of a later MINOR says so
# (spec §7.1, §7.4): the version written is the lowest one whose rules the checkpoint follows.
SEIF_VERSION = "1.0"
SPEC_VERSION = "1.1"
SUPPORTED_MAJOR = 1
MANIFEST_NAME = "seif.json"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_JSON_DEPTH = 64
# Bounds on descriptor integers (spec §9.1): far above any real model, low enough that work
# proportional to them (e.g. listing a layer's expected tensors) stays bounded.
MAX_COUNT = 2**40
MAX_EXPERTS = 2**20

# Features this reader implements. A checkpoint whose `required_features` names anything else
# is refused (spec §7.2), like ext4's incompat flags.
KNOWN_FEATURES = frozenset({
    "alias",
    "quant.fp8-block",
    "quant.mxfp4",
    "quant.int-group",
    "routing.group_topk",
    "routing.expert_choice",
    "routing.sparse_mixer",
    "routing.soft_moe",
    "routing.capacity",
    "routing.weight_on_input",
    "expert_subset",
    "layer.output_bias",
})
# Features added after 1.0, with the MINOR that added them. A manifest naming one must state
# that version or a later one (spec §7.2).
FEATURE_SINCE = {"layer.output_bias": "1.1"}

ROUTING_KINDS = ("topk", "group_topk", "expert_choice", "sparse_mixer", "soft_moe")
SCORINGS = ("softmax", "sigmoid", "softmax_topk", "sigmoid_topk")
NORMALIZATIONS = ("none", "sum", "lp")
EPSILON_RULES = ("add", "clamp")
GROUP_SCORES = ("max", "top2_sum")
GROUP_MASKS = ("neg_inf", "zero")
WEIGHT_ON = ("output", "input")
DROP_POLICIES = ("zero", "passthrough_scaled")
ACTIVATIONS = (
    "swiglu", "geglu", "geglu_tanh", "swiglu_oai",  # gated: gate, up, down
    "relu", "gelu", "gelu_tanh", "silu", "relu2",   # ungated: up, down
)
GATED_ACTIVATIONS = frozenset({"swiglu", "geglu", "geglu_tanh", "swiglu_oai"})
QUANT_SCHEMES = ("fp8-block", "mxfp4", "int-group")
SHARD_ROLES = ("dense", "router", "experts", "mixed")
CHECKSUM_ALGORITHMS = ("sha256",)

_CHECKSUM_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_SHARD_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,200}$")
_TENSOR_NAME_RE = re.compile(r"^[\x21-\x7e]{1,1024}$")  # printable ASCII, no spaces


# --------------------------------------------------------------------------- field helpers
def _req(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise FormatError(f"missing required field {key!r}", field=f"{where}.{key}".lstrip("."))
    return d[key]


def _typed(value: Any, types: type | tuple, where: str, what: str) -> Any:
    # bool is an int subclass in Python; a JSON `true` is never a valid count.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise FormatError(f"expected {what}, got boolean", field=where)
    if not isinstance(value, types):
        raise FormatError(f"expected {what}, got {type(value).__name__}", field=where)
    return value


def _int(d: dict, key: str, where: str, *, default: Any = ..., minimum: int = 0,
         maximum: int = MAX_COUNT) -> int:
    value = _req(d, key, where) if default is ... else d.get(key, default)
    if value is None and default is None:
        return None  # type: ignore[return-value]
    value = _typed(value, int, f"{where}.{key}", "an integer")
    if value < minimum:
        raise FormatError(f"must be >= {minimum}, got {value}", field=f"{where}.{key}")
    if value > maximum:
        raise FormatError(f"must be <= {maximum}, got {value}", field=f"{where}.{key}")
    return value


def _float(d: dict, key: str, where: str, default: float, minimum: float | None = None,
           positive: bool = False) -> float:
    value = d.get(key, default)
    value = _typed(value, (int, float), f"{where}.{key}", "a number")
    if not math.isfinite(value):
        raise FormatError("must be finite", field=f"{where}.{key}")
    if minimum is not None and value < minimum:
        raise FormatError(f"must be >= {minimum}", field=f"{where}.{key}")
    if positive and value <= 0:
        raise FormatError("must be > 0", field=f"{where}.{key}")
    return float(value)


def _bool(d: dict, key: str, where: str, default: bool) -> bool:
    return _typed(d.get(key, default), bool, f"{where}.{key}", "a boolean")


def _choice(d: dict, key: str, where: str, choices: tuple, default: Any = ...,
            error: type = FormatError) -> str:
    value = _req(d, key, where) if default is ... else d.get(key, default)
    _typed(value, str, f"{where}.{key}", "a string")
    if value not in choices:
        raise error(f"unknown value {value!r}; this reader knows {', '.join(choices)}",
                    field=f"{where}.{key}")
    return value


def _obj(value: Any, where: str) -> dict:
    return _typed(value, dict, where, "an object")


# --------------------------------------------------------------------------- routing
@dataclass
class Capacity:
    """Token-dropping capacity (Switch, GShard). Exactly one of `tokens` / `factor` is set.

    Per-expert capacity C is `tokens`, or `ceil(factor * T * top_k / E)` for token choice and
    `ceil(factor * T / E)` for expert choice, T being the tokens of one sequence (spec §5.6).
    """

    tokens: int | None = None
    factor: float | None = None
    drop_policy: str = "zero"

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Capacity:
        d = _obj(d, where)
        tokens = _int(d, "tokens", where, default=None, minimum=1)
        factor = d.get("factor")
        if factor is not None:
            factor = _float(d, "factor", where, 0.0)
            if factor <= 0:
                raise FormatError("must be > 0", field=f"{where}.factor")
        if (tokens is None) == (factor is None):
            raise FormatError("set exactly one of 'tokens' and 'factor'", field=where)
        return cls(tokens, factor, _choice(d, "drop_policy", where, DROP_POLICIES, "zero",
                                           error=FeatureError))

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"drop_policy": self.drop_policy}
        if self.tokens is not None:
            out["tokens"] = self.tokens
        if self.factor is not None:
            out["factor"] = self.factor
        return out

    def per_expert(self, num_tokens: int, num_experts: int, top_k: int = 1,
                   clip: bool = False) -> int:
        """C for T = `num_tokens`; `clip` caps it at T (expert choice: an expert cannot pick a
        token twice)."""
        if self.tokens is not None:
            c = self.tokens
        else:
            c = int(math.ceil(self.factor * num_tokens * top_k / num_experts))
        return min(c, num_tokens) if clip else c


@dataclass
class Training:
    """Training-time router behaviour, recorded so nothing is lost, never executed (spec §5.9)."""

    noise: str = "none"  # none | gaussian | jitter
    noise_std: float = 0.0
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Training:
        d = _obj(d, where)
        return cls(
            _choice(d, "noise", where, ("none", "gaussian", "jitter"), "none"),
            _float(d, "noise_std", where, 0.0, minimum=0.0),
            _float(d, "aux_loss_coef", where, 0.0, minimum=0.0),
            _float(d, "z_loss_coef", where, 0.0, minimum=0.0),
        )

    def to_dict(self) -> dict:
        return {"noise": self.noise, "noise_std": self.noise_std,
                "aux_loss_coef": self.aux_loss_coef, "z_loss_coef": self.z_loss_coef}


@dataclass
class RoutingSpec:
    """Everything a runtime needs to route exactly like the source model (spec §5).

    The pipeline, in order: logits (fp32, + router bias) -> `scoring` -> + selection bias
    (choice only) -> group masking -> top-k (lower index wins ties) -> weights taken from the
    unbiased scores -> `normalize` -> `scale` -> capacity.
    """

    kind: str = "topk"
    top_k: int = 1
    scoring: str = "softmax"
    router_bias: bool = False
    selection_bias: bool = False
    normalize: str = "none"
    norm_p: float = 1.0
    epsilon: float = 0.0
    epsilon_rule: str = "add"
    scale: float = 1.0
    weight_on: str = "output"
    n_group: int | None = None
    topk_group: int | None = None
    group_score: str = "max"
    group_mask: str = "neg_inf"
    capacity: Capacity | None = None
    jitter_eps: float = 0.0
    slots_per_expert: int | None = None
    training: Training = field(default_factory=Training)

    @classmethod
    def from_dict(cls, d: Any, where: str = "routing") -> RoutingSpec:
        d = _obj(d, where)
        kind = _choice(d, "kind", where, ROUTING_KINDS, error=FeatureError)
        spec = cls(
            kind=kind,
            top_k=_int(d, "top_k", where, minimum=1),
            scoring=_choice(d, "scoring", where, SCORINGS, "softmax", error=FeatureError),
            router_bias=_bool(d, "router_bias", where, False),
            selection_bias=_bool(d, "selection_bias", where, False),
            normalize=_choice(d, "normalize", where, NORMALIZATIONS, "none", error=FeatureError),
            norm_p=_float(d, "norm_p", where, 1.0),
            epsilon=_float(d, "epsilon", where, 0.0),
            epsilon_rule=_choice(d, "epsilon_rule", where, EPSILON_RULES, "add",
                                 error=FeatureError),
            scale=_float(d, "scale", where, 1.0),
            weight_on=_choice(d, "weight_on", where, WEIGHT_ON, "output", error=FeatureError),
            n_group=_int(d, "n_group", where, default=None, minimum=1),
            topk_group=_int(d, "topk_group", where, default=None, minimum=1),
            group_score=_choice(d, "group_score", where, GROUP_SCORES, "max", error=FeatureError),
            group_mask=_choice(d, "group_mask", where, GROUP_MASKS, "neg_inf",
                               error=FeatureError),
            capacity=(Capacity.from_dict(d["capacity"], f"{where}.capacity")
                      if d.get("capacity") is not None else None),
            jitter_eps=_float(d, "jitter_eps", where, 0.0, minimum=0.0),
            slots_per_expert=_int(d, "slots_per_expert", where, default=None, minimum=1,
                                  maximum=MAX_EXPERTS),
            training=Training.from_dict(d.get("training", {}), f"{where}.training"),
        )
        spec.check(where)
        return spec

    def check(self, where: str = "routing", num_experts: int | None = None) -> None:
        """Cross-field rules that a JSON Schema cannot express well."""
        if self.kind == "group_topk":
            if self.n_group is None or self.topk_group is None:
                raise FormatError("group_topk needs n_group and topk_group", field=where)
            if self.topk_group > self.n_group:
                raise FormatError("topk_group > n_group", field=f"{where}.topk_group")
            if num_experts is not None and num_experts % self.n_group:
                raise FormatError(f"{num_experts} experts do not split into {self.n_group} groups",
                                  field=f"{where}.n_group")
            if self.group_score == "top2_sum" and num_experts is not None \
                    and num_experts // self.n_group < 2:
                raise FormatError("top2_sum needs at least 2 experts per group",
                                  field=f"{where}.group_score")
            if num_experts is not None and \
                    self.top_k > self.topk_group * (num_experts // self.n_group):
                raise FormatError("top_k exceeds the experts in the kept groups",
                                  field=f"{where}.top_k")
        if self.kind == "expert_choice" and self.capacity is None:
            raise FormatError("expert_choice needs a capacity", field=where)
        if self.kind == "soft_moe" and self.slots_per_expert is None:
            raise FormatError("soft_moe needs slots_per_expert", field=where)
        if self.kind == "sparse_mixer" and self.top_k != 2:
            raise FormatError("sparse_mixer is defined for top_k = 2", field=f"{where}.top_k")
        if self.selection_bias and self.kind in ("sparse_mixer", "expert_choice", "soft_moe"):
            raise FormatError(f"{self.kind} has no selection bias", field=f"{where}.selection_bias")
        if self.kind == "expert_choice" and (self.normalize != "none"
                                             or self.scoring.endswith("_topk")):
            raise FormatError("expert_choice takes softmax|sigmoid scoring and no normalize",
                              field=where)
        if self.epsilon < 0:
            raise FormatError("epsilon must be >= 0", field=f"{where}.epsilon")
        if self.normalize == "lp" and self.norm_p <= 0:
            raise FormatError("norm_p must be > 0", field=f"{where}.norm_p")
        if num_experts is not None and self.kind in ("topk", "group_topk", "sparse_mixer") \
                and self.top_k > num_experts:
            raise FormatError(f"top_k {self.top_k} > {num_experts} experts", field=f"{where}.top_k")

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "kind": self.kind, "top_k": self.top_k, "scoring": self.scoring,
            "router_bias": self.router_bias, "selection_bias": self.selection_bias,
            "normalize": self.normalize, "epsilon": self.epsilon,
            "epsilon_rule": self.epsilon_rule, "scale": self.scale, "weight_on": self.weight_on,
        }
        if self.normalize == "lp":
            out["norm_p"] = self.norm_p
        if self.kind == "group_topk":
            out.update(n_group=self.n_group, topk_group=self.topk_group,
                       group_score=self.group_score, group_mask=self.group_mask)
        if self.capacity is not None:
            out["capacity"] = self.capacity.to_dict()
        if self.kind == "sparse_mixer":
            out["jitter_eps"] = self.jitter_eps
        if self.slots_per_expert is not None:
            out["slots_per_expert"] = self.slots_per_expert
        out["training"] = self.training.to_dict()
        return out

    def features(self) -> set[str]:
        """The `required_features` a checkpoint using this routing must declare."""
        feats = set()
        if self.kind != "topk":
            feats.add(f"routing.{self.kind}")
        if self.capacity is not None:
            feats.add("routing.capacity")
        if self.weight_on == "input":
            feats.add("routing.weight_on_input")
        return feats


# --------------------------------------------------------------------------- experts
@dataclass
class FFNSpec:
    """One expert's feed-forward network: `down(act(gate x, up x))` (spec §4.3)."""

    intermediate_size: int
    activation: str = "swiglu"
    bias: bool = False
    alpha: float = 1.702   # swiglu_oai only
    limit: float = 7.0     # swiglu_oai only

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def projections(self) -> tuple[str, ...]:
        return ("gate", "up", "down") if self.gated else ("up", "down")

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FFNSpec:
        d = _obj(d, where)
        return cls(
            _int(d, "intermediate_size", where, minimum=1),
            _choice(d, "activation", where, ACTIVATIONS, error=FeatureError),
            _bool(d, "bias", where, False),
            _float(d, "alpha", where, 1.702),
            _float(d, "limit", where, 7.0, positive=True),
        )

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"intermediate_size": self.intermediate_size,
                               "activation": self.activation, "bias": self.bias}
        if self.activation == "swiglu_oai":
            out.update(alpha=self.alpha, limit=self.limit)
        return out


@dataclass
class SharedExpertsSpec:
    """Always-on experts added to every token, optionally scaled by sigmoid(gate · x)."""

    count: int
    ffn: FFNSpec
    gate: bool = False

    @classmethod
    def from_dict(cls, d: Any, where: str) -> SharedExpertsSpec:
        d = _obj(d, where)
        return cls(_int(d, "count", where, minimum=1, maximum=MAX_EXPERTS),
                   FFNSpec.from_dict(_req(d, "ffn", where), f"{where}.ffn"),
                   _bool(d, "gate", where, False))

    def to_dict(self) -> dict:
        return {"count": self.count, "ffn": self.ffn.to_dict(), "gate": self.gate}


@dataclass
class LayerSpec:
    """One MoE layer: its routing, its experts, its shared experts (spec §4.2).

    `index` is the source model's decoder-layer index (MoE layers need not start at 0).
    `expert_ids`, when present, maps local expert e to the source model's expert id
    (checkpoints cut to an expert subset).
    """

    index: int
    num_experts: int
    hidden_size: int
    routing: RoutingSpec
    experts: FFNSpec
    shared_experts: SharedExpertsSpec | None = None
    source_prefix: str | None = None
    expert_ids: list[int] | None = None
    # SEIF 1.1: tensor `layers.{l}.output_bias` [H] is added to the layer's output after the
    # routed and shared experts are combined (JetMoE's JetMoeMoE.bias). Old readers would ignore
    # the field and compute a different output, hence the required feature layer.output_bias.
    output_bias: bool = False

    @classmethod
    def from_dict(cls, d: Any, where: str) -> LayerSpec:
        d = _obj(d, where)
        layer = cls(
            index=_int(d, "index", where),
            num_experts=_int(d, "num_experts", where, minimum=1, maximum=MAX_EXPERTS),
            hidden_size=_int(d, "hidden_size", where, minimum=1),
            routing=RoutingSpec.from_dict(_req(d, "routing", where), f"{where}.routing"),
            experts=FFNSpec.from_dict(_req(d, "experts", where), f"{where}.experts"),
            shared_experts=(SharedExpertsSpec.from_dict(d["shared_experts"],
                                                        f"{where}.shared_experts")
                            if d.get("shared_experts") is not None else None),
            source_prefix=d.get("source_prefix"),
            expert_ids=d.get("expert_ids"),
            output_bias=_bool(d, "output_bias", where, False),
        )
        if layer.source_prefix is not None:
            _typed(layer.source_prefix, str, f"{where}.source_prefix", "a string")
        if layer.expert_ids is not None:
            ids = _typed(layer.expert_ids, list, f"{where}.expert_ids", "a list")
            if len(ids) != layer.num_experts or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids) \
                    or len(set(ids)) != len(ids):
                raise FormatError("must list num_experts distinct non-negative ids",
                                  field=f"{where}.expert_ids")
        layer.routing.check(f"{where}.routing", layer.num_experts)
        return layer

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "index": self.index, "num_experts": self.num_experts,
            "hidden_size": self.hidden_size, "routing": self.routing.to_dict(),
            "experts": self.experts.to_dict(),
            "shared_experts": self.shared_experts.to_dict() if self.shared_experts else None,
        }
        if self.source_prefix is not None:
            out["source_prefix"] = self.source_prefix
        if self.expert_ids is not None:
            out["expert_ids"] = list(self.expert_ids)
        if self.output_bias:  # written only when set: 1.0 layers serialize as they always did
            out["output_bias"] = True
        return out

    # Canonical tensor names (spec §4.1) -------------------------------------------------
    def router_name(self, part: str = "weight") -> str:
        return f"layers.{self.index}.router.{part}"

    def expert_name(self, e: int, proj: str, part: str = "weight") -> str:
        return f"layers.{self.index}.experts.{e}.{proj}.{part}"

    def shared_name(self, s: int, proj: str, part: str = "weight") -> str:
        return f"layers.{self.index}.shared_experts.{s}.{proj}.{part}"

    def shared_gate_name(self) -> str:
        return f"layers.{self.index}.shared_experts.gate.weight"

    def output_bias_name(self) -> str:
        return f"layers.{self.index}.output_bias"

    def expected_count(self) -> int:
        """How many tensors `expected_tensors()` lists, computed without listing them."""
        def per_ffn(ffn: FFNSpec) -> int:
            return len(ffn.projections) * (2 if ffn.bias else 1)
        r = self.routing
        count = 1 + r.router_bias + r.selection_bias + self.num_experts * per_ffn(self.experts)
        if self.shared_experts:
            count += self.shared_experts.count * per_ffn(self.shared_experts.ffn)
            count += self.shared_experts.gate
        return count + self.output_bias

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> logical shape of every tensor this layer needs."""
        H, E, r = self.hidden_size, self.num_experts, self.routing
        rows = E * (r.slots_per_expert or 1) if r.kind == "soft_moe" else E
        out: dict[str, tuple[int, ...]] = {self.router_name(): (rows, H)}
        if r.router_bias:
            out[self.router_name("bias")] = (rows,)
        if r.selection_bias:
            out[self.router_name("selection_bias")] = (E,)
        for e in range(E):
            out.update(_ffn_tensors(self.experts, H, lambda p, part, e=e:
                                    self.expert_name(e, p, part)))
        if self.shared_experts:
            for s in range(self.shared_experts.count):
                out.update(_ffn_tensors(self.shared_experts.ffn, H, lambda p, part, s=s:
                                        self.shared_name(s, p, part)))
            if self.shared_experts.gate:
                out[self.shared_gate_name()] = (1, H)
        if self.output_bias:
            out[self.output_bias_name()] = (H,)
        return out

    def features(self) -> set[str]:
        feats = self.routing.features()
        if self.expert_ids is not None:
            feats.add("expert_subset")
        if self.output_bias:
            feats.add("layer.output_bias")
        return feats


def _ffn_tensors(ffn: FFNSpec, hidden: int, name) -> dict[str, tuple[int, ...]]:
    I = ffn.intermediate_size
    shapes = {"gate": (I, hidden), "up": (I, hidden), "down": (hidden, I)}
    out = {}
    for proj in ffn.projections:
        out[name(proj, "weight")] = shapes[proj]
        if ffn.bias:
            out[name(proj, "bias")] = (shapes[proj][0],)
    return out


# --------------------------------------------------------------------------- tensors & shards
@dataclass
class Quantization:
    """How a stored tensor maps to real values (spec §3.3). Companion tensors are named."""

    scheme: str
    logical_shape: list[int]
    scale: str
    block: list[int] | None = None          # fp8-block: [rows, cols]
    group_size: int | None = None           # int-group, mxfp4 (32)
    bits: int | None = None                 # int-group: 4 | 8
    zero_point: str | None = None           # int-group, asymmetric

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Quantization:
        d = _obj(d, where)
        q = cls(
            scheme=_choice(d, "scheme", where, QUANT_SCHEMES, error=FeatureError),
            logical_shape=_shape(_req(d, "logical_shape", where), f"{where}.logical_shape"),
            scale=_typed(_req(d, "scale", where), str, f"{where}.scale", "a tensor name"),
            block=(_shape(d["block"], f"{where}.block") if d.get("block") is not None else None),
            group_size=_int(d, "group_size", where, default=None, minimum=1),
            bits=_int(d, "bits", where, default=None, minimum=1),
            zero_point=d.get("zero_point"),
        )
        if q.zero_point is not None:
            _typed(q.zero_point, str, f"{where}.zero_point", "a tensor name")
        if q.block is not None and (len(q.block) != 2 or min(q.block) < 1):
            raise FormatError("block must be [rows, cols], both >= 1", field=f"{where}.block")
        if q.scheme == "fp8-block" and (q.block is None or len(q.block) != 2):
            raise FormatError("fp8-block needs block [rows, cols]", field=f"{where}.block")
        if q.scheme == "int-group" and (q.bits not in (4, 8) or q.group_size is None):
            raise FormatError("int-group needs bits 4|8 and group_size", field=where)
        if q.scheme == "mxfp4" and q.group_size not in (None, 32):
            raise FormatError("mxfp4 groups are 32 elements", field=f"{where}.group_size")
        return q

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"scheme": self.scheme, "logical_shape": list(self.logical_shape),
                               "scale": self.scale}
        for key in ("block", "group_size", "bits", "zero_point"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _shape(value: Any, where: str) -> list[int]:
    _typed(value, list, where, "a list of integers")
    if len(value) > 8:
        raise FormatError(f"rank {len(value)} > 8 is not allowed", field=where)
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0 or dim >= 2**40:
            raise FormatError(f"bad dimension {dim!r}", field=where)
    return list(value)


def numel(shape: list[int] | tuple[int, ...]) -> int:
    """Element count; dims are < 2**40 and rank <= 8, and Python ints never overflow."""
    return math.prod(shape)


@dataclass
class TensorEntry:
    """One tensor: where its bytes are, what they are, and how to check them."""

    dtype: str
    shape: list[int]
    shard: str | None = None
    data_offsets: list[int] | None = None
    checksum: str | None = None
    source_name: str | None = None
    alias_of: str | None = None
    quantization: Quantization | None = None

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * dtypes.itemsize(self.dtype)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorEntry:
        d = _obj(d, where)
        dtype = _typed(_req(d, "dtype", where), str, f"{where}.dtype", "a dtype name")
        dtypes.to_numpy(dtype)
        t = cls(
            dtype=dtype,
            shape=_shape(_req(d, "shape", where), f"{where}.shape"),
            shard=d.get("shard"),
            data_offsets=d.get("data_offsets"),
            checksum=d.get("checksum"),
            source_name=d.get("source_name"),
            alias_of=d.get("alias_of"),
            quantization=(Quantization.from_dict(d["quantization"], f"{where}.quantization")
                          if d.get("quantization") is not None else None),
        )
        for key in ("shard", "checksum", "source_name", "alias_of"):
            if getattr(t, key) is not None:
                _typed(getattr(t, key), str, f"{where}.{key}", "a string")
        if (t.shard is None) == (t.alias_of is None):
            raise FormatError("a tensor has exactly one of 'shard' and 'alias_of'", field=where)
        if t.shard is not None:
            if not isinstance(t.checksum, str) or not _CHECKSUM_RE.match(t.checksum):
                raise FormatError("a stored tensor needs checksum 'sha256:<64 hex digits>'",
                                  field=f"{where}.checksum")
            offs = t.data_offsets
            if not (isinstance(offs, list) and len(offs) == 2 and all(
                    isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 2**62
                    for o in offs) and offs[0] <= offs[1]):
                raise FormatError("data_offsets must be [begin, end] with begin <= end",
                                  field=f"{where}.data_offsets")
            if offs[1] - offs[0] != t.nbytes:
                raise FormatError(f"data_offsets span {offs[1] - offs[0]} bytes but shape and "
                                  f"dtype need {t.nbytes}", field=f"{where}.data_offsets")
        return t

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.alias_of is not None:
            out["alias_of"] = self.alias_of
        else:
            out.update(shard=self.shard, data_offsets=list(self.data_offsets),
                       checksum=self.checksum)
        if self.source_name is not None:
            out["source_name"] = self.source_name
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_dict()
        return out


@dataclass
class ShardEntry:
    """One safetensors file of the checkpoint and what it holds (the layout is recorded here,
    never inferred from file names)."""

    file: str
    size: int
    checksum: str
    role: str = "mixed"
    layers: list[int] | None = None   # [first, last] source layer indices held, inclusive
    experts: list[int] | None = None  # [first, last] expert indices held, inclusive

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ShardEntry:
        d = _obj(d, where)
        s = cls(
            file=_typed(_req(d, "file", where), str, f"{where}.file", "a file name"),
            size=_int(d, "size", where),
            checksum=_typed(_req(d, "checksum", where), str, f"{where}.checksum", "a string"),
            role=_choice(d, "role", where, SHARD_ROLES, "mixed"),
            layers=d.get("layers"),
            experts=d.get("experts"),
        )
        check_shard_file_name(s.file, f"{where}.file")
        if not _CHECKSUM_RE.match(s.checksum):
            raise FormatError("checksum must be 'sha256:<64 hex digits>'",
                              field=f"{where}.checksum")
        for key in ("layers", "experts"):
            rng = getattr(s, key)
            if rng is not None and not (isinstance(rng, list) and len(rng) == 2 and all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rng)
                    and rng[0] <= rng[1]):
                raise FormatError("must be [first, last] with 0 <= first <= last",
                                  field=f"{where}.{key}")
        return s

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"file": self.file, "size": self.size, "checksum": self.checksum,
                               "role": self.role}
        if self.layers is not None:
            out["layers"] = self.layers
        if self.experts is not None:
            out["experts"] = self.experts
        return out


def check_shard_file_name(name: str, where: str) -> None:
    """Shard files are plain names inside the checkpoint directory (spec §9): no separators,
    no `..`, nothing absolute, no leading dot."""
    from .errors import SecurityError

    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(("/", ".")) \
            or "\x00" in name or re.match(r"^[A-Za-z]:", name):
        raise SecurityError(f"shard path {name!r} leaves the checkpoint directory", field=where)
    if not _SHARD_FILE_RE.match(name):
        raise FormatError(f"shard file name {name!r} is not a plain file name", field=where)


@dataclass
class Layout:
    policy: str = "by-expert"
    max_shard_bytes: int = 4 * 1024**3
    alignment: int = 64

    @classmethod
    def from_dict(cls, d: Any, where: str = "layout") -> Layout:
        d = _obj(d, where)
        layout = cls(_typed(d.get("policy", "by-expert"), str, f"{where}.policy", "a string"),
                     _int(d, "max_shard_bytes", where, default=4 * 1024**3, minimum=1),
                     _int(d, "alignment", where, default=64, minimum=1))
        if layout.alignment & (layout.alignment - 1):
            raise FormatError("alignment must be a power of two", field=f"{where}.alignment")
        return layout

    def to_dict(self) -> dict:
        return {"policy": self.policy, "max_shard_bytes": self.max_shard_bytes,
                "alignment": self.alignment}


@dataclass
class ModelInfo:
    """What the checkpoint came from, kept so the source can be rebuilt exactly."""

    source_framework: str = "seif"
    architecture: str | None = None
    model_type: str | None = None
    source_config: dict | None = None
    name: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "model") -> ModelInfo:
        d = _obj(d, where)
        info = cls(d.get("source_framework", "seif"), d.get("architecture"),
                   d.get("model_type"), d.get("source_config"), d.get("name"))
        for key in ("source_framework", "architecture", "model_type", "name"):
            if getattr(info, key) is not None:
                _typed(getattr(info, key), str, f"{where}.{key}", "a string")
        if info.source_config is not None:
            _obj(info.source_config, f"{where}.source_config")
        return info

    def to_dict(self) -> dict:
        return {"source_framework": self.source_framework, "architecture": self.architecture,
                "model_type": self.model_type, "name": self.name,
                "source_config": self.source_config}


# --------------------------------------------------------------------------- the manifest
@dataclass
class Manifest:
    # None: the lowest version whose rules the content follows (`version()`); a parsed manifest
    # keeps the version it states.
    seif_version: str | None = None
    required_features: list[str] = field(default_factory=list)
    optional_features: list[str] = field(default_factory=list)
    model: ModelInfo = field(default_factory=ModelInfo)
    layers: list[LayerSpec] = field(default_factory=list)
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    shards: list[ShardEntry] = field(default_factory=list)
    layout: Layout = field(default_factory=Layout)
    checksum_algorithm: str = "sha256"
    generator: str = "seif"
    metadata: dict[str, str] = field(default_factory=dict)

    # -- parsing
    @classmethod
    def from_json(cls, text: str | bytes, path: str | None = None) -> Manifest:
        if len(text) > MAX_MANIFEST_BYTES:
            from .errors import SecurityError
            raise SecurityError(f"manifest is {len(text)} bytes; the limit is "
                                f"{MAX_MANIFEST_BYTES}", path=path)
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except RecursionError:
            raise FormatError("manifest JSON is nested too deeply", path=path) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"manifest is not valid JSON: {exc}", path=path) from None
        try:
            _check_depth(data)
            return cls.from_dict(data)
        except FormatError as exc:  # attach the file name
            exc.path = exc.path or path
            exc.args = (exc.one_line(),)
            raise

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        d = _obj(d, "")
        version = _typed(_req(d, "seif_version", ""), str, "seif_version", "a string")
        check_version(version)
        required = _str_list(d.get("required_features", []), "required_features")
        unknown = sorted(set(required) - KNOWN_FEATURES)
        if unknown:
            raise FeatureError(f"checkpoint requires features this reader does not implement: "
                               f"{', '.join(unknown)}", field="required_features")
        for feat in required:
            since = FEATURE_SINCE.get(feat)
            if since is not None and _version_key(version) < _version_key(since):
                raise FormatError(f"{feat} is a SEIF {since} feature; the checkpoint says SEIF "
                                  f"{version}", field="seif_version")
        m = cls(
            seif_version=version,
            required_features=required,
            optional_features=_str_list(d.get("optional_features", []), "optional_features"),
            model=ModelInfo.from_dict(d.get("model", {})),
            layers=[LayerSpec.from_dict(x, f"layers[{i}]")
                    for i, x in enumerate(_typed(d.get("layers", []), list, "layers", "a list"))],
            tensors={},
            shards=[ShardEntry.from_dict(x, f"shards[{i}]")
                    for i, x in enumerate(_typed(_req(d, "shards", ""), list, "shards", "a list"))],
            layout=Layout.from_dict(d.get("layout", {})),
            checksum_algorithm=_choice(d, "checksum_algorithm", "", CHECKSUM_ALGORITHMS,
                                       "sha256", error=FeatureError),
            generator=_typed(d.get("generator", "seif"), str, "generator", "a string"),
            metadata=_obj(d.get("metadata", {}), "metadata"),
        )
        if not all(isinstance(v, str) for v in m.metadata.values()):
            raise FormatError("metadata values must be strings", field="metadata")
        for name, entry in _obj(_req(d, "tensors", ""), "tensors").items():
            if not _TENSOR_NAME_RE.match(name):
                raise FormatError(f"tensor name {name[:80]!r} is not printable ASCII",
                                  field="tensors")
            m.tensors[name] = TensorEntry.from_dict(entry, f"tensors.{name}")
        m.check_consistency()
        return m

    def check_consistency(self) -> None:
        """Rules across sections: shards exist, aliases resolve, layers are complete, features
        used are declared."""
        files = [s.file for s in self.shards]
        if len(set(files)) != len(files):
            raise FormatError("a shard file is listed twice", field="shards")
        known_files = set(files)
        for name, t in self.tensors.items():
            if t.shard is not None and t.shard not in known_files:
                raise FormatError(f"tensor is in shard {t.shard!r}, which is not in 'shards'",
                                  field=f"tensors.{name}.shard")
            if t.alias_of is not None:
                target = self.tensors.get(t.alias_of)
                if target is None or target.alias_of is not None:
                    raise FormatError("alias_of must name a stored (non-alias) tensor",
                                      field=f"tensors.{name}.alias_of")
                if target.dtype != t.dtype or target.shape != t.shape:
                    raise FormatError("alias has a different dtype or shape than its target",
                                      field=f"tensors.{name}.alias_of")
                if "alias" not in self.required_features:
                    raise FormatError("aliases are used but 'alias' is not in "
                                      "required_features", field=f"tensors.{name}.alias_of")
            if t.quantization is not None:
                q = t.quantization
                feat = f"quant.{q.scheme}"
                if feat not in self.required_features:
                    raise FormatError(f"{feat} is used but not in required_features",
                                      field=f"tensors.{name}.quantization")
                for companion in (q.scale, q.zero_point):
                    if companion is not None and companion not in self.tensors:
                        raise FormatError(f"companion tensor {companion!r} is missing",
                                          field=f"tensors.{name}.quantization")
        seen_index = set()
        needed = sum(layer.expected_count() for layer in self.layers)
        if needed > len(self.tensors):  # refuse before listing names: keeps work bounded
            raise FormatError(f"the layer descriptors need {needed} tensors; the manifest lists "
                              f"{len(self.tensors)}", field="layers")
        for i, layer in enumerate(self.layers):
            if layer.index in seen_index:
                raise FormatError(f"layer index {layer.index} appears twice", field=f"layers[{i}]")
            seen_index.add(layer.index)
            missing_feats = layer.features() - set(self.required_features)
            if missing_feats:
                raise FormatError(f"layer uses {', '.join(sorted(missing_feats))} but does not "
                                  f"declare it in required_features", field=f"layers[{i}]")
            for name, shape in layer.expected_tensors().items():
                t = self.tensors.get(name)
                if t is None:
                    raise FormatError("tensor is missing", field=f"tensors.{name}")
                logical = t.quantization.logical_shape if t.quantization else t.shape
                if tuple(logical) != shape:
                    raise FormatError(f"shape {list(logical)} but the layer descriptor needs "
                                      f"{list(shape)}", field=f"tensors.{name}.shape")

    # -- serialization
    def version(self) -> str:
        """`seif_version` as written: the stated one, or the lowest version whose rules this
        manifest follows ("1.0" unless it uses a feature a later MINOR added)."""
        if self.seif_version is not None:
            return self.seif_version
        feats = set(self.required_features)
        for layer in self.layers:
            feats |= layer.features()
        return max((FEATURE_SINCE.get(f, SEIF_VERSION) for f in feats), key=_version_key,
                   default=SEIF_VERSION)

    def to_dict(self) -> dict:
        return {
            "seif_version": self.version(),
            "required_features": sorted(self.required_features),
            "optional_features": sorted(self.optional_features),
            "generator": self.generator,
            "model": self.model.to_dict(),
            "layout": self.layout.to_dict(),
            "checksum_algorithm": self.checksum_algorithm,
            "layers": [layer.to_dict() for layer in self.layers],
            "shards": [s.to_dict() for s in self.shards],
            "tensors": {name: t.to_dict() for name, t in self.tensors.items()},
            "metadata": dict(self.metadata),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    # -- lookups
    def layer(self, index: int) -> LayerSpec:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise KeyError(f"no MoE layer with index {index}; layers: "
                       f"{[x.index for x in self.layers]}")

    def resolve(self, name: str) -> TensorEntry:
        """The stored entry behind `name`, following one alias hop."""
        entry = self.tensors[name]
        return self.tensors[entry.alias_of] if entry.alias_of is not None else entry


def check_version(version: str) -> None:
    m = re.fullmatch(r"(\d{1,4})\.(\d{1,4})", version)
    if not m:
        raise FormatError(f"seif_version {version!r} is not MAJOR.MINOR", field="seif_version")
    if int(m.group(1)) != SUPPORTED_MAJOR:
        raise VersionError(f"checkpoint is SEIF {version}; this reader implements SEIF "
                           f"{SPEC_VERSION} (major {SUPPORTED_MAJOR} only)", field="seif_version")


def _version_key(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


def _str_list(value: Any, where: str) -> list[str]:
    _typed(value, list, where, "a list of strings")
    for v in value:
        _typed(v, str, where, "a list of strings")
    if len(set(value)) != len(value):
        raise FormatError("lists a feature twice", field=where)
    return list(value)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate JSON key {key[:80]!r}")
        out[key] = value
    return out


def _check_depth(data: Any) -> None:
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise FormatError(f"manifest JSON is nested deeper than {MAX_JSON_DEPTH}")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
