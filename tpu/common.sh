# shellcheck shell=bash
# shellcheck disable=SC2034  # globals here are read by the scripts sourcing this
# Shared helpers for the tpu/*.sh scripts. Source it, don't run it.
#
# Every script:
#   * defines `usage` (prints its usage text to stdout) before sourcing this file,
#   * calls `opd_parse_common "$@"` on each argument in its option loop,
#   * runs every external command through `run`, which prints the command
#     (shell-quoted, one per line, nothing else on stdout) under --dry-run
#     and executes it otherwise.
#
# Kept compatible with bash 3.2 (macOS's /bin/bash): no mapfile, no
# associative arrays, empty arrays expanded with ${a[@]+"${a[@]}"}.

# A set CDPATH makes `cd` print the directory, which would end up in $(cd ... && pwd).
unset CDPATH

# Defaults may come from the environment so a session can `export` them once.
NAME=${OPD_TPU_NAME:-}
ZONE=${OPD_TPU_ZONE:-}
PROJECT=${OPD_GCP_PROJECT:-}
DRY_RUN=0
COMMON_SHIFT=0

# Where the code lives on every TPU VM worker, and where job logs go.
# Both are expanded by the remote shell (home directory of the ssh user).
# shellcheck disable=SC2088
OPD_REMOTE_DIR='~/opd_jax'
# shellcheck disable=SC2088
OPD_REMOTE_LOG_DIR='~/opd_jax_logs'
# The virtualenv tpu/setup.sh creates on each worker (outside the code dir, so
# re-copying the code keeps it). opd_jax needs Python >= 3.11 (JAX does) and
# the TPU VM images ship Ubuntu 22.04's 3.10, so setup.sh makes it with uv.
# shellcheck disable=SC2088
OPD_REMOTE_VENV='~/opd_jax_venv'
# shellcheck disable=SC2016  # expanded remotely, on purpose
OPD_REMOTE_PATH='export PATH="$HOME/opd_jax_venv/bin:$PATH"'

OPD_TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OPD_REPO_ROOT=$(cd "$OPD_TPU_DIR/.." && pwd)

die() {
  echo "error: $*" >&2
  exit 1
}

# Wrong invocation: message + usage on stderr, exit 2.
usage_error() {
  echo "error: $*" >&2
  usage >&2
  exit 2
}

info() {
  echo "$*" >&2
}

# opd_quote STRING -> STRING quoted for a POSIX shell, the same way Python's
# shlex.quote does it (left bare when it only has safe characters).
opd_quote() {
  local s=$1 q="'\"'\"'"
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# opd_quote_inner STRING -> like opd_quote but prefers double quotes when that
# needs no escaping. For words inside a command string that will itself be
# single-quoted (ssh --command=...), so the printed line stays readable.
opd_quote_inner() {
  local s=$1 special='[$`\"!]'
  if [[ -z $s ]]; then
    printf '""'
  elif [[ ! $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ && ! $s =~ $special ]]; then
    printf '"%s"' "$s"
  else
    opd_quote "$s"
  fi
}

# Like opd_quote, but keeps a leading `--flag=` or `key=` outside the quotes
# (`--command='ls -l'`, `data.name='a b'`) so printed commands stay readable.
# The shell reads both spellings as the same single word.
# OPD_QUOTE_FN picks opd_quote (default) or opd_quote_inner for the value.
opd_quote_arg() {
  local s=$1 fn=${OPD_QUOTE_FN:-opd_quote}
  if [[ $s =~ ^(--[A-Za-z0-9][A-Za-z0-9-]*=|[A-Za-z_][A-Za-z0-9_.-]*=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    "$fn" "${BASH_REMATCH[2]}"
  else
    "$fn" "$s"
  fi
}

# opd_join ARG... -> the args quoted and joined by single spaces.
opd_join() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(opd_quote_arg "$a")"
  done
  printf '%s' "$out"
}

# opd_join_inner ARG... -> opd_join for words of a command string that will be
# quoted again (see opd_quote_inner).
opd_join_inner() {
  OPD_QUOTE_FN=opd_quote_inner opd_join "$@"
}

# run CMD ARG...: print (dry run) or execute (echoing the command to stderr).
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(opd_join "$@")"
  else
    info "+ $(opd_join "$@")"
    "$@"
  fi
}

# Requires "$2" to exist as the value of option "$1".
need_value() {
  if (($# < 2)) || [[ $2 == --* ]]; then
    usage_error "$1 needs a value"
  fi
}

# opd_parse_common "$@": handles the options every script shares. Sets
# COMMON_SHIFT to how many arguments it consumed (0 = not a common option).
opd_parse_common() {
  COMMON_SHIFT=0
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run)
      DRY_RUN=1
      COMMON_SHIFT=1
      ;;
    --name | --zone | --project)
      need_value "$@"
      case $1 in
        --name) NAME=$2 ;;
        --zone) ZONE=$2 ;;
        --project) PROJECT=$2 ;;
      esac
      COMMON_SHIFT=2
      ;;
    --name=* | --zone=* | --project=*)
      case $1 in
        --name=*) NAME=${1#*=} ;;
        --zone=*) ZONE=${1#*=} ;;
        --project=*) PROJECT=${1#*=} ;;
      esac
      COMMON_SHIFT=1
      ;;
  esac
  return 0
}

# opd_split_eq ARGS... -> OPD_ARGS with `--opt=value` split into `--opt value`
# for the options listed in OPD_VALUE_OPTS (space separated). Stops at `--`.
opd_split_eq() {
  OPD_ARGS=()
  local a seen_dashdash=0 opt
  for a in "$@"; do
    if ((seen_dashdash)) || [[ $a != --*=* ]]; then
      [[ $a == -- ]] && seen_dashdash=1
      OPD_ARGS+=("$a")
      continue
    fi
    opt=${a%%=*}
    if [[ " ${OPD_VALUE_OPTS:-} " == *" $opt "* ]]; then
      OPD_ARGS+=("$opt" "${a#*=}")
    else
      OPD_ARGS+=("$a")
    fi
  done
}

require_name_zone() {
  [[ -n $NAME ]] || usage_error "--name is required (or export OPD_TPU_NAME)"
  [[ -n $ZONE ]] || usage_error "--zone is required (or export OPD_TPU_ZONE)"
}

# `--zone=Z [--project=P]`, as one word each, into the named array (bash 3.2
# has no namerefs, so the caller passes the array name).
gcloud_location_flags() {
  eval "$1=(\"--zone=\$ZONE\")"
  if [[ -n $PROJECT ]]; then
    eval "$1+=(\"--project=\$PROJECT\")"
  fi
}

# tpu_ssh TPU WORKER REMOTE_COMMAND: run a shell command on TPU VM worker(s).
tpu_ssh() {
  local loc=()
  gcloud_location_flags loc
  run gcloud compute tpus tpu-vm ssh "$1" "${loc[@]}" "--worker=$2" "--command=$3"
}

# opd_repo_path PATH -> PATH as the workers must see it: relative to the repo
# root (the workers run from ~/opd_jax). gs:// and other URLs pass through;
# a local path whose directory isn't here is kept as given. Fails (status 1)
# for a local path outside the repo.
opd_repo_path() {
  local p=$1 dir abs
  if [[ $p == *://* ]]; then
    printf '%s' "$p"
    return 0
  fi
  dir=$(dirname "$p")
  if ! abs=$(cd "$dir" 2>/dev/null && pwd -P); then
    printf '%s' "$p"
    return 0
  fi
  abs="$abs/$(basename "$p")"
  case $abs in
    "$(cd "$OPD_REPO_ROOT" && pwd -P)"/*)
      printf '%s' "${abs#"$(cd "$OPD_REPO_ROOT" && pwd -P)"/}"
      ;;
    *) return 1 ;;
  esac
}

# Name usable as a log file name on the workers.
opd_safe_name() {
  local s=$1
  s=${s//[^A-Za-z0-9_.-]/_}
  printf '%s' "$s"
}
