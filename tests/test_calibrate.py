"""Calibration statistics: exact C, padding masked out, shared inputs detected once, NaN named."""

from __future__ import annotations

import logging

import pytest
import torch

from lord_export import CalibrationError, calibrate
from tests.helpers import PlainMLP, correlated_batches, tiny_model


def test_covariance_equals_x_xt_and_shared_input_accumulated_once():
    torch.manual_seed(0)
    model = PlainMLP().double()
    xs = [torch.randn(3, 5, 24, dtype=torch.float64) for _ in range(2)]
    cal = calibrate(model, xs_as_callback(xs), ["a", "b", "out"])
    X = torch.cat([x.reshape(-1, 24) for x in xs])
    assert cal.input_of["a"] == cal.input_of["b"] == "a"  # a and b read the same tensor
    assert cal.input_of["out"] == "out"
    assert set(cal.stats) == {"a", "out"}  # one C per distinct input
    st = cal.of("b")
    torch.testing.assert_close(st.C, X.T @ X, rtol=1e-12, atol=1e-10)
    assert st.tokens == 30
    torch.testing.assert_close(st.mean_abs, X.abs().mean(0))
    assert cal.batches == 2


def xs_as_callback(xs):
    def run(model):
        for x in xs:
            model(x)

    return run


def test_padding_positions_do_not_enter_c():
    model = tiny_model("llama", torch.float64)
    ids = torch.randint(3, 300, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    layer = "model.layers.0.mlp.down_proj"
    padded = calibrate(model, [{"input_ids": ids, "attention_mask": mask}], [layer])
    clean = calibrate(model, [ids[:1], ids[1:, :9]], [layer])
    assert padded.of(layer).tokens == 16 + 9
    C, ref = padded.of(layer).C, clean.of(layer).C
    scale = float(ref.abs().max())
    torch.testing.assert_close(C, ref, rtol=1e-5, atol=1e-6 * scale)  # LlamaRMSNorm computes in float32
    unmasked = calibrate(model, [ids], [layer]).of(layer).C
    assert float((unmasked - ref).abs().max()) > 1e-3 * scale  # padding would have changed C


def test_llama_groups_by_what_hooks_saw():
    model = tiny_model("llama")
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
    ]
    cal = calibrate(model, correlated_batches(1), names)
    keys = [cal.input_of[n] for n in names]
    assert keys[0] == keys[1] == keys[2] and keys[4] == keys[5]
    assert len(set(keys)) == 4


def test_nan_activation_names_the_module():
    model = PlainMLP()
    x = torch.randn(2, 24)
    x[0, 3] = float("nan")
    with pytest.raises(CalibrationError, match="'a'"):
        calibrate(model, xs_as_callback([x]), ["a", "out"])
    assert not model.a._forward_pre_hooks  # hooks are removed even on failure


def test_no_tokens_is_an_error():
    with pytest.raises(CalibrationError, match="no tokens"):
        calibrate(PlainMLP(), [], ["a"])


def test_few_tokens_warns(caplog):
    model = PlainMLP()
    with caplog.at_level(logging.WARNING):
        cal = calibrate(model, xs_as_callback([torch.randn(4, 24)]), ["a"])
    assert any("fewer calibration tokens than features" in w for w in cal.warnings)
    assert "fewer calibration tokens" in caplog.text


def test_batches_stop_at_the_lm_head_with_unchanged_statistics():
    model = tiny_model("llama")
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    batches = correlated_batches(3)
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    stopped = calibrate(model, batches, layers)
    assert not head_calls  # no vocabulary-wide logits were computed
    whole = calibrate(model, xs_as_callback_kwargs(batches), layers)  # a callback runs every forward whole
    handle.remove()
    assert len(head_calls) == 3
    assert stopped.batches == whole.batches == 3
    for key, st in whole.stats.items():
        assert stopped.stats[key].tokens == st.tokens
        torch.testing.assert_close(stopped.stats[key].C, st.C, rtol=0, atol=0)


class Looped(torch.nn.Module):
    """Calls ``b`` once per row of its input (how often a layer runs depends on the batch), then its
    output layer ``tail``, the place where a calibration batch may stop."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.tail = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        for _ in range(x.shape[0]):
            h = self.b(h)
        return self.tail(h)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.tail


@pytest.mark.parametrize("rows", [[1, 3], [2, 1]])
def test_a_layer_called_a_varying_number_of_times_never_loses_a_call(rows):
    torch.manual_seed(0)
    model = Looped().double()
    xs = [torch.randn(n, 8, dtype=torch.float64) for n in rows]
    b_inputs, tail_calls = [], []
    model.b.register_forward_pre_hook(lambda mod, args: b_inputs.append(args[0]))
    model.tail.register_forward_hook(lambda *a: tail_calls.append(1))
    cal = calibrate(model, [{"x": x} for x in xs], ["a", "b"])
    X = torch.cat(b_inputs)
    assert cal.of("b").tokens == X.shape[0] == sum(n * n for n in rows)
    torch.testing.assert_close(cal.of("b").C, X.T @ X)
    assert not tail_calls  # every batch stopped at the output layer
    cal = calibrate(model, [{"x": x} for x in xs], ["a", "b", "tail"])
    assert len(tail_calls) == 2 and cal.of("tail").tokens == sum(rows)  # a targeted head runs


def xs_as_callback_kwargs(batches):
    def run(model):
        for batch in batches:
            model(**batch)

    return run
