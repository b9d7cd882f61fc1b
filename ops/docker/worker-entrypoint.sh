#!/bin/sh
# Entry point of the worker image: `imageqa "$@"`, and for `imageqa worker` first one GPU of its own.
#
# Docker cannot give each replica of a scaled service a different GPU: a device reservation of
# `count: N` hands every container the first N GPUs of the host (NVIDIA_VISIBLE_DEVICES=0..N-1). So
# every replica sees all GPUs, and claims one here: the first GPU whose lock file in
# IMAGEQA_GPU_LOCK_DIR (a volume shared by the replicas on this host) it can flock. The lock is held
# by the worker process itself (fd 9 survives the exec) and the kernel drops it when the process
# ends, however it ends, so a restarted replica finds its GPU free again.
set -eu

if [ "${1:-}" = worker ] && [ -n "${IMAGEQA_GPU_LOCK_DIR:-}" ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    if ! gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader)" || [ -z "$gpus" ]; then
        echo "imageqa worker: nvidia-smi lists no GPU; is the NVIDIA container toolkit installed?" >&2
        exit 1
    fi
    for gpu in $gpus; do
        exec 9>"$IMAGEQA_GPU_LOCK_DIR/gpu$gpu.lock"
        if flock --nonblock 9; then
            # nvidia-smi numbers GPUs in PCI bus order; make CUDA number them the same way.
            export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES="$gpu"
            echo "imageqa worker: using GPU $gpu" >&2
            exec imageqa "$@"
        fi
    done
    echo "imageqa worker: every GPU of this host ($(echo $gpus | tr ' ' ',')) already has a worker;" \
        "scale the worker service to at most one replica per GPU" >&2
    exit 1
fi
exec imageqa "$@"
