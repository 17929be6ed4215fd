"""Layer-by-layer conversion (``convert`` on checkpoints larger than memory): the same weights as the in-memory API,
bounded shards, original-mode calibration equal to ``collect_calibration``, and kill -9 + rerun = an uninterrupted run."""

import copy
import json
import os
import subprocess

import pytest
import torch
from conftest import PYTHON, subprocess_env, tree_digest
from transformers import AutoModelForCausalLM

from hf_attn_swap import convert_to_mla
from hf_attn_swap.cli import main
from hf_attn_swap.export import to_deepseek_v3
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer
from hf_attn_swap.io.shards import INDEX_FILE, CheckpointReader, parse_size
from hf_attn_swap.io.text import load_token_ids
from hf_attn_swap.methods.calibration import CalibrationText, collect_calibration
from hf_attn_swap.methods.gqa import GQAConversionConfig, convert_to_gqa
from hf_attn_swap.methods.mla import MLAConversionConfig
from hf_attn_swap.pipeline.convert import convert_checkpoint
from hf_attn_swap.pipeline.stream import KILL_AT_LAYER, STATE_DIR
from hf_attn_swap.testing import TINY_TEXT, save_tiny_checkpoint, tiny_model

TOKENS, WINDOW = 200, 64


@pytest.fixture
def source(tmp_path):
    """A 4-layer Llama checkpoint with a tokenizer, and a calibration text file."""
    src = save_tiny_checkpoint(tmp_path / "src", "llama", num_hidden_layers=4, num_key_value_heads=2)
    text = tmp_path / "text.txt"
    text.write_text(TINY_TEXT * 4)
    return src, [str(text)]


def same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


TARGETS = {
    "mla-plugin": MLAConversionConfig(12, 8, format="plugin"),
    "mla-deepseek": MLAConversionConfig(12, 8, rope_selection="uniform"),
    "gqa-fit": GQAConversionConfig(1, "fit"),
    "gqa-mean": GQAConversionConfig(1, "mean"),
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_streamed_checkpoint_equals_the_in_memory_api(source, tmp_path, name):
    """convert (layer by layer, shards of 20 kB) == convert_to_mla / convert_to_gqa on the loaded model with the
    same options and calibration mode (unset: sequential for MLA, original for GQA), bit for bit; shards respect the bound and the index lists them."""
    src, files = source
    target = TARGETS[name]
    calibrated = name != "gqa-mean"
    text = (
        dict(calibration_data=files, calibration_tokens=TOKENS, calibration_window=WINDOW)
        if calibrated
        else {}
    )
    out = tmp_path / "out"
    report = convert_checkpoint(src, out, target, max_shard_size="20KB", **text)

    reference = load_causal_lm(src)
    calibration = None
    if calibrated:
        ids = load_token_ids(load_tokenizer(src), files, TOKENS)
        mode = (
            "sequential" if name.startswith("mla") else "original"
        )  # the unset mode: best measured per target
        calibration = CalibrationText(ids, WINDOW, mode)
        assert report.details["calibration_mode"] == mode
    if name.startswith("mla"):
        latent = MLAConversionConfig(12, 8, format="plugin", rope_selection=target.rope_selection)
        convert_to_mla(reference, latent, calibration=calibration)
        if target.format == "deepseek_v3":
            reference, _ = to_deepseek_v3(reference)
    else:
        convert_to_gqa(reference, target, calibration=calibration)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(saved) is type(reference)
    same_weights(saved.state_dict(), reference.state_dict())

    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == [p.name for p in shards]
    limit = parse_size("20KB")
    for shard in shards:  # at most the bound, unless one layer (or one tensor) alone is larger
        names = [n for n, f in weight_map.items() if f == shard.name]
        assert (
            shard.stat().st_size <= limit + 4096
            or len({n.split(".")[2] if n.startswith("model.layers.") else n for n in names}) == 1
        )
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folder left
    assert not (out / STATE_DIR).exists()


@pytest.mark.parametrize("method", ["mla", "fit"])
def test_original_mode_equals_collected_calibration(method):
    """mode "original" carries the unmodified layers' outputs: exactly the inputs collect_calibration records,
    so the layer-by-layer conversion equals the one calibrated by whole-model forwards, bit for bit."""
    ids = torch.arange(3, 99) % 128
    for implementation in ("sdpa", "eager"):
        model = tiny_model(
            "llama", num_attention_heads=4, num_key_value_heads=2, attn_implementation=implementation
        )
        whole, layerwise = copy.deepcopy(model), copy.deepcopy(model)
        if method == "mla":
            convert_to_mla(
                whole, 12, 8, calibration=collect_calibration(whole, ids, window=48, key_weights=True)
            )
            report = convert_to_mla(
                layerwise, 12, 8, calibration=CalibrationText(ids, 48, "original"), output_correction=False
            )
        else:
            convert_to_gqa(
                whole, 1, "fit", calibration=collect_calibration(whole, ids, window=48, key_weights=True)
            )
            report = convert_to_gqa(layerwise, 1, "fit", calibration=CalibrationText(ids, 48, "original"))
        assert report.details["calibration_mode"] == "original"
        same_weights(layerwise.state_dict(), whole.state_dict())
        sequential = copy.deepcopy(
            model
        )  # the default mode calibrates on the converted layers: other weights
        if method == "mla":
            convert_to_mla(sequential, 12, 8, calibration=CalibrationText(ids, 48))
        else:
            convert_to_gqa(sequential, 1, "fit", calibration=CalibrationText(ids, 48))
        state = whole.state_dict()
        assert any(not torch.equal(t, state[n]) for n, t in sequential.state_dict().items())


def test_reader_reads_layers_and_embedding_rows(source):
    src, _ = source
    reader = CheckpointReader(src)
    model = load_causal_lm(src)
    state = model.state_dict()
    names = [n for n in reader.keys() if n.startswith("model.layers.2.")]
    assert names and all(torch.equal(t, state[n]) for n, t in reader.read(names).items())
    index = torch.tensor([5, 0, 127, 5, 64])
    rows = reader.rows("model.embed_tokens.weight", index, block=16)
    assert torch.equal(rows, state["model.embed_tokens.weight"][index])
    dtype, shape, blocks = reader.blocks("lm_head.weight", rows=48)
    blocks = list(blocks)
    assert (dtype, shape, [len(b) for b in blocks]) == (torch.float32, [128, 64], [48, 48, 32])
    assert torch.equal(torch.cat(blocks), state["lm_head.weight"])


def test_shard_writer_resumes_from_its_state(tmp_path):
    """A writer rebuilt from ``state()`` cuts off what was added after it, keeps the synced tensors of the shard
    being filled, and takes a shard that ``flush`` renamed into place (killed before the new state was saved)
    as finished; the result equals one writer that was never interrupted."""
    from safetensors.torch import load_file

    from hf_attn_swap.io.shards import ShardWriter

    t = {
        f"t{i}": torch.full((10, 10), float(i), dtype=torch.float32 if i % 2 else torch.bfloat16)
        for i in range(5)
    }

    def add(writer, *names):  # shards of 700 bytes: [t0 t1] [t2 t3] [t4]
        for name in names:
            if writer.overflows(t[name].numel() * t[name].element_size()):
                writer.flush()
            writer.add({name: t[name]})
            writer.sync()

    folders = {name: tmp_path / name for name in ("clean", "pending", "renamed")}
    for folder in folders.values():
        folder.mkdir()
    writer = ShardWriter(folders["clean"], 700)
    add(writer, *t)
    clean = writer.finish()
    assert len(clean) == 3
    writer = ShardWriter(folders["pending"], 700)
    add(writer, "t0", "t1", "t2")
    state = writer.state()
    writer.add({"junk": torch.ones(1000)})  # written after the state (longer than what follows): a kill here
    writer.sync()  # (on disk, as a killed process's writes are; nothing left buffered in this handle)
    writer = ShardWriter(folders["pending"], 700, state)
    add(writer, "t3", "t4")
    assert writer.finish() == clean
    writer = ShardWriter(folders["renamed"], 700)
    add(writer, "t0", "t1", "t2", "t3")
    state = writer.state()
    writer.flush()  # a kill here: the shard is in place, the state still lists its tensors as pending
    writer = ShardWriter(folders["renamed"], 700, state)
    add(writer, "t4")
    assert writer.finish() == clean
    broken = tmp_path / "broken"  # a saved state whose open shard lost bytes
    broken.mkdir()
    writer = ShardWriter(broken, 700)
    add(writer, "t0")
    state = writer.state()
    (broken / "shard-00001.data").write_bytes(b"")
    with pytest.raises(RuntimeError, match="shorter than its saved state: delete the folder"):
        ShardWriter(broken, 700, state)
    for folder in folders.values():
        assert sorted(p.name for p in folder.iterdir()) == sorted([*clean, INDEX_FILE])
        for name in clean:
            a, b = load_file(str(folders["clean"] / name)), load_file(str(folder / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def convert_command(src, out, files, *extra, shard="20KB"):
    return [PYTHON, "-m", "hf_attn_swap", "convert", str(src), str(out), "--to", "mla", "--kv-lora-rank", "13",
            "--rope-dim", "8", "--calibration-data", *files, "--calibration-tokens", str(TOKENS),
            "--calibration-window", str(WINDOW), "--max-shard-size", shard, *extra]  # fmt: skip


@pytest.mark.parametrize("shard", ["20KB", "10MB"])
def test_kill_9_mid_conversion_then_rerun_gives_the_uninterrupted_output(source, tmp_path, shard):
    """The process SIGKILLs itself on reaching layer 3 (layers 0-2 written: in closed shards of 20 kB, or all
    in the one shard still being filled): no OUT, a hidden state folder; the same command again resumes at
    layer 3 and writes the same bytes as a run that was never interrupted."""
    src, files = source
    digest = tree_digest(src)
    out, clean = tmp_path / "out", tmp_path / "clean"

    def run(folder, **env):
        command = convert_command(src, folder, files, shard=shard)
        return subprocess.run(command, env=subprocess_env(**env), capture_output=True, text=True)

    killed = run(out, **{KILL_AT_LAYER: "3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    state = json.loads((partial / STATE_DIR / "state.json").read_text())
    assert state["next_layer"] == 3  # resumes at the layer it was killed in
    pending = {int(name.split(".")[2]) for name, _, _ in state["writer"]["pending"]}
    assert pending == ({2} if shard == "20KB" else {0, 1, 2})  # the shard being filled, synced to layer 2
    assert bool(state["writer"]["shards"]) == (shard == "20KB")
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partial.exists()
    fresh = run(clean)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for file in clean.iterdir():
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name
    assert tree_digest(src) == digest


def test_bad_device_and_shard_size_are_one_line_errors(source, tmp_path, capsys):
    src, _ = source
    base = ["convert", str(src), str(tmp_path / "o"), "--to", "gqa", "--num-kv-heads", "1"]
    assert main([*base, "--device", "tpu"]) == 2
    assert "use cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main([*base, "--device", "cuda:7"]) == 2
    assert "use --device cpu" in capsys.readouterr().err
    assert main([*base, "--max-shard-size", "lots"]) == 2
    assert "500MB" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not any(p.name.startswith(".o.") for p in tmp_path.iterdir())


def test_calibration_mode_flag(source, tmp_path):
    """--calibration-mode original: conversion.json says so, and the weights differ from sequential's."""
    src, files = source
    runs = {}
    for mode in ("original", "sequential"):
        args = convert_command(src, tmp_path / mode, files, "--calibration-mode", mode)[3:]
        assert main(args) == 0
        assert (
            json.loads((tmp_path / mode / "conversion.json").read_text())["details"]["calibration_mode"]
            == mode
        )
        runs[mode] = AutoModelForCausalLM.from_pretrained(tmp_path / mode).state_dict()
    name = "model.layers.3.self_attn.kv_b_proj.weight"
    assert not torch.equal(runs["original"][name], runs["sequential"][name])
    assert os.environ.get(KILL_AT_LAYER) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_matches_cpu(source, tmp_path):
    """--device cuda: the layer forwards run on the GPU; the weights agree with the CPU run to float32 rounding."""
    src, files = source
    text = dict(calibration_data=files, calibration_tokens=TOKENS, calibration_window=WINDOW)
    for device in ("cpu", "cuda"):
        convert_checkpoint(src, tmp_path / device, TARGETS["mla-plugin"], device=device, **text)
    cpu = AutoModelForCausalLM.from_pretrained(tmp_path / "cpu").state_dict()
    cuda = AutoModelForCausalLM.from_pretrained(tmp_path / "cuda").state_dict()
    for name, tensor in cpu.items():
        torch.testing.assert_close(cuda[name], tensor, rtol=1e-4, atol=1e-5)


DEVICE_CASES = {
    "mla-freqfold-pca": MLAConversionConfig(12, 8, format="plugin"),
    "mla-norm-pca": MLAConversionConfig(12, 8, format="plugin", rope_selection="norm"),
    "mla-uniform-2-rope-keys": MLAConversionConfig(12, 8, rope_selection="uniform", num_rope_key_heads=2),
    **{f"gqa-{name}": GQAConversionConfig(1, name) for name in ("mean", "align", "fit", "group-fit")},
}


class DevicelessTensors(torch.overrides.TorchFunctionMode):
    """Records where a floating-point tensor is created without ``device=``: on a GPU it would land on the CPU
    and meet the layer's tensors there (index tensors may stay on the CPU: indexing moves them)."""

    FACTORIES = {torch.zeros, torch.ones, torch.eye, torch.full, torch.empty, torch.arange, torch.tensor,
                 torch.linspace, torch.rand, torch.randn}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        floating = torch.is_tensor(out) and (out.is_floating_point() or out.is_complex())
        if func in self.FACTORIES and floating and kwargs.get("device") is None:
            import traceback

            caller = traceback.extract_stack(limit=2)[0]
            self.found.append(f"{caller.filename.rsplit('/', 1)[-1]}:{caller.lineno} {func.__name__}")
        return out


@pytest.mark.parametrize("name", list(DEVICE_CASES))
def test_decompositions_create_their_tensors_on_the_layer_device(name):
    """--device: each layer's math runs where the layer lives (``methods.device.math_device``), so every
    floating-point tensor the methods create must be created on their inputs' device (``device=``)."""
    from hf_attn_swap.adapters import get_adapter
    from hf_attn_swap.methods.device import math_device
    from hf_attn_swap.methods.gqa.convert import convert_gqa_layer
    from hf_attn_swap.methods.gqa.registry import GQA_METHODS
    from hf_attn_swap.methods.mla import MLAConversion

    assert math_device("cpu") == torch.device("cpu")
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    attn = model.model.layers[1].self_attn
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(96, model.config.hidden_size, generator=generator)
    key_weights = torch.rand(96, generator=generator) + 0.5
    options = DEVICE_CASES[name]
    with DevicelessTensors() as mode:
        if name.startswith("mla"):
            conversion = MLAConversion(model.config, options, True, None)
            assert conversion.factorization.name == "pca"
            conversion.decompose(1, attn, inputs)
        else:
            adapter = get_adapter(model.config)
            layout = adapter.layout(model.config)
            convert_gqa_layer(adapter, attn, 1, layout, 1, GQA_METHODS[options.method], inputs, key_weights)
    assert mode.found == []


def test_output_correction_refits_o_proj_to_the_source_attention():
    """refit_output_projection: a layer whose o_proj was spoilt gets the source's back from the source attention's
    outputs (exact least squares at ridge 0, fp64); in convert_to_mla it lowers the converted first layer's
    attention error on the calibration text and changes only o_proj."""
    from hf_attn_swap.methods.layerwise import capture_attention_inputs, refit_output_projection

    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2).double()
    ids = torch.arange(3, 99) % 128
    stream = [model.model.embed_tokens(ids[i : i + 48])[None] for i in (0, 48)]
    rotary = model.model.rotary_emb
    layer = model.model.layers[0]
    targets = capture_attention_inputs(layer, stream, rotary, attention_outputs=True).attention_outputs
    original = layer.self_attn.o_proj.weight.detach().clone()
    with torch.no_grad():
        layer.self_attn.o_proj.weight.normal_()
    refit_output_projection(layer, stream, rotary, targets, ridge=0.0)
    torch.testing.assert_close(
        layer.self_attn.o_proj.weight, original, rtol=1e-4, atol=1e-6
    )  # float32 targets

    errors, states = {}, {}
    for correct in (False, True):
        converted = copy.deepcopy(model)
        convert_to_mla(
            converted, 6, 4, calibration=CalibrationText(ids, 48, "sequential"), output_correction=correct
        )
        got = capture_attention_inputs(converted.model.layers[0], stream, rotary, attention_outputs=True)
        errors[correct] = (got.attention_outputs - targets).square().sum().item()
        states[correct] = converted.state_dict()
    assert errors[True] < 0.9 * errors[False]
    assert (
        states[True]["model.layers.0.self_attn.o_proj.weight"]
        .ne(states[False]["model.layers.0.self_attn.o_proj.weight"])
        .any()
    )
    for name, tensor in states[False].items():
        if name.startswith("model.layers.0.") and "o_proj" not in name:
            assert torch.equal(tensor, states[True][name]), name


def test_sliding_window_layer_types_load_the_whole_model_or_are_refused(tmp_path, monkeypatch):
    """A config whose ``layer_types`` name sliding-window layers (Qwen2 with use_sliding_window) is not streamed:
    GQA converts the loaded model instead (the same weights as the in-memory API), MLA is refused in one line,
    before any weight is read, naming the fix (the rule: ``adapters.sliding_window_layers``)."""
    import hf_attn_swap.pipeline.convert as convert

    src = save_tiny_checkpoint(tmp_path / "src", "qwen2", num_attention_heads=4, num_key_value_heads=2,
                               use_sliding_window=True, sliding_window=8, max_window_layers=1)  # fmt: skip
    model = load_causal_lm(src)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]

    def streamed(job):
        raise AssertionError("a sliding-window model was streamed layer by layer")

    monkeypatch.setattr(convert, "stream_checkpoint", streamed)
    report = convert_checkpoint(src, tmp_path / "gqa", num_key_value_heads=1, method="mean")
    assert report.after == {"num_key_value_heads": 1}
    expected = copy.deepcopy(model)
    convert_to_gqa(expected, 1, "mean")
    same_weights(load_causal_lm(tmp_path / "gqa").state_dict(), expected.state_dict())
    with pytest.raises(ValueError, match="sliding-window attention layers: set sliding_window=None"):
        convert_checkpoint(src, tmp_path / "mla", "mla", mla={"kv_lora_rank": 12, "qk_rope_head_dim": 4})
    assert not (tmp_path / "mla").exists()
