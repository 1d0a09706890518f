#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher and a hostfile: run once, on node 0; the
# launcher starts the ranks on every host of the hostfile through pdsh (passwordless ssh).
#
#   HOSTFILE=launch/hostfile.example launch/deepspeed_hostfile.sh configs/tiny.yaml [--set k=v ...]
#
# Environment:
#   HOSTFILE     hostfile (default /job/hostfile, DeepSpeed's own default)
#   NNODES       use the first NNODES hosts of the hostfile (default: all)
#   NPROC        ranks per node (default: the hostfile's slots)
#   MASTER_ADDR  address of node 0 as the other nodes reach it (default: DeepSpeed asks the first
#                host for `hostname -I` over ssh)
#   MASTER_PORT  rendezvous port on node 0 (default 29500)
#   DS_LAUNCHER  multi-node backend: pdsh (default), openmpi, mpich, impi, mvapich, slurm
#   DS_ARGS      extra launcher flags, split on spaces (e.g. "--ssh_port 2222 --no_ssh_check")
#   DEEPSPEED    the deepspeed executable (default: deepspeed on PATH)
#   DRY_RUN=1    print the command instead of running it
# Variables the ranks need on the other nodes (GLOO_SOCKET_IFNAME, MEGADS_LOG, ...) go in
# ./.deepspeed_env or ~/.deepspeed_env as NAME=value lines; NCCL_*, PYTHON* and UCX_* are
# forwarded automatically.
set -euo pipefail

usage() { echo "usage: $0 CONFIG [megads train args...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
config=$1
shift

hostfile=${HOSTFILE:-/job/hostfile}
if [[ ! -f $hostfile ]]; then
    echo "$0: hostfile '$hostfile' not found (set HOSTFILE; see launch/hostfile.example)" >&2
    exit 2
fi

cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --launcher "${DS_LAUNCHER:-pdsh}"
     --master_port "${MASTER_PORT:-29500}")
[[ -n ${MASTER_ADDR:-} ]] && cmd+=(--master_addr "$MASTER_ADDR")
[[ -n ${NNODES:-} ]] && cmd+=(--num_nodes "$NNODES")
[[ -n ${NPROC:-} ]] && cmd+=(--num_gpus "$NPROC")
if [[ -n ${DS_ARGS:-} ]]; then
    read -r -a extra <<<"$DS_ARGS"
    cmd+=("${extra[@]}")
fi
cmd+=(--no_local_rank --module megads train "$config" "$@")

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    echo
else
    exec "${cmd[@]}"
fi
