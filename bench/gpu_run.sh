#!/usr/bin/env bash
# The bench suite on an NVIDIA machine with MLX's CUDA backend (no package registry there).
#
#   bench/gpu_run.sh parts DIR        copy carried MLX parts/wheels from DIR into /root/moed-bench/parts
#   bench/gpu_run.sh setup            install MLX (CUDA) + wheels into /root/moed-bench/site, cap MLX memory, fill the JIT cache
#   bench/gpu_run.sh synth SIZE [ROUTING...]  generate qwen3-next-shaped checkpoints, one per ROUTING (uniform,
#                                     skewed; default both); skewed shares uniform's experts when both are made
#   bench/gpu_run.sh bench NAME ARGS  python -m bench ARGS --out $OUT/NAME.json, in the foreground (nothing of
#                                     ours runs between calls, when the GPU may be someone else's)
#   bench/gpu_run.sh module NAME MOD ARGS  python -m MOD ARGS --out $OUT/NAME.json (one bench module alone)
#   bench/gpu_run.sh train TOKENS ARGS  training/train_embedded.py on TOKENS (tokens.npz or .npz.xz) into
#                                     $OUT/model, its log beside it (issue 21: the embedded model)
#
# Every Python process (the daemon's engine, mlx_lm server, bench subprocesses) caps MLX's memory at
# MOED_MLX_MEMORY_LIMIT bytes through sitecustomize.py: MLX's CUDA backend uses managed memory, and
# asking for more than the card has free can hang the GPU. Default: the smaller of 32% of the card and
# half of what is free under 70% of it, so two processes holding a model at once (daemon_bench) fit.
set -euo pipefail
ROOT=${MOED_GPU_ROOT:-/root/moed-bench}
SITE=$ROOT/site
PARTS=$ROOT/parts
SYNTH=$ROOT/synth
export PYTHONPATH="$SITE:$PWD:$PWD/client"
export PYTHONUNBUFFERED=1
export MOED_BENCH_DIR=$SYNTH
default_limit() {
    nvidia-smi --query-gpu=memory.total,memory.used --format=csv,noheader,nounits | head -1 |
        awk -F', ' '{t = $1 * 1048576; u = $2 * 1048576; a = 0.32 * t; b = (0.7 * t - u) / 2; printf "%d", (a < b ? a : b)}'
}
export MOED_MLX_MEMORY_LIMIT=${MOED_MLX_MEMORY_LIMIT:-$(default_limit)}
echo "MOED_MLX_MEMORY_LIMIT=$MOED_MLX_MEMORY_LIMIT"

case "${1:-}" in
parts)
    mkdir -p "$PARTS" && cp "$2"/* "$PARTS"/ && ls -la "$PARTS"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    nproc; free -g; df -h /root /tmp; du -sh /root/* 2>/dev/null || true
    # Disk holding the checkpoints: direct-I/O write and read of 2 GB.
    mkdir -p "$SYNTH" && dd if=/dev/zero of="$SYNTH/dd.tmp" bs=8M count=256 oflag=direct 2>&1 | tail -1
    dd if="$SYNTH/dd.tmp" of=/dev/null bs=8M iflag=direct 2>&1 | tail -1; rm -f "$SYNTH/dd.tmp"
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
    # No separate JIT warm-up: MLX keeps compiled kernels on disk (/tmp/mlx/<version>/ptx), the synth step
    # and the routing statistics fill it, and every timed section warms up before its clock starts.
    ;;
synth)
    size=${2:-32GB}
    shift $(( $# < 2 ? $# : 2 ))
    routings=${*:-uniform skewed}
    shape=${MOED_SYNTH_SHAPE:-qwen3-next}
    need=$(python3 -c "from bench.synth import parse_size; print(int(parse_size('$size') * 1.2))")
    mkdir -p "$SYNTH"
    avail=$(df --output=avail -B1 "$SYNTH" | tail -1)
    [ "$avail" -gt "$need" ] || { echo "not enough disk for $size: $avail bytes free, $need needed"; exit 1; }
    base=$SYNTH/synth-$shape-$size-uniform-stacked
    for routing in $routings; do
        case "$routing" in uniform | skewed) ;; *) echo "unknown routing $routing: uniform or skewed"; exit 2 ;; esac
        variant=()
        # another routing of the same experts, hard-linked, when the uniform one is made in this call too
        if [ "$routing" != uniform ] && [[ " $routings " == *" uniform "* ]]; then variant=(--variant-of "$base"); fi
        python3 -m bench.synth --shape "$shape" --size "$size" --routing "$routing" --no-measure "${variant[@]}" \
            --out "$SYNTH/synth-$shape-$size-$routing-stacked" | tail -3
    done
    du -sh "$SYNTH"/*; df -h "$SYNTH"
    ;;
bench)
    name=$2; shift 2
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
    mkdir -p "$OUT"
    set -o pipefail
    python3 -m bench --memory-limit "$MOED_MLX_MEMORY_LIMIT" --out "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^|" | tail -60
    ;;
module)
    name=$2; mod=$3; shift 3
    mkdir -p "$OUT"
    python3 -m "$mod" --out "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log" | tail -40
    ;;
train)
    data=$2; shift 2
    mkdir -p "$OUT/model"
    case "$data" in *.xz) xz -dkc "$data" > "$ROOT/tokens.npz"; data=$ROOT/tokens.npz ;; esac
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
    python3 training/train_embedded.py --data "$data" --out "$OUT/model" "$@" 2>&1 | tee "$OUT/train.log" | tail -40
    ;;
*)
    sed -n 2,18p "$0"; exit 2 ;;
esac
