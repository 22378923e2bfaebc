"""The `vlmkit` model's registration with lmms-eval: the `lmms_eval.models` entry point (pyproject.toml)
names this manifest. lmms-eval loads every such entry point whenever it starts, whatever model it
runs, so this module names the model class (eval/lmms.py) by its path instead of importing it,
which would load torch and the model code."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="vlmkit", simple_class_path="vlmkit.eval.lmms.VlmkitLMM")
