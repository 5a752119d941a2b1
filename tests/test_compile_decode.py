"""torch.compile(backend="lord") decode: the factors reach inductor as graph inputs (the plan's own
tensors, one extern GEMM each, no folded or copied constants), and token-by-token greedy decode
with a KV cache under compile picks the tokens eager LoRD picks (issue 16)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.compile_fx import compile_fx
from torch._inductor.utils import run_and_get_code

import lord_export as le
from lord_export.export.dynamo import make_backend
from tests.helpers import correlated_batches, tiny_model

STEPS = 6


def greedy(model, prompt: torch.Tensor, steps: int) -> list[int]:
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens = [int(nxt)]
        for _ in range(steps - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
    return tokens


@pytest.mark.slow
def test_compiled_decode_holds_factors_as_inputs_and_matches_eager_lord():
    dense = tiny_model("llama")
    lord = copy.deepcopy(dense)
    plan = le.compress(lord, correlated_batches(), rank_reduction=0.5, force=True)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(dense), backend=make_backend(plan=plan, backend=capture), dynamic=True)
    prompt = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    got, codes = run_and_get_code(greedy, compiled, prompt, STEPS)
    assert got == greedy(lord, prompt, STEPS)
    assert graphs and codes  # prompt and decode graphs, each rewritten (a cached graph brings no new code)
    plan_storages = {t.untyped_storage().data_ptr() for t in plan.tensors.values()}
    linear_counts = set()
    for gm in graphs:
        factors = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("lord_factor_")]
        assert factors
        for node in factors:  # buffers of the rewritten copy that ARE the plan's tensors (no copy)
            assert getattr(gm, node.target).untyped_storage().data_ptr() in plan_storages
        linear_counts.add(sum(n.op == "call_function" and n.target is F.linear for n in gm.graph.nodes))
    for code in codes:
        # inductor: one extern GEMM per linear (bottleneck, up-projection, LM head), reading the
        # factor inputs in place; no kernel materializes a factor and nothing is frozen into constants
        assert len(re.findall(r"extern_kernels\.(?:mm|addmm|bmm)\(", code)) in linear_counts
        assert "_frozen_param" not in code
