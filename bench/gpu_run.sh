#!/usr/bin/env bash
# The bench suite on an NVIDIA machine with MLX's CUDA backend (no package registry there).
#
#   bench/gpu_run.sh parts DIR        copy carried MLX parts/wheels from DIR into /root/mlxparts
#   bench/gpu_run.sh setup            install MLX (CUDA) + wheels into /root/site, cap MLX memory, fill the JIT cache
#   bench/gpu_run.sh synth SIZE       generate qwen3-next-shaped checkpoints (uniform, and skewed sharing its experts)
#   bench/gpu_run.sh start ARGS...    python -m bench ARGS in the background (its own session), log in /root/bench.log
#   bench/gpu_run.sh wait SECONDS     wait for it (at most SECONDS), copy JSON/markdown/log to $OUT
#
# Every Python process (the daemon's engine, mlx_lm server, bench subprocesses) caps MLX's memory at
# MOED_MLX_MEMORY_LIMIT bytes through sitecustomize.py: MLX's CUDA backend uses managed memory, and
# asking for more than the card has free can hang the GPU. Default: 32% of the card per process, so
# two processes holding a model at once (daemon_bench) stay under 70%.
set -euo pipefail
SITE=/root/site
PARTS=/root/mlxparts
SYNTH=/root/synth
RESULTS=/root/results
export PYTHONPATH="$SITE:$PWD:$PWD/client"
export PYTHONUNBUFFERED=1
export MOED_BENCH_DIR=$SYNTH
card_bytes() { nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{print $1 * 1048576}'; }
export MOED_MLX_MEMORY_LIMIT=${MOED_MLX_MEMORY_LIMIT:-$(card_bytes | awk '{printf "%d", $1 * 0.32}')}

case "${1:-}" in
parts)
    mkdir -p "$PARTS" && cp "$2"/* "$PARTS"/ && ls -la "$PARTS"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    nproc; free -g; df -h /root /tmp
    ;;
setup)
    (cd "$PARTS" && sha256sum -c --ignore-missing SHA256SUMS) || true
    rm -rf "$SITE" && mkdir -p "$SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$PARTS"/*.whl
    cat "$PARTS"/mlxcuda.part.* | (cd "$SITE" && xz -d | tar xf -)
    cat > "$SITE/sitecustomize.py" <<'EOF'
# Cap MLX's memory in every Python process that imports it (set by bench/gpu_run.sh).
import os
import sys

_LIMIT = os.environ.get("MOED_MLX_MEMORY_LIMIT")
if _LIMIT:
    import importlib.abc
    import importlib.machinery

    class _CapMlx(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "mlx.core":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None:
                run = spec.loader.exec_module

                def exec_module(module):
                    run(module)
                    module.set_memory_limit(int(_LIMIT))

                spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _CapMlx())
EOF
    python3 -c 'import mlx.core as mx, mlx_lm; print("mlx", mx.__version__, mx.default_device(), "mlx_lm", mlx_lm.__version__, "limit", mx.set_memory_limit(int(__import__("os").environ["MOED_MLX_MEMORY_LIMIT"])) / 1e9, "GB")'
    # Fill MLX's on-disk PTX cache (/tmp/mlx/<version>/ptx) with the kernels a 4-bit MoE uses, so no timed
    # process pays the first-use NVRTC compile.
    rm -rf "$SYNTH/warm" && mkdir -p "$SYNTH"
    t=$(date +%s)
    python3 -m bench.synth --shape qwen3-next --layers 2 --routing uniform --out "$SYNTH/warm" >/dev/null
    python3 -c "
import mlx_lm
from moed.experts import load_model
m, t = mlx_lm.load('$SYNTH/warm'); print(repr(mlx_lm.generate(m, t, 'hello world', max_tokens=16)))
m, t, man = load_model('$SYNTH/warm', capacity=128); print(repr(mlx_lm.generate(m, t, 'hello world', max_tokens=16))); man.close()
"
    echo "JIT warm-up took $(( $(date +%s) - t )) s"
    ;;
synth)
    size=${2:-32GB}
    python3 -m bench.synth --shape qwen3-next --size "$size" --routing uniform --no-measure --out "$SYNTH/synth-qwen3-next-$size-uniform-stacked" | tail -20
    python3 -m bench.synth --shape qwen3-next --size "$size" --routing skewed --no-measure \
        --variant-of "$SYNTH/synth-qwen3-next-$size-uniform-stacked" --out "$SYNTH/synth-qwen3-next-$size-skewed-stacked" | tail -3
    du -sh "$SYNTH"/*; df -h "$SYNTH"
    ;;
start)
    shift
    mkdir -p "$RESULTS"
    echo "MOED_MLX_MEMORY_LIMIT=$MOED_MLX_MEMORY_LIMIT" > /root/bench.log
    setsid bash -c "$*" >>/root/bench.log 2>&1 < /dev/null &
    sleep 5; tail -5 /root/bench.log
    ;;
wait)
    deadline=$(( $(date +%s) + ${2:-500} ))
    while pgrep -f "python3 -m bench " >/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
    pgrep -f "python3 -m bench " >/dev/null && echo "STILL RUNNING" || echo "DONE"
    mkdir -p "$OUT"
    cp /root/bench.log "$OUT"/ || true
    cp "$RESULTS"/* "$OUT"/ 2>/dev/null || true
    tail -40 /root/bench.log
    ;;
*)
    sed -n 2,13p "$0"; exit 2 ;;
esac
