#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md and the GPU-only tests, part by part, into one log.
#
#     bash bench/gpu.sh [LOG]                     # LOG defaults to bench-gpu.log; PARTS below
#     PARTS="throughput profile" bash bench/gpu.sh a.log                # about 6 minutes on one H100
#     PARTS="sampling fid small_nets gpu_tests" bash bench/gpu.sh b.log   # about 8 minutes
#     PARTS=all bash bench/gpu.sh                 # every part (about 20 minutes: more than one call)
#     PYTHON=.venv/bin/python SMALL=1 PARTS=all bash bench/gpu.sh /tmp/dry.log   # a dry run (any machine)
#
# Parts: machine (always first), throughput (batch sweep 128/256/512 and the compile modes of the
# 35.7M UNet), profile (one step's kernels by group), sampling (our DDIM, eager and compiled, against
# diffusers' loop on the 35.7M UNet at batch 256 and 1024; one noise draw per source), fid (50k samples, Inception features and
# FID/KID against cached reference statistics, timed), small_nets (the moons MLP step against a plain
# loop at growing batch sizes), gpu_tests (pytest -m gpu), and the first round's unet_throughput, train_overhead,
# train_overhead_cifar, sampler_vs_diffusers, metrics, optimizer_step, demo_all_switches (samplers
# and teleport on its checkpoint follow it). The default is the two sets above, which together
# take more than one 10-minute call: give PARTS per call.
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
parts=${PARTS:-throughput profile sampling fid small_nets gpu_tests}
[ "$parts" = all ] && parts="throughput profile sampling fid small_nets gpu_tests unet_throughput train_overhead
    train_overhead_cifar sampler_vs_diffusers metrics optimizer_step demo_all_switches"
wanted() { case " $(echo $parts) " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

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
    sweep="batch=2,4 steps=1 warmup=1 repeats=1 resolution=8 variants=fp32,bf16"
    modes="batch=2 steps=1 warmup=1 repeats=1 resolution=8 variants=fused"
    profile="batch=2 resolution=8 variant=fused warmup=1 steps=1 top=10"
    sampling="num_samples=4,8 steps=3 repeats=1 compile=false"
    fid="num_samples=64 batch=32 steps=2 compile=false bf16=false feature_batch=32"
    noise="batch=4,8 draws=2 warmup=1 repeats=1"
    small="case=mlp steps=10 warmup=5 repeats=1 workers=0"
else
    unet="batch=128 steps=20 warmup=5 repeats=3 peak_tflops=989 variants=fp32,bf16,channels_last,fused,all,compile"
    overhead="case=mlp,unet steps=200 warmup=20 repeats=2 workers=0,4"
    cifar="case=cifar steps=30 warmup=10 repeats=3 full_row=false data_share=false"
    sampler="num_samples=4096 steps=50 repeats=3"
    optimizer="case=mlp,unet,cifar steps=100 repeats=3"
    sample_count=1000
    metrics="parts=nn,frechet,kernel nn_sizes=10000,20000,50000 nn_dims=3072 fd_dims=2048 kernel_dims=2,64 repeats=3"
    demo="model.compile=true"
    sweep="batch=128,256,512 steps=20 warmup=5 repeats=2 peak_tflops=989 variants=all"
    modes="batch=256 steps=20 warmup=5 repeats=2 peak_tflops=989 variants=all_cudagraphs"
    profile="batch=256 variant=all warmup=5 steps=2 top=20"
    sampling="net=cifar num_samples=256,1024 steps=50 repeats=2 bf16=true compile=false,reduce-overhead"
    fid="num_samples=50000 batch=1024 steps=50 compile=reduce-overhead bf16=true"
    noise="batch=256,1024 draws=10 warmup=2 repeats=5"
    small="case=mlp steps=200 warmup=20 repeats=2 workers=0 batch=128,1024,4096"
fi

part machine 20 "$py" -c "import torch, lightning; print(torch.__version__, torch.version.cuda, lightning.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
# shellcheck disable=SC2086  # the argument strings above are meant to split
if wanted throughput; then
    part throughput_sweep 260 "$py" bench/unet_throughput.py $sweep
    part throughput_cudagraphs 120 "$py" bench/unet_throughput.py $modes
fi
# inductor's cache holds the batch-256 `all` graph from the sweep, so this one compiles in seconds
wanted profile && part profile_step 90 "$py" bench/profile_step.py $profile
if wanted sampling; then
    part sampling_cifar 170 "$py" bench/sampler_vs_diffusers.py $sampling
    part noise_draws 30 "$py" bench/noise_draws.py $noise
fi
wanted fid && part fid_at_scale 240 "$py" bench/fid_at_scale.py $fid
wanted small_nets && part small_nets 60 "$py" bench/train_overhead.py $small
wanted gpu_tests && LD_REQUIRE_GPU=1 part gpu_tests 150 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_paths.py \
    tests/test_gpu.py tests/test_counter_noise.py
wanted unet_throughput && part unet_throughput 190 "$py" bench/unet_throughput.py $unet
wanted train_overhead && part train_overhead 100 "$py" bench/train_overhead.py $overhead
wanted train_overhead_cifar && part train_overhead_cifar 60 "$py" bench/train_overhead.py $cifar
wanted sampler_vs_diffusers && part sampler_vs_diffusers 35 "$py" bench/sampler_vs_diffusers.py $sampler
wanted metrics && part metrics 45 "$py" bench/metrics.py $metrics
wanted optimizer_step && part optimizer_step 40 "$py" bench/optimizer_step.py $optimizer
if wanted demo_all_switches; then
    # The demo with every switch on: bf16 autocast, torch.compile, channels_last, fused AdamW.
    part demo_all_switches 120 "$py" -m lightning_diff.cli.train experiment=digits_ddpm trainer=gpu \
        model.channels_last=true model.optimizer.fused=true logger=csv run_dir="${TMPDIR:-/tmp}/bench-gpu-demo" $demo
    echo "demo metrics: $(cat "${TMPDIR:-/tmp}/bench-gpu-demo/metrics.json" 2>&1)" | tee -a "$log"
    # Every sampler, and teleportation, on the checkpoint the demo part leaves.
    ckpt="${TMPDIR:-/tmp}/bench-gpu-demo/checkpoints/last.ckpt"
    part samplers 90 "$py" bench/samplers.py ckpt="$ckpt" num_samples=$sample_count
    part teleport 60 "$py" bench/teleport.py ckpt="$ckpt" num_samples=$sample_count
fi
