"""SEIF -> SEIF conversion: re-layout, dtype cast, expert subsets with consistent routers."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import seif
from seif.convert import convert
from seif.convert_seif import parse_expert_subset
from seif.moe import MoEParams, moe_forward


def test_relayout_is_bitwise(tiny, tmp_path):
    src, _, tensors = tiny
    dst = convert(src, tmp_path / "one.seif", max_shard_bytes=1 << 30)
    ckpt = seif.open(dst)
    assert len(ckpt.manifest.shards) == 2  # dense + one expert shard
    for name, array in tensors.items():
        assert ckpt.tensor(name, verify=True).tobytes() == array.tobytes()


def test_dtype_cast_keeps_routers(tiny, tmp_path):
    src, layers, tensors = tiny
    dst = convert(src, tmp_path / "bf16.seif", dtype="bf16")
    ckpt = seif.open(dst)
    for name, array in tensors.items():
        got = ckpt.tensor(name)
        if ".router." in name:
            assert got.dtype == np.float32 and np.array_equal(got, array)
        else:
            assert got.dtype == ml_dtypes.bfloat16
            assert np.array_equal(got, array.astype(ml_dtypes.bfloat16))
    assert seif.validate(dst, deep=True)


@pytest.mark.parametrize("text,ids", [("0-3", [0, 1, 2, 3]), ("5,1,1-2", [1, 2, 5]),
                                      ("7", [7])])
def test_parse_subset(text, ids):
    assert parse_expert_subset(text) == ids


@pytest.mark.parametrize("text", ["", "a", "3-1", "1,,2"])
def test_parse_subset_rejects(text):
    with pytest.raises(seif.ConversionError):
        parse_expert_subset(text)


def test_expert_subset_routes_like_the_restricted_source(tiny, tmp_path):
    """The subset model's forward equals the source's forward computed with every expert
    outside the subset removed (router rows included) — built here by hand from the source."""
    src, layers, tensors = tiny
    keep = [4, 5, 6, 7]  # layer 3 has 2 groups of 4: a whole group
    dst = convert(src, tmp_path / "sub.seif", experts="4-7")
    ckpt = seif.open(dst)
    x = np.random.default_rng(3).standard_normal((40, 16)).astype(np.float32)
    for layer in layers:
        small = ckpt.layer(layer.index)
        assert small.num_experts == 4 and small.expert_ids == keep
        assert ckpt.tensor(small.router_name()).shape == (4, 16)
        full = MoEParams.from_tensors(layer, tensors.__getitem__)
        restricted = MoEParams(
            router_weight=full.router_weight[keep],
            router_bias=None if full.router_bias is None else full.router_bias[keep],
            selection_bias=None if full.selection_bias is None else full.selection_bias[keep],
            experts=[full.experts[e] for e in keep], shared=full.shared,
            shared_gate=full.shared_gate)
        expected = moe_forward(x, small, restricted)
        got = moe_forward(x, small, ckpt.moe_params(layer.index))
        np.testing.assert_array_equal(got, expected)
    assert ckpt.layer(3).routing.n_group == 1
    assert ckpt.layer(3).routing.topk_group == 1
    assert "expert_subset" in ckpt.manifest.required_features


def test_nested_subsets_compose_expert_ids(tmp_path):
    from conftest import make_layers, make_tensors
    layers = make_layers()[:1]
    src = seif.save(tmp_path / "a.seif", make_tensors(layers), layers)
    first = convert(src, tmp_path / "b.seif", experts="2-7")
    second = seif.open(convert(first, tmp_path / "c.seif", experts="1,3"))
    assert second.layer(0).expert_ids == [3, 5]
    np.testing.assert_array_equal(second.tensor("layers.0.experts.1.up.weight"),
                                  seif.open(src).tensor("layers.0.experts.5.up.weight"))


def test_subset_must_respect_groups_and_top_k(tiny, tmp_path):
    src = tiny[0]
    with pytest.raises(seif.ConversionError, match="whole groups"):
        convert(src, tmp_path / "a.seif", experts="0-2,4")
    with pytest.raises(seif.ConversionError, match="has experts 0..7"):
        convert(src, tmp_path / "b.seif", experts="0-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.seif"]


def test_no_converter_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(seif.ConversionError, match="no converter from seif to made-up"):
        convert(tiny[0], tmp_path / "m.onnx", target_format="made-up")
    with pytest.raises(seif.ConversionError, match="does not exist"):
        convert(tmp_path / "missing", tmp_path / "x.seif")
