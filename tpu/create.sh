#!/usr/bin/env bash
# Create a Cloud TPU VM slice (directly, or through a queued resource).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu/create.sh --name NAME --zone ZONE --accelerator-type TYPE
                     [--runtime-version VERSION] [--spot | --reserved] [--queued]
                     [--project PROJECT] [--dry-run] [-- EXTRA_GCLOUD_FLAGS...]

Creates a TPU VM slice with `gcloud compute tpus tpu-vm create`, or with
`--queued` a queued resource (`gcloud compute tpus queued-resources create
NAME --node-id=NAME`) whose single node is named NAME as well, so the other
tpu/*.sh scripts can address it the same way.

  --accelerator-type TYPE   e.g. v5p-64, v4-32, v5litepod-16, v6e-16
  --runtime-version VER     TPU software version; default by generation:
                              v2/v3/v4 -> tpu-ubuntu2204-base
                              v5p      -> v2-alpha-tpuv5
                              v5e      -> v2-alpha-tpuv5-lite (v5litepod-*)
                              v6e      -> v2-alpha-tpuv6e
  --spot                    Spot capacity (cheap, preemptible)
  --reserved                use your project's reservation
  --queued                  go through a queued resource (recommended for
                            large slices and Spot: waits for capacity)
  --project PROJECT         adds --project=PROJECT (default: gcloud config)
  --dry-run                 print the gcloud command instead of running it
  -- FLAGS...               passed verbatim to gcloud, e.g.
                            -- --service-account=SA --valid-until-duration=6h

NAME / ZONE / PROJECT default to $OPD_TPU_NAME / $OPD_TPU_ZONE / $OPD_GCP_PROJECT.
EOF
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

ACCEL=""
RUNTIME=""
CAPACITY=""
QUEUED=0
EXTRA=()

OPD_VALUE_OPTS="--name --zone --project --accelerator-type --runtime-version"
opd_split_eq "$@"
set -- ${OPD_ARGS[@]+"${OPD_ARGS[@]}"}
while (($#)); do
  opd_parse_common "$@"
  if ((COMMON_SHIFT)); then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --accelerator-type)
      need_value "$@"
      ACCEL=$2
      shift 2
      ;;
    --runtime-version)
      need_value "$@"
      RUNTIME=$2
      shift 2
      ;;
    --spot | --reserved)
      if [[ -n $CAPACITY && $CAPACITY != "$1" ]]; then
        usage_error "--spot and --reserved are mutually exclusive"
      fi
      CAPACITY=$1
      shift
      ;;
    --queued)
      QUEUED=1
      shift
      ;;
    --)
      shift
      EXTRA=("$@")
      break
      ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done

require_name_zone
[[ -n $ACCEL ]] || usage_error "--accelerator-type is required (e.g. v5p-64)"
if [[ -z $RUNTIME ]]; then
  RUNTIME=$(default_runtime_version "$ACCEL") ||
    usage_error "no default runtime version for '$ACCEL'; pass --runtime-version"
fi

loc=()
gcloud_location_flags loc
flags=("--accelerator-type=$ACCEL")
if ((QUEUED)); then
  flags+=("--runtime-version=$RUNTIME")
else
  # `tpu-vm create` calls the runtime version --version.
  flags+=("--version=$RUNTIME")
fi
if [[ -n $CAPACITY ]]; then
  flags+=("$CAPACITY")
fi

if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "${loc[@]}" \
    "${flags[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
  if ((!DRY_RUN)); then
    info "Queued. Wait for state ACTIVE before tpu/setup.sh:"
    info "  gcloud compute tpus queued-resources describe $NAME ${loc[*]}"
  fi
else
  run gcloud compute tpus tpu-vm create "$NAME" "${loc[@]}" \
    "${flags[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
fi
