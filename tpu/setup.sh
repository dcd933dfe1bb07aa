#!/usr/bin/env bash
# Put opd_jax on every worker of a TPU slice and pip-install it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu/setup.sh --name NAME --zone ZONE [--repo URL [--ref REF] | --scp]
                    [--extras tpu] [--python 3.11] [--project PROJECT] [--dry-run]

Puts the code in ~/opd_jax on all workers (--worker=all) and installs it
there, editable, into the virtualenv ~/opd_jax_venv (`uv pip install -e
'.[EXTRAS]'`). opd_jax needs Python >= 3.11 (its JAX does) while the TPU VM
images ship Python 3.10, so the venv is made with uv (installed with
`pip install --user uv`), which fetches a standalone CPython when needed.

  --repo URL     git URL to clone on the workers (default: this checkout's
                 `origin` remote). Re-running fetches and updates the clone.
  --ref REF      branch, tag or commit to check out (default: the remote's
                 default branch)
  --scp          copy this working tree instead of cloning (for private repos
                 or uncommitted changes): the files git would consider
                 (tracked + untracked-not-ignored) are packed into a tarball,
                 copied with `gcloud compute tpus tpu-vm scp --worker=all`,
                 and unpacked into a fresh ~/opd_jax
  --extras LIST  pip extras to install (default: tpu)
  --python VER   Python version for the venv (default: 3.11); an existing
                 ~/opd_jax_venv is reused as it is
  --dry-run      print the commands instead of running them

NAME / ZONE / PROJECT default to $OPD_TPU_NAME / $OPD_TPU_ZONE / $OPD_GCP_PROJECT.
EOF
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO=""
REF=""
USE_SCP=0
EXTRAS=tpu
PYTHON=3.11

OPD_VALUE_OPTS="--name --zone --project --repo --ref --extras --python"
opd_split_eq "$@"
set -- ${OPD_ARGS[@]+"${OPD_ARGS[@]}"}
while (($#)); do
  opd_parse_common "$@"
  if ((COMMON_SHIFT)); then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --repo)
      need_value "$@"
      REPO=$2
      shift 2
      ;;
    --ref)
      need_value "$@"
      REF=$2
      shift 2
      ;;
    --extras)
      need_value "$@"
      EXTRAS=$2
      shift 2
      ;;
    --python)
      need_value "$@"
      PYTHON=$2
      shift 2
      ;;
    --scp)
      USE_SCP=1
      shift
      ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done

require_name_zone
if ((USE_SCP)) && [[ -n $REPO || -n $REF ]]; then
  usage_error "--scp copies the local tree; it can't be combined with --repo/--ref"
fi

dir=$OPD_REMOTE_DIR
if [[ -n $EXTRAS ]]; then
  pkg=".[$EXTRAS]"
else
  pkg=.
fi
venv=$OPD_REMOTE_VENV
# uv (pip-installed for the user) provides the Python the images lack and
# installs fast; the venv is reused when it already exists.
# shellcheck disable=SC2016  # expanded remotely
install='export PATH="$HOME/.local/bin:$PATH" && python3 -m pip install --user --quiet --upgrade uv'
install+=" && { [ -x $venv/bin/python ] || uv venv --python $(opd_quote_inner "$PYTHON") $venv; }"
install+=" && cd $dir && uv pip install --python $venv/bin/python -e $(opd_quote_inner "$pkg")"

if ((USE_SCP)); then
  tarball="${TMPDIR:-/tmp}/opd_jax-src-$(opd_safe_name "$NAME").tar.gz"
  # The file list comes from git (respects .gitignore: no venvs, runs/, caches).
  # A file deleted with plain `rm` but still in the index makes tar fail:
  # `git rm` it or restore it.
  root=$(opd_quote_inner "$OPD_REPO_ROOT")
  out=$(opd_quote_inner "$tarball")
  if git -C "$OPD_REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    pack="set -o pipefail; cd $root && git ls-files -z --cached --others --exclude-standard | tar -czf $out --null -T -"
  else
    pack="tar -czf $out --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=__pycache__ -C $root ."
  fi
  run bash -c "$pack"
  loc=()
  gcloud_location_flags loc
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:opd_jax-src.tar.gz" "${loc[@]}" --worker=all
  remote="rm -rf $dir && mkdir -p $dir && tar -xzf ~/opd_jax-src.tar.gz -C $dir && rm -f ~/opd_jax-src.tar.gz && $install"
  tpu_ssh "$NAME" all "$remote"
  ((DRY_RUN)) || rm -f "$tarball"
else
  if [[ -z $REPO ]]; then
    REPO=$(git -C "$OPD_REPO_ROOT" remote get-url origin 2>/dev/null) ||
      usage_error "no --repo given and this checkout has no 'origin' remote (or use --scp)"
  fi
  qrepo=$(opd_quote_inner "$REPO")
  # Clone once; later runs update the existing clone.
  get="if [ -d $dir/.git ]; then git -C $dir fetch --tags origin; else git clone $qrepo $dir; fi"
  if [[ -n $REF ]]; then
    qref=$(opd_quote_inner "$REF")
    get+=" && git -C $dir fetch origin $qref && git -C $dir checkout --detach FETCH_HEAD"
  else
    # The remote's default branch (origin/HEAD is set by the clone).
    get+=" && git -C $dir checkout --detach origin/HEAD"
  fi
  tpu_ssh "$NAME" all "$get && $install"
fi
