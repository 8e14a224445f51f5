"""Cross-tokenizer distillation: alignment on production tokenizer pairs, the shared vocabulary, and
train-student end to end with a teacher and a student whose tokenizers differ (vocabulary, text, template)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pipeline import cli
from pipeline.alignment import ChatRenderer
from pipeline.cache import LogitCacheReader
from pipeline.config import config_from_dict
from pipeline.cross_tokenizer.alignment import CrossAligner
from pipeline.cross_tokenizer.generated import generated_encoding
from pipeline.cross_tokenizer.prepare import prepare_cross_tokenizer
from pipeline.cross_tokenizer.vocab import shared_vocab_map, token_texts
from pipeline.errors import UserError
from pipeline.student.distill import output_head, response_hidden_states
from stages import evaluate, gen_logits, train_student

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Write a function."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b  # sum — café ✓"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome!"},
]


def aligner(teacher_dir, student_dir, max_len=4096):
    teacher, student = AutoTokenizer.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(student_dir)
    return CrossAligner(ChatRenderer(teacher, None), ChatRenderer(student, None), max_len), teacher, student


def align(cross: CrossAligner, messages, sample_id="s0"):
    ids, positions = cross.teacher.tokenize(messages, "rec")
    return cross.align(sample_id, messages, np.array(ids), np.array(positions), "rec")


def chunk_texts(cross: CrossAligner, messages, alignment) -> list[str]:
    enc = cross.student.encode(messages, "rec")
    texts: dict[int, str] = {}
    for row, chunk in enumerate(alignment.chunk_of_row):
        if chunk >= 0:
            a, b = enc.offsets[alignment.positions[row]]
            texts[int(chunk)] = texts.get(int(chunk), "") + enc.text[a:b]
    return [texts[c] for c in sorted(texts)]


def test_llama3_teacher_and_qwen_student_align_every_character(real_tokenizer_dir):
    cross, teacher, student = aligner(real_tokenizer_dir("llama3"), real_tokenizer_dir("qwen2_5"))
    pair = cross.end_of_turn_pair()
    assert [teacher.convert_ids_to_tokens(t) for t in pair] == ["<|eot_id|>"]
    assert [student.convert_ids_to_tokens(s) for s in pair.values()] == ["<|im_end|>"]
    a = align(cross, CONVERSATION)
    # Qwen2.5's template and Llama 3's differ around the turns (Llama 3 adds a date header to the system
    # turn, Qwen2.5 its ChatML blocks); the assistant text itself is aligned whole.
    assert a.response_chars == len(CONVERSATION[2]["content"]) + len(CONVERSATION[4]["content"])
    assert a.aligned_chars == a.response_chars
    texts = chunk_texts(cross, CONVERSATION, a)
    assert "".join(texts) == CONVERSATION[2]["content"] + "<|im_end|>" + CONVERSATION[4]["content"] + "<|im_end|>"
    # Each chunk is a whole number of tokens on both sides and covers the same characters.
    assert (a.chunk_of_row >= 0).all() and a.num_chunks == len(texts)
    eot_rows = [j for j, t in enumerate(a.positions) if cross.student.encode(CONVERSATION, "rec").input_ids[t]
                == student.convert_tokens_to_ids("<|im_end|>")]
    assert len(eot_rows) == 2 and all(a.one_to_one[j] >= 0 for j in eot_rows)  # matched by role


def test_sentencepiece_teacher_gives_multi_token_chunks(real_tokenizer_dir):
    """Gemma 3 (SentencePiece-style, spaces as ▁) against Qwen2.5 (byte-level): other boundaries, so some
    chunks span several tokens on one side; the alignment still covers the text exactly."""
    cross, teacher, student = aligner(real_tokenizer_dir("gemma3"), real_tokenizer_dir("qwen2_5"))
    text = "Tokenization differs: antidisestablishmentarianism, naïve résumé, 12345 + 678 = 13023."
    messages = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": text}]
    a = align(cross, messages)
    texts = chunk_texts(cross, messages, a)
    assert a.response_chars == len(text)
    assert 0.9 <= a.aligned_chars / a.response_chars <= 1.0
    joined = "".join(t for t in texts if t != "<|im_end|>")
    assert joined in text and len(joined) == a.aligned_chars
    rows = np.bincount(a.chunk_of_row[a.chunk_of_row >= 0])
    t_rows = np.bincount(a.chunk_teacher[0], minlength=a.num_chunks)
    assert (rows > 1).any() or (t_rows > 1).any()  # some chunk is not 1:1
    assert ((rows == 1) & (t_rows == 1)).sum() == (a.one_to_one >= 0).sum()
    assert [teacher.convert_ids_to_tokens(t) for t in cross.end_of_turn_pair()] == ["<end_of_turn>"]
    # Every chunk has one start: its first student row, paired with its first teacher row, and both of
    # those tokens begin at the same character of the text.
    starts = np.nonzero(a.chunk_start >= 0)[0]
    assert len(starts) == a.num_chunks
    assert [int(a.chunk_of_row[j]) for j in starts] == list(range(a.num_chunks))
    s_enc, t_enc = cross.student.encode(messages, "rec"), cross.teacher.encode(messages, "rec")
    t_ids, t_positions = cross.teacher.tokenize(messages, "rec")
    s_core, t_core = s_enc.pieces[0].cores[0][0], t_enc.pieces[0].cores[0][0]
    for j in starts:
        first_teacher_rows = a.chunk_teacher[1][a.chunk_teacher[0] == a.chunk_of_row[j]]
        assert a.chunk_start[j] == first_teacher_rows.min()
        s_at = s_enc.offsets[a.positions[j]][0] - s_core
        t_at = t_enc.offsets[t_positions[a.chunk_start[j]]][0] - t_core
        if a.chunk_of_row[j] < a.num_chunks - 1:  # the last chunk is the end-of-turn, outside the core
            assert s_at == t_at


def test_shared_vocabulary_compares_decoded_text_not_spelling(real_tokenizer_dir):
    gemma = AutoTokenizer.from_pretrained(real_tokenizer_dir("gemma3"))
    qwen = AutoTokenizer.from_pretrained(real_tokenizer_dir("qwen2_5"))
    mapping = shared_vocab_map(gemma, qwen, {gemma.convert_tokens_to_ids("<end_of_turn>"): 151645})
    the_g, the_q = gemma.convert_tokens_to_ids("▁the"), qwen.convert_tokens_to_ids("Ġthe")
    assert mapping[the_g] == the_q  # " the" in both, spelled differently
    assert mapping[gemma.convert_tokens_to_ids("the")] == qwen.convert_tokens_to_ids("the")
    assert mapping[gemma.convert_tokens_to_ids("<end_of_turn>")] == 151645
    assert mapping[gemma.convert_tokens_to_ids("<bos>")] == -1  # special tokens only by role
    assert 20_000 < (mapping >= 0).sum() < len(gemma)


def test_projection_sends_missing_teacher_tokens_to_the_students_first_token(real_tokenizer_dir):
    """Llama 3 writes numbers in tokens of up to three digits, Qwen2.5 digit by digit: "201" has no
    Qwen2.5 token, so its mass goes to "2", the token Qwen2.5 starts that text with."""
    llama = AutoTokenizer.from_pretrained(real_tokenizer_dir("llama3"))
    qwen = AutoTokenizer.from_pretrained(real_tokenizer_dir("qwen2_5"))
    exact = shared_vocab_map(llama, qwen)
    projected = shared_vocab_map(llama, qwen, project=True)
    assert exact[llama.convert_tokens_to_ids("201")] == -1
    assert projected[llama.convert_tokens_to_ids("201")] == qwen.convert_tokens_to_ids("2")
    assert (projected[exact >= 0] == exact[exact >= 0]).all()  # same-text tokens keep their match
    teacher_texts, student_texts = token_texts(llama), token_texts(qwen)
    new = np.nonzero((exact < 0) & (projected >= 0))[0]
    assert len(new) > 10_000
    # A projected token is always a proper prefix of the teacher token's text (else it were exact).
    assert all(teacher_texts[t].startswith(student_texts[projected[t]]) for t in new)
    assert all(len(student_texts[projected[t]]) < len(teacher_texts[t]) for t in new)


def generated(cross: CrossAligner, prompt, response_ids, eot):
    """A generate-mode cache sample: the teacher's prompt ids, then its sampled response ids (+ eot)."""
    p_ids = cross.teacher.tokenizer(cross.teacher.render(prompt, add_generation_prompt=True),
                                    add_special_tokens=False)["input_ids"]
    ids = p_ids + response_ids + ([eot] if eot is not None else [])
    encoding, messages, ended = generated_encoding(cross.teacher, prompt, ids, len(p_ids),
                                                   {cross.teacher.tokenizer.eos_token_id, *cross.end_of_turn_pair()},
                                                   "g0", "rec")
    alignment = cross.align("g0", messages, np.array(ids), np.arange(len(p_ids), len(ids)), "rec",
                            teacher=encoding, ended=ended)
    return encoding, messages, ended, alignment


def test_a_generated_response_is_aligned_from_its_own_sampled_ids(real_tokenizer_dir):
    """A sampled tokenization is not the one the tokenizer gives its text ("re" + "turn", the three bytes
    of "✓" apart): the teacher side is read from the ids, never tokenized again. A response cut before
    its end of turn leaves the student's end-of-turn untrained."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cross, llama, qwen = aligner(real_tokenizer_dir("llama3"), real_tokenizer_dir("qwen2_5"))
    prompt = [{"role": "user", "content": "Write a function."}]
    text = "def add(a, b):\n    return a + b  # café ✓"
    response = [i for piece in ["def", " add", "(a", ",", " b", "):\n", "   ", " re", "turn", " a", " +", " b",
                                "  #", " caf", "é", " "] for i in llama.encode(piece, add_special_tokens=False)]
    byte_token = bytes_to_unicode()
    response += [llama.convert_tokens_to_ids(byte_token[b]) for b in "✓".encode()]
    assert response != llama.encode(text, add_special_tokens=False)  # not canonical
    eot = llama.convert_tokens_to_ids("<|eot_id|>")

    encoding, messages, ended, a = generated(cross, prompt, response, eot)
    assert ended and messages == [*prompt, {"role": "assistant", "content": text}]
    body = encoding.offsets[-len(response) - 1:-1]
    assert "".join(encoding.text[x:y] for x, y in body[:-3]) + "✓" == text
    assert len(set(body[-3:])) == 1 and encoding.text[slice(*body[-1])] == "✓"  # the bytes share their character
    texts = chunk_texts(cross, messages, a)
    assert " return" in texts and texts[-1] == "<|im_end|>"  # "re" + "turn" against Qwen's one token
    assert a.response_chars == len(text) and len(text) - 2 <= a.aligned_chars < len(text)  # " ✓" is not tiled
    student_eot = qwen.convert_tokens_to_ids("<|im_end|>")
    s_ids = a.input_ids[a.positions]
    assert (s_ids == student_eot).sum() == 1 and a.one_to_one[list(s_ids).index(student_eot)] == len(response)

    _, _, ended, cut = generated(cross, prompt, response, None)
    assert not ended and student_eot not in a.input_ids[cut.positions]  # nothing says the turn ended there
    assert len(cut.positions) == len(a.positions) - 1 and cut.num_chunks == a.num_chunks - 1
    assert cut.aligned_chars == a.aligned_chars


def test_a_generated_sentencepiece_response_decodes_token_by_token(real_tokenizer_dir):
    """Gemma 3 writes spaces as ▁ and drops a leading one when decoding: incremental decoding over a
    window still gives every token its characters, and the whole text back."""
    cross, gemma, _ = aligner(real_tokenizer_dir("gemma3"), real_tokenizer_dir("qwen2_5"))
    text = "Naïve résumé: 12345 + 678 = 13023, antidisestablishmentarianism."
    response = [i for word in text.split(" ") for i in gemma.encode(" " + word, add_special_tokens=False)]
    response = response[1:] if gemma.convert_ids_to_tokens(response[0]) == "▁" else response
    encoding, messages, ended, a = generated(cross, [{"role": "user", "content": "Say it."}], response,
                                             gemma.convert_tokens_to_ids("<end_of_turn>"))
    assert ended and messages[-1]["content"].strip() == text
    assert a.response_chars == len(text) and a.aligned_chars / a.response_chars > 0.9


# --- end to end on tiny models: a ChatML teacher, a student with Llama 3's turn format ---------------------


@pytest.fixture(scope="module")
def llama_student_dir(tmp_path_factory) -> Path:
    from pipeline.toy.models import build_model, local_corpus, train_tokenizer

    tok = train_tokenizer(tmp_path_factory.mktemp("llama_tok"), vocab_size=700,
                          corpus=local_corpus("student", 300_000), style="llama")
    return build_model(tmp_path_factory.mktemp("llama_student"), tok, hidden_size=64, num_layers=1,
                       num_heads=1, intermediate_size=128, seed=1)


@pytest.fixture(scope="module")
def cross_cache(tmp_path_factory, tiny_model_dir, tiny_dataset_path, llama_student_dir) -> Path:
    cache = tmp_path_factory.mktemp("cross") / "cache"
    gen_logits.run(cross_config(cache, tiny_model_dir, tiny_dataset_path, llama_student_dir, None))
    return cache


@pytest.fixture(scope="module")
def sampled_cross_cache(tmp_path_factory, tiny_model_dir, tiny_dataset_path, llama_student_dir) -> Path:
    """The same cache with 8 sampled tail draws per position (a hybrid cache)."""
    cache = tmp_path_factory.mktemp("cross_sampled") / "cache"
    gen_logits.run(cross_config(cache, tiny_model_dir, tiny_dataset_path, llama_student_dir, None, tail_samples=8))
    return cache


CROSS_RAW = {  # the end-to-end tests' settings, less dataset, models and output
    "inference": {"engine": "hf", "top_logits_num": 16, "tail_samples": 0, "dtype": "float32", "batch_size": 8},
    "distillation": {"chunk_size": 32, "cross_tokenizer": "chunk+shared", "kd_ratio": 1.0},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "training": {
        "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": 25, "logging_steps": 5,
        "save_steps": 1000, "report_to": "none", "disable_tqdm": True, "use_cpu": True, "seed": 0,
    },
}


def cross_config(cache, teacher, dataset, student, out, loss="chunk+shared", tail_samples=0, **distillation):
    raw = json.loads(json.dumps(CROSS_RAW))
    raw["dataset"] = {"labeled_path": str(dataset), "logits_path": str(cache), "seed": 0}
    raw["models"] = {"teacher": str(teacher), "student": str(student)}
    raw["inference"]["tail_samples"] = tail_samples
    raw["distillation"].update(cross_tokenizer=loss, **distillation)
    raw["training"]["output_dir"] = str(out)
    return config_from_dict(raw, Path("."))


def chunk_gap(model, config, cache) -> float:
    """Mean |l_T(c) - l_S(c)| over the aligned chunks of the cache: how far the student's chunk
    likelihoods are from the teacher's."""
    collate, _ = prepare_cross_tokenizer(config, LogitCacheReader(cache), AutoTokenizer.from_pretrained(
        config.models.student))
    items = [[s] for s in LogitCacheReader(cache).iter_samples(shuffle=False, seed=0)]
    batch = collate(items)
    head = output_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
    with torch.no_grad():
        logits = torch.nn.functional.linear(response_hidden_states(model, batch), head.weight)
        logq = torch.log_softmax(logits.double(), -1).gather(1, batch["targets"][:, None]).squeeze(1)
    cross = batch["cross"]
    mask = cross.chunk >= 0
    student = torch.zeros_like(cross.chunk_logprob).index_add_(0, cross.chunk[mask], logq[mask])
    return (cross.chunk_logprob - student).abs().mean().item()


@pytest.fixture(scope="module")
def gaps_without_kd(tmp_path_factory, cross_cache, tiny_model_dir, tiny_dataset_path, llama_student_dir):
    """The chunk gap of the untrained student and of one trained on CE alone (kd_ratio 0), same steps."""
    out = tmp_path_factory.mktemp("sft") / "out"
    config = cross_config(cross_cache, tiny_model_dir, tiny_dataset_path, llama_student_dir, out, "chunk",
                          kd_ratio=0.0)
    before = chunk_gap(AutoModelForCausalLM.from_pretrained(llama_student_dir), config, cross_cache)
    train_student.run(config, resume=False)
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_student_dir), str(out))
    return before, chunk_gap(student.eval(), config, cross_cache)


@pytest.mark.parametrize("loss", ["chunk", "chunk+shared", "uld"])
def test_train_student_across_tokenizers_moves_the_student_towards_the_teacher(
    tmp_path, cross_cache, tiny_model_dir, tiny_dataset_path, llama_student_dir, gaps_without_kd, loss
):
    config = cross_config(cross_cache, tiny_model_dir, tiny_dataset_path, llama_student_dir, tmp_path / "out", loss)
    before, sft = gaps_without_kd
    summary = train_student.run(config, resume=False)
    report = summary["metrics"]["cross_tokenizer_alignment"]
    assert report["loss"] == loss and report["samples"] == 24
    assert 0.9 < report["aligned_char_share"] <= 1.0
    assert 0 < report["one_to_one_chunk_share"] <= 1.0 and 0 < report["shared_vocab_topk_mass"] <= 1.0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["cross_tokenizer_alignment"] == report
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_student_dir), str(tmp_path / "out"))
    after = chunk_gap(student.eval(), config, cross_cache)
    if loss == "uld":  # ULD matches sorted probabilities, not likelihoods: it only has to train and log
        assert np.isfinite(after)
    else:  # the chunk loss pulls the student's chunk likelihoods to the teacher's; CE alone does not
        assert after < before and after < sft - 0.05, (before, sft, after)


def test_the_shared_term_takes_the_sampled_tail_of_a_hybrid_cache(
    tmp_path, sampled_cross_cache, tiny_model_dir, tiny_dataset_path, llama_student_dir, gaps_without_kd
):
    """tail auto on a hybrid cache: the shared term's targets reach past the top-k (more of the teacher's
    mass is placed on student tokens), and training still pulls the chunk likelihoods closer to the
    teacher's than CE alone does."""
    config = cross_config(sampled_cross_cache, tiny_model_dir, tiny_dataset_path, llama_student_dir,
                          tmp_path / "out", tail_samples=8)
    report = train_student.run(config, resume=False)["metrics"]["cross_tokenizer_alignment"]
    assert report["shared_tail"] == "sampled"
    assert report["shared_vocab_topk_mass"] < report["shared_vocab_mass"] <= 1.0 + 1e-6
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_student_dir), str(tmp_path / "out"))
    _, sft = gaps_without_kd
    after = chunk_gap(student.eval(), config, sampled_cross_cache)
    assert after < sft - 0.05, (sft, after)
    bucket = cross_config(sampled_cross_cache, tiny_model_dir, tiny_dataset_path, llama_student_dir,
                          tmp_path / "bucket", tail_samples=8, tail="bucket")
    collate, report = prepare_cross_tokenizer(bucket, LogitCacheReader(sampled_cross_cache),
                                              AutoTokenizer.from_pretrained(llama_student_dir))
    assert report["shared_tail"] == "bucket" and not collate.sampled_tail


@pytest.fixture(scope="module")
def generated_cross(tmp_path_factory, tiny_model_dir, tiny_dataset_path, llama_student_dir):
    """A generate-mode cache (the teacher writes the responses, T = 1) and its settings, less output_dir."""
    cache = tmp_path_factory.mktemp("generated") / "cache"
    raw = json.loads(json.dumps(CROSS_RAW))
    raw["dataset"] = {"instruction_path": str(tiny_dataset_path), "logits_path": str(cache), "seed": 0}
    raw["models"] = {"teacher": str(tiny_model_dir), "student": str(llama_student_dir)}
    raw["inference"].update(mode="generate", max_new_tokens=24, tail_samples=4)
    gen_logits.run(config_from_dict(raw, Path(".")))
    return raw, cache


def with_output(raw: dict, out: Path):
    raw = json.loads(json.dumps(raw))
    raw["training"]["output_dir"] = str(out)
    return config_from_dict(raw, Path("."))


def test_train_student_across_tokenizers_from_a_generate_mode_cache(
    tmp_path, tiny_model_dir, llama_student_dir, generated_cross
):
    """The teacher writes the responses (gen-logits `generate`, T = 1): the student is trained on that text,
    rendered with its own template, and pulled towards the teacher's chunk likelihoods of it; eval's
    sequence-level KL per character falls with it."""
    raw, cache = generated_cross
    config = with_output(raw, tmp_path / "out")
    reader = LogitCacheReader(cache)
    assert reader.manifest.identity["sampling"]  # a generate-mode cache
    teacher_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = {s.sample_id: s for s in reader.iter_samples(shuffle=False, seed=0)}
    collate, _ = prepare_cross_tokenizer(config, reader, AutoTokenizer.from_pretrained(llama_student_dir))
    student_tok = AutoTokenizer.from_pretrained(llama_student_dir)
    for sample_id, alignment in collate.alignments.items():  # the student reads the teacher's own text
        row = rows[sample_id]
        response = row.input_ids[row.positions].tolist()
        ends = set(GenerationConfig.from_pretrained(tiny_model_dir).eos_token_id)  # <|im_end|>, <|endoftext|>
        response = response[:-1] if response[-1] in ends else response
        # The random teacher writes other special tokens too: they are part of the text it wrote.
        written = teacher_tok.decode(response, skip_special_tokens=False).strip()
        student_text = student_tok.decode(alignment.input_ids[alignment.positions].tolist(), skip_special_tokens=True)
        assert written and written in student_text
    before = chunk_gap(AutoModelForCausalLM.from_pretrained(llama_student_dir), config, cache)
    report = train_student.run(config, resume=False)["metrics"]["cross_tokenizer_alignment"]
    # The random teacher writes stray bytes and special tokens, which no chunk tiles: most text still aligns.
    assert report["samples"] == len(rows) and report["aligned_char_share"] > 0.7
    assert report["shared_tail"] == "sampled"
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_student_dir), str(tmp_path / "out"))
    after = chunk_gap(student.eval(), config, cache)
    assert after < before - 0.05, (before, after)
    kl = [evaluate.run(llama_student_dir, cache, adapter=adapter, config=config)["sequence_kl_per_char"]
          for adapter in (None, tmp_path / "out")]
    assert 0 < kl[1] < kl[0], kl


def test_eval_scores_a_student_with_another_tokenizer_on_text(tmp_path, llama_student_dir, generated_cross,
                                                               cross_cache, tiny_model_dir, tiny_dataset_path,
                                                               capsys):
    """NLL per character of the aligned text, each side against a float64 reference from the same alignment;
    the sequence KL only where the teacher wrote the responses; without --config, a clear refusal."""
    raw, cache = generated_cross
    config = with_output(raw, tmp_path / "unused")
    metrics = evaluate.run(llama_student_dir, cache, config=config, batch_size=5)
    collate, report = prepare_cross_tokenizer(config, LogitCacheReader(cache),
                                              AutoTokenizer.from_pretrained(llama_student_dir))
    model = AutoModelForCausalLM.from_pretrained(llama_student_dir, dtype=torch.float64).eval()
    student_ll = teacher_ll = chars = 0.0
    for sample in LogitCacheReader(cache).iter_samples(shuffle=False, seed=0):
        a = collate.alignments[sample.sample_id]
        with torch.no_grad():
            logq = torch.log_softmax(model(input_ids=torch.from_numpy(a.input_ids)[None]).logits[0], -1)
        rows = np.flatnonzero(a.chunk_of_row >= 0)
        student_ll += sum(float(logq[a.positions[r] - 1, a.input_ids[a.positions[r]]]) for r in rows)
        teacher_ll += float(sample.target_logprobs.double()[a.chunk_teacher[1]].sum())
        chars += a.aligned_chars
    assert metrics["samples"] == 24 and report.items() >= metrics["alignment"].items()
    assert "shared_vocab_topk_mass" in metrics["alignment"] and "loss" not in metrics["alignment"]
    assert metrics["aligned_char_share"] == pytest.approx(report["aligned_char_share"])
    assert metrics["student_nll_per_char"] == pytest.approx(-student_ll / chars, rel=1e-5)
    assert metrics["teacher_nll_per_char"] == pytest.approx(-teacher_ll / chars, rel=1e-6)
    assert metrics["sequence_kl_per_char"] == pytest.approx((teacher_ll - student_ll) / chars, rel=1e-4)
    # Labelled responses are not the teacher's samples: NLLs, but no KL.
    labelled = cross_config(cross_cache, tiny_model_dir, tiny_dataset_path, llama_student_dir, tmp_path / "u")
    scored = evaluate.run(llama_student_dir, cross_cache, config=labelled, limit=7, batch_size=3)
    assert scored["samples"] == scored["alignment"]["samples"] == 7  # only the scored samples are aligned
    assert scored["sequence_kl_per_char"] is None and scored["student_nll_per_char"] > 0
    code = cli.main(["eval", "--model", str(llama_student_dir), "--cache", str(cache)])
    assert code == 2 and "--config" in capsys.readouterr().err


def test_shared_tail_settings_the_cache_cannot_serve_are_refused(tmp_path, cross_cache, tiny_model_dir,
                                                                 tiny_dataset_path, llama_student_dir):
    for tail, message in (("sampled", "needs a cache with tail samples"), ("renormalize", "no cross-tokenizer form")):
        config = cross_config(cross_cache, tiny_model_dir, tiny_dataset_path, llama_student_dir, tmp_path / tail,
                              tail=tail)
        with pytest.raises(UserError, match=message):
            train_student.run(config, resume=False)
        assert not (tmp_path / tail).exists()


def test_a_differing_tokenizer_needs_a_cross_tokenizer_loss(tmp_path, cross_cache, tiny_model_dir,
                                                            tiny_dataset_path, llama_student_dir):
    config = cross_config(cross_cache, tiny_model_dir, tiny_dataset_path, llama_student_dir, tmp_path / "out", None)
    with pytest.raises(UserError, match="distillation.cross_tokenizer"):
        train_student.run(config, resume=False)
    assert not (tmp_path / "out").exists()


def test_a_normalizing_student_tokenizer_fails_naming_the_sample(real_tokenizer_dir):
    """Qwen2.5's tokenizer normalizes to NFC: a decomposed accent (e + U+0301) comes back composed, so the
    characters no longer line up with Llama 3's tokens (no normalizer); the sample is named."""
    cross, _, _ = aligner(real_tokenizer_dir("llama3"), real_tokenizer_dir("qwen2_5"))
    fine = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A café."}]
    align(cross, fine)
    decomposed = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A cafe\u0301."}]
    with pytest.raises(UserError, match=r"sample 'rec-7'.*student tokenizer does not decode the assistant text"):
        align(cross, decomposed, sample_id="rec-7")


def test_another_dataset_than_the_caches_is_refused(tmp_path, cross_cache, tiny_model_dir, tiny_dataset_path,
                                                    llama_student_dir):
    other = tmp_path / "other.jsonl"
    other.write_text(tiny_dataset_path.read_text() + "\n")
    config = cross_config(cross_cache, tiny_model_dir, other, llama_student_dir, tmp_path / "out")
    with pytest.raises(UserError, match="not the file the cache was made from"):
        train_student.run(config, resume=False)


def test_cross_tokenizer_settings_are_checked_at_config_load():
    with pytest.raises(UserError, match="distillation.temperature"):
        config_from_dict({"distillation": {"cross_tokenizer": "chunk", "temperature": 2.0}}, Path("."))
    with pytest.raises(UserError, match="one teacher"):
        config_from_dict({"models": {"teacher": ["a", "b"]}, "distillation": {"cross_tokenizer": "uld"}}, Path("."))
    with pytest.raises(UserError, match="not valid"):
        config_from_dict({"distillation": {"cross_tokenizer": "gold"}}, Path("."))
