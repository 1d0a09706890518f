#!/usr/bin/env bash
# Training under torchrun (torch.distributed.elastic). One node:
#
#   NPROC=2 launch/torchrun.sh configs/tiny.yaml
#
# Several nodes: run the same command on every node; the ranks meet at the c10d rendezvous
# MASTER_ADDR:MASTER_PORT (a TCP store hosted by the agent on that host), which assigns node
# ranks itself:
#
#   NNODES=2 NPROC=8 MASTER_ADDR=10.0.0.1 RDZV_ID=job42 launch/torchrun.sh configs/tiny.yaml
#
# With RDZV=static instead, each node gives its NODE_RANK and node 0 hosts the store (the classic
# --master_addr/--master_port/--node_rank form).
#
# Environment:
#   NPROC        ranks per node (default 1)
#   NNODES       nodes (default 1: --standalone, a private rendezvous on a free port)
#   MASTER_ADDR  rendezvous host (required when NNODES > 1)
#   MASTER_PORT  rendezvous port (default 29500)
#   RDZV         c10d (default) | static
#   RDZV_ID      job id shared by all nodes of one job (default megads)
#   NODE_RANK    this node's index (RDZV=static only)
#   TORCHRUN     the torchrun executable (default: torchrun on PATH)
#   DRY_RUN=1    print the command instead of running it
set -euo pipefail

usage() { echo "usage: $0 CONFIG [megads train args...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
config=$1
shift

nproc=${NPROC:-1}
nnodes=${NNODES:-1}
port=${MASTER_PORT:-29500}

cmd=("${TORCHRUN:-torchrun}" --nproc_per_node "$nproc")
if (( nnodes == 1 )); then
    cmd+=(--standalone)
else
    : "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (node 0) when NNODES > 1}"
    case ${RDZV:-c10d} in
        c10d)
            cmd+=(--nnodes "$nnodes" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$port"
                  --rdzv_id "${RDZV_ID:-megads}")
            ;;
        static)
            : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}"
            cmd+=(--nnodes "$nnodes" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
                  --master_port "$port")
            ;;
        *)
            echo "$0: RDZV must be c10d or static, got '$RDZV'" >&2
            exit 2
            ;;
    esac
fi
cmd+=(-m megads train "$config" "$@")

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    echo
else
    exec "${cmd[@]}"
fi
