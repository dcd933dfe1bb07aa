"""Examples out of a `Source`: deterministic shuffling, per-host slices, a resumable position, counted bad-row
skips. (SFT rows are packed by `opd_jax.baselines.sft`.)

Order (random-access sources). Epoch `e` visits the source in the permutation `default_rng([seed, e]).permutation(N)`
(seed and epoch both feed the generator, so seed 0 / epoch 1 and seed 1 / epoch 0 differ). Global slot `g` of the
epoch belongs to process `g % P`: process `p` reads only slots `p, p + P, p + 2P, ...`, and every `next_batch(n)`
call advances every process by exactly `n` slots. So the processes' k-th batches, interleaved (global row `g` on
process `g % P`), are exactly the k-th batch of a single process reading `n * P` rows, and all processes share one
position. Each epoch drops the last `N % P` slots so every process has `N // P`; the reshuffle drops different rows
each epoch.

Bad rows. A row with a missing field, an empty prompt, a malformed conversation, more than `max_prompt_tokens`
prompt tokens (when `truncate_prompts` is False) or failing an extra `check` is skipped and counted by reason in
`SkipStats` (with the first few examples, for `report()`). Its slot is filled by a substitute row drawn from the
whole source with an RNG keyed by (seed, epoch, slot, attempt): deterministic, independent of the process count and
of history, so the properties above hold with bad rows too. The price is that a substitute row can appear twice in
an epoch, at the rate of bad rows. After 64 failed draws the source is scanned once; if no row is valid a
`DataError` names the source and the skip reasons instead of looping forever (otherwise substitutes come from the
scan's list of valid rows).

Iterable-only sources (HF streaming) cannot draw substitutes: every process reads the whole stream anyway, so each
validates every row and process `p` keeps the valid rows whose global valid-row number is `p mod P`; a call consumes
`n * P` valid rows on every process. Same guarantees, again one shared position (raw rows consumed this epoch).

Resume. `state()` is a small JSON-able dict (epoch, position, skip counts) and is the same on every process (the skip
counts are this process's, informational), so one copy saved by the primary host restores all of them. `restore`
refuses a state from another seed, process count, shuffle setting or source length.

"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from opd_jax.data.sources import BadRecord, Source
from opd_jax.errors import DataError

__all__ = [
    "Example",
    "SkipStats",
    "DataError",
    "PromptDataset",
    "PROMPT_TOO_LONG",
]

PROMPT_TOO_LONG = "prompt_too_long"

_STATE_VERSION = 1




@dataclass
class Example:
    messages: list[dict]  # chat messages; a plain-text prompt is one user message
    answer: str | None  # gold answer (None when the source has no answer field)
    source: str  # dataset name, for teacher routing and per-dataset metrics
    index: int  # record index in the source: a stable id of the row
    id: str | None = None  # the record's own `id` field, when it has one (eval sets: duplicates are dropped by it)


@dataclass
class SkipStats:
    """Skipped rows by reason, with the first `keep` examples of each reason."""

    keep: int = 3
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    kept: int = 0  # rows that became examples
    truncated: int = 0  # over-budget prompts kept because truncate_prompts=True (the sampler truncates them)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def skip(self, reason: str, index: int, detail: str, record: Any = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.keep and not any(e.startswith(f"row {index}:") for e in ex):
            text = f"row {index}: {detail}"
            if record is not None:
                text += f" | {_short(record)}"
            ex.append(text)

    def report(self, name: str = "") -> str:
        head = f"{name}: " if name else ""
        if not self.counts:
            return f"{head}{self.kept} rows kept, none skipped" + (
                f", {self.truncated} prompts over budget (truncated)" if self.truncated else "")
        lines = [f"{head}{self.kept} rows kept, {self.skipped} skipped"
                 + (f", {self.truncated} prompts over budget (truncated)" if self.truncated else "")]
        for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason}: {n}")
            lines.extend(f"    e.g. {e}" for e in self.examples.get(reason, []))
        return "\n".join(lines)

    def state(self) -> dict:
        return {"counts": dict(self.counts), "kept": self.kept, "truncated": self.truncated}

    def restore(self, state: dict) -> None:
        self.counts = {str(k): int(v) for k, v in state.get("counts", {}).items()}
        self.kept = int(state.get("kept", 0))
        self.truncated = int(state.get("truncated", 0))
        self.examples = {}


def _short(record: Any, limit: int = 160) -> str:
    try:
        text = json.dumps(record, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(record)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PromptDataset:
    """Examples from a `Source`, shuffled per epoch, sliced per process, resumable. See the module docstring.

    tokenize: `Example -> prompt token ids` (e.g. `lambda ex: renderer.build_prompt(ex.messages)`); needed for the
      `max_prompt_tokens` budget. With `truncate_prompts=True` over-budget prompts are kept and counted as truncated.
    check: an extra validity test, `Example -> None` (ok) or `(reason, detail)` (skip); `SFTDataset` uses it.
    max_examples: use only the first `max_examples` records of the source (source order, before shuffling); 0 = all.
    shuffle: False reads the source in order each epoch (still sliced per process).
    """

    SUBSTITUTE_ATTEMPTS = 64  # random draws for a bad slot before the one-off full scan

    def __init__(self, source: Source, *, seed: int, process_index: int = 0, process_count: int = 1,
                 max_examples: int = 0, max_prompt_tokens: int | None = None,
                 tokenize: Callable[[Example], Sequence[int]] | None = None, truncate_prompts: bool = False,
                 shuffle: bool = True, check: Callable[[Example], tuple[str, str] | None] | None = None,
                 keep_skip_examples: int = 3):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if max_prompt_tokens is not None and tokenize is None and not truncate_prompts:
            raise ValueError("max_prompt_tokens needs a tokenize callable (Example -> token ids)")
        self.source = source
        self.seed = int(seed)
        self.process_index = process_index
        self.process_count = process_count
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenize = tokenize
        self.truncate_prompts = truncate_prompts
        self.shuffle = shuffle
        self.check = check
        self.stats = SkipStats(keep=keep_skip_examples)
        n = source.num_records
        self.num_records: int | None = None if n is None else (min(n, max_examples) if max_examples > 0 else n)
        self.max_examples = max_examples
        if self.num_records is not None:
            if self.num_records == 0:
                raise DataError(f"{source.spec}: the source has no rows")
            if self.num_records < process_count:
                raise DataError(f"{source.spec}: {self.num_records} rows cannot be split over {process_count} "
                                "processes")
        self.epoch = 0
        self.position = 0  # random access: slots of this process's slice consumed; stream: raw rows consumed
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        self._stream: Iterator[dict] | None = None
        self._valid_rows: np.ndarray | None = None  # set by the one-off full scan
        self._scan_stats = SkipStats()

    # ---- order ----
    @property
    def slice_len(self) -> int | None:
        """Slots per process per epoch (random-access sources)."""
        return None if self.num_records is None else self.num_records // self.process_count

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = self.num_records
            assert n is not None
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                          else np.arange(n))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def global_order(self, epoch: int) -> np.ndarray:
        """Record index of each global slot of an epoch (before bad-row substitution; the `N % P` tail dropped)."""
        usable = self.slice_len * self.process_count  # type: ignore[operator]
        return self._order(epoch)[:usable].copy()

    # ---- examples ----
    def _make(self, index: int, record: dict | None = None, count: bool = True,
              stats: SkipStats | None = None) -> Example | None:
        """The example of row `index`, or None if the row is bad (counted in `stats`, default `self.stats`, when
        `count`)."""
        stats = stats if stats is not None else self.stats if count else SkipStats(keep=0)
        try:
            if record is None:
                record = self.source.record(index)
            messages, answer = self.source.extract(record)
        except BadRecord as e:
            stats.skip(e.reason, index, e.detail, record)
            return None
        rid = record.get("id") if isinstance(record, dict) else None
        ex = Example(messages=messages, answer=answer, source=self.source.name, index=int(index),
                     id=None if rid is None else str(rid))
        if self.max_prompt_tokens is not None and self.tokenize is not None:
            try:
                n_tok = len(self.tokenize(ex))
            except ValueError as e:  # e.g. a renderer refusing the messages: a bad row, not a crash
                stats.skip("render_error", index, str(e), record)
                return None
            if n_tok > self.max_prompt_tokens:
                if not self.truncate_prompts:
                    stats.skip(PROMPT_TOO_LONG, index, f"{n_tok} prompt tokens > budget {self.max_prompt_tokens}",
                               record)
                    return None
                stats.truncated += 1
        if self.check is not None:
            bad = self.check(ex)
            if bad is not None:
                stats.skip(bad[0], index, bad[1], record)
                return None
        stats.kept += 1
        return ex

    def _scan_valid_rows(self) -> np.ndarray:
        if self._valid_rows is None:
            assert self.num_records is not None
            self._scan_stats = SkipStats(keep=self.stats.keep)
            self._valid_rows = np.array([i for i in range(self.num_records) if self._make(i, stats=self._scan_stats)],
                                        dtype=np.int64)
        return self._valid_rows

    def _substitute(self, epoch: int, slot: int) -> Example:
        """A valid row for a bad slot; depends only on (seed, epoch, slot) and the data."""
        n = self.num_records
        assert n is not None
        for attempt in range(1, self.SUBSTITUTE_ATTEMPTS + 1):
            idx = int(np.random.default_rng([self.seed, epoch, slot, attempt]).integers(n))
            ex = self._make(idx, count=False)
            if ex is not None:
                self.stats.kept += 1
                return ex
        valid = self._scan_valid_rows()
        if len(valid) == 0:
            raise DataError(f"no usable rows in data source {self.source.spec!r}: all {n} rows were skipped. "
                            "Skip reasons over the full scan:\n" + self._scan_stats.report(self.source.name))
        idx = int(valid[np.random.default_rng([self.seed, epoch, slot, 0]).integers(len(valid))])
        ex = self._make(idx, count=False)
        assert ex is not None
        self.stats.kept += 1
        return ex

    def _all_bad_message(self, what: str) -> str:
        return (f"no usable rows in data source {self.source.spec!r}: {what}. Skip reasons:\n"
                + self.stats.report(self.source.name))

    def _next_random_access(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            if self.position >= self.slice_len:  # type: ignore[operator]
                self.epoch, self.position = self.epoch + 1, 0
            slot = self.process_index + self.position * self.process_count
            self.position += 1
            ex = self._make(int(self._order(self.epoch)[slot]))
            out.append(ex if ex is not None else self._substitute(self.epoch, slot))
        return out

    def _open_stream(self) -> Iterator[dict]:
        seed = int(np.random.default_rng([self.seed, self.epoch]).integers(2**31)) if self.shuffle else None
        it = self.source.iter_epoch(seed)
        if self.max_examples > 0:
            it = itertools.islice(it, self.max_examples)
        for _ in itertools.islice(it, self.position):  # resume: skip what this epoch already consumed
            pass
        return it

    def _next_stream(self, n: int) -> list[Example]:
        out: list[Example] = []
        need, valid = n * self.process_count, 0
        valid_this_epoch = self.position > 0  # unknown after a mid-epoch restore: assume some
        while valid < need:
            if self._stream is None:
                self._stream = self._open_stream()
            record = next(self._stream, None)
            if record is None:  # end of the epoch
                if not valid_this_epoch:
                    raise DataError(self._all_bad_message(f"a full epoch of the stream ({self.position} rows) was "
                                                          "skipped" if self.position else "the stream is empty"))
                self.epoch, self.position, self._stream, valid_this_epoch = self.epoch + 1, 0, None, False
                continue
            row = self.position
            self.position += 1
            ex = self._make(row, record)
            if ex is None:
                continue
            valid_this_epoch = True
            if valid % self.process_count == self.process_index:
                out.append(ex)
            valid += 1
        return out

    def next_batch(self, n: int) -> list[Example]:
        """This process's next `n` examples (crossing epochs as needed); every process advances together."""
        if self.num_records is not None:
            return self._next_random_access(n)
        return self._next_stream(n)

    def __iter__(self) -> Iterator[Example]:
        while True:
            yield from self.next_batch(1)

    def all_examples(self) -> list[Example]:
        """Every valid example of the source once, in source order, ignoring slicing and shuffling (evaluation).
        Skips are counted in `stats`."""
        if self.num_records is not None:
            examples = [self._make(i) for i in range(self.num_records)]
        else:
            it = self.source.iter_epoch(None)
            if self.max_examples > 0:
                it = itertools.islice(it, self.max_examples)
            examples = [self._make(i, rec) for i, rec in enumerate(it)]
        out = [e for e in examples if e is not None]
        if not out:
            raise DataError(self._all_bad_message(f"all {len(examples)} rows were skipped"))
        return out

    # ---- resume ----
    def state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "source": self.source.spec,
            "num_records": self.num_records,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "process_count": self.process_count,
            "epoch": self.epoch,
            "position": self.position,
            "stats": self.stats.state(),
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str | None:
        """A hash of the source's first and last 32 records (random-access sources; None for streams): a resume
        checks that the rows behind the saved position are the rows this run trained on."""
        if self.num_records is None:
            return None
        n = self.num_records
        rows = sorted(set(range(min(32, n))) | set(range(max(0, n - 32), n)))
        h = hashlib.sha256()
        for i in rows:
            try:
                h.update(json.dumps(self.source.record(i), sort_keys=True, default=str).encode())
            except BadRecord as e:  # a bad row is part of the data too (it is skipped, and counted, the same way)
                h.update(f"bad row {i}: {e.reason}".encode())
        return h.hexdigest()[:16]

    def restore(self, state: dict) -> None:
        """Continue from a saved `state()`. Raises DataError, naming the source and what differs, when the data is
        not the data the state was saved on (another row count, seed, shuffle, process count, or other rows)."""
        ours = {"num_records": self.num_records, "seed": self.seed, "shuffle": self.shuffle,
                "process_count": self.process_count}
        if state.get("fingerprint") is not None:
            ours["fingerprint"] = self.fingerprint()
        for key, mine in ours.items():
            if key in state and state[key] != mine:
                what = "its records differ from the ones it trained on" if key == "fingerprint" else \
                    f"{key}: the checkpoint has {state[key]!r}, now {mine!r}"
                raise DataError(f"resume: data source {self.source.spec} is not the data the run trained on ({what})",
                                hint="resume with the data the run was started with, or start a new run_dir")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.stats.restore(state.get("stats", {}))
        self._stream = None

    def report(self) -> str:
        return self.stats.report(self.source.name)
