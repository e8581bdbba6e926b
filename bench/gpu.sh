#!/usr/bin/env bash
# Every GPU row of bench/RESULTS.md, and the GPU-only tests, in one run: about 12 minutes on one H100.
#
#     bash bench/gpu.sh [LOG]            # LOG defaults to bench-gpu.log
#     PYTHON=.venv/bin/python SMALL=1 bash bench/gpu.sh /tmp/dry.log   # a quick dry run (any machine)
#
# Needs torch with CUDA, lightning, hydra-core and diffusers importable by $PYTHON (default python3).
# Each part runs under its own time limit, so one that fails or overruns leaves the others' rows;
# every part's output (Markdown tables, then its exit status) is appended to LOG and printed.
set -u
log=${1:-bench-gpu.log}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
case $log in /*) ;; *) log="$OLDPWD/$log" ;; esac
: >"$log"

part() { # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    local start=$SECONDS
    # Progress bars (carriage returns) and warnings are left out of the log.
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v -E "it/s|Warning|warn\(|^\s*$" | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

if [ "${SMALL:-0}" = 1 ]; then
    unet="batch=2 steps=1 warmup=1 repeats=1 variants=fp32,fused"
    overhead="case=mlp steps=10 warmup=5 repeats=1 workers=0"
    cifar="case=cifar steps=1 warmup=1 repeats=1 full_row=false data_share=false batch=2"
    sampler="num_samples=16 steps=5 repeats=1"
    optimizer="case=mlp steps=5 repeats=1"
    sample_count=16
    metrics="parts=nn,frechet,kernel nn_sizes=500,1000 nn_dims=64 fd_samples=500 fd_dims=64 kernel_sizes=200,400 kernel_dims=2 repeats=1"
    demo="trainer.max_steps=20 trainer.val_check_interval=10 callbacks.sample_grid.every_n_steps=10
          callbacks.evaluation.num_samples=64 trainer.accelerator=auto trainer.precision=32-true model.compile=false"
else
    unet="batch=128 steps=20 warmup=5 repeats=3 peak_tflops=989 variants=fp32,bf16,channels_last,fused,all,compile"
    overhead="case=mlp,unet steps=200 warmup=20 repeats=2 workers=0,4"
    cifar="case=cifar steps=30 warmup=10 repeats=3 full_row=false data_share=false"
    sampler="num_samples=4096 steps=50 repeats=3"
    optimizer="case=mlp,unet,cifar steps=100 repeats=3"
    sample_count=1000
    metrics="parts=nn,frechet,kernel nn_sizes=10000,20000,50000 nn_dims=3072 fd_dims=2048 kernel_dims=2,64 repeats=3"
    demo="model.compile=true"
fi

part machine 20 "$py" -c "import torch, lightning; print(torch.__version__, torch.version.cuda, lightning.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
# shellcheck disable=SC2086  # the argument strings above are meant to split
part unet_throughput 190 "$py" bench/unet_throughput.py $unet
part train_overhead 100 "$py" bench/train_overhead.py $overhead
part train_overhead_cifar 60 "$py" bench/train_overhead.py $cifar
part sampler_vs_diffusers 35 "$py" bench/sampler_vs_diffusers.py $sampler
part metrics 45 "$py" bench/metrics.py $metrics
part optimizer_step 40 "$py" bench/optimizer_step.py $optimizer
part gpu_tests 90 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_paths.py tests/test_gpu.py
# The demo with every switch on: bf16 autocast, torch.compile, channels_last, fused AdamW.
part demo_all_switches 120 "$py" -m lightning_diff.cli.train experiment=digits_ddpm trainer=gpu \
    model.channels_last=true model.optimizer.fused=true logger=csv run_dir="${TMPDIR:-/tmp}/bench-gpu-demo" $demo
echo "demo metrics: $(cat "${TMPDIR:-/tmp}/bench-gpu-demo/metrics.json" 2>&1)" | tee -a "$log"
# Every sampler, and teleportation, on the checkpoint the demo part leaves.
ckpt="${TMPDIR:-/tmp}/bench-gpu-demo/checkpoints/last.ckpt"
part samplers 90 "$py" bench/samplers.py ckpt="$ckpt" num_samples=$sample_count
part teleport 60 "$py" bench/teleport.py ckpt="$ckpt" num_samples=$sample_count
