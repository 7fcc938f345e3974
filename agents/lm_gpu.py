"""The LM controller's greedy constrained decision as one Triton kernel, for controllers served on a GPU.

`NumpyDecoder` (agents/lm.py) makes a batch-1 decision in about 0.4 ms on a CPU core: the model is
tiny (hidden 64, 2 layers), so the time is NumPy's per-operation overhead over the ~150 operations of
three forward passes. Against a request of ~14 ms that is 3%, and on a slower host CPU more (M3's
bar is 1%). `GPUDecoder` does the whole decision (the prompt's forward pass, the three constrained
argmax steps, each chosen knob token appended) in one kernel, one program per observation, with
every activation in registers: the sequence (15 prompt + 2 answer tokens) fits in one 32-row tile,
so each step recomputes the full causal forward pass instead of keeping a KV cache (a few MFLOP).

For batch 1 the host work is one CUDA-graph replay that also holds the copies: the prompt ids are
written into pinned host memory, the graph copies them to the GPU, runs the kernel and copies the
three chosen token ids back into pinned memory; the host waits on the stream and reads them.

Arithmetic is float32 with IEEE products (`input_precision="ieee"`, no TF32), so logits agree with
`NumpyDecoder` to float32 rounding and decisions are equal but for exact near-ties.

RoPE needs rotate_half(q); it is computed as x @ Wr with Wr the projection's columns permuted and
negated per head (the same products, no column shuffles in the kernel). The weights are copied to the
device when the decoder is built: after the model's weights change (training), build a new one.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decisions use NumpyDecoder
    triton = None

N_STEPS = 3  # knob tokens: crops, top_k, active_blocks


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


if triton is not None:

    @triton.jit
    def _rms(x, w, eps, D: tl.constexpr):
        return w[None, :] * (x / tl.sqrt(tl.sum(x * x, 1) / D + eps)[:, None])

    @triton.jit
    def _lm_decide_kernel(
        ids_ptr, out_ptr, emb_ptr,
        wq_ptr, wqr_ptr, wk_ptr, wkr_ptr, wv_ptr, wo_ptr,
        n1_ptr, n2_ptr, wg_ptr, wu_ptr, wd_ptr, norm_ptr,
        head_ptr, knob_ptr, nval_ptr, cos_ptr, sin_ptr,
        eps, scale,
        P: tl.constexpr, L: tl.constexpr, D: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr,
        I: tl.constexpr, BT: tl.constexpr, NVP: tl.constexpr,
    ):
        b = tl.program_id(0)
        rows = tl.arange(0, BT)
        cols_t = tl.arange(0, BT)
        cd = tl.arange(0, D)
        ch = tl.arange(0, HD)
        ci = tl.arange(0, I)
        cv = tl.arange(0, NVP)

        tok = tl.load(ids_ptr + b * P + rows, mask=rows < P, other=0)
        seq = tl.load(emb_ptr + tok[:, None] * D + cd[None, :], mask=(rows < P)[:, None], other=0.0)
        cos = tl.load(cos_ptr + rows[:, None] * HD + ch[None, :])  # [BT, HD], host-padded to BT rows
        sin = tl.load(sin_ptr + rows[:, None] * HD + ch[None, :])

        # plain (not unrolled) loops: unrolling steps x layers x heads made a kernel that took minutes to compile
        for step in range(3):
            T = P + step  # tokens in the sequence now; the next token's logits are at row T - 1
            causal = (cols_t[None, :] <= rows[:, None]) & (cols_t[None, :] < T)
            h = seq
            for layer in range(L):
                x = _rms(h, tl.load(n1_ptr + layer * D + cd), eps, D)
                attn = tl.zeros([BT, D], dtype=tl.float32)
                for head in range(NH):
                    w_off = layer * D * D + cd[:, None] * D + (head * HD + ch)[None, :]  # [D, HD] of [in, out]
                    q = tl.dot(x, tl.load(wq_ptr + w_off), input_precision="ieee")
                    q = q * cos + tl.dot(x, tl.load(wqr_ptr + w_off), input_precision="ieee") * sin
                    k = tl.dot(x, tl.load(wk_ptr + w_off), input_precision="ieee")
                    k = k * cos + tl.dot(x, tl.load(wkr_ptr + w_off), input_precision="ieee") * sin
                    v = tl.dot(x, tl.load(wv_ptr + w_off), input_precision="ieee")
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BT, BT]
                    s = tl.where(causal, s, float("-inf"))
                    p = tl.exp(s - tl.max(s, 1)[:, None])
                    p = p / tl.sum(p, 1)[:, None]
                    o = tl.dot(p, v, input_precision="ieee")  # [BT, HD]
                    wo = tl.load(wo_ptr + layer * D * D + (head * HD + ch)[:, None] * D + cd[None, :])  # [HD, D]
                    attn += tl.dot(o, wo, input_precision="ieee")
                h = h + attn
                x = _rms(h, tl.load(n2_ptr + layer * D + cd), eps, D)
                w_off = layer * D * I + cd[:, None] * I + ci[None, :]  # [D, I]
                gate = tl.dot(x, tl.load(wg_ptr + w_off), input_precision="ieee")
                up = tl.dot(x, tl.load(wu_ptr + w_off), input_precision="ieee")
                act = gate / (1.0 + tl.exp(-gate)) * up
                wd = tl.load(wd_ptr + layer * I * D + ci[:, None] * D + cd[None, :])  # [I, D]
                h = h + tl.dot(act, wd, input_precision="ieee")
            last = tl.sum(tl.where((rows == T - 1)[:, None], h, 0.0), 0)  # [D]
            last = tl.load(norm_ptr + cd) * (last / tl.sqrt(tl.sum(last * last, 0) / D + eps))
            head_w = tl.load(head_ptr + step * D * NVP + cd[:, None] * NVP + cv[None, :])  # [D, NVP]
            logits = tl.sum(last[:, None] * head_w, 0)
            logits = tl.where(cv < tl.load(nval_ptr + step), logits, float("-inf"))
            pick = tl.argmax(logits, 0)  # the first of equal maxima, as np.argmax
            chosen = tl.load(knob_ptr + step * NVP + pick)
            tl.store(out_ptr + b * 3 + step, chosen)
            embedded = tl.load(emb_ptr + chosen * D + cd)
            seq = tl.where((rows == T)[:, None], embedded[None, :], seq)


class PackedLM:
    """A `LlamaForCausalLM`'s weights laid out for `_lm_decide_kernel` (float32, [in, out] matrices stacked
    over layers, RoPE's rotated q/k projections, the LM head's columns of each step's knob tokens), on
    `device`. Raises ValueError for a model shape the kernel does not cover."""

    def __init__(self, model, knob_ids, prompt_length: int, device: str | torch.device):
        from .lm import NumpyDecoder, _check_supported

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
        block_t = max(16, triton.next_power_of_2(self.prompt_length + N_STEPS))
        self.shape = dict(P=self.prompt_length, L=L, D=D, NH=NH, HD=HD, I=I, BT=block_t)
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
        if len(knob_ids) != N_STEPS:
            raise ValueError(f"knob_ids has {len(knob_ids)} lists, expected {N_STEPS} (crops, top_k, active_blocks)")
        n_values = [len(ids) for ids in knob_ids]
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
        # NumpyDecoder's RoPE tables (as transformers computes them), padded to the tile's rows (rows past
        # the answer are never read)
        tables = NumpyDecoder(model)
        cos, sin = torch.zeros(block_t, HD), torch.zeros(block_t, HD)
        n = min(block_t, tables._cos.shape[0])
        cos[:n], sin[:n] = torch.from_numpy(tables._cos[:n]), torch.from_numpy(tables._sin[:n])
        weights["cos"], weights["sin"] = cos, sin
        self.weights = {k: v.contiguous().to(device) for k, v in weights.items()}

    def launch(self, ids: torch.Tensor, out: torch.Tensor, num_warps: int = 4) -> None:
        """Writes `out` (int64 [B, 3]) from `ids` (int64 [B, P]), both on the weights' device."""
        w = self.weights
        _lm_decide_kernel[(ids.shape[0],)](
            ids, out, w["emb"], w["wq"], w["wqr"], w["wk"], w["wkr"], w["wv"], w["wo"],
            w["n1"], w["n2"], w["wg"], w["wu"], w["wd"], w["norm"],
            w["head"], w["knob"], w["nval"], w["cos"], w["sin"],
            self.eps, self.scale, NVP=self.nvp, num_warps=num_warps, **self.shape,
        )


class GPUDecoder:
    """Greedy decisions constrained to the knob tokens, for a `LMController`'s model, on a CUDA device.

    `decide(prompt_ids [B, P]) -> [B, 3]` knob token ids, as `LMController.generate(constrained=True)`
    gives at temperature 0. Batch 1 runs through a CUDA graph (built on the first call); other batch
    sizes launch the kernel directly."""

    def __init__(self, model, knob_ids, prompt_length: int, device: str | torch.device = "cuda", num_warps: int = 4):
        if triton is None:
            raise RuntimeError("GPUDecoder needs triton (installed with CUDA builds of torch); use NumpyDecoder")
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: GPUDecoder runs on a CUDA device (torch.cuda.is_available() "
                             f"is {torch.cuda.is_available()}); decisions on the CPU use NumpyDecoder")
        self.device, self.num_warps = device, num_warps
        self.packed = PackedLM(model, knob_ids, prompt_length, device)
        self.prompt_length = self.packed.prompt_length
        self._graph = None

    def _check(self, prompt_ids) -> np.ndarray:
        ids = np.asarray(prompt_ids)
        if ids.ndim != 2 or ids.shape[1] != self.prompt_length or ids.shape[0] < 1:
            raise ValueError(f"prompt_ids has shape {ids.shape}; expected [B >= 1, {self.prompt_length}]")
        return ids.astype(np.int64, copy=False)

    def decide(self, prompt_ids) -> np.ndarray:
        """int64 [B, 3]: the chosen crops, top_k and active_blocks token ids for each prompt row."""
        ids = self._check(prompt_ids)
        if ids.shape[0] == 1:
            return self._decide_one(ids)
        with torch.cuda.device(self.device):
            ids_dev = torch.from_numpy(np.ascontiguousarray(ids)).to(self.device)
            out = torch.empty((ids.shape[0], N_STEPS), dtype=torch.int64, device=self.device)
            self.packed.launch(ids_dev, out, self.num_warps)
            return out.cpu().numpy()

    def _decide_one(self, ids: np.ndarray) -> np.ndarray:
        if self._graph is None:
            self._build_graph()
        np.copyto(self._ids_host_np, ids)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream()
            self._graph.replay()  # into the current stream
            stream.synchronize()
        return self._out_host_np.copy()

    def _build_graph(self) -> None:
        with torch.cuda.device(self.device):
            self._ids_host = torch.zeros((1, self.prompt_length), dtype=torch.int64).pin_memory()
            self._out_host = torch.zeros((1, N_STEPS), dtype=torch.int64).pin_memory()
            self._ids_host_np, self._out_host_np = self._ids_host.numpy(), self._out_host.numpy()
            ids_dev = torch.zeros((1, self.prompt_length), dtype=torch.int64, device=self.device)
            out_dev = torch.zeros((1, N_STEPS), dtype=torch.int64, device=self.device)
            self.packed.launch(ids_dev, out_dev, self.num_warps)  # compile outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                # copies from and to pinned host memory are graph nodes: a replay reads the ids written
                # into _ids_host since the last one and leaves the answer in _out_host
                ids_dev.copy_(self._ids_host, non_blocking=True)
                self.packed.launch(ids_dev, out_dev, self.num_warps)
                self._out_host.copy_(out_dev, non_blocking=True)
            self._buffers = (ids_dev, out_dev)
            self._graph = graph
