#!/bin/sh
# Entrypoint of both images: `vllm-alloc serve $MODEL` on 0.0.0.0:$PORT, then the container's arguments.
#
#   MODEL                   checkpoint folder to serve (required; each image sets a default)
#   PORT                    the server's port (default 8000); the images' health checks poll it, so
#                           with host networking change the port here, not with --port
#   BUDGET_CONFIG           budget file path. Passed as --budget-config when the file exists; when it
#                           does not, a warning, and the server runs the uniform allocation. This is
#                           what lets an image name a budget file that is not shipped yet. A
#                           --budget-config given as a container argument is strict: a missing file
#                           stops start-up.
#   GPU_MEMORY_UTILIZATION  passed as --gpu-memory-utilization when set (on the CPU build: a fraction
#                           of one NUMA node's memory)
# Container arguments come last, so they override these (vLLM and the launcher keep a flag's last value).
set -eu

# vLLM's processes share memory through /dev/shm; Docker gives a container 64 MiB unless told otherwise,
# and vLLM then stops half a minute into start-up ("Insufficient space in /dev/shm"). Say so at once.
shm_free_kib=$(df -Pk /dev/shm 2>/dev/null | { read -r _ && read -r _ _ _ free _ && echo "$free"; } || true)
if [ -n "$shm_free_kib" ] && [ "$shm_free_kib" -lt 262144 ]; then
    echo "entrypoint: warning: /dev/shm has $((shm_free_kib / 1024)) MiB free; vLLM needs more." \
        "Run the container with --shm-size 1g (compose: shm_size: 1gb) or --ipc=host" >&2
fi
if [ -n "${GPU_MEMORY_UTILIZATION:-}" ]; then
    set -- --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION" "$@"
fi
if [ -n "${BUDGET_CONFIG:-}" ]; then
    if [ -f "$BUDGET_CONFIG" ]; then
        set -- --budget-config "$BUDGET_CONFIG" "$@"
    else
        echo "entrypoint: warning: no budget file at BUDGET_CONFIG=$BUDGET_CONFIG;" \
            "serving with the uniform allocation" >&2
    fi
fi
exec vllm-alloc serve "${MODEL:?set MODEL to the checkpoint folder to serve}" \
    --host 0.0.0.0 --port "${PORT:-8000}" "$@"
