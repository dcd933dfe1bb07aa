#!/usr/bin/env bash
# Run the runs of a sweep on TPU slices: all on one slice one after another,
# or spread round-robin over several slices.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu/sweep.sh --sweep configs/sweeps/X.yaml --zone ZONE
                    (--sequential --name NAME | --slices NAME1,NAME2,...)
                    [--allow-local] [--env KEY=VALUE]... [--log-prefix P]
                    [--project PROJECT] [--dry-run] [KEY=VALUE ...]

Lists the runs locally with `opd-jax sweep SWEEP --print` (one
`opd-jax train ...` command per line), then starts them on the workers
(--worker=all) of the slices:

  --sequential        all runs on slice NAME, each starting when the previous
                      one has exited (failed or not)
  --slices A,B,C      run i goes to slice i mod 3; runs that share a slice run
                      one after another there. All slices must be in ZONE and
                      already set up with tpu/setup.sh.

Each slice gets one gcloud ssh command that starts a background chain
(`nohup bash -c 'RUN; RUN; ...'`), so nothing depends on this terminal
staying open. Run i logs to ~/opd_jax_logs/P-i.log on each worker
(P defaults to the sweep file's name); read it with
`tpu/logs.sh --name SLICE --zone ZONE --log-name P-i`.

  --allow-local       accept runs whose command has no run_dir=gs://...
                      (the sweep should put every run_dir under gs://)
  --env KEY=VALUE     environment variable for every run (repeatable)
  KEY=VALUE           extra config overrides appended to every run
  --dry-run           print the gcloud commands instead of running them

The listing runs in the repo root with the sweep path made repo-relative, so
the config paths it prints are valid on the workers (they run from ~/opd_jax).

OPD_SWEEP_PRINT_CMD: if set, this shell command is run (with bash -c, in the
repo root, the sweep path as $1) instead of `opd-jax sweep SWEEP --print` to
list the runs; it must print one `opd-jax train ...` command per line. Useful
when opd-jax isn't installed locally, and in tests.

ZONE / PROJECT / NAME default to $OPD_TPU_ZONE / $OPD_GCP_PROJECT / $OPD_TPU_NAME.
EOF
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SWEEP=""
SEQUENTIAL=0
SLICES_ARG=""
ALLOW_LOCAL=0
LOG_PREFIX=""
ENVS=()
OVERRIDES=()

OPD_VALUE_OPTS="--name --zone --project --sweep --slices --env --log-prefix"
opd_split_eq "$@"
set -- ${OPD_ARGS[@]+"${OPD_ARGS[@]}"}
while (($#)); do
  opd_parse_common "$@"
  if ((COMMON_SHIFT)); then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --sweep)
      need_value "$@"
      SWEEP=$2
      shift 2
      ;;
    --sequential)
      SEQUENTIAL=1
      shift
      ;;
    --slices)
      need_value "$@"
      SLICES_ARG=$2
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
    --log-prefix)
      need_value "$@"
      LOG_PREFIX=$2
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

[[ -n $SWEEP ]] || usage_error "--sweep is required"
[[ -n $ZONE ]] || usage_error "--zone is required (or export OPD_TPU_ZONE)"
SLICES=()
if ((SEQUENTIAL)); then
  [[ -z $SLICES_ARG ]] || usage_error "use either --sequential or --slices, not both"
  [[ -n $NAME ]] || usage_error "--sequential needs --name (or export OPD_TPU_NAME)"
  SLICES=("$NAME")
elif [[ -n $SLICES_ARG ]]; then
  IFS=, read -r -a parts <<<"$SLICES_ARG"
  for p in ${parts[@]+"${parts[@]}"}; do
    [[ -z $p ]] || SLICES+=("$p")
  done
  ((${#SLICES[@]})) || usage_error "--slices needs at least one slice name"
else
  usage_error "choose --sequential (one slice, --name) or --slices A,B,..."
fi
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  if [[ $o == run_dir=* ]]; then
    usage_error "run_dir can't be a sweep-wide override: every run needs its own"
  fi
done
if [[ -z $LOG_PREFIX ]]; then
  LOG_PREFIX=$(basename "$SWEEP")
  LOG_PREFIX=${LOG_PREFIX%.*}
fi
LOG_PREFIX=$(opd_safe_name "$LOG_PREFIX")

# The listing runs from the repo root with a repo-relative sweep path, so the
# config paths in the printed commands resolve the same way on the workers
# (which run from ~/opd_jax).
SWEEP=$(opd_repo_path "$SWEEP") ||
  usage_error "--sweep must be inside the repo ($OPD_REPO_ROOT) or a gs:// path"

# --- list the runs (executed even under --dry-run: it only reads the sweep) ---
if [[ -n ${OPD_SWEEP_PRINT_CMD:-} ]]; then
  listing=$(cd "$OPD_REPO_ROOT" && bash -c "$OPD_SWEEP_PRINT_CMD" opd-sweep "$SWEEP") ||
    die "listing the runs failed: OPD_SWEEP_PRINT_CMD=$OPD_SWEEP_PRINT_CMD"
else
  command -v opd-jax >/dev/null 2>&1 ||
    die "opd-jax is not on PATH here; pip install -e . locally, or set OPD_SWEEP_PRINT_CMD"
  listing=$(cd "$OPD_REPO_ROOT" && opd-jax sweep "$SWEEP" --print) ||
    die "opd-jax sweep $SWEEP --print failed"
fi

RUNS=()
while IFS= read -r line || [[ -n $line ]]; do
  line=${line#"${line%%[![:space:]]*}"} # strip leading blanks
  [[ -z $line || $line == \#* ]] && continue
  [[ $line =~ ^opd-jax[[:space:]]+train([[:space:]]|$) ]] ||
    die "expected 'opd-jax train ...' lines from the sweep listing, got: $line"
  if [[ $line != *run_dir=gs://* ]] && ((!ALLOW_LOCAL)); then
    die "run has no run_dir=gs://... (set run_dir under gs:// in the sweep, or --allow-local): $line"
  fi
  RUNS+=("$line")
done <<<"$listing"
((${#RUNS[@]})) || die "the sweep listing has no runs"

envs=$(opd_join_inner ${ENVS[@]+"${ENVS[@]}"})
extra=$(opd_join_inner ${OVERRIDES[@]+"${OVERRIDES[@]}"})
n_slices=${#SLICES[@]}
n_runs=${#RUNS[@]}

for ((s = 0; s < n_slices; s++)); do
  chain=""
  for ((i = s; i < n_runs; i += n_slices)); do
    log="$OPD_REMOTE_LOG_DIR/$LOG_PREFIX-$i.log"
    chain+="${chain:+; }${envs:+$envs }${RUNS[i]}${extra:+ $extra} >> $log 2>&1"
    info "run $i -> slice ${SLICES[s]}, log $log"
  done
  [[ -n $chain ]] || continue
  remote="mkdir -p $OPD_REMOTE_LOG_DIR && cd $OPD_REMOTE_DIR && $OPD_REMOTE_PATH"
  remote+=" && { nohup bash -c $(opd_quote_inner "$chain") > /dev/null 2>&1 < /dev/null & }"
  tpu_ssh "${SLICES[s]}" all "$remote"
done
