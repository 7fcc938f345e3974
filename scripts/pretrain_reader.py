"""Teach micro's vision tower to read before the language model needs it to: reading pretraining.

    python scripts/pretrain_reader.py --steps 3000 --max-minutes 3                 # GPU
    python scripts/pretrain_reader.py --steps 4 --batch-size 4 --device cpu       # smoke run
    python scripts/train_micro.py --init-from runs/reader/micro_reader.safetensors --crop-px 224 ...

micro's ViT is trained from scratch, unlike every real VLM's (MolmoE starts from CLIP), and the
answer loss alone never made it read: after 7 000 mixed steps, and 2 300 more at 224 px crops with a
clean transcription task as 37% of full-configuration batches, the first answer token of a
transcription is exactly as likely as the prompt's prior says (`scripts/reading_check.py`). The
chicken-and-egg of end-to-end training: the language model does not look for letters the ViT does
not encode, so no gradient asks the ViT to encode them. This script breaks it the way the reading
probe showed works (`scripts/reading_probe.py`, which reads through micro's own pooling too with
`--read-from pooled`): micro's ViT, padding embeddings and 2x2 attention pooling, started from
`--init-from` (the shipped weights, crop size changed if asked) or afresh (`--fresh-vision`), see
one crop holding the transcribe task's kind of text (a scene word, letters or a code) with capitals
`--heights-px` tall, and a `ReadingHead` (one query per character position over the crop's pooled
cells, which carry a learned cell embedding) names its characters in order. A first version read
whole 13-view requests with no embedding of where a cell lies across views, so its queries could
not order the characters: it stayed at 6% of characters after 287 k requests on an H200
(results/device/pretrain_reader_multiview_h200_log.jsonl). Everything else in the checkpoint is carried over
untouched; the result is a whole micro checkpoint (`--out`, FlexVLM safetensors) for
`train_micro.py --init-from`, whose projector and language model then learn to use the new features.

Resumable: `--run-dir` holds the training state (safetensors + JSON), written every
`--checkpoint-minutes` and at `--max-minutes`; rerunning the same command continues, and the data
stream is a pure function of (seed, step). `log.jsonl` gets a line every `--log-every` steps.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro
from torch import nn

from flexvlm_env.model.checkpoint import save_flexvlm
from flexvlm_env.model.molmoe import MolmoE
from flexvlm_env.model.preprocess import normalise, to_patches
from flexvlm_env.model.runtime import assets_dir
from flexvlm_env.training import init_for_training_, load_across_crop_size_, load_training_state, micro_args, save_training_state
from flexvlm_env.training.loop import append_log, truncate_log
from flexvlm_env.training.parallel import resolve_device
from flexvlm_env.training.reading import END, ReadingCropStream, ReadingHead


@dataclass
class Args:
    run_dir: str = "runs/reader"
    """training state and log.jsonl (resumed from if it holds a checkpoint)"""
    out: str = "runs/reader/micro_reader.safetensors"
    """the whole micro checkpoint with the pretrained vision tower, written at the end"""
    init_from: str = str(assets_dir("micro") / "model.safetensors")
    """micro weights to start from (another crop size is resampled, as in train_micro.py)"""
    crop_px: int = 224
    """micro's crop size for this run (a multiple of 28)"""
    fresh_vision: bool = False
    """re-initialise the vision tower (as training from scratch does) instead of keeping
    --init-from's: through micro's pooling a random tower learns the reading probe's letters far
    faster than the shipped one (59.6% against 12.1% after 192 k crops at 28 px on this project's
    CPU; results/reading_probe_pooled.json, results/reading_probe_pooled_shipped.json)"""
    heights_px: tuple[int, int] = (12, 48)
    """range of the capitals' height (px, inclusive) in the crop; micro's reading families put
    text 19-35 px tall (median) in 224 px crops at 12 crops"""
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    seed: int = 0
    device: str = "auto"
    num_workers: int = -1
    """DataLoader workers (-1: CPU count - 2)"""
    max_minutes: float = 0.0
    """stop (after a checkpoint) once this much wall time has passed; 0 = no limit"""
    checkpoint_minutes: float = 2.0
    log_every: int = 50

    def __post_init__(self) -> None:
        micro_args(self.crop_px)  # a bad crop size fails here, naming --crop-px
        if not 6 <= self.heights_px[0] <= self.heights_px[1] <= self.crop_px // 2:
            raise ValueError(f"--heights-px {self.heights_px} is not valid; allowed: 6 <= low <= high <= {self.crop_px // 2} "
                             f"(half the {self.crop_px} px crop)")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"--lr={self.lr} must be > 0")


VISION_TOWER = ("model.vision_backbone.image_vit.", "model.vision_backbone.pad_embed", "model.vision_backbone.image_pooling_2d.")


def reading_loss(module: MolmoE, head: ReadingHead, batch: dict, device) -> tuple:
    """(loss, character accuracy, whole-answer accuracy) of one batch of crops."""
    vision_args = module.args.vision
    pixels = batch["pixels"].to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    patches = to_patches(normalise(pixels, vision_args), vision_args)
    masks = torch.ones(patches.shape[:2], device=device)  # every patch is image
    pooled = module.vision_backbone.encode(patches, masks)  # [crops, cells, W]
    targets = batch["targets"].to(device, non_blocking=True)
    logits = head(pooled).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    predicted = logits.argmax(-1)
    char_accuracy = (predicted == targets)[targets != END].float().mean()
    word_accuracy = (predicted == targets).all(dim=1).float().mean()
    return loss, char_accuracy, word_accuracy


def main(args: Args) -> None:
    started = time.perf_counter()
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model_args = micro_args(args.crop_px)
    module = MolmoE(model_args)
    load_across_crop_size_(module, args.init_from)
    if args.fresh_vision:
        fresh = dict(init_for_training_(MolmoE(model_args), args.seed).named_parameters())
        with torch.no_grad():
            for name, param in module.named_parameters():
                if name.startswith(VISION_TOWER):
                    param.copy_(fresh[name])
    module.float().to(device)
    head = ReadingHead(model_args.vision.width, model_args.vision.pooled_per_side ** 2).to(device)
    both = nn.ModuleDict({"model": module, "head": head})
    vision = module.vision_backbone
    trained = [*vision.image_vit.parameters(), vision.pad_embed, *vision.image_pooling_2d.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.jsonl"
    progress = {"step": 0, "args": asdict(args)}
    if (run_dir / "checkpoint" / "state.json").exists():
        saved = load_training_state(run_dir / "checkpoint", both, optimizer)
        saved.pop("optimizer_restored", None)
        progress.update(saved, args=asdict(args))
        truncate_log(log_path, progress["step"])
        print(f"resumed from step {progress['step']}")
    step = progress["step"]
    if step < args.steps:
        workers = max(1, (torch.multiprocessing.cpu_count() - 2)) if args.num_workers < 0 else args.num_workers
        stream = ReadingCropStream(args.batch_size, args.seed, args.crop_px, tuple(args.heights_px), start_step=step)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None,
            num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
            worker_init_fn=lambda _: torch.set_num_threads(1),
        )
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        window, window_start, last_checkpoint = [], time.perf_counter(), time.perf_counter()
        module.train()
        for batch in loader:
            assert batch["step"] == step, (batch["step"], step)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
            with autocast:
                loss, char_accuracy, word_accuracy = reading_loss(module, head, batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            step += 1
            window.append(torch.stack([loss.detach(), char_accuracy, word_accuracy]))
            now = time.perf_counter()
            out_of_time = args.max_minutes > 0 and (now - started) / 60 >= args.max_minutes
            if step % args.log_every == 0 or step == args.steps or out_of_time:
                means = torch.stack(window).mean(0).tolist()
                record = {"step": step, "loss": means[0], "character_accuracy": means[1], "answer_accuracy": means[2],
                          "samples_per_s": len(window) * args.batch_size / (now - window_start), "elapsed_min": (now - started) / 60}
                append_log(log_path, record)
                print(f"step {step} loss {means[0]:.3f} characters {means[1]:.3f} answers {means[2]:.3f} "
                      f"| {record['samples_per_s']:.0f} samples/s", flush=True)
                window, window_start = [], time.perf_counter()
            if step == args.steps or out_of_time or (now - last_checkpoint) / 60 >= args.checkpoint_minutes:
                progress["step"] = step
                save_training_state(run_dir / "checkpoint", both, optimizer, progress)
                last_checkpoint = time.perf_counter()
            if step == args.steps or out_of_time:
                break
        if step < args.steps:
            print(f"stopped at step {step} of {args.steps} (time limit); re-run to resume")
            return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    sha = save_flexvlm(module.to(torch.bfloat16).cpu(), out, {
        "vision_pretraining": json.dumps({"task": "reading crops", "steps": step, "batch_size": args.batch_size,
                                          "heights_px": list(args.heights_px), "fresh_vision": args.fresh_vision,
                                          "final": log[-1] if log else None}),
    })
    print(f"wrote {out} (sha256 {sha[:16]}): micro with the reading-pretrained vision tower")


if __name__ == "__main__":
    main(tyro.cli(Args))
