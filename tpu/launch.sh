#!/usr/bin/env bash
# Start an `opd-jax train` run on every worker of a TPU slice, in the background.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu/launch.sh --name NAME --zone ZONE --config CONFIG --run-dir gs://BUCKET/PATH
                     [--allow-local] [--env KEY=VALUE]... [--log-name LOG]
                     [--project PROJECT] [--dry-run] [KEY=VALUE ...]

Runs, on all workers at once (one JAX process per TPU VM host, as multi-host
JAX requires; jax.distributed.initialize() configures itself on TPU VMs):

  cd ~/opd_jax && nohup opd-jax train CONFIG run_dir=RUN_DIR KEY=VALUE... \
      >> ~/opd_jax_logs/LOG.log 2>&1 &

with opd-jax from the ~/opd_jax_venv that tpu/setup.sh made.

  --config CONFIG    config path relative to the repo, e.g.
                     configs/aime24/stage2_opd.yaml
  --run-dir DIR      where checkpoints, metrics and TensorBoard events go. Must
                     be gs://... : every worker writes to it, and it outlives
                     the slice (preemption, deletion).
  --allow-local      accept a non-gs:// run dir (single-host debugging only)
  --env KEY=VALUE    environment variable for the run (repeatable), e.g.
                     --env JAX_TRACEBACK_FILTERING=off
  --log-name LOG     log file name on the workers (default: NAME); the log is
                     appended to, so a resumed run keeps its history
  KEY=VALUE          config overrides passed to `opd-jax train`, e.g.
                     resume=true steps=200 sampling.temperature=0.6

Watch it with tpu/logs.sh. After a preemption re-run with resume=true.
NAME / ZONE / PROJECT default to $OPD_TPU_NAME / $OPD_TPU_ZONE / $OPD_GCP_PROJECT.
EOF
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=""
RUN_DIR=""
ALLOW_LOCAL=0
LOG_NAME=""
ENVS=()
OVERRIDES=()

OPD_VALUE_OPTS="--name --zone --project --config --run-dir --env --log-name"
opd_split_eq "$@"
set -- ${OPD_ARGS[@]+"${OPD_ARGS[@]}"}
while (($#)); do
  opd_parse_common "$@"
  if ((COMMON_SHIFT)); then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --config)
      need_value "$@"
      CONFIG=$2
      shift 2
      ;;
    --run-dir)
      need_value "$@"
      RUN_DIR=$2
      shift 2
      ;;
    --allow-local)
      ALLOW_LOCAL=1
      shift
      ;;
    --env)
      need_value "$@"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants KEY=VALUE, got '$2'"
      ENVS+=("$2")
      shift 2
      ;;
    --log-name)
      need_value "$@"
      LOG_NAME=$2
      shift 2
      ;;
    --)
      shift
      OVERRIDES+=("$@")
      break
      ;;
    -*) usage_error "unknown option: $1" ;;
    *=*)
      OVERRIDES+=("$1")
      shift
      ;;
    *) usage_error "overrides must look like key=value, got '$1'" ;;
  esac
done

require_name_zone
[[ -n $CONFIG ]] || usage_error "--config is required"
[[ -n $RUN_DIR ]] || usage_error "--run-dir is required (gs://BUCKET/PATH)"
if [[ $RUN_DIR != gs://?* ]] && ((!ALLOW_LOCAL)); then
  usage_error "--run-dir must be a gs:// path (got '$RUN_DIR'); every host of the slice" \
    "writes there and it must survive the VM. Pass --allow-local to override."
fi
CONFIG=$(opd_repo_path "$CONFIG") ||
  usage_error "--config must be inside the repo ($OPD_REPO_ROOT) or a gs:// path: the workers run from ~/opd_jax"
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  if [[ $o == run_dir=* ]]; then
    usage_error "set the run directory with --run-dir, not as an override"
  fi
done

log="$OPD_REMOTE_LOG_DIR/$(opd_safe_name "${LOG_NAME:-$NAME}").log"
envs=$(opd_join_inner ${ENVS[@]+"${ENVS[@]}"})
train=$(opd_join_inner opd-jax train "$CONFIG" "run_dir=$RUN_DIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
# stdin from /dev/null and all output to the log so ssh returns at once and
# the job survives the ssh session.
remote="mkdir -p $OPD_REMOTE_LOG_DIR && cd $OPD_REMOTE_DIR && $OPD_REMOTE_PATH"
remote+=" && { ${envs:+$envs }nohup $train >> $log 2>&1 < /dev/null & }"
tpu_ssh "$NAME" all "$remote"

if ((!DRY_RUN)); then
  logs_cmd="tpu/logs.sh --name $(opd_quote "$NAME") --zone $(opd_quote "$ZONE")"
  [[ -z $LOG_NAME ]] || logs_cmd+=" --log-name $(opd_quote "$LOG_NAME")"
  info "Launched. Follow worker 0 with: $logs_cmd"
fi
