#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one run: the GPU kernel tests (bf16 included) and the
# LoRA-qkv, inference and training-step benchmarks, each with its CPU-free baseline in the same
# process, then the SAM 2 encoders against ViT-B, the hot-swap rows (compiled included) and the
# service (bench_serve.py: mixed vs per-adapter batching, also where per-adapter batches cannot fill, vs a
# process per request; one slice and one volume alone, hop by hop).
# Made for a lent GPU machine with a short time budget: the most wanted figures come first.
#
#   bash benchmarks/gpu_check.sh prepare   # here, with PyPI: wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh run       # there: writes everything under $OUT (default gpu-results/)
#
# The GPU image has torch and Triton but not segment-anything, nibabel or MedPy; `prepare` puts
# them in .whl/ (ignored by git through .git/info/exclude), which the run installs offline.
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
    mkdir -p .whl .git/info
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
        -d .whl segment-anything==1.0 nibabel
    # MedPy ships only an sdist; its pure-Python wheel builds anywhere.
    python3 -m pip wheel -q --no-deps medpy==0.5.2 -w .whl
    # SAM 2 and what it needs beyond torch (hydra's configs); built without its optional CUDA op.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
        -d .whl hydra-core omegaconf iopath portalocker
    python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl
    SAM2_BUILD_CUDA=0 python3 -m pip wheel -q --no-deps --no-build-isolation sam2==1.1.0 -w .whl
    ls -l .whl
}

run() {
    local out="${OUT:-gpu-results}"
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    fi
    export PYTHONPATH="$PWD:$PWD/benchmarks:${PYTHONPATH:-}"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    } 2>&1 | tee "$out/device.txt"
    # Each step has its own time limit, so that one hang still leaves the others' results.
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_attention.py 2>&1 | tee "$out/gpu_tests.txt"
    timeout 120 python3 benchmarks/bench_lora_qkv.py --device cuda --dtype bfloat16 2>&1 | tee "$out/bench_lora_qkv.txt"
    timeout 120 python3 benchmarks/bench_inference.py --device cuda --dtype bfloat16 --repeats 20 2>&1 | tee "$out/bench_inference.txt"
    timeout 120 python3 benchmarks/bench_train_step.py --device cuda 2>&1 | tee "$out/bench_train_step.txt"
    timeout 120 python3 benchmarks/bench_inference.py --backbones --device cuda --dtype bfloat16 --repeats 10 2>&1 | tee "$out/bench_backbones.txt"
    timeout 240 python3 benchmarks/bench_swap.py --compiled --device cuda 2>&1 | tee "$out/bench_swap.txt"
    # The service (needs ray[serve] and requests in the image): ViT-B-sized random SAM at 512 (not yet run on a GPU;
    # estimated 3-5 minutes): full volumes, 1/4/16 adapters, mixed vs per-adapter; 2-slice requests from 8 clients
    # over 16 adapters, where per-adapter batches cannot fill (issue 30); one volume and one slice alone, hop by hop.
    if python3 -c "import ray.serve, requests, fastapi, prometheus_client" 2>/dev/null; then
        timeout 400 python3 benchmarks/bench_serve.py --backbone vit_b --random-sam-seed 0 --device cuda --image-size 512 \
            --requests 16 --few-slices 2 --few-clients 8 --few-requests 48 --alone-repeats 5 \
            --process-requests 4 --cold-rounds 16 --out "$out/bench_serve.json" 2>&1 | tee "$out/bench_serve.txt"
    else
        echo "bench_serve: skipped, this image lacks ray[serve] (pip install 'samed-adapter[serve]')" | tee "$out/bench_serve.txt"
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
