"""Training a FlexVLM model: knob-robust ("elastic") sampling, the batched data stream, the
teacher-forced loss with a dense MoE, and resumable training state.

`scripts/train_micro.py` drives these pieces; the LoRA fine-tuning of larger checkpoints reuses the
knob sampler and the loss.
"""
from .data import TrainBatchSpec, TrainStream, batch_views, build_batch, training_target
from .forward import init_for_training_, moe_dense, teacher_forced_loss
from .knobs import ElasticKnobs, KnobDraw
from .state import load_training_state, save_training_state

__all__ = [
    "ElasticKnobs", "KnobDraw", "TrainBatchSpec", "TrainStream", "batch_views", "build_batch", "init_for_training_", "load_training_state",
    "moe_dense", "save_training_state", "teacher_forced_loss", "training_target",
]
