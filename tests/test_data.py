import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.config import config_from_dict
from pipeline.data import load_samples, read_records
from pipeline.errors import UserError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["<|im_start|>", "<|im_end|>", "user", "assistant", "system", "a", "b", "c", "d", "e", "f", "g", "sys", "[UNK]"]


@pytest.fixture(scope="module")
def word_tokenizer():
    """One token per whitespace-separated word, so expected positions can be written down by hand."""
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    return tok


def make_config(tmp_path: Path, records, *, jsonl=True, max_len=2048, template=None, key="labeled_path"):
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    if isinstance(records, str):
        path.write_text(records)
    elif jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    dataset = {key: str(path)}
    if template:
        dataset["template"] = str(template)
    return config_from_dict({"dataset": dataset, "distillation": {"max_seq_length": max_len}}, tmp_path)


def test_multi_turn_chat_masks_every_assistant_turn(tmp_path, word_tokenizer):
    record = {"id": "conv-1", "messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a b"},
        {"role": "assistant", "content": "c d"},
        {"role": "user", "content": "e"},
        {"role": "assistant", "content": "f"},
    ]}
    samples, stats = load_samples(make_config(tmp_path, [record]), word_tokenizer, mode="score")
    # 0 <s> 1 system 2 sys 3 </s> 4 <s> 5 user 6 a 7 b 8 </s> 9 <s> 10 assistant 11 c 12 d 13 </s>
    # 14 <s> 15 user 16 e 17 </s> 18 <s> 19 assistant 20 f 21 </s>
    (sample,) = samples
    assert sample.sample_id == "conv-1"
    assert word_tokenizer.convert_ids_to_tokens(sample.input_ids)[11:14] == ["c", "d", "<|im_end|>"]
    assert sample.positions == [11, 12, 13, 20, 21]
    assert (stats.samples, stats.tokens, stats.response_tokens) == (1, 22, 5)


@pytest.mark.parametrize(
    "record",
    [
        {"instruction": "a", "input": "b", "output": "c d"},
        {"prompt": "a b", "response": "c d"},
        {"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d"}]},
    ],
)
def test_every_record_shape_gives_the_same_tokens(tmp_path, word_tokenizer, record):
    (sample,), _ = load_samples(make_config(tmp_path, [record]), word_tokenizer, mode="score")
    # <s> user a b </s> <s> assistant c d </s>  (instruction and input are joined by a newline)
    assert word_tokenizer.convert_ids_to_tokens(sample.input_ids) == [
        "<|im_start|>", "user", "a", "b", "<|im_end|>", "<|im_start|>", "assistant", "c", "d", "<|im_end|>"]
    assert sample.positions == [7, 8, 9]
    assert sample.sample_id == "0"


def test_json_array_and_jsonl_agree(tmp_path, word_tokenizer):
    records = [{"prompt": "a", "response": "b"}, {"id": 7, "prompt": "c", "response": "d e"}]
    from_jsonl, _ = load_samples(make_config(tmp_path, records), word_tokenizer, mode="score")
    from_json, _ = load_samples(make_config(tmp_path, records, jsonl=False), word_tokenizer, mode="score")
    assert from_jsonl == from_json
    assert [s.sample_id for s in from_json] == ["0", "7"]


def test_generate_mode_keeps_the_prompt_and_generation_prompt(tmp_path, word_tokenizer):
    records = [{"instruction": "a b"}, {"messages": [{"role": "user", "content": "c"},
                                                     {"role": "assistant", "content": "d"}]}]
    samples, _ = load_samples(make_config(tmp_path, records, key="instruction_path"), word_tokenizer,
                              mode="generate")
    tokens = [word_tokenizer.convert_ids_to_tokens(s.input_ids) for s in samples]
    assert tokens[0] == ["<|im_start|>", "user", "a", "b", "<|im_end|>", "<|im_start|>", "assistant"]
    assert tokens[1] == ["<|im_start|>", "user", "c", "<|im_end|>", "<|im_start|>", "assistant"]
    assert all(s.positions == [] for s in samples)


def test_max_seq_length_truncates_responses_and_drops_long_prompts(tmp_path, word_tokenizer):
    records = [
        {"prompt": "a", "response": "b c d e f g"},  # 6 prompt tokens + 7 response tokens
        {"prompt": "a b c d e f g", "response": "a"},  # prompt alone is 12 tokens
        {"prompt": "a", "response": "b"},
    ]
    samples, stats = load_samples(make_config(tmp_path, records, max_len=10), word_tokenizer, mode="score")
    assert [s.sample_id for s in samples] == ["0", "2"]
    assert len(samples[0].input_ids) == 10 and samples[0].positions == [6, 7, 8, 9]
    assert (stats.truncated_response, stats.dropped_prompt_too_long) == (1, 1)


def test_empty_responses_are_skipped_and_counted(tmp_path, word_tokenizer):
    records = [{"prompt": "a", "response": "  "}, {"prompt": "a", "response": "b"}]
    samples, stats = load_samples(make_config(tmp_path, records), word_tokenizer, mode="score")
    assert [s.sample_id for s in samples] == ["1"]
    assert stats.skipped_empty_response == 1 and stats.skipped_ids == ["0"]


def test_template_file_overrides_the_tokenizer_template(tmp_path, word_tokenizer):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    config = make_config(tmp_path, [{"prompt": "a", "response": "b c"}], template=template)
    (sample,), _ = load_samples(config, word_tokenizer, mode="score")
    assert word_tokenizer.convert_ids_to_tokens(sample.input_ids) == [
        "user", "a", "<|im_end|>", "assistant", "b", "c", "<|im_end|>"]
    assert sample.positions == [4, 5, 6]


def test_real_bpe_tokenizer_response_tokens_decode_to_the_answer(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    answer = "def add(a, b):\n    return a + b"
    records = [{"messages": [{"role": "user", "content": "Write add."}, {"role": "assistant", "content": answer}]}]
    (sample,), _ = load_samples(make_config(tmp_path, records), tok, mode="score")
    response = tok.decode([sample.input_ids[t] for t in sample.positions])
    assert response == answer + "<|im_end|>"
    assert sample.positions == list(range(sample.positions[0], len(sample.input_ids) - 1))


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": }\n', r"data\.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n[1]\n', r"data\.jsonl:2: each record must be a JSON object"),
        ('{"question": "a", "answer": "b"}\n',
         r"record 0 has none of the known shapes \(fields: \['answer', 'question'\]\)"),
        ('{"prompt": "a"}\n', r"data\.jsonl:1: the record has no `response`"),
        ('{"prompt": 3, "response": "b"}\n', r"`prompt` must be a string"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"messages\[0\] must be"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', r"no assistant turn"),
        ('{"id": 1, "prompt": "a", "response": "b"}\n{"id": 1, "prompt": "a", "response": "c"}\n',
         r"sample id '1' repeats record 0"),
        ('[{"prompt": "a", "response": "b"},\n {"prompt": "a" "response": "b"}]', r"data\.json:2: not valid JSON"),
    ],
)
def test_bad_input_names_the_place(tmp_path, word_tokenizer, text, expected):
    config = make_config(tmp_path, text, jsonl=not text.startswith("["))
    with pytest.raises(UserError, match=expected):
        load_samples(config, word_tokenizer, mode="score")


def test_missing_dataset_and_missing_setting(tmp_path, word_tokenizer):
    config = config_from_dict({"dataset": {"labeled_path": "nope.jsonl"}}, tmp_path)
    with pytest.raises(UserError, match="nope.jsonl does not exist"):
        load_samples(config, word_tokenizer, mode="score")
    with pytest.raises(UserError, match="`dataset.labeled_path` is not set"):
        load_samples(config_from_dict({}, tmp_path), word_tokenizer, mode="score")


def test_read_records_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"prompt": "a", "response": "b"}\n\n')
    assert [where for where, _ in read_records(path)] == [f"{path}:2"]


def test_assistant_first_conversation_trains_no_header(tmp_path, word_tokenizer):
    record = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}]}
    (sample,), _ = load_samples(make_config(tmp_path, [record]), word_tokenizer, mode="score")
    # 0 <s> 1 assistant 2 a 3 </s> 4 <s> 5 user 6 b 7 </s> 8 <s> 9 assistant 10 c 11 </s>
    assert sample.positions == [2, 3, 10, 11]


GENERATION_CHATML = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_generation_blocks_define_the_trained_text(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    template = tmp_path / "generation.jinja"
    template.write_text(GENERATION_CHATML)
    records = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>x</think>Yo"},
                             {"role": "user", "content": "Go"}, {"role": "assistant", "content": "Ok"}]}]
    trained = {}
    for reasoning in ("train", "context"):
        config = make_config(tmp_path, records, template=template)
        config.dataset.reasoning = reasoning
        (sample,), _ = load_samples(config, tok, mode="score")
        trained[reasoning] = tok.decode([sample.input_ids[t] for t in sample.positions])
    # The template's blocks include the newline after <|im_end|>; `context` still leaves the think block out.
    assert trained["train"] == "<think>x</think>Yo<|im_end|>\nOk<|im_end|>\n"
    assert trained["context"] == "Yo<|im_end|>\nOk<|im_end|>\n"


def test_a_template_that_rewrites_content_is_refused(tmp_path, word_tokenizer):
    template = tmp_path / "upper.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }} {{ m['content'] | upper }} <|im_end|> {% endfor %}")
    config = make_config(tmp_path, [{"prompt": "a", "response": "b c"}], template=template)
    with pytest.raises(UserError, match=r"data\.jsonl:1: the chat template changes or drops the text"):
        load_samples(config, word_tokenizer, mode="score")


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_parquet_gives_the_same_samples_as_jsonl(tmp_path, word_tokenizer):
    records = [
        {"id": "x", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}]},
        {"id": None, "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "d"},
                                  {"role": "assistant", "content": "e"}]},
    ]
    from_jsonl, _ = load_samples(make_config(tmp_path, records), word_tokenizer, mode="score")
    parquet = write_parquet(tmp_path / "data.parquet", records)
    config = config_from_dict({"dataset": {"labeled_path": str(parquet)}}, tmp_path)
    from_parquet, _ = load_samples(config, word_tokenizer, mode="score")
    assert from_parquet == from_jsonl
    assert [s.sample_id for s in from_parquet] == ["x", "1"]


def test_parquet_rows_of_mixed_shapes_with_null_columns(tmp_path, word_tokenizer):
    # Every row has every column: a chat row holds null `prompt`/`response`, a pair row a null `messages`.
    records = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "prompt": None, "response": None},
        {"messages": None, "prompt": "c d", "response": "e"},
    ]
    parquet = write_parquet(tmp_path / "data.parquet", records)
    (first, second), _ = load_samples(
        config_from_dict({"dataset": {"labeled_path": str(parquet)}}, tmp_path), word_tokenizer, mode="score")
    assert word_tokenizer.convert_ids_to_tokens(first.input_ids)[2:3] == ["a"]
    assert word_tokenizer.convert_ids_to_tokens(second.input_ids)[2:4] == ["c", "d"]


def test_parquet_errors_name_the_row(tmp_path, word_tokenizer):
    parquet = write_parquet(tmp_path / "data.parquet", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    config = config_from_dict({"dataset": {"labeled_path": str(parquet)}}, tmp_path)
    with pytest.raises(UserError, match=r"data\.parquet:row 1: the record has no `response`"):
        load_samples(config, word_tokenizer, mode="score")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    config = config_from_dict({"dataset": {"labeled_path": str(broken)}}, tmp_path)
    with pytest.raises(UserError, match=r"broken\.parquet cannot be read as Parquet"):
        load_samples(config, word_tokenizer, mode="score")
