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
  # llama-cpp-python builds from source here (several minutes the first time)
  .venv-oracle/bin/pip install -q -r scripts/oracle/requirements.txt
  PY="$ROOT/.venv-oracle/bin/python"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
