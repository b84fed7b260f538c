"""Model families a stage worker can serve, keyed by the checkpoint's `architectures[0]`."""

from stage_worker.models.deepseek import DeepseekStage
from stage_worker.models.llama import LlamaStage

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaStage,
    "MistralForCausalLM": LlamaStage,
    "Qwen2ForCausalLM": LlamaStage,
    "DeepseekV2ForCausalLM": DeepseekStage,
    "DeepseekV3ForCausalLM": DeepseekStage,
}

__all__ = ["MODEL_REGISTRY", "DeepseekStage", "LlamaStage"]
