"""Model parts: vision encoder, adapter, decoder LLM, the assembled VLM, and HF checkpoint loading.

`load_llm(dir)` / `load_vision(dir)` load one component from a local HF directory (parity checks);
`VLMModel` is the assembled model.
"""

from vlmkit.models.config import AdapterConfig, LLMConfig, MoEConfig, VisionConfig, VLMConfig

__all__ = ["AdapterConfig", "LLMConfig", "MoEConfig", "VisionConfig", "VLMConfig", "VLMModel", "load_llm",
           "load_vision"]


def __getattr__(name: str):
    # The torch-backed names are imported on first use (PEP 562), deferring torch: importing any
    # vlmkit.models module runs this file, and the run config (vlmkit.config, which the commands
    # read) imports vlmkit.models.config without torch, so that `vlmkit --help` stays fast.
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
