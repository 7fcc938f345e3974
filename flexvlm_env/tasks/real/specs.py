"""Where each family's real dataset lives on the Hugging Face hub, and how one row becomes a Sample.

One `RealDatasetSpec` per family records the hub id, the configs, which hub split each of our
splits reads, the columns used and a `to_fields` function mapping one row to prompt, reference
answers and options. The hub loader and the local loader both read these specs, so a local
directory in the hub's column layout loads exactly like the hub. docs/DATASETS.md shows the same
information as a table; keep the two in step.

Prompts: short-answer families use the dataset's question verbatim, captioning uses
`CAPTION_PROMPT`, and multiple-choice families use the procedural sources' format (question, one
"A. text" line per option, `MC_INSTRUCTION`) so that a real and a procedural request of a family
read alike. Multiple-choice answers are the correct letter, options are in letter order.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ...metrics.choice import option_letters
from ..families import FAMILIES, family_spec
from ..procedural.references import MC_INSTRUCTION

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."

# ST-VQA's answers for its test split are withheld (evaluation server only), so its val split is
# carved out of the hub train split: every k-th image row (with all of its questions). A stride,
# not a block, so that val mixes the seven source datasets the train split is made of; k = 20
# gives ~5% of train, about the 1024 questions Molmo held out for its ST-VQA validation.
ST_VQA_VAL_EVERY_ROWS = 20

# MMMU/MMMU has one config per subject; load_hub reads them in this (alphabetical) order.
MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory",
    "Basic_Medical_Science", "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science",
    "Design", "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics", "Energy_and_Power",
    "Finance", "Geography", "History", "Literature", "Manage", "Marketing", "Materials", "Math",
    "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology", "Public_Health",
    "Sociology",
)


class DatasetRowError(ValueError):
    """A row whose content cannot be mapped (bad answer index, unparsable options, ...).

    Raised by the `to_fields` functions with a short reason; the loaders re-raise it as a
    ValueError that also names the request id and the file/row the content came from.
    """


@dataclass(frozen=True)
class RowFields:
    """What a dataset row contributes to a Sample besides its image."""

    prompt: str
    answers: tuple[str, ...]
    options: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RealDatasetSpec:
    """The real dataset of one family (see docs/DATASETS.md for the table of all nine).

    Attributes:
        family: the task family, a key of `FAMILIES`.
        hub_id: Hugging Face hub dataset id.
        hub_configs: configs read and concatenated in this order (`None`: the default config).
        splits: our split name -> the hub split it reads. Splits whose hub answers are withheld
            (VQA v2 test-dev, DocVQA test, ...) are left out.
        eval_split: the split the seed study evaluated on (`tally_qa` has only a test split).
        image_column: column holding the image (HF image struct, a path, or a decoded image).
        columns: top-level columns read besides the image; a missing one is an error.
        to_fields: maps one row (with the nested question merged in, see `questions_column`)
            to prompt, answers and options; raises `DatasetRowError` on bad content.
        questions_column: for datasets storing several questions per image row (a list of
            dicts), the column holding that list; each question becomes one Sample.
        question_keys: keys every dict of `questions_column` must have.
        val_every_rows: when set, our "val" split is every k-th row of the hub split that
            "val" and "train" both map to, and our "train" is the other rows.
        skip_rows_without_image: drop rows whose image is missing (ScienceQA mixes text-only
            questions into the same split).
    """

    family: str
    hub_id: str
    hub_configs: tuple[str | None, ...]
    splits: Mapping[str, str]
    image_column: str
    columns: tuple[str, ...]
    to_fields: Callable[[Mapping[str, Any]], RowFields] = field(repr=False)
    eval_split: str = "val"
    questions_column: str | None = None
    question_keys: tuple[str, ...] = ()
    val_every_rows: int | None = None
    skip_rows_without_image: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"RealDatasetSpec.family={self.family!r} is not one of {sorted(FAMILIES)}")
        if self.eval_split not in self.splits:
            raise ValueError(f"{self.family}: eval_split={self.eval_split!r} is not in splits {dict(self.splits)}")
        if self.val_every_rows is not None and self.splits.get("val") != self.splits.get("train"):
            raise ValueError(f"{self.family}: val_every_rows needs 'val' and 'train' to map to the same hub split")
        if self.questions_column is not None and self.questions_column not in self.columns:
            raise ValueError(f"{self.family}: questions_column={self.questions_column!r} must be one of columns")

    def hub_split(self, split: str) -> str:
        """The hub split our `split` reads, or a ValueError naming the splits this family has."""
        try:
            return self.splits[split]
        except KeyError:
            raise ValueError(
                f"split={split!r} has no real data for family {self.family!r}: {self.hub_id} provides "
                f"{sorted(self.splits)} (as hub splits {dict(self.splits)}); the hub's other splits "
                "withhold their answers"
            ) from None

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.image_column, *self.columns)


def _text(value: Any, column: str) -> str:
    """A reference or question as text; whole-number floats (JSON round trips) print as ints."""
    if value is None:
        raise DatasetRowError(f"{column!r} is empty")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _answer_list(values: Any, column: str) -> tuple[str, ...]:
    """A non-empty list of reference answers; VQA v2 stores dicts {answer, answer_confidence, answer_id}."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise DatasetRowError(f"{column!r} must be a list of answers, got {type(values).__name__}")
    answers = tuple(
        _text(value["answer"] if isinstance(value, Mapping) else value, column) for value in values
    )
    if not answers:
        raise DatasetRowError(f"{column!r} has no reference answers")
    return answers


def _multiple_choice_prompt(question: str, options: tuple[str, ...]) -> str:
    letters = option_letters(options)
    lines = [question] + [f"{letter}. {option}" for letter, option in zip(letters, options)] + [MC_INSTRUCTION]
    return "\n".join(lines)


def _short_answer(question_column: str, answers_column: str) -> Callable[[Mapping[str, Any]], RowFields]:
    def to_fields(row: Mapping[str, Any]) -> RowFields:
        question = _text(row[question_column], question_column).strip()
        return RowFields(question, _answer_list(row[answers_column], answers_column))

    return to_fields


def _coco_caption(row: Mapping[str, Any]) -> RowFields:
    return RowFields(CAPTION_PROMPT, _answer_list(row["answer"], "answer"))


def _tally_qa(question: Mapping[str, Any]) -> RowFields:
    # TallyQA stores the count as an integer.
    return RowFields(_text(question["question"], "question").strip(), (_text(question["answer"], "answer"),))


def _science_qa(row: Mapping[str, Any]) -> RowFields:
    options = tuple(_text(choice, "choices") for choice in row["choices"])
    if not options:
        raise DatasetRowError("'choices' is empty")
    answer_index = row["answer"]
    if not isinstance(answer_index, int) or isinstance(answer_index, bool) or not 0 <= answer_index < len(options):
        raise DatasetRowError(
            f"'answer'={answer_index!r} is not an index among the {len(options)} options {list(options)}"
        )
    question = _text(row["question"], "question").strip()
    hint = (row["hint"] or "").strip()
    if hint:
        question = f"Context: {hint}\n{question}"
    return RowFields(_multiple_choice_prompt(question, options), (option_letters(options)[answer_index],), options)


def _mmmu(row: Mapping[str, Any]) -> RowFields:
    # The question keeps MMMU's "<image 1>" placeholders: the Sample's image is image_1.
    question = _text(row["question"], "question").strip()
    answer = _text(row["answer"], "answer").strip()
    if row["question_type"] != "multiple-choice":
        # A few open answers list several accepted values, stringified: "['24/7', '3.429']".
        if answer.startswith("["):
            try:
                accepted = ast.literal_eval(answer)
            except (ValueError, SyntaxError):
                accepted = None
            if isinstance(accepted, list) and accepted:
                return RowFields(question, tuple(_text(value, "answer") for value in accepted))
        return RowFields(question, (answer,))
    try:
        # MMMU stores options as a Python list literal; literal_eval parses it without running code.
        parsed = ast.literal_eval(row["options"])
    except (ValueError, SyntaxError) as exc:
        raise DatasetRowError(f"'options'={row['options']!r} is not a list literal ({exc})") from None
    if not isinstance(parsed, list) or not parsed:
        raise DatasetRowError(f"'options'={row['options']!r} is not a non-empty list")
    options = tuple(_text(option, "options") for option in parsed)
    letters = option_letters(options)
    if len(answer) != 1 or answer.upper() not in letters:
        raise DatasetRowError(f"'answer'={answer!r} is not among the option letters {', '.join(letters)}")
    return RowFields(_multiple_choice_prompt(question, options), (answer.upper(),), options)


REAL_DATASETS: dict[str, RealDatasetSpec] = {
    spec.family: spec
    for spec in (
        RealDatasetSpec(
            "coco_2014_vqa", "lmms-lab/VQAv2", (None,), {"val": "validation"},
            "image", ("question", "answers"), _short_answer("question", "answers"),
        ),
        RealDatasetSpec(
            "coco_caption", "lmms-lab/COCO-Caption2017", (None,), {"val": "val"},
            "image", ("answer",), _coco_caption,
        ),
        RealDatasetSpec(
            "tally_qa", "vikhyatk/tallyqa-test", (None,), {"test": "test"},
            "image", ("qa",), _tally_qa, eval_split="test",
            questions_column="qa", question_keys=("question", "answer"),
        ),
        RealDatasetSpec(
            "doc_qa", "lmms-lab/DocVQA", ("DocVQA",), {"train": "train", "val": "validation"},
            "image", ("question", "answers"), _short_answer("question", "answers"),
        ),
        RealDatasetSpec(
            "okvqa", "lmms-lab/OK-VQA", (None,), {"val": "val2014"},
            "image", ("question", "answers"), _short_answer("question", "answers"),
        ),
        RealDatasetSpec(
            "text_vqa", "lmms-lab/textvqa", (None,), {"train": "train", "val": "validation"},
            "image", ("question", "answers"), _short_answer("question", "answers"),
        ),
        RealDatasetSpec(
            "science_qa_img", "derek-thomas/ScienceQA", (None,),
            {"train": "train", "val": "validation", "test": "test"},
            "image", ("question", "choices", "answer", "hint"), _science_qa,
            skip_rows_without_image=True,
        ),
        RealDatasetSpec(
            "st_qa", "vikhyatk/st-vqa", (None,), {"train": "train", "val": "train"},
            "image", ("qas",), _short_answer("question", "answers"),
            questions_column="qas", question_keys=("question", "answers"),
            val_every_rows=ST_VQA_VAL_EVERY_ROWS,
        ),
        RealDatasetSpec(
            "mmmu", "MMMU/MMMU", MMMU_SUBJECTS, {"train": "dev", "val": "validation"},
            "image_1", ("question", "options", "answer", "question_type"), _mmmu,
        ),
    )
}


def real_dataset_spec(family: str) -> RealDatasetSpec:
    """Return the real-dataset spec of `family`, or raise a ValueError listing the families."""
    family_spec(family)  # validates the name with the same error as everywhere else
    return REAL_DATASETS[family]
