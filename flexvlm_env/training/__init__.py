"""Training a FlexVLM model: knob-robust ("elastic") sampling, the batched data stream, the
teacher-forced loss with a dense MoE, and resumable training state.

`scripts/train_micro.py` drives these pieces (schedule and log: `loop`); the LoRA fine-tuning
(`scripts/finetune_lora.py`) of larger checkpoints reuses the
knob sampler and the loss, with the adapters of `lora` (peft). `geometry` starts a model at
another crop size from trained weights (the ViT position table resampled).
"""
from .data import TrainBatchSpec, TrainStream, batch_views, build_batch, training_target
from .geometry import load_across_crop_size_, micro_args, resample_positions
from .forward import answer_kl, init_for_training_, moe_dense, teacher_forced_loss
from .knobs import MASK_POLICIES, ElasticKnobs, KnobDraw, with_mask_policy
from .loop import WindowStats, append_log, loss_summary, truncate_log, wsd_learning_rate
from .lora import LoraSpec, adapter_parameter_count, add_lora, apply_adapter, read_adapter_metadata, save_adapter
from .state import load_training_state, save_training_state

__all__ = [
    "MASK_POLICIES", "ElasticKnobs", "answer_kl", "KnobDraw", "LoraSpec", "WindowStats", "append_log", "loss_summary", "truncate_log", "with_mask_policy", "wsd_learning_rate", "TrainBatchSpec", "TrainStream", "adapter_parameter_count", "add_lora", "apply_adapter",
    "batch_views", "build_batch", "init_for_training_", "load_across_crop_size_", "micro_args", "load_training_state", "moe_dense", "read_adapter_metadata", "resample_positions", "save_adapter",
    "save_training_state", "teacher_forced_loss", "training_target",
]
