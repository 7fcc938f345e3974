"""Summarize session 30's device runs (GRPO from a DPO controller) into dpo_then_grpo_summary.json.

    python results/device/session30/summarize.py   # reads the call archives here and session 29's call 1

Per setting and seed: final held-out reward, retention, violation rate, retention at fraction 1.0, env steps in
all (the DPO stage's included) and wall-clock; per setting the means; and GRPO-from-DPO paired with GRPO alone
and with its own DPO start at each seed."""
import json, tarfile, tempfile
from pathlib import Path

HERE = Path(__file__).parent
SETTINGS = {  # name: (archive directory prefix, what it is, env steps of the stage before it)
    "dpo_25200": ("dpo25", "DPO, E5's settings, 25,200 env steps", 0),
    "dpo_126000": ("dpo126", "DPO, E5's settings and length (126,000 env steps)", 0),
    "grpo_126000": ("grpo126", "GRPO from a fresh model, E5's settings and length (seeds 0-2: session 29 call 1)", 0),
    "dpo_25200_then_grpo_lr1e-3": ("g_dpo25", "GRPO (defaults, learning rate 1e-3) for 100,800 env steps from dpo_25200", 25200),
    "dpo_25200_then_grpo_lr2.5e-4": ("g_dpo25_lr", "GRPO at learning rate 2.5e-4 for 100,800 env steps from dpo_25200", 25200),
    "dpo_25200_then_grpo_lr1e-4": ("g_dpo25_lr1e-4", "GRPO at learning rate 1e-4 for 100,800 env steps from dpo_25200", 25200),
    "dpo_126000_then_grpo_lr1e-3": ("g_dpo126", "GRPO (defaults) for 126,000 env steps from dpo_126000", 126000),
}


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = [unpack(HERE / "call3_runs.tar.xz", tmp / "c3"), unpack(HERE / "call2_runs.tar.xz", tmp / "c2"),
                unpack(HERE.parent / "session29" / "call1_runs.tar.xz", tmp / "s29")]
        out = {"machine": "lent 1 x NVIDIA H200 machine's CPU (16-core Intel Xeon; the GPU unused), one thread per run; "
                          "torch 2.11.0+cu130, transformers 5.24.0, trl 1.16.0",
               "eval": "held-out half of the recorded val pool (900 requests) x budget fractions 0.35/0.5/0.7/0.85/1.0",
               "settings": {}}
        for name, (prefix, what, before) in SETTINGS.items():
            seeds = {}
            for seed in range(8):
                run = next((d / f"{prefix}_s{seed}" for d in dirs if (d / f"{prefix}_s{seed}" / "final.json").exists()), None)
                if run is None and prefix == "grpo126":
                    run = next((d / f"long_default_s{seed}" for d in dirs if (d / f"long_default_s{seed}" / "final.json").exists()), None)
                if run is None:
                    continue
                final = json.loads((run / "final.json").read_text())
                (r,) = final["results"].values()
                choices = run / "knob_choices.json"
                if not choices.exists():  # call 3's archive re-packed earlier runs without their knob choices
                    choices = next((d / run.name / "knob_choices.json" for d in dirs if (d / run.name / "knob_choices.json").exists()), choices)
                record = {"reward": r["mean"]["reward"], "quality_retention": r["mean"]["quality_retention"],
                          "violation_rate": r["mean"]["violation_rate"],
                          "retention_at_1.0": r["by_fraction"]["1"]["quality_retention"],
                          "env_steps_in_all": before + final["env_steps"], "wall_clock_s": final["wall_clock_s"]}
                if choices.exists():
                    (c,) = json.loads(choices.read_text())["controllers"].values()
                    record["share_9_or_12_crops_at_1.0"] = c["1"]["crops"]["9"] + c["1"]["crops"]["12"]
                seeds[seed] = record
            mean = {k: sum(s[k] for s in seeds.values()) / len(seeds) for k in ("reward", "quality_retention", "violation_rate", "retention_at_1.0")}
            out["settings"][name] = {"what": what, "seeds": seeds, "mean": mean}
        best, alone, start = (out["settings"][k]["seeds"] for k in ("dpo_25200_then_grpo_lr2.5e-4", "grpo_126000", "dpo_25200"))
        for label, other in (("vs_grpo_alone", alone), ("vs_its_dpo_start", start)):
            common = sorted(set(best) & set(other))
            diffs = [best[s]["reward"] - other[s]["reward"] for s in common]
            out[f"dpo_25200_then_grpo_lr2.5e-4_{label}"] = {"seeds": common, "mean_reward_diff": sum(diffs) / len(diffs),
                                                             "better": sum(d > 0 for d in diffs)}
    (HERE / "dpo_then_grpo_summary.json").write_text(json.dumps(out, indent=1))
    for name, setting in out["settings"].items():
        m = setting["mean"]
        print(f"{name:30s} seeds {sorted(setting['seeds'])}: reward {m['reward']:.4f} retention {m['quality_retention']:.4f} "
              f"violations {m['violation_rate']:.4f} retention@1.0 {m['retention_at_1.0']:.3f}")
    for key in ("dpo_25200_then_grpo_lr2.5e-4_vs_grpo_alone", "dpo_25200_then_grpo_lr2.5e-4_vs_its_dpo_start"):
        print(key, out[key])


if __name__ == "__main__":
    main()
