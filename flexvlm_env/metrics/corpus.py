"""Corpus-level evaluation: the caption metrics of the COCO leaderboard, and means of the rest.

Caption samples are scored as COCO does it, through pycocoevalcap: captions and references go
through its Java PTB tokenizer, then BLEU-4, METEOR, ROUGE-L and CIDEr-D are computed over the
whole set (CIDEr-D with the document frequencies of this very set, unlike the per-sample reward;
SPICE on request, as it is slow and downloads Stanford CoreNLP models on first use). Every other
metric is the mean of the per-sample `score`. Java is needed for the caption metrics only.
"""
from __future__ import annotations

import shutil
from collections import defaultdict
from typing import Sequence

from ..tasks.sample import Sample
from .extract import extract_answer
from .scoring import METRICS, score

CAPTION_METRIC = "cider"


def require_java(what: str) -> None:
    """Raise a RuntimeError naming `what` if no `java` executable is on PATH."""
    if shutil.which("java") is None:
        raise RuntimeError(
            f"{what} requires Java (pycocoevalcap runs Java programs), but no `java` executable is on "
            "PATH; install a Java runtime, e.g. `apt-get install default-jre-headless`"
        )


def caption_corpus_scores(
    references: Sequence[Sequence[str]], captions: Sequence[str], spice: bool = False
) -> dict[str, float]:
    """BLEU-4, METEOR, ROUGE-L, CIDEr-D (and SPICE) of `captions` against `references`.

    Returns {"bleu4", "meteor", "rouge_l", "cider_d"[, "spice"]}. Inputs are raw text, one caption
    and one list of references per image.
    """
    if len(references) != len(captions):
        raise ValueError(f"got {len(references)} reference sets but {len(captions)} captions")
    if not captions:
        raise ValueError("captions is empty: corpus metrics need at least one image")
    require_java("corpus caption metrics (BLEU/METEOR/ROUGE-L/CIDEr-D)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The Java tokenizer reads one caption per line, so an empty caption would shift every later
    # one; a lone period tokenises to nothing, which is what an empty caption should score as.
    gts = {index: [{"caption": ref.strip() or "."} for ref in refs] for index, refs in enumerate(references)}
    res = {index: [{"caption": caption.strip() or "."}] for index, caption in enumerate(captions)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_scorer = Meteor()
    try:
        meteor, _ = meteor_scorer.compute_score(gts, res)
    finally:
        # The scorer keeps a JVM running until garbage collection; stop it now.
        meteor_scorer.meteor_p.kill()
        meteor_scorer.meteor_p.wait()
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    result = {"bleu4": float(bleu[3]), "meteor": float(meteor), "rouge_l": float(rouge), "cider_d": float(cider)}
    if spice:
        from pycocoevalcap.spice.spice import Spice

        result["spice"], _ = Spice().compute_score(gts, res)
        result["spice"] = float(result["spice"])
    return result


def corpus_scores(samples: Sequence[Sample], predictions: Sequence[str], spice: bool = False) -> dict[str, float]:
    """Corpus metrics of raw generations `predictions` for `samples`, grouped by metric.

    Returns "n" (number of samples) and, per metric present, "n_<metric>" and its values: for
    caption samples "bleu4", "meteor", "rouge_l", "cider_d" (+ "spice" if asked), for any other
    metric the mean per-sample score under the metric's name (e.g. "vqa_accuracy").
    """
    if len(samples) != len(predictions):
        raise ValueError(f"got {len(samples)} samples but {len(predictions)} predictions")
    groups: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        METRICS[sample.metric]  # fail early, before any Java work, on an unknown metric
        groups[sample.metric].append(index)
    result: dict[str, float] = {"n": len(samples)}
    for metric, indices in groups.items():
        result[f"n_{metric}"] = len(indices)
        if metric == CAPTION_METRIC:
            result.update(
                caption_corpus_scores(
                    [samples[i].answers for i in indices],
                    [extract_answer(predictions[i]) for i in indices],
                    spice=spice,
                )
            )
        else:
            result[metric] = sum(score(samples[i], predictions[i]) for i in indices) / len(indices)
    return result
