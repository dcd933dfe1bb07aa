#!/usr/bin/env bash
# Show the log of a run started by tpu/launch.sh or tpu/sweep.sh.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: tpu/logs.sh --name NAME --zone ZONE [--worker N] [--log-name LOG]
                   [--lines N] [--no-follow] [--list] [--project PROJECT] [--dry-run]

Tails ~/opd_jax_logs/LOG.log on one worker of the slice (default worker 0,
which is JAX process 0 and logs the metrics). Ctrl-C stops watching, not the run.

  --worker N      worker to read from (0 .. hosts-1)
  --log-name LOG  log name (default: NAME; sweeps use <sweep>-<i>)
  --lines N       lines of history to show first (default 100)
  --no-follow     print and exit instead of following (tail -F)
  --list          list the logs on that worker instead
  --dry-run       print the gcloud command instead of running it

NAME / ZONE / PROJECT default to $OPD_TPU_NAME / $OPD_TPU_ZONE / $OPD_GCP_PROJECT.
USAGE
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
LOG_NAME=""
LINES=100
FOLLOW=1
LIST=0

OPD_VALUE_OPTS="--name --zone --project --worker --log-name --lines"
opd_split_eq "$@"
set -- ${OPD_ARGS[@]+"${OPD_ARGS[@]}"}
while (($#)); do
  opd_parse_common "$@"
  if ((COMMON_SHIFT)); then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --worker)
      need_value "$@"
      [[ $2 =~ ^[0-9]+$ ]] || usage_error "--worker wants a worker index, got '$2'"
      WORKER=$2
      shift 2
      ;;
    --log-name)
      need_value "$@"
      LOG_NAME=$2
      shift 2
      ;;
    --lines)
      need_value "$@"
      [[ $2 =~ ^[0-9]+$ ]] || usage_error "--lines wants a number, got '$2'"
      LINES=$2
      shift 2
      ;;
    --no-follow)
      FOLLOW=0
      shift
      ;;
    --list)
      LIST=1
      shift
      ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done

require_name_zone

if ((LIST)); then
  remote="ls -lt $OPD_REMOTE_LOG_DIR"
else
  log="$OPD_REMOTE_LOG_DIR/$(opd_safe_name "${LOG_NAME:-$NAME}").log"
  if ((FOLLOW)); then
    remote="tail -n $LINES -F $log"
  else
    remote="tail -n $LINES $log"
  fi
fi
tpu_ssh "$NAME" "$WORKER" "$remote"
