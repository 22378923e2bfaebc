"""Model parts: vision encoder, adapter, decoder LLM, the assembled VLM, and HF checkpoint loading.

`load_llm(dir)` / `load_vision(dir)` load one component from a local HF directory (parity checks);
`VLMModel` is the assembled model. Imports are lazy so that reading a config does not import torch.
"""

from vlmkit.models.config import AdapterConfig, LLMConfig, MoEConfig, VisionConfig, VLMConfig

__all__ = ["AdapterConfig", "LLMConfig", "MoEConfig", "VisionConfig", "VLMConfig", "VLMModel", "load_llm",
           "load_vision"]


def __getattr__(name):
    if name == "VLMModel":
        from vlmkit.models.vlm import VLMModel

        return VLMModel
    if name == "load_llm":
        from vlmkit.models.hf.llm import load_llm

        return load_llm
    if name == "load_vision":
        from vlmkit.models.hf.vision import load_vision

        return load_vision
    raise AttributeError(f"module 'vlmkit.models' has no attribute {name!r}")
