"""Constants shared by every part of vlmkit. Define once, import everywhere."""

# Label value that the loss ignores (the PyTorch / transformers convention).
IGNORE_INDEX = -100

# The placeholder users write in text where an image goes (LLaVA convention). Templates expand
# each placeholder into the image's visual tokens, all carrying the tokenizer's image token id.
IMAGE_PLACEHOLDER = "<image>"
# Where a video goes (LLaVA-Video's convention); templates expand it into the video's tokens.
VIDEO_PLACEHOLDER = "<video>"

RESCALE_FACTOR = 1 / 255
"""8-bit pixel values -> [0, 1], before the normalisation (every image processor's rescale)."""

# Normalisation of the images CLIP was trained on (OpenAI's CLIP, Qwen2-VL and Qwen2.5-VL).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Special tokens of the built-in tokenizer (data/tokenizer.py). Loaded tokenizers bring their own.
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BUILTIN_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IM_START, IM_END, IMAGE_TOKEN)

# The Llama-3 chat format (loaded Llama-3 tokenizers; data/template.py renders it):
# <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>
LLAMA3_BEGIN_OF_TEXT = "<|begin_of_text|>"
LLAMA3_HEADER_START = "<|start_header_id|>"
LLAMA3_HEADER_END = "<|end_header_id|>"
LLAMA3_END_OF_TURN = "<|eot_id|>"
LLAMA3_END_OF_TEXT = "<|end_of_text|>"
LLAMA3_END_OF_MESSAGE = "<|eom_id|>"
"""Ends an assistant message that calls a tool (Llama-3.1); generation stops on it too."""
LLAMA3_CHAT_TOKENS = (LLAMA3_BEGIN_OF_TEXT, LLAMA3_HEADER_START, LLAMA3_HEADER_END, LLAMA3_END_OF_TURN)
"""The tokens a vocabulary needs for the Llama-3 chat format."""

# The Qwen-VL chat format (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; data/template.py renders it): ChatML
# turns, an image as <|vision_start|><|image_pad|>...<|vision_end|>, a video likewise with <|video_pad|>.
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
QWEN_VL_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
"""The tokens a vocabulary needs for the Qwen-VL chat format."""

# The InternVL chat format (InternVL2.5, InternVL3 as transformers holds them; data/template.py
# renders it): ChatML turns, an image as <img><IMG_CONTEXT>...</img>, an image part followed by a newline.
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT)
"""The tokens a vocabulary needs for the InternVL chat format."""

# The Idefics3 chat format (Idefics3, SmolVLM as transformers holds them; data/template.py renders
# it): turns as `User: ...<end_of_utterance>\n`; an image as its tiles, each <fake_token_around_image>,
# its <row_r_col_c> and its <image> tokens, a newline after each row of tiles, then the global image
# as a newline, <fake_token_around_image><global-img>, its <image> tokens, <fake_token_around_image>.
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
TILE_POSITION = "<row_{row}_col_{col}>"
"""What names a tile's place in its image's grid (1-based) before the tile's tokens."""
IDEFICS3_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE)
"""The tokens a vocabulary needs for the Idefics3 chat format (the ones its processor adds)."""

# The DeepSeek-VL chat format (DeepSeek-VL and its hybrid as transformers holds them; data/template.py
# renders it): a fixed system text, turns as `User: ...\n\n` and `Assistant: ...<｜end▁of▁sentence｜>`,
# an image as its <image_placeholder> tokens.
DEEPSEEK_VL_IMAGE_TOKEN = "<image_placeholder>"
DEEPSEEK_END_OF_SENTENCE = "<｜end▁of▁sentence｜>"
"""Ends an assistant (and a system) turn of the DeepSeek-VL format; DeepSeek's end of text too."""

# File names of the checkpoint directory (docs/architecture.md, "Checkpoint format").
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "vlmkit.json"
