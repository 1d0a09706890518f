#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher and no ssh: run this once on every node, each
# with its own NODE_RANK (0 .. NNODES-1); node 0 hosts the rendezvous at MASTER_ADDR:MASTER_PORT.
#
#   # node 0                                   # node 1
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 \   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 \
#     launch/deepspeed_no_ssh.sh configs/tiny.yaml   launch/deepspeed_no_ssh.sh configs/tiny.yaml
#
# Environment:
#   NNODES       number of nodes (default 1)
#   NODE_RANK    this node's index (required when NNODES > 1)
#   MASTER_ADDR  address of node 0 as every node reaches it (required when NNODES > 1)
#   MASTER_PORT  rendezvous port on node 0 (default 29500)
#   NPROC        ranks per node (default: the GPUs of this node; give it on CPU-only nodes)
#   HOSTFILE     optional hostfile; without one a placeholder hostfile of NNODES x NPROC slots is
#                written (only the slot counts matter without ssh)
#   DEEPSPEED    the deepspeed executable (default: deepspeed on PATH)
#   DRY_RUN=1    print the command instead of running it
set -euo pipefail

usage() { echo "usage: $0 CONFIG [megads train args...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
config=$1
shift

nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
if (( nnodes > 1 )); then
    : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}"
    : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
fi
if (( node_rank < 0 || node_rank >= nnodes )); then
    echo "$0: NODE_RANK=$node_rank is outside 0..$((nnodes - 1))" >&2
    exit 2
fi

cmd=("${DEEPSPEED:-deepspeed}")
if (( nnodes > 1 )); then
    hostfile=${HOSTFILE:-}
    if [[ -z $hostfile ]]; then
        : "${NPROC:?set NPROC (ranks per node) or HOSTFILE}"
        hostfile=$(mktemp "${TMPDIR:-/tmp}/megads-hostfile.XXXXXX")
        trap 'rm -f "$hostfile"' EXIT
        for ((n = 0; n < nnodes; n++)); do
            echo "node$n slots=$NPROC"
        done >"$hostfile"
    fi
    cmd+=(--hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --num_nodes "$nnodes"
          --master_addr "$MASTER_ADDR")
fi
cmd+=(--master_port "${MASTER_PORT:-29500}")
[[ -n ${NPROC:-} ]] && cmd+=(--num_gpus "$NPROC")
cmd+=(--no_local_rank --module megads train "$config" "$@")

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    echo
else
    # not exec: the EXIT trap removes the generated hostfile
    "${cmd[@]}"
fi
