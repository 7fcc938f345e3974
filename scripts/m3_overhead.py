"""M3: controller overhead (EXPERIMENTS.md M3): decision, features, reconfiguration, candidate scaling, savings.

    python scripts/m3_overhead.py                     # this CPU (~1 min); reads E4's saved controllers
    python scripts/m3_overhead.py --device-run --device cuda --out-dir "$OUT/m3"     # GPU host (~1 min)
    python scripts/m3_overhead.py --device-results PATH/m3_device.json              # merge the GPU run

Controllers timed: the ones E4 saved per latency source (`--controllers-dir`: FlexVLM = MaskablePPO,
LUT, the five baselines) and E5's seed-0 supervised, PPO, MaskablePPO, DPO and GRPO controllers
(trained on the molmoe-1b H100 source; copied from `runs/e5` into `--extra-controllers-dir` so that
they travel to the GPU host). Quick mode builds the LUT and baselines from the profiles instead.

Per controller and latency source the bar's number is (decision median + reconfiguration) / median
latency of the requests it serves (replay held-out half, all budget fractions); reconfiguration =
host-side config application + the switch penalty measured on the GPU when it is resolved above
the noise (95% bootstrap interval excluding 0) and positive; this CPU's switch penalty is reported
but not added (it is relative to CPU request latencies, and contention hides it). Decision and
reconfiguration come from the GPU host when `--device-results` is given, else from this CPU (a
stand-in, flagged in the summary). With a CUDA `--device` the LM controllers (DPO, GRPO) decide on the
GPU (`LMController.use_device`, one Triton kernel a decision); `decision_device` records where each
did (and, on the GPU, the kernel's product precision). Observation features are reported beside it (`share_with_features`).

Writes `--out-dir/m3_summary.json` (everything, headline first) and `figures/m3_*.png`; the GPU run
writes only `--out-dir/m3_device.json`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path


from flexvlm_env.experiments import overhead as m3
from flexvlm_env.experiments.common import parse_script_args, quick_out_dir, run_header, write_json

ROOT = Path(__file__).resolve().parents[1]
E5_METHODS = ("supervised", "ppo", "maskable_ppo", "dpo", "grpo")


@dataclass
class Args:
    quick: bool = False
    """smoke run: LUT and baselines only, few observations and pairs"""
    out_dir: Path = ROOT / "results"
    """where m3_summary.json and figures go (device run: m3_device.json only)"""
    controllers_dir: Path = ROOT / "results/e4_controllers"
    """E4's saved controllers, <dir>/<source>/<method>"""
    extra_controllers_dir: Path = ROOT / "results/m3_controllers"
    """E5's seed-0 controllers (supervised, ppo, maskable_ppo, dpo, grpo), copied here from --e5-runs-dir"""
    e5_runs_dir: Path = ROOT / "runs/e5"
    """E5 run directories to copy the controllers from when --extra-controllers-dir lacks them"""
    n_observations: int = 500
    """held-out observations each controller decides on (batch 1, timed one by one)"""
    n_pairs: int = 30
    """(A, B) config pairs of the switch-penalty measurement"""
    feature_requests_per_family: int = 20
    """procedural val requests per family whose features are timed"""
    device: str = "cpu"
    """torch device of the reconfiguration measurement (cuda on the GPU host)"""
    device_run: bool = False
    """GPU host step: decision, features and reconfiguration times only, to m3_device.json"""
    device_results: Path | None = None
    """a device run's m3_device.json to merge (its decision and reconfiguration times feed the bar)"""
    seed: int = 0
    """seed of observation draws, config pairs and synthetic candidate scores"""

    def validate(self) -> None:
        for name in ("n_observations", "n_pairs", "feature_requests_per_family"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device={self.device!r}; allowed: cpu, cuda, cuda:N")
        if self.device_results is not None and not Path(self.device_results).is_file():
            raise ValueError(f"--device-results={self.device_results} is not a file (a device run's m3_device.json)")
        if self.device_run and self.device_results is not None:
            raise ValueError("--device-run and --device-results are separate steps")


def collect_controllers(args: Args) -> dict[str, dict]:
    """{source: {name: Controller}} (see the module docstring)."""
    from agents.base import load_controller

    out: dict[str, dict] = {}
    for source in m3.SOURCES:
        folder = args.controllers_dir / source
        if not args.quick and not folder.exists():
            # a full run times the trained controllers: without them its bar would cover the LUT and baselines only
            raise SystemExit(f"m3: --controllers-dir={args.controllers_dir} has no {source}/ (E4's saved controllers: "
                             "`python scripts/e4_system_eval.py`); --quick times the LUT and the baselines alone")
        if args.quick:
            from agents.lut import LUTController
            from agents.profiles import ProfileTables
            from baselines import make_baselines

            profiles = ProfileTables.load(latency=source, split="train")
            out[source] = {**make_baselines(profiles), "lut": LUTController.fit(profiles)}
        else:
            out[source] = {p.name: load_controller(p) for p in sorted(folder.iterdir()) if (p / "controller.json").exists()}
    if not args.quick:
        for method in E5_METHODS:
            target = args.extra_controllers_dir / method
            if not (target / "controller.json").exists():
                found = sorted(args.e5_runs_dir.glob(f"FlexVLMReplay-v0__{method}__0__*/controller/controller.json"))
                if not found:
                    raise SystemExit(f"m3: no e5_{method} controller: neither {target} nor a seed-0 run in "
                                     f"--e5-runs-dir={args.e5_runs_dir} (`python scripts/e5_training_strategies.py`)")
                shutil.copytree(found[-1].parent, target, dirs_exist_ok=True)
            try:
                out["molmoe-1b-h100"][f"e5_{method}"] = load_controller(target)
            except ImportError as error:  # e.g. a GPU host without transformers: time the others
                print(f"m3: skipping e5_{method}: {error}")
    return out


def timing_block(args: Args, controllers: dict[str, dict], n_pairs: int) -> dict:
    """Decision, feature and reconfiguration times on this host (the part the GPU run repeats)."""
    decision, where = {}, {}
    for source, by_name in controllers.items():
        where[source] = {}
        for name, controller in by_name.items():
            # LM controllers decide with one GPU kernel when served on a GPU (agents/lm_gpu.py); the
            # others are a few small CPU operations wherever the model runs
            on_gpu = args.device != "cpu" and hasattr(controller, "use_device")
            if on_gpu:
                controller.use_device(args.device)
            # with the kernel's product precision ("cuda (tf32x3)"): it decides the GPU time
            where[source][name] = f"{args.device} ({controller.gpu_decoder.packed.precision})" if on_gpu else "cpu"
        observations = m3.replay_observations(source, args.n_observations, args.seed)
        decision[source] = m3.decision_times(by_name, observations)
    features = m3.feature_times(args.feature_requests_per_family, args.seed)
    reconfiguration = m3.reconfiguration_times(args.device, n_pairs, args.seed)
    return {"decision": decision, "decision_device": where, "features": features, "reconfiguration": reconfiguration}


def main(args: Args) -> dict:
    quick_out_dir(args)
    args.validate()
    import numpy as np
    import torch

    torch.set_num_threads(1)
    if args.quick:
        args.n_observations, args.n_pairs, args.feature_requests_per_family = 40, 2, 2
    controllers = collect_controllers(args)
    if args.device_run:
        block = timing_block(args, controllers, args.n_pairs)
        path = write_json(args.out_dir / "m3_device.json", {"experiment": "M3-device", **block})
        print(f"wrote {path}")
        return block

    here = timing_block(args, controllers, args.n_pairs)
    device = json.loads(Path(args.device_results).read_text()) if args.device_results else None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if device is not None and Path(args.device_results).resolve() != (args.out_dir / "m3_device.json").resolve():
        shutil.copy(args.device_results, args.out_dir / "m3_device.json")
    host_here = f"this CPU ({here['reconfiguration']['device'].get('cpu', 'cpu')})"
    host_gpu = device and f"device run ({device['reconfiguration']['device'].get('device_name', '?')})"

    from flexvlm_env.latency import StageLatencyEstimator
    from flexvlm_env.latency.guardrail import predicted_output_tokens, request_input_tokens
    from flexvlm_env.profiles import load_replay_data
    from flexvlm_env.profiles.replay import request_split_mask

    scaling, saved, overhead = {}, {}, {}
    counts = m3.CANDIDATE_COUNTS
    for source in m3.SOURCES:
        data = load_replay_data(quality="micro", latency=source)
        estimator = StageLatencyEstimator.load(ROOT / m3.ESTIMATORS[source])
        row = int(np.flatnonzero(request_split_mask(data.request_ids, data.families, "heldout"))[0])
        tokens = request_input_tokens(data, "micro" if source.startswith("micro") else "molmoe-1b")[row]
        output = float(np.median(predicted_output_tokens(data)[row]))
        full_ms = float(np.median(data.total_ms[:, data.full_index]))
        scaling[source] = m3.candidate_scaling(estimator, tokens, output, full_ms, counts, 50 if args.quick else 300, args.seed)
        saved[source] = m3.latency_saved(controllers[source], source)
        for label, block, switch in ((host_here, here, False), (host_gpu, device, True)):
            if block is None:
                continue
            # This CPU's switch penalty is relative to CPU request latencies, not the H100 ones
            # the table divides by: only its host-side application cost carries over.
            decision = block["decision"].get(source, {})
            overhead[f"{source} | {label}"] = m3.overhead_table(
                decision, saved[source], m3.reconfiguration_cost_ms(block["reconfiguration"], switch),
                block["features"]["prompt_and_image"]["median"])

    primary = [k for k in overhead if device is None or "device run" in k]
    headline = {k: {"all_within_1pct": all(r["within_bar"] for r in overhead[k].values()),
                    "all_within_1pct_with_features": all(r["within_bar_with_features"] for r in overhead[k].values()),
                    "worst_controller": max(overhead[k], key=lambda n: overhead[k][n]["share_of_median_latency"]),
                    "worst_share": max(r["share_of_median_latency"] for r in overhead[k].values()),
                    "flexvlm_share": overhead[k].get("flexvlm", {}).get("share_of_median_latency")}
                for k in primary}
    summary = {**run_header("m3", args, data_sources={"latency": list(m3.SOURCES), "quality": "micro",
                                                      "decision_hosts": [h for h in (host_here, host_gpu) if h]}),
               "headline": headline, "bar_basis": "device-run timings" if device else "this CPU only (no --device-results)",
               "decision": {host_here: {s: v for s, v in here["decision"].items()},
                            **({host_gpu: device["decision"]} if device else {})},
               "decision_device": {host_here: here["decision_device"],
                                   **({host_gpu: device.get("decision_device", {})} if device else {})},
               "features": {host_here: here["features"], **({host_gpu: device["features"]} if device else {})},
               "reconfiguration": {host_here: here["reconfiguration"], **({host_gpu: device["reconfiguration"]} if device else {})},
               "candidate_scaling": scaling, "latency_saved": saved, "overhead": overhead}
    # decision times are per (host, source): flatten to host | source for the figure
    summary["decision"] = {f"{h} | {s}": v for h, by_s in summary["decision"].items() for s, v in by_s.items()}
    write_json(args.out_dir / "m3_summary.json", summary)
    figures = m3.plot_from_results(args.out_dir)
    for key, h in headline.items():
        print(f"{key}: all <= 1%: {h['all_within_1pct']} (worst {h['worst_controller']} {100 * h['worst_share']:.3f}%), "
              f"with features: {h['all_within_1pct_with_features']}")
    print(f"wrote {args.out_dir / 'm3_summary.json'} and {len(figures)} figures")
    return summary


if __name__ == "__main__":
    main(parse_script_args(Args))
