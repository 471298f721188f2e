"""The model configs: config.json round trips, and what both families share through ModelConfig."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sambay.errors import SambayError
from sambay.models import config as config_module
from sambay.models import presets
from sambay.models.config import (ModelConfig, Phi3Config, SambaYConfig, config_from_dict, load_config)
from sambay.models.presets import PRESETS, preset

FAMILIES = [("tiny", SambaYConfig), ("tiny-phi3", Phi3Config)]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_round_trips(name, tmp_path):
    cfg = preset(name)
    assert isinstance(cfg, ModelConfig)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # the base picks the family
    cfg.to_json(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    assert type(cfg).from_json(tmp_path / "config.json") == cfg
    text = (tmp_path / "config.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and list(json.loads(text))[:2] == ["architectures", "model_type"]
    assert preset(name) is not preset(name)  # each call makes a new config


def test_key_order_of_written_files():
    # The checkpoint writer's output: the order files have always had (not the fields' order).
    assert list(preset("tiny").to_dict()) == [
        "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "hidden_act", "layer_norm_eps", "max_position_embeddings",
        "sliding_window", "mb_per_layer", "pad_token_id", "bos_token_id", "eos_token_id", "attention_dropout",
        "embd_pdrop", "resid_pdrop", "initializer_range", "tie_word_embeddings", "torch_dtype", "use_cache",
        "mlp_bias", "lm_head_bias", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
        "mamba_conv_bias", "mamba_proj_bias"]
    assert list(preset("tiny-phi3").to_dict()) == [
        "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings",
        "original_max_position_embeddings", "rope_theta", "partial_rotary_factor", "rope_scaling",
        "sliding_window", "pad_token_id", "bos_token_id", "eos_token_id", "attention_dropout", "embd_pdrop",
        "resid_pdrop", "initializer_range", "tie_word_embeddings", "torch_dtype", "use_cache", "attention_bias",
        "mlp_bias", "lm_head_bias"]
    for cls in (SambaYConfig, Phi3Config):
        assert sorted(cls.KEY_ORDER) == sorted(f.name for f in dataclasses.fields(cls) if f.name != "extra")


def test_differential_attention_is_written_only_when_off():
    assert "differential_attention" not in preset("tiny").to_dict()
    off = preset("tiny-nodiff")
    assert off.to_dict()["differential_attention"] is False
    assert config_from_dict(off.to_dict()) == off


@pytest.mark.parametrize("name, cls", FAMILIES)
def test_extra_keys_are_kept_and_written_back(name, cls, tmp_path):
    data = preset(name).to_dict() | {"auto_map": {"AutoConfig": "x.y"}, "transformers_version": "4.46.1"}
    cfg = cls.from_dict(data)
    assert cfg.extra == {"auto_map": {"AutoConfig": "x.y"}, "transformers_version": "4.46.1"}
    assert cfg.to_dict() == data
    cfg.to_json(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json").extra == cfg.extra


@pytest.mark.parametrize("name, cls", FAMILIES)
def test_eos_token_ids_from_int_list_or_none(name, cls):
    cfg = preset(name)
    assert cfg.eos_token_ids == [511]
    assert cfg.replace(eos_token_id=[7, 511]).eos_token_ids == [7, 511]
    assert cfg.replace(eos_token_id=None).eos_token_ids == []
    assert cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads == 16


@pytest.mark.parametrize("name, cls, changes, message", [
    ("tiny", SambaYConfig, {"num_hidden_layers": 6}, "invalid SambaY config: num_hidden_layers must be a "
                                                     "positive multiple of 4"),
    ("tiny", SambaYConfig, {"num_key_value_heads": 3}, "invalid SambaY config: num_attention_heads 4 is not "
                                                       "a multiple of num_key_value_heads 3"),
    ("tiny-phi3", Phi3Config, {"num_key_value_heads": 3}, "invalid Phi3 config: num_attention_heads 4 is not a "
                                                          "multiple of num_key_value_heads 3"),
    ("tiny-phi3", Phi3Config, {"partial_rotary_factor": 0.1}, "invalid Phi3 config: partial_rotary_factor"),
])
def test_replace_validates_again(name, cls, changes, message):
    cfg = preset(name)
    with pytest.raises(SambayError, match=message):
        cfg.replace(**changes)
    assert cfg == preset(name)  # unchanged
    bigger = cfg.replace(hidden_size=128)
    assert type(bigger) is cls and bigger.hidden_size == 128 and cfg.hidden_size == 64


@pytest.mark.parametrize("name, changes, message", [
    ("tiny", {"hidden_size": 0}, "invalid SambaY config: hidden_size must be a positive integer, got 0"),
    ("tiny-phi3", {"hidden_size": 0}, "invalid Phi3 config: hidden_size must be a positive integer, got 0"),
    ("tiny", {"sliding_window": 0}, "invalid SambaY config: sliding_window must be a positive integer or "
                                    "null, got 0"),
    ("tiny-phi3", {"sliding_window": "8"}, "invalid Phi3 config: sliding_window must be a positive integer "
                                           "or null, got '8'"),
    ("tiny", {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 60},
     r"differential attention pairs heads, so num_attention_heads \(6\) and num_key_value_heads \(3\)"),
    ("tiny", {"tie_word_embeddings": False}, "tie_word_embeddings must be true"),
    ("tiny", {"hidden_act": "gelu"}, r"hidden_act must be 'silu' \(the only activation SambaY uses\)"),
    ("tiny-phi3", {"attention_bias": True}, "attention_bias, mlp_bias and lm_head_bias must be false"),
    ("tiny-phi3", {"rope_scaling": {"type": "dynamic"}}, "rope_scaling type must be 'longrope'"),
    ("tiny", {"sliding_window": [8, 16]}, "invalid SambaY config: sliding_window lists different windows"),
])
def test_validation_errors(name, changes, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset(name).to_dict() | changes))
    with pytest.raises(SambayError, match=message):
        load_config(tmp_path / "config.json")


def test_odd_heads_are_fine_without_differential_attention():
    cfg = preset("tiny-nodiff").replace(num_attention_heads=6, num_key_value_heads=3, hidden_size=60)
    assert cfg.head_dim == 10


def test_per_layer_sliding_window_list_is_one_window():
    data = preset("tiny").to_dict()
    assert config_from_dict(data | {"sliding_window": [8, None, 8]}).sliding_window == 8
    assert config_from_dict(data | {"sliding_window": [None, None]}).sliding_window is None


def test_family_is_read_from_the_file(tmp_path):
    phi3, sambay = preset("tiny-phi3"), preset("tiny")
    phi3.to_json(tmp_path / "phi3.json")
    sambay.to_json(tmp_path / "sambay.json")
    with pytest.raises(SambayError, match="describes a Phi3 model, not SambaY"):
        SambaYConfig.from_json(tmp_path / "phi3.json")
    with pytest.raises(SambayError, match="describes a SambaY model, not Phi3"):
        Phi3Config.from_json(tmp_path / "sambay.json")
    assert ModelConfig.from_json(tmp_path / "phi3.json") == phi3
    # Either of the two keys names the family; what to_dict writes is the family's own.
    assert isinstance(config_from_dict({"model_type": "phi4flash"}), SambaYConfig)
    only_arch = config_from_dict({"architectures": ["Phi3ForCausalLM"], "num_attention_heads": 24})
    assert isinstance(only_arch, Phi3Config) and only_arch.extra == {}
    assert only_arch.num_key_value_heads == 24 and only_arch.partial_rotary_factor == 1.0  # transformers' defaults
    with pytest.raises(SambayError, match=r"where.json describes a llama model \(architectures \['Llama"):
        config_from_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "where.json")
    with pytest.raises(SambayError, match="invalid SambaY config in where.json: '<' not supported"):
        config_from_dict(sambay.to_dict() | {"num_hidden_layers": "8"}, "where.json")


def test_unreadable_files(tmp_path):
    with pytest.raises(SambayError, match="no config.json at .*: a model folder needs config.json"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SambayError, match="is not valid JSON"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(SambayError, match="must hold a JSON object, found list"):
        load_config(tmp_path / "config.json")


def test_the_base_is_not_a_family():
    with pytest.raises(TypeError):
        ModelConfig()
    assert issubclass(SambaYConfig, ModelConfig) and issubclass(Phi3Config, ModelConfig)
    assert not issubclass(Phi3Config, SambaYConfig)
    assert preset("tiny") != preset("tiny-phi3")


def test_presets_are_exported_by_the_models_package():
    import sambay.models

    assert sambay.models.PRESETS is presets.PRESETS and sambay.models.preset is presets.preset
    with pytest.raises(SambayError, match="unknown preset 'nope'; choose one of: phi4-mini-flash, phi4-mini,"):
        preset("nope")
    with pytest.raises(AttributeError):
        config_module.no_such_name  # noqa: B018
