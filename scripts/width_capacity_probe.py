"""Does micro's width knob (top_k) matter once a task needs the MoE's capacity?

    python scripts/width_capacity_probe.py --device cuda --n-symbols 64 --out OUT.json
    python scripts/width_capacity_probe.py --steps 30 --batch-size 32 --n-symbols 8 --eval-facts 64   # CPU smoke run

Eight micros trained on the nine procedural families are all top-1 MoEs (docs/MICRO.md): the heaviest
expert alone answers as well as the top-8. One explanation is that those tasks never fill the MoE's
capacity: attention and one expert per block compute what they need. This probe trains micro's
decoder from scratch on a task that is capacity-bound by construction and measures recall at each
top_k.

The task is compositional fact recall: `--n-symbols`^2 entities (a, b) times `--n-relations`
relations, each mapped to one of `--n-answers` answers drawn uniformly at random. A training
sequence is [a, b, relation] and the target is the answer (one token). No single token determines
the answer, so an embedding row cannot store it: the decoder has to combine a, b and the relation
and look the answer up, and the facts only fit in its weights if enough of them take part. The
number of facts sets how much memory the task needs.

Training is micro's own: `MolmoE` at the micro preset (`--expert-hidden` as `train_micro.py`),
`init_for_training_`, `teacher_forced_loss` with its router losses, AdamW with warmup-stable-decay,
bf16 autocast on CUDA. Images play no part: one blank view is encoded and no token receives its
features. `--elastic` draws top_k per batch as elastic training does (the full configuration with
probability 0.25, else uniform over 1, 2, 4, 8; all 16 blocks always run); `--no-elastic` trains
at top_k 8 only. Recall is measured on every fact (or `--eval-facts` of them) at each top_k; chance
is 1 / `--n-answers`. The JSON holds the arguments, recall per top_k, the training loss curve,
device, versions and wall time.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from flexvlm_env.experiments.common import versions
from flexvlm_env.model.molmoe import MolmoE
from flexvlm_env.model.preprocess import IGNORE_INDEX
from flexvlm_env.model.tokenizer import TextTokenizer
from flexvlm_env.model.runtime import assets_dir
from flexvlm_env.training import ElasticKnobs, init_for_training_, micro_args, teacher_forced_loss
from flexvlm_env.training.loop import wsd_learning_rate
from flexvlm_env.training.parallel import resolve_device

TOP_K_CHOICES = (1, 2, 4, 8)
FIRST_TOKEN_ID = 16  # token ids used by the probe start here, past micro's special tokens


@dataclass
class Args:
    n_symbols: int = 64
    """symbols per entity slot: n_symbols^2 entities"""
    n_relations: int = 4
    n_answers: int = 256
    steps: int = 4000
    batch_size: int = 512
    lr: float = 1.5e-3
    warmup_steps: int = 100
    decay_frac: float = 0.25
    weight_decay: float = 0.0
    """0 by default: weight decay erodes memorised facts"""
    elastic: bool = True
    """draw top_k per batch as elastic training does; --no-elastic trains at top_k 8 only"""
    expert_hidden: int = 16
    seed: int = 0
    eval_facts: int = 16384
    """facts recall is measured on (all of them when there are fewer)"""
    log_every: int = 250
    max_minutes: float = 0.0
    """stop training after this many minutes (0: no limit) and still measure recall; the JSON records the steps done"""
    device: str = "auto"
    out: Path = Path("results/width_capacity_probe.json")

    def __post_init__(self) -> None:
        for name in ("n_symbols", "n_relations", "n_answers", "steps", "batch_size", "eval_facts", "log_every", "expert_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.n_answers < 2:
            raise ValueError(f"--n-answers={self.n_answers} must be >= 2")
        vocab = micro_args(112).vocab_size
        needed = FIRST_TOKEN_ID + 2 * self.n_symbols + self.n_relations + self.n_answers
        if needed > vocab:
            raise ValueError(f"2 x --n-symbols + --n-relations + --n-answers = {needed - FIRST_TOKEN_ID} token ids do not fit "
                             f"micro's vocabulary ({vocab} ids, the first {FIRST_TOKEN_ID} reserved)")


@dataclass(frozen=True)
class FactTask:
    """The facts table and the token ids of each slot."""

    answers: np.ndarray  # [n_relations, n_symbols, n_symbols] answer index
    a_ids: np.ndarray
    b_ids: np.ndarray
    relation_ids: np.ndarray
    answer_ids: np.ndarray

    @classmethod
    def make(cls, args: Args) -> "FactTask":
        rng = np.random.default_rng([args.seed, 0x66616374])
        ids = np.arange(FIRST_TOKEN_ID, FIRST_TOKEN_ID + 2 * args.n_symbols + args.n_relations + args.n_answers)
        a_ids, b_ids, relation_ids, answer_ids = np.split(
            ids, np.cumsum([args.n_symbols, args.n_symbols, args.n_relations]))
        answers = rng.integers(0, args.n_answers, size=(args.n_relations, args.n_symbols, args.n_symbols))
        return cls(answers, a_ids, b_ids, relation_ids, answer_ids)

    @property
    def n_facts(self) -> int:
        return self.answers.size

    def batch(self, fact_index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(input_ids [B, 3], labels [B, 3] with the answer at the last position, answer token ids [B])."""
        relation, a, b = np.unravel_index(fact_index, self.answers.shape)
        target = self.answer_ids[self.answers[relation, a, b]]
        input_ids = np.stack([self.a_ids[a], self.b_ids[b], self.relation_ids[relation]], axis=1)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        labels[:, -1] = target
        return torch.from_numpy(input_ids), torch.from_numpy(labels), target


class Forward:
    """`teacher_forced_loss` on fact sequences, with one blank view encoded that no token receives."""

    def __init__(self, module: MolmoE, device: torch.device, pad_id: int):
        vision = module.args.vision
        patches = (vision.crop_px // vision.patch_px) ** 2
        self.module, self.device, self.pad_id = module, device, pad_id
        self.image = torch.zeros(1, patches, vision.patch_px ** 2 * 3, device=device)
        self.mask = torch.ones(1, patches, device=device)
        self.none = torch.zeros(0, dtype=torch.long, device=device)
        self.plan = tuple(range(module.args.n_layers))

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, top_k: int):
        return teacher_forced_loss(self.module, self.image, self.mask, input_ids.to(self.device), labels.to(self.device),
                                   self.none, self.none, self.plan, top_k, self.pad_id)


@torch.no_grad()
def recall(forward: Forward, task: FactTask, facts: np.ndarray, top_k: int, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(facts), batch_size):
        input_ids, labels, target = task.batch(facts[start:start + batch_size])
        _, parts = forward(input_ids, labels, top_k)
        correct += int((parts["logits"][:, -1].argmax(-1).cpu().numpy() == target).sum())
    return correct / len(facts)


def main(args: Args) -> None:
    started = time.perf_counter()
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model_args = dataclasses.replace(micro_args(112), expert_hidden=args.expert_hidden)
    module = MolmoE(model_args).to(device)
    init_for_training_(module, args.seed)
    pad_id = TextTokenizer.from_file(assets_dir("micro")).special.pad
    forward = Forward(module, device, pad_id)
    task = FactTask.make(args)
    knobs = ElasticKnobs(enabled=args.elastic, crops_choices=(1,), top_k_choices=TOP_K_CHOICES, min_blocks=model_args.n_layers,
                         n_blocks=model_args.n_layers, p_smallest=0.0)
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rng = np.random.default_rng([args.seed, 0x64617461])
    curve, window = [], []
    module.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = wsd_learning_rate(step, args.lr, args.warmup_steps, args.steps, args.decay_frac, 0.05)
        input_ids, labels, _ = task.batch(rng.integers(0, task.n_facts, size=args.batch_size))
        with autocast:
            loss, parts = forward(input_ids, labels, knobs.draw(args.seed, step).top_k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        window.append(parts["ce"].sum().detach() / args.batch_size)
        out_of_time = args.max_minutes > 0 and time.perf_counter() - started >= 60 * args.max_minutes
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps or out_of_time:
            curve.append({"step": step + 1, "answer_ce": float(torch.stack(window).mean())})
            window = []
            print(f"step {curve[-1]['step']} answer CE {curve[-1]['answer_ce']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
        if out_of_time:
            print(f"--max-minutes={args.max_minutes} reached at step {step + 1} of {args.steps}")
            break
    module.eval()
    facts = np.random.default_rng([args.seed, 0x6576616C]).permutation(task.n_facts)[: args.eval_facts]
    # float32: under bf16 autocast without gradients the fused CUDA vision kernels get mixed dtypes
    by_top_k = {str(k): recall(forward, task, facts, k, 4096) for k in TOP_K_CHOICES}
    print("recall by top_k: " + ", ".join(f"{k}: {v:.3f}" for k, v in by_top_k.items()) + f" (chance {1 / args.n_answers:.4f})")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
              "steps_done": curve[-1]["step"], "n_facts": task.n_facts, "eval_facts": len(facts), "chance": 1 / args.n_answers,
              "recall_by_top_k": by_top_k, "top1_loss_points": round(100 * (by_top_k["8"] - by_top_k["1"]), 2),
              "curve": curve, "parameters": sum(p.numel() for p in module.parameters()),
              "device": f"{device.type} ({device_name})", "dtype": ("bf16 autocast training, float32 recall" if device.type == "cuda" else "float32"),
              "versions": versions(),
              "wall_s": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main(tyro.cli(Args))
