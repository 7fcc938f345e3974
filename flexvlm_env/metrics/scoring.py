"""Per-sample scoring: the metric table and `score`, which the environments' rewards call.

`METRICS` maps each metric name a `Sample` can carry to a function `(sample, generation) -> float`
in [0, 1]. Every function first runs the raw generation through `extract_answer`, then applies its
metric to the sample's references, so `score(sample, text)` and `METRICS[sample.metric](sample,
text)` are the same thing. Looking up a name that is not in the table raises an error that is both
a KeyError (it is a mapping) and a ValueError (it is a bad argument) and lists the known names.
"""
from __future__ import annotations

from typing import Callable

from ..tasks.sample import Sample
from .anls import anls
from .caption import CiderD, cider_df_key, get_cider_df
from .choice import mc_accuracy
from .exact import exact_match
from .extract import extract_answer, strip_final_period
from .mmmu import mmmu_score
from .vqa import vqa_accuracy

MetricFn = Callable[[Sample, str], float]


class UnknownMetricError(KeyError, ValueError):
    """A metric name that is not in METRICS."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class MetricTable(dict):
    """A dict of metric functions whose missing keys raise UnknownMetricError."""

    def __missing__(self, name: str) -> MetricFn:
        raise UnknownMetricError(f"metric={name!r} is not a known metric; expected one of {sorted(self)}")


def _vqa_accuracy(sample: Sample, generation: str) -> float:
    return vqa_accuracy(extract_answer(generation), sample.answers)


def _exact_match(sample: Sample, generation: str) -> float:
    return exact_match(extract_answer(generation), sample.answers)


def _anls(sample: Sample, generation: str) -> float:
    return anls(extract_answer(generation), [strip_final_period(a) for a in sample.answers])


def _mc_accuracy(sample: Sample, generation: str) -> float:
    if not sample.options:
        raise ValueError(f"sample {sample.request_id!r} uses metric 'mc_accuracy' but has no options")
    return mc_accuracy(extract_answer(generation), sample.answers[0], sample.options)


def _mmmu(sample: Sample, generation: str) -> float:
    return mmmu_score(extract_answer(generation), [strip_final_period(a) for a in sample.answers], sample.options)


def _cider(sample: Sample, generation: str) -> float:
    stats = get_cider_df(cider_df_key(sample.request_id))
    return CiderD(stats).reward(extract_answer(generation), sample.answers)


METRICS: dict[str, MetricFn] = MetricTable(
    vqa_accuracy=_vqa_accuracy,
    exact_match=_exact_match,
    anls=_anls,
    mc_accuracy=_mc_accuracy,
    mmmu=_mmmu,
    cider=_cider,
)


def score(sample: Sample, prediction_text: str) -> float:
    """Quality of the raw generation `prediction_text` for `sample`, in [0, 1], by `sample.metric`.

    Caption samples ("cider") need a CIDEr-D document-frequency table: the shipped one for
    procedural samples, one registered with `set_cider_df` for real data (see `caption`).
    """
    return METRICS[sample.metric](sample, prediction_text)
