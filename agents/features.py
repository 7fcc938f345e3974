"""Observation scaling shared by the learned controllers.

The env's observation is in physical units (budget in ms, prompt length in characters, image size
in pixels), spanning several orders of magnitude; networks learn from log-scaled values. The
transform is fixed (no running statistics), so a saved controller needs nothing but its weights
to see what it saw in training, and `ScaledObservation` (for SB3, which reads the env's Dict) and
`observation_features` (a flat vector for the MLP and the text rendering) apply the same one.
"""
from __future__ import annotations

from collections.abc import Mapping

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from flexvlm_env.envs.core import FAMILY_NAMES, IMAGE_HIGH, MAX_BUDGET_FRACTION, MAX_BUDGET_MS, PROMPT_HIGH
from flexvlm_env.features import IMAGE_FEATURES, PROMPT_FEATURES

# image width px, height px and aspect are log-scaled; contrast, detail, edge fraction are in [0, 1].
_IMAGE_LOG = np.array([True, True, True, False, False, False])
FEATURE_NAMES: tuple[str, ...] = (
    *(f"family={name}" for name in FAMILY_NAMES),
    "budget_fraction",
    "log1p_budget_ms",
    *(f"log1p_{name}" for name in PROMPT_FEATURES),
    *(f"log1p_{name}" if log else name for name, log in zip(IMAGE_FEATURES, _IMAGE_LOG)),
)
N_FEATURES = len(FEATURE_NAMES)


def _scale(budget_fraction: np.ndarray, budget_ms: np.ndarray, prompt: np.ndarray, image: np.ndarray) -> tuple:
    """The networks' scaling of float32 arrays (any leading shape; features on the last axis). The batch-1
    paths apply it to one observation's flat vector instead (`scaled_vector_one`, tested equal)."""
    return (budget_fraction, np.log1p(budget_ms), np.log1p(prompt),
            np.where(_IMAGE_LOG, np.log1p(image), image).astype(np.float32))


def scaled_parts(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float32 budget_fraction [B, 1], log1p budget_ms [B, 1], log1p prompt features [B, P] and image
    features [B, I] (the width, height and aspect log1p-scaled), as the networks see them."""
    return _scale(np.asarray(batch["budget_fraction"], dtype=np.float32).reshape(-1, 1),
                  np.asarray(batch["budget_ms"], dtype=np.float32).reshape(-1, 1),
                  np.asarray(batch["prompt"], dtype=np.float32), np.asarray(batch["image"], dtype=np.float32))


N_SCALED = 2 + len(PROMPT_FEATURES) + len(IMAGE_FEATURES)
# where each observation key's values sit in `scaled_vector_one`'s vector
SCALED_VECTOR_SLICES = {"budget_fraction": slice(0, 1), "budget_ms": slice(1, 2),
                        "prompt": slice(2, 2 + len(PROMPT_FEATURES)), "image": slice(2 + len(PROMPT_FEATURES), N_SCALED)}
# In the flat vector [fraction, budget_ms, prompt..., image...] the log-scaled values form one run:
# budget_ms, the prompt features and the image's width, height and aspect.
_LOG_RUN = slice(1, 2 + len(PROMPT_FEATURES) + int(_IMAGE_LOG.sum()))
assert _IMAGE_LOG.tolist() == sorted(_IMAGE_LOG.tolist(), reverse=True), "the log-scaled image features must come first"


def scaled_vector_one(observation: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32 [N_SCALED]: `scaled_parts` of one env observation (its arrays without the batch axis) in one
    vector, [budget_fraction, log1p budget_ms, prompt..., image...] (`SCALED_VECTOR_SLICES`): the same
    values from five NumPy calls, one log1p over the log-scaled run. A batch-1 decision is mostly such
    per-call overhead (M3)."""
    x = np.empty(N_SCALED, dtype=np.float32)
    for key, part in SCALED_VECTOR_SLICES.items():
        try:
            x[part] = observation[key]
        except ValueError:
            raise ValueError(f"observation[{key!r}] has shape {np.shape(observation[key])}; one observation's has "
                             f"{part.stop - part.start} value(s)") from None
    np.log1p(x[_LOG_RUN], out=x[_LOG_RUN])
    return x


def observation_features(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32 [B, N_FEATURES] (`FEATURE_NAMES`) from a batch of observations (`agents.base.as_batch`)."""
    family = np.asarray(batch["family"], dtype=np.int64).reshape(-1)
    one_hot = np.zeros((len(family), len(FAMILY_NAMES)), dtype=np.float32)
    one_hot[np.arange(len(family)), family] = 1.0
    return np.concatenate([one_hot, *scaled_parts(batch)], axis=1)


def scale_observation(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The observation Dict with log-scaled values (same keys and shapes; batch or single)."""
    fraction, budget_ms, prompt, image = scaled_parts(batch)
    single = np.ndim(batch["family"]) == 0
    if single:
        return {"family": batch["family"], "budget_fraction": fraction[0], "budget_ms": budget_ms[0],
                "prompt": prompt.reshape(-1), "image": image.reshape(-1)}
    return {"family": np.asarray(batch["family"]), "budget_fraction": fraction, "budget_ms": budget_ms,
            "prompt": prompt, "image": image}


def scaled_observation_space() -> spaces.Dict:
    """What `ScaledObservation` returns (finite bounds, as SB3's checker wants)."""
    image_high = np.where(_IMAGE_LOG, np.log1p(IMAGE_HIGH), IMAGE_HIGH).astype(np.float32)
    return spaces.Dict(
        {
            "family": spaces.Discrete(len(FAMILY_NAMES)),
            "budget_ms": spaces.Box(0.0, float(np.log1p(MAX_BUDGET_MS)), (1,), np.float32),
            "budget_fraction": spaces.Box(0.0, MAX_BUDGET_FRACTION, (1,), np.float32),
            "prompt": spaces.Box(0.0, np.log1p(PROMPT_HIGH).astype(np.float32), dtype=np.float32),
            "image": spaces.Box(np.zeros_like(image_high), image_high, dtype=np.float32),
        }
    )


class ScaledObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """A FlexVLM env whose observations are log-scaled (`scale_observation`), for SB3 policies."""

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        self.observation_space = scaled_observation_space()

    def observation(self, observation):
        return scale_observation(observation)
