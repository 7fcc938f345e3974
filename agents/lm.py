"""A tiny causal LM as a controller: it reads a text rendering of the observation and writes the configuration.

The DPO and GRPO controllers (`trainers/dpo.py`, `trainers/grpo.py`, both with TRL) share everything here:

- **Vocabulary and tokenizer.** A compact word-level vocabulary (`Vocabulary`): special tokens, one token per
  task family, one token per (feature, bucket) for the twelve log-scaled observation features
  (`agents.features.observation_features`, bucketed by `FeatureBuckets`), an answer marker, and one token per
  knob value of the grid. `build_tokenizer` wraps it (built locally with the `tokenizers` library) in a
  `transformers.PreTrainedTokenizerFast` with pad/bos/eos; the tokenizer prepends `<bos>`.
- **Text.** `render_observation` writes e.g. ``family=doc_qa budget_fraction=3 budget_ms=7 ... config:`` and the
  model answers ``crops=4 top_k=2 active_blocks=12<eos>`` (`render_config`). `parse_config` turns an answer (text or
  token ids) into a config index, or None for anything but the three knob tokens in order (optionally followed
  by `<eos>`): such invalid outputs are what the trainers penalise.
- **Model.** `make_model`: a randomly initialised `LlamaForCausalLM` (hidden 64, 2 layers, seeded).
- **Decoding.** TRL trains the `transformers` model; decisions are decoded by `NumpyDecoder`, a manual
  re-implementation of the same Llama forward pass in NumPy with a KV cache (a batch-1 decision, rendering
  included, takes about 0.4 ms on a CPU, where three `transformers` forward calls with a cache take 1.3 ms). It
  reads the model's weights through NumPy views (so it always sees the current weights, also while training),
  and its logits match the `transformers` model's to float32 rounding (tested). Next to a GPU model,
  `LMController.use_device("cuda")` makes greedy constrained decisions one Triton kernel instead
  (`agents/lm_gpu.py`, same decisions; 0.10-0.13 ms a batch-1 decision on an H200 host, 0.086 ms of it on the
  GPU, against 0.74-1.45 ms with NumPy there).
- **Controller.** `LMController` decodes greedily, by default constrained to the knob tokens at each of the three
  positions (so every decision is a valid configuration); `invalid_output_rate` measures how often the
  unconstrained greedy answer would not parse. `state()` holds the model config, the tokenizer JSON and the bucket
  edges; the weights go to safetensors (no pickle).
"""
from __future__ import annotations

import itertools
import json
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from flexvlm_env.config import KnobGrid
from flexvlm_env.envs.core import FAMILY_NAMES

from .base import Controller, as_batch, is_single_observation, stack_observations
from .features import observation_features, scaled_vector_one

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
ANSWER_TOKEN = "config:"
# The twelve non-family columns of `observation_features` (log-scaled where FEATURE_NAMES says so), as named in text.
FEATURE_TOKENS = (
    "budget_fraction", "budget_ms", "prompt_chars", "prompt_words", "prompt_digits", "prompt_options",
    "image_width", "image_height", "image_aspect", "image_contrast", "image_detail", "image_edges",
)
_FEATURE_COLUMNS = np.arange(len(FEATURE_TOKENS))
N_FAMILIES = len(FAMILY_NAMES)
KNOB_TOKENS = ("crops", "top_k", "active_blocks")
DEFAULT_BUCKETS = 16
PROMPT_LENGTH = 2 + len(FEATURE_TOKENS) + 1  # <bos> family features... config:
COMPLETION_LENGTH = 4  # three knob tokens and <eos>
# Bucketing tolerance: a value within this of an edge counts as at or above it (float32 features vs JSON edges).
_EDGE_TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------------------
# vocabulary, tokenizer, text


class Vocabulary:
    """The token list for a knob grid and a number of buckets per feature (deterministic, so ids are too)."""

    def __init__(self, grid: KnobGrid | None = None, n_buckets: int = DEFAULT_BUCKETS):
        if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or not 2 <= n_buckets <= 100:
            raise ValueError(f"n_buckets={n_buckets!r} must be an int in 2..100")
        self.grid = grid or KnobGrid()
        self.n_buckets = n_buckets
        tokens = list(SPECIAL_TOKENS)
        tokens += [f"family={name}" for name in FAMILY_NAMES]
        tokens += [f"{name}={b}" for name in FEATURE_TOKENS for b in range(n_buckets)]
        tokens.append(ANSWER_TOKEN)
        self.knob_values = (self.grid.crops, self.grid.top_k, self.grid.active_blocks)
        for knob, values in zip(KNOB_TOKENS, self.knob_values):
            tokens += [f"{knob}={v}" for v in values]
        self.tokens: tuple[str, ...] = tuple(tokens)
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (self.token_to_id[t] for t in SPECIAL_TOKENS)
        self.answer_id = self.token_to_id[ANSWER_TOKEN]
        self.family_ids = np.array([self.token_to_id[f"family={n}"] for n in FAMILY_NAMES], dtype=np.int64)
        self.feature_ids = np.array(
            [[self.token_to_id[f"{name}={b}"] for b in range(n_buckets)] for name in FEATURE_TOKENS], dtype=np.int64
        )  # [12, n_buckets]
        self.knob_ids = tuple(
            np.array([self.token_to_id[f"{knob}={v}"] for v in values], dtype=np.int64)
            for knob, values in zip(KNOB_TOKENS, self.knob_values)
        )
        # plain-Python copies for the batch-1 path (`prompt_ids_one`, `knob_config_index`), where every NumPy
        # call costs about a microsecond
        self.family_id_list = self.family_ids.tolist()
        self.feature_id_lists = self.feature_ids.tolist()
        self._config_of_knobs = {
            knobs: index for index, knobs in enumerate(itertools.product(*(ids.tolist() for ids in self.knob_ids)))
        }
        # token id -> (knob position, value index), -1 for every other token
        self._knob_position = np.full(len(self.tokens), -1, dtype=np.int64)
        self._knob_index = np.full(len(self.tokens), -1, dtype=np.int64)
        for position, ids in enumerate(self.knob_ids):
            self._knob_position[ids] = position
            self._knob_index[ids] = np.arange(len(ids))

    def __len__(self) -> int:
        return len(self.tokens)

    def config_index(self, knob_tokens: np.ndarray) -> np.ndarray:
        """Config indices of `[B, 3]` knob token ids, -1 where a row is not (crops, top_k, active_blocks) tokens."""
        tokens = np.asarray(knob_tokens, dtype=np.int64).reshape(-1, 3)
        inside = (tokens >= 0) & (tokens < len(self.tokens))
        safe = np.where(inside, tokens, 0)
        ok = inside.all(axis=1) & (self._knob_position[safe] == np.arange(3)).all(axis=1)
        i, j, k = (self._knob_index[safe[:, n]] for n in range(3))
        shape = self.grid.shape
        return np.where(ok, (i * shape[1] + j) * shape[2] + k, -1)

    def knob_config_index(self, knob_tokens: np.ndarray) -> int:
        """Config index of one (crops, top_k, active_blocks) triple of knob token ids (what the decision kernel
        returns: it picks each from its step's list), from a dict: the batch-1 path's lookup."""
        knobs = tuple(np.asarray(knob_tokens).tolist())
        try:
            return self._config_of_knobs[knobs]
        except KeyError:
            raise ValueError(f"knob_tokens={list(knobs)} is not a (crops, top_k, active_blocks) triple of knob token "
                             f"ids; config_index maps any rows, -1 for invalid ones") from None

    def completion_ids(self, index: int) -> list[int]:
        """Token ids of the answer for config `index` (three knob tokens and <eos>)."""
        i, j, k = np.unravel_index(int(index), self.grid.shape)
        return [int(self.knob_ids[0][i]), int(self.knob_ids[1][j]), int(self.knob_ids[2][k]), self.eos_id]


def build_tokenizer(vocabulary: Vocabulary):
    """A `PreTrainedTokenizerFast` over `vocabulary` (word level, whitespace split, `<bos>` prepended, left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel(vocab=dict(vocabulary.token_to_id), unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocabulary.bos_id)]
    )
    return tokenizer_from_object(tokenizer)


def tokenizer_from_object(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left", truncation_side="left")


class FeatureBuckets:
    """Bucket edges of the twelve scaled features: bucket b of a value is the number of edges <= it.

    `fit` takes the edges at quantiles of training observations (distinct values only, so a feature with few
    values, like the budget fraction, gets one bucket per value and a value between two seen ones falls into the
    lower one's bucket)."""

    def __init__(self, edges: Sequence[Sequence[float]], n_buckets: int = DEFAULT_BUCKETS):
        if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or not 2 <= n_buckets <= 100:
            raise ValueError(f"n_buckets={n_buckets!r} must be an int in 2..100")
        edges = [np.asarray(e, dtype=np.float64).reshape(-1) for e in edges]
        if len(edges) != len(FEATURE_TOKENS):
            raise ValueError(f"edges has {len(edges)} features, expected {len(FEATURE_TOKENS)} ({list(FEATURE_TOKENS)})")
        for name, e in zip(FEATURE_TOKENS, edges):
            if len(e) > n_buckets - 1 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
                raise ValueError(f"edges of {name} must be at most {n_buckets - 1} increasing finite numbers, got {e.tolist()}")
        self.n_buckets = n_buckets
        self.edges = edges
        self._edge_lists = [e.tolist() for e in edges]  # for `buckets_one`
        width = max(1, max(len(e) for e in edges))
        self._padded = np.full((len(edges), width), np.inf)
        for f, e in enumerate(edges):
            self._padded[f, : len(e)] = e

    @classmethod
    def fit(cls, observations: Mapping[str, np.ndarray], n_buckets: int = DEFAULT_BUCKETS) -> FeatureBuckets:
        features = observation_features(as_batch(observations))[:, N_FAMILIES:].astype(np.float64)
        levels = np.linspace(0.0, 1.0, n_buckets + 1)[1:-1]
        edges = []
        for column in features.T:
            # observed values as edges ("lower"): a value below every edge (e.g. a budget fraction smaller than
            # any seen in training) falls in bucket 0
            edges.append(np.unique(np.quantile(column, levels, method="lower")))
        return cls(edges, n_buckets)

    def buckets(self, features: np.ndarray) -> np.ndarray:
        """int64 [B, 12] bucket indices of `observation_features` columns 9.. ([B, 12])."""
        x = np.asarray(features, dtype=np.float64)
        x = x + _EDGE_TOLERANCE * np.maximum(1.0, np.abs(x))
        return (x[:, :, None] >= self._padded[None]).sum(axis=2)

    def buckets_one(self, features: Sequence[float]) -> list[int]:
        """`buckets` of one row of finite values (12 Python floats), in plain Python: the same float64
        arithmetic and comparisons, each feature's bucket a bisection of its edges. A NumPy call costs about
        a microsecond, and on one row the array path is nothing but such calls."""
        # max(1, |x|) spelled as comparisons: the builtins' calls would double this function's time
        return [bisect_right(edges, x + _EDGE_TOLERANCE * (x if x > 1.0 else (-x if x < -1.0 else 1.0)))
                for x, edges in zip(features, self._edge_lists)]

    def to_json(self) -> dict:
        return {"n_buckets": self.n_buckets, "edges": [e.tolist() for e in self.edges]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureBuckets:
        return cls(data["edges"], data["n_buckets"])


def _family_range_error(bad: list[int]) -> ValueError:
    return ValueError(f"family index {bad} out of range: must be in 0..{N_FAMILIES - 1} ({list(FAMILY_NAMES)})")


_NON_FINITE = "observation has non-finite values (NaN or inf); a FlexVLM observation is finite"


def prompt_ids(observations: Mapping[str, np.ndarray], buckets: FeatureBuckets, vocabulary: Vocabulary) -> np.ndarray:
    """int64 [B, PROMPT_LENGTH]: the token ids the tokenizer gives each rendered observation (<bos> included)."""
    family = np.asarray(observations["family"], dtype=np.int64).reshape(-1)
    if np.any((family < 0) | (family >= N_FAMILIES)):
        raise _family_range_error(sorted(set(family[(family < 0) | (family >= N_FAMILIES)].tolist())))
    features = observation_features(observations)
    if not np.all(np.isfinite(features)):
        raise ValueError(_NON_FINITE)
    b = buckets.buckets(features[:, N_FAMILIES:])
    ids = np.empty((len(family), PROMPT_LENGTH), dtype=np.int64)
    ids[:, 0] = vocabulary.bos_id
    ids[:, 1] = vocabulary.family_ids[family]
    ids[:, 2:-1] = vocabulary.feature_ids[_FEATURE_COLUMNS[None], b]
    ids[:, -1] = vocabulary.answer_id
    return ids


def prompt_ids_one(observation: Mapping[str, Any], buckets: FeatureBuckets, vocabulary: Vocabulary) -> np.ndarray:
    """`prompt_ids` of one env observation ([1, PROMPT_LENGTH]), without building a batch of it: the same ids
    (the same float32 features, bucketed alike) from five NumPy calls (M3's batch-1 decision)."""
    family = int(observation["family"])
    if not 0 <= family < N_FAMILIES:
        raise _family_range_error([family])
    features = scaled_vector_one(observation).tolist()
    # float32 values summed as Python floats cannot overflow: the sum is finite exactly when every value is
    if not math.isfinite(sum(features)):
        raise ValueError(_NON_FINITE)
    feature_ids = vocabulary.feature_id_lists
    row = [vocabulary.bos_id, vocabulary.family_id_list[family]]
    row += [feature_ids[f][b] for f, b in enumerate(buckets.buckets_one(features))]
    row.append(vocabulary.answer_id)
    return np.array([row], dtype=np.int64)


def render_observations(observations: Mapping[str, np.ndarray], buckets: FeatureBuckets,
                        vocabulary: Vocabulary | None = None) -> list[str]:
    """The prompt text of each observation of a batch (see `render_observation`)."""
    vocabulary = vocabulary or Vocabulary(n_buckets=buckets.n_buckets)
    ids = prompt_ids(as_batch(observations), buckets, vocabulary)
    return [" ".join(vocabulary.tokens[i] for i in row[1:]) for row in ids]


def render_observation(observation: Mapping[str, Any], buckets: FeatureBuckets, vocabulary: Vocabulary | None = None) -> str:
    """Text of one observation: ``family=NAME budget_fraction=B budget_ms=B prompt_chars=B ... image_edges=B config:``
    where each B is the bucket (`buckets`) of the log-scaled feature (`agents.features.observation_features`)."""
    if np.ndim(observation["family"]) != 0:
        raise ValueError("render_observation takes one observation; use render_observations for a batch")
    return render_observations(observation, buckets, vocabulary)[0]


def render_config(index: int, grid: KnobGrid | None = None) -> str:
    """The answer text for config `index`: ``crops=C top_k=K active_blocks=A`` (no <eos>)."""
    grid = grid or KnobGrid()
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(grid):
        raise ValueError(f"config index={index!r} must be an int in 0..{len(grid) - 1}")
    config = grid.configs()[int(index)]
    return f"crops={config.crops} top_k={config.top_k} active_blocks={config.active_blocks}"


def parse_config(output: str | Sequence[int] | np.ndarray | torch.Tensor, vocabulary: Vocabulary | None = None) -> int | None:
    """The config index an answer names, or None if it is invalid.

    Valid: exactly the three knob tokens in order (crops, top_k, active_blocks), with values of the grid, then
    optionally `<eos>` (and, for token ids, padding after it). Text is split on whitespace (a decoded `<eos>` may
    be glued to the last token). Anything else (a missing, extra, repeated or out-of-order token, a value not on
    the grid, free text) is None."""
    vocabulary = vocabulary or _default_vocabulary()
    if isinstance(output, str):
        text = output.replace(EOS, f" {EOS} ").split()
        if len(text) == 4 and text[3] == EOS:
            text = text[:3]
        if len(text) != 3:
            return None
        ids = [vocabulary.token_to_id.get(t, -1) for t in text]
    else:
        ids = [int(i) for i in (output.tolist() if hasattr(output, "tolist") else output)]
        if len(ids) > 3:
            tail = ids[3:]
            if tail[0] != vocabulary.eos_id or any(t not in (vocabulary.eos_id, vocabulary.pad_id) for t in tail):
                return None
            ids = ids[:3]
        if len(ids) != 3:
            return None
    index = int(vocabulary.config_index(np.array(ids))[0])
    return None if index < 0 else index


_DEFAULT_VOCABULARY: Vocabulary | None = None


def _default_vocabulary() -> Vocabulary:
    global _DEFAULT_VOCABULARY
    if _DEFAULT_VOCABULARY is None:
        _DEFAULT_VOCABULARY = Vocabulary()
    return _DEFAULT_VOCABULARY


# ------------------------------------------------------------------------------------------------
# model


def make_model(vocabulary: Vocabulary, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               intermediate_size: int = 128):
    """A randomly initialised `LlamaForCausalLM` over `vocabulary` (seeded; untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                        ("intermediate_size", intermediate_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads} with an even head size")
    config = LlamaConfig(
        vocab_size=len(vocabulary), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=PROMPT_LENGTH + COMPLETION_LENGTH + 4, tie_word_embeddings=False,
        bos_token_id=vocabulary.bos_id, eos_token_id=vocabulary.eos_id, pad_token_id=vocabulary.pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def model_from_json(config: Mapping[str, Any]):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig.from_dict(dict(config))).float()


def model_to_json(model) -> dict:
    return json.loads(model.config.to_json_string(use_diff=True))


def _check_supported(config) -> None:
    problems = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"model_type={getattr(config, 'model_type', None)!r} (need 'llama')")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r}")
    if config.attention_bias or config.mlp_bias:
        problems.append("attention/mlp bias")
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r}")
    if config.num_key_value_heads != config.num_attention_heads:
        problems.append("grouped-query attention")
    if problems:
        raise ValueError(f"NumpyDecoder supports plain Llama configs only; this one has {', '.join(problems)}")


class NumpyDecoder:
    """The Llama forward pass of a `transformers` `LlamaForCausalLM`, in NumPy, with a KV cache (float32).

    Used for decisions: for a model this small the cost is per operation, and NumPy's per-op overhead is a
    fraction of PyTorch's and `transformers`'. The weights are NumPy views of the model's parameters, so a decoder
    over a model being trained always sees the current weights (in-place optimizer updates included, which do not
    always bump a tensor's version counter: fused AdamW does not)."""

    def __init__(self, model):
        _check_supported(model.config)
        self.model = model
        config = model.config
        self.n_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.hidden = config.hidden_size
        self.intermediate = config.intermediate_size
        self.eps = float(config.rms_norm_eps)
        rope = getattr(config, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        # as transformers computes it: inv_freq in float32 from int64 exponents, then float32 angles
        inv = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, inv)
        angles = torch.cat([angles, angles], dim=-1)
        self._cos, self._sin = angles.cos().numpy(), angles.sin().numpy()
        self._params = list(model.parameters())
        self._key = None
        self._weights = None

    def _current(self):
        """NumPy views of the model's weights (shared memory: an optimizer's in-place update is seen at once;
        the views are rebuilt when a parameter moves to new memory). Weights that are not CPU float32 are
        copied, on every call."""
        key = tuple(p.data_ptr() for p in self._params)
        live = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in self._params)
        if key != self._key or not live:
            sd = {k: v.detach().float().cpu().numpy() for k, v in self.model.state_dict().items()}
            layers = []
            for i in range(self.model.config.num_hidden_layers):
                p = f"model.layers.{i}."
                layers.append(tuple(sd[p + name] if name.endswith("layernorm.weight") else sd[p + name].T for name in (
                    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                    "mlp.up_proj.weight", "mlp.down_proj.weight")))
            self._weights = (sd["model.embed_tokens.weight"], layers, sd["model.norm.weight"], sd["lm_head.weight"].T)
            self._key = key if live else None
        return self._weights

    def _rms(self, x, w):
        return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps))

    def forward(self, tokens: np.ndarray, cache: list, start: int) -> np.ndarray:
        """Logits [B, V] at the last of `tokens` [B, T] (positions start.., after the `cache`d ones)."""
        embed, layers, norm, head = self._current()
        B, T = tokens.shape
        nh, hd, half = self.n_heads, self.head_dim, self.head_dim // 2
        cos, sin = self._cos[start:start + T], self._sin[start:start + T]
        h = embed[tokens]
        for i, (n1, q_w, k_w, v_w, o_w, n2, gate_w, up_w, down_w) in enumerate(layers):
            x = self._rms(h, n1)
            q = (x @ q_w).reshape(B, T, nh, hd).transpose(0, 2, 1, 3)
            k = (x @ k_w).reshape(B, T, nh, hd).transpose(0, 2, 1, 3)
            v = (x @ v_w).reshape(B, T, nh, hd).transpose(0, 2, 1, 3)
            q = q * cos + np.concatenate([-q[..., half:], q[..., :half]], -1) * sin
            k = k * cos + np.concatenate([-k[..., half:], k[..., :half]], -1) * sin
            if len(cache) > i:
                k = np.concatenate([cache[i][0], k], 2)
                v = np.concatenate([cache[i][1], v], 2)
                cache[i] = (k, v)
            else:
                cache.append((k, v))
            scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(hd ** -0.5)
            if T > 1:
                S = k.shape[2]
                scores = np.where(np.triu(np.ones((T, S), dtype=bool), S - T + 1), -np.inf, scores)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            h = h + ((scores @ v).transpose(0, 2, 1, 3).reshape(B, T, self.hidden) @ o_w)
            x = self._rms(h, n2)
            gate = x @ gate_w
            h = h + ((gate / (1.0 + np.exp(-gate)) * (x @ up_w)) @ down_w)
        return self._rms(h[:, -1], norm) @ head

    def decode(self, prompt: np.ndarray, choose, n_tokens: int) -> np.ndarray:
        """Token ids [B, n_tokens] after `prompt` [B, T]; `choose(step, logits [B, V]) -> ids [B]` picks each."""
        cache: list = []
        tokens = np.asarray(prompt, dtype=np.int64)
        position = tokens.shape[1]
        out = np.empty((tokens.shape[0], n_tokens), dtype=np.int64)
        logits = self.forward(tokens, cache, 0)
        for step in range(n_tokens):
            out[:, step] = choose(step, logits)
            if step + 1 < n_tokens:
                logits = self.forward(out[:, step : step + 1], cache, position)
                position += 1
        return out


# ------------------------------------------------------------------------------------------------
# the controller


FALLBACK_INDEX = 0  # an invalid unconstrained answer falls back to the cheapest configuration


class LMController(Controller):
    """A causal LM that writes the configuration (see the module docstring); kind "dpo" or "grpo"."""

    kind = "grpo"
    KINDS = ("dpo", "grpo")

    def __init__(self, model, buckets: FeatureBuckets, grid: KnobGrid | None = None, kind: str = "grpo",
                 constrained: bool = True, tokenizer=None):
        super().__init__(grid)
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r} is not an LM controller kind; allowed: {list(self.KINDS)}")
        self.kind = kind
        self.vocabulary = Vocabulary(self.grid, buckets.n_buckets)
        if model.config.vocab_size != len(self.vocabulary):
            raise ValueError(f"model vocab_size={model.config.vocab_size} does not match the vocabulary ({len(self.vocabulary)} tokens)")
        self.model = model
        self.buckets = buckets
        self.constrained = bool(constrained)
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(self.vocabulary)
        self.decoder = NumpyDecoder(model)
        self.gpu_decoder = None  # set by use_device

    def use_device(self, device: str) -> LMController:
        """Where greedy constrained decisions (`select_config`, `generate` at temperature 0) run: "cpu"
        (NumpyDecoder, the default; always sees the current weights) or a CUDA device (`lm_gpu.GPUDecoder`,
        one kernel per decision; it copies the weights now, so call this again after they change).
        Sampling and unconstrained decoding stay on the CPU."""
        name = str(device)
        if name != "cpu" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
            raise ValueError(f"device={device!r} is not a decision device; allowed: 'cpu', 'cuda', 'cuda:N'")
        if name == "cpu":
            self.gpu_decoder = None
        else:
            from .lm_gpu import GPUDecoder

            self.gpu_decoder = GPUDecoder(self.model, self.vocabulary.knob_ids, PROMPT_LENGTH, device)
        return self

    @classmethod
    def create(cls, observations: Mapping[str, np.ndarray], grid: KnobGrid | None = None, kind: str = "grpo",
               seed: int = 0, n_buckets: int = DEFAULT_BUCKETS, **model_kwargs) -> LMController:
        """A randomly initialised controller whose buckets are fitted on `observations` (training requests)."""
        buckets = FeatureBuckets.fit(observations, n_buckets)
        vocabulary = Vocabulary(grid, n_buckets)
        return cls(make_model(vocabulary, seed, **model_kwargs), buckets, grid, kind)

    # -- text ------------------------------------------------------------------------------------

    def render(self, observations: Mapping[str, Any]) -> list[str]:
        return render_observations(observations, self.buckets, self.vocabulary)

    def prompt_ids(self, observations: Mapping[str, Any]) -> np.ndarray:
        return prompt_ids(as_batch(observations), self.buckets, self.vocabulary)

    def parse(self, output) -> int | None:
        return parse_config(output, self.vocabulary)

    # -- decisions -------------------------------------------------------------------------------

    def generate(self, observations: Mapping[str, Any], constrained: bool | None = None, temperature: float = 0.0,
                 rng: np.random.Generator | None = None) -> np.ndarray:
        """Answer token ids [B, 3] (constrained: the knob tokens) or [B, 4] (unconstrained: up to <eos>),
        greedy (`temperature=0`) or sampled with `rng`."""
        constrained = self.constrained if constrained is None else constrained
        prompt = prompt_ids(as_batch(observations), self.buckets, self.vocabulary)
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0")
        if temperature > 0 and rng is None:
            raise ValueError("sampling (temperature > 0) needs an rng")

        if constrained and temperature == 0 and self.gpu_decoder is not None:
            return self.gpu_decoder.decide(prompt)

        def choose(step, logits):
            if constrained:
                ids = self.vocabulary.knob_ids[step]
                logits = logits[:, ids]
            if temperature == 0:
                pick = np.argmax(logits, axis=1)
            else:  # Gumbel-max sampling
                pick = np.argmax(logits / temperature - np.log(-np.log(rng.random(logits.shape))), axis=1)
            return self.vocabulary.knob_ids[step][pick] if constrained else pick

        return self.decoder.decode(prompt, choose, 3 if constrained else COMPLETION_LENGTH)

    def answers_to_indices(self, answers: np.ndarray) -> np.ndarray:
        """Config indices of answer token rows ([B, 3] or [B, 4]), -1 where invalid (see `parse_config`)."""
        answers = np.asarray(answers, dtype=np.int64)
        index = self.vocabulary.config_index(answers[:, :3])
        if answers.shape[1] > 3:
            index = np.where(answers[:, 3] == self.vocabulary.eos_id, index, -1)
        return index

    def select_index(self, observation: Mapping[str, Any]) -> int:
        # One env observation decided on the GPU (M3's batch-1 decision): the prompt ids without a batch,
        # the kernel, and the index from the knob tokens it chose (always knob tokens, in order: the kernel
        # picks each from its step's list). Everything else takes the batch path.
        if self.gpu_decoder is None or not self.constrained or not is_single_observation(observation):
            return super().select_index(observation)
        answer = self.gpu_decoder.decide(prompt_ids_one(observation, self.buckets, self.vocabulary))[0]
        return self.vocabulary.knob_config_index(answer)

    def select_indices(self, observations):
        answers = self.generate(observations)
        index = self.answers_to_indices(answers)
        return np.where(index >= 0, index, FALLBACK_INDEX).astype(np.int64)

    def invalid_output_rate(self, observations: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> float:
        """Fraction of observations whose unconstrained greedy answer does not parse (`parse_config` is None)."""
        if not isinstance(observations, Mapping):
            observations = stack_observations(list(observations))
        index = self.answers_to_indices(self.generate(observations, constrained=False))
        return float(np.mean(index < 0))

    # -- serialization ---------------------------------------------------------------------------

    def state(self):
        config = {
            "lm_kind": self.kind,
            "constrained": self.constrained,
            "buckets": self.buckets.to_json(),
            "model_config": model_to_json(self.model),
            "tokenizer": json.loads(self.tokenizer.backend_tokenizer.to_str()),
        }
        tensors = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return config, tensors

    @classmethod
    def from_state(cls, config, tensors, grid):
        from tokenizers import Tokenizer

        model = model_from_json(config["model_config"])
        missing, unexpected = model.load_state_dict(dict(tensors), strict=False)
        if missing or unexpected:
            raise ValueError(f"saved LM weights do not match its config: missing {missing}, unexpected {unexpected}")
        model.eval()
        tokenizer = tokenizer_from_object(Tokenizer.from_str(json.dumps(config["tokenizer"])))
        buckets = FeatureBuckets.from_json(config["buckets"])
        controller = cls(model, buckets, grid, config["lm_kind"], config["constrained"], tokenizer)
        if tokenizer.get_vocab() != controller.vocabulary.token_to_id:
            raise ValueError("saved tokenizer vocabulary does not match the grid's vocabulary")
        return controller


# ------------------------------------------------------------------------------------------------
# helpers the trainers share


def pool_observations(env, budget_fractions: Sequence[float]) -> tuple[dict[str, np.ndarray], list[str], list[float]]:
    """Every (request, budget fraction) of `env`'s request pool, observed through `env.reset` with both pinned:
    (the stacked observations, request ids, fractions), fraction-major."""
    ids = list(env.unwrapped.request_ids)
    observations, request_ids, fractions = [], [], []
    for fraction in budget_fractions:
        for request_id in ids:
            observation, _ = env.reset(options={"request_id": request_id, "budget_fraction": float(fraction)})
            observations.append(observation)
            request_ids.append(request_id)
            fractions.append(float(fraction))
    return stack_observations(observations), request_ids, fractions


def quiet_libraries() -> None:
    """Silence the per-call progress bars of `datasets` (TRL tokenizes each dataset it is given) and of
    `huggingface_hub` (checkpoint writes), and a deprecation warning TRL triggers in `transformers`: a
    trainer's output is its own progress bar and the comparison table."""
    import warnings

    import datasets
    import huggingface_hub

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def format_warm_start(controller: LMController, observations: Mapping[str, np.ndarray], steps: int,
                      batch_size: int = 64, learning_rate: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Teach a fresh model the answer format, and nothing else: next-token cross-entropy on answers that are
    uniformly random configurations, independent of the prompt (so the model ends near a uniform policy over
    valid configurations; no env step, no quality or latency is seen). Returns the final loss and the
    unconstrained invalid-output rate before and after."""
    if steps < 0:
        raise ValueError(f"steps={steps!r} must be >= 0")
    prompts = prompt_ids(as_batch(observations), controller.buckets, controller.vocabulary)
    sample = prompts[: min(len(prompts), 512)]
    before = float(np.mean(controller.answers_to_indices(controller.decoder.decode(sample, lambda s, lg: lg.argmax(1), 4)) < 0))
    if steps == 0:
        return {"format_loss": float("nan"), "invalid_before": before, "invalid_after": before}
    rng = np.random.default_rng(seed)
    model = controller.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    knob_ids = [torch.from_numpy(ids) for ids in controller.vocabulary.knob_ids]
    eos = controller.vocabulary.eos_id
    loss_value = float("nan")
    for _ in range(steps):
        rows = torch.from_numpy(prompts[rng.integers(0, len(prompts), batch_size)])
        choice = [torch.from_numpy(rng.integers(0, len(ids), batch_size)) for ids in knob_ids]
        answer = torch.stack([ids[c] for ids, c in zip(knob_ids, choice)] + [torch.full((batch_size,), eos)], dim=1)
        input_ids = torch.cat([rows, answer], dim=1)
        labels = input_ids.clone()
        labels[:, : rows.shape[1]] = -100
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
    model.eval()
    after = float(np.mean(controller.answers_to_indices(controller.decoder.decode(sample, lambda s, lg: lg.argmax(1), 4)) < 0))
    return {"format_loss": loss_value, "invalid_before": before, "invalid_after": after}


__all__ = [
    "ANSWER_TOKEN",
    "FEATURE_TOKENS",
    "FeatureBuckets",
    "LMController",
    "NumpyDecoder",
    "Vocabulary",
    "build_tokenizer",
    "format_warm_start",
    "make_model",
    "parse_config",
    "pool_observations",
    "prompt_ids",
    "quiet_libraries",
    "render_config",
    "render_observation",
    "render_observations",
]
