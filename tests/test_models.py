import shutil

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from pipeline.errors import UserError
from pipeline.models import check_model_path, check_same_vocab, model_identity, tokenizer_fingerprint


def test_model_identity_follows_the_weights_not_the_location(tmp_path, tiny_model_dir):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_identity(copy)["hash"] == model_identity(tiny_model_dir)["hash"]
    # "retrained": same shapes and file sizes, other values
    weights = load_file(copy / "model.safetensors")
    save_file({name: t + 0.01 for name, t in weights.items()}, copy / "model.safetensors", metadata={"format": "pt"})
    assert (copy / "model.safetensors").stat().st_size == (tiny_model_dir / "model.safetensors").stat().st_size
    assert model_identity(copy)["hash"] != model_identity(tiny_model_dir)["hash"]
    assert model_identity(copy)["dtype"] == "float32"


def test_tokenizer_fingerprint_is_stable_and_sensitive(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    again = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(again)
    assert tokenizer_fingerprint(tok)["vocab_size"] == len(tok)
    again.add_tokens(["<extra_token>"])
    assert tokenizer_fingerprint(tok)["hash"] != tokenizer_fingerprint(again)["hash"]
    check_same_vocab(tok, "teacher", again, "student")  # a padded (larger) student vocabulary is fine


def test_check_same_vocab_names_the_first_differences(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    other_dir = tmp_path / "other"
    shutil.copytree(tiny_tokenizer_dir, other_dir)
    text = (other_dir / "tokenizer.json").read_text()
    vocab_a, vocab_b = tok.convert_ids_to_tokens([100, 101])
    swapped = text.replace(f'"{vocab_a}": 100', '"__A__": 100').replace(f'"{vocab_b}": 101', f'"{vocab_a}": 101')
    (other_dir / "tokenizer.json").write_text(swapped.replace('"__A__": 100', f'"{vocab_b}": 100'))
    other = AutoTokenizer.from_pretrained(other_dir)
    with pytest.raises(UserError, match=rf"different ids.*{vocab_a!r}: 100 in teacher, 101 in student"):
        check_same_vocab(tok, "teacher", other, "student")


def test_check_model_path(tmp_path, tiny_model_dir):
    assert check_model_path(tiny_model_dir, "teacher") == str(tiny_model_dir)
    assert check_model_path("Qwen/Qwen2.5-0.5B-Instruct", "student") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(UserError, match="does not exist"):
        check_model_path(tmp_path / "missing", "teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        check_model_path(tmp_path / "empty", "teacher")
