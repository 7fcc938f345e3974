"""The LM controller's greedy constrained decision as one Triton kernel, for controllers served on a GPU.

`NumpyDecoder` (agents/lm.py) makes a batch-1 decision in about 0.4 ms on a CPU core: the model is
tiny (hidden 64, 2 layers), so the time is NumPy's per-operation overhead over the ~150 operations of
three forward passes. Against a request of ~14 ms that is 3%, and on a slower host CPU more (M3's
bar is 1%). `GPUDecoder` does the whole decision in one kernel, one program per observation, with
every activation in registers.

The decision is three dependent greedy steps (crops, then top_k given crops, then active_blocks given
both), but the knob grid is small, so the kernel runs them as ONE forward pass over a token tree
instead of three passes: the prompt (15 tokens), one row per crops value (position P, attending to
the prompt and itself) and one row per (crops, top_k) pair (position P + 1, attending to the prompt,
its crops row and itself); 15 + 7 + 28 = 50 rows fit a 64-row tile. A row sees exactly the tokens it
would see in sequential decoding, so its logits are the same; the kernel then reads the crops logits
at the prompt's last row, the top_k logits at the chosen crops row and the active_blocks logits at the
chosen pair's row. One program's time is the latency of its dependent chain of small products, so
one pass instead of three pays even with twice the rows: on an H200, with IEEE products, a graph replay
(kernel and copies) takes 0.172 ms against 0.287 ms for three sequential passes over a 32-row tile (8
warps each; 0.377 ms at 4 warps, session 15's kernel).

Layer 0 needs no projections: its queries and keys (after RoPE) and its values through the output
projection depend on a row's token and position alone, so `PackedLM` tabulates them per (token, position)
and the kernel reads them. The MLPs go over their intermediate columns in chunks of `MLP_CHUNK`. Timed
inside the kernel (clock stamps, H200), the rest is about 4 us a layer-0 head, 7.5 us a layer-1 head
(12 the first, with the norm), 17-18 us an MLP and 4 us for the three picks.

For batch 1 the host work is one CUDA-graph replay: the prompt ids are written into pinned host
memory, the kernel reads them from there and writes the three chosen token ids back into pinned memory
(mapped into the device's address space; where Triton refuses such pointers the graph holds a copy in
and a copy out instead); the host polls them there as they land (up to `spin_s`, then it waits on the
stream) and reads them.

Arithmetic is float32. On cards with TF32 tensor cores (compute capability 8.0 and up) each product is
"tf32x3": three TF32 tensor-core products of the operands' high and low parts, which keeps the error
within a few float32 roundings (about 2^-21 relative, against 2^-24) and, on an H200, takes the graph
replay from 0.172 to 0.107 ms (session 16's kernel; with the layer-0 tables and chunked MLPs the
kernel's GPU time is 0.086-0.088 ms against 0.098, and a GRPO decision 0.120 ms against 0.133 in the
same run; with session 18's host path, 0.101 ms against 0.118 for the previous one). Older cards (and the
interpreter) use IEEE float32 products. Either way logits agree with `NumpyDecoder` to float32-level rounding
and decisions are equal but for near-ties (tested on the GPU against NumPy on trained and random models of
several shapes and grids).

RoPE needs rotate_half(q); it is computed as x @ Wr with Wr the projection's columns permuted and
negated per head (the same products, no column shuffles in the kernel). The weights are copied to the
device when the decoder is built: after the model's weights change (training), build a new one.
"""
from __future__ import annotations

import time

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decisions use NumpyDecoder
    triton = None

N_STEPS = 3  # knob tokens: crops, top_k, active_blocks
MAX_TREE_ROWS = 128  # prompt + tree rows the kernel's tile may hold (registers: [rows, hidden] float32 per program)
# Warps per program by product precision, measured on an H200 with the default grid's 64-row tile (graph
# replay: kernel and copies). IEEE: 8 warps 0.172 ms, 16 warps 0.164-0.172 ms, 4 warps 2.49 ms and 2 warps
# 4.86 ms (too few registers for the tiles). TF32x3: 4 warps 0.107 ms; at 8 warps Triton 3.6's kernel made
# an illegal memory access, so the warps follow the precision and are not a parameter.
NUM_WARPS = {"ieee": 8, "tf32x3": 4}
# The MLP runs over its intermediate columns in chunks of this many (smaller live tiles: the kernel is at
# the 255-register limit and spills). Session 17, H200, TF32x3, GPU time of back-to-back graph replays of
# the default model: chunks of 32 0.087 ms; 64 0.092; 128 (whole) 0.092; 16 0.094 (without the mask and
# RoPE-table changes: 32 0.089, whole 0.091).
MLP_CHUNK = 32
# How long a batch-1 decision polls its answer in pinned memory before it waits on the stream instead (a
# decision takes about 0.1 ms on an H200; queued work ahead of it, or an error, is left to the stream).
DEFAULT_SPIN_S = 1e-3


def default_precision(device: str | torch.device) -> str:
    """"tf32x3" on a CUDA device of compute capability >= 8.0 (TF32 tensor cores), else "ieee"."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


if triton is not None:

    @triton.jit
    def _rms(x, w, eps, D: tl.constexpr):
        return w[None, :] * (x / tl.sqrt(tl.sum(x * x, 1) / D + eps)[:, None])

    @triton.jit
    def _pick(h, row, norm_w, head_ptr, step, nval_ptr, knob_ptr, rows, cd, cv, eps,
              D: tl.constexpr, NVP: tl.constexpr):
        """(index among the step's values, token id) of the greedy constrained choice at tile row `row`."""
        x = tl.sum(tl.where((rows == row)[:, None], h, 0.0), 0)  # [D]
        x = norm_w * (x / tl.sqrt(tl.sum(x * x, 0) / D + eps))
        head_w = tl.load(head_ptr + step * D * NVP + cd[:, None] * NVP + cv[None, :])  # [D, NVP]
        logits = tl.sum(x[:, None] * head_w, 0)
        logits = tl.where(cv < tl.load(nval_ptr + step), logits, float("-inf"))
        pick = tl.argmax(logits, 0)  # the first of equal maxima, as np.argmax
        return pick, tl.load(knob_ptr + step * NVP + pick)

    @triton.jit
    def _mlp(h, layer, n2_ptr, wg_ptr, wu_ptr, wd_ptr, eps, cd, D: tl.constexpr, I: tl.constexpr, IC: tl.constexpr,
             PRECISION: tl.constexpr):
        x = _rms(h, tl.load(n2_ptr + layer * D + cd), eps, D)
        ci = tl.arange(0, IC)
        out = tl.zeros_like(h)
        for j in range(0, I, IC):
            w_off = layer * D * I + cd[:, None] * I + (j + ci)[None, :]  # [D, IC]
            gate = tl.dot(x, tl.load(wg_ptr + w_off), input_precision=PRECISION)
            up = tl.dot(x, tl.load(wu_ptr + w_off), input_precision=PRECISION)
            act = gate / (1.0 + tl.exp(-gate)) * up
            wd = tl.load(wd_ptr + layer * I * D + (j + ci)[:, None] * D + cd[None, :])  # [IC, D]
            out += tl.dot(act, wd, input_precision=PRECISION)
        return h + out

    @triton.jit
    def _attention_weights(q, k, rows, parent, scale, P: tl.constexpr, PRECISION: tl.constexpr):
        """Softmax of q k^T over what each tree row attends to: the prompt up to itself, itself and (pair rows)
        their crops row. The mask is rebuilt from two row vectors at each use rather than kept in registers
        through the kernel (with 4 warps a [64, 64] tile is 32 registers a thread, and the kernel spills)."""
        keys = rows[None, :]
        visible = ((keys < P) & (keys <= rows[:, None])) | (keys == rows[:, None]) | (keys == parent[:, None])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BT, BT]
        s = tl.where(visible, s, float("-inf"))
        p = tl.exp(s - tl.max(s, 1)[:, None])
        return p / tl.sum(p, 1)[:, None]

    @triton.jit
    def _lm_decide_kernel(
        ids_ptr, out_ptr, emb_ptr, q0_ptr, k0_ptr, vo0_ptr,
        wq_ptr, wqr_ptr, wk_ptr, wkr_ptr, wv_ptr, wo_ptr,
        n1_ptr, n2_ptr, wg_ptr, wu_ptr, wd_ptr, norm_ptr,
        head_ptr, knob_ptr, nval_ptr, cos_ptr, sin_ptr,
        eps, scale,
        P: tl.constexpr, L: tl.constexpr, D: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr,
        I: tl.constexpr, BT: tl.constexpr, NVP: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr,
        NPOS: tl.constexpr, IC: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        rows = tl.arange(0, BT)
        cd = tl.arange(0, D)
        ch = tl.arange(0, HD)
        cv = tl.arange(0, NVP)

        # the token tree: prompt rows, then one row per crops value c, then one per (c, top_k value k)
        is_prompt = rows < P
        is_crops = (rows >= P) & (rows < P + N0)
        pair = rows - (P + N0)
        is_pair = (pair >= 0) & (pair < N0 * N1)
        parent = tl.where(is_pair, P + pair // N1, -1)  # a pair row's crops row
        position = tl.where(is_prompt, rows, tl.where(is_crops, P, P + 1))
        tok = tl.load(ids_ptr + b * P + rows, mask=is_prompt, other=0)
        tok = tl.where(is_crops, tl.load(knob_ptr + (rows - P), mask=is_crops, other=0), tok)
        tok = tl.where(is_pair, tl.load(knob_ptr + NVP + pair % N1, mask=is_pair, other=0), tok)
        h = tl.load(emb_ptr + tok[:, None] * D + cd[None, :])  # padding rows embed token 0: finite, never read

        # Layer 0: a row's queries, keys and values depend on its token and position alone (the embedding
        # and the first norm are per token), so they are read from tables PackedLM computed, the values
        # already through the output projection (head by head: p @ (x Wv_h) Wo_h = p @ (x Wv_h Wo_h)).
        # That takes 5 NH + NH products out of this program's dependent chain (GPU time 0.098 -> 0.092 ms
        # on an H200; the MLPs, at ~18 us each of ~90, are the largest part left).
        qk_off = (tok * NPOS + position)[:, None] * D
        attn = tl.zeros([BT, D], dtype=tl.float32)
        for head in range(NH):
            q = tl.load(q0_ptr + qk_off + (head * HD + ch)[None, :])  # [BT, HD], RoPE applied
            k = tl.load(k0_ptr + qk_off + (head * HD + ch)[None, :])
            p = _attention_weights(q, k, rows, parent, scale, P, PRECISION)
            vo = tl.load(vo0_ptr + tok[:, None] * (NH * D) + head * D + cd[None, :])  # [BT, D]
            attn += tl.dot(p, vo, input_precision=PRECISION)
        h = _mlp(h + attn, 0, n2_ptr, wg_ptr, wu_ptr, wd_ptr, eps, cd, D, I, IC, PRECISION)

        # plain (not unrolled) loops: unrolled, layers x heads made a kernel that took minutes to compile
        for layer in range(1, L):
            x = _rms(h, tl.load(n1_ptr + layer * D + cd), eps, D)
            cos = tl.load(cos_ptr + position[:, None] * HD + ch[None, :])  # [BT, HD]; loaded here, not kept live
            sin = tl.load(sin_ptr + position[:, None] * HD + ch[None, :])
            attn = tl.zeros([BT, D], dtype=tl.float32)
            for head in range(NH):
                w_off = layer * D * D + cd[:, None] * D + (head * HD + ch)[None, :]  # [D, HD] of [in, out]
                q = tl.dot(x, tl.load(wq_ptr + w_off), input_precision=PRECISION)
                q = q * cos + tl.dot(x, tl.load(wqr_ptr + w_off), input_precision=PRECISION) * sin
                k = tl.dot(x, tl.load(wk_ptr + w_off), input_precision=PRECISION)
                k = k * cos + tl.dot(x, tl.load(wkr_ptr + w_off), input_precision=PRECISION) * sin
                p = _attention_weights(q, k, rows, parent, scale, P, PRECISION)
                v = tl.dot(x, tl.load(wv_ptr + w_off), input_precision=PRECISION)
                o = tl.dot(p, v, input_precision=PRECISION)  # [BT, HD]
                wo = tl.load(wo_ptr + layer * D * D + (head * HD + ch)[:, None] * D + cd[None, :])  # [HD, D]
                attn += tl.dot(o, wo, input_precision=PRECISION)
            h = _mlp(h + attn, layer, n2_ptr, wg_ptr, wu_ptr, wd_ptr, eps, cd, D, I, IC, PRECISION)

        norm_w = tl.load(norm_ptr + cd)
        c, crops_tok = _pick(h, P - 1, norm_w, head_ptr, 0, nval_ptr, knob_ptr, rows, cd, cv, eps, D, NVP)
        k, top_k_tok = _pick(h, P + c, norm_w, head_ptr, 1, nval_ptr, knob_ptr, rows, cd, cv, eps, D, NVP)
        _, blocks_tok = _pick(h, P + N0 + c * N1 + k, norm_w, head_ptr, 2, nval_ptr, knob_ptr, rows, cd, cv, eps,
                              D, NVP)
        tl.store(out_ptr + b * 3, crops_tok)
        tl.store(out_ptr + b * 3 + 1, top_k_tok)
        tl.store(out_ptr + b * 3 + 2, blocks_tok)


class PackedLM:
    """A `LlamaForCausalLM`'s weights laid out for `_lm_decide_kernel` (float32, [in, out] matrices stacked
    over layers, RoPE's rotated q/k projections, the LM head's columns of each step's knob tokens), on
    `device`. Raises ValueError for a model shape the kernel does not cover."""

    def __init__(self, model, knob_ids, prompt_length: int, device: str | torch.device, precision: str | None = None):
        from .lm import NumpyDecoder, _check_supported

        precision = default_precision(device) if precision is None else precision
        if precision not in NUM_WARPS:
            raise ValueError(f"precision={precision!r} is not a product precision of the kernel; allowed: {list(NUM_WARPS)}")
        self.precision, self.num_warps = precision, NUM_WARPS[precision]

        config = model.config
        _check_supported(config)
        D, NH, I, L = config.hidden_size, config.num_attention_heads, config.intermediate_size, config.num_hidden_layers
        HD = getattr(config, "head_dim", None) or D // NH
        if HD * NH != D or not all(_is_power_of_two(n) for n in (D, HD, I)) or HD < 16:
            raise ValueError(f"the decision kernel needs hidden_size, head size and intermediate_size powers of two, "
                             f"head size >= 16 and heads x head size = hidden_size; this model has hidden_size={D}, "
                             f"heads={NH}, head size={HD}, intermediate_size={I}")
        self.prompt_length = int(prompt_length)
        if config.max_position_embeddings < self.prompt_length + N_STEPS:
            raise ValueError(f"max_position_embeddings={config.max_position_embeddings} < prompt + answer "
                             f"({self.prompt_length} + {N_STEPS})")
        if len(knob_ids) != N_STEPS:
            raise ValueError(f"knob_ids has {len(knob_ids)} lists, expected {N_STEPS} (crops, top_k, active_blocks)")
        n_values = [len(ids) for ids in knob_ids]
        tree_rows = self.prompt_length + n_values[0] + n_values[0] * n_values[1]
        if tree_rows > MAX_TREE_ROWS:
            raise ValueError(f"the decision tree has {tree_rows} rows (prompt {self.prompt_length} + crops values "
                             f"{n_values[0]} + crops x top_k pairs {n_values[0] * n_values[1]}); the kernel holds at "
                             f"most {MAX_TREE_ROWS}: use NumpyDecoder for a grid this large")
        block_t = max(16, triton.next_power_of_2(tree_rows))
        n_positions = self.prompt_length + N_STEPS - 1  # the tree's positions: the prompt's, then P and P + 1
        self.shape = dict(P=self.prompt_length, L=L, D=D, NH=NH, HD=HD, I=I, BT=block_t, N0=n_values[0], N1=n_values[1],
                          NPOS=n_positions, IC=min(I, MLP_CHUNK))
        self.eps, self.scale = float(config.rms_norm_eps), float(HD) ** -0.5

        sd = {k: v.detach().to(torch.float32).cpu() for k, v in model.state_dict().items()}
        half = HD // 2
        # rotate_half(x @ W) = x @ W[:, perm] * sign, per head: the first half of each head's columns is
        # minus its second half, the second half is its first half
        perm = torch.cat([torch.cat([torch.arange(half, HD), torch.arange(0, half)]) + h * HD for h in range(NH)])
        sign = torch.cat([torch.cat([-torch.ones(half), torch.ones(half)]) for _ in range(NH)])

        def layers(name):  # [L, in, out]
            return torch.stack([sd[f"model.layers.{i}.{name}.weight"].T for i in range(L)])

        wq, wk = layers("self_attn.q_proj"), layers("self_attn.k_proj")
        weights = {
            "emb": sd["model.embed_tokens.weight"],
            "wq": wq, "wqr": wq[:, :, perm] * sign, "wk": wk, "wkr": wk[:, :, perm] * sign,
            "wv": layers("self_attn.v_proj"), "wo": layers("self_attn.o_proj"),
            "n1": torch.stack([sd[f"model.layers.{i}.input_layernorm.weight"] for i in range(L)]),
            "n2": torch.stack([sd[f"model.layers.{i}.post_attention_layernorm.weight"] for i in range(L)]),
            "wg": layers("mlp.gate_proj"), "wu": layers("mlp.up_proj"), "wd": layers("mlp.down_proj"),
            "norm": sd["model.norm.weight"],
        }
        self.nvp = max(2, triton.next_power_of_2(max(n_values)))
        head = torch.zeros(N_STEPS, D, self.nvp)
        knobs = torch.zeros(N_STEPS, self.nvp, dtype=torch.int64)
        lm_head = sd["lm_head.weight"]  # [V, D]
        for step, ids in enumerate(knob_ids):
            ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
            head[step, :, : len(ids)] = lm_head[ids].T
            knobs[step, : len(ids)] = ids
        weights["head"], weights["knob"] = head, knobs
        weights["nval"] = torch.tensor(n_values, dtype=torch.int64)
        # NumpyDecoder's RoPE tables (as transformers computes them), padded to the tile's rows (the tree's
        # positions end at P + 1)
        tables = NumpyDecoder(model)
        cos, sin = torch.zeros(block_t, HD), torch.zeros(block_t, HD)
        n = min(block_t, tables._cos.shape[0])
        cos[:n], sin[:n] = torch.from_numpy(tables._cos[:n]), torch.from_numpy(tables._sin[:n])
        weights["cos"], weights["sin"] = cos, sin
        weights.update(self._layer0_tables(sd, wq, wk, weights["wv"], weights["wo"], perm, sign, tables, n_positions))
        self.weights = {k: v.contiguous().to(device) for k, v in weights.items()}

    def _layer0_tables(self, sd, wq, wk, wv, wo, perm, sign, rope, n_positions):
        """Layer 0's attention inputs for every (token, position): queries and keys after RoPE ([V, NPOS, D])
        and each head's values through the output projection ([V, NH, D]), computed in float64 and stored as
        float32 (what NumPy computes per token, with one rounding instead of several). V x (2 NPOS + NH) x D
        floats: 2.2 MB for the controllers' 222-token vocabulary."""
        V, D = sd["model.embed_tokens.weight"].shape
        NH, HD = self.shape["NH"], self.shape["HD"]
        emb = sd["model.embed_tokens.weight"].double()
        x = sd["model.layers.0.input_layernorm.weight"].double() * (
            emb / torch.sqrt((emb * emb).mean(-1, keepdim=True) + self.eps))  # [V, D]
        cos = torch.from_numpy(rope._cos[:n_positions]).double().repeat(1, NH)[None]  # [1, NPOS, D]
        sin = torch.from_numpy(rope._sin[:n_positions]).double().repeat(1, NH)[None]
        tables = {}
        for name, w in (("q0", wq[0].double()), ("k0", wk[0].double())):
            plain, rotated = (x @ w)[:, None], (x @ (w[:, perm] * sign))[:, None]  # [V, 1, D]
            tables[name] = (plain * cos + rotated * sin).float()
        v = (x @ wv[0].double()).reshape(V, NH, 1, HD)
        tables["vo0"] = (v @ wo[0].double().reshape(NH, HD, D)).reshape(V, NH, D).float()
        return tables

    def launch(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Writes `out` (int64 [B, 3]) from `ids` (int64 [B, P]), both on the weights' device."""
        w = self.weights
        _lm_decide_kernel[(ids.shape[0],)](
            ids, out, w["emb"], w["q0"], w["k0"], w["vo0"], w["wq"], w["wqr"], w["wk"], w["wkr"], w["wv"], w["wo"],
            w["n1"], w["n2"], w["wg"], w["wu"], w["wd"], w["norm"],
            w["head"], w["knob"], w["nval"], w["cos"], w["sin"],
            self.eps, self.scale, NVP=self.nvp, PRECISION=self.precision, num_warps=self.num_warps, **self.shape,
        )


class GPUDecoder:
    """Greedy decisions constrained to the knob tokens, for a `LMController`'s model, on a CUDA device.

    `decide(prompt_ids [B, P]) -> [B, 3]` knob token ids, as `LMController.generate(constrained=True)`
    gives at temperature 0. Batch 1 runs through a CUDA graph (built on the first call) whose kernel reads
    the ids from and writes the answer to pinned host memory (`zero_copy`; False: copy nodes around it,
    as where Triton refuses host pointers); other batch sizes launch the kernel directly. The batch-1
    buffers are the decoder's own: decide from one thread at a time (a decoder per thread otherwise)."""

    def __init__(self, model, knob_ids, prompt_length: int, device: str | torch.device = "cuda",
                 precision: str | None = None, zero_copy: bool | None = None, spin_s: float = DEFAULT_SPIN_S):
        if isinstance(spin_s, bool) or not isinstance(spin_s, (int, float)) or not 0 <= spin_s <= 1:
            raise ValueError(f"spin_s={spin_s!r} must be a number of seconds in [0, 1] (0: always wait on the stream)")
        if triton is None:
            raise RuntimeError("GPUDecoder needs triton (installed with CUDA builds of torch); use NumpyDecoder")
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: GPUDecoder runs on a CUDA device (torch.cuda.is_available() "
                             f"is {torch.cuda.is_available()}); decisions on the CPU use NumpyDecoder")
        if device.index is None:  # "cuda": the current device, fixed now
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.packed = PackedLM(model, knob_ids, prompt_length, device, precision)
        self.prompt_length = self.packed.prompt_length
        self.zero_copy = zero_copy  # batch 1: kernel on pinned host memory (None: where Triton accepts it)
        self.spin_s = float(spin_s)
        self._one_shape = (1, self.prompt_length)
        self._graph = None

    def _check(self, prompt_ids) -> np.ndarray:
        ids = np.asarray(prompt_ids)
        if ids.ndim != 2 or ids.shape[1] != self.prompt_length or ids.shape[0] < 1:
            raise ValueError(f"prompt_ids has shape {ids.shape}; expected [B >= 1, {self.prompt_length}]")
        return ids.astype(np.int64, copy=False)

    def decide(self, prompt_ids) -> np.ndarray:
        """int64 [B, 3]: the chosen crops, top_k and active_blocks token ids for each prompt row."""
        if type(prompt_ids) is np.ndarray and prompt_ids.shape == self._one_shape and prompt_ids.dtype == np.int64:
            return self._decide_one(prompt_ids)  # what prompt_ids_one gives: nothing to convert
        ids = self._check(prompt_ids)
        if ids.shape[0] == 1:
            return self._decide_one(ids)
        with torch.cuda.device(self.device):
            ids_dev = torch.from_numpy(np.ascontiguousarray(ids)).to(self.device)
            out = torch.empty((ids.shape[0], N_STEPS), dtype=torch.int64, device=self.device)
            self.packed.launch(ids_dev, out)
            return out.cpu().numpy()

    def _decide_one(self, ids: np.ndarray) -> np.ndarray:
        if self._graph is None:
            self._build_graph()
        out = self._out_host_np
        np.copyto(self._ids_host_np, ids)
        out[0, 0] = out[0, 1] = out[0, 2] = -1  # token ids are >= 0: -1 marks an answer not yet written
        if torch.cuda.current_device() == self.device.index:  # the common case: no device switch (0.02 ms on an H200 host)
            self._graph.replay()  # into the current stream
            self._wait(out)
        else:
            with torch.cuda.device(self.device):
                self._graph.replay()
                self._wait(out)
        return out.copy()

    def _wait(self, out: np.ndarray) -> None:
        """Until the answer is in `out` (pinned): the host polls it for up to `spin_s`, then waits on the stream.

        The kernel (or the graph's copy out) writes the three ids into pinned host memory, where the host sees
        them as they land, before the kernel has exited and the stream has signalled completion. An error, or
        work queued ahead of the decision in the stream, outlasts the polling: the stream's synchronize then
        waits for it and raises what the device reports."""
        if self.spin_s > 0:
            deadline = time.perf_counter() + self.spin_s
            while out[0, 0] < 0 or out[0, 1] < 0 or out[0, 2] < 0:
                if time.perf_counter() > deadline:
                    break
            else:
                return
        torch.cuda.current_stream().synchronize()

    def _build_graph(self) -> None:
        with torch.cuda.device(self.device):
            self._ids_host = torch.zeros((1, self.prompt_length), dtype=torch.int64).pin_memory()
            self._out_host = torch.zeros((1, N_STEPS), dtype=torch.int64).pin_memory()
            self._ids_host_np, self._out_host_np = self._ids_host.numpy(), self._out_host.numpy()
            if self.zero_copy is not False:
                # Pinned host memory is mapped into the device's address space (unified addressing), so the
                # kernel can read the ids from it and write the answer to it: no copy nodes in the graph
                # (a few microseconds of a ~0.1 ms replay). Triton refuses a pointer the device cannot see.
                try:
                    self.packed.launch(self._ids_host, self._out_host)  # also compiles, outside the capture
                    torch.cuda.synchronize(self.device)
                    self.zero_copy = True
                except ValueError:
                    if self.zero_copy:
                        raise
                    self.zero_copy = False
            graph = torch.cuda.CUDAGraph()
            if self.zero_copy:
                with torch.cuda.graph(graph):
                    self.packed.launch(self._ids_host, self._out_host)
            else:
                ids_dev = torch.zeros((1, self.prompt_length), dtype=torch.int64, device=self.device)
                out_dev = torch.zeros((1, N_STEPS), dtype=torch.int64, device=self.device)
                self.packed.launch(ids_dev, out_dev)  # compile outside the capture
                torch.cuda.synchronize(self.device)
                with torch.cuda.graph(graph):
                    # copies from and to pinned host memory as graph nodes: a replay reads the ids written
                    # into _ids_host since the last one and leaves the answer in _out_host
                    ids_dev.copy_(self._ids_host, non_blocking=True)
                    self.packed.launch(ids_dev, out_dev)
                    self._out_host.copy_(out_dev, non_blocking=True)
                self._buffers = (ids_dev, out_dev)
            self._graph = graph
