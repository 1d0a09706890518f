#!/usr/bin/env bash
# Training under MPI: mpiexec/mpirun starts the ranks, mpi4py tells each its rank (DeepSpeed's MPI
# discovery), and torch.distributed then rendezvouses on rank 0's first address (`hostname -I`)
# at port $MASTER_PORT (default 29500). MPICH from pip (`pip install mpich`, in the [mpi] extra) works on a laptop:
#
#   NPROC=2 launch/mpirun.sh configs/tiny.yaml              # one machine, 2 ranks
#   NNODES=2 NPROC=8 MPI_HOSTFILE=hosts launch/mpirun.sh configs/tiny.yaml
#
# Environment:
#   NPROC         ranks per node (default 2)
#   NNODES        nodes (default 1); ranks = NNODES x NPROC
#   MPI_HOSTFILE  MPI hostfile for several nodes (MPICH: `host:slots` lines; Open MPI:
#                 `host slots=N` lines)
#   MPIEXEC       the MPI launcher (default: mpiexec next to PYTHON, else mpiexec on PATH)
#   MPI_ARGS      extra launcher arguments, split on spaces (e.g. "-genv GLOO_SOCKET_IFNAME eth0")
#   PYTHON        the Python that runs megads (default: python on PATH)
#   DRY_RUN=1     print the command instead of running it
set -euo pipefail

usage() { echo "usage: $0 CONFIG [megads train args...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
config=$1
shift

python=${PYTHON:-python}
nproc=${NPROC:-2}
nnodes=${NNODES:-1}

mpiexec=${MPIEXEC:-}
if [[ -z $mpiexec ]]; then
    python_path=$(command -v "$python" || true)
    if [[ -n $python_path && -x $(dirname "$python_path")/mpiexec ]]; then
        mpiexec=$(dirname "$python_path")/mpiexec  # the virtualenv's own (pip mpich)
    elif command -v mpiexec >/dev/null; then
        mpiexec=mpiexec
    else
        echo "$0: no mpiexec found (pip install mpich, or set MPIEXEC)" >&2
        exit 2
    fi
fi

cmd=("$mpiexec" -n "$((nnodes * nproc))")
if [[ -n ${MPI_HOSTFILE:-} ]]; then
    # the two families spell hostfile and ranks-per-node differently
    if "$mpiexec" --version 2>&1 | grep -qi "open mpi\|open-rte\|openrte"; then
        cmd+=(--hostfile "$MPI_HOSTFILE" --npernode "$nproc")
    else
        cmd+=(-f "$MPI_HOSTFILE" -ppn "$nproc")
    fi
fi
if [[ -n ${MPI_ARGS:-} ]]; then
    read -r -a extra <<<"$MPI_ARGS"
    cmd+=("${extra[@]}")
fi
cmd+=("$python" -m megads train "$config" "$@")

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    echo
else
    exec "${cmd[@]}"
fi
