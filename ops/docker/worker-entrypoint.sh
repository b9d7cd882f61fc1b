#!/bin/bash
# Entry point of the worker image: `imageqa "$@"`, and for `imageqa worker` first GPUs of its own: as
# many as its engine's tensor-parallel size (IMAGEQA_TENSOR_PARALLEL_SIZE, GPUS_PER_WORKER in .env).
#
# Docker cannot give each replica of a scaled service different GPUs: a device reservation of
# `count: N` hands every container the first N GPUs of the host (NVIDIA_VISIBLE_DEVICES=0..N-1). So
# every replica sees all GPUs, and claims its own here: the first free group of GPUs whose lock files
# in IMAGEQA_GPU_LOCK_DIR (a volume shared by the replicas on this host) it can flock. The locks are held
# by the worker process itself (their descriptors survive the exec) and the kernel drops them when
# the process ends, however it ends, so a restarted replica finds its GPUs free again.
set -eu

if [ "${1:-}" = worker ] && [ -n "${IMAGEQA_GPU_LOCK_DIR:-}" ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    need="${IMAGEQA_TENSOR_PARALLEL_SIZE:-1}"
    case "$need" in
        '' | *[!0-9]* | 0)
            echo "imageqa worker: IMAGEQA_TENSOR_PARALLEL_SIZE (GPUS_PER_WORKER) must be a whole number of GPUs, not '$need'" >&2
            exit 1
            ;;
    esac
    if ! gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader)" || [ -z "$gpus" ]; then
        echo "imageqa worker: nvidia-smi lists no GPU; is the NVIDIA container toolkit installed?" >&2
        exit 1
    fi
    # In aligned groups of $need (GPUs 0-1, 2-3, ... for two): whoever locks a group's first GPU owns
    # the group, so replicas starting together split the GPUs instead of each taking a few.
    read -r -a list <<< "$(echo $gpus)"
    claimed=""
    for ((start = 0; start + need <= ${#list[@]}; start += need)); do
        group=("${list[@]:start:need}")
        locks=()
        for gpu in "${group[@]}"; do
            exec {lock}>"$IMAGEQA_GPU_LOCK_DIR/gpu$gpu.lock"
            if ! flock --nonblock "$lock"; then
                exec {lock}>&-
                break
            fi
            locks+=("$lock")
        done
        if [ "${#locks[@]}" -eq "$need" ]; then
            claimed="$(IFS=,; echo "${group[*]}")"
            break
        fi
        for lock in "${locks[@]}"; do exec {lock}>&-; done  # a partly taken group: let it go
    done
    all="$(echo $gpus | tr ' ' ',')"
    if [ -z "$claimed" ]; then
        if [ "$need" -eq 1 ]; then
            echo "imageqa worker: every GPU of this host ($all) already has a worker;" \
                "scale the worker service to at most one replica per GPU" >&2
        else
            echo "imageqa worker: needs $need GPUs (GPUS_PER_WORKER) but no group of $need of this host's" \
                "GPUs ($all) is free; run at most (GPUs / GPUS_PER_WORKER) worker replicas" >&2
        fi
        exit 1
    fi
    # nvidia-smi numbers GPUs in PCI bus order; make CUDA number them the same way.
    export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES="$claimed"
    echo "imageqa worker: using GPU $claimed" >&2
    exec imageqa "$@"
fi
exec imageqa "$@"
