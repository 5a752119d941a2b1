"""Tiny models built from configs (random weights), data for them, and paths to the shared real data.

Imported by the tests as ``tests.helpers`` (``pytest``'s ``pythonpath`` setting puts the project root
on the path); ``conftest.py`` holds only fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
STORIES_MODEL = SHARED_DATA / "stories260K-hf"
STORIES_TEXT = SHARED_DATA / "text" / "tinystories_2MiB.txt"
VOCAB = 320

needs_shared_data = pytest.mark.skipif(
    not STORIES_MODEL.is_dir() or not STORIES_TEXT.is_file(),
    reason="../shared/data (stories260K-hf and tinystories text) is absent in this checkout",
)


class PlainMLP(nn.Module):
    """A non-transformers model: two parallel input projections (shared input) and an output one."""

    def __init__(self, d: int = 24, hidden: int = 40) -> None:
        super().__init__()
        self.a = nn.Linear(d, hidden)
        self.b = nn.Linear(d, hidden, bias=False)
        self.out = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.a(x)) * self.b(x))


def _configs() -> dict:
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=128)
    return {
        "llama": (
            tf.LlamaForCausalLM,
            tf.LlamaConfig(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                **common,
            ),
        ),
        "mistral": (
            tf.MistralForCausalLM,
            tf.MistralConfig(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                **common,
            ),
        ),
        "qwen2": (
            tf.Qwen2ForCausalLM,
            tf.Qwen2Config(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                **common,
            ),
        ),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
        "gpt_bigcode": (
            tf.GPTBigCodeForCausalLM,
            tf.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, multi_query=True),
        ),
        "codegen": (
            tf.CodeGenForCausalLM,
            tf.CodeGenConfig(
                vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, n_ctx=128
            ),
        ),
        "phi3": (
            tf.Phi3ForCausalLM,
            tf.Phi3Config(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                **common,
            ),
        ),
        "qwen3": (
            tf.Qwen3ForCausalLM,
            tf.Qwen3Config(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                **common,
            ),
        ),
        "gemma2": (  # a local (sliding-window) layer, then a global one: each gets its own mask
            tf.Gemma2ForCausalLM,
            tf.Gemma2Config(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                sliding_window=16,
                layer_types=["sliding_attention", "full_attention"],
                **common,
            ),
        ),
        "gemma3": (  # local and global layers with their own masks and rotary tables
            tf.Gemma3ForCausalLM,
            tf.Gemma3TextConfig(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                sliding_window=16,
                layer_types=["sliding_attention", "full_attention"],
                **common,
            ),
        ),
        "mistral_sliding": (  # every layer a sliding window of 16 tokens, shorter than the test batches
            tf.MistralForCausalLM,
            tf.MistralConfig(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                sliding_window=16,
                **common,
            ),
        ),
        "bert": (
            tf.BertModel,
            tf.BertConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=128,
            ),
        ),
    }


ARCHS = [
    "llama",
    "mistral",
    "mistral_sliding",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "gpt2",
    "gpt_bigcode",
    "codegen",
    "phi3",
    "bert",
]
CAUSAL = [a for a in ARCHS if a != "bert"]
#: Architectures with layers of different attention kinds (each block called with its own mask).
MIXED = ["gemma2", "gemma3"]


#: Mixture-of-experts architectures (transformers 5 fuses their experts into 3-D parameters).
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _moe_config(arch: str):
    from transformers import AutoConfig

    kw = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        num_experts_per_tok=2,
    )
    if arch == "mixtral":  # expert intermediate 48: 2I != H, so orientations cannot be confused
        kw.update(num_local_experts=4, intermediate_size=48)
    else:
        kw.update(num_experts=4, moe_intermediate_size=48, intermediate_size=96, head_dim=16, decoder_sparse_step=1)
        if arch == "qwen2_moe":
            kw.update(shared_expert_intermediate_size=96)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if arch in MOE:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(_moe_config(arch)).to(dtype).eval()
    cls, cfg = _configs()[arch]
    model = cls(cfg).to(dtype).eval()
    if arch in ("qwen2",):  # q/k/v biases start at zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.normal_(0, 0.1)
    return model


def correlated_batches(n_batches: int = 2, batch: int = 4, seq: int = 48, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def make_tokenizer(directory: Path) -> None:
    """Train a tiny byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 4,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
