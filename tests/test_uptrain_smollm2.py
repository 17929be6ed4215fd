"""Real-model check (slow): layerwise uptraining of the mean-pooled MQA SmolLM2 lowers held-out perplexity."""

from __future__ import annotations

import pytest

from hf_attn_swap.io.examples import example_model_path
from hf_attn_swap.io.text import default_eval_files, default_train_files
from hf_attn_swap.pipeline.convert import convert_checkpoint
from hf_attn_swap.uptrain import UptrainConfig, uptrain


@pytest.mark.slow
def test_layerwise_uptraining_lowers_smollm2_mqa_perplexity(tmp_path):
    """4096 training tokens of the Python library docs (8 steps of 512; about 1-2 min on 2 CPU cores) at
    least halve the perplexity of the mean-pooled MQA model on 2048 held-out tutorial tokens."""
    source = example_model_path("smollm2")
    convert_checkpoint(source, tmp_path / "mqa", to="gqa", num_key_value_heads=1)
    record = uptrain(
        UptrainConfig(
            model=str(tmp_path / "mqa"),
            output=str(tmp_path / "mqa-layerwise"),
            data=[str(p) for p in default_train_files()],
            eval_data=[str(p) for p in default_eval_files()],
            mode="layerwise",
            max_tokens=4096,
            block_size=512,
            save_steps=4,
            eval_tokens=2048,
            eval_window=1024,
            progress=False,
        )
    )
    before, after = record["eval_before"]["perplexity"], record["eval_after"]["perplexity"]
    assert after < 0.5 * before, (before, after)
    assert record["final_loss"] < record["first_loss"]
    assert (tmp_path / "mqa-layerwise" / "loss_curve.png").is_file()
