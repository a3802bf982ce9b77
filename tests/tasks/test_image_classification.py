"""Image folders with Hugging Face image classifiers: a tiny ViT backbone fine-tuned in the teacher stage, a student
with half its layers cut from the pretrained backbone (make_student), and the saved student loading in a plain
transformers pipeline that predicts what distil evaluated (same resize and standardisation)."""

import json

import numpy as np
import pytest
import torch

from distil.config.load import validate_recipe
from distil.data.sources import load_data
from distil.data.sources.labelled import class_folders
from distil.data.sources.images import SUFFIXES
from distil.errors import ConfigError, DistilError
from distil.measure.classification import predictions
from distil.models.image_classifier import load_saved_image_classifier
from distil.runner import check, run_recipe
from distil.tasks import classification_arms

CLASSES = ["blue", "green", "red"]


def write_images(folder, n, seed):
    """Class folders of 10x12 RGB images whose class is their brightest channel (red, green, blue), as PNG and JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in CLASSES:
        channel = {"red": 0, "green": 1, "blue": 2}[name]
        (folder / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.random((12, 10, 3)) * 90
            pixels[:, :, channel] += 120
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return folder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A tiny random ViT backbone (no classification head) reading 8x8 RGB images."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return write_images(root / "train", n=20, seed=0), write_images(root / "held-out", n=4, seed=1)


def recipe(tmp_path, vit, images, **changes):
    train, held_out = images
    data = {
        "name": "images", "task": "classification",
        "data": {"kind": "images", "path": str(train), "eval_path": str(held_out), "size": [8, 8]},
        "teacher": {"model": {"arch": "hf", "source": str(vit)},
                    "train": {"steps": 8, "batch_size": 12, "lr": 0.003, "log_every": 4}},
        "student": {"model": {"arch": "from_teacher", "layers": [0, 2]}},
        "loss": {"alpha": 0.7, "temperature": 2.0},
        "train": {"steps": 4, "batch_size": 12, "lr": 0.003, "log_every": 2, "labelled": 24},
        "arms": ["student_alone", "distilled"], "output_dir": str(tmp_path / "run"), "latency_runs": 1,
    }
    data.update(changes)
    return validate_recipe(data)


def test_vit_teacher_fine_tuned_then_a_half_depth_student_exported_for_a_pipeline(tiny_vit, images, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    r = recipe(tmp_path, tiny_vit, images)
    assert check(r) == []
    summary = run_recipe(r, show_progress=False)
    arms = summary["arms"]
    assert set(arms) == {"teacher", "student_alone", "distilled"}
    assert arms["distilled"]["params"] < arms["teacher"]["params"]
    for row in arms.values():
        assert sum(map(sum, row["confusion"])) == 12  # the 4 held-out images of each class
    assert summary["labels"] == CLASSES
    assert arms["teacher"]["accuracy"] > 0.5, arms  # the colour is easy: the fine-tuned teacher learned it

    # The student is a plain Hugging Face folder whose image processor repeats distil's preparation: the pipeline,
    # given the held-out files, predicts what distil's evaluation did on its tensors.
    from transformers import pipeline

    folder = tmp_path / "run" / "student"
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "blue", "1": "green", "2": "red"} and config["num_hidden_layers"] == 2
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 8, "width": 8} and len(processor["image_mean"]) == 3
    data = load_data(r.data, seed=r.seed).corpus
    student = load_saved_image_classifier(folder)
    mine = predictions(student, data.test_x, torch.device("cpu"))
    with torch.no_grad():
        probs = student(data.test_x).softmax(-1)
    files = [str(p) for paths in class_folders(images[1], SUFFIXES, "held-out").values() for p in paths]
    classify = pipeline("image-classification", model=str(folder), device="cpu")
    outputs = classify(files, top_k=3)
    assert [out[0]["label"] for out in outputs] == [data.label_names[i] for i in mine.tolist()]
    theirs = torch.tensor([[next(o["score"] for o in out if o["label"] == name) for name in CLASSES]
                           for out in outputs])
    # Identical pixels through the same fp32 model: only the summation order of a batch of 12 against 1 differs.
    assert torch.allclose(theirs, probs, atol=1e-5), (theirs - probs).abs().max()


def test_a_from_teacher_image_student_is_cut_from_the_pretrained_backbone(tiny_vit, images, tmp_path):
    from transformers import AutoModel

    r = recipe(tmp_path, tiny_vit, images, student={"model": {"arch": "from_teacher", "layers": [1, 3]}})
    data = load_data(r.data, seed=r.seed).corpus
    teacher = classification_arms.build_model(r.teacher.model, data, r)[0]
    with torch.no_grad():  # stands for fine-tuning: every weight of the teacher moves
        for p in teacher.parameters():
            p.add_(1.0)
    student = classification_arms.new_student(r, data, [teacher])
    pretrained = AutoModel.from_pretrained(tiny_vit)
    assert torch.equal(student.model.vit.layers[0].attention.q_proj.weight,
                       pretrained.layers[1].attention.q_proj.weight)
    assert torch.equal(student.model.vit.embeddings.cls_token, pretrained.embeddings.cls_token)


def test_images_that_do_not_fit_the_model_are_refused_with_the_setting_to_change(tiny_vit, images, tmp_path):
    for data_change, message in (({"size": [6, 6]}, "set data.size: [8, 8]"),
                                 ({"channels": 1}, "set data.channels: 3")):
        r = recipe(tmp_path, tiny_vit, images)
        r = validate_recipe({**r.model_dump(mode="json"), "data": {**r.data.model_dump(mode="json"), **data_change}})
        data = load_data(r.data, seed=r.seed).corpus
        with pytest.raises(DistilError, match=message.replace("[", r"\[").replace("]", r"\]")):
            classification_arms.build_model(r.teacher.model, data, r)


def test_image_statistics_given_or_measured_and_the_rules(tiny_vit, images, tmp_path):
    r = recipe(tmp_path, tiny_vit, images)
    data = load_data(r.data, seed=r.seed).corpus
    mean, std = data.pixel_stats
    assert torch.allclose(data.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)  # the training images'
    given = validate_recipe({**r.model_dump(mode="json"), "data": {**r.data.model_dump(mode="json"),
                                                                     "mean": [0.5, 0.5, 0.5], "std": [0.25] * 3}})
    data2 = load_data(given.data, seed=given.seed).corpus
    assert data2.pixel_stats == ([0.5] * 3, [0.25] * 3)
    # The same pixels, standardised two ways: x = (p - m) / s for each.
    p = data.train_x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert torch.allclose(data2.train_x, (p - 0.5) / 0.25, atol=1e-4)
    with pytest.raises(ConfigError, match="data.mean has 1 values for data.channels 3"):
        validate_recipe({**r.model_dump(mode="json"), "data": {**r.data.model_dump(mode="json"), "mean": [0.5],
                                                                "std": [0.2]}})
    with pytest.raises(ConfigError, match="teacher.model.arch hf is for texts and image folders"):
        validate_recipe({**r.model_dump(mode="json"), "data": {"kind": "table", "path": "x.csv"}})
