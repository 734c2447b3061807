#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create the TPU VM, install ait-jax on every worker,
# and run the same command on all of them (JAX finds the other hosts itself).
#
#   launch/tpu_pod.sh create   NAME ZONE ACCELERATOR     # e.g. my-pod us-central2-b v4-32
#   launch/tpu_pod.sh install  NAME ZONE [GIT_URL]       # clone/copy + pip install -e .
#   launch/tpu_pod.sh train    NAME ZONE CONFIG WORKDIR [--config.a.b=value ...]
#   launch/tpu_pod.sh delete   NAME ZONE
#
# WORKDIR must be shared by all workers (a gs:// bucket path or a mounted file system):
# orbax writes one checkpoint from all hosts, and the data shards are read per host.
# Data paths in the config (tasks.*.source.root) must exist on every worker.
set -euo pipefail

cmd=${1:?usage: $0 create|install|train|delete NAME ZONE ...}
name=${2:?TPU name}
zone=${3:?zone}
shift 3

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

case "$cmd" in
  create)
    accelerator=${1:?accelerator type, e.g. v4-32}
    version=${TPU_VERSION:-tpu-ubuntu2204-base}
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" \
      --accelerator-type "$accelerator" --version "$version"
    ;;
  install)
    repo=${1:-}
    if [ -n "$repo" ]; then
      ssh_all "rm -rf ait-jax && git clone $repo ait-jax"
    else
      # Copy this checkout (without its virtual environment) to every worker.
      here=$(cd "$(dirname "$0")/.." && pwd)
      tar -C "$here" --exclude=.venv --exclude=.git -czf /tmp/ait-jax.tgz .
      gcloud compute tpus tpu-vm scp /tmp/ait-jax.tgz "$name":~/ --zone "$zone" --worker=all
      ssh_all "rm -rf ait-jax && mkdir ait-jax && tar -C ait-jax -xzf ait-jax.tgz"
    fi
    ssh_all "cd ait-jax && python3 -m venv .venv && . .venv/bin/activate && \
      pip install -q --upgrade pip && pip install -q -e . 'jax[tpu]'"
    ;;
  train)
    config=${1:?config file}
    workdir=${2:?workdir}
    shift 2
    # Every worker runs the same command; AIT_DISTRIBUTED=auto makes each call
    # jax.distributed.initialize(), which reads the pod's topology.
    ssh_all "cd ait-jax && . .venv/bin/activate && AIT_DISTRIBUTED=auto \
      python -m ait_jax.main --config $config --workdir $workdir $* \
      2>&1 | tee -a ~/ait-jax-train.log"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
    ;;
  *)
    echo "unknown command $cmd (create|install|train|delete)" >&2
    exit 2
    ;;
esac
