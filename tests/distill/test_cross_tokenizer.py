"""The cross-tokenizer objective on real tiny LMs with byte-level BPE tokenizers of different vocabularies: with one
tokenizer on both sides it is forward KL at every position; micro-batches accumulate exactly; spellings by several
teacher tokens are scored by the teacher's chain of probabilities."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distil.data.alignment import vocab_map
from distil.data.pairs import pair_batch
from distil.distill.cross_tokenizer import CrossTokenizerLoss, CrossTokenizerObjective, spelling_logprobs
from distil.distill.pair import Teacher
from distil.losses import forward_kl

TEXTS = ["Shall I compare thee to a summer's day?", "Thou art more lovely — and more temperate: café 東京"]


@pytest.fixture(scope="module")
def pair(tiny_lm, tmp_path_factory):
    """The session's tiny LM (vocabulary 384) as the student; a teacher of another vocabulary (640)."""
    from tests.conftest import build_tiny_lm

    teacher = build_tiny_lm(tmp_path_factory.mktemp("teacher-640"), vocab=640, seed=3)
    return (tiny_lm, AutoTokenizer.from_pretrained(tiny_lm)), (teacher, AutoTokenizer.from_pretrained(teacher))


def model(path):
    """A fresh float64 copy: a Teacher freezes the model it wraps, so no test shares one."""
    return AutoModelForCausalLM.from_pretrained(path).double()


def batch_of(texts, s_tok, t_tok):
    return pair_batch(texts, s_tok, t_tok, max_length=64, student_pad=s_tok.pad_token_id,
                      teacher_pad=t_tok.pad_token_id)


def test_one_tokenizer_on_both_sides_is_forward_kl_at_every_position(pair):
    (path, tok), _ = pair
    student, teacher = model(path), model(path)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = batch_of(TEXTS, tok, tok)
    objective = CrossTokenizerObjective(student, Teacher(teacher), CrossTokenizerLoss(alpha=1.0, temperature=2.0,
                                        chunk_size=7), vocab=vocab_map(tok, tok), device=torch.device("cpu"))
    got = objective.loss(batch)["kd"]
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    keep = batch["labels"][:, 1:] != -100
    want = forward_kl(s_logits[keep], t_logits[keep], temperature=2.0)
    assert abs(got.item() - want.item()) < 1e-10  # float64: the chunked sum against one mean


@pytest.mark.parametrize("method,swapped", [("uld", False), ("mapped_kl", False), ("mapped_kl", True)])
def test_two_micro_batches_accumulate_to_one_batch(pair, method, swapped):
    (s_path, s_tok), (t_path, t_tok) = pair[::-1] if swapped else pair  # swapped: spellings by several tokens
    student, teacher = model(s_path), model(t_path)
    spec = CrossTokenizerLoss(method=method, alpha=0.7, temperature=1.5, chunk_size=5)
    objective = CrossTokenizerObjective(student, Teacher(teacher), spec, vocab=vocab_map(s_tok, t_tok),
                                        device=torch.device("cpu"))
    whole = batch_of(TEXTS, s_tok, t_tok)
    parts = [batch_of([text], s_tok, t_tok) for text in TEXTS]

    def grads(loss):
        student.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in student.parameters() if p.grad is not None]

    one = objective.loss(whole)["loss"]
    g_one = grads(one)
    weights = [objective.weight(p) for p in parts]
    accumulated = sum(objective.loss(p)["loss"] * w for p, w in zip(parts, weights)) / sum(weights)
    g_acc = grads(accumulated)
    assert torch.isfinite(one) and one.item() > 0
    assert abs(one.item() - accumulated.item()) < 1e-10
    for a, b in zip(g_one, g_acc):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_spellings_by_several_teacher_tokens(pair):
    (t_path, t_tok), (_, s_tok) = pair  # the student has the larger vocabulary: its longer tokens take spelling
    teacher = model(t_path)
    batch = batch_of(TEXTS, s_tok, t_tok)
    spans, merge = batch["teacher_span_end"], batch["merge_token"]
    assert bool((spans >= 0).any()), "the larger vocabulary spells some student tokens with several tokens?"
    s_ids, t_ids = batch["input_ids"].flatten(), batch["teacher_input_ids"].flatten()
    for s, k, end, token in zip(batch["student_index"].tolist(), batch["teacher_index"].tolist(), spans.tolist(),
                                merge.tolist()):
        if end < 0:
            continue
        assert token == s_ids[s + 1]
        assert s_tok.decode([token]) == t_tok.decode(t_ids[k + 1: end + 1].tolist())
    # The chain of the teacher's probabilities, against log-softmax read off the full logits.
    weight = teacher.get_output_embeddings().weight
    with torch.no_grad():
        hidden = teacher.model(input_ids=batch["teacher_input_ids"],
                               attention_mask=batch["teacher_attention_mask"]).last_hidden_state.flatten(0, 1)
    starts, ends = batch["teacher_index"], torch.where(spans >= 0, spans, batch["teacher_index"])
    got = spelling_logprobs(hidden, weight, t_ids, starts, ends, temperature=1.5)
    logp = torch.log_softmax(hidden @ weight.T / 1.5, dim=-1)
    for g, a, b in zip(got.tolist(), starts.tolist(), ends.tolist()):
        want = sum(logp[p, t_ids[p + 1]].item() for p in range(a, b))
        assert abs(g - want) < 1e-6  # the chain is computed in fp32


def test_a_recipe_with_two_tokenizers_on_token_blocks_is_told_to_read_a_dataset(pair):
    from distil.config.load import validate_recipe
    from distil.tasks.causal_lm import CausalLMTask

    (student_path, _), (teacher_path, _) = pair
    recipe = validate_recipe({
        "name": "two-tokenizers", "task": "causal_lm",
        "data": {"kind": "text", "train": ["sonnets_gut"], "eval": ["phoenix_and_the_turtle_gut"], "seq_len": 32,
                 "max_train_tokens": 3000, "eval_tokens": 256},
        "teacher": {"model": {"arch": "hf", "source": str(teacher_path)}},
        "student": {"model": {"arch": "hf", "source": str(student_path)}},
        "train": {"steps": 2, "batch_size": 2}})
    (line,) = CausalLMTask().deep_problems(recipe)
    assert "use data.kind dataset (format text, prompt_completion or chat)" in line


def test_distill_from_python_with_a_student_of_its_own_tokenizer(pair, tmp_path):
    """distil.distill with student_tokenizer: the pair trains on the same texts, both are scored in bits per byte,
    and the student is saved with its own tokenizer."""
    import json

    import distil
    from distil.errors import DistilError

    (s_path, s_tok), (t_path, t_tok) = pair
    student, teacher = AutoModelForCausalLM.from_pretrained(s_path), AutoModelForCausalLM.from_pretrained(t_path)
    texts = [f"{TEXTS[i % 2]} {i}" for i in range(8)]
    result = distil.distill(teacher, student, texts, tokenizer=t_tok, student_tokenizer=s_tok, steps=3,
                            batch_size=4, max_length=48, output_dir=tmp_path / "run", lr=1e-3, log_every=1)
    arms = result.summary["arms"]
    for row in arms.values():
        assert 0 < row["bits_per_byte"] < 40 and row["perplexity"] > 1
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    assert len(saved) == len(s_tok)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/kd" in row and "loss/ce" in row for row in logged)
    with pytest.raises(DistilError, match="loss must be 'mapped_kl'"):
        distil.distill(teacher, student, texts, tokenizer=t_tok, student_tokenizer=s_tok, loss="forward_kl", steps=1,
                       output_dir=tmp_path / "run2")
    with pytest.raises(DistilError, match="reads text"):
        distil.distill(teacher, student, [{"input_ids": [1, 2, 3]}] * 4, tokenizer=t_tok, student_tokenizer=s_tok,
                       steps=1, output_dir=tmp_path / "run3")


@pytest.mark.parametrize("method", ["uld", "mapped_kl"])
def test_bf16_autocast_trains_and_stays_near_fp32(pair, method):
    """train.precision bf16 (the default where the CPU runs bf16 natively) runs the objective under autocast: the
    spelling chain is still computed in fp32, the loss is finite and its gradient reaches the student. bf16 keeps 8
    bits of mantissa (relative rounding 2^-9 per operand), so logits of these tiny models move by about 1%, and the
    loss, a smooth function of them, by about as much: 5% is a bound that only a wrong dtype path breaks."""
    (t_path, t_tok), (s_path, s_tok) = pair  # the larger vocabulary as student: spellings by several teacher tokens
    student, teacher = model(s_path).float(), model(t_path).float()
    spec = CrossTokenizerLoss(method=method, alpha=0.5, temperature=1.0, chunk_size=5)
    objective = CrossTokenizerObjective(student, Teacher(teacher), spec, vocab=vocab_map(s_tok, t_tok),
                                        device=torch.device("cpu"))
    batch = batch_of(TEXTS, s_tok, t_tok)
    want = objective.loss(batch)["kd"].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = objective.loss(batch)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    assert abs(terms["kd"].item() - want) <= 0.05 * abs(want)
    assert student.get_output_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_positions_without_a_teacher_target_keep_the_full_ce(pair, alpha):
    """loss = alpha T^2 kd + (1 - alpha) CE at aligned positions + CE at trained positions no teacher position is
    aligned with, each a sum over positions divided by the trained tokens; the CE read off the full logits."""
    (s_path, s_tok), (t_path, t_tok) = pair
    student, teacher = model(s_path), model(t_path)
    spec = CrossTokenizerLoss(method="uld", alpha=alpha, temperature=2.0, chunk_size=5)
    objective = CrossTokenizerObjective(student, Teacher(teacher), spec, vocab=None, device=torch.device("cpu"))
    batch = batch_of(TEXTS, s_tok, t_tok)
    terms = objective.loss(batch)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    counted = targets != -100
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    aligned = torch.zeros(batch["input_ids"].numel(), dtype=torch.bool)
    aligned[batch["student_index"]] = True
    aligned = aligned.view(batch["input_ids"].shape)[:, :-1] & counted
    unaligned = counted & ~aligned
    assert 0 < int(unaligned.sum()) < int(counted.sum())  # both kinds of positions occur in these texts
    tokens = int(counted.sum())
    want = alpha * 4.0 * terms["kd"] + ((1 - alpha) * nll[aligned].sum() + nll[unaligned].sum()) / tokens
    assert abs(terms["loss"].item() - want.item()) < 1e-10  # float64
    assert abs(terms["ce"].item() - nll[counted].sum().item() / tokens) < 1e-10
