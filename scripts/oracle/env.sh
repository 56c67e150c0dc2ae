# Sourced by scripts/gen-fixtures and scripts/bench-llamacpp: sets $PY to a Python with the
# oracle requirements (ORACLE_PY overrides; else .venv-oracle at the repo root is created)
# and makes sure the model file is present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] || scripts/fetch-model
if [ -n "${ORACLE_PY:-}" ]; then
  PY="$ORACLE_PY"
else
  [ -x .venv-oracle/bin/python ] || python3 -m venv .venv-oracle
  # llama-cpp-python builds from source here (several minutes the first time). Not with
  # GGML_NATIVE: a VM's /proc/cpuinfo can list AMX that the kernel does not let a process use
  # (the native build then dies with SIGILL in libggml-cpu), so each x86 extension the CPU
  # lists is switched on by name, AMX left out.
  if [ -z "${CMAKE_ARGS:-}" ]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
    flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI \
        avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
      case "$flags" in
        *" ${pair%%:*} "*) CMAKE_ARGS="$CMAKE_ARGS -DGGML_${pair##*:}=ON" ;;
        *) CMAKE_ARGS="$CMAKE_ARGS -DGGML_${pair##*:}=OFF" ;;
      esac
    done
    export CMAKE_ARGS="$CMAKE_ARGS -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  fi
  .venv-oracle/bin/pip install -q -r scripts/oracle/requirements.txt
  PY="$ROOT/.venv-oracle/bin/python"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
