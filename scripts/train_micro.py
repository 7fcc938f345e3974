"""Train the `micro` model from scratch on the procedural train split of all nine families.

    python scripts/train_micro.py --total-steps 20000 --max-minutes 9     # GPU, resumable chunks
    python scripts/train_micro.py --total-steps 20 --batch-size 8 --device cpu --no-finalize   # smoke run (minutes)
    torchrun --nproc-per-node 4 scripts/train_micro.py ...                      # data parallel, 4 GPUs
    python scripts/train_micro.py ... --export-dir flexvlm_env/assets/micro     # replace the shipped weights

CleanRL-style single file: the `Args` dataclass is the whole interface. Knob-robust ("elastic")
training is on by default: every batch runs at a drawn (crops, top_k, block plan), see
`flexvlm_env.training.knobs`; `--no-elastic` trains at the full configuration only (ablation).
Mixed precision: bf16 autocast over float32 master weights on CUDA, float32 on CPU.

Resuming: the run directory holds `checkpoint/` (weights, AdamW moments, progress; safetensors +
JSON), written every `--checkpoint-minutes` and when `--max-minutes` is reached. Re-running the same
command continues from it; the data stream is a pure function of (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would, and `log.jsonl` lines past the checkpoint are
dropped on resume so none is duplicated. The learning rate follows warmup-stable-decay, so the
planned `--total-steps` may be raised on resume as long as the decay has not started.

When the last step is done, the block-importance ranking is measured (quality drop when each block
alone is skipped, on held-out train-split samples, generated greedily and scored with each
family's metric) and the weights are exported in bfloat16 with the ranking to `--export-dir`
(default `<run-dir>/export`: the shipped weights in flexvlm_env/assets/micro are replaced only when
that directory is given explicitly).
Logging: `log.jsonl` in the run directory always; Weights & Biases with `--track` (offline unless
WANDB_MODE / an API key says otherwise).

Data parallel (under torchrun): each process builds its shard of the same global batch
(`--batch-size` stays the global size), gradients are averaged with one all-reduce per step, and
rank 0 alone logs, checkpoints and exports. Every process draws the same knobs, so the replicas
run the same graph; a checksum of the weights is compared across processes at every log step.
Stop and checkpoint decisions are taken at log steps (where the host reads the device anyway).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flexvlm_env.experiments.common import parse_script_args
from flexvlm_env.model.molmoe import MolmoE
from flexvlm_env.model.runtime import VLM, assets_dir
from flexvlm_env.model.tokenizer import TextTokenizer
from flexvlm_env.tasks import FAMILIES
from flexvlm_env.training import (
    ElasticKnobs, TrainBatchSpec, TrainStream, batch_views, init_for_training_, load_training_state, micro_args,
    save_training_state, teacher_forced_loss,
)
from flexvlm_env.training.loop import WindowStats, append_log, loss_summary, truncate_log, wsd_learning_rate
from flexvlm_env.training.state import recover_directory
from flexvlm_env.training.tracking import WandbLog
from flexvlm_env.training.parallel import (
    all_reduce_mean_, average_gradients, broadcast_from_rank0_, check_replicas, end_processes, setup_processes,
)
from flexvlm_env.training.reading import TRANSCRIBE


@dataclass
class Args:
    run_dir: str = "runs/micro"
    """training state and log.jsonl (resumed from if it holds a checkpoint)"""
    export_dir: str | None = None
    """where the finished bf16 weights (model.safetensors + model.json) are written (default: <run-dir>/export).
    Give flexvlm_env/assets/micro to replace the shipped weights"""
    total_steps: int = 20000
    """optimizer steps in the whole run"""
    batch_size: int = 512
    """requests per step"""
    lr: float = 1.5e-3
    """peak AdamW learning rate"""
    min_lr_frac: float = 0.05
    """final learning rate as a fraction of the peak"""
    warmup_steps: int = 300
    """linear warmup"""
    decay_frac: float = 0.25
    """the last fraction of total_steps decays the learning rate (warmup-stable-decay)"""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices"""
    grad_clip: float = 1.0
    """global gradient-norm clip"""
    balance_coef: float = 0.01
    """router load-balancing loss weight"""
    elastic: bool = True
    """draw (crops, top_k, block plan) per batch; --no-elastic trains the full configuration only"""
    p_full: float = 0.25
    """share of elastic batches at the full configuration"""
    p_smallest: float = 0.05
    """share of elastic batches at the smallest configuration of the drawn range ((1, 1, 8) by
    default): the slimmable-network "sandwich rule". 0 leaves the low end to the uniform draws, which train it less: the knobs then
    cost more quality, as in a model trained at one configuration"""
    top_k_choices: tuple[int, ...] = (1, 2, 4, 8)
    """top_k values the elastic draws pick from, uniformly; 8 (the full configuration's) must be one.
    Leaving 1 out makes top-1 a width the model never trains at, as every reduced configuration is
    for MolmoE, which was trained at one configuration"""
    min_blocks: int = 8
    """fewest active blocks an elastic draw runs (uniform over min_blocks..16)"""
    family_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.5, 1.0, 1.5, 1.0, 1.5, 1.0)
    """sampling weights in FAMILIES order (reading families, harder, get more)"""
    focus_steps: int = 0
    """curriculum: the first focus_steps steps run at the full configuration and draw families by
    --focus-weights (0: no curriculum). The reading families' loss stayed at the text-only prior for
    a whole 7 000-step mixed run (results/train_micro_log.jsonl); full-configuration batches where
    they dominate give them legible crops and most of the gradient"""
    focus_weights: tuple[float, ...] = (0.5, 0.5, 0.5, 3.0, 0.5, 3.0, 0.5, 3.0, 0.5)
    """family sampling weights during the focus phase, in FAMILIES order (default: doc_qa, text_vqa
    and st_qa 6x the others, which stay in the batches so they are not forgotten)"""
    transcribe_weight: float = 0.0
    """sampling weight of the training-only transcribe task (flexvlm_env.training.reading: one
    clean word, code or number, "What is written in the image?") after the focus phase, relative
    to --family-weights; 0 leaves it out"""
    focus_transcribe_weight: float = 0.0
    """its weight during the focus phase, relative to --focus-weights"""
    seed: int = 0
    """data order, knob draws and initialisation"""
    init_from: str | None = None
    """start a new run from these weights instead of random ones: a FlexVLM .safetensors file (e.g.
    the shipped micro weights) or a training-state directory (e.g. runs/micro/transfer). Use another
    --seed than the run it continues, so the data stream does not repeat its requests. A .safetensors
    file of another --crop-px loads with the ViT position table resampled to the new patch grid"""
    crop_px: int = 224
    """micro's crop size (px; a multiple of 28). The shipped micro uses 224: at 112 the reading
    families' text is only 8-14 px tall at 12 crops and reading stayed near chance; 224 doubles it
    at about 6x the vision tokens
    (docs/MICRO.md; scripts/reading_probe.py)"""
    expert_hidden: int = 16
    """hidden units of each of the 64 experts (the shipped micro: 16, an eighth of d_model 128;
    MolmoE-1B's experts are half its d_model). Other sizes are for ablations of the width knob:
    at 64 the weights are about 55 MB in bf16, beyond what the package ships"""
    norm_topk_prob: bool = False
    """renormalise each token's kept top-k router weights to sum to 1 (Mixtral; OLMoE's
    norm_topk_prob). Off, as in MolmoE-1B, whose width knob micro stands in for; on, an ablation of
    the router: top_k = 1 then gives the heaviest expert weight 1 instead of its softmax share"""
    device: str = "auto"
    """cuda, cpu or auto (CUDA when available)"""
    num_workers: int = -1
    """DataLoader workers building batches (-1: CPU count - 2)"""
    max_minutes: float = 0.0
    """stop (after a checkpoint) once this much wall time has passed; 0 = no limit"""
    checkpoint_minutes: float = 3.0
    """checkpoint period"""
    log_every: int = 50
    """steps per log line"""
    ranking_requests: int = 64
    """held-out train-split requests per family for the block-importance ranking"""
    finalize: bool = True
    """after the last step, measure the block ranking and export the weights (--no-finalize: stop there)"""
    compile: bool = False
    """torch.compile the loss (forward and backward) with dynamic shapes. Pays off at a fixed
    configuration (--no-elastic): a step is launch-bound in eager mode (profile: 173 ms of host vs
    128 ms of GPU per step on an H100) and the compiled graph fuses the casts and elementwise work.
    With elastic draws every distinct (plan, top_k) is another graph, so leave it off there"""
    profile_steps: int = 0
    """profile this many steps (after 20 warm-up steps) with torch.profiler; the kernel table goes
    to run_dir/profile.txt (where a training step's time goes on this device)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "flexvlm"
    """W&B project"""

    def __post_init__(self) -> None:
        micro = micro_args(self.crop_px)  # a bad crop size fails here, naming --crop-px
        for name in ("total_steps", "batch_size", "log_every", "ranking_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "profile_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        if not (self.lr > 0 and 0 <= self.min_lr_frac <= 1 and 0 <= self.decay_frac <= 1):
            raise ValueError(f"--lr={self.lr} must be > 0, --min-lr-frac={self.min_lr_frac} and "
                             f"--decay-frac={self.decay_frac} in [0, 1]")
        if self.expert_hidden < 1:
            raise ValueError(f"--expert-hidden={self.expert_hidden} must be >= 1 (the shipped micro has {micro.expert_hidden})")
        if not 0 <= self.focus_steps <= self.total_steps:
            raise ValueError(f"--focus-steps={self.focus_steps} must be in 0..--total-steps={self.total_steps}")
        for name in ("family_weights", "focus_weights"):
            weights = getattr(self, name)
            if len(weights) != len(FAMILIES) or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={weights}: give {len(FAMILIES)} non-negative weights "
                                 f"with a positive sum, one per family {tuple(FAMILIES)}")
        for name in ("p_full", "p_smallest"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be in [0, 1]")
        if self.p_full + self.p_smallest > 1.0:
            raise ValueError(f"--p-full + --p-smallest = {self.p_full + self.p_smallest} must be <= 1")
        if (not self.top_k_choices or max(self.top_k_choices) != micro.top_k
                or min(self.top_k_choices) < 1 or len(set(self.top_k_choices)) != len(self.top_k_choices)):
            raise ValueError(f"--top-k-choices={self.top_k_choices}: give distinct values in 1..{micro.top_k} "
                             f"that include {micro.top_k} (the full configuration's top_k)")
        if not 1 <= self.min_blocks <= micro.n_layers:
            raise ValueError(f"--min-blocks={self.min_blocks} must be in 1..{micro.n_layers}")
        for name in ("transcribe_weight", "focus_transcribe_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device={self.device!r} is not valid; allowed: auto, cuda, cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device='cuda' was given but CUDA is not available here; allowed: cpu, auto")

    @property
    def export_path(self) -> Path:
        """--export-dir, or `<run-dir>/export`: a run never replaces the shipped weights unless told to."""
        return Path(self.export_dir) if self.export_dir is not None else Path(self.run_dir) / "export"

    @property
    def families(self) -> tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...]]:
        """(training families, their weights after and during the focus phase): the nine families,
        plus the transcribe task when either of its weights is positive."""
        if self.transcribe_weight == 0 and self.focus_transcribe_weight == 0:
            return tuple(FAMILIES), tuple(self.family_weights), tuple(self.focus_weights)
        return ((*FAMILIES, TRANSCRIBE), (*self.family_weights, self.transcribe_weight),
                (*self.focus_weights, self.focus_transcribe_weight))


# What a resumed run must keep: they define the data stream and the model.
RESUME_KEEPS = ("batch_size", "seed", "elastic", "p_full", "p_smallest", "top_k_choices", "min_blocks", "family_weights",
                "crop_px", "expert_hidden", "norm_topk_prob", "focus_steps", "focus_weights", "transcribe_weight",
                "focus_transcribe_weight")


def check_resume(args: Args) -> None:
    """Raise a ValueError naming the argument unless `args` may continue the checkpoint in --run-dir (if it holds
    one). Read from its state.json alone, so a bad resume is refused before anything loads: another crop size
    would otherwise fail later as a tensor-shape mismatch."""
    recover_directory(Path(args.run_dir) / "checkpoint")  # a crash mid-save leaves the last checkpoint renamed aside
    state_path = Path(args.run_dir) / "checkpoint" / "state.json"
    if not state_path.exists():
        return
    progress = json.loads(state_path.read_text())["progress"]
    saved_args = {"crop_px": 112, **progress.get("args", {})}  # runs from before --crop-px existed were all at 112
    for key in RESUME_KEEPS:
        given = list(getattr(args, key)) if isinstance(getattr(args, key), tuple) else getattr(args, key)
        if key in saved_args and saved_args[key] != given:
            raise ValueError(f"--{key.replace('_', '-')}={getattr(args, key)!r} differs from the checkpoint's {saved_args[key]!r}; "
                             f"resuming must keep the data stream and the model (use a new --run-dir to change it)")
    saved_decay = saved_args.get("decay_frac", args.decay_frac)
    saved_total = saved_args.get("total_steps", args.total_steps)
    decay_start = int(saved_total * (1 - saved_decay))
    # Changing the planned length changes the schedule only once the decay has begun.
    if args.total_steps != saved_total and saved_decay > 0 and progress["step"] >= decay_start:
        raise ValueError(f"--total-steps={args.total_steps}: the learning-rate decay already started at step {decay_start} "
                         f"(the checkpoint's --total-steps={saved_total}); keep it, or use a new --run-dir")


REWARM_STEPS = 100  # linear re-warmup after resuming without optimizer moments (beta2 = 0.95 re-estimates in ~50 steps)


def learning_rate(step: int, args: Args, rewarm_from: int | None = None) -> float:
    scale = 1.0 if rewarm_from is None else min(1.0, (step - rewarm_from + 1) / REWARM_STEPS)
    return scale * wsd_learning_rate(step, args.lr, args.warmup_steps, args.total_steps, args.decay_frac, args.min_lr_frac)


def make_optimizer(model: torch.nn.Module, args: Args, fused: bool) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


@torch.no_grad()
def measure_ranking(module: MolmoE, tokenizer: TextTokenizer, device, n_per_family: int, seed: int) -> dict:
    """Block importance: mean quality with each block alone skipped, on held-out train samples."""
    from flexvlm_env.config import Config
    from flexvlm_env.evaluation import QualityEvaluator
    from flexvlm_env.model.blocks import rank_blocks_by_drop
    from flexvlm_env.tasks.procedural import generate_samples

    vlm = VLM(module.float().eval(), tokenizer, use_cuda_graphs=False, moe_impl="reference")
    # Train-split indices far beyond any step * batch_size the run consumed: unseen, same distribution.
    samples = [s for f in FAMILIES for s in generate_samples(f, "train", n_per_family, seed=0, start_index=10**9)]
    evaluator = QualityEvaluator(vlm, samples)
    full = Config(crops=module.args.max_crops, top_k=module.args.top_k, active_blocks=module.args.n_layers)
    n = module.args.n_layers

    @functools.lru_cache(maxsize=None)  # the unablated quality is both the baseline and reported
    def accuracy_without(block):
        plan = tuple(b for b in range(n) if b != block)
        return float(np.mean(evaluator.scores(full, plan=plan)))

    ranking, drops = rank_blocks_by_drop(n, accuracy_without)
    return {"ranking": list(ranking), "drops": {str(k): v for k, v in drops.items()},
            "full_quality": accuracy_without(None), "requests": len(samples)}


def export(module: MolmoE, args: Args, ranking: dict, progress: dict, model_args) -> None:
    from flexvlm_env.model.checkpoint import save_flexvlm

    export_dir = args.export_path
    export_dir.mkdir(parents=True, exist_ok=True)
    path = export_dir / "model.safetensors"
    source = (f"quality drop when each block alone is skipped, mean over {ranking['requests']} held-out "
              "train-split procedural requests (scripts/train_micro.py)")
    # Shipped in bfloat16 (half the size; the CPU path computes in float32 from these values).
    sha = save_flexvlm(copy.deepcopy(module).to(torch.bfloat16), path, {
        "block_ranking": json.dumps(ranking["ranking"]), "block_ranking_source": source,
    })
    card = {
        "preset": "micro",
        "sha256": sha,
        "dtype": "bfloat16",
        "parameters": sum(p.numel() for p in module.parameters()),
        "block_ranking": ranking,
        "training": {**progress, "args": asdict(args)},
    }
    (export_dir / "model.json").write_text(json.dumps(card, indent=1) + "\n")
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB) sha256 {card['sha256'][:16]}")


def main(args: Args) -> None:
    started = time.perf_counter()
    check_resume(args)
    rank, world, device = setup_processes(args.device, args.batch_size)
    torch.manual_seed(args.seed)
    model_args = dataclasses.replace(micro_args(args.crop_px), expert_hidden=args.expert_hidden, norm_topk_prob=args.norm_topk_prob)
    tokenizer = TextTokenizer.from_file(assets_dir("micro"))
    module = MolmoE(model_args).to(device)
    init_for_training_(module, args.seed)
    optimizer = make_optimizer(module, args, fused=device.type == "cuda")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.jsonl"
    progress = {"step": 0, "samples": 0, "train_seconds": 0.0, "device": str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu",
                "processes": world}  # data-parallel processes (one GPU each)
    if args.init_from and not (run_dir / "checkpoint" / "state.json").exists():
        init_path = Path(args.init_from)
        if init_path.is_dir():
            load_training_state(init_path, module, None)
        else:
            from flexvlm_env.training.geometry import load_across_crop_size_

            resampled = load_across_crop_size_(module, init_path)
            module.float()
            if resampled:
                print(f"{init_path} has another crop size: resampled {resampled} to {args.crop_px} px crops")
        print(f"initialised from {init_path}")
    if (run_dir / "checkpoint" / "state.json").exists():  # check_resume(args) above allowed it
        saved = load_training_state(run_dir / "checkpoint", module, optimizer)
        progress.update(saved)
        truncate_log(log_path, progress["step"])
        if not progress.pop("optimizer_restored"):
            progress["rewarm_from"] = progress["step"]
            print(f"weights-only state: fresh AdamW moments, learning rate re-warmed over {REWARM_STEPS} steps")
        print(f"resumed from step {progress['step']}")
    progress["args"] = asdict(args)
    broadcast_from_rank0_(module.state_dict().values(), world)  # every process read the same files

    knobs = ElasticKnobs(enabled=args.elastic, p_full=args.p_full, p_smallest=args.p_smallest,
                         top_k_choices=tuple(args.top_k_choices), min_blocks=args.min_blocks, n_blocks=model_args.n_layers,
                         full_until_step=args.focus_steps)
    families, family_weights, focus_weights = args.families
    spec = TrainBatchSpec(batch_size=args.batch_size, seed=args.seed, families=families, family_weights=family_weights,
                          shard_index=rank, shard_count=world, focus_steps=args.focus_steps, focus_weights=focus_weights)
    special = tokenizer.special
    step = progress["step"]

    wandb_run = None
    if args.track and rank == 0:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
        # One W&B run per run directory, resumed with it.
        run_id = "micro-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]
        wandb_run = wandb.init(project=args.wandb_project, name=run_dir.name, id=run_id,
                               resume="allow", config=asdict(args), dir=str(run_dir))
    # W&B gets the log's lines once a checkpoint covers them: lines after the last checkpoint are logged again by a
    # resumed run, and W&B keeps the first value it got for a step.
    wandb_log = WandbLog(wandb_run, log_path, "step")
    wandb_log.send_through(progress["step"])

    if step < args.total_steps:
        workers = max(1, ((os.cpu_count() or 2) - 2) // world) if args.num_workers < 0 else args.num_workers
        loader = torch.utils.data.DataLoader(
            TrainStream(spec, knobs, model_args, tokenizer, start_step=step), batch_size=None, num_workers=workers,
            pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None, persistent_workers=False,
            worker_init_fn=lambda _: torch.set_num_threads(1),
        )
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        loss_fn = torch.compile(teacher_forced_loss, dynamic=True) if args.compile else teacher_forced_loss
        stats = WindowStats(spec.families, device)
        window_start, window_samples, last_checkpoint = time.perf_counter(), 0, time.perf_counter()
        module.train()
        profiler = None
        data_wait, received = 0.0, time.perf_counter()
        for batch in loader:
            if args.profile_steps and step == progress["step"] + 20 and profiler is None:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                                  + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
                profiler.__enter__()
                profile_until = step + args.profile_steps
            data_wait += time.perf_counter() - received
            assert batch["step"] == step, (batch["step"], step)
            draw = knobs.draw(args.seed, step)
            lr = learning_rate(step, args, progress.get("rewarm_from"))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, masks = batch_views(batch, draw.crops, model_args.vision, special, device)
            tensors = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "feature_pos", "feature_rows", "family")}
            with autocast:
                loss, parts = loss_fn(
                    module, images, masks, tensors["input_ids"], tensors["labels"], tensors["feature_pos"],
                    tensors["feature_rows"], draw.plan, draw.top_k, special.pad, balance_coef=args.balance_coef,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(module, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)
            optimizer.step()
            step += 1
            window_samples += args.batch_size
            if profiler is not None and step == profile_until:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                profiler.__exit__(None, None, None)
                sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
                (run_dir / "profile.txt").write_text(profiler.key_averages().table(sort_by=sort, row_limit=40))
                print(f"profile of {args.profile_steps} steps written to {run_dir / 'profile.txt'}")
                profiler = None
            stats.add(draw.kind, parts["ce"], tensors["labels"], tensors["family"], grad_norm, parts["balance"])

            now = time.perf_counter()
            out_of_time = save_now = False
            if step % args.log_every == 0 or step == args.total_steps:
                elapsed = now - window_start
                record = {"step": step, "lr": lr, "samples_per_s": window_samples / elapsed,
                          "data_wait_frac": data_wait / elapsed, "elapsed_min": (now - started) / 60}
                record.update(stats.read(lambda tensor: all_reduce_mean_(tensor, world)))
                check_replicas(module, world)
                if rank == 0:
                    append_log(log_path, record)
                    print(f"step {step} ce: {loss_summary(record)} | {record['samples_per_s']:.0f} samples/s "
                          f"(data wait {record['data_wait_frac']:.0%}) lr {record['lr']:.2e}", flush=True)
                progress["train_seconds"] += elapsed
                window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
                # Rank 0's clock decides for everyone, so all processes stop at the same step.
                decision = torch.tensor([args.max_minutes > 0 and (now - started) / 60 >= args.max_minutes,
                                         (now - last_checkpoint) / 60 >= args.checkpoint_minutes], dtype=torch.int32, device=device)
                broadcast_from_rank0_([decision], world)
                out_of_time, save_now = (bool(v) for v in decision.tolist())
            if step == args.total_steps or out_of_time or save_now:
                progress.update(step=step, samples=step * args.batch_size)
                if rank == 0:
                    save_training_state(run_dir / "checkpoint", module, optimizer, progress)
                    wandb_log.send_through(step)
                last_checkpoint = time.perf_counter()
            if step == args.total_steps or out_of_time:
                if rank == 0:  # weights only (fp32, 15 MB shards): what moves the run to another machine
                    save_training_state(run_dir / "transfer", module, None, progress)
                break
            received = time.perf_counter()
        if step < args.total_steps:
            print(f"stopped at step {step} of {args.total_steps} (time limit); re-run to resume")
            if wandb_run is not None:
                wandb_run.finish()
            end_processes(world)
            return
    end_processes(world)
    if rank != 0:  # ranking and export are rank 0's
        return

    if not args.finalize:
        if wandb_run is not None:
            wandb_run.finish()
        return
    module.eval()
    ranking_path = run_dir / "block_ranking.json"
    if not ranking_path.exists():
        ranking = measure_ranking(module, tokenizer, device, args.ranking_requests, args.seed)
        ranking_path.write_text(json.dumps(ranking, indent=1))
    ranking = json.loads(ranking_path.read_text())
    print(f"block ranking {ranking['ranking']} (full quality {ranking['full_quality']:.3f})")
    export(module, args, ranking, {k: v for k, v in progress.items() if k != "args"}, model_args)
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    # A resume that changes the run is a usage error before the model is built (main checks again for callers).
    main(parse_script_args(Args, check_resume))
