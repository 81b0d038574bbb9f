#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) the slice, install qkv on every worker, run the same
# `qkv pretrain` on all of them (--worker=all), and start it again after a preemption. Rerunning is
# resuming: the run directory lives in a GCS bucket (mounted with gcsfuse on every worker), so a fresh
# slice picks up the newest complete checkpoint with the same data order.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR_TYPE BUCKET [CONFIG] [section.key=value ...]
#   launch/tpu_vm.sh qkv-8b us-east5-a v5litepod-16 my-bucket llama-8b mesh.fsdp=16 train.batch_size=256
#
# Environment:
#   PROJECT           gcloud project (default: gcloud's configured one)
#   RUNTIME_VERSION   TPU software version (default: v2-alpha-tpuv5-lite; v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   SPOT=1            request spot capacity (cheaper, preemptible)
#   QUEUED=1          create through a queued resource (waits for capacity instead of failing)
#   SLICES=N          N slices of ACCELERATOR_TYPE joined over the data-center network (a queued resource of N
#                     nodes NAME-0..NAME-N-1; implies QUEUED=1); adds mesh.dcn_data=N unless an override sets
#                     mesh.dcn_data or mesh.dcn_fsdp (python -m qkv.launch.multislice prints the same commands)
#   MAX_RESTARTS      how many times a preempted or failed run is started again (default 20)
#   QKV_SOURCE        what to install (default: this checkout, copied as a tarball of HEAD)
#   DELETE_AT_END=1   delete the slice (and queued resource) when training finishes
#
# Exit codes of `qkv pretrain` the loop understands: 0 done; 75 stopped by a signal after a checkpoint
# (preemption notice) -> start again; anything else -> start again up to MAX_RESTARTS (a code bug
# will fail the same way each time, so the limit ends it).
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 4 ]] || usage
NAME=$1 ZONE=$2 ACCELERATOR_TYPE=$3 BUCKET=${4#gs://}
shift 4
CONFIG=${1:-llama-8b}
[[ $# -gt 0 ]] && shift
OVERRIDES=("$@")

RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
SLICES=${SLICES:-1}
if [[ $SLICES -gt 1 ]]; then
  QUEUED=1
  [[ " ${OVERRIDES[*]-} " == *" mesh.dcn_"* ]] || OVERRIDES+=("mesh.dcn_data=$SLICES")
fi
MAX_RESTARTS=${MAX_RESTARTS:-20}
MOUNT=/gcs/${BUCKET}
GCLOUD=(gcloud ${PROJECT:+--project="$PROJECT"})
TPU=("${GCLOUD[@]}" compute tpus tpu-vm)
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[tpu_vm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

slice_state() {
  if [[ $SLICES -gt 1 ]]; then  # the queued resource's state stands for all its slices
    local state
    state=$("${GCLOUD[@]}" compute tpus queued-resources describe "$NAME-qr" --zone="$ZONE" \
              --format='value(state.state)' 2>/dev/null) || { echo MISSING; return; }
    case $state in ACTIVE) echo READY ;; WAITING_FOR_RESOURCES | PROVISIONING) echo CREATING ;; *) echo "$state" ;; esac
    return
  fi
  "${TPU[@]}" describe "$NAME" --zone="$ZONE" --format='value(state)' 2>/dev/null || echo MISSING
}
NODES=("$NAME")
[[ $SLICES -gt 1 ]] && NODES=($(for i in $(seq 0 $((SLICES - 1))); do echo "$NAME-$i"; done))

create_slice() {
  local spot=()
  [[ ${SPOT:-0} == 1 ]] && spot=(--spot)
  if [[ ${QUEUED:-0} == 1 ]]; then
    local nodes=(--node-id="$NAME")
    [[ $SLICES -gt 1 ]] && nodes=(--node-count="$SLICES" --node-prefix="$NAME")
    log "queueing $SLICES x $ACCELERATOR_TYPE as $NAME (queued resource $NAME-qr)"
    "${GCLOUD[@]}" compute tpus queued-resources create "$NAME-qr" "${nodes[@]}" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
    until [[ $("${GCLOUD[@]}" compute tpus queued-resources describe "$NAME-qr" --zone="$ZONE" \
               --format='value(state.state)') == ACTIVE ]]; do
      sleep 60
    done
  else
    log "creating $ACCELERATOR_TYPE as $NAME"
    "${TPU[@]}" create "$NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${spot[@]}"
  fi
}

delete_slice() {
  log "deleting $NAME"
  if [[ ${QUEUED:-0} == 1 ]]; then
    "${GCLOUD[@]}" compute tpus queued-resources delete "$NAME-qr" --zone="$ZONE" --force --quiet || true
  else
    "${TPU[@]}" delete "$NAME" --zone="$ZONE" --quiet || true
  fi
}

ensure_slice() {
  case $(slice_state) in
    READY) ;;
    MISSING) create_slice ;;
    CREATING | STARTING | RESTARTING | REPAIRING) sleep 60; ensure_slice ;;
    *) delete_slice; create_slice ;;  # PREEMPTED, TERMINATED, STOPPED...: a fresh slice, same run dir
  esac
}

on_all() {
  if [[ $SLICES -gt 1 ]]; then
    "${GCLOUD[@]}" compute tpus queued-resources ssh "$NAME-qr" --zone="$ZONE" --node=all --worker=all --command="$1"
  else
    "${TPU[@]}" ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"
  fi
}

install_qkv() {
  local spec=${QKV_SOURCE:-}
  if [[ -z $spec ]]; then
    local tarball
    tarball=$(mktemp -d)/qkv.tar.gz
    git -C "$REPO_ROOT" archive --format=tar.gz --prefix=qkv/ -o "$tarball" HEAD
    for node in "${NODES[@]}"; do
      "${TPU[@]}" scp "$tarball" "$node:~/qkv.tar.gz" --zone="$ZONE" --worker=all
    done
    spec="./qkv[tpu]"
    on_all "rm -rf ~/qkv && tar xzf ~/qkv.tar.gz -C ~"
  fi
  log "installing qkv ($spec) and gcsfuse on every worker"
  on_all "set -e; cd ~; python3 -m venv ~/venv; ~/venv/bin/pip install -q --upgrade pip; ~/venv/bin/pip install -q '$spec'
    if ! command -v gcsfuse >/dev/null; then
      export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
      echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
      curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
      sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    fi
    sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
    mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT"
}

run_training() {
  local args=("$CONFIG" "train.run_dir=$MOUNT/runs/$NAME" "data.data_dir=$MOUNT/tfds" "${OVERRIDES[@]}")
  local quoted
  quoted=$(printf '%q ' "${args[@]}")
  # Every worker runs the same command; JAX finds its peers from the TPU metadata (TPU_WORKER_HOSTNAMES).
  on_all "cd ~ && ~/venv/bin/qkv pretrain $quoted"
}

for attempt in $(seq 0 "$MAX_RESTARTS"); do
  ensure_slice
  install_qkv
  set +e
  run_training
  code=$?
  set -e
  if [[ $code == 0 ]]; then
    log "training finished"
    [[ ${DELETE_AT_END:-0} == 1 ]] && delete_slice
    exit 0
  fi
  log "attempt $attempt ended with code $code (slice state $(slice_state)); starting again, resuming from $MOUNT/runs/$NAME"
  sleep 30
done
log "gave up after $MAX_RESTARTS restarts"
exit 1
