"""Shared fixtures: tiny randomly initialised models of every supported architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
VOCAB = 97


def _configs():
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False)
    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common, intermediate_size=48, num_key_value_heads=2)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**common, intermediate_size=48, num_key_value_heads=2)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, intermediate_size=48, num_key_value_heads=2)),
        "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**common, intermediate_size=48, partial_rotary_factor=0.5)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common, intermediate_size=48, num_key_value_heads=2, pad_token_id=0)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            tie_word_embeddings=False,
            num_key_value_heads=2, head_dim=8, sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common, intermediate_size=48)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                                       num_attention_heads=4, word_embed_proj_dim=32,
                                                       max_position_embeddings=64, pad_token_id=0,
                                                       tie_word_embeddings=False)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                                         n_positions=64,
                                                         tie_word_embeddings=False)),
    }


ARCHITECTURES = list(_configs())


def tiny_model(arch: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = _configs()[arch]().to(dtype).eval()
    model.requires_grad_(False)
    # Random init gives near-uniform logits; a larger lm_head makes greedy choices decisive
    # and gradients non-trivial.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.fixture(params=ARCHITECTURES)
def any_model(request):
    return request.param, tiny_model(request.param)


def shared_file(*parts) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is absent)")
    return path


def make_tiny_checkpoint(directory: Path, arch: str = "llama") -> Path:
    """A tiny random model plus a word-level tokenizer with a chat template, saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<eos>", "<pad>"] + [f"w{i}" for i in range(VOCAB - 3 - 6)] + ["Instruct:", "Output:", "the", "is", "?", "."]
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    model = tiny_model(arch, dtype=torch.float32)
    model.config.eos_token_id = vocab["<eos>"]
    model.generation_config.eos_token_id = vocab["<eos>"]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
