"""A user's language-model data: files of every kind read to the same rows, the three formats' labels (chat masking
token by token on SmolLM2's real tokenizer and template), packing equal to unpacked, and one-line errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from distil.data.files import read_rows, resolve_paths
from distil.data.formats import IGNORE, Columns, Example, chat_example, to_messages, tokenize_rows
from distil.data.packing import pack_examples, packed_batch, padded_batch
from distil.errors import DistilError

ROWS = [{"prompt": "To be, or not to be:", "completion": " that is the question."},
        {"prompt": "Friends, Romans, countrymen,", "completion": " lend me your ears."},
        {"prompt": "Now is the winter", "completion": " of our discontent."}]
CHAT = [{"role": "system", "content": "You speak like Hamlet."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Words, words, words."},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "The rest is silence."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2.folder)


def write_all_kinds(folder) -> dict[str, object]:
    import datasets

    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (folder / "d.json").write_text(json.dumps(ROWS), encoding="utf-8")
    with open(folder / "d.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(ROWS)
    datasets.Dataset.from_list(ROWS).to_parquet(str(folder / "d.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(folder / "saved_dict"))
    return {name: folder / name for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved", "saved_dict")}


def test_every_file_kind_reads_to_the_same_rows(tmp_path):
    for name, path in write_all_kinds(tmp_path).items():
        assert read_rows(resolve_paths(str(path))) == ROWS, name
    # A glob over several files: every row of each, files in sorted order.
    assert read_rows(resolve_paths(str(tmp_path / "d.js*"))) == ROWS + ROWS  # d.json, then d.jsonl
    assert len(read_rows(resolve_paths([str(tmp_path / "d.csv"), str(tmp_path / "d.json")]))) == 6


def test_a_csv_field_over_several_lines_keeps_its_newlines(tmp_path):
    rows = [{"prompt": "Write two lines:", "completion": "To be, or not to be,\nthat is the question."}]
    with open(tmp_path / "multi.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    assert read_rows(resolve_paths(str(tmp_path / "multi.csv"))) == rows


def test_bad_files_are_one_line_each(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion: "b"}\n', encoding="utf-8")
    with pytest.raises(DistilError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(resolve_paths(str(bad)))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DistilError, match="not UTF-8"):
        read_rows(resolve_paths(str(latin)))
    with pytest.raises(DistilError, match="matches no file"):
        resolve_paths(str(tmp_path / "missing-*.jsonl"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DistilError, match="not a Hugging Face dataset saved with save_to_disk"):
        resolve_paths(str(tmp_path / "plain"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DistilError, match="not a JSONL, JSON, parquet or CSV"):
        resolve_paths(str(tmp_path / "notes.txt"))


def test_text_and_prompt_completion_labels(tokenizer):
    (doc,), _ = tokenize_rows([{"text": "Shall I compare thee"}], tokenizer, "text", max_length=64)
    assert doc.labels == doc.input_ids and doc.input_ids[-1] == tokenizer.eos_token_id
    examples, _ = tokenize_rows(ROWS, tokenizer, "prompt_completion", max_length=64)
    for row, example in zip(ROWS, examples):
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert example.input_ids == prompt + answer
        assert example.labels == [IGNORE] * len(prompt) + answer


def test_chat_trains_on_every_assistant_turn_only_token_by_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    example = chat_example(tok, CHAT)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.decode(example.input_ids) == text  # the template's own rendering, token for token
    trained = [i for i, label in enumerate(example.labels) if label != IGNORE]
    assert all(example.labels[i] == example.input_ids[i] for i in trained)
    # The trained tokens are exactly the two assistant turns, each with its end-of-turn marker.
    runs, current = [], [trained[0]]
    for i in trained[1:]:
        if i == current[-1] + 1:
            current.append(i)
        else:
            runs.append(current)
            current = [i]
    runs.append(current)
    assert [tok.decode([example.input_ids[i] for i in run]) for run in runs] == \
        ["Words, words, words.<|im_end|>\n", "The rest is silence.<|im_end|>\n"]
    context = tok.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE])
    assert "How are you?" in context and "You speak like Hamlet." in context and "Words" not in context


def test_sharegpt_conversations_map_to_roles_and_bad_turns_are_named():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert to_messages(row, Columns(), "row 1") == [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello"}]
    with pytest.raises(DistilError, match="row 3: unknown role 'narrator'"):
        to_messages({"messages": [{"role": "narrator", "content": "x"}]}, Columns(), "row 3")
    no_messages = r"no 'messages' \(or ShareGPT 'conversations'\) column; the row has \['text'\]"
    with pytest.raises(DistilError, match=no_messages):
        to_messages({"text": "x"}, Columns(), "row 1")


def test_missing_columns_truncation_and_empty_results_are_reported(tokenizer, smollm2_tokenizer):
    with pytest.raises(DistilError, match=r"row 1: no column 'completion' for format prompt_completion; the row has "
                                          r"\['prompt', 'response'\]"):
        tokenize_rows([{"prompt": "a", "response": "b"}], tokenizer, "prompt_completion", max_length=8)
    long = {"prompt": "word " * 3, "completion": " answer" * 40}
    examples, tally = tokenize_rows([long, ROWS[0]], tokenizer, "prompt_completion", max_length=48)
    assert tally.truncated == 1 and [len(e.input_ids) for e in examples][0] == 48
    # A prompt longer than max_length leaves nothing to train on: dropped and counted, then nothing left at all.
    with pytest.raises(DistilError, match="no example left to train on .*1 with no trained token within max_length"):
        tokenize_rows([{"prompt": "word " * 30, "completion": " yes"}], tokenizer, "prompt_completion", max_length=4)
    users_only = {"messages": [{"role": "user", "content": "hello?"}]}
    examples, tally = tokenize_rows([users_only, {"messages": CHAT}], smollm2_tokenizer, "chat", max_length=512)
    assert len(examples) == 1 and tally.dropped["conversations without an assistant turn"] == 1
    assert "1 of 2 examples kept" in tally.describe()


def test_packing_masks_each_first_token_and_restarts_positions():
    examples = [Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [IGNORE, 9]), Example([1, 2, 3, 4], [1, 2, 3, 4])]
    blocks = pack_examples(examples, block=6)
    assert [(b.input_ids, b.labels, pos) for b, pos in blocks] == [
        ([5, 6, 7, 8, 9], [IGNORE, 6, 7, IGNORE, 9], [0, 1, 2, 0, 1]),
        ([1, 2, 3, 4], [IGNORE, 2, 3, 4], [0, 1, 2, 3])]
    batch = packed_batch(blocks, pad_id=0, block=6)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch["labels"][0, 5] == IGNORE and batch["attention_mask"] is None


def test_packed_equals_unpacked_per_example(tiny_lm):
    """In fp64 (so that only the arithmetic's order differs): each example's logits inside a packed block equal its
    logits alone, and the causal-LM loss of a packed batch equals that of the padded batch of the same examples."""
    from transformers import AutoModelForCausalLM

    from distil.distill.lm import CausalLMObjective
    from distil.distill.objectives import LogitLoss
    from distil.distill.pair import Teacher

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, [IGNORE] * 2 + ids[2:]) for n in (7, 5, 9, 3)
                for ids in [torch.randint(2, 300, (n,), generator=g).tolist()]]
    blocks = pack_examples(examples, block=16)
    assert len(blocks) == 2  # 7 + 5 | 9 + 3: two examples share each block
    packed = packed_batch(blocks, pad_id=1, block=16)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        start = {0: 0, 1: 7, 2: 0, 3: 9}
        for k, example in enumerate(examples):
            alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            inside = logits[k // 2, start[k]: start[k] + len(example.input_ids)]
            torch.testing.assert_close(inside, alone, rtol=1e-10, atol=1e-10)

    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float64).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float64)
    for fused in (True, False):
        objective = CausalLMObjective(student, Teacher(teacher), LogitLoss(fused=fused),
                                      vocab_size=model.config.vocab_size, device=torch.device("cpu"))
        with torch.no_grad():
            a, b = objective.loss(packed), objective.loss(padded_batch(examples, pad_id=1))
        assert objective.weight(packed) == objective.weight(padded_batch(examples, pad_id=1))
        # The fused path stays in fp64; the plain one takes the losses in fp32 (logits.float()): a sum over ~30
        # tokens then rounds differently in the two orders, by a few fp32 ulps (eps 1.2e-7) per term.
        rtol = 1e-10 if fused else 30 * torch.finfo(torch.float32).eps
        for key in ("loss", "ce", "kd"):
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=1e-12)


def test_a_users_jsonl_through_load_lm_dataset_and_distill(tiny_lm, tmp_path):
    """prompt/completion JSONL -> packed training rows and held-out rows -> distil.distill, which trains on the
    packed blocks and scores the held-out completions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distil

    rows = [{"prompt": f"Line {i}: to be", "completion": f" or not to be, {i} times"} for i in range(40)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    data = distil.load_lm_dataset(str(tmp_path / "mine.jsonl"), tokenizer, format="prompt_completion",
                                  max_length=48, packing=True, eval_fraction=0.1, seed=0)
    assert len(data.eval) == 4 and "40 of 40 examples kept" in data.describe()
    assert all("position_ids" in r and len(r["input_ids"]) <= 48 for r in data.train)
    assert sum(r["position_ids"].count(0) for r in data.train) == 36  # every training example, once
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm)
    student = distil.make_student(teacher, num_layers=1)
    result = distil.distill(teacher, student, data.train, eval_data=data.eval, tokenizer=tokenizer, steps=2,
                            batch_size=2, output_dir=tmp_path / "run", report=False)
    assert result.summary["arms"]["distilled"]["perplexity"] > 1.0


def test_a_json_array_cut_off_inside_a_record_reads_to_the_last_complete_one(tmp_path, capsys):
    from distil.data.builtin import _complete_records

    records = [{"id": i, "conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(3)]
    whole = json.dumps(records, indent=2)
    (tmp_path / "whole.json").write_text(whole, encoding="utf-8")
    assert _complete_records(tmp_path / "whole.json") == records
    cut = whole[: whole.rindex('"q2"') + 2]  # inside the third record's string
    (tmp_path / "cut.json").write_text(cut, encoding="utf-8")
    assert _complete_records(tmp_path / "cut.json") == records[:2]
    assert "ends inside record 3; read the 2 complete records before it" in capsys.readouterr().err


def test_builtin_chat_datasets_read_as_chat_rows():
    from distil.data.builtin import BUILTIN, builtin_rows
    from distil.errors import DistilError

    for name, expected in (("sharegpt", 17_671), ("chitchat", 4_018), ("humaneval", 164)):
        try:
            BUILTIN[name].path()
        except DistilError as exc:
            pytest.skip(str(exc))
        rows = builtin_rows(name)
        assert len(rows) == expected  # sharegpt: the complete records; chitchat: the conversations of two speakers
        if name == "humaneval":
            assert rows[0]["prompt"].startswith("from typing import List") and "return" in rows[0]["completion"]
            continue
        messages = to_messages(rows[0], Columns(), name)
        assert messages[0]["role"] == "user" and any(m["role"] == "assistant" for m in messages)


def test_a_dataset_held_out_whole_is_one_line(tokenizer, tmp_path):
    import distil

    (tmp_path / "one.jsonl").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    with pytest.raises(DistilError, match="1 rows, all held out for evaluation: none left to train on"):
        distil.load_lm_dataset(str(tmp_path / "one.jsonl"), tokenizer, format="prompt_completion", eval_fraction=0.05)
