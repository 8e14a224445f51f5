"""Response spans on production tokenizers with their own chat templates (fetched by npm, cached).

Every expectation below was checked by hand against the template's source: the strings are exactly the
characters trained per assistant turn, in order.
"""

import json

import pytest
from transformers import AutoTokenizer

from pipeline.alignment import ChatRenderer
from pipeline.config import config_from_dict
from pipeline.data import load_samples
from pipeline.errors import UserError

SYSTEM = {"role": "system", "content": "Be brief."}
REASONED = [
    SYSTEM,
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nAdd.\n</think>\n\n4"},
]
PLAIN = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": " Hello  "},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye."},
]
ASSISTANT_FIRST = [
    {"role": "assistant", "content": "Welcome!"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there."},
]


@pytest.fixture(scope="module")
def tokenizers(real_tokenizer_dir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = AutoTokenizer.from_pretrained(real_tokenizer_dir(name))
        return cache[name]

    return get


def trained(tokenizer, messages, reasoning="train", template=None):
    """(trained character spans as text, the response tokens decoded one by one and joined per span)."""
    renderer = ChatRenderer(tokenizer, template, reasoning)
    text, spans = renderer.response_spans(messages, "rec")
    ids, positions = renderer.tokenize(messages, "rec")
    return [text[s:e] for s, e in spans], tokenizer.decode([ids[t] for t in positions]), text


@pytest.mark.parametrize("name, size", [("qwen3", 151_669), ("qwen2_5", 151_665), ("llama3", 128_256),
                                        ("gemma3", 262_145)])
def test_the_production_vocabularies_are_the_real_ones(tokenizers, name, size):
    assert len(tokenizers(name)) == size


def test_qwen3_multi_turn_reasoning_dropped_from_history(tokenizers):
    tok = tokenizers("qwen3")
    spans, decoded, text = trained(tok, REASONED)
    # Qwen3 drops the first turn's reasoning (it precedes the last user message), keeps the last turn's.
    assert "Greet back" not in text
    assert spans == ["Hello!<|im_end|>", "<think>\nAdd.\n</think>\n\n4<|im_end|>"]
    assert decoded == "".join(spans)
    spans, decoded, _ = trained(tok, REASONED, reasoning="context")
    assert spans == ["Hello!<|im_end|>", "4<|im_end|>"]
    assert decoded == "".join(spans)


def test_qwen3_empty_think_scaffold_is_never_trained(tokenizers):
    spans, decoded, text = trained(tokenizers("qwen3"), PLAIN)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nBye.<|im_end|>\n")
    # The empty block the template writes before the last answer equals the non-thinking generation prompt.
    assert spans == [" Hello  <|im_end|>", "Bye.<|im_end|>"]
    assert decoded == "".join(spans)


def test_qwen2_5_assistant_first_skips_the_default_system_prompt(tokenizers):
    spans, decoded, text = trained(tokenizers("qwen2_5"), ASSISTANT_FIRST)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert spans == ["Welcome!<|im_end|>", "Hello there.<|im_end|>"]
    assert decoded == "".join(spans)


def test_qwen2_5_literal_think_blocks_are_content(tokenizers):
    tok = tokenizers("qwen2_5")
    spans, _, _ = trained(tok, REASONED)
    assert spans == ["<think>\nGreet back.\n</think>\n\nHello!<|im_end|>", "<think>\nAdd.\n</think>\n\n4<|im_end|>"]
    spans, decoded, _ = trained(tok, REASONED, reasoning="context")
    assert spans == ["Hello!<|im_end|>", "4<|im_end|>"]
    assert decoded == "".join(spans)


def test_llama3_turns_end_at_eot_not_at_eos(tokenizers):
    tok = tokenizers("llama3")
    assert tok.eos_token == "<|end_of_text|>"  # never written by the chat template
    spans, decoded, text = trained(tok, PLAIN)
    # This template always appends the assistant header, and trims content.
    assert text.endswith("Bye.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert spans == ["Hello<|eot_id|>", "Bye.<|eot_id|>"]
    assert decoded == "".join(spans)
    spans, _, _ = trained(tok, ASSISTANT_FIRST)
    assert spans == ["Welcome!<|eot_id|>", "Hello there.<|eot_id|>"]


def test_gemma3_trims_folds_the_system_prompt_and_ends_at_end_of_turn(tokenizers):
    tok = tokenizers("gemma3")
    spans, decoded, text = trained(tok, [SYSTEM, *PLAIN])
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello")
    assert spans == ["Hello<end_of_turn>", "Bye.<end_of_turn>"]
    assert decoded == "".join(spans)
    with pytest.raises(UserError, match="rec: the chat template cannot render this conversation: .*must alternate"):
        trained(tok, ASSISTANT_FIRST)


def test_a_token_straddling_prompt_and_answer_is_trained(tokenizers):
    tok = tokenizers("qwen3")
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world"}]
    spans, decoded, _ = trained(tok, messages, template=template)
    assert spans == ["Hello world<|im_end|>"]
    # Byte-level BPE merges the prompt's last space into " Hello": that token is trained, space and all.
    assert decoded == " Hello world<|im_end|>"


def test_load_samples_on_qwen3_multi_turn_jsonl(tmp_path, tokenizers):
    tok = tokenizers("qwen3")
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"id": "c1", "messages": REASONED}) + "\n")
    config = config_from_dict({"dataset": {"labeled_path": str(path), "reasoning": "context"}}, tmp_path)
    (sample,), stats = load_samples(config, tok, mode="score")
    assert tok.decode([sample.input_ids[t] for t in sample.positions]) == "Hello!<|im_end|>4<|im_end|>"
    assert stats.response_tokens == len(sample.positions) == 5  # Hello ! <|im_end|> 4 <|im_end|>
    # Generate mode in context mode prompts with Qwen3's non-thinking generation prompt.
    (prompt,), _ = load_samples(config, tok, mode="generate")
    assert tok.decode(prompt.input_ids).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
