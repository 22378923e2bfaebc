"""Constants shared by every part of vlmkit. Define once, import everywhere."""

# Label value that the loss ignores (the PyTorch / transformers convention).
IGNORE_INDEX = -100

# The placeholder users write in text where an image goes (LLaVA convention). Templates expand
# each placeholder into the image's visual tokens, all carrying the tokenizer's image token id.
IMAGE_PLACEHOLDER = "<image>"

# Special tokens of the built-in tokenizer (data/tokenizer.py). Loaded tokenizers bring their own.
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BUILTIN_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IM_START, IM_END, IMAGE_TOKEN)

# File names of the checkpoint directory (DESIGN.md, "Checkpoint directory").
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "vlmkit.json"
