"""Sentence-embedding distillation: WordNet reading, pooling and metrics against hand computation, and the pipeline
end to end on a tiny BERT teacher built from a config (with the real all-MiniLM-L6-v2 tokenizer)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distil.config.load import validate_recipe
from distil.data.sources.sentences import load_sentences, parse_index, parse_synset, split_wordnet, wordnet_problems
from distil.distill.embedding import contrastive_loss, mean_pool
from distil.measure.embedding import retrieval_top1, similarity_spearman
from distil.errors import DistilError
from distil.runner import check, run_recipe

LINE = ("01382086 00 s 02 long(a) 0 lengthy 0 005 & 01381820 a 0000 | primarily temporal sense; being or indicating "
        'a relatively great or greater than average duration; "a long life"; "a long boring speech"  \n')


def test_wordnet_line_parsing_and_missing_package(tmp_path):
    synset = parse_synset(LINE, "adj")
    assert synset.word == "long" and synset.offset == "01382086"
    assert synset.definition.startswith("primarily temporal sense; being") and '"' not in synset.definition
    assert parse_synset("  1 This software and database is being provided\n", "adj") is None
    index = "dog n 7 5 @ ~ #m #p %p 7 1 02084071 10114209 10023039 09886220 07676602 03901548 02710044  \n"
    assert parse_index(index) == ("dog", "02084071", 1)  # the most frequent sense comes first
    (problem,) = wordnet_problems(str(tmp_path))
    assert "wordnet-base" in problem and "data.noun" in problem


@pytest.mark.skipif(wordnet_problems(None), reason="needs the Debian package wordnet-base")
def test_held_out_synsets_are_never_trained_on():
    spec = validate_recipe(_recipe("unused", "unused")).data
    corpus = load_sentences(spec.model_copy(update={"max_train": 100000}), seed=3)
    assert len(corpus.eval_words) == 40 and len({w.lower() for w in corpus.eval_words}) == 40
    held = set(zip(corpus.eval_words, corpus.eval_definitions))
    assert not held & set(zip(corpus.train_words, corpus.train_texts))
    assert len(corpus.train_words) == 100000  # WordNet has ~117k synsets: max_train of them are trained on
    synset = parse_synset(LINE, "adj")
    train, pairs = split_wordnet([synset], [("adj", synset.offset, "long"), ("adj", synset.offset, "lengthy")], 1,
                                 10, 0)
    assert len(pairs) == 1 and train == []  # one synset gives one pair, whichever lemma comes first
    with pytest.raises(DistilError, match="eval_pairs=2 exceeds the 1 usable"):
        split_wordnet([synset], [("adj", synset.offset, "long"), ("adj", synset.offset, "lengthy")], 2, 10, 0)


def test_pooling_and_metrics_against_hand_computation():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], F.normalize(hidden[0, :2].mean(0), dim=0))
    torch.testing.assert_close(pooled[1], F.normalize(hidden[1].mean(0), dim=0))

    q = F.normalize(torch.randn(5, 8), dim=1)
    d = q.clone()
    d[[0, 1]] = d[[1, 0]]  # two documents swapped: 3 of 5 queries find their own
    assert retrieval_top1(q, d) == pytest.approx(0.6)
    logits = 20 * q @ d.t()
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5)))
    torch.testing.assert_close(contrastive_loss(q, d), expected)

    from scipy.stats import spearmanr

    a, b = F.normalize(torch.randn(7, 4), dim=1), F.normalize(torch.randn(7, 4), dim=1)
    rows, cols = torch.triu_indices(7, 7, 1)
    reference = spearmanr((a @ a.t())[rows, cols].numpy(), (b @ b.t())[rows, cols].numpy()).statistic
    assert similarity_spearman(a.double(), b.double()) == pytest.approx(reference, abs=1e-9)
    assert similarity_spearman(a, a) == pytest.approx(1.0)


def test_with_a_teacher_the_contrastive_term_is_weighted_by_one_minus_alpha(tiny_bert):
    from transformers import AutoModel

    from distil.distill.embedding import EmbeddingObjective, encode
    from distil.distill.objectives import LogitLoss
    from distil.distill.pair import Teacher
    from distil.losses.features import hidden_cosine

    teacher = AutoModel.from_pretrained(tiny_bert).eval()
    torch.manual_seed(0)
    student = AutoModel.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(1000, 2000, (6, 7), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pairs": 3}
    with torch.no_grad():
        s, t = encode(student, ids, batch["attention_mask"]), encode(teacher, ids, batch["attention_mask"])
        embedding, contrastive = hidden_cosine(s, t), contrastive_loss(s[:3], s[3:])
        for alpha in (0.25, 1.0):
            terms = EmbeddingObjective(student, Teacher(teacher), LogitLoss(alpha=alpha), torch.device("cpu")).loss(batch)
            expected = embedding if alpha == 1.0 else alpha * embedding + (1 - alpha) * contrastive
            torch.testing.assert_close(terms["loss"], expected)
            assert ("contrastive" in terms) == (alpha < 1.0)
        unpaired = EmbeddingObjective(student, Teacher(teacher), LogitLoss(alpha=0.25), torch.device("cpu")).loss(
            {**batch, "pairs": 0})  # no (word, definition) pairs in the batch: the teacher's term alone
        torch.testing.assert_close(unpaired["loss"], embedding)


def _recipe(teacher, output, **changes):
    data = {
        "name": "tiny-embed", "task": "embedding",
        "data": {"kind": "sentences", "max_train": 64, "eval_pairs": 40, "max_length": 24},
        "teacher": {"model": {"arch": "hf", "source": str(teacher)}},
        "student": {"model": {"arch": "from_teacher", "num_layers": 2}},
        "loss": {"embedding": "cosine", "features": [
            {"student": "encoder.layer.{}", "teacher": "encoder.layer.{}", "loss": "mse"},
            {"student": "encoder.layer.{}.attention.self", "teacher": "encoder.layer.{}.attention.self",
             "layers": [[1, 3]], "loss": "minilm_relations"},
        ]},
        "train": {"steps": 3, "batch_size": 8, "lr": 0.001, "log_every": 1},
        "arms": ["student_alone", "logit_kd", "distilled"], "output_dir": str(output), "latency_runs": 2,
    }
    data.update(changes)
    return validate_recipe(data)


@pytest.mark.skipif(wordnet_problems(None), reason="needs the Debian package wordnet-base")
def test_embedding_recipe_end_to_end(tiny_bert, tmp_path):
    summary = run_recipe(_recipe(tiny_bert, tmp_path / "run"), show_progress=False)
    run = tmp_path / "run"
    arms = summary["arms"]
    assert set(arms) == {"teacher", "student_init", "student_alone", "logit_kd", "distilled"}
    assert arms["teacher"]["spearman"] == 1.0
    for values in arms.values():
        assert 0 <= values["top1"] <= 1 and -1 <= values["spearman"] <= 1 and values["params"] > 0
    assert arms["distilled"]["params"] < arms["teacher"]["params"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_arm = {r["arm"]: r for r in records if "loss" in r}
    assert "loss/contrastive" in by_arm["student_alone"] and "loss/embedding" in by_arm["logit_kd"]
    assert {"loss/embedding", "loss/feat0_mse", "loss/feat1_minilm_relations"} <= set(by_arm["distilled"])
    assert all(v == v for r in records for v in r.values() if isinstance(v, float))  # no NaN
    # The student is a plain BertModel folder (no projector, no distil code needed), with the pooling description.
    keys = set(load_file(run / "student" / "model.safetensors"))
    assert keys == set(load_file(run / "student_init" / "model.safetensors"))
    code = ("import sys; sys.modules['distil'] = None\nfrom transformers import AutoModel\n"
            f"m = AutoModel.from_pretrained({str(run / 'student')!r}); print(m.config.num_hidden_layers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "2", out.stderr


@pytest.mark.skipif(wordnet_problems(None), reason="needs the Debian package wordnet-base")
def test_embedding_validate_names_wrong_modules(tiny_bert, tmp_path):
    bad = _recipe(tiny_bert, tmp_path, loss={"features": [
        {"student": "encoder.layers.{}", "teacher": "encoder.layer.{}", "loss": "mse"}]})
    (problem,) = check(bad)
    assert "close matches: encoder.layer.0" in problem
    relations = _recipe(tiny_bert, tmp_path, loss={"features": [
        {"student": "encoder.layer.{}.attention.self", "teacher": "encoder.layer.{}.attention.self",
         "loss": "minilm_relations", "num_relation_heads": 5}]})
    (problem,) = check(relations)
    assert "5 relation heads do not divide" in problem


def _tiny_wordnet(folder, synsets=120):
    """WordNet's file format with made-up nouns: enough for the held-out pairs and a few training batches."""
    folder.mkdir()
    data, index = [], []
    for i in range(synsets):
        offset, word = f"{i + 1:08d}", f"thing{i}"
        data.append(f"{offset} 05 n 01 {word} 0 000 | a kind of object number {i} found near the river; \"a {word}\"\n")
        index.append(f"{word} n 1 0 1 1 {offset}\n")
    (folder / "data.noun").write_text("  1 a made-up header line\n" + "".join(data))
    (folder / "index.noun").write_text("".join(sorted(index)))
    for pos in ("verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text("")
        (folder / f"index.{pos}").write_text("")
    return folder


def test_embedding_runs_through_the_one_runner(tiny_bert, tmp_path, capsys):
    """Like every task: report.html, the recipe recorded in each checkpoint, resume skips the finished arms."""
    from distil.runner import resume_run

    wordnet = _tiny_wordnet(tmp_path / "wordnet")
    recipe = _recipe(tiny_bert, tmp_path / "run", arms=["student_alone", "distilled"])
    recipe = validate_recipe({**recipe.model_dump(mode="json"),
                              "data": {**recipe.data.model_dump(mode="json"), "path": str(wordnet)}})
    summary = run_recipe(recipe, show_progress=False)
    run = tmp_path / "run"
    assert set(summary["arms"]) == {"teacher", "student_init", "student_alone", "distilled"}
    assert (run / "report.html").is_file() and (run / "summary.json").is_file()
    for arm in ("student_alone", "distilled"):
        (checkpoint,) = sorted((run / "checkpoints" / arm).glob("step-*"))[-1:]
        state = json.loads((checkpoint / "state.json").read_text())
        assert state["recipe"]["name"] == "tiny-embed" and state["recipe"]["data"]["path"] == str(wordnet)
    capsys.readouterr()
    resume_run(run, show_progress=False)
    out = capsys.readouterr().out
    assert "student_alone: already trained" in out and "distilled: already trained" in out
