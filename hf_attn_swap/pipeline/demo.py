"""The README's main job (``hf-attn-swap demo``): convert a packaged real model (default SmolLM2-135M; ``--model
qwen2.5-coder``: Qwen2.5-Coder-0.5B, q/k/v biases) to MQA with one or more GQA methods (default: ``fit``, the best
measured) and to MLA at a KV budget (default -68.75 %, stock ``deepseek_v3`` format, every MLA default), and evaluate
them side by side with the original; writes ``WORKDIR/demo.json``."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..evaluate.suite import EVAL_COLUMNS, evaluate_checkpoints, markdown_table
from ..io.folders import machine_info, write_json
from ..methods.calibration import CalibrationConfig
from ..methods.gqa import GQA_METHODS, GQAConversionConfig
from ..methods.mla import MLAConversionConfig
from ..methods.options import option
from .convert import convert_checkpoint
from .evaluate import EvalDataConfig


@dataclass
class DemoConfig:
    """Which conversions the demo compares (its calibration text is a ``CalibrationConfig``, its held-out text an
    ``EvalDataConfig``)."""

    model: Literal["smollm2", "qwen2.5-coder"] = option(
        "smollm2", "the packaged model (hf-attn-swap example-model)"
    )
    num_key_value_heads: int = option(1, "KV heads after conversion (1 = MQA)")
    method: list[str] | None = option(
        None,
        "one or more GQA methods to convert with and compare (default: fit; mean: the GQA paper's baseline)",
        metavar="NAME",
        action="extend",  # --method a b --method c -> [a, b, c]
    )
    mla_kv_budget: str | None = option(
        "0.3125",
        "also convert to MLA (deepseek_v3 format) at this --kv-budget (default 0.3125 = -68.75%%); 'none' skips it",
    )
    workdir: str = option("runs/demo", "where the converted models and demo.json go")

    def __post_init__(self):
        if isinstance(self.method, str):
            self.method = [self.method]
        self.method = list(dict.fromkeys(self.method or ["fit"]))
        if self.mla_kv_budget is not None and str(self.mla_kv_budget).lower() == "none":
            self.mla_kv_budget = None
        if self.mla_kv_budget is not None:
            MLAConversionConfig(kv_budget=str(self.mla_kv_budget))  # checks the budget
        unknown = [m for m in self.method if m not in GQA_METHODS]
        if unknown:
            raise ValueError(f"unknown GQA method(s) {unknown}; choose from {sorted(GQA_METHODS)}")
        GQAConversionConfig(self.num_key_value_heads)  # type check


def run_demo(demo: DemoConfig, calibration: CalibrationConfig, data: EvalDataConfig) -> int:
    from ..io.examples import example_model_path

    src = example_model_path(demo.model)
    workdir = Path(demo.workdir).expanduser()
    heads = _source_kv_heads(src)
    calibration_info, converted_folders, reports = _gqa_conversions(demo, calibration, src, workdir)
    models = {f"original ({heads} KV heads)": str(src), **converted_folders}
    if demo.mla_kv_budget is not None:
        from ..io.text import default_train_files

        converted = workdir / f"{src.name}-mla"
        reports["mla"] = convert_checkpoint(
            src, converted, MLAConversionConfig(kv_budget=demo.mla_kv_budget),
            calibration_data=calibration.calibration_data or default_train_files(),
            calibration_tokens=calibration.calibration_tokens, calibration_window=calibration.calibration_window,
            calibration_mode=calibration.calibration_mode, overwrite=True,
        )  # fmt: skip
        print(reports["mla"])
        after = reports["mla"].after
        models[f"MLA deepseek_v3 (r {after['kv_lora_rank']} + d_rope {after['qk_rope_head_dim']})"] = str(
            converted
        )
    results = evaluate_checkpoints(models, data.data, str(src), data.max_tokens, data.window)
    rows = [{"name": name, **r} for name, r in results.items()]
    print()
    print(markdown_table(rows, EVAL_COLUMNS))
    payload = {
        "model": demo.model,
        "results": results,
        "conversion": next(iter(reports.values())).to_dict(),
        "conversions": {m: r.to_dict() for m, r in reports.items()},
        "calibration": calibration_info,
        "command": sys.argv,
        "machine": machine_info(),
    }
    print(f"\nwrote {write_json(workdir / 'demo.json', payload)}")
    return 0


def _source_kv_heads(src: Path) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _gqa_conversions(demo: DemoConfig, calibration: CalibrationConfig, src: Path, workdir: Path):
    """Convert ``src`` with each GQA method of ``demo`` (layer by layer, each calibrated method on the same text).
    Returns (what the calibration text was, name -> converted folder, method -> report)."""
    from ..io.checkpoints import load_tokenizer

    methods, kv = demo.method, demo.num_key_value_heads
    files, calibration_info, models, reports = None, None, {}, {}
    if any(GQA_METHODS[m].needs_calibration for m in methods):
        from ..io.text import default_train_files, load_token_ids
        from ..methods.calibration import require_calibration_files

        files = require_calibration_files(calibration.calibration_data or default_train_files(), "demo")
        ids = load_token_ids(load_tokenizer(src), files, calibration.calibration_tokens)
        calibration_info = {
            "tokens": int(ids.numel()),
            "window": calibration.calibration_window,
            "mode": calibration.calibration_mode or "sequential for MLA, original for GQA",
            "files": len(files),
            "first_file": str(files[0]),
        }
    for method in methods:
        converted = workdir / f"{src.name}-kv{kv}-{method}"
        text = GQA_METHODS[method].needs_calibration
        reports[method] = convert_checkpoint(
            src, converted, GQAConversionConfig(kv, method),
            calibration_data=[str(f) for f in files] if text else None,
            calibration_tokens=calibration.calibration_tokens, calibration_window=calibration.calibration_window,
            calibration_mode=calibration.calibration_mode, overwrite=True,
        )  # fmt: skip
        print(reports[method])
        models[f"{method}-pooled ({kv} KV heads)"] = str(converted)
    return calibration_info, models, reports
