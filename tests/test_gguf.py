"""``hf-attn-swap gguf``: bad input (one line, exit 2, nothing written), the job's atomic output and exit status with
a stand-in driver, and the GGUF driver's float32 rule for the kv_a tensors on tiny GGUF files written with gguf-py
(no llama.cpp needed). With the llama.cpp venv (``pytest -m runtimes``): a tiny MLA export to f32 and q8_0."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_attn_swap.cli import main
from hf_attn_swap.pipeline import gguf as gguf_job
from hf_attn_swap.pipeline.verify import DRIVERS
from hf_attn_swap.testing import TINY_TEXT, save_tiny_checkpoint


def load_gguf_driver():
    """The standalone driver script as a module (it imports only the stdlib at the top)."""
    spec = importlib.util.spec_from_file_location("gguf_driver_under_test", DRIVERS / "gguf_driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


driver = load_gguf_driver()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("gguf") / "tiny", "llama")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TINY_TEXT * 2)
    return path


def fake_venv(root: Path, converter: bool) -> Path:
    venv = root / "llama.cpp"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".complete").touch()
    if converter:
        (venv / "llama.cpp").mkdir()
        (venv / "llama.cpp" / "convert_hf_to_gguf.py").write_text("")
    return venv


@pytest.mark.parametrize(
    "args, setup, message",
    [
        (["MISSING", "OUT"], None, "does not exist"),
        (["TINY", "OUT", "--outtype", "q5_1"], None, "--outtype must be one of f32, f16, bf16, q8_0, q4_k_m"),
        (["TINY", "OUT", "--max-new-tokens", "0"], None, "--max-new-tokens must be at least 1"),
        (["TINY", "OUT"], "no-venv", "run `bash scripts/install_runtimes.sh llama.cpp`"),
        (["TINY", "OUT"], "no-converter", "run `bash scripts/install_runtimes.sh llama.cpp`"),
        (["TINY", "OUT", "--python", "/no/such/python"], None, "--python '/no/such/python' does not exist"),
        (["TINY", "EXISTING"], None, "already exists: pass --overwrite"),
        (["TINY", "FOLDER"], None, "is a folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    args, setup, message, tiny, tmp_path, monkeypatch, capsys
):
    runtimes = tmp_path / "runtimes"
    monkeypatch.setenv("HF_ATTN_SWAP_RUNTIMES", str(runtimes))
    if setup is not None:
        fake_venv(runtimes, converter=setup != "no-converter")
    elif "--python" not in args:
        fake_venv(runtimes, converter=True)  # every other check comes before the venv is used
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "existing.gguf").write_bytes(b"old")
    (outdir / "folder").mkdir()
    paths = {
        "MISSING": str(tmp_path / "missing"),
        "TINY": str(tiny),
        "OUT": str(outdir / "new.gguf"),
        "EXISTING": str(outdir / "existing.gguf"),
        "FOLDER": str(outdir / "folder"),
    }
    code = main(["gguf", *[paths.get(a, a) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("hf-attn-swap gguf: error:") and message in err[0], err
    assert sorted(p.name for p in outdir.iterdir()) == ["existing.gguf", "folder"]  # no OUT, no partial file
    assert (outdir / "existing.gguf").read_bytes() == b"old" and not any((outdir / "folder").iterdir())


def stand_in_driver(tiny: Path, change_token: bool = False, fail: bool = False):
    """A ``run_gguf_driver`` that writes a fake GGUF and returns transformers' own outputs (one token changed)."""
    from hf_attn_swap.pipeline.gguf import reference_logits
    from hf_attn_swap.pipeline.verify import reference

    def run(python, steps, timeout=None):
        made = steps[-2]
        Path(made["outfile"]).write_bytes(b"GGUF fake")
        if fail:
            raise RuntimeError("GGUF driver step evaluate failed: boom")
        ev = steps[-1]
        outputs = reference(
            [{"name": "m", "path": str(tiny), "prompts": ev["prompts"]}], ev["max_new_tokens"]
        )["m"]
        if change_token:
            outputs[0]["tokens"][-1] += 1
        np.save(ev["logits_out"], reference_logits(tiny, ev["text"]).numpy())
        record = {"error": None, "types": {"F32": 3}, "protected": {}, "notes": ["stand-in"]}
        return {"version": "0.0", "steps": [record, {"error": None, "outputs": outputs, "notes": []}]}

    return run


@pytest.mark.parametrize(
    "change_token, require_exact, code", [(False, True, 0), (True, False, 0), (True, True, 1)]
)
def test_job_renames_the_checked_file_and_stores_the_report(
    change_token, require_exact, code, tiny, text_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_ATTN_SWAP_RUNTIMES", str(tmp_path / "runtimes"))
    fake_venv(tmp_path / "runtimes", converter=True)
    monkeypatch.setattr(gguf_job, "run_gguf_driver", stand_in_driver(tiny, change_token))
    out = tmp_path / "out" / "tiny.gguf"
    argv = [
        "gguf",
        str(tiny),
        str(out),
        "--outtype",
        "q8_0",
        "--max-new-tokens",
        "4",
        "--text",
        str(text_file),
    ]
    assert main(argv + (["--require-exact"] if require_exact else [])) == code
    printed = capsys.readouterr().out
    assert out.read_bytes() == b"GGUF fake"  # kept also when --require-exact fails: the file is valid
    report = json.loads(out.with_name("tiny.gguf.json").read_text())
    assert report["exact"] is (not change_token) and report["greedy"]["tokens_equal"] == 3 - change_token
    assert report["greedy"]["first_divergence"][0] == (3 if change_token else None)
    assert report["kl"]["kl_mean"] < 1e-9 and report["kl"]["positions"] == report["text"]["tokens"] - 1
    assert report["command"].startswith("hf-attn-swap gguf ") and "--outtype q8_0" in report["command"]
    assert "| tiny.gguf | q8_0 |" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.gguf", "tiny.gguf.json"]  # no partial file


def test_a_failure_leaves_nothing_behind(tiny, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ATTN_SWAP_RUNTIMES", str(tmp_path / "runtimes"))
    fake_venv(tmp_path / "runtimes", converter=True)
    monkeypatch.setattr(gguf_job, "run_gguf_driver", stand_in_driver(tiny, fail=True))
    out = tmp_path / "out" / "tiny.gguf"
    out.parent.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        main(["gguf", str(tiny), str(out), "--text", str(text_file), "--max-new-tokens", "2"])
    assert not any(out.parent.iterdir())


def test_driver_steps_carry_absolute_paths(tmp_path, monkeypatch):
    """The driver runs in a temporary working directory: a relative folder would not be found there."""
    monkeypatch.chdir(tmp_path)
    steps = gguf_job.gguf_steps(Path("src"), Path("o.gguf"), "q8_0", Path("w"))
    steps.append(gguf_job.evaluate_step(Path("o.gguf"), [], 0, [], Path("logits.npy")))
    paths = [s[k] for s in steps for k in ("model", "outfile", "infile", "gguf", "logits_out") if k in s]
    root = tmp_path.resolve()
    assert len(paths) == 6 and all(Path(p).is_absolute() for p in paths)
    assert {Path(p).parent for p in paths} == {root, root / "w"}


def test_float_types_go_through_the_converter_block_types_through_the_quantiser(tmp_path):
    for outtype in ("f32", "f16", "bf16"):
        (step,) = gguf_job.gguf_steps(tmp_path, tmp_path / "o.gguf", outtype, tmp_path / "w")
        assert (step["op"], step["outtype"], step["protect"]) == ("convert", outtype, True)
    for outtype in ("q8_0", "q4_k_m"):
        convert, quantize = gguf_job.gguf_steps(tmp_path, tmp_path / "o.gguf", outtype, tmp_path / "w", False)
        assert (convert["outtype"], quantize["outtype"], quantize["infile"]) == (
            "f32",
            outtype,
            convert["outfile"],
        )
        assert not convert["protect"] and not quantize["protect"]


def test_kl_stats_is_zero_on_equal_logits_and_kl_otherwise():
    torch.manual_seed(0)
    a, b = torch.randn(6, 11), torch.randn(6, 11)
    ids = [1, 2, 3, 4, 5, 6]
    same = gguf_job.kl_stats(a, a.clone(), ids)
    assert same["kl_mean"] == 0 and same["dlogprob_max"] == 0 and same["top1_agreement"] == 1
    got = gguf_job.kl_stats(a, b, ids)
    la, lb = a[:5].double().log_softmax(-1), b[:5].double().log_softmax(-1)
    assert got["kl_mean"] == pytest.approx((la.exp() * (la - lb)).sum(-1).mean().item())
    assert got["nll"] == pytest.approx(-lb[torch.arange(5), torch.tensor(ids[1:])].mean().item())


def test_protected_names_are_the_kv_a_projection_and_norm():
    assert driver.is_protected("blk.0.attn_kv_a_mqa.weight") and driver.is_protected(
        "blk.29.attn_kv_a_norm.weight"
    )
    for name in (
        "blk.0.attn_kv_b.weight",
        "blk.0.attn_k_b.weight",
        "blk.0.attn_q.weight",
        "token_embd.weight",
    ):
        assert not driver.is_protected(name)


KAPPA = 2.0**-27  # the export's latent scale is ~1e-8


def write_tiny_gguf(path: Path, quantised: bool) -> dict[str, np.ndarray]:
    """A deepseek2-like GGUF with gguf-py: float32, or what a quantiser without the override writes (2-D tensors
    Q8_0, the norm float16). Returns the float32 tensors."""
    import gguf

    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": rng.standard_normal((16, 64), dtype=np.float32),
        "blk.0.attn_kv_a_mqa.weight": (KAPPA * rng.standard_normal((40, 64))).astype(np.float32),
        "blk.0.attn_kv_a_norm.weight": np.full(32, 1e-3 / KAPPA, dtype=np.float32),
        "blk.0.attn_k_b.weight": rng.standard_normal((4, 32, 32), dtype=np.float32),
    }
    writer = gguf.GGUFWriter(str(path), arch="deepseek2")
    writer.add_block_count(1)
    writer.add_q_lora_rank(0)
    writer.add_token_list(["a", "b", "c"])
    writer.add_key_value("deepseek2.rope.freq_base", 1e5, gguf.GGUFValueType.FLOAT32)
    for name, data in tensors.items():
        if not quantised:
            writer.add_tensor(name, data)
        elif data.ndim == 1:
            with np.errstate(over="ignore"):  # the point: float16 cannot hold sqrt(eps)/kappa
                writer.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def read(path: Path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def test_a_quantised_latent_row_underflows_and_restore_puts_float32_back(tmp_path):
    import gguf

    source, quantised = tmp_path / "f32.gguf", tmp_path / "q8_0.gguf"
    tensors = write_tiny_gguf(source, quantised=False)
    write_tiny_gguf(quantised, quantised=True)
    _, before = read(quantised)
    kv_a = before["blk.0.attn_kv_a_mqa.weight"]
    # the docstring's claim: Q8_0's float16 block scale max|w|/127 ~ 1e-10 underflows: the latent rows are zero
    assert not gguf.quants.dequantize(kv_a.data, kv_a.tensor_type).any()
    assert np.isinf(before["blk.0.attn_kv_a_norm.weight"].data).all()  # float16 overflows sqrt(eps)/kappa
    fields_before = read(quantised)[0]

    restored = driver.restore_protected(quantised, source)

    assert sorted(restored) == ["blk.0.attn_kv_a_mqa.weight", "blk.0.attn_kv_a_norm.weight"]
    fields, after = read(quantised)
    assert fields == fields_before  # every metadata key copied (arch, counts, arrays, floats)
    assert driver.tensor_types(quantised) == {
        "token_embd.weight": "Q8_0",
        "blk.0.attn_kv_a_mqa.weight": "F32",
        "blk.0.attn_kv_a_norm.weight": "F32",
        "blk.0.attn_k_b.weight": "Q8_0",
    }
    for name in restored:
        assert np.array_equal(after[name].data, tensors[name])
    for name in ("token_embd.weight", "blk.0.attn_k_b.weight"):
        assert np.array_equal(after[name].data, before[name].data)  # the quantiser's bytes, unchanged
    assert (
        driver.restore_protected(quantised, source) == []
    )  # nothing left to restore: the file is not rewritten
    checked = driver.check_protected(quantised, source, protect=True)
    assert set(checked["protected"].values()) == {"F32"} and checked["types"] == {"Q8_0": 2, "F32": 2}


def test_restore_refuses_a_source_without_float32_copies(tmp_path):
    quantised, other = tmp_path / "q.gguf", tmp_path / "other.gguf"
    write_tiny_gguf(quantised, quantised=True)
    write_tiny_gguf(other, quantised=True)
    with pytest.raises(ValueError, match="no float32 copy"):
        driver.restore_protected(quantised, other)


# --- with llama.cpp (pytest -m runtimes) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mla(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (llama.cpp needs a vocabulary it knows) and its MLA export."""
    from hf_attn_swap.io.examples import example_model_path
    from hf_attn_swap.pipeline.convert import convert_checkpoint
    from hf_attn_swap.testing import tiny_model

    root = tmp_path_factory.mktemp("gguf_runtimes")
    smollm2 = example_model_path("smollm2")
    model = tiny_model(
        "llama", num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256, vocab_size=49152
    )
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    model.save_pretrained(root / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, root / "tiny" / name)
    convert_checkpoint(
        root / "tiny", root / "tiny-mla", "mla", mla={"kv_lora_rank": 32, "qk_rope_head_dim": 32}
    )
    return root / "tiny-mla"


@pytest.mark.runtimes
def test_tiny_mla_export_to_f32_is_exact_and_q8_0_keeps_kv_a_float32(tiny_mla, tmp_path):
    import gguf

    f32, q8 = tmp_path / "tiny-mla-f32.gguf", tmp_path / "tiny-mla-q8_0.gguf"
    assert main(["gguf", str(tiny_mla), str(f32), "--require-exact", "--max-new-tokens", "8"]) == 0
    assert main(["gguf", str(tiny_mla), str(q8), "--outtype", "q8_0", "--max-new-tokens", "8"]) == 0
    exact, quantised = (json.loads(p.with_name(p.name + ".json").read_text()) for p in (f32, q8))
    assert exact["exact"] and exact["greedy"]["max_dlogprob"] <= 1e-3 and exact["kl"]["kl_mean"] <= 1e-6
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q8)).tensors}
    kv_a = {n: k for n, k in kinds.items() if "attn_kv_a" in n}
    assert len(kv_a) == 4 and set(kv_a.values()) == {"F32"}  # 2 layers x (mqa, norm)
    assert quantised["protected_tensors"] == kv_a
    assert kinds["blk.0.attn_k_b.weight"] == "Q8_0" and kinds["token_embd.weight"] == "Q8_0"
    # q8_0 is not exact on random weights, but close: the first greedy token of every prompt, KL per token small
    assert all(d is None or d >= 1 for d in quantised["greedy"]["first_divergence"]), quantised["greedy"]
    assert quantised["kl"]["kl_mean"] <= 0.05, quantised["kl"]

    # without the override (what llama-quantize does by default), the latent is zero: far from transformers
    ids, _ = gguf_job.text_token_ids(tiny_mla, None, quantised["text"]["tokens"], quantised["prompts"])
    work = tmp_path / "unprotected"
    work.mkdir()
    bare = work / "bare-q8_0.gguf"
    steps = gguf_job.gguf_steps(tiny_mla, bare, "q8_0", work, protect=False)
    steps.append(gguf_job.evaluate_step(bare, [], 0, ids, work / "logits.npy"))
    response = gguf_job.run_gguf_driver(gguf_job.llama_cpp_python(), steps)
    assert set(response["steps"][1]["protected"].values()) == {
        "Q8_0",
        "F32",
    }  # the norm is 1-D: never quantised
    reference = gguf_job.reference_logits(tiny_mla, ids)
    bare_kl = gguf_job.kl_stats(reference, torch.from_numpy(np.load(work / "logits.npy")), ids)["kl_mean"]
    assert bare_kl >= 10 * quantised["kl"]["kl_mean"], (bare_kl, quantised["kl"])
