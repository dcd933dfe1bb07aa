"""Model and tokenizer locations: a local directory, a `gs://` path, or a Hugging Face Hub id.

`resolve("Qwen/Qwen3-8B-Base")` returns a local snapshot directory through `huggingface_hub.snapshot_download`,
fetching only the files opd_jax reads (safetensors and their index, config.json, the tokenizer files, the
generation config). It honours the Hub's own settings: `HF_HOME` / `HF_HUB_CACHE` for where the cache lives,
`HF_HUB_OFFLINE=1` to use only what is cached, `HF_TOKEN` for gated models. A revision (branch, tag or commit)
follows an `@`: `Qwen/Qwen3-8B-Base@<rev>`. Local directories and remote (`gs://`) paths are returned as they are.

An id that is neither cached nor reachable is a `ConfigError` in one line that names it, with a hint.
"""

from __future__ import annotations

import os
import re

from opd_jax.errors import ConfigError

# What opd_jax reads from a checkpoint repository: weights, architecture, tokenizer, generation defaults.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json")
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                      "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(location: str) -> bool:
    """`org/name` or `org/name@revision`, and not something that exists on this machine."""
    return bool(_HUB_ID.match(location)) and not os.path.exists(location) and "://" not in location


def split_revision(hub_id: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); no `@` -> (id, None)."""
    repo, _, rev = hub_id.partition("@")
    return repo, rev or None


def resolve(location: str, *, what: str = "model") -> str:
    """A path opd_jax can read for `location`: itself when it is a local path or a remote URL, else the local
    snapshot of a Hub id (downloaded when missing and the network is allowed). `what`: "model" (weights, config,
    tokenizer) or "tokenizer" (tokenizer files only). Raises ConfigError for a Hub id that cannot be had."""
    if not location or "://" in location or os.path.exists(location) or not is_hub_id(location):
        return location
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, revision = split_revision(location)
    patterns = list(TOKENIZER_PATTERNS) + ([] if what == "tokenizer" else list(WEIGHT_PATTERNS))
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=offline)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE=1 and it is not in the cache" if offline else \
            f"it is not in the cache and the download failed ({type(e).__name__})"
        raise ConfigError(
            f"{location!r} is no local directory and no usable Hugging Face Hub id: {why} (cache: "
            f"{constants.HF_HUB_CACHE})",
            hint=f"fetch it where there is network (`huggingface-cli download {repo}`) and point HF_HOME at that "
                 "cache, or give a local directory") from None


__all__ = ["resolve", "is_hub_id", "split_revision", "WEIGHT_PATTERNS", "TOKENIZER_PATTERNS"]
