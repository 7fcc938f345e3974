"""Knob-robust fine-tuning with LoRA: make a checkpoint trained at one configuration degrade
gracefully when a controller lowers crops, top_k or depth.

    python scripts/finetune_lora.py --base path/to/model.safetensors --total-steps 800   # GPU
    python scripts/finetune_lora.py --total-steps 4 --batch-size 4 --device cpu          # smoke run
    flexvlm-profile quality --weights path/to/model.safetensors --adapter runs/lora/adapter ...

CleanRL-style single file: the `Args` dataclass is the whole interface; the pieces live in
`flexvlm_env.training` (adapters: `lora`, knob draws: `knobs`, loss: `forward`, schedule and log:
`loop`, state: `state`). The base weights are frozen; `peft` LoRA adapters wrap the chosen linear
layers (by default each block's attention projections and router). Every batch runs at a drawn
configuration (`ElasticKnobs`, as `scripts/train_micro.py` draws them) whose block plan follows
`--mask-policy`, by default the importance ranking shipped with the base weights, i.e. the plans
the runtime will execute. The full configuration keeps its share of batches (`--p-full`), which is
what holds full-configuration quality in place.

Resuming: `run_dir/checkpoint/` holds the adapter weights, their AdamW moments and progress
(safetensors + JSON, written atomically every `--checkpoint-minutes` and at `--max-minutes`);
re-running the same command continues from it, and the data stream is a pure function of (seed,
step), so a resumed run sees exactly the batches an uninterrupted one would. `log.jsonl` lines past
the checkpoint are dropped on resume. At the last step the adapter is written with
`save_adapter` (safetensors + JSON, with the base weights' sha256, the spec and the training cost)
to `--adapter-dir`; `load_model(..., adapter=DIR)` applies it, merged or not.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro

from flexvlm_env.model.runtime import load_model
from flexvlm_env.tasks import FAMILIES
from flexvlm_env.training import (
    MASK_POLICIES, ElasticKnobs, LoraSpec, TrainBatchSpec, TrainStream, WindowStats, adapter_parameter_count, add_lora,
    answer_kl, append_log, batch_views, loss_summary, load_training_state, save_adapter, save_training_state, teacher_forced_loss, truncate_log,
    with_mask_policy, wsd_learning_rate,
)


@dataclass
class Args:
    base: str | None = None
    """base weights: a FlexVLM .safetensors file or checkpoint directory (None: the shipped micro weights)"""
    preset: str = "micro"
    """model preset of the base"""
    run_dir: str = "runs/lora"
    """training state and log.jsonl (resumed from if it holds a checkpoint)"""
    adapter_dir: str | None = None
    """where the finished adapter is written (default: run_dir/adapter)"""
    rank: int = 16
    """LoRA rank r"""
    alpha: float = 32.0
    """LoRA scale numerator (updates are scaled by alpha / rank)"""
    dropout: float = 0.0
    """dropout on the adapters' inputs"""
    target_modules: tuple[str, ...] = ("att_proj", "attn_out", "gate")
    """linear layers to adapt (module-name suffixes); see LoraSpec"""
    total_steps: int = 800
    """optimizer steps"""
    batch_size: int = 512
    """requests per step"""
    lr: float = 2e-3
    """peak AdamW learning rate of the adapters"""
    min_lr_frac: float = 0.05
    """final learning rate as a fraction of the peak"""
    warmup_steps: int = 50
    """linear warmup"""
    decay_frac: float = 0.3
    """the last fraction of total_steps decays the learning rate (warmup-stable-decay)"""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapters"""
    grad_clip: float = 1.0
    """global gradient-norm clip"""
    balance_coef: float = 0.01
    """router load-balancing loss weight (the router's adapter changes routing)"""
    p_full: float = 0.25
    """share of batches at the full configuration"""
    anchor_coef: float = 0.0
    """weight of KL(base || adapted) over the answer tokens of full-configuration batches (the
    base's outputs come from the same model with its adapters disabled): holds full-configuration
    answers where the base put them. 0 = off; the shipped comparison's headline adapter used 4.
    Costs one no-grad forward per full batch"""
    mask_policy: str = "importance"
    """block plans of reduced-depth batches: importance (the base's ranking), prefix, random or mixed"""
    mask_seed: int = 0
    """seed of the random mask policy"""
    family_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.5, 1.0, 1.5, 1.0, 1.5, 1.0)
    """sampling weights in FAMILIES order (as train_micro.py)"""
    seed: int = 1
    """data order and knob draws; differs from the base's training seed (0) so the fine-tuning
    requests are ones the base never saw"""
    device: str = "auto"
    """cuda, cpu or auto"""
    num_workers: int = -1
    """DataLoader workers building batches (-1: CPU count - 2)"""
    max_minutes: float = 0.0
    """stop (after a checkpoint) once this much wall time has passed; 0 = no limit"""
    checkpoint_minutes: float = 3.0
    """checkpoint period"""
    log_every: int = 50
    """steps per log line"""
    track: bool = False
    """log to Weights & Biases (offline unless WANDB_MODE / an API key says otherwise)"""
    wandb_project: str = "flexvlm"
    """W&B project"""

    def __post_init__(self) -> None:
        for name in ("total_steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.p_full <= 1.0:
            raise ValueError(f"--p-full={self.p_full} must be in [0, 1]")
        if not self.anchor_coef >= 0:
            raise ValueError(f"--anchor-coef={self.anchor_coef} must be >= 0")
        if self.mask_policy not in MASK_POLICIES:
            raise ValueError(f"--mask-policy={self.mask_policy!r} is not valid; allowed: {MASK_POLICIES}")
        if len(self.family_weights) != len(FAMILIES):
            raise ValueError(f"--family-weights has {len(self.family_weights)} values; give one per family {tuple(FAMILIES)}")
        self.spec()  # LoraSpec validates rank, alpha, dropout and targets

    def spec(self) -> LoraSpec:
        return LoraSpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=tuple(self.target_modules))


# Resuming must see the same data, knobs and adapter shapes; the rest (e.g. --max-minutes) may change.
FIXED_ON_RESUME = ("base", "batch_size", "seed", "p_full", "mask_policy", "mask_seed", "family_weights", "rank", "target_modules", "anchor_coef")


def main(args: Args) -> None:
    started = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(args.seed)
    # float32 master weights (bf16 autocast on CUDA, as train_micro.py): the plain torch path, since
    # training needs neither CUDA graphs nor the inference kernels.
    vlm = load_model(args.preset, weights=args.base, device=device, dtype="float32", use_cuda_graphs=False, moe_impl="reference")
    if vlm.random_weights:
        raise ValueError(f"--base={args.base!r}: fine-tuning needs trained weights")
    ranking = vlm.block_ranking
    peft_model = add_lora(vlm.module, args.spec())
    module = peft_model.base_model.model  # the MolmoE, with the adapter layers injected
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    # Only the adapters are trained and checkpointed (the base stays as loaded): a ParameterDict of
    # the same tensors, so the training state holds adapter weights and moments only.
    trainable = torch.nn.ParameterDict({n.replace(".", "/"): p for n, p in named})
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.jsonl"
    progress = {"step": 0, "samples": 0, "train_seconds": 0.0,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    state_file = run_dir / "checkpoint" / "state.json"
    if state_file.exists():
        # Checked before loading: a changed rank would otherwise fail as a tensor-shape mismatch.
        saved_args = json.loads(state_file.read_text())["progress"].get("args", {})
        for key in FIXED_ON_RESUME:
            mine = list(getattr(args, key)) if isinstance(getattr(args, key), tuple) else getattr(args, key)
            if key in saved_args and saved_args[key] != mine:
                raise ValueError(f"--{key.replace('_', '-')}={getattr(args, key)!r} differs from the checkpoint's {saved_args[key]!r}; "
                                 "resuming must keep the data and the adapter (use a new --run-dir to change it)")
        saved = load_training_state(run_dir / "checkpoint", trainable, optimizer)
        if not saved.pop("optimizer_restored"):
            raise ValueError(f"{run_dir / 'checkpoint'} holds no optimizer state; start a new --run-dir")
        progress.update(saved)
        truncate_log(log_path, progress["step"])
        print(f"resumed from step {progress['step']}")
    progress["args"] = asdict(args)

    n_blocks = module.args.n_layers
    # --p-full 1 trains at the full configuration only (then no smallest draws either).
    knobs = ElasticKnobs(enabled=True, p_full=args.p_full, p_smallest=min(0.05, 1.0 - args.p_full), n_blocks=n_blocks)
    spec = TrainBatchSpec(batch_size=args.batch_size, seed=args.seed, family_weights=args.family_weights)
    special = vlm.tokenizer.special
    step = progress["step"]
    adapter_params = adapter_parameter_count(peft_model)
    print(f"LoRA r={args.rank} on {list(args.target_modules)}: {adapter_params:,} trainable parameters "
          f"({adapter_params / sum(p.numel() for p in module.parameters()):.2%} of the model)")

    wandb_run = None
    if args.track:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
        run_id = "lora-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]
        wandb_run = wandb.init(project=args.wandb_project, name=run_dir.name, id=run_id, resume="allow",
                               config=asdict(args), dir=str(run_dir))

    if step < args.total_steps:
        workers = max(1, (os.cpu_count() or 2) - 2) if args.num_workers < 0 else args.num_workers
        loader = torch.utils.data.DataLoader(
            TrainStream(spec, knobs, module.args, vlm.tokenizer, start_step=step), batch_size=None, num_workers=workers,
            pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
            worker_init_fn=lambda _: torch.set_num_threads(1),
        )
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        stats = WindowStats(spec.families, device)
        window_start, window_samples, last_checkpoint = time.perf_counter(), 0, time.perf_counter()
        anchor_sum, anchor_batches = torch.zeros((), device=device), 0  # the window's anchor KL (no sync per step)
        module.train()
        for batch in loader:
            assert batch["step"] == step, (batch["step"], step)
            draw = with_mask_policy(knobs.draw(args.seed, step), args.mask_policy, ranking, args.mask_seed)
            lr = wsd_learning_rate(step, args.lr, args.warmup_steps, args.total_steps, args.decay_frac, args.min_lr_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, masks = batch_views(batch, draw.crops, module.args.vision, special, device)
            tensors = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "feature_pos", "feature_rows", "family")}
            inputs = (module, images, masks, tensors["input_ids"], tensors["labels"], tensors["feature_pos"],
                      tensors["feature_rows"], draw.plan, draw.top_k, special.pad)
            with autocast:
                loss, parts = teacher_forced_loss(*inputs, balance_coef=args.balance_coef)
                if args.anchor_coef > 0 and draw.kind == "full":
                    with torch.no_grad(), peft_model.disable_adapter():
                        _, reference = teacher_forced_loss(*inputs, balance_coef=args.balance_coef)
                    anchor = answer_kl(parts["logits"], reference["logits"], tensors["labels"])
                    loss = loss + args.anchor_coef * anchor
                    anchor_sum, anchor_batches = anchor_sum + anchor.detach(), anchor_batches + 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable.parameters(), args.grad_clip)
            optimizer.step()
            step += 1
            window_samples += args.batch_size
            stats.add(draw.kind, parts["ce"], tensors["labels"], tensors["family"], grad_norm, parts["balance"])
            now = time.perf_counter()
            out_of_time = save_now = False
            if step % args.log_every == 0 or step == args.total_steps:
                elapsed = now - window_start
                record = {"step": step, "lr": lr, "samples_per_s": window_samples / elapsed, "elapsed_min": (now - started) / 60}
                record.update(stats.read())
                if anchor_batches:
                    record["anchor_kl/full"] = float(anchor_sum) / anchor_batches
                    anchor_sum, anchor_batches = torch.zeros((), device=device), 0
                append_log(log_path, record)
                if wandb_run is not None:
                    wandb_run.log(record, step=step)
                kl = f" anchor_kl {record['anchor_kl/full']:.4f}" if "anchor_kl/full" in record else ""
                print(f"step {step} ce: {loss_summary(record)}{kl} | {record['samples_per_s']:.0f} samples/s lr {lr:.2e}", flush=True)
                progress["train_seconds"] += elapsed
                window_start, window_samples = time.perf_counter(), 0
                out_of_time = args.max_minutes > 0 and (now - started) / 60 >= args.max_minutes
                save_now = (now - last_checkpoint) / 60 >= args.checkpoint_minutes
            if step == args.total_steps or out_of_time or save_now:
                progress.update(step=step, samples=step * args.batch_size)
                save_training_state(run_dir / "checkpoint", trainable, optimizer, progress)
                last_checkpoint = time.perf_counter()
            if step == args.total_steps or out_of_time:
                break
        if step < args.total_steps:
            print(f"stopped at step {step} of {args.total_steps} (time limit); re-run to resume")
            if wandb_run is not None:
                wandb_run.finish()
            return

    adapter_dir = Path(args.adapter_dir or run_dir / "adapter")
    record = {k: v for k, v in progress.items() if k != "args"}
    metadata = {
        "base_weights_sha256": vlm.weights_sha256, "base": args.base or f"shipped {args.preset}", "preset": args.preset,
        "block_ranking": list(ranking), "spec": asdict(args.spec()), "adapter_parameters": adapter_params,
        "training": {**record, "args": asdict(args)},
    }
    save_adapter(peft_model, adapter_dir, metadata)
    size = sum(p.stat().st_size for p in adapter_dir.iterdir())
    print(f"adapter written to {adapter_dir} ({adapter_params:,} parameters, {size / 2**10:.0f} KiB) after "
          f"{record['samples']:,} requests in {record['train_seconds'] / 60:.1f} min on {record['device']}")
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    main(tyro.cli(Args))
