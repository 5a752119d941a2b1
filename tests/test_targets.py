"""Target presets, explicit patterns, excludes and their errors."""

from __future__ import annotations

import pytest

from lord_export import TargetError, select_targets
from tests.helpers import tiny_model


def leaves(names):
    return sorted({n.split(".", 3)[-1] for n in names if ".0." in n})


@pytest.mark.parametrize(
    "arch,preset,expected",
    [
        (
            "llama",
            "all",
            [
                "mlp.down_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "self_attn.k_proj",
                "self_attn.o_proj",
                "self_attn.q_proj",
                "self_attn.v_proj",
            ],
        ),
        ("llama", "attention", ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]),
        ("llama", "mlp", ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]),
        ("llama", "mlp-down", ["mlp.down_proj"]),
        ("gpt2", "mlp-down", ["mlp.c_proj"]),
        ("gpt2", "attention", ["attn.c_attn", "attn.c_proj"]),
        ("codegen", "mlp-down", ["mlp.fc_out"]),
        ("phi3", "mlp", ["mlp.down_proj", "mlp.gate_up_proj"]),
    ],
)
def test_presets(arch, preset, expected):
    assert leaves(select_targets(tiny_model(arch), (preset,))) == expected


def test_bert_presets():
    model = tiny_model("bert")
    assert select_targets(model, ("mlp-down",)) == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    attn = select_targets(model, ("attention",))
    assert "encoder.layer.0.attention.output.dense" in attn and "encoder.layer.0.output.dense" not in attn


def test_lm_head_never_in_presets_but_can_be_named():
    model = tiny_model("gpt2")  # tied head
    assert not any("lm_head" in n for n in select_targets(model, ("all",)))
    llama = tiny_model("llama")
    assert "lm_head" not in select_targets(llama, ("all",))
    assert select_targets(llama, ("lm_head",)) == ["lm_head"]


def test_patterns_and_excludes():
    model = tiny_model("llama")
    got = select_targets(model, ("re:.*layers\\.1\\..*proj",), exclude=("o_proj", "mlp-down"))
    assert got == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]


@pytest.mark.parametrize("targets,exclude", [(("qkv_proj",), ()), (("all",), ("nope",)), (("re:foo.*",), ())])
def test_pattern_matching_nothing_lists_what_exists(targets, exclude):
    with pytest.raises(TargetError, match="matches no linear layer.*q_proj"):
        select_targets(tiny_model("llama"), targets, exclude)


def test_everything_excluded_is_an_error():
    with pytest.raises(TargetError, match="leave no layer"):
        select_targets(tiny_model("llama"), ("mlp-down",), exclude=("down_proj",))
