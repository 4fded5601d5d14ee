# Environment shared by the project's commands (sourced): quiet, local-only Ray and DeepSpeed on CPU, a stable
# cache for DeepSpeed's JIT-built extensions, offline wandb unless the user configured it.
root=${root:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}
export WANDB_MODE=${WANDB_MODE:-offline}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
