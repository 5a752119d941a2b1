"""``lord_export.compile``: generate() and pipelines run the LoRD graph; compiling the whole module and then
generating (which runs the dense model) is warned about."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import lord_export as le
from tests.helpers import correlated_batches, tiny_model

pytestmark = pytest.mark.slow
PROMPT = torch.tensor([[5, 17, 42, 9]])
GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    dense = tiny_model("llama")
    lord = copy.deepcopy(dense)
    plan = le.compress(lord, correlated_batches(), rank_reduction=0.5)
    d = tmp_path_factory.mktemp("compile") / "lord"
    le.save_compressed(lord, plan, d)
    return dense, lord, d


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 64  # dense and LoRD share the class's compiled-frame cache
    yield
    torch._dynamo.config.recompile_limit = limit


def test_compiled_forward_generates_the_lord_tokens(pair):
    dense, lord, d = pair
    want = lord.generate(PROMPT, **GREEDY)
    assert not torch.equal(want, dense.generate(PROMPT, **GREEDY))  # the pair differs: the test can fail
    model = le.compile(copy.deepcopy(dense), d, dynamic=True)
    assert torch.equal(model.generate(PROMPT, **GREEDY), want)
    torch.testing.assert_close(model(PROMPT).logits, lord(PROMPT).logits, rtol=1e-4, atol=1e-4)


def test_compile_refuses_a_finetuned_copy_at_once(pair):
    dense, _, d = pair
    tuned = copy.deepcopy(dense)
    with torch.no_grad():
        tuned.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(le.PlanError, match="differs from the plan's base model"):
        le.compile(tuned, d)
    le.compile(tuned, d, allow_base_mismatch=True)  # asked for: accepted


def test_whole_module_compile_then_generate_warns_once(pair, caplog):
    from lord_export.export import dynamo

    dynamo._WARNED.discard("generate")  # once per process: another test may have set it off
    dense, _, d = pair
    fast = torch.compile(copy.deepcopy(dense), backend="lord", options={"plan": str(d)})
    with caplog.at_level(logging.WARNING, logger="lord_export.export.dynamo"):
        fast(PROMPT)  # the compiled forward: no warning
        assert not [r for r in caplog.records if "UNcompiled" in r.message]
        out = fast.generate(PROMPT, **GREEDY)
        fast.generate(PROMPT, **GREEDY)
    warnings = [r for r in caplog.records if "UNcompiled" in r.message]
    assert len(warnings) == 1 and "lord_export.compile" in warnings[0].message
    assert torch.equal(out, dense.generate(PROMPT, **GREEDY))  # what the warning is about: the dense model ran
