"""The memory bound of layer-by-layer ``convert`` (issue: peak RSS <= 40 % of the checkpoint), measured by the
kernel's accounting of the convert process (its own ``VmHWM`` at exit) on a synthetic fp32 Llama of ~3 GB. Slow: run with
``pytest -m slow tests/test_streaming_memory.py`` (the 5 GB figure of the README: ``scripts/bench_streaming.py``)."""

import importlib.util

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_streaming", REPO_ROOT / "scripts" / "bench_streaming.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["mla", "gqa-fit", "gqa-mean"])
def test_peak_memory_is_at_most_40_percent_of_the_checkpoint(tmp_path_factory, method):
    module = bench()
    root = tmp_path_factory.getbasetemp() / "streaming-memory"
    src = root / "src"
    if not (src / "config.json").exists():  # one checkpoint for the three methods
        module.build_checkpoint(src, hidden=1024, layers=48, heads=16, kv_heads=16, intermediate=2816,
                                shard_size="250MB")  # fmt: skip
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert size > 2.5e9
    extra = ["--kv-lora-rank", "224", "--rope-dim", "32"] if method == "mla" else []
    result = module.run_convert(src, root / method, method, 512, "250MB", extra)
    assert result["peak_rss"] <= module.BOUND * size, (method, result["peak_rss"] / size)
    assert result["output_bytes"] > 0.5 * size
