"""Text classification with Hugging Face encoders: a tiny BERT teacher fine-tuned in the teacher stage, students
built from it (make_student) or with another tokenizer (a tiny MPNet), labelled and unlabelled rows, the saved
student loading in a plain transformers pipeline with distil's own predictions."""

import csv
import json

import pytest
import torch

from distil.config.load import validate_recipe
from distil.data.sources import load_data
from distil.measure.classification import predictions
from distil.models.text_classifier import load_saved
from distil.runner import check, run_recipe
from distil.tasks import classification_arms

WORDS = {"sport": ["match", "goal", "team", "league"], "money": ["bank", "shares", "market", "profit"],
         "tech": ["phone", "software", "chip", "internet"]}


def write_texts(path, n=90, seed=0, unlabelled_every=0):
    """A CSV of short texts whose class shows in its words, some rows unlabelled."""
    rng = torch.Generator().manual_seed(seed)
    names = sorted(WORDS)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["body", "topic"])
        for i in range(n):
            name = names[i % 3]
            picks = torch.randint(0, 4, (5,), generator=rng).tolist()
            text = "the " + " ".join(WORDS[name][p] for p in picks) + " today"
            out.writerow([text, "" if unlabelled_every and i % unlabelled_every == 0 else name])
    return path


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory):
    """A tiny random MPNet with a word-level tokenizer of its own (not the BERT teacher's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MPNetConfig, MPNetModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-mpnet")
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", "the", "today",
                                         *[w for ws in WORDS.values() for w in ws]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", cls_token="<s>", sep_token="</s>")
    torch.manual_seed(1)
    config = MPNetConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, pad_token_id=1)
    MPNetModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recipe(tmp_path, teacher, student, **changes):
    data = {
        "name": "texts", "task": "classification",
        "data": {"kind": "texts", "path": str(write_texts(tmp_path / "train.csv")), "columns": {"text": "body",
                 "label": "topic"}, "max_length": 16, "eval_fraction": 0.2},
        "teacher": {"model": {"arch": "hf", "source": str(teacher)},
                    "train": {"steps": 6, "batch_size": 8, "lr": 0.003, "log_every": 3}},
        "student": {"model": student},
        "loss": {"alpha": 0.7, "temperature": 2.0},
        "train": {"steps": 4, "batch_size": 8, "lr": 0.003, "log_every": 2, "labelled": 24},
        "arms": ["student_alone", "distilled"], "output_dir": str(tmp_path / "run"), "latency_runs": 1,
    }
    data.update(changes)
    return validate_recipe(data)


def test_text_files_labels_and_unlabelled_rows(tmp_path):
    path = write_texts(tmp_path / "t.csv", n=60, unlabelled_every=5)
    spec = validate_recipe({"name": "x", "task": "classification",
                            "data": {"kind": "texts", "path": str(path), "columns": {"text": "body", "label": "topic"}},
                            "teacher": {"model": {"arch": "hf", "source": "x"}},
                            "student": {"model": {"arch": "from_teacher", "num_layers": 1}},
                            "train": {"steps": 1}}).data
    data = load_data(spec, seed=0).corpus
    assert data.label_names == ["money", "sport", "tech"]
    assert (data.train_y == -1).sum() == 12  # every 5th row of 60 has no label: transfer set, never held out
    assert (data.test_y >= 0).all() and len(data.test_y) == 9  # round(20% of each class's 16 labelled rows) = 3
    assert len(data.train_x) + len(data.test_x) == 60


def test_teacher_fine_tuned_then_students_from_it_and_with_their_own_tokenizer(tiny_bert, tiny_mpnet, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    seen = {}
    original = classification_arms.train_classifier

    def spy(name, model, teacher, loss, spec, data, r, ctx, objective=None, transfer=None):
        rows, labels = classification_arms.training_rows(data.corpus.train_y, spec, r.seed,
                                                         transfer=(teacher is not None) if transfer is None else transfer)
        seen[name] = (len(rows), int((labels[rows] >= 0).sum()))
        return original(name, model, teacher, loss, spec, data, r, ctx, objective=objective, transfer=transfer)

    monkeypatch.setattr(classification_arms, "train_classifier", spy)
    r = recipe(tmp_path, tiny_bert, {"arch": "from_teacher", "num_layers": 2})
    assert check(r) == []
    summary = run_recipe(r, show_progress=False)
    arms = summary["arms"]
    assert set(arms) == {"teacher", "student_alone", "distilled"}
    assert arms["distilled"]["params"] < arms["teacher"]["params"]
    for row in arms.values():
        assert 0 <= row["macro_f1"] <= 1 and sum(map(sum, row["confusion"])) == 18
    assert summary["labels"] == ["money", "sport", "tech"]
    # The alone arm sees the 24 labelled rows only; the distilled arm every one of the 72 training rows.
    assert seen["student_alone"] == (24, 24) and seen["distilled"] == (72, 24)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Confusion matrices" in html

    # The saved student is a plain Hugging Face folder: a transformers pipeline predicts what distil measured.
    from transformers import pipeline

    folder = tmp_path / "run" / "student"  # the distilled arm's folder
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "money", "1": "sport", "2": "tech"}
    data = load_data(r.data, seed=r.seed).corpus
    mine = predictions(load_saved(folder), data.test_x, torch.device("cpu"))
    classify = pipeline("text-classification", model=str(folder), device="cpu")
    theirs = [out["label"] for out in classify(list(data.test_x), truncation=True)]
    assert theirs == [data.label_names[i] for i in mine.tolist()]

    # A student with its own tokenizer (MPNet, word level) distils from the same teacher, reused from the cache.
    other = recipe(tmp_path, tiny_bert, {"arch": "hf", "source": str(tiny_mpnet)},
                   output_dir=str(tmp_path / "run2"))
    summary2 = run_recipe(other, show_progress=False)
    assert summary2["arms"]["teacher"]["accuracy"] == arms["teacher"]["accuracy"]
    assert json.loads((tmp_path / "run2" / "student" / "config.json").read_text())["model_type"] == "mpnet"


def test_a_from_teacher_text_student_is_cut_from_the_pretrained_encoder_not_the_fine_tuned_teacher(tiny_bert,
                                                                                                     tmp_path):
    from transformers import AutoModel

    r = recipe(tmp_path, tiny_bert, {"arch": "from_teacher", "layers": [0, 3]})
    data = load_data(r.data, seed=r.seed).corpus
    teacher = classification_arms.build_model(r.teacher.model, data, r)[0]
    with torch.no_grad():  # stands for fine-tuning: every weight of the teacher moves
        for p in teacher.parameters():
            p.add_(1.0)
    student = classification_arms.new_student(r, data, [teacher])
    pretrained = AutoModel.from_pretrained(tiny_bert)
    got = student.model.bert.encoder.layer[1].attention.self.query.weight
    assert torch.equal(got, pretrained.encoder.layer[3].attention.self.query.weight)  # teacher layer 3, as saved
    again = classification_arms.new_student(r, data, [teacher])
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))


def test_hidden_state_terms_reach_text_classifiers(tiny_bert, tmp_path, monkeypatch):
    """DistilBERT's cosine on hidden states, through the feature terms (names under the wrapper's `model.`)."""
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    r = recipe(tmp_path, tiny_bert, {"arch": "from_teacher", "layers": [0, 3]}, arms=["distilled"],
               loss={"alpha": 0.5, "features": [{"student": "model.bert.encoder.layer.{}",
                                                 "teacher": "model.bert.encoder.layer.{}", "loss": "cosine",
                                                 "layers": [[0, 0], [1, 3]]}]})
    assert check(r) == []
    run_recipe(r, show_progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = {k for row in logged if row.get("arm") == "distilled" for k in row}
    assert any(k.startswith("loss/feature") or "cosine" in k for k in terms), terms
