"""Tiny random models built from configs (hidden 64, 2 layers): the fixtures for exactness tests, notebooks and
recipe smoke runs. Nothing here downloads anything."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .adapters import get_adapter
from .methods.gqa.base import per_query_head

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
    # families without native GQA (converted through hf_attn_swap.modeling plugin classes)
    "gpt2": {},
    "gpt_neox": {},  # partial rotary (rotary_pct 0.25), q/k/v biases
    "opt": {"word_embed_proj_dim": 64, "pad_token_id": 0},
    "falcon": {"new_decoder_architecture": True, "alibi": False, "bias": True},
    "bert": {},
}

#: families whose stock config has no K/V head count nor head_dim (hidden = heads * head_dim) -> the field
#: their config uses for the MLP width
MHA_ONLY_MLP_FIELD = {
    "gpt2": "n_inner",
    "gpt_neox": "intermediate_size",
    "opt": "ffn_dim",
    "falcon": "ffn_hidden_size",
    "bert": "intermediate_size",
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
    if fields["hidden_size"] % num_attention_heads:  # configs validate hidden % heads == 0
        fields["hidden_size"] = num_attention_heads * 16
    fields.update(FAMILY_OVERRIDES.get(model_type, {}))
    fields.update(overrides)
    if model_type in ("phi3", *MHA_ONLY_MLP_FIELD):  # these derive head_dim from hidden_size
        fields["hidden_size"] = num_attention_heads * fields.pop("head_dim")
    if model_type in MHA_ONLY_MLP_FIELD:
        fields[MHA_ONLY_MLP_FIELD[model_type]] = fields.pop("intermediate_size")
        kv = fields.pop("num_key_value_heads")
        if model_type == "falcon":  # Falcon-40B style: num_kv_heads with new_decoder_architecture
            fields["num_kv_heads"] = kv
        elif kv != num_attention_heads:
            raise ValueError(
                f"stock {model_type} has no GQA: num_key_value_heads must equal num_attention_heads"
            )
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(
    model_type: str = "llama",
    seed: int = 0,
    attn_implementation: str = "eager",
    auto_class=AutoModelForCausalLM,
    **config_kwargs,
):
    """A float32 random model (a causal LM unless ``auto_class`` says otherwise, e.g. ``AutoModel`` for a
    BERT encoder) with larger-than-default init so attention patterns are not uniform."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **config_kwargs)
    config.initializer_range = 0.2
    model = auto_class.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


TINY_TEXT = (  # a few lines of English for tiny recipe tests and notebooks
    "Python is an easy to learn, powerful programming language. It has efficient high-level data structures "
    "and a simple but effective approach to object-oriented programming. The interpreter and the extensive "
    "standard library are freely available in source or binary form for all major platforms.\n"
)


def tiny_tokenizer(vocab_size: int = 128):
    """A character-level fast tokenizer: ASCII code point i is token i (others map to ``?``); pad = 0."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="?", pad_token=chr(0), bos_token=chr(1), eos_token=chr(2)
    )


def repeated_kv_reference(original, converted):
    """A copy of the MHA ``original`` that computes what ``converted`` (a GQA conversion of it) computes with
    stock attention: ``converted``'s weights with every K/V head repeated for the query heads that read it.
    Independent of the grouped attention code, so ``converted`` must match it within float error."""
    reference = copy.deepcopy(original)
    adapter = get_adapter(reference)
    for attn, grouped in zip(
        adapter.attention_modules(reference), adapter.attention_modules(converted), strict=True
    ):
        w = adapter.read(grouped)

        def repeat(x, heads=w.num_attention_heads):
            return None if x is None else per_query_head(x, heads).clone()

        adapter.write(
            attn, replace(w, k=repeat(w.k), v=repeat(w.v), k_bias=repeat(w.k_bias), v_bias=repeat(w.v_bias))
        )
    return reference


def save_tiny_checkpoint(folder, model_type: str = "llama", seed: int = 0, **config_kwargs):
    """Save a tiny random causal LM *with a matching tokenizer* to ``folder`` (a stand-in for a real
    checkpoint in recipe tests and notebooks); returns the folder."""
    from pathlib import Path

    tokenizer = tiny_tokenizer()
    config_kwargs.setdefault("vocab_size", len(tokenizer))
    config_kwargs.setdefault("max_position_embeddings", 4096)  # one token per character: long contexts
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
