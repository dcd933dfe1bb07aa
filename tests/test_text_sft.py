"""SFT on text conversations: TextTask renders whole conversations with the loss on assistant tokens only."""

import json

from fixtures_tokenizer import make_tokenizer_dir

from opd_jax.config import load_config
from opd_jax.data.text_task import TextTask


def test_sft_examples_mask_assistant_tokens_and_skip_prompt_only_rows(tmp_path):
    tok_dir = make_tokenizer_dir(str(tmp_path / "tok"))
    rows = [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "\\boxed{4}"}]},
        {"messages": [{"role": "user", "content": "No answer here"}]},  # no assistant turn: a counted bad row
        {"messages": [{"role": "user", "content": "Name 3."}, {"role": "assistant", "content": "three"}]},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(None, [
        "algorithm=sft", f"data.source=jsonl:{path}", "data.prompt_field=messages", "data.answer_field=",
        f"data.tokenizer={tok_dir}", "data.renderer=qwen3_nothink", "sampling.max_prompt_len=64",
        "sampling.max_new_tokens=64",
    ])
    task = TextTask(cfg)
    examples = task.sft_examples(4)
    assert len(examples) == 4
    for tokens, mask in examples:
        assert len(tokens) == len(mask) and 0 < sum(mask) < len(mask)
        learned = task.tokenizer.decode([t for t, m in zip(tokens, mask, strict=True) if m])
        assert learned.endswith("<|im_end|>")
        assert ("4" in learned) or ("three" in learned)
        assert "What is" not in learned and "Name 3" not in learned  # the prompt is never a target
    assert "assistant" in task.skip_report()
