"""Tiny random models built from configs (hidden 64, 2 layers): the fixtures for exactness tests, notebooks and
recipe smoke runs. Nothing here downloads anything."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

#: model_type -> extra config fields that make a tiny model of that family representative
FAMILY_OVERRIDES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},  # q/k/v biases are built in
    "qwen3": {},  # q_norm / k_norm
    "gemma": {"hidden_activation": "gelu_pytorch_tanh"},
    "gemma2": {
        "sliding_window": 8,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "query_pre_attn_scalar": 16,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    "phi3": {"pad_token_id": 0},
}


def tiny_config(
    model_type: str = "llama",
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    head_dim: int = 16,
    **overrides,
):
    """A 2-layer, hidden-64 config of ``model_type`` with the given head layout."""
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(FAMILY_OVERRIDES.get(model_type, {}))
    fields.update(overrides)
    if model_type == "phi3":  # Phi-3 derives head_dim from hidden_size
        fields["hidden_size"] = num_attention_heads * fields.pop("head_dim")
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str = "llama", seed: int = 0, attn_implementation: str = "eager", **config_kwargs):
    """A float32 random causal LM with larger-than-default init so attention patterns are not uniform."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **config_kwargs)
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    return model.eval()


TINY_TOKENIZER_TEXT = (
    "Python is an easy to learn, powerful programming language. It has efficient high-level data structures "
    "and a simple but effective approach to object-oriented programming. The interpreter and the extensive "
    "standard library are freely available in source or binary form for all major platforms.\n"
)


def tiny_tokenizer(text: str | None = None, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in milliseconds on ``text`` (any input text stays encodable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text or TINY_TOKENIZER_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_checkpoint(
    folder, model_type: str = "llama", seed: int = 0, text: str | None = None, **config_kwargs
):
    """Save a tiny random causal LM *with a matching tokenizer* to ``folder`` (a stand-in for a real
    checkpoint in recipe tests and notebooks); returns the folder."""
    from pathlib import Path

    tokenizer = tiny_tokenizer(text)
    config_kwargs.setdefault("vocab_size", len(tokenizer))
    model = tiny_model(model_type, seed=seed, attn_implementation="sdpa", **config_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
