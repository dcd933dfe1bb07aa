"""Data sources: one interface over Hugging Face `datasets`, JSONL, Parquet and TFDS, plus named presets.

    source = open_source("preset:aime24")                       # local ../shared/data/aime24.jsonl, else the hub
    source = open_source("jsonl:data/train.jsonl", prompt_field="question", answer_field="answer")
    source = open_source("hf:zwhe99/DeepMath-103K", split="train", prompt_field="question",
                         answer_field="final_answer")
    len(source); source[i] -> raw dict record; source.extract(record) -> (messages, answer)

Spec grammar (the same as `DataConfig.source` / `EvalConfig.source`):
  hf:NAME[@CONFIG]        `datasets.load_dataset(NAME, CONFIG, split=split)`. NAME is a hub id (needs the network,
                          or a populated HF cache with HF_DATASETS_OFFLINE=1), a packaged builder such as `json`
                          or `parquet` (pass `data_files=`), or a local directory: a `save_to_disk` directory
                          (read with `datasets.load_from_disk`) or a directory of data files. `streaming=True`
                          gives an iterable-only source (no length, no random access).
  jsonl:PATH              one JSON object per line; PATH may be a file, a directory (its *.jsonl) or a glob.
  parquet:PATH            file, directory (its *.parquet) or glob; read with pyarrow.
  tfds:NAME[/CONFIG][:SPLIT]  `tfds.builder(NAME/CONFIG, data_dir=...)` read with `as_data_source(split)`; the
                          builder must be (or is) prepared with `file_format="array_record"`, so TensorFlow is
                          never needed. SPLIT defaults to the `split` argument.
  preset:NAME[:SPLIT]     a `PRESETS` entry: source + prompt extraction + answer field in one name (the split and
                          field arguments of `open_source` are ignored; SPLIT defaults to the preset's).
  synthetic:TASK          not a record source: generated tasks live in `opd_jax.data.synthetic` (`build_task`).

A record becomes chat messages by `Source.extract`: the prompt field may hold a string (one user message), a list of
`{role, content}` messages, or a ShareGPT list of `{from, value}` turns. `prompt_mode="first_user"` keeps only the
first user message (prompts for on-policy training out of an SFT conversation set). A bad record raises `BadRecord`
with a reason; `PromptDataset` counts those as skips instead of crashing the run.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from opd_jax.errors import ConfigError, DataError

__all__ = [
    "BadRecord",
    "Source",
    "ListSource",
    "JsonlSource",
    "ParquetSource",
    "HFSource",
    "TFDSSource",
    "DataPreset",
    "PRESETS",
    "open_source",
    "source_from_config",
    "shared_data_dir",
    "extract_messages",
    "extract_answer_field",
]

Message = dict[str, Any]
PromptMode = Literal["auto", "first_user"]
AnswerMode = Literal["text", "gsm8k"]

# Skip reasons (also the keys of `SkipStats.counts`).
MISSING_FIELD = "missing_field"
EMPTY_PROMPT = "empty_prompt"
BAD_FORMAT = "bad_format"


class BadRecord(ValueError):
    """A record that cannot become an example. `reason` is a short key used to count skips."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------------------------
# Prompt / answer extraction
# ---------------------------------------------------------------------------------------------------------------

# ShareGPT speaker names -> chat roles. Renderers accept only system/user/assistant.
_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}


def _get_field(record: dict, field: str) -> Any:
    """`record[field]`, or a dotted path into nested dicts (`prompt.content`); raises KeyError when absent."""
    if field in record:
        return record[field]
    if "." in field:
        value: Any = record
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                raise KeyError(field)
            value = value[part]
        return value
    raise KeyError(field)


def _normalize_message(m: Any, i: int) -> Message:
    if not isinstance(m, dict):
        raise BadRecord(BAD_FORMAT, f"message {i} is a {type(m).__name__}, not a dict")
    if "role" in m:
        role, content = m.get("role"), m.get("content")
    elif "from" in m:  # ShareGPT: {"from": "human" | "gpt" | "system", "value": ...}
        role, content = m.get("from"), m.get("value")
    else:
        raise BadRecord(BAD_FORMAT, f"message {i} has neither role/content nor from/value keys: {sorted(m)}")
    mapped = _ROLE_ALIASES.get(str(role).lower()) if role is not None else None
    if mapped is None:
        raise BadRecord(BAD_FORMAT, f"message {i} has unsupported role {role!r}")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise BadRecord(BAD_FORMAT, f"message {i} content is a {type(content).__name__}, not a str")
    out: Message = {"role": mapped, "content": content}
    if mapped == "assistant" and isinstance(m.get("reasoning_content"), str):
        out["reasoning_content"] = m["reasoning_content"]  # Qwen3's renderer reads it
    return out


def extract_messages(value: Any, mode: PromptMode = "auto") -> list[Message]:
    """Prompt field value -> chat messages. A string becomes one user message; a message list is normalized.

    `mode="first_user"` returns only the first user message. Raises `BadRecord` on empty or malformed prompts."""
    if value is None:
        raise BadRecord(MISSING_FIELD, "prompt is null")
    if isinstance(value, bytes):  # TFDS text features
        value = value.decode("utf-8")
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(EMPTY_PROMPT, "prompt string is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise BadRecord(BAD_FORMAT, f"prompt is a {type(value).__name__}, expected a str or a list of messages")
    if not value:
        raise BadRecord(EMPTY_PROMPT, "message list is empty")
    messages = [_normalize_message(m, i) for i, m in enumerate(value)]
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise BadRecord(BAD_FORMAT, "conversation has no user message")
    if not users[0]["content"].strip():
        raise BadRecord(EMPTY_PROMPT, "first user message is empty")
    if mode == "first_user":
        return [users[0]]
    return messages


def _answer_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        # amc23 stores answers as floats (27.0): keep integers integral so "27" == "27" downstream
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        return _answer_text(items[0]) if len(items) == 1 else json.dumps([_answer_text(x) for x in items])
    return str(value)


def extract_answer_field(value: Any, mode: AnswerMode = "text") -> str:
    """Answer field value -> gold answer string. `mode="gsm8k"` keeps the text after the last `####`."""
    text = _answer_text(value)
    if text is None or not text.strip():
        raise BadRecord(MISSING_FIELD, "answer is null or empty")
    text = text.strip()
    if mode == "gsm8k":
        if "####" not in text:
            raise BadRecord(BAD_FORMAT, "gsm8k answer has no '####' final-answer marker")
        text = text.rsplit("####", 1)[1].strip().replace(",", "")  # "#### 1,000" -> "1000"
        if not text:
            raise BadRecord(MISSING_FIELD, "gsm8k final answer after '####' is empty")
    return text


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


class Source:
    """Raw dict records plus how to turn one into (messages, answer).

    Random-access sources (`num_records` is an int) support `len()` and `source[i]`; `PromptDataset` shuffles them
    by index. Iterable-only sources (`num_records is None`, e.g. HF streaming) are read in order with `iter_epoch`.
    """

    def __init__(self, spec: str, name: str, prompt_field: str, answer_field: str | None,
                 prompt_mode: PromptMode = "auto", answer_mode: AnswerMode = "text"):
        self.spec = spec
        self.name = name  # dataset name carried by each Example (teacher routing, metrics)
        self.prompt_field = prompt_field
        self.answer_field = answer_field  # None: records carry no gold answer
        self.prompt_mode: PromptMode = prompt_mode
        self.answer_mode: AnswerMode = answer_mode

    # ---- access ----
    @property
    def num_records(self) -> int | None:
        return None

    def __len__(self) -> int:
        n = self.num_records
        if n is None:
            raise TypeError(f"{self.spec}: an iterable-only source has no length")
        return n

    def record(self, index: int) -> dict:
        """Record `index` (0 <= index < len). May raise `BadRecord` for an unreadable record (a bad JSON line)."""
        raise TypeError(f"{self.spec}: an iterable-only source has no random access")

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.spec}: index {index} out of range for {n} records")
        return self.record(index % n)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_epoch(None)

    def iter_epoch(self, seed: int | None) -> Iterator[dict]:
        """All records once, in source order (`seed=None`) or a source-specific shuffle. Random-access sources
        ignore `seed` here: `PromptDataset` permutes their indices itself."""
        for i in range(len(self)):
            yield self.record(i)

    # ---- extraction ----
    def extract(self, record: dict) -> tuple[list[Message], str | None]:
        """(chat messages, gold answer or None); raises `BadRecord`."""
        try:
            value = _get_field(record, self.prompt_field)
        except KeyError:
            raise BadRecord(MISSING_FIELD, f"no prompt field {self.prompt_field!r} (keys: {sorted(record)})") from None
        messages = extract_messages(value, self.prompt_mode)
        if self.answer_field is None:
            return messages, None
        try:
            ans = _get_field(record, self.answer_field)
        except KeyError:
            raise BadRecord(MISSING_FIELD, f"no answer field {self.answer_field!r} (keys: {sorted(record)})") from None
        try:
            return messages, extract_answer_field(ans, self.answer_mode)
        except BadRecord as e:
            raise BadRecord(e.reason, f"answer field {self.answer_field!r}: {e.detail}") from None

    def __repr__(self) -> str:
        n = self.num_records
        return f"{type(self).__name__}({self.spec!r}, name={self.name!r}, records={'?' if n is None else n})"


class ListSource(Source):
    """In-memory records (programmatic use and tests)."""

    def __init__(self, records: Sequence[dict], *, name: str = "list", prompt_field: str = "question",
                 answer_field: str | None = "answer", prompt_mode: PromptMode = "auto",
                 answer_mode: AnswerMode = "text", spec: str | None = None):
        super().__init__(spec or f"list:{name}", name, prompt_field, answer_field, prompt_mode, answer_mode)
        self._records = list(records)

    @property
    def num_records(self) -> int:
        return len(self._records)

    def record(self, index: int) -> dict:
        return self._records[index]


def _expand_paths(path: str, ext: str) -> list[str]:
    """A file, a directory (its files ending in `ext`, sorted) or a glob -> sorted file list."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(ext))
    elif any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
    else:
        files = [path] if os.path.exists(path) else []
    if not files:
        raise FileNotFoundError(f"no {ext} files at {path!r}")
    return files


class JsonlSource(Source):
    """JSON Lines. Lines are indexed by byte offset and parsed on access, so a large file is not held in memory
    and one malformed line is a counted `bad_format` skip, not a crash. Blank lines are ignored."""

    def __init__(self, path: str, *, name: str | None = None, prompt_field: str = "question",
                 answer_field: str | None = "answer", prompt_mode: PromptMode = "auto",
                 answer_mode: AnswerMode = "text", spec: str | None = None):
        self.files = _expand_paths(path, ".jsonl")
        default_name = os.path.splitext(os.path.basename(self.files[0]))[0] if len(self.files) == 1 else path
        super().__init__(spec or f"jsonl:{path}", name or default_name, prompt_field, answer_field,
                         prompt_mode, answer_mode)
        self._index: list[tuple[int, int]] = []  # (file number, byte offset) of each non-blank line
        for fi, f in enumerate(self.files):
            with open(f, "rb") as fh:
                offset = 0
                for line in fh:
                    if line.strip():
                        self._index.append((fi, offset))
                    offset += len(line)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    @property
    def num_records(self) -> int:
        return len(self._index)

    def record(self, index: int) -> dict:
        fi, offset = self._index[index]
        if self._pid != os.getpid():  # a forked worker must not share (and move) the parent's file offsets
            self._handles, self._pid = {}, os.getpid()
        fh = self._handles.get(fi)
        if fh is None:
            fh = self._handles[fi] = open(self.files[fi], "rb")  # noqa: SIM115 - kept open for random reads
        fh.seek(offset)
        line = fh.readline()
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRecord(BAD_FORMAT, f"{self.files[fi]} line at byte {offset}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise BadRecord(BAD_FORMAT, f"{self.files[fi]} line at byte {offset}: a {type(rec).__name__}, not an "
                                        "object")
        return rec

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class ParquetSource(Source):
    """Parquet via pyarrow. The table is read once (optionally only `columns`, which saves memory on wide
    datasets such as DeepMath's three R1 solutions) and rows are converted to dicts on access."""

    def __init__(self, path: str, *, name: str | None = None, prompt_field: str = "question",
                 answer_field: str | None = "answer", prompt_mode: PromptMode = "auto",
                 answer_mode: AnswerMode = "text", columns: Sequence[str] | None = None, spec: str | None = None):
        import pyarrow.dataset as pads

        self.files = _expand_paths(path, ".parquet")
        default_name = os.path.splitext(os.path.basename(self.files[0]))[0] if len(self.files) == 1 else path
        super().__init__(spec or f"parquet:{path}", name or default_name, prompt_field, answer_field,
                         prompt_mode, answer_mode)
        self._table = pads.dataset(self.files, format="parquet").to_table(
            columns=list(columns) if columns else None)

    @property
    def num_records(self) -> int:
        return self._table.num_rows

    def record(self, index: int) -> dict:
        return self._table.slice(index, 1).to_pylist()[0]


def _is_saved_to_disk(path: str) -> bool:
    # `Dataset.save_to_disk` writes state.json + dataset_info.json; `DatasetDict.save_to_disk` writes
    # dataset_dict.json. Anything else in a directory is data files for `load_dataset`.
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json"))


class HFSource(Source):
    """A Hugging Face `datasets` dataset.

    Hub ids need network access the first time; afterwards the HF cache serves them (set HF_DATASETS_OFFLINE=1 to
    forbid the network). Local directories work without the hub: `save_to_disk` output through `load_from_disk`,
    any other directory (data files, a cloned dataset repo) through `load_dataset(path)`. Non-streaming datasets
    are Arrow tables memory-mapped from the cache, so random access by index is cheap. Extra keyword arguments
    (`data_files`, `cache_dir`, `revision`, ...) go to `load_dataset`.
    """

    def __init__(self, path: str, *, config: str | None = None, split: str = "train", name: str | None = None,
                 prompt_field: str = "question", answer_field: str | None = "answer",
                 prompt_mode: PromptMode = "auto", answer_mode: AnswerMode = "text", streaming: bool = False,
                 shuffle_buffer: int = 10_000, spec: str | None = None, **load_kwargs: Any):
        import datasets

        super().__init__(spec or f"hf:{path}" + (f"@{config}" if config else ""), name or path, prompt_field,
                         answer_field, prompt_mode, answer_mode)
        self.split = split
        self.streaming = streaming
        self.shuffle_buffer = shuffle_buffer
        local = os.path.isdir(os.path.expanduser(path))
        if local and _is_saved_to_disk(os.path.expanduser(path)):
            if streaming:
                raise ValueError(f"{self.spec}: a save_to_disk directory cannot be streamed; drop streaming=True")
            ds = datasets.load_from_disk(os.path.expanduser(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise KeyError(f"{self.spec}: split {split!r} not found; available: {sorted(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(os.path.expanduser(path) if local else path, config, split=split,
                                       streaming=streaming, **load_kwargs)
        if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raise ValueError(f"{self.spec}: got a dict of splits {sorted(ds)}; pass split=")
        self.dataset = ds

    @property
    def num_records(self) -> int | None:
        return None if self.streaming else len(self.dataset)

    def record(self, index: int) -> dict:
        if self.streaming:
            return super().record(index)
        return self.dataset[int(index)]

    def iter_epoch(self, seed: int | None) -> Iterator[dict]:
        if not self.streaming:
            yield from super().iter_epoch(seed)
            return
        ds = self.dataset if seed is None else self.dataset.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
        yield from ds


def _to_python(x: Any) -> Any:
    """TFDS numpy/bytes values -> plain Python (text features arrive as bytes)."""
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            return x
    if isinstance(x, dict):
        return {k: _to_python(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return [_to_python(v) for v in x.tolist()] if x.dtype == object else x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (list, tuple)):
        return [_to_python(v) for v in x]
    return x


class TFDSSource(Source):
    """A TFDS dataset read through `builder.as_data_source(split)` (ArrayRecord random access, no TensorFlow).

    `download=True` (the default, like `tfds.load`) prepares an unprepared builder with
    `file_format="array_record"`; a builder already prepared as TFRecord is refused with a hint, since reading
    TFRecord needs TensorFlow."""

    def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None, download: bool = True,
                 prompt_field: str = "question", answer_field: str | None = "answer",
                 prompt_mode: PromptMode = "auto", answer_mode: AnswerMode = "text", dataset_name: str | None = None,
                 spec: str | None = None):
        import tensorflow_datasets as tfds

        super().__init__(spec or f"tfds:{name}:{split}", dataset_name or name.split("/")[0], prompt_field,
                         answer_field, prompt_mode, answer_mode)
        self.split = split
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            if not download:
                raise FileNotFoundError(f"{self.spec}: TFDS dataset not prepared under {builder.data_dir} and "
                                        "download=False")
            builder.download_and_prepare(file_format="array_record")
        fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
        if str(fmt) != "array_record":
            raise DataError(f"{self.spec}: prepared as {fmt!r}; reading it needs TensorFlow. Re-prepare with "
                             "download_and_prepare(file_format='array_record') into another data_dir")
        self.builder = builder
        self._ds = builder.as_data_source(split=split)

    @property
    def num_records(self) -> int:
        return len(self._ds)

    def record(self, index: int) -> dict:
        return _to_python(self._ds[int(index)])


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPreset:
    """A short name for (source, prompt extraction, answer field).

    `local` names a JSONL file in the shared data directory (see `shared_data_dir`) holding `split`; it is used when
    present, the hub dataset otherwise."""

    name: str
    hub: str  # "hf:ORG/NAME[@CONFIG]"
    split: str  # the hub split the preset reads by default (and the split the local file holds)
    prompt_field: str
    answer_field: str | None
    prompt_mode: PromptMode = "auto"
    answer_mode: AnswerMode = "text"
    local: str | None = None
    use: Literal["prompts", "sft", "eval"] = "prompts"
    note: str = ""


PRESETS: dict[str, DataPreset] = {
    p.name: p
    for p in [
        DataPreset("deepmath", "hf:zwhe99/DeepMath-103K", "train", "question", "final_answer",
                   note="OPD/RL math prompts (103,110 rows); the published recipe's prompt set"),
        DataPreset("openthoughts3", "hf:open-thoughts/OpenThoughts3-1.2M", "train", "conversations", None,
                   use="sft", note="SFT conversations: ShareGPT {from, value} turns -> full messages"),
        DataPreset("tulu3_sft", "hf:allenai/tulu-3-sft-mixture", "train", "messages", None,
                   prompt_mode="first_user", note="chat prompts: the first user message of each conversation"),
        DataPreset("aime24", "hf:HuggingFaceH4/aime_2024", "train", "problem", "answer", local="aime24.jsonl",
                   use="eval", note="30 AIME 2024 problems, integer answers 0-999"),
        DataPreset("amc23", "hf:math-ai/amc23", "test", "question", "answer", local="amc23.jsonl", use="eval",
                   note="40 AMC 2023 problems; answers are floats in the data (27.0 -> '27')"),
        DataPreset("gsm8k", "hf:openai/gsm8k@main", "test", "question", "answer", answer_mode="gsm8k",
                   local="gsm8k_test.jsonl", use="eval", note="1,319 test problems; gold = text after '####'"),
    ]
}


def shared_data_dir() -> str | None:
    """The shared eval-data directory: $OPD_SHARED_DATA, else `../shared/data` next to the repository (then next to
    the working directory). None when neither exists."""
    env = os.environ.get("OPD_SHARED_DATA")
    if env:
        return env if os.path.isdir(env) else None
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for cand in (os.path.join(repo, "..", "shared", "data"), os.path.join(os.getcwd(), "..", "shared", "data")):
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    return None


def _split_hf_name(rest: str) -> tuple[str, str | None]:
    path, sep, config = rest.partition("@")
    return path, (config or None) if sep else None


def _open_preset(rest: str, *, name: str | None, prefer_local: bool, data_dir: str | None,
                 **kwargs: Any) -> Source:
    pname, _, spec_split = rest.partition(":")
    if pname not in PRESETS:
        raise KeyError(f"unknown data preset {pname!r}; known: {sorted(PRESETS)}")
    p = PRESETS[pname]
    want_split = spec_split or p.split
    spec = f"preset:{rest}"
    common = dict(name=name or p.name, prompt_field=p.prompt_field, answer_field=p.answer_field,
                  prompt_mode=p.prompt_mode, answer_mode=p.answer_mode, spec=spec)
    if p.local and prefer_local and want_split == p.split:  # the local file holds exactly the preset's split
        root = data_dir or shared_data_dir()
        if root and os.path.isfile(os.path.join(root, p.local)):
            return JsonlSource(os.path.join(root, p.local), **common)
    hub_path, config = _split_hf_name(p.hub.removeprefix("hf:"))
    return HFSource(hub_path, config=config, split=want_split, **common, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# open_source
# ---------------------------------------------------------------------------------------------------------------


def open_source(spec: str, *, split: str | None = None, prompt_field: str | None = None,
                answer_field: str | None = "answer", name: str | None = None, prompt_mode: PromptMode = "auto",
                answer_mode: AnswerMode = "text", data_dir: str | None = None, prefer_local: bool = True,
                **kwargs: Any) -> Source:
    """Open a record source from a spec string (grammar in the module docstring).

    split: HF / TFDS split (default "train").
    prompt_field / answer_field: record fields (defaults "question" / "answer"); `answer_field=None` or "" means no
      gold answer.
    Presets fix their own split and fields and ignore these three (callers pass DataConfig values, whose defaults
      would be wrong for them); `preset:NAME:SPLIT` picks another split.
    name: the dataset name carried by each Example (default: preset name, file stem, hub id or TFDS name).
    data_dir: TFDS data_dir, or the shared data directory for presets.
    kwargs: source-specific: HF `streaming`, `data_files`, `cache_dir`, `revision`...; TFDS `download`; Parquet
      `columns`.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ConfigError(f"data source {spec!r}: expected PREFIX:VALUE with PREFIX in hf, jsonl, parquet, tfds, "
                         "preset, synthetic")
    if kind == "preset":
        return _open_preset(rest, name=name, prefer_local=prefer_local, data_dir=data_dir, **kwargs)
    common = dict(name=name, prompt_field=prompt_field or "question", answer_field=answer_field or None,
                  prompt_mode=prompt_mode, answer_mode=answer_mode, spec=spec)
    if kind == "jsonl":
        return JsonlSource(rest, **common, **kwargs)
    if kind == "parquet":
        return ParquetSource(rest, **common, **kwargs)
    if kind == "hf":
        path, config = _split_hf_name(rest)
        return HFSource(path, config=config, split=split or "train", **common, **kwargs)
    if kind == "tfds":
        tname, _, tsplit = rest.partition(":")
        common["dataset_name"] = common.pop("name")
        return TFDSSource(tname, split=tsplit or split or "train", data_dir=data_dir, **common, **kwargs)
    if kind == "synthetic":
        raise ConfigError(f"{spec!r} is a generated task, not a record source: use opd_jax.data.build_task")
    raise ConfigError(f"data source {spec!r}: unknown prefix {kind!r}; expected hf, jsonl, parquet, tfds, preset, "
                     "synthetic")


def source_from_config(cfg: Any, **kwargs: Any) -> Source:
    """Open `cfg.source` of a `DataConfig` with its split and fields (presets keep their own)."""
    return open_source(cfg.source, split=cfg.split, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                       **kwargs)
