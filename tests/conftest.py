"""Shared fixtures: tiny checkpoints built from a seed (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest

import seif
from seif.manifest import FFNSpec, LayerSpec, RoutingSpec, SharedExpertsSpec


def make_layers(num_experts: int = 8, hidden: int = 16, inter: int = 32) -> list[LayerSpec]:
    return [
        LayerSpec(0, num_experts, hidden, RoutingSpec("topk", 2, "softmax", normalize="sum"),
                  FFNSpec(inter, "swiglu")),
        LayerSpec(3, num_experts, hidden,
                  RoutingSpec("group_topk", 2, "sigmoid", selection_bias=True, normalize="sum",
                              epsilon=1e-20, scale=2.0, n_group=2, topk_group=1,
                              group_score="top2_sum"),
                  FFNSpec(inter, "swiglu"), SharedExpertsSpec(1, FFNSpec(inter, "swiglu"), True)),
    ]


def make_tensors(layers: list[LayerSpec], seed: int = 0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    out = {"model.embed_tokens.weight": rng.standard_normal((10, layers[0].hidden_size))
           .astype(dtype)}
    for layer in layers:
        for name, shape in layer.expected_tensors().items():
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)
    return out


@pytest.fixture
def tiny(tmp_path):
    """(path, layers, tensors) of a small valid two-layer checkpoint with several shards."""
    layers = make_layers()
    tensors = make_tensors(layers)
    path = seif.save(tmp_path / "tiny.seif", tensors, layers, max_shard_bytes=16 * 1024)
    return path, layers, tensors
