"""The JSON-only config path of transformers -> SEIF (converters.hf_config): it must give the
same descriptors as transformers' own AutoConfig, and defer to it whenever config.json leaves
a field to the config class (absent or null)."""

from __future__ import annotations

import json

import pytest
from seif.converters.hf_config import OPTIONAL_FIELDS, NeedsFullConfig, RawConfig, with_config

# built as in test_transformers; qwen3_omni_moe: two MoE stacks under nested configs;
# qwen4_exp, mistral_large4: sub_config wrappers; mistral4: n_group / topk_group read as saved.
# (nemotron_h is not here: its saved moe_latent_size is null, so the light path defers to
# AutoConfig by design.)
CASES = ("mixtral", "qwen2_moe", "deepseek_v3", "qwen3_omni_moe", "qwen4_exp", "mistral4",
         "mistral_large4")


def test_raw_config_never_guesses():
    cfg = RawConfig({"a": 1, "b": None, "text_config": {"c": 2},
                     "quantization_config": {"quant_method": "fp8"}})
    assert cfg.a == 1 and cfg.text_config.c == 2
    assert cfg.quantization_config == {"quant_method": "fp8"}
    for probe in (lambda: cfg.b, lambda: cfg.missing, lambda: getattr(cfg, "missing", 7),
                  lambda: hasattr(cfg, "missing"), lambda: cfg.text_config.missing):
        with pytest.raises(NeedsFullConfig):
            probe()
    assert getattr(cfg, "router_jitter_noise", 0.5) == 0.5     # an optional field: absent


def _config_classes():
    import transformers
    from seif.converters.transformers import FAMILIES, _stacks, _sub_config

    out = {}
    for model_type, family in FAMILIES.items():
        try:
            cfg = transformers.AutoConfig.for_model(model_type)
        except (ValueError, KeyError):
            continue
        for stack in _stacks(family):       # each MoE stack's own config
            out[stack.model_type] = _sub_config(cfg, stack.sub_config)
    return out


def test_optional_fields_are_always_saved_by_classes_that_have_them():
    """What makes OPTIONAL_FIELDS safe: a class that defines one writes it to config.json,
    so its absence means the class lacks it (the getattr default is what AutoConfig gives)."""
    classes = _config_classes()
    assert len(classes) >= 30
    for model_type, cfg in classes.items():
        saved = json.loads(cfg.to_json_string())
        for name in OPTIONAL_FIELDS:
            if hasattr(cfg, name) and getattr(cfg, name) is not None:
                assert name in saved, (model_type, name)


def _layer_maps(root, config):
    from seif.converters import transformers as hf

    family = hf._family(config, "config.json")
    quant = hf._quantization(family, config, "config.json")
    sources = hf._read_sources(root)

    def use(cfg):
        used.append(type(cfg).__name__)
        return hf._layer_map(family, cfg, sources, root, quant)

    used: list[str] = []
    light = with_config(root, config, use)
    full = with_config(root, config, use, light=False)
    return light, full, used


@pytest.mark.parametrize("model_type", CASES)
def test_json_only_config_matches_autoconfig(tmp_path, model_type):
    from test_transformers import build

    build(model_type, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    light, full, used = _layer_maps(tmp_path, config)
    assert used[0] == "RawConfig" and len(used) == 2     # the light path settled it
    assert light[0] == full[0] and light[0]              # the same LayerSpecs
    assert light[1:] == full[1:]                         # renames, splits, quantization


@pytest.mark.parametrize("model_type,field", [("qwen2_moe", "norm_topk_prob"),
                                              ("deepseek_v3", "routed_scaling_factor"),
                                              ("mixtral", "num_experts_per_tok")])
def test_a_field_left_to_the_config_class_defers_to_autoconfig(tmp_path, model_type, field):
    """Remove a field the family reads: the config class's default decides, not a guess."""
    from test_transformers import build

    build(model_type, tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    del config[field]
    path.write_text(json.dumps(config))
    light, full, used = _layer_maps(tmp_path, config)
    assert used[0] == "RawConfig" and used[1] != "RawConfig"      # it deferred
    assert light[0] == full[0]
