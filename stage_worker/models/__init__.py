"""Model families a stage worker can serve, keyed by the checkpoint's `architectures[0]`."""

from stage_worker.models.llama import LlamaStage

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaStage,
    "MistralForCausalLM": LlamaStage,
    "Qwen2ForCausalLM": LlamaStage,
}

__all__ = ["MODEL_REGISTRY", "LlamaStage"]
