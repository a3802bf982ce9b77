"""Recipes whose student has a tokenizer of its own (task causal_lm, distil.tasks.cross_lm), on two tiny Llamas with
byte-level BPE tokenizers of different vocabularies (384 and 640) and a prompt-completion JSONL made here."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from distil.cli import main
from distil.config.load import validate_recipe
from distil.data.formats import IGNORE
from distil.data.pairs import pair_batch
from distil.runner import check, run_recipe

PROMPTS = ["Shall I compare thee", "Thou art more lovely", "Rough winds do shake", "And summer's lease hath",
           "Sometime too hot the eye", "And often is his gold", "And every fair from fair", "By chance, or nature's"]
ANSWERS = [" to a summer's day?", " and more temperate:", " the darling buds of May,", " all too short a date;",
           " of heaven shines,", " complexion dimm'd;", " sometime declines,", " changing course untrimm'd;"]


@pytest.fixture(scope="module")
def pair(tiny_lm, tmp_path_factory):
    from tests.conftest import build_tiny_lm

    return tiny_lm, build_tiny_lm(tmp_path_factory.mktemp("teacher-640"), vocab=640, seed=3)


@pytest.fixture
def data_file(tmp_path):
    rows = [{"prompt": p, "completion": a} for p, a in zip(PROMPTS * 2, ANSWERS * 2)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(pair, data_file, run_dir, **extra):
    student, teacher = pair
    recipe = {
        "name": "two-tokenizers", "task": "causal_lm", "seed": 0, "output_dir": str(run_dir),
        "data": {"kind": "dataset", "path": str(data_file), "format": "prompt_completion", "max_length": 48,
                 "packing": False, "eval_fraction": 0.25},
        "teacher": {"model": {"arch": "hf", "source": str(teacher)}},
        "student": {"model": {"arch": "hf", "source": str(student)}},
        "loss": {"alpha": 0.5, "temperature": 1.0},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1},
        "generate": {"max_new_tokens": 6, "batch_size": 4, "num_prompts": 8},
        "latency_runs": 1, "generations_shown": 1,
    }
    for key, value in extra.items():
        section, _, field = key.partition("__")
        if field:
            recipe[section] = {**recipe[section], field: value}
        else:
            recipe[section] = value
    return validate_recipe(recipe)


def test_prompt_tokens_are_context_for_both_models(pair):
    """With trained_from, tokens that start before the completion are not labels of either model, and no aligned
    position predicts one."""
    s_tok, t_tok = AutoTokenizer.from_pretrained(pair[0]), AutoTokenizer.from_pretrained(pair[1])
    texts = [p + a for p, a in zip(PROMPTS[:3], ANSWERS[:3])]
    kwargs = {"max_length": 48, "student_pad": s_tok.pad_token_id, "teacher_pad": t_tok.pad_token_id}
    plain = pair_batch(texts, s_tok, t_tok, **kwargs)
    batch = pair_batch(texts, s_tok, t_tok, trained_from=[len(p) for p in PROMPTS[:3]], **kwargs)
    for b, (prompt, text) in enumerate(zip(PROMPTS, texts)):
        for tokenizer, ids, labels in ((s_tok, "input_ids", "labels"), (t_tok, "teacher_input_ids", "teacher_labels")):
            offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
            want = [t if begin >= len(prompt) else IGNORE for t, (begin, _) in zip(batch[ids][b].tolist(), offsets)]
            assert batch[labels][b, : len(offsets)].tolist() == want
            assert tokenizer.decode([t for t in want if t != IGNORE]).strip() == text[len(prompt):].strip()
    targets = batch["labels"].flatten()[batch["student_index"] + 1]
    assert (targets != IGNORE).all() and 0 < len(targets) < len(plain["student_index"])


def test_validate_says_the_pair_uses_two_tokenizers_and_refuses_what_does_not_apply(pair, data_file, tmp_path,
                                                                                    capsys):
    recipe = _recipe(pair, data_file, tmp_path / "run")
    assert check(recipe) == []
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe.model_dump(mode="json")))
    assert main(["validate", str(path)]) == 0
    assert "# pair: two tokenizers (student vocabulary 384, teacher 640)" in capsys.readouterr().out
    packed = _recipe(pair, data_file, tmp_path / "run", data__packing=True)
    assert check(packed) == ["with two tokenizers each text is aligned on its own: set data.packing: false"]
    (line,) = check(_recipe(pair, data_file, tmp_path / "run", arms=["logit_kd"]))
    assert "arms are student_alone and distilled" in line
    (line,) = check(_recipe(pair, data_file, tmp_path / "run", train__batch_size=64))
    assert "exceeds the 12 training rows" in line


@pytest.mark.parametrize("method, loss", [("logits", "mapped_kl"), ("response", "mapped_kl"), ("onpolicy", "uld")])
def test_recipe_trains_both_arms_and_scores_every_model_in_bits_per_byte(pair, data_file, tmp_path, method, loss):
    arms = ["student_alone", "distilled"] if (method, loss) == ("logits", "mapped_kl") else ["distilled"]
    extra = {"onpolicy": {"lmbda": 1.0, "max_new_tokens": 6}} if method == "onpolicy" else {}
    recipe = _recipe(pair, data_file, tmp_path / "run", method="response" if method == "response" else "logits",
                     loss__cross_tokenizer=loss, arms=arms, **extra)
    summary = run_recipe(recipe, show_progress=False)
    rows = summary["arms"]
    assert list(rows) == ["teacher", "student_init", *arms]
    for row in rows.values():
        assert 0 < row["bits_per_byte"] < 40 and row["perplexity"] > 1 and "agreement" not in row
    assert summary["metrics"] == ["bits_per_byte", "perplexity"]
    assert rows["teacher"]["params"] > rows["student_init"]["params"]
    assert len(AutoTokenizer.from_pretrained(tmp_path / "run" / "student")) == 384
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    distilled = [r for r in logged if r.get("arm") == "distilled" and "loss/ce" in r]
    assert distilled, logged
    if method == "onpolicy":  # every step on the student's samples: the soft term alone (T = 1)
        assert all(r["loss"] == pytest.approx(r["loss/kd"], rel=1e-6) and r["loss/kd"] > 0 for r in distilled)
    if method in ("logits", "onpolicy"):  # the soft term across tokenizers was in the loss
        assert all(r["loss/kd"] > 0 for r in distilled)
        # trained: the student moved away from its initial weights
        assert rows["distilled"]["bits_per_byte"] != rows["student_init"]["bits_per_byte"]
    if method == "response":  # the teacher's answers, one per distinct training prompt, are what the arm read
        answers = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
        prompts = [a["prompt"] for a in answers]
        assert len(set(prompts)) == len(prompts) > 4 and set(prompts) <= set(PROMPTS)
    assert torch.isfinite(torch.tensor([r["bits_per_byte"] for r in rows.values()])).all()


def test_on_policy_samples_are_read_by_both_tokenizers_and_only_the_sampled_text_is_trained(pair):
    from transformers import AutoModelForCausalLM

    from distil.data.alignment import vocab_map
    from distil.distill.cross_tokenizer import CrossTokenizerLoss, CrossTokenizerObjective, Tokenizers
    from distil.distill.lm import OnPolicy
    from distil.distill.pair import Teacher

    s_tok, t_tok = AutoTokenizer.from_pretrained(pair[0]), AutoTokenizer.from_pretrained(pair[1])
    student, teacher = (AutoModelForCausalLM.from_pretrained(path) for path in pair)
    objective = CrossTokenizerObjective(student, Teacher(teacher), CrossTokenizerLoss(), vocab=vocab_map(s_tok, t_tok),
                                        device=torch.device("cpu"), onpolicy=OnPolicy(lmbda=1.0, max_new_tokens=8),
                                        tokenizers=Tokenizers(s_tok, t_tok, 48))
    texts = [p + a for p, a in zip(PROMPTS[:2], ANSWERS[:2])]
    batch = pair_batch(texts, s_tok, t_tok, max_length=48, student_pad=s_tok.pad_token_id,
                       teacher_pad=t_tok.pad_token_id, trained_from=[len(p) for p in PROMPTS[:2]])
    torch.manual_seed(0)
    (sampled,) = objective.prepare([batch], step=0)
    assert "onpolicy" in sampled
    for b, prompt in enumerate(PROMPTS[:2]):
        ids = sampled["input_ids"][b][sampled["attention_mask"][b].bool()].tolist()
        text = s_tok.decode(ids)
        assert text.startswith(prompt) and text != texts[b]  # the prompt, then the student's own words
        trained = [t for t in sampled["labels"][b].tolist() if t != IGNORE]
        assert s_tok.decode(trained) == text[len(prompt):]
        t_trained = [t for t in sampled["teacher_labels"][b].tolist() if t != IGNORE]
        assert t_tok.decode(t_trained).strip() == text[len(prompt):].strip()
    terms = objective.loss(sampled)
    assert torch.equal(terms["loss"], terms["kd"]) and terms["kd"] > 0  # T = 1: the soft term alone
    torch.manual_seed(0)
    assert objective.prepare([batch], step=0)[0]["input_ids"].tolist() == sampled["input_ids"].tolist()  # seeded


TEACHER_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
                    "{% if add_generation_prompt %}### assistant:\n{% endif %}")


@pytest.fixture(scope="module")
def chat_pair_models(pair, chat_lm, tmp_path_factory):
    """The student with ChatML, the teacher (another vocabulary) with a '### role:' template."""
    import shutil

    folder = tmp_path_factory.mktemp("teacher-chat")
    shutil.copytree(pair[1], folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEACHER_TEMPLATE
    tokenizer.save_pretrained(folder)
    return chat_lm, folder


CHATS = [[{"role": "user", "content": p}, {"role": "assistant", "content": a.strip()}] for p, a in zip(PROMPTS, ANSWERS)]


def test_conversations_are_rendered_by_each_template_and_aligned_inside_the_contents(chat_pair_models):
    from distil.data.formats import render
    from distil.data.pairs import chat_pair, content_spans

    s_tok, t_tok = (AutoTokenizer.from_pretrained(path) for path in chat_pair_models)
    messages = [{"role": "user", "content": "Shall I compare thee — café?"},
                {"role": "assistant", "content": "Thou art more lovely, 東京 🙂"}]
    row = chat_pair(messages, s_tok, t_tok, max_length=96)
    renderings = {}
    for who, tokenizer, ids, labels in (("student", s_tok, row.student_ids, row.student_labels),
                                        ("teacher", t_tok, row.teacher_ids, row.teacher_labels)):
        text = render(tokenizer, messages)
        assert "<|im_start|>" in text if who == "student" else "### assistant:" in text
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert encoded["input_ids"] == ids
        trained = tokenizer.decode([t for t in labels if t != IGNORE])
        assert trained.startswith(messages[1]["content"]) and messages[0]["content"] not in trained
        renderings[who] = (text, encoded["offset_mapping"], content_spans(text, messages, who))

    def where(who, position):  # (message, character inside its content) where the prefix ends
        text, offsets, spans = renderings[who]
        end = offsets[position][1]
        return next((k, end - a) for k, (a, b) in enumerate(spans) if a <= end <= b)

    pairs = list(zip(row.alignment.student.tolist(), row.alignment.teacher.tolist()))
    assert len(pairs) >= 5
    for s, t in pairs:
        assert where("student", s) == where("teacher", t) and where("student", s)[0] == 1  # in the answer
        assert row.student_labels[s + 1] != IGNORE
    # ... and every character boundary inside the answer that both tokenizations share is aligned, unless the next
    # token is template text (end of turn: each model's own)
    def answer_ends(who):
        _, offsets, spans = renderings[who]
        a, b = spans[1]
        return {where(who, i) for i in range(len(offsets) - 1)
                if a <= offsets[i][1] < b and offsets[i][1] != offsets[i + 1][1]  # not inside a character
                and offsets[i + 1][1] <= b}

    assert {where("student", s) for s, _ in pairs} == answer_ends("student") & answer_ends("teacher")


def test_a_chat_recipe_with_two_templates_trains_and_scores(chat_pair_models, tmp_path):
    rows = [{"messages": m} for m in CHATS * 2]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(chat_pair_models, data, tmp_path / "run", arms=["distilled"], data__format="chat",
                     data__max_length=96)
    assert check(recipe) == []
    summary = run_recipe(recipe, show_progress=False)
    assert set(summary["arms"]) == {"teacher", "student_init", "distilled"}
    assert all(0 < row["bits_per_byte"] < 40 for row in summary["arms"].values())
    assert summary["generations"][0]["prompt"] in PROMPTS
    from distil.errors import DistilError

    with pytest.raises(DistilError, match="no held-out example keeps a trained token within data.max_length"):
        run_recipe(_recipe(chat_pair_models, data, tmp_path / "short", data__format="chat", data__max_length=40),
                   show_progress=False)  # every answer starts past 40 tokens: refused before any model loads
    assert check(_recipe(chat_pair_models, data, tmp_path / "run", data__format="chat", data__max_length=96,
                         onpolicy={"lmbda": 1.0})) == [
        "on-policy steps across tokenizers continue plain prompts: use format prompt_completion or text, or remove "
        "onpolicy"]
