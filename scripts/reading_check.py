"""Does a micro checkpoint read? Its answers with the real image against another image of the batch.

    python scripts/reading_check.py --weights runs/micro/checkpoint          # a training state
    python scripts/reading_check.py                                          # the shipped weights

A model that reads puts a low loss on the first answer token (the word's start, which nothing in the
prompt gives away) when it sees the request's own image, and a high one when it sees another
request's image of the same size. A model that answers from the prompt's prior scores both alike.
For each family this teacher-forces `--requests` unseen train-split requests at the full
configuration (or `--crops`) and reports, for the real and the swapped images, the first answer
token's cross-entropy and top-1 accuracy, the mean over all answer tokens, and the whole answer's
negative log-likelihood (the first token is sometimes a fixed prefix: a space before spelled digits). The swap rolls the
images inside each same-size group of the batch (requests alone in their size keep their image and
are left out of both columns). Writes a JSON with the device, versions and sizes.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from flexvlm_env.model.args import ModelArgs
from flexvlm_env.model.checkpoint import load_weights_, read_metadata
from flexvlm_env.model.molmoe import MolmoE
from flexvlm_env.model.preprocess import IGNORE_INDEX
from flexvlm_env.model.runtime import assets_dir
from flexvlm_env.model.tokenizer import TextTokenizer
from flexvlm_env.tasks import FAMILIES
from flexvlm_env.training import load_training_state, micro_args
from flexvlm_env.training.data import TrainBatchSpec, batch_views, build_batch
from flexvlm_env.training.forward import teacher_forced_loss
from flexvlm_env.training.knobs import ElasticKnobs
from flexvlm_env.training.reading import TRAINING_ONLY_FAMILIES, TRANSCRIBE

UNSEEN_STEP = 10**6  # batch index far beyond any training run's: requests no run has trained on


@dataclass
class Args:
    weights: str | None = None
    """a FlexVLM .safetensors file or a train_micro.py training-state directory (default: shipped micro)"""
    families: tuple[str, ...] = ("doc_qa", "text_vqa", "st_qa", TRANSCRIBE, "coco_2014_vqa", "tally_qa")
    """families to check (the nine, or the training-only transcribe task)"""
    requests: int = 96
    """requests per family"""
    crops: int = 12
    top_k: int = 8
    device: str = "cpu"
    out: Path = Path("results/reading_check.json")

    def __post_init__(self) -> None:
        allowed = tuple(FAMILIES) + TRAINING_ONLY_FAMILIES
        for family in self.families:
            if family not in allowed:
                raise ValueError(f"--families {family!r} is not valid; allowed: {allowed}")
        if self.requests < 2:
            raise ValueError(f"--requests={self.requests} must be >= 2 (the swap needs two images of a size)")


def load(weights: str | None) -> tuple[MolmoE, str]:
    """The model of a .safetensors file or a training-state directory, with its own geometry."""
    path = Path(weights) if weights else assets_dir("micro") / "model.safetensors"
    if path.is_dir():
        state = json.loads((path / "state.json").read_text())["progress"]
        model = MolmoE(micro_args(state.get("args", {}).get("crop_px", 112)))  # runs before --crop-px: 112
        load_training_state(path, model, None)
        return model, f"training state at step {state['step']}"
    model = MolmoE(ModelArgs.from_dict(json.loads(read_metadata(path)["args"])))
    load_weights_(model, path)
    return model, str(path)


def swapped(batch: dict) -> tuple[dict, np.ndarray]:
    """`batch` with images rolled inside each same-size group; and which slots got another image."""
    moved = np.zeros(len(batch["input_ids"]), dtype=bool)
    groups = []
    for pixels, slots in batch["groups"]:
        if len(slots) > 1:
            pixels = pixels.roll(1, dims=0)
            moved[slots.numpy()] = True
        groups.append((pixels, slots))
    return {**batch, "groups": groups}, moved


@torch.no_grad()
def check_family(model: MolmoE, tokenizer: TextTokenizer, family: str, args: Args, device) -> dict:
    spec = TrainBatchSpec(batch_size=args.requests, seed=0, families=(family,))
    # Disabled knobs draw their "full" configuration: here (args.crops, args.top_k, every block).
    knobs = ElasticKnobs(enabled=False, crops_choices=(args.crops,), top_k_choices=(args.top_k,), n_blocks=model.args.n_layers)
    batch = build_batch(UNSEEN_STEP, spec, knobs, model.args, tokenizer)
    labels = batch["labels"].to(device)
    target = labels != IGNORE_INDEX
    first = target & (target.cumsum(dim=1) == 1)  # the first answer token of each request
    plan = tuple(range(model.args.n_layers))
    columns = {}
    swap, moved = swapped(batch)
    keep = torch.from_numpy(moved).to(device)
    for name, b in (("own_image", batch), ("other_image", swap)):
        images, masks = batch_views(b, args.crops, model.args.vision, tokenizer.special, device)
        tensors = [b[k].to(device) for k in ("input_ids", "labels", "feature_pos", "feature_rows")]
        _, parts = teacher_forced_loss(model, images, masks, *tensors, plan, args.top_k, tokenizer.special.pad)
        ce, logits = parts["ce"], parts["logits"]
        first_rows = first & keep[:, None]
        correct = (logits.argmax(-1) == labels) & first_rows
        columns[name] = {
            "first_token_ce": float(ce[first_rows].mean()),
            "first_token_accuracy": float(correct.sum() / first_rows.sum()),
            "answer_ce": float(ce[target & keep[:, None]].mean()),
            # The whole answer's negative log-likelihood (nats): where the first token is a fixed
            # prefix (a space before spelled digits, a format), the image shows up later.
            "answer_nll": float((ce * target).sum(dim=1)[keep].mean()),
        }
    own, other = columns["own_image"], columns["other_image"]
    return {"family": family, "requests": int(moved.sum()), **columns,
            "first_token_ce_gain": other["first_token_ce"] - own["first_token_ce"],
            "answer_nll_gain": other["answer_nll"] - own["answer_nll"]}


def main(args: Args) -> dict:
    started = time.perf_counter()
    device = torch.device(args.device)
    model, source = load(args.weights)
    model = model.float().eval().to(device)
    tokenizer = TextTokenizer.from_file(assets_dir("micro"))
    rows = []
    for family in args.families:
        rows.append(check_family(model, tokenizer, family, args, device))
        r = rows[-1]
        print(f"{family:15s} first-token CE own {r['own_image']['first_token_ce']:.2f} vs other {r['other_image']['first_token_ce']:.2f} "
              f"(accuracy {r['own_image']['first_token_accuracy']:.2f} vs {r['other_image']['first_token_accuracy']:.2f}); "
              f"answer NLL {r['own_image']['answer_nll']:.2f} vs {r['other_image']['answer_nll']:.2f}; {r['requests']} requests", flush=True)
    result = {"weights": source, "crop_px": model.args.vision.crop_px, "config": {"crops": args.crops, "top_k": args.top_k,
              "active_blocks": model.args.n_layers}, "families": rows, "args": {k: str(v) for k, v in asdict(args).items()},
              "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "wall_s": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
