"""`seif verify SRC DST` and `seif.verify.verify`: passes on faithful conversions, flags the
layer of a deliberately altered checkpoint, JSON output, tie-aware routing agreement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_tiny_hf

import seif
from seif.manifest import FFNSpec, LayerSpec, RoutingSpec
from seif.moe import random_layer_params
from seif.verify import VerifyError, _agreement, verify, verify_command

COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
CONFIGS = {
    "mixtral": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                        num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                        first_k_dense_replace=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                        num_key_value_heads=4),
}


def build_hf(model_type: str, path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    build_tiny_hf(model_type, path, {**COMMON, **CONFIGS[model_type]})


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    import seif.convert

    root = tmp_path_factory.mktemp(request.param)
    build_hf(request.param, root / "hf")
    out = seif.convert.convert(root / "hf", root / "model.seif")
    return request.param, root, root / "hf", out


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of the SEIF checkpoint `src` written with seif.save after `change(tensors)`."""
    ckpt = seif.open(src)
    m = ckpt.manifest
    tensors = {name: np.array(ckpt.tensor(name)) for name in m.tensors}
    change(tensors)
    return seif.save(dst, tensors, m.layers, model=m.model,
                     source_names={n: t.source_name for n, t in m.tensors.items()
                                   if t.source_name})


def test_faithful_conversion_passes(pair):
    model_type, root, hf, out = pair
    report = verify(hf, out)
    assert report.ok, report.to_dict()
    assert report.src_format == "transformers" and report.dst_format == "seif"
    assert report.oracle == "transformers"
    assert [r.layer for r in report.layers] == [layer.index for layer in seif.open(out).layers]
    for r in report.layers:
        assert r.max_error == 0.0
        assert r.routing_agreement == 1.0
        assert r.oracle_error is not None and r.oracle_error <= 1e-5
        assert r.oracle_agreement == 1.0


def test_cli_passes_and_prints_table(pair):
    _, root, hf, out = pair
    result = CliRunner().invoke(verify_command, [str(out), str(hf)])
    assert result.exit_code == 0, result.output
    assert "routing agreement" in result.output and "100.0%" in result.output
    assert "ok:" in result.output


def test_altered_expert_is_flagged(pair):
    model_type, root, hf, out = pair
    layers = seif.open(out).layers
    target = layers[-1]

    def change(tensors):
        for e in range(target.num_experts):
            tensors[target.expert_name(e, "down")] += np.float32(0.05)

    altered = rewrite(out, root / "altered.seif", change)
    report = verify(hf, altered, oracle=False)
    assert not report.ok
    assert report.failed == [target.index]
    bad = report.layers[-1]
    assert bad.status == "FAIL" and bad.max_error > 1e-3
    assert bad.routing_agreement == 1.0           # same router: only the outputs differ
    assert all(r.status == "ok" for r in report.layers[:-1])

    result = CliRunner().invoke(verify_command, [str(hf), str(altered)])
    assert result.exit_code == 1
    assert "FAIL" in result.output and f"layer(s) {target.index} differ" in result.output
    result = CliRunner().invoke(verify_command, [str(hf), str(altered), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["failed_layers"] == [target.index]
    row = data["layers"][-1]
    assert row["status"] == "FAIL" and row["oracle_error"] > 1e-3


def test_flipped_normalize_is_flagged(pair, tmp_path):
    model_type, root, hf, out = pair
    flipped = tmp_path / "flipped.seif"
    shutil.copytree(out, flipped)
    manifest = json.loads((flipped / "seif.json").read_text())
    layer = manifest["layers"][0]
    assert layer["routing"]["normalize"] == "sum"
    layer["routing"]["normalize"] = "none"
    (flipped / "seif.json").write_text(json.dumps(manifest))
    report = verify(out, flipped)
    assert report.oracle == "none"
    assert report.failed == [layer["index"]]
    assert "routing descriptors differ" in report.layers[0].notes
    # ...and the real oracle catches it against the transformers directory too
    report = verify(hf, flipped)
    assert report.layers[0].oracle_error > 1e-3 and report.failed == [layer["index"]]


def test_json_output_parses(pair):
    _, root, hf, out = pair
    result = CliRunner().invoke(verify_command, [str(hf), str(out), "--json", "--tokens", "16",
                                                 "--seed", "3", "--no-oracle"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["failed_layers"] == [] and data["tokens"] == 16
    assert data["oracle"] == "none"
    assert {"layer", "experts", "max_error", "routing_agreement", "status"} <= set(
        data["layers"][0])


# --------------------------------------------------------------------------- without torch
def small(tmp_path: Path, name: str, seed: int = 0, layers=(0, 2)) -> Path:
    specs = [LayerSpec(i, 6, 16, RoutingSpec("topk", 2, "softmax", normalize="sum"),
                       FFNSpec(8, "swiglu")) for i in layers]
    tensors = {}
    for spec in specs:
        tensors.update(random_layer_params(spec, np.random.default_rng(seed))
                       .to_tensors(spec))
    return seif.save(tmp_path / name, tensors, specs)


def test_seif_pair(tmp_path):
    a, b = small(tmp_path, "a.seif"), small(tmp_path, "b.seif")
    report = verify(a, b)
    assert report.ok and report.oracle == "none" and len(report.layers) == 2
    c = small(tmp_path, "c.seif", seed=1)
    report = verify(a, c)
    assert report.failed == [0, 2]
    assert all(r.routing_agreement < 1.0 for r in report.layers)


def test_layer_missing_on_one_side_fails(tmp_path):
    a, b = small(tmp_path, "a.seif"), small(tmp_path, "b.seif", layers=(0,))
    report = verify(a, b)
    assert report.failed == [2] and report.layers[1].status == "missing"
    with pytest.raises(VerifyError, match="no MoE layer in common"):
        verify(a, small(tmp_path, "d.seif", layers=(5,)))


def test_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(verify_command, [str(tmp_path / "nope"), str(tmp_path)])
    assert result.exit_code != 0
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1


def test_routing_agreement_is_tie_aware():
    from seif.routing import topk_lowest_index

    def side(choice, idx=None):
        choice = np.asarray(choice, np.float32)
        return ("token", topk_lowest_index(choice, 2) if idx is None else np.asarray(idx),
                choice)

    # token 0: experts 1 and 2 tie at the k-th (2nd) place; token 1: no tie
    a = side([[0.9, 0.5, 0.5, 0.1], [0.9, 0.6, 0.5, 0.1]])
    assert a[1].tolist() == [[0, 1], [0, 1]]
    # the other side resolved the tie the other way: agrees
    assert _agreement(a, side(a[2], [[0, 2], [0, 1]]), 0.0) == 1.0
    # the other side really ranks expert 2 above 1 for token 1: disagrees there
    b = side([[0.9, 0.5, 0.5, 0.1], [0.9, 0.5, 0.6, 0.1]])
    assert _agreement(a, b, 0.0) == 0.5
    # a near-tie counts as a tie only within the tie tolerance
    c = side([[0.9, 0.5, 0.5, 0.1], [0.9, 0.6, 0.6000001, 0.1]])
    assert _agreement(a, c, 0.0) == 0.5
    assert _agreement(a, c, 1e-3) == 1.0
    # the sure set must be selected whatever the ties
    assert _agreement(a, side([[0.5, 0.9, 0.9, 0.1], a[2][1]]), 0.0) == 0.5


def test_import_needs_no_torch():
    import subprocess
    import sys
    code = ("import sys, seif.verify; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_relative_tolerance(tmp_path):
    """The allowance is tolerance + rtol * max|reference output|: an error that is tiny
    relative to large outputs (expert down weights x (1 + 2e-6), outputs ~1e3) fails an
    absolute-only check (--rtol 0) and passes the default; a real relative change (x (1 +
    1e-4)) fails either way."""
    a = small(tmp_path, "a0.seif")
    specs = seif.open(a).layers

    def scaled(name: str, factor: float) -> Path:
        def change(tensors):
            for spec in specs:
                for e in range(spec.num_experts):
                    down = spec.expert_name(e, "down")
                    tensors[down] = (tensors[down] * np.float32(1000.0 * factor)) \
                        .astype(np.float32)
        return rewrite(a, tmp_path / name, change)

    big, near, off = scaled("big.seif", 1.0), scaled("near.seif", 1 + 2e-6), \
        scaled("off.seif", 1 + 1e-4)
    strict = verify(big, near, rtol=0.0)
    assert strict.failed == [0, 2]
    assert all(r.max_error > 1e-5 and r.allowed == 1e-5 for r in strict.layers)
    report = verify(big, near)
    assert report.ok and report.rtol == 1e-5
    for r in report.layers:
        assert r.scale > 100 and r.allowed == pytest.approx(1e-5 + 1e-5 * r.scale)
        assert 1e-5 < r.max_error <= r.allowed
        assert r.routing_agreement == 1.0
    assert verify(big, off).failed == [0, 2]
    assert CliRunner().invoke(verify_command, [str(big), str(near)]).exit_code == 0
    assert CliRunner().invoke(verify_command, [str(big), str(near), "--rtol", "0"]).exit_code == 1
    assert "rtol" in CliRunner().invoke(verify_command, ["--help"]).output
    with pytest.raises(VerifyError, match="rtol must be >= 0"):
        verify(big, near, rtol=-1.0)
