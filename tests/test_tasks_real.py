"""Real-dataset loaders on tiny datasets written in each hub's schema; no network.

Every family's case below holds 2-3 rows in the column layout of its hub dataset
(`REAL_DATASETS[family].hub_id`) and the Samples they must map to. The same rows are written as
Parquet with embedded image bytes, as JSONL with image paths, and served through a fake
`datasets.load_dataset`, so hub and local loading are checked against one expectation.
"""
from __future__ import annotations

import dataclasses
import io
import json
import sys
import types
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flexvlm_env.tasks import FAMILIES, load_samples
from flexvlm_env.tasks.procedural.references import MC_INSTRUCTION
from flexvlm_env.tasks.real import REAL_DATASETS, load_hub, load_local
from flexvlm_env.tasks.real import hub as hub_module
from flexvlm_env.tasks.real.specs import CAPTION_PROMPT, MMMU_SUBJECTS, ST_VQA_VAL_EVERY_ROWS

IMAGE_SIZE = (12, 8)  # width, height


def png_bytes(shade: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    color = (shade, 0, 0) if mode == "RGB" else shade
    Image.new(mode, IMAGE_SIZE, color).save(buffer, format="PNG")
    return buffer.getvalue()


def vqa_answers(answer: str) -> list[dict[str, Any]]:
    return [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]


# Each case: rows(image) -> hub-schema rows, where image(k) gives the k-th row's image value;
# expected: (index, answers, options, text the prompt contains) of each Sample, in hub order.
Expected = tuple[int, tuple[str, ...], "tuple[str, ...] | None", str]
CASES: dict[str, tuple[Callable[[Callable[[int], Any]], list[dict[str, Any]]], list[Expected]]] = {
    "coco_2014_vqa": (
        lambda image: [
            {"question_type": "what color", "multiple_choice_answer": "red", "answers": vqa_answers("red"),
             "image_id": 42, "answer_type": "other", "question_id": 420, "question": "What color is the bus?",
             "image": image(0)},
            {"question_type": "is there", "multiple_choice_answer": "yes", "answers": vqa_answers("yes"),
             "image_id": 43, "answer_type": "yes/no", "question_id": 430, "question": "Is there a dog?",
             "image": image(1)},
        ],
        [(0, ("red",) * 10, None, "What color is the bus?"), (1, ("yes",) * 10, None, "Is there a dog?")],
    ),
    "coco_caption": (
        lambda image: [
            {"question_id": "000000000139.jpg", "question": "Please carefully observe the image.",
             "answer": [f"a living room {k}" for k in range(5)], "id": 139, "license": 2,
             "file_name": "000000000139.jpg", "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg",
             "height": 426, "width": 640, "date_captured": "2013-11-21 01:34:01", "image": image(0)},
            {"question_id": "000000000285.jpg", "question": "Please carefully observe the image.",
             "answer": [f"a bear {k}" for k in range(5)], "id": 285, "license": 4,
             "file_name": "000000000285.jpg", "coco_url": "http://images.cocodataset.org/val2017/000000000285.jpg",
             "height": 640, "width": 586, "date_captured": "2013-11-18 22:48:05", "image": image(1)},
        ],
        [(0, tuple(f"a living room {k}" for k in range(5)), None, CAPTION_PROMPT),
         (1, tuple(f"a bear {k}" for k in range(5)), None, CAPTION_PROMPT)],
    ),
    "tally_qa": (
        lambda image: [
            {"image": image(0), "qa": [
                {"question": "How many dogs are there?", "answer": 2, "is_simple": True},
                {"question": "How many dogs are sitting?", "answer": 0, "is_simple": False}]},
            {"image": image(1), "qa": [{"question": "How many cars?", "answer": 11, "is_simple": True}]},
        ],
        [(0, ("2",), None, "How many dogs are there?"), (1, ("0",), None, "How many dogs are sitting?"),
         (2, ("11",), None, "How many cars?")],
    ),
    "doc_qa": (
        lambda image: [
            {"questionId": "49153", "question": "What is the ‘actual’ value per 1000, during the year 1975?",
             "question_types": ["figure/diagram"], "image": image(0), "docId": 14465, "ucsf_document_id": "pybv0228",
             "ucsf_document_page_no": "81", "answers": ["0.28"], "data_split": "val"},
            {"questionId": "24580", "question": "What is name of university?", "question_types": ["others"],
             "image": image(1), "docId": 7027, "ucsf_document_id": "nkbl0226", "ucsf_document_page_no": "1",
             "answers": ["university of california", "University of California", "university of california, san diego"],
             "data_split": "val"},
        ],
        [(0, ("0.28",), None, "during the year 1975?"),
         (1, ("university of california", "University of California", "university of california, san diego"), None,
          "What is name of university?")],
    ),
    "okvqa": (
        lambda image: [
            {"question_id": "2971475", "image": image(0), "question": "What sport can you use this for?",
             "answers": ["race"] * 6 + ["racing"] * 4, "question_type": "eight", "answer_type": "other"},
            {"question_id": "5722305", "image": image(1), "question": "Name the type of plant this is?",
             "answers": ["vine"] * 10, "question_type": "eight", "answer_type": "other"},
        ],
        [(0, ("race",) * 6 + ("racing",) * 4, None, "What sport can you use this for?"),
         (1, ("vine",) * 10, None, "Name the type of plant this is?")],
    ),
    "text_vqa": (
        lambda image: [
            {"image_id": "003a8ae2ef43b901", "question_id": 34602, "question": "what is the brand of this camera?",
             "question_tokens": ["what", "is", "the", "brand"], "image": image(0), "image_width": 1024,
             "image_height": 664, "flickr_original_url": "", "flickr_300k_url": "",
             "answers": ["nous les gosses", "dakota"] + ["dakota digital"] * 8, "image_classes": ["Camera"],
             "set_name": "val", "ocr_tokens": ["DAKOTA"]},
            {"image_id": "0b32a0a2a0b2e1e1", "question_id": 34603, "question": "what does the small white text spell?",
             "question_tokens": ["what"], "image": image(1), "image_width": 1024, "image_height": 664,
             "flickr_original_url": "", "flickr_300k_url": "", "answers": ["copenhagen"] * 10,
             "image_classes": ["Poster"], "set_name": "val", "ocr_tokens": []},
        ],
        [(0, ("nous les gosses", "dakota") + ("dakota digital",) * 8, None, "what is the brand of this camera?"),
         (1, ("copenhagen",) * 10, None, "what does the small white text spell?")],
    ),
    "science_qa_img": (
        lambda image: [
            {"image": image(0), "question": "Which of these states is farthest north?",
             "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], "answer": 0, "hint": "",
             "task": "closed choice", "grade": "grade2", "subject": "social science", "topic": "geography",
             "category": "Geography", "skill": "Read a map: cardinal directions", "lecture": "", "solution": ""},
            {"image": None, "question": "Which tense does the sentence use?", "choices": ["past", "future"],
             "answer": 1, "hint": "Mona will print her name.", "task": "closed choice", "grade": "grade2",
             "subject": "language science", "topic": "verbs", "category": "Verb tense", "skill": "", "lecture": "",
             "solution": ""},
            {"image": image(2), "question": "Identify the question that Tom's experiment can best answer.",
             "choices": ["Do ping pong balls stop rolling along the ground sooner?", "Do ping pong balls travel farther?"],
             "answer": 1, "hint": "The passage below describes an experiment.", "task": "closed choice",
             "grade": "grade8", "subject": "natural science", "topic": "science-and-engineering-practices",
             "category": "Designing experiments", "skill": "", "lecture": "", "solution": ""},
        ],
        [(0, ("A",), ("West Virginia", "Louisiana", "Arizona", "Oklahoma"), "A. West Virginia\nB. Louisiana"),
         (2, ("B",), ("Do ping pong balls stop rolling along the ground sooner?", "Do ping pong balls travel farther?"),
          "Context: The passage below describes an experiment.\nIdentify the question")],
    ),
    "st_qa": (
        lambda image: [
            {"image": image(0), "qas": [{"question": "What is written on the sign?", "answers": ["stop", "STOP"]}]},
            {"image": image(1), "qas": [
                {"question": "What brand is the bus?", "answers": ["volvo"]},
                {"question": "What number is the bus?", "answers": ["42"]}]},
        ],
        [(0, ("stop", "STOP"), None, "What is written on the sign?"), (1, ("volvo",), None, "What brand is the bus?"),
         (2, ("42",), None, "What number is the bus?")],
    ),
    "mmmu": (
        lambda image: [
            {"id": "validation_Accounting_1", "question": "<image 1> Which account shows the largest balance?",
             "options": "['Cash', 'Inventory', \"Owner's equity\", 'Payables']", "explanation": "",
             "image_1": image(0), "image_2": None, "image_3": None, "image_4": None, "image_5": None,
             "image_6": None, "image_7": None, "img_type": "['Tables']", "answer": "C",
             "topic_difficulty": "Medium", "question_type": "multiple-choice", "subfield": "Financial Accounting"},
            {"id": "validation_Accounting_2", "question": "Compute the net income shown in <image 1>.",
             "options": "[]", "explanation": "", "image_1": image(1), "image_2": None, "image_3": None,
             "image_4": None, "image_5": None, "image_6": None, "image_7": None, "img_type": "['Tables']",
             "answer": "['24/7', '3.429']", "topic_difficulty": "Hard", "question_type": "open",
             "subfield": "Financial Accounting"},
        ],
        [(0, ("C",), ("Cash", "Inventory", "Owner's equity", "Payables"), "A. Cash\nB. Inventory\nC. Owner's equity"),
         (1, ("24/7", "3.429"), None, "Compute the net income shown in <image 1>.")],
    ),
}


def embedded_image(k: int) -> dict[str, Any]:
    """The HF image struct `datasets` writes to Parquet; odd rows are grayscale to test RGB conversion."""
    return {"bytes": png_bytes(40 + 50 * k, mode="L" if k % 2 else "RGB"), "path": f"{k}.png"}


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def image_files(root: Path, as_struct: bool = False) -> Callable[[int], Any]:
    """Writes the k-th image under root/images and returns its path relative to root."""
    def image(k: int) -> Any:
        relative = f"images/{k}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(png_bytes(40 + 50 * k))
        return {"bytes": None, "path": relative} if as_struct else relative
    return image


def check_samples(family: str, samples: list, split: str, source_tag: str) -> None:
    expected = CASES[family][1]
    assert [sample.request_id for sample in samples] == [f"{family}/{source_tag}/{split}/{index}" for index, *_ in expected]
    for sample, (_, answers, options, prompt_part) in zip(samples, expected):
        assert sample.family == family
        assert sample.metric == FAMILIES[family].metric
        assert sample.max_new_tokens == FAMILIES[family].max_new_tokens
        assert sample.answers == answers
        assert sample.options == options
        assert prompt_part in sample.prompt
        if options is not None:
            assert sample.prompt.endswith(MC_INSTRUCTION)
        assert sample.image.mode == "RGB" and sample.image.size == IMAGE_SIZE
        assert sample.difficulty is None


def test_every_family_has_a_real_dataset_and_a_case():
    assert set(REAL_DATASETS) == set(FAMILIES) == set(CASES)
    for family, spec in REAL_DATASETS.items():
        assert spec.eval_split in spec.splits
        assert spec.family == family


@pytest.mark.parametrize("family", sorted(CASES))
def test_local_parquet_with_embedded_images(tmp_path, family):
    split = REAL_DATASETS[family].eval_split
    write_parquet(tmp_path / f"{split}.parquet", CASES[family][0](embedded_image))
    check_samples(family, load_local(family, tmp_path, split=split, seed=None), split, "local")


@pytest.mark.parametrize("family", ["coco_2014_vqa", "tally_qa", "science_qa_img", "mmmu", "st_qa"])
@pytest.mark.parametrize("as_struct", [False, True], ids=["path", "struct"])
def test_local_jsonl_with_image_paths(tmp_path, family, as_struct):
    split = REAL_DATASETS[family].eval_split
    write_jsonl(tmp_path / f"{split}.jsonl", CASES[family][0](image_files(tmp_path, as_struct)))
    check_samples(family, load_local(family, tmp_path, split=split, seed=None), split, "local")


def test_local_hub_snapshot_layouts(tmp_path):
    # lmms-lab layout: data/<hub split>-0000k-of-0000n.parquet, found for our split "val".
    rows = CASES["coco_2014_vqa"][0](embedded_image)
    write_parquet(tmp_path / "vqa" / "data" / "validation-00001-of-00002.parquet", rows[1:])
    write_parquet(tmp_path / "vqa" / "data" / "validation-00000-of-00002.parquet", rows[:1])
    write_parquet(tmp_path / "vqa" / "data" / "test-00000-of-00001.parquet", rows)
    check_samples("coco_2014_vqa", load_local("coco_2014_vqa", tmp_path / "vqa", "val", seed=None), "val", "local")

    # MMMU layout: one folder per subject config, concatenated in config order.
    rows = CASES["mmmu"][0](embedded_image)
    write_parquet(tmp_path / "mmmu" / "Art" / "validation-00000-of-00001.parquet", rows[1:])
    write_parquet(tmp_path / "mmmu" / "Accounting" / "validation-00000-of-00001.parquet", rows[:1])
    write_parquet(tmp_path / "mmmu" / "Accounting" / "dev-00000-of-00001.parquet", rows)
    check_samples("mmmu", load_local("mmmu", tmp_path / "mmmu", "val", seed=None), "val", "local")

    # A folder named after the split.
    write_parquet(tmp_path / "ok" / "val2014" / "0000.parquet", CASES["okvqa"][0](embedded_image))
    check_samples("okvqa", load_local("okvqa", tmp_path / "ok", "val", seed=None), "val", "local")


def okvqa_rows(count: int) -> list[dict[str, Any]]:
    return [
        {"question_id": str(k), "image": embedded_image(k % 3), "question": f"question {k}?", "answers": [f"a{k}"] * 10,
         "question_type": "other", "answer_type": "other"}
        for k in range(count)
    ]


def indices(samples) -> list[int]:
    return [int(sample.request_id.rsplit("/", 1)[1]) for sample in samples]


def test_n_and_seed(tmp_path):
    write_parquet(tmp_path / "val.parquet", okvqa_rows(12))
    assert indices(load_local("okvqa", tmp_path, "val", n=3, seed=None)) == [0, 1, 2]
    assert indices(load_local("okvqa", tmp_path, "val", n=None, seed=None)) == list(range(12))
    drawn = indices(load_local("okvqa", tmp_path, "val", n=5, seed=7))
    assert drawn == indices(load_local("okvqa", tmp_path, "val", n=5, seed=7))
    assert drawn != indices(load_local("okvqa", tmp_path, "val", n=5, seed=8))
    assert len(set(drawn)) == 5 and drawn != [0, 1, 2, 3, 4]
    everything = indices(load_local("okvqa", tmp_path, "val", n=None, seed=3))
    assert sorted(everything) == list(range(12)) and everything != list(range(12))
    # A smaller n draws a prefix of the same seeded order.
    assert indices(load_local("okvqa", tmp_path, "val", n=4, seed=3)) == everything[:4]
    assert load_local("okvqa", tmp_path, "val", n=0) == []
    sample = load_local("okvqa", tmp_path, "val", n=1, seed=None)[0]
    assert sample.prompt == "question 0?" and sample.answers == ("a0",) * 10
    with pytest.raises(ValueError, match="n=13 exceeds the 12 samples"):
        load_local("okvqa", tmp_path, "val", n=13)
    with pytest.raises(ValueError, match="n=-1"):
        load_local("okvqa", tmp_path, "val", n=-1)


def test_load_samples_reads_a_local_directory(tmp_path):
    write_parquet(tmp_path / "val.parquet", okvqa_rows(4))
    samples = load_samples("okvqa", source=str(tmp_path), split="val", n=2, seed=None)
    assert [sample.request_id for sample in samples] == ["okvqa/local/val/0", "okvqa/local/val/1"]


def test_science_qa_skips_rows_without_image_and_keeps_hub_indices(tmp_path):
    write_parquet(tmp_path / "validation.parquet", CASES["science_qa_img"][0](embedded_image))
    assert indices(load_local("science_qa_img", tmp_path, "val", seed=None)) == [0, 2]
    with pytest.raises(ValueError, match="n=3 exceeds the 2 samples"):
        load_local("science_qa_img", tmp_path, "val", n=3)


def test_st_qa_val_is_carved_from_the_hub_train_split(tmp_path):
    image_rows = 2 * ST_VQA_VAL_EVERY_ROWS + 1
    rows = [
        {"image": embedded_image(k % 3), "qas": [{"question": f"q{k}-{j}?", "answers": [f"a{k}"]} for j in range(1 + (k == 0))]}
        for k in range(image_rows)
    ]
    write_parquet(tmp_path / "train.parquet", rows)
    val = load_local("st_qa", tmp_path, "val", seed=None)
    train = load_local("st_qa", tmp_path, "train", seed=None)
    # Row 0 has two questions, so the question index of row k > 0 is k + 1.
    assert [sample.prompt for sample in val] == ["q0-0?", "q0-1?", f"q{ST_VQA_VAL_EVERY_ROWS}-0?", f"q{2 * ST_VQA_VAL_EVERY_ROWS}-0?"]
    assert indices(val) == [0, 1, ST_VQA_VAL_EVERY_ROWS + 1, 2 * ST_VQA_VAL_EVERY_ROWS + 1]
    assert sorted(indices(val) + indices(train)) == list(range(image_rows + 1))
    # A file named after our split already is the val split: nothing is carved.
    write_parquet(tmp_path / "val.parquet", rows[:3])
    assert indices(load_local("st_qa", tmp_path, "val", seed=None)) == [0, 1, 2, 3]


# --- errors -------------------------------------------------------------------------------------


def test_missing_directory_and_split_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_local("okvqa", tmp_path / "absent", "val")
    (tmp_path / "notes.txt").write_text("")
    write_parquet(tmp_path / "train.parquet", okvqa_rows(1))
    with pytest.raises(FileNotFoundError) as error:
        load_local("okvqa", tmp_path, "val")
    message = str(error.value)
    assert "val.parquet" in message and "*/val2014-*.parquet" in message
    assert "notes.txt" in message and "train.parquet" in message


def test_missing_column_names_column_file_and_present_columns(tmp_path):
    rows = okvqa_rows(2)
    for row in rows:
        del row["answers"]
    path = write_parquet(tmp_path / "val.parquet", rows)
    with pytest.raises(ValueError, match=r"missing column 'answers'") as error:
        load_local("okvqa", tmp_path, "val")
    assert str(path) in str(error.value) and "'question_type'" in str(error.value)

    jsonl = tmp_path / "jsonl"
    write_jsonl(jsonl / "val.jsonl", [{"question": "q?", "answers": ["a"]}])
    with pytest.raises(ValueError, match=r"val.jsonl line 1: missing column 'image'"):
        load_local("okvqa", jsonl, "val")


def test_bad_json_and_bad_nested_questions(tmp_path):
    (tmp_path / "val.jsonl").write_text('{"question": "q?",\n')
    with pytest.raises(ValueError, match="val.jsonl line 1: not valid JSON"):
        load_local("okvqa", tmp_path, "val")
    write_parquet(tmp_path / "tally" / "test.parquet", [{"image": embedded_image(0), "qa": [{"question": "How many?"}]}])
    with pytest.raises(ValueError, match=r"row 0, qa\[0\]: missing key 'answer'"):
        load_local("tally_qa", tmp_path / "tally", "test")


def test_unreadable_images_name_the_request_and_the_file(tmp_path):
    rows = okvqa_rows(2)
    rows[1]["image"] = {"bytes": b"not an image", "path": "broken.png"}
    write_parquet(tmp_path / "val.parquet", rows)
    with pytest.raises(ValueError, match=r"okvqa/local/val/1 \(.*val.parquet row 1\): cannot read embedded image bytes \(broken.png\)"):
        load_local("okvqa", tmp_path, "val", seed=None)
    # Rows that are not selected are never decoded.
    assert len(load_local("okvqa", tmp_path, "val", n=1, seed=None)) == 1

    truncated = tmp_path / "truncated"
    image = image_files(truncated)
    rows = [dict(row, image=image(k)) for k, row in enumerate(okvqa_rows(2))]
    (truncated / "images" / "1.png").write_bytes(png_bytes(0)[:40])
    write_jsonl(truncated / "val.jsonl", rows)
    with pytest.raises(ValueError, match=r"okvqa/local/val/1 .*cannot read image file .*images/1.png"):
        load_local("okvqa", truncated, "val", seed=None)

    missing = tmp_path / "missing"
    write_jsonl(missing / "val.jsonl", [dict(row, image="images/nowhere.png") for row in okvqa_rows(1)])
    with pytest.raises(ValueError, match=r"okvqa/local/val/0 .*image file 'images/nowhere.png' not found"):
        load_local("okvqa", missing, "val")


def test_unknown_family_and_split(tmp_path):
    for loader in (lambda: load_local("coco", tmp_path, "val"), lambda: load_hub("coco", "val")):
        with pytest.raises(ValueError, match=r"family='coco' is not a known task family; expected one of \[.*'okvqa'"):
            loader()
    with pytest.raises(ValueError, match=r"split='val' has no real data for family 'tally_qa'.*\['test'\]"):
        load_hub("tally_qa", "val")
    with pytest.raises(ValueError, match="split='dev' is not valid"):
        load_local("mmmu", tmp_path, "dev")


def test_multiple_choice_answer_must_be_among_options(tmp_path):
    rows = CASES["science_qa_img"][0](embedded_image)
    rows[2]["answer"] = 5
    write_parquet(tmp_path / "science" / "val.parquet", rows)
    with pytest.raises(ValueError, match=r"science_qa_img/local/val/2 .*'answer'=5 is not an index among the 2 options"):
        load_local("science_qa_img", tmp_path / "science", "val", seed=None)

    rows = CASES["mmmu"][0](embedded_image)
    rows[0]["answer"] = "E"
    write_parquet(tmp_path / "mmmu" / "val.parquet", rows)
    with pytest.raises(ValueError, match=r"mmmu/local/val/0 .*'answer'='E' is not among the option letters A, B, C, D"):
        load_local("mmmu", tmp_path / "mmmu", "val", seed=None)

    rows = CASES["mmmu"][0](embedded_image)
    rows[0]["options"] = "Cash, Inventory"
    write_parquet(tmp_path / "mmmu_options" / "val.parquet", rows)
    with pytest.raises(ValueError, match=r"mmmu/local/val/0 .*'options'='Cash, Inventory' is not a list literal"):
        load_local("mmmu", tmp_path / "mmmu_options", "val", seed=None)


# --- hub ----------------------------------------------------------------------------------------


def test_load_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match=r"needs the `datasets` package: pip install datasets"):
        load_hub("okvqa", "val", n=2)


class FakeDatasets:
    """Stands in for the `datasets` module: load_dataset serves rows from a dict and records calls."""

    def __init__(self, monkeypatch, tables: dict[tuple[str, str | None, str], list[dict[str, Any]]]):
        self.tables = tables
        self.calls: list[dict[str, Any]] = []
        module = types.ModuleType("datasets")
        module.load_dataset = self.load_dataset
        module.Image = type("Image", (), {"__init__": lambda self, decode=True: None})
        monkeypatch.setitem(sys.modules, "datasets", module)

    def load_dataset(self, path, name=None, split=None, streaming=False, **kwargs):
        self.calls.append({"path": path, "name": name, "split": split, "streaming": streaming, **kwargs})
        return list(self.tables.get((path, name, split), []))


PIL_IMAGE_FAMILIES = {"coco_2014_vqa", "doc_qa", "mmmu", "tally_qa"}


def pil_image(k: int) -> Image.Image:
    return Image.new("RGB" if k % 2 == 0 else "L", IMAGE_SIZE, 40 + 50 * k)


@pytest.mark.parametrize("family", sorted(CASES))
def test_load_hub_calls_load_dataset_with_the_documented_id_config_and_split(monkeypatch, family):
    spec = REAL_DATASETS[family]
    split = spec.eval_split
    hub_split = spec.splits[split]
    # Hub rows come with decoded PIL images or with undecoded structs; both must work.
    rows = CASES[family][0](pil_image if family in PIL_IMAGE_FAMILIES else embedded_image)
    if family == "st_qa":
        # val is carved from hub train: rows 1.. are train rows, so pad them in between.
        filler = [{"image": embedded_image(0), "qas": [{"question": "filler?", "answers": ["x"]}]}]
        rows = rows[:1] + filler * (ST_VQA_VAL_EVERY_ROWS - 1) + rows[1:]
    first_config = spec.hub_configs[0]
    fake = FakeDatasets(monkeypatch, {(spec.hub_id, first_config, hub_split): rows})
    samples = load_hub(family, split, n=None, seed=None)
    assert [call["path"] for call in fake.calls] == [spec.hub_id] * len(spec.hub_configs)
    assert [call["name"] for call in fake.calls] == list(spec.hub_configs)
    assert all(call["split"] == hub_split and call["streaming"] is True for call in fake.calls)
    if family == "st_qa":
        expected = CASES[family][1]
        assert indices(samples) == [0, ST_VQA_VAL_EVERY_ROWS, ST_VQA_VAL_EVERY_ROWS + 1]
        assert [sample.answers for sample in samples] == [answers for _, answers, _, _ in expected]
    else:
        check_samples(family, samples, split, "hub")


def test_load_hub_spec_values():
    expected = {
        "coco_2014_vqa": ("lmms-lab/VQAv2", (None,), {"val": "validation"}),
        "coco_caption": ("lmms-lab/COCO-Caption2017", (None,), {"val": "val"}),
        "tally_qa": ("vikhyatk/tallyqa-test", (None,), {"test": "test"}),
        "doc_qa": ("lmms-lab/DocVQA", ("DocVQA",), {"train": "train", "val": "validation"}),
        "okvqa": ("lmms-lab/OK-VQA", (None,), {"val": "val2014"}),
        "text_vqa": ("lmms-lab/textvqa", (None,), {"train": "train", "val": "validation"}),
        "science_qa_img": ("derek-thomas/ScienceQA", (None,), {"train": "train", "val": "validation", "test": "test"}),
        "st_qa": ("vikhyatk/st-vqa", (None,), {"train": "train", "val": "train"}),
        "mmmu": ("MMMU/MMMU", MMMU_SUBJECTS, {"train": "dev", "val": "validation"}),
    }
    for family, (hub_id, configs, splits) in expected.items():
        spec = REAL_DATASETS[family]
        assert (spec.hub_id, spec.hub_configs, dict(spec.splits)) == (hub_id, configs, splits)
    assert len(MMMU_SUBJECTS) == 30 and list(MMMU_SUBJECTS) == sorted(MMMU_SUBJECTS)


def test_load_hub_streams_only_as_far_as_needed(monkeypatch):
    rows = CASES["mmmu"][0](embedded_image)
    fake = FakeDatasets(monkeypatch, {("MMMU/MMMU", "Accounting", "validation"): rows, ("MMMU/MMMU", "Agriculture", "validation"): rows})
    samples = load_hub("mmmu", "val", n=2, seed=None)
    assert [call["name"] for call in fake.calls] == ["Accounting"]  # the later subjects are never opened
    assert indices(samples) == [0, 1]
    # A seeded draw reads the first max(10 n, 1000) records, here every subject, and indexes them
    # across subjects in config order.
    fake.calls.clear()
    drawn = load_hub("mmmu", "val", n=3, seed=0)
    assert len(fake.calls) == 30 and len(set(indices(drawn))) == 3 and max(indices(drawn)) < 4
    assert indices(drawn) == indices(load_hub("mmmu", "val", n=3, seed=0))
    with pytest.raises(ValueError, match=r"n=5 exceeds the 4 samples available in mmmu val \(hub MMMU/MMMU"):
        load_hub("mmmu", "val", n=5, seed=0)


def test_load_hub_window_bounds_the_records_read(monkeypatch):
    rows = okvqa_rows(3) * 10  # 30 rows
    FakeDatasets(monkeypatch, {("lmms-lab/OK-VQA", None, "val2014"): rows})
    monkeypatch.setattr(hub_module, "SHUFFLE_WINDOW_MIN_RECORDS", 6)
    monkeypatch.setattr(hub_module, "SHUFFLE_WINDOW_PER_SAMPLE", 2)
    for seed in range(20):
        assert max(indices(load_hub("okvqa", "val", n=2, seed=seed))) < 6
    assert max(indices(load_hub("okvqa", "val", n=4, seed=1))) < 8


def test_load_hub_missing_column(monkeypatch):
    rows = okvqa_rows(2)
    for row in rows:
        del row["question"]
    FakeDatasets(monkeypatch, {("lmms-lab/OK-VQA", None, "val2014"): rows})
    with pytest.raises(ValueError, match=r"hub dataset lmms-lab/OK-VQA split val2014: missing column 'question'"):
        load_hub("okvqa", "val", n=1)


def test_load_samples_hub_source_uses_load_hub(monkeypatch):
    FakeDatasets(monkeypatch, {("lmms-lab/OK-VQA", None, "val2014"): okvqa_rows(3)})
    samples = load_samples("okvqa", source="hub", split="val", n=2, seed=None)
    assert [sample.request_id for sample in samples] == ["okvqa/hub/val/0", "okvqa/hub/val/1"]


def test_load_hub_with_the_real_datasets_library(tmp_path, monkeypatch):
    """The real `datasets` streaming path (image casting, split files), on a local hub-layout copy."""
    datasets = pytest.importorskip("datasets")
    rows = CASES["okvqa"][0](lambda k: Image.open(io.BytesIO(embedded_image(k)["bytes"])))
    features = datasets.Features({
        "question_id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
        "answers": [datasets.Value("string")], "question_type": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
    })
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "data" / "val2014-00000-of-00001.parquet"))
    monkeypatch.setitem(REAL_DATASETS, "okvqa", dataclasses.replace(REAL_DATASETS["okvqa"], hub_id=str(tmp_path)))
    check_samples("okvqa", load_hub("okvqa", "val", n=None, seed=None), "val", "hub")
    assert indices(load_hub("okvqa", "val", n=1, seed=0)) in ([0], [1])
