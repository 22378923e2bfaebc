"""Tokenizer: deterministic training, special tokens, save / load round trip, transformers loads the
saved directory, chat-format detection of loaded HF directories, adding an image token."""

import json

import pytest
from transformers import AutoTokenizer

from tests.tokenizer_support import (LLAMA31_TEMPLATE, SENTENCES, builtin_tokenizer, chatml_dir, hf_dir,
                                     llama3_dir)
from vlmkit.constants import BUILTIN_SPECIAL_TOKENS, EOS_TOKEN, IM_END, IMAGE_TOKEN, PAD_TOKEN
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.errors import ConfigError

TEXT = "What color is the circle? Unicode: café 東京 <c> 3.14\n\ttabs  and  spaces"


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def test_training_is_deterministic(tok, tmp_path):
    again = builtin_tokenizer()
    tok.save(tmp_path / "a")
    again.save(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_special_tokens_are_single_ids(tok):
    ids = [tok.token_id(t) for t in BUILTIN_SPECIAL_TOKENS]
    assert ids == list(range(len(BUILTIN_SPECIAL_TOKENS)))
    for token, token_id in zip(BUILTIN_SPECIAL_TOKENS, ids):
        assert tok.encode(token) == [token_id]
    assert tok.image_token_id == tok.token_id(IMAGE_TOKEN)
    assert tok.pad_id == tok.token_id(PAD_TOKEN) and tok.eos_id == tok.token_id(EOS_TOKEN)
    assert tok.stop_ids == [tok.token_id(IM_END), tok.eos_id]
    assert tok.template == "builtin" and tok.bos_id is None


def test_byte_level_round_trip(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(tok.encode("a<image>b"), skip_special=True) == "ab"
    assert tok.decode(tok.encode("a<image>b"), skip_special=False) == "a<image>b"


def test_role_names_are_whole_tokens(tok):
    assert len(tok.encode("assistant")) == 1 and len(tok.encode("user")) == 1


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json"}
    loaded = Tokenizer.load(tmp_path)
    assert loaded.template == "builtin" and loaded.default_system is None
    assert loaded.encode(TEXT) == tok.encode(TEXT)
    assert (loaded.vocab_size, loaded.image_token_id, loaded.pad_id, loaded.eos_id, loaded.stop_ids) == \
        (tok.vocab_size, tok.image_token_id, tok.pad_id, tok.eos_id, tok.stop_ids)


def test_transformers_loads_the_saved_directory(tok, tmp_path):
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(TEXT, add_special_tokens=False)["input_ids"] == tok.encode(TEXT)
    assert hf.eos_token == EOS_TOKEN and hf.pad_token == PAD_TOKEN
    assert hf.convert_tokens_to_ids(IMAGE_TOKEN) == tok.image_token_id
    assert len(hf) == tok.vocab_size
    assert isinstance(hf.chat_template, str) and "<|im_start|>" in hf.chat_template
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tok.chat_template


def test_load_chatml_directory(tmp_path):
    tok = Tokenizer.load(chatml_dir(tmp_path))
    assert tok.template == "chatml"
    assert tok.default_system == "You are a helpful assistant."
    assert tok.eos_id == tok.token_id("<|endoftext|>")  # documents end with end-of-text, not end-of-turn
    assert tok.stop_ids == [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]
    assert tok.image_token_id is None and tok.bos_id is None


def test_chat_template_beside_the_config(tmp_path):
    path = chatml_dir(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "chat_template.jinja").write_text(config.pop("chat_template"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(path)
    assert tok.default_system == "You are a helpful assistant." and "im_start" in tok.chat_template


def test_load_llama3_directory(tmp_path):
    tok = Tokenizer.load(llama3_dir(tmp_path))
    assert tok.template == "llama3" and tok.default_system is None
    assert tok.bos_id == tok.token_id("<|begin_of_text|>")
    assert tok.eos_id == tok.token_id("<|end_of_text|>")
    assert tok.stop_ids == [tok.token_id("<|eot_id|>"), tok.token_id("<|end_of_text|>"), tok.token_id("<|eom_id|>")]
    tok31 = Tokenizer.load(llama3_dir(tmp_path / "31", LLAMA31_TEMPLATE))
    assert tok31.default_system == tok31.system_prefix == "Cutting Knowledge Date: December 2023\n\n"


def test_add_image_token_survives_save(tmp_path):
    tok = Tokenizer.load(chatml_dir(tmp_path / "src"))
    before = tok.vocab_size
    image_id = tok.add_image_token()
    assert image_id == before and tok.vocab_size == before + 1
    assert tok.add_image_token() == image_id  # idempotent
    tok.save(tmp_path / "out")
    again = Tokenizer.load(tmp_path / "out")
    assert again.image_token_id == image_id and again.encode("x<image>")[-1] == image_id
    assert AutoTokenizer.from_pretrained(tmp_path / "out").convert_tokens_to_ids(IMAGE_TOKEN) == image_id


def test_unsupported_or_missing_directories_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    plain = hf_dir(tmp_path / "plain", ["</s>"], {"eos_token": "</s>"})
    with pytest.raises(ConfigError, match="unsupported chat format"):
        Tokenizer.load(plain)
    with pytest.raises(ConfigError, match="vocab_size"):
        Tokenizer.train(SENTENCES, vocab_size=100)
