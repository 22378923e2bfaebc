"""`vlmkit.VLM`: the model with its tokenizer, and the ways to make, save and load one.

    VLM(config)                                  a fresh model (weights initialised for training)
    VLM.from_pretrained(dir, adapter=None)       a vlmkit checkpoint directory (a LoRA adapter merged in)
    VLM.load(dir)                                a vlmkit checkpoint or a whole transformers VLM directory
    VLM.from_hf(vision=dir, llm=dir, adapter=)   a HF SigLIP / CLIP tower + a HF decoder, new adapter
    VLM.from_hf(dir)                             a whole HF Qwen2-VL / Qwen2.5-VL / Qwen3-VL / InternVL /
                                                 Idefics3 / SmolVLM / LLaVA-OneVision / DeepSeek-VL (hybrid)
                                                 directory
    VLM.from_hf_llava(dir)                       a llava-hf LlavaForConditionalGeneration directory
    model.save_pretrained(dir, meta=None)        the checkpoint directory (docs/architecture.md)
    model.export_hf(dir)                         a transformers directory (Qwen-VL family, InternVL, Idefics3 /
                                                 SmolVLM, DeepSeek-VL (hybrid) or llava-hf)
    model.generate(messages, ...)                chat generation (infer/generate.py)

Checkpoint directory: config.json (VLMConfig.to_dict, every field written), model.safetensors,
the tokenizer's files when the model has a tokenizer, vlmkit.json (vlmkit version and whatever
`meta` the caller passes: stage history, data fingerprint), and for native-resolution models
processor.json (how images and videos are sized and normalised). Weights are written and read by
models/weights.py: every tensor once, and a strict load that reports every problem before copying.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmkit import __version__
from vlmkit.constants import CONFIG_FILE, META_FILE, WEIGHTS_FILE
from vlmkit.data.anyres import AnyResImageProcessor
from vlmkit.data.images import ImageProcessor
from vlmkit.data.native_images import (FAMILIES, IMAGE_CONFIG_FILE, NativeImageProcessor, NativeProcessorConfig,
                                       processor_config_from_dir)
from vlmkit.data.padded_images import PaddedImageProcessor, Resolution
from vlmkit.data.split_images import SplitImageProcessor
from vlmkit.data.tokenizer import TOKENIZER_FILE, Tokenizer
from vlmkit.data.types import PackedBatch
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.infer.generate import generate_messages
from vlmkit.models.adapter import build_adapter
from vlmkit.models.config import AdapterConfig, VLMConfig
from vlmkit.models.hf.aimv2 import AIMV2_MODEL_TYPES, load_aimv2_vision
from vlmkit.models.hf.common import architecture, read_config
from vlmkit.models.hf.deepseek_vl import ARCHITECTURE_NAMES as DEEPSEEK_VL_ARCHITECTURES
from vlmkit.models.hf.deepseek_vl import deepseek_vl_family, export_hf_deepseek_vl, load_deepseek_vl
from vlmkit.models.hf.idefics3 import ARCHITECTURE_NAMES as IDEFICS3_ARCHITECTURES
from vlmkit.models.hf.idefics3 import export_hf_idefics3, idefics3_family, load_idefics3
from vlmkit.models.hf.internvl import ARCHITECTURE as INTERNVL_ARCHITECTURE
from vlmkit.models.hf.internvl import export_hf_internvl, is_internvl, load_internvl
from vlmkit.models.hf.llava import export_hf_llava, load_llava
from vlmkit.models.hf.onevision import ARCHITECTURE as ONEVISION_ARCHITECTURE
from vlmkit.models.hf.onevision import export_hf_onevision, is_onevision, load_onevision
from vlmkit.models.hf.llm import load_llm
from vlmkit.models.hf.qwen_vl import ARCHITECTURE_NAMES as QWEN_VL_ARCHITECTURES
from vlmkit.models.hf.qwen_vl import assemble_native, export_hf_qwen_vl, load_qwen_vl, qwen_vl_family
from vlmkit.models.hf.vision import load_vision
from vlmkit.models.lora import load_adapter, merge_and_unload
from vlmkit.models.mrope import packed_rope_positions
from vlmkit.models.vlm import LossOutput, VLMModel
from vlmkit.models.weights import load_state, state_to_save
from vlmkit.schema import build

PROCESSOR_FILE = "processor.json"
"""A native-resolution model's NativeProcessorConfig in its checkpoint directory."""
WHOLE_VLM_ARCHITECTURES = sorted([*QWEN_VL_ARCHITECTURES.values(), INTERNVL_ARCHITECTURE, ONEVISION_ARCHITECTURE,
                                  *IDEFICS3_ARCHITECTURES.values(), *DEEPSEEK_VL_ARCHITECTURES.values()])
"""The transformers VLMs `VLM.from_hf(dir)` loads whole."""


class VLM(VLMModel):
    """VLMModel plus `.tokenizer` (vlmkit.data.tokenizer.Tokenizer, or None)."""

    def __init__(self, cfg: VLMConfig, tokenizer=None):
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self.processor_config: NativeProcessorConfig | None = None
        """Native-resolution models: how images and videos are prepared (None: the family's
        published settings, data/native_images.py's FAMILIES)."""

    # --- vlmkit checkpoints ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, adapter: str | Path | None = None) -> "VLM":
        """Load a checkpoint directory written by `save_pretrained` (eval mode, stored dtype).
        `adapter`: a LoRA adapter directory (peft's format, models/lora.py) folded into the weights:
        the model is then the plain merged model, as a LoRA stage's DIR/final is."""
        path = Path(path)
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise CheckpointError(f"{path}: no {CONFIG_FILE}; not a vlmkit checkpoint directory "
                                  "(for HF directories use VLM.from_hf or VLM.from_hf_llava)")
        try:
            cfg = VLMConfig.from_dict(json.loads(config_file.read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
        except ConfigError as e:
            raise CheckpointError(f"{config_file}: {e}") from None
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{path}: no {WEIGHTS_FILE}")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights}: cannot read safetensors ({e})") from None
        model = cls.empty(cfg)
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        if floats:
            model.to(floats[0])
        load_state(model, state, str(weights))
        model.tokenizer = _load_tokenizer(path)
        model.processor_config = _load_processor_config(path)
        return _with_adapter(model, adapter).eval()

    @classmethod
    def load(cls, path: str | Path, adapter: str | Path | None = None) -> "VLM":
        """Whatever model directory `path` is: a vlmkit checkpoint (it has vlmkit.json), else a
        whole transformers VLM directory (llava-hf, InternVL or a Qwen-VL family), by its architecture.
        What the commands (chat, serve, eval, export) load `--model` with; `adapter` as in
        `from_pretrained`."""
        path = Path(path)
        if (path / META_FILE).is_file() or not (path / CONFIG_FILE).is_file():
            return cls.from_pretrained(path, adapter)
        try:
            architectures = json.loads((path / CONFIG_FILE).read_text()).get("architectures") or []
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{path / CONFIG_FILE}: not a JSON object ({e})") from None
        if "LlavaForConditionalGeneration" in architectures:
            return _with_adapter(cls.from_hf_llava(path), adapter)
        return _with_adapter(cls.from_hf(path), adapter)

    def save_pretrained(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint directory; `meta` (JSON-able) goes into vlmkit.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file(state_to_save(self), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save(path)
        if self.config.is_native:
            settings = dataclasses.asdict(self.native_processor_config())
            (path / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        info = {"version": __version__, **(meta or {})}
        (path / META_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        return path

    # --- HF imports -------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, path: str | Path | None = None, *, vision: str | Path | None = None,
                llm: str | Path | None = None, adapter: str | dict | AdapterConfig = "mlp",
                feature_layer: int = -2) -> "VLM":
        """A VLM from HF checkpoints: one whole VLM directory (`path`), or a vision tower and a
        decoder assembled with a new adapter (`vision=`, `llm=`).

        path: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory (models/hf/qwen_vl.py), an InternVL one
        (models/hf/internvl.py), an Idefics3 / SmolVLM one (models/hf/idefics3.py), a LLaVA-OneVision one
        (models/hf/onevision.py) or a DeepSeek-VL /
        DeepSeek-VL hybrid one (models/hf/deepseek_vl.py), every weight
        loaded, its tokenizer attached when it has one.
        vision, llm: a HF SigLIP / CLIP / AIMv2 tower (AIMv2 + a Qwen3 decoder: SAIL-VL2's shape)
        and a HF decoder; only the adapter is initialised.
        A whole Qwen-VL directory as `vision` gives a native-resolution VLM of its tower and the
        decoder (models/hf/qwen_vl.py, `assemble_native`; `adapter` and `feature_layer` unused: the
        tower's mergers adapt, kept when they map to the decoder's width, else new).
        feature_layer: the vision hidden state the adapter reads (LLaVA reads the second to last).
        The LLM directory's tokenizer is attached when it has one; when its vocabulary has no image
        token, one is added (and the embeddings grow by a row). Without a tokenizer the image
        token is a new last row of the vocabulary.
        """
        if (path is None) == (vision is None and llm is None):
            raise ValueError("VLM.from_hf takes either a whole VLM directory or vision= and llm=")
        if path is not None:
            path = Path(path)
            hf_config = read_config(path)
            if is_internvl(hf_config, str(path)):
                model = load_internvl(path, model_cls=cls)  # its tiling is in its VLMConfig
            elif idefics3_family(hf_config, str(path)) is not None:
                model = load_idefics3(path, model_cls=cls)  # its splitting too
            elif is_onevision(hf_config, str(path)):
                model = load_onevision(path, model_cls=cls)  # its any-resolution tiling too
            elif deepseek_vl_family(hf_config, str(path)) is not None:
                model = load_deepseek_vl(path, model_cls=cls)  # its padding too
            elif qwen_vl_family(hf_config, str(path)) is None:
                raise CheckpointError(f"{path}/config.json: architecture {architecture(hf_config, path)!r} is not a "
                                      f"VLM vlmkit loads whole: {WHOLE_VLM_ARCHITECTURES} (llava-hf directories: "
                                      "VLM.from_hf_llava or VLM.load)")
            else:
                model = load_qwen_vl(path, model_cls=cls)
                if (path / IMAGE_CONFIG_FILE).is_file():
                    model.processor_config = processor_config_from_dir(path)
            model.tokenizer = _load_tokenizer(path)
            return model
        if vision is None or llm is None:
            raise ValueError("VLM.from_hf(vision=..., llm=...) needs both directories")
        if qwen_vl_family(read_config(Path(vision)), str(vision)) is not None:  # a native tower: its mergers adapt
            model = assemble_native(vision, load_llm(llm), model_cls=cls)
            model.tokenizer = _load_tokenizer(Path(llm))
            return model
        if read_config(Path(vision)).get("model_type") in AIMV2_MODEL_TYPES:
            encoder = load_aimv2_vision(vision, feature_layer=feature_layer)
        else:
            encoder = load_vision(vision, feature_layer=feature_layer)
        decoder = load_llm(llm)
        tokenizer = _load_tokenizer(Path(llm))
        image_token_id = getattr(tokenizer, "image_token_id", None) if tokenizer is not None else None
        if image_token_id is None:
            image_token_id = _add_image_token(tokenizer, decoder.config.vocab_size)
        if image_token_id >= decoder.config.vocab_size:
            grow_vocab(decoder, image_token_id + 1)
        if isinstance(adapter, str):
            adapter = AdapterConfig(kind=adapter)
        cfg = VLMConfig(vision=encoder.config, adapter=adapter, llm=decoder.config, image_token_id=image_token_id)
        with torch.device("meta"):
            model = cls(cfg)
        model.vision, model.llm = encoder, decoder
        model.adapter = build_adapter(cfg.adapter, cfg.vision.hidden_size, cfg.llm.hidden_size)
        model.tokenizer = tokenizer
        return model.eval()

    @classmethod
    def from_hf_llava(cls, path: str | Path) -> "VLM":
        """A llava-hf LlavaForConditionalGeneration directory (with its tokenizer when present)."""
        model = load_llava(path, model_cls=cls)
        model.tokenizer = _load_tokenizer(Path(path))
        return model

    def export_hf_llava(self, path: str | Path) -> Path:
        """Write a directory transformers' LlavaForConditionalGeneration loads (models/hf/llava.py)."""
        return export_hf_llava(self, path)

    def export_hf(self, path: str | Path) -> Path:
        """Write the transformers directory of whatever this model is: a native model's Qwen-VL
        family (models/hf/qwen_vl.py, with its processor settings), a model with an InternViT tower
        as InternVL (models/hf/internvl.py), one that splits images as Idefics3 / SmolVLM
        (models/hf/idefics3.py), one that tiles them at any resolution as LLaVA-OneVision
        (models/hf/onevision.py), one that pads them (a hybrid one too) as DeepSeek-VL
        (models/hf/deepseek_vl.py), else llava-hf."""
        if self.config.is_native:
            return export_hf_qwen_vl(self, path, self.native_processor_config())
        if self.config.vision.style == "intern_vit":
            return export_hf_internvl(self, path)
        if self.config.tiling == "split":
            return export_hf_idefics3(self, path)
        if self.config.tiling == "anyres":
            return export_hf_onevision(self, path)
        if self.config.tiling == "pad":
            return export_hf_deepseek_vl(self, path)
        return export_hf_llava(self, path)

    # --- use ----------------------------------------------------------------------------------------

    def pack_loss(self, batch: PackedBatch, device: torch.device | None = None) -> LossOutput:
        """The loss of a packed batch (data/packing.py's `PackedBatch`) on `device` (default: the
        parameters'). A native model's M-RoPE positions are made here, where the pack meets the
        model (data/ knows no model layout). Training steps, held-out loss and likelihood scoring
        all go through this."""
        param = next(self.parameters())
        device = device if device is not None else param.device
        position_ids = batch.position_ids
        if self.config.is_native:
            position_ids = packed_rope_positions(batch.input_ids, batch.cu_seqlens, self.mrope_layout,
                                                 image_grid_thw=batch.image_grid_thw,
                                                 video_grid_thw=batch.video_grid_thw,
                                                 video_seconds_per_grid=batch.second_per_grid_ts or None)
        dtype = param.dtype

        def moved(t: torch.Tensor | None, floating: bool = False) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device, dtype) if floating else t.to(device)

        return self.compute_loss(moved(batch.input_ids), moved(batch.labels), moved(position_ids),
                                 moved(batch.cu_seqlens), moved(batch.pixel_values, True),
                                 image_grid_thw=moved(batch.image_grid_thw),
                                 pixel_values_videos=moved(batch.pixel_values_videos, True),
                                 video_grid_thw=moved(batch.video_grid_thw))


    def image_processor(self) -> (ImageProcessor | SplitImageProcessor | PaddedImageProcessor | AnyResImageProcessor
                                  | NativeImageProcessor):
        """What prepares images for this model: data.images.ImageProcessor (fixed size, tiles),
        data.split_images.SplitImageProcessor (Idefics3's tiles and whole image),
        data.anyres.AnyResImageProcessor (LLaVA-OneVision's any-resolution tiles, with the model's
        geometry, models/anyres.py),
        data.padded_images.PaddedImageProcessor (DeepSeek-VL's padded square, at both resolutions for
        a hybrid model), or for a native-resolution model data.native_images.NativeImageProcessor
        (images and videos at their own size)."""
        if self.config.is_native:
            return NativeImageProcessor(self.native_processor_config())
        v = self.config.vision
        if self.config.tiling == "pad":
            h = self.config.high_res_vision
            high_res = Resolution(h.image_size, h.image_mean, h.image_std) if self.config.is_hybrid else None
            return PaddedImageProcessor(v.image_size, v.image_mean, v.image_std, high_res)
        if self.config.tiling == "anyres":
            return AnyResImageProcessor(self.anyres_geometry, v.image_size, v.image_mean, v.image_std)
        if self.config.tiling == "split":
            return SplitImageProcessor(v.image_size, v.image_mean, v.image_std, self.config.tiles_per_side)
        return ImageProcessor(image_size=v.image_size, mean=v.image_mean, std=v.image_std,
                              max_tiles=self.config.max_tiles, use_thumbnail=self.config.use_thumbnail)

    def native_processor_config(self) -> NativeProcessorConfig:
        """A native model's processor settings: the checkpoint's own, else its family's."""
        if self.processor_config is not None:
            return self.processor_config
        return FAMILIES[self.config.native_vision.style]

    def generate(self, messages: list[dict] | list[list[dict]], **kw) -> str | list[str]:
        """Answer an OpenAI-style conversation (-> str) or a list of them (-> list[str], decoded
        together); keyword arguments as infer/generate.py's `generate_messages`."""
        return generate_messages(self, messages, **kw)


def grow_vocab(llm: torch.nn.Module, vocab_size: int) -> None:
    """Grow the LLM's embedding (and untied output) matrix to `vocab_size` rows; new rows are the
    mean of the old ones, so the new token starts as an average, never a likely, prediction."""
    old = llm.config.vocab_size
    if vocab_size <= old:
        return
    with torch.no_grad():
        for module in (llm.embed_tokens, llm.lm_head):
            if module is None:
                continue
            weight = module.weight
            extra = weight.mean(0, keepdim=True).expand(vocab_size - old, -1)
            module.weight = torch.nn.Parameter(torch.cat([weight, extra]), requires_grad=weight.requires_grad)
            if isinstance(module, torch.nn.Embedding):
                module.num_embeddings = vocab_size
            else:
                module.out_features = vocab_size
    llm.config.vocab_size = vocab_size


def _with_adapter(model: VLM, adapter: str | Path | None) -> VLM:
    """`model` with the LoRA adapter in directory `adapter` folded into its weights (None: as it is)."""
    if adapter is not None:
        load_adapter(model, adapter)
        merge_and_unload(model)
    return model


def _load_tokenizer(path: Path):
    """The tokenizer saved in `path`, or None when the directory has none."""
    if not (path / TOKENIZER_FILE).is_file():
        return None
    return Tokenizer.load(path)


def _add_image_token(tokenizer, vocab_size: int) -> int:
    """Add the image token to `tokenizer` (when there is one) and return its id."""
    if tokenizer is None:
        return vocab_size
    return tokenizer.add_image_token()


def _load_processor_config(path: Path) -> NativeProcessorConfig | None:
    """The processor.json of a native model's checkpoint directory, or None without one."""
    file = path / PROCESSOR_FILE
    if not file.is_file():
        return None
    try:
        return build(NativeProcessorConfig, json.loads(file.read_text()), "processor")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None
