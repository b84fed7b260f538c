"""Model families a stage worker can serve, keyed by the checkpoint's `architectures[0]`.

Every Llama-shaped family is LlamaStage with a family's few hooks (models/llama.py's docstring);
DeepSeek's MLA + MoE is its own stage.
"""

from stage_worker.models.deepseek import DeepseekStage
from stage_worker.models.gemma2 import Gemma2Stage
from stage_worker.models.llama import LlamaStage
from stage_worker.models.mixtral import MixtralStage
from stage_worker.models.phi3 import Phi3Stage
from stage_worker.models.qwen3 import Qwen3MoeStage, Qwen3Stage

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaStage,
    "MistralForCausalLM": LlamaStage,
    "Qwen2ForCausalLM": LlamaStage,
    "Qwen3ForCausalLM": Qwen3Stage,
    "Qwen3MoeForCausalLM": Qwen3MoeStage,
    "Gemma2ForCausalLM": Gemma2Stage,
    "Phi3ForCausalLM": Phi3Stage,
    "MixtralForCausalLM": MixtralStage,
    "DeepseekV2ForCausalLM": DeepseekStage,
    "DeepseekV3ForCausalLM": DeepseekStage,
}

__all__ = ["MODEL_REGISTRY", "DeepseekStage", "Gemma2Stage", "LlamaStage", "MixtralStage", "Phi3Stage",
           "Qwen3MoeStage", "Qwen3Stage"]
