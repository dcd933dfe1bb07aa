"""Data sources, presets, PromptDataset (shuffle / resume / per-host slices / skips) and SFT batching.

Every fixture is built locally in tmp_path; nothing touches the network (hub loading is exercised through a fake
`datasets.load_dataset` that records its arguments)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from opd_jax.config.schema import DataConfig
from opd_jax.data import sources as src_mod
from opd_jax.data.dataset import PROMPT_TOO_LONG, DataError, Example, PromptDataset
from opd_jax.data.sources import (
    PRESETS,
    BadRecord,
    HFSource,
    JsonlSource,
    ListSource,
    extract_answer_field,
    extract_messages,
    open_source,
    source_from_config,
)

ROWS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "id": i} for i in range(24)]


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def _ids(examples):
    return [e.index for e in examples]


# ---------------------------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------------------------


def test_extract_messages_forms():
    assert extract_messages("hi") == [{"role": "user", "content": "hi"}]
    share = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    assert extract_messages(share) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert extract_messages(msgs, "first_user") == [{"role": "user", "content": "a"}]
    for bad, reason in [("  ", "empty_prompt"), ([], "empty_prompt"), (None, "missing_field"), (5, "bad_format"),
                        ([{"role": "tool", "content": "x"}], "bad_format"),
                        ([{"role": "assistant", "content": "x"}], "bad_format")]:
        with pytest.raises(BadRecord) as e:
            extract_messages(bad)
        assert e.value.reason == reason, bad


def test_extract_answer_forms():
    assert extract_answer_field(27.0) == "27"
    assert extract_answer_field(2.5) == "2.5"
    assert extract_answer_field(" 204 ") == "204"
    assert extract_answer_field(np.int64(7)) == "7"
    assert extract_answer_field("She makes 9 * 2 = $18.\n#### 1,018", "gsm8k") == "1018"
    with pytest.raises(BadRecord):
        extract_answer_field("no marker", "gsm8k")
    with pytest.raises(BadRecord):
        extract_answer_field("")


# ---------------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------------


def test_jsonl_source(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", ROWS[:5], extra_lines=["", "{not json", "[1, 2]"])
    s = open_source(f"jsonl:{path}")
    assert isinstance(s, JsonlSource) and len(s) == 7 and s.name == "train"  # the blank line is not a record
    assert s[2]["id"] == 2 and s[-3]["id"] == 4
    msgs, ans = s.extract(s[3])
    assert msgs == [{"role": "user", "content": "What is 3 + 3?"}] and ans == "6"
    for i in (5, 6):
        with pytest.raises(BadRecord) as e:
            s.record(i)
        assert e.value.reason == "bad_format"
    # a directory of .jsonl files reads them all, in name order
    d = tmp_path / "dir"
    d.mkdir()
    _write_jsonl(d / "a.jsonl", ROWS[:2])
    _write_jsonl(d / "b.jsonl", ROWS[2:5])
    assert [r["id"] for r in open_source(f"jsonl:{d}")] == [0, 1, 2, 3, 4]


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS[:6]), tmp_path / "p.parquet", row_group_size=4)
    s = open_source(f"parquet:{tmp_path / 'p.parquet'}", answer_field="answer")
    assert len(s) == 6 and s[5] == ROWS[5]
    assert s.extract(s[4]) == ([{"role": "user", "content": "What is 4 + 4?"}], "8")
    s2 = open_source(f"parquet:{tmp_path}", columns=["question"], answer_field=None)
    assert s2[0] == {"question": ROWS[0]["question"]} and s2.extract(s2[0])[1] is None


def test_hf_sources_local(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS[:5])
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1, 3])}).save_to_disk(str(tmp_path / "dd"))
    one = open_source(f"hf:{tmp_path / 'one'}")
    assert isinstance(one, HFSource) and len(one) == 5 and one[4]["id"] == 4
    test = open_source(f"hf:{tmp_path / 'dd'}", split="test")
    assert [r["id"] for r in test] == [1, 3]
    with pytest.raises(KeyError, match="available"):
        open_source(f"hf:{tmp_path / 'dd'}", split="validation")
    # packaged json builder over local files, and a plain directory of data files
    path = _write_jsonl(tmp_path / "data.jsonl", ROWS[:4])
    js = open_source("hf:json", data_files=path, cache_dir=str(tmp_path / "cache"))
    assert len(js) == 4 and js.extract(js[1])[1] == "2"
    d = tmp_path / "repo"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", ROWS[:3])
    stream = open_source(f"hf:{d}", streaming=True)  # a directory of data files goes through load_dataset(path)
    assert stream.num_records is None and [r["id"] for r in stream] == [0, 1, 2]
    with pytest.raises(TypeError):
        len(stream)


def test_hf_hub_spec_arguments(monkeypatch):
    """Hub ids, @config and split reach `datasets.load_dataset` as expected (no network: the loader is faked)."""
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, streaming=False, **kw):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_list([{"question": "q", "answer": "#### 3", "final_answer": "1"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    s = open_source("hf:openai/gsm8k@main", split="test")
    assert calls[-1] == ("openai/gsm8k", "main", "test", False) and s.name == "openai/gsm8k"
    g = open_source("preset:gsm8k", prefer_local=False)
    assert calls[-1] == ("openai/gsm8k", "main", "test", False) and g.extract(g[0])[1] == "3" and g.name == "gsm8k"
    d = open_source("preset:deepmath")
    assert calls[-1] == ("zwhe99/DeepMath-103K", None, "train", False) and d.extract(d[0])[1] == "1"
    # a split other than the one the local file holds goes to the hub
    open_source("preset:gsm8k:train")
    assert calls[-1] == ("openai/gsm8k", "main", "train", False)


class _TinyMathBuilder:  # defined lazily: importing tensorflow_datasets costs ~1 s
    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            import tensorflow_datasets as tfds

            class OpdTinyMath(tfds.core.GeneratorBasedBuilder):
                VERSION = tfds.core.Version("1.0.0")
                BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="plain")]

                def _info(self):
                    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                        {"question": tfds.features.Text(), "answer": tfds.features.Text(), "id": np.int64}))

                def _split_generators(self, dl_manager):
                    return {"train": self._generate_examples(10), "test": self._generate_examples(3)}

                def _generate_examples(self, n):
                    for i in range(n):
                        yield i, {"question": "" if i == 7 else f"What is {i} + 1?", "answer": str(i + 1), "id": i}

            cls.cls = OpdTinyMath
        return cls.cls


def test_tfds_array_record_source(tmp_path):
    builder_cls = _TinyMathBuilder.get()
    builder_cls(data_dir=str(tmp_path), config="plain").download_and_prepare(file_format="array_record")
    s = open_source("tfds:opd_tiny_math/plain:train", data_dir=str(tmp_path))
    assert len(s) == 10 and s.name == "opd_tiny_math"
    recs = list(s)
    assert sorted(r["id"] for r in recs) == list(range(10))
    r = next(r for r in recs if r["id"] == 3)
    assert r == {"question": "What is 3 + 1?", "answer": "4", "id": 3}  # bytes decoded, numpy ints unwrapped
    assert len(open_source("tfds:opd_tiny_math/plain", split="test", data_dir=str(tmp_path))) == 3
    ds = PromptDataset(s, seed=0)
    assert len(ds.all_examples()) == 9 and ds.stats.counts == {"empty_prompt": 1}  # id 7 has an empty question
    assert len(ds.next_batch(20)) == 20
    with pytest.raises(FileNotFoundError):
        open_source("tfds:opd_tiny_math/plain:train", data_dir=str(tmp_path / "empty"), download=False)


def test_bad_specs():
    with pytest.raises(ValueError, match="PREFIX"):
        open_source("no_prefix.jsonl")
    with pytest.raises(ValueError, match="unknown prefix"):
        open_source("csv:x.csv")
    with pytest.raises(ValueError, match="build_task"):
        open_source("synthetic:arithmetic")
    with pytest.raises(KeyError, match="known"):
        open_source("preset:nope")
    from opd_jax.config.schema import ExperimentConfig
    from opd_jax.data.synthetic import make_synthetic_task

    cfg = ExperimentConfig()
    for bad, culprit in (("synthetic:arithmetic:two", "'two'"), ("synthetic:facts:x", "'x'"),
                         ("synthetic:algebra", "'algebra'")):
        cfg.data.source = bad
        with pytest.raises(ValueError, match=culprit):
            make_synthetic_task(cfg)


# ---------------------------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------------------------


def test_preset_specs():
    assert set(PRESETS) >= {"deepmath", "openthoughts3", "tulu3_sft", "aime24", "amc23", "gsm8k"}
    dm = PRESETS["deepmath"]
    assert (dm.hub, dm.split, dm.prompt_field, dm.answer_field) == ("hf:zwhe99/DeepMath-103K", "train", "question",
                                                                    "final_answer")
    ot = PRESETS["openthoughts3"]
    assert (ot.hub, ot.prompt_field, ot.answer_field, ot.use) == (
        "hf:open-thoughts/OpenThoughts3-1.2M", "conversations", None, "sft")
    tu = PRESETS["tulu3_sft"]
    assert (tu.hub, tu.prompt_field, tu.prompt_mode) == ("hf:allenai/tulu-3-sft-mixture", "messages", "first_user")
    assert PRESETS["aime24"].hub == "hf:HuggingFaceH4/aime_2024" and PRESETS["aime24"].local == "aime24.jsonl"
    assert PRESETS["gsm8k"].hub == "hf:openai/gsm8k@main" and PRESETS["gsm8k"].answer_mode == "gsm8k"
    # the SFT / prompt extraction of the conversation presets, on records shaped like theirs
    conv = {"conversations": [{"from": "human", "value": "Prove it."}, {"from": "gpt", "value": "<think>..."}]}
    s = ListSource([conv], prompt_field=ot.prompt_field, answer_field=ot.answer_field, prompt_mode=ot.prompt_mode)
    assert s.extract(conv) == ([{"role": "user", "content": "Prove it."},
                                {"role": "assistant", "content": "<think>..."}], None)
    tulu = {"id": "x", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    s = ListSource([tulu], prompt_field=tu.prompt_field, answer_field=None, prompt_mode=tu.prompt_mode)
    assert s.extract(tulu) == ([{"role": "user", "content": "Hi"}], None)


def test_local_shared_presets(shared_data):
    aime = open_source("preset:aime24", data_dir=shared_data)
    assert isinstance(aime, JsonlSource) and aime.name == "aime24"
    problems = PromptDataset(aime, seed=0).all_examples()
    assert len(problems) == 30
    assert all(p.answer is not None and 0 <= int(p.answer) <= 999 for p in problems)
    assert problems[0].messages[0]["role"] == "user" and "Aya" in problems[0].messages[0]["content"]
    amc = PromptDataset(open_source("preset:amc23", data_dir=shared_data), seed=0).all_examples()
    assert len(amc) == 40 and amc[0].answer == "27"  # stored as 27.0
    gsm = open_source("preset:gsm8k", data_dir=shared_data)
    first = PromptDataset(gsm, seed=0, max_examples=3).all_examples()
    assert len(gsm) == 1319 and first[0].answer == "18" and first[0].source == "gsm8k"


def test_source_from_config(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "sol": "1"}])
    s = source_from_config(DataConfig(source=f"jsonl:{path}", prompt_field="problem", answer_field="sol"))
    assert s.extract(s[0]) == ([{"role": "user", "content": "p"}], "1")
    # presets keep their own fields even though DataConfig defaults say question/answer/train
    _write_jsonl(tmp_path / "aime24.jsonl", [{"problem": "Find x.", "answer": "7"}])
    p = source_from_config(DataConfig(source="preset:aime24"), data_dir=str(tmp_path))
    assert p.extract(p[0]) == ([{"role": "user", "content": "Find x."}], "7") and p.name == "aime24"


# ---------------------------------------------------------------------------------------------------------------
# PromptDataset: order, resume, slices
# ---------------------------------------------------------------------------------------------------------------


def _ds(n=24, **kw):
    return PromptDataset(ListSource(ROWS[:n], name="toy"), **kw)


def test_deterministic_shuffle_and_epochs():
    a, b, c = _ds(seed=3), _ds(seed=3), _ds(seed=4)
    ea, eb, ec = a.next_batch(24), b.next_batch(24), c.next_batch(24)
    assert _ids(ea) == _ids(eb) and _ids(ea) != _ids(ec)
    assert sorted(_ids(ea)) == list(range(24)) and _ids(ea) != list(range(24))
    e1 = a.next_batch(24)  # epoch 1: another permutation of all rows
    assert sorted(_ids(e1)) == list(range(24)) and _ids(e1) != _ids(ea) and a.epoch == 1
    assert ea[0].source == "toy" and ea[0].messages[0]["role"] == "user"
    assert _ids(_ds(seed=3, shuffle=False).next_batch(5)) == [0, 1, 2, 3, 4]
    assert sorted(_ids(_ds(seed=0, max_examples=5).next_batch(5))) == [0, 1, 2, 3, 4]


def test_resume_gives_same_batches():
    ds = _ds(seed=7)
    ds.next_batch(5)
    ds.next_batch(9)  # position straddles nothing yet; go past an epoch boundary below
    ds.next_batch(13)
    state = json.loads(json.dumps(ds.state()))  # JSON round trip, as a checkpoint would store it
    expected = [_ids(ds.next_batch(6)) for _ in range(6)]
    fresh = _ds(seed=7)
    fresh.restore(state)
    assert [_ids(fresh.next_batch(6)) for _ in range(6)] == expected
    # another seed or process count: a one-line user error naming what differs (issue #23; was a ValueError)
    with pytest.raises(DataError, match="seed: the checkpoint has 7, now 8"):
        _ds(seed=8).restore(state)
    with pytest.raises(DataError, match="process_count"):
        _ds(seed=7, process_count=2).restore(state)


@pytest.mark.parametrize("n_rows,procs", [(24, 2), (25, 3)])
def test_per_host_slices(n_rows, procs):
    n = 4  # per-process rows per batch
    single = _ds(n_rows, seed=11)
    hosts = [_ds(n_rows, seed=11, process_index=p, process_count=procs) for p in range(procs)]
    usable = (n_rows // procs) * procs  # each epoch drops the N % P tail of the permutation
    for _ in range(5):  # crosses epoch boundaries
        parts = [_ids(h.next_batch(n)) for h in hosts]
        flat = [parts[p][k] for k in range(n) for p in range(procs)]  # global row g lives on process g % P
        assert len(set(flat)) == len(flat)  # disjoint within a batch
        assert flat == _ids(_take_global(single, n * procs, usable))
    # one epoch of the slices covers the usable part of the permutation exactly once, disjointly
    hosts = [_ds(n_rows, seed=5, process_index=p, process_count=procs) for p in range(procs)]
    per = [set(_ids(h.next_batch(n_rows // procs))) for h in hosts]
    assert sum(len(s) for s in per) == usable and len(set().union(*per)) == usable


def _take_global(single: PromptDataset, k: int, usable: int) -> list[Example]:
    """The single-process reference with the same per-epoch tail drop as a P-process run."""
    out = []
    while len(out) < k:
        order = single._order(single.epoch)
        if single.position >= usable:
            single.epoch, single.position = single.epoch + 1, 0
            continue
        out.append(single._make(int(order[single.position])))
        single.position += 1
    return out


def test_per_host_union_equals_single_process_when_divisible():
    single = _ds(24, seed=2).next_batch(24)
    hosts = [_ds(24, seed=2, process_index=p, process_count=3).next_batch(8) for p in range(3)]
    assert [hosts[g % 3][g // 3].index for g in range(24)] == _ids(single)


def test_streaming_source_slices_and_resume(tmp_path):
    d = tmp_path / "repo"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", ROWS[:10])
    stream = open_source(f"hf:{d}", streaming=True)
    single = PromptDataset(stream, seed=0, shuffle=False).next_batch(10)
    assert _ids(single) == list(range(10))
    # with bad rows: every process validates the whole stream, so the union is still the single-process order
    holes = tmp_path / "holes"
    holes.mkdir()
    _write_jsonl(holes / "train.jsonl", [dict(r, question="" if r["id"] in (2, 3, 7) else r["question"])
                                         for r in ROWS[:10]])
    hs = open_source(f"hf:{holes}", streaming=True)
    ref = _ids(PromptDataset(hs, seed=0, shuffle=False).next_batch(6))
    assert ref == [0, 1, 4, 5, 6, 8]
    parts = [_ids(PromptDataset(hs, seed=0, shuffle=False, process_index=p, process_count=2).next_batch(3))
             for p in range(2)]
    assert parts == [[0, 4, 6], [1, 5, 8]]
    hosts = [PromptDataset(stream, seed=0, shuffle=False, process_index=p, process_count=2) for p in range(2)]
    parts = [_ids(h.next_batch(5)) for h in hosts]
    assert parts == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    h = PromptDataset(stream, seed=0, process_index=1, process_count=2)
    h.next_batch(3)
    st = h.state()
    expected = [_ids(h.next_batch(4)) for _ in range(3)]
    h2 = PromptDataset(stream, seed=0, process_index=1, process_count=2)
    h2.restore(st)
    assert [_ids(h2.next_batch(4)) for _ in range(3)] == expected


# ---------------------------------------------------------------------------------------------------------------
# skips
# ---------------------------------------------------------------------------------------------------------------


def test_bad_rows_are_counted_and_reported(tmp_path):
    rows = [dict(r) for r in ROWS[:10]]
    rows[1] = {"answer": "2"}  # no question
    rows[2]["question"] = "   "  # empty prompt
    rows[3]["question"] = "long " * 50  # over the token budget
    del rows[4]["answer"]  # answer field named but missing
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows, extra_lines=["{broken"])
    tok = lambda ex: ex.messages[-1]["content"].split()

    def make(**kw):
        return PromptDataset(open_source(f"jsonl:{path}"), seed=0, max_prompt_tokens=20, tokenize=tok,
                             shuffle=False, **kw)

    ds = make()
    ids = _ids(ds.next_batch(11))  # every slot of one epoch
    good = [0, 5, 6, 7, 8, 9]
    assert [ids[k] for k in good] == good  # valid rows sit in their own slots
    assert all(i in good for i in ids)  # bad slots hold deterministic substitutes drawn from valid rows
    assert ids == _ids(make().next_batch(11))
    assert ds.stats.counts == {"missing_field": 2, "empty_prompt": 1, PROMPT_TOO_LONG: 1, "bad_format": 1}
    assert ds.stats.kept == 11 and ds.stats.skipped == 5
    report = ds.report()
    for word in ("mixed", "11 rows kept, 5 skipped", "missing_field: 2", "prompt_too_long", "row 3", "invalid JSON",
                 "no prompt field 'question'"):
        assert word in report, (word, report)
    # skip counts survive a resume
    again = make()
    again.restore(ds.state())
    assert again.stats.counts == ds.stats.counts
    # truncate_prompts keeps the long prompt and counts it as truncated instead
    keep = make(truncate_prompts=True)
    assert _ids(keep.next_batch(4))[3] == 3 and keep.stats.truncated == 1 and PROMPT_TOO_LONG not in keep.stats.counts


def test_per_host_union_with_bad_rows_and_shared_state():
    rows = [dict(r) for r in ROWS]
    for i in (1, 5, 6, 13, 20):
        rows[i]["question"] = ""
    src = ListSource(rows, name="holes")
    single = PromptDataset(src, seed=4)
    hosts = [PromptDataset(src, seed=4, process_index=p, process_count=3) for p in range(3)]
    for _ in range(4):  # 4 x 6 x 3 = 72 rows: three epochs
        ref = _ids(single.next_batch(18))
        parts = [_ids(h.next_batch(6)) for h in hosts]
        assert [parts[g % 3][g // 3] for g in range(18)] == ref
        assert all(i not in (1, 5, 6, 13, 20) for i in ref)
    states = [h.state() for h in hosts]
    assert all({k: v for k, v in st.items() if k != "stats"} == {k: v for k, v in states[0].items() if k != "stats"}
               for st in states)
    # the primary host's state restores every host
    expected = [_ids(h.next_batch(5)) for h in hosts]
    fresh = [PromptDataset(src, seed=4, process_index=p, process_count=3) for p in range(3)]
    for f in fresh:
        f.restore(json.loads(json.dumps(states[0])))
    assert [_ids(f.next_batch(5)) for f in fresh] == expected


@pytest.mark.parametrize("shuffle", [True, False])
def test_all_bad_rows_raise(tmp_path, shuffle):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": ""}, {"prompt": "x"}, {"question": "  "}])
    ds = PromptDataset(open_source(f"jsonl:{path}", answer_field=None), seed=0, shuffle=shuffle)
    with pytest.raises(DataError) as e:
        ds.next_batch(1)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "empty_prompt: 2" in msg and "missing_field: 1" in msg
    with pytest.raises(DataError):
        PromptDataset(open_source(f"jsonl:{path}", answer_field=None), seed=0).all_examples()


def test_all_bad_stream_raises(tmp_path):
    d = tmp_path / "repo"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", [{"question": "", "answer": "1"}] * 4)
    ds = PromptDataset(open_source(f"hf:{d}", streaming=True), seed=0, process_count=2, process_index=1)
    with pytest.raises(DataError, match="empty_prompt"):
        ds.next_batch(1)


def test_rare_valid_row_is_found():
    """One valid row among many bad ones, two processes: no false 'all bad' error, no endless loop."""
    rows = [{"question": ""} for _ in range(9)] + [{"question": "ok"}]
    hosts = [PromptDataset(ListSource(rows, answer_field=None), seed=1, process_index=p, process_count=2)
             for p in range(2)]
    for h in hosts:
        assert _ids(h.next_batch(2)) == [9, 9]


def test_too_few_rows_for_processes():
    with pytest.raises(DataError, match="processes"):
        _ds(2, seed=0, process_index=0, process_count=3)


def _conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


# ---------------------------------------------------------------------------------------------------------------
# with the real renderer and the offline test tokenizer
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_budget_with_qwen3_renderer(tmp_path):
    from fixtures_tokenizer import make_tokenizer_dir

    from opd_jax.baselines.sft import pack_rows
    from opd_jax.data.renderers import get_renderer, load_tokenizer

    r = get_renderer("qwen3", load_tokenizer(make_tokenizer_dir(tmp_path / "tok")))
    rows = [{"question": "What is 1 + 2?", "answer": "3"}, {"question": "word " * 200, "answer": "0"}]
    ds = PromptDataset(ListSource(rows), seed=0, max_prompt_tokens=64, shuffle=False,
                       tokenize=lambda ex: r.build_prompt(ex.messages))
    assert _ids(ds.next_batch(2)) == [0, 0] and ds.stats.counts == {PROMPT_TOO_LONG: 1}
    convs = ListSource([{"m": _conv("What is 1 + 2?", "3")}], prompt_field="m", answer_field=None)
    rows = [r.build_conversation(ex.messages) for ex in PromptDataset(convs, seed=0).all_examples()]
    b, _ = pack_rows(rows, 64)
    prompt = r.build_prompt(_conv("What is 1 + 2?", "3")[:1])
    assert b["tokens"][0, : len(prompt)].tolist() == prompt  # SFT rows start with the exact sampling prompt
    assert b["loss_mask"][0, : len(prompt)].sum() == 0 and b["loss_mask"][0, len(prompt):].sum() > 0


def test_shared_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OPD_SHARED_DATA", str(tmp_path))
    assert src_mod.shared_data_dir() == str(tmp_path)
    monkeypatch.setenv("OPD_SHARED_DATA", str(tmp_path / "missing"))
    assert src_mod.shared_data_dir() is None
    assert os.path.isdir(tmp_path)
