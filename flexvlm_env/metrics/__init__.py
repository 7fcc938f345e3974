"""Task metrics: per-sample scores for rewards, corpus scores for evaluation.

`score(sample, prediction_text)` returns the quality of one raw generation in [0, 1] using the
sample's metric (`METRICS` lists them: "vqa_accuracy", "exact_match", "anls", "mc_accuracy",
"mmmu", "cider"); the generation first goes through `extract_answer`. `corpus_scores(samples,
predictions)` evaluates a whole set: COCO caption metrics through pycocoevalcap (Java) for caption
samples, the mean per-sample score for the others. Caption rewards are per-sample CIDEr-D with
document frequencies fixed in advance: `build_cider_df`, `CiderDStats`, `set_cider_df` /
`get_cider_df` (details in `flexvlm_env.metrics.caption`).
"""
from .anls import anls
from .caption import (
    CIDER_REWARD_SCALE,
    CiderD,
    CiderDStats,
    build_cider_df,
    cider_reward,
    get_cider_df,
    ptb_tokenize,
    set_cider_df,
)
from .choice import mc_accuracy, parse_choice
from .corpus import caption_corpus_scores, corpus_scores
from .exact import exact_match
from .extract import extract_answer
from .mmmu import mmmu_score, parse_multi_choice_response, parse_open_response
from .scoring import METRICS, UnknownMetricError, score
from .vqa import normalize_vqa_answer, vqa_accuracy

__all__ = [
    "CIDER_REWARD_SCALE",
    "CiderD",
    "CiderDStats",
    "METRICS",
    "UnknownMetricError",
    "anls",
    "build_cider_df",
    "caption_corpus_scores",
    "cider_reward",
    "corpus_scores",
    "exact_match",
    "extract_answer",
    "get_cider_df",
    "mc_accuracy",
    "mmmu_score",
    "normalize_vqa_answer",
    "parse_choice",
    "parse_multi_choice_response",
    "parse_open_response",
    "ptb_tokenize",
    "score",
    "set_cider_df",
    "vqa_accuracy",
]
