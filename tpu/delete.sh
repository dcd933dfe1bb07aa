#!/usr/bin/env bash
# Delete a TPU VM slice, or a queued resource together with its node.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: tpu/delete.sh --name NAME --zone ZONE [--queued] [--async]
                     [--project PROJECT] [--dry-run]

Deletes the slice without asking (gcloud --quiet). Anything only on the VMs
is lost; run dirs on gs:// are not touched.

  --queued    NAME is a queued resource (tpu/create.sh --queued): delete it
              and its node (`queued-resources delete --force`)
  --async     return without waiting for the deletion to finish
  --dry-run   print the gcloud command instead of running it

NAME / ZONE / PROJECT default to $OPD_TPU_NAME / $OPD_TPU_ZONE / $OPD_GCP_PROJECT.
USAGE
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
ASYNC=()

OPD_VALUE_OPTS="--name --zone --project"
opd_split_eq "$@"
set -- ${OPD_ARGS[@]+"${OPD_ARGS[@]}"}
while (($#)); do
  opd_parse_common "$@"
  if ((COMMON_SHIFT)); then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --queued)
      QUEUED=1
      shift
      ;;
    --async)
      ASYNC=(--async)
      shift
      ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done

require_name_zone

loc=()
gcloud_location_flags loc
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$NAME" "${loc[@]}" --force --quiet ${ASYNC[@]+"${ASYNC[@]}"}
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${loc[@]}" --quiet ${ASYNC[@]+"${ASYNC[@]}"}
fi
