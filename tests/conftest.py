"""Shared fixtures: tiny random models of every supported architecture, built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

VOCAB = 128

# One tiny config per supported architecture. Dimensions are multiples of 8 so every N:M
# pattern up to 4:8 applies to every module.
ARCH_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    sliding_window=8)),
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=64)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "mixtral": ("MixtralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
}
ARCHS = list(ARCH_CONFIGS)
# Tiny configs beyond the parametrised set (make_tiny_model builds them too): Gemma 3's sliding and global
# layers, MoE with a shared expert and a dense layer (Qwen2-MoE), MoE in every layer (Qwen3-MoE).
EXTRA_CONFIGS = {
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                         num_experts_per_tok=2, mlp_only_layers=[1],
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def make_tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = ARCH_CONFIGS[arch] if arch in ARCH_CONFIGS else EXTRA_CONFIGS[arch]
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, **{**kwargs, **overrides})
    config._attn_implementation = "eager" if arch in ("gemma2", "gemma3") else "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: one intra-op thread is ~10x faster than several on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _neutral_thread_policy():
    """Tests that call the CLI in-process must not let its thread policy change this process's thread
    count (it depends on the machine's load, and the summation order of every later test with it);
    tests/test_threads.py sets the policy's inputs itself."""
    old = os.environ.get("LLMPRUNE_THREADS")
    os.environ["LLMPRUNE_THREADS"] = "torch"
    yield
    if old is None:
        os.environ.pop("LLMPRUNE_THREADS", None)
    else:
        os.environ["LLMPRUNE_THREADS"] = old


@pytest.fixture
def tiny_model():
    return make_tiny_model


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (6, 16), generator=g)  # [n, L]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The offline data folder: $LLMPRUNE_DATA_DIR, else shared/data beside the repository."""
    path = Path(os.environ.get("LLMPRUNE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (path / "c4").is_dir():
        pytest.skip(f"offline data dir {path} not found")
    return path


class TokenRows(torch.utils.data.Dataset):
    """Rows of token ids as a ``transformers.Trainer`` dataset (labels = inputs), for the Trainer tests."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def byte_tokenizer():
    """One token per byte (259 ids with the specials), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint folder with the byte tokenizer (vocabulary large enough for it)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=272, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                      **ARCH_CONFIGS["llama"][1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (or select them with -m slow)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` are skipped unless ``--runslow`` is given or ``-m`` names them."""
    if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (or -m slow)")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
