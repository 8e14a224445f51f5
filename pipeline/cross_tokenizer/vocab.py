"""The tokens a teacher's and a student's vocabularies share: same text, whatever their ids or spelling.

Token strings are compared as the text they decode to, not as vocabulary entries, so a byte-level BPE
(`Ġthe`) and a SentencePiece vocabulary (`▁the`) agree on " the". Each token is decoded after a fixed
anchor token and the anchor's text is cut off, which keeps the leading space that SentencePiece decoders
drop at the start of a text. Tokens that decode to no whole text (a byte of a multi-byte character), to
the same text as another token of their vocabulary, or that are added/special tokens are not shared;
the end-of-turn tokens are matched by role instead (see `role_pairs`).

`shared_vocab_map(..., project=True)` goes further for the shared-vocabulary term: a teacher token the
student lacks is sent to the student's first token of the same text (" hello" -> " hel" when the student
writes " hel" "lo"), the token the student must emit first to continue with that text. A teacher token's
probability is the probability that the continuation starts with its text; under the student's
tokenization that continuation starts with the projected token (exactly so where the student's
tokenization of the longer text starts with the same token, which pre-tokenization at word boundaries
makes the common case).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_REPLACEMENT = "\ufffd"


def token_texts(tokenizer: Any) -> list[str | None]:
    """The text of every token id (None: added/special, or not a whole text on its own)."""
    size = len(tokenizer)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    backend = tokenizer.backend_tokenizer
    prefix = backend.decode(anchor, skip_special_tokens=False)
    decoded = backend.decode_batch([anchor + [i] for i in range(size)], skip_special_tokens=False)
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.get_added_vocab().values()}
    texts: list[str | None] = []
    for i, text in enumerate(decoded):
        piece = text[len(prefix) :] if text.startswith(prefix) else None
        ok = piece and i not in special and _REPLACEMENT not in piece
        texts.append(piece if ok else None)
    return texts


def shared_vocab_map(
    teacher: Any, student: Any, role_pairs: dict[int, int] | None = None, *, project: bool = False
) -> np.ndarray:
    """int64 [teacher vocabulary]: the student id of each teacher token with the same text, else -1.

    `project`: a teacher token without one goes to the student's first token of its text, when that
    token's text is a prefix of it (see the module docstring). `role_pairs` (teacher id -> student id,
    e.g. <|eot_id|> -> <|im_end|>) are added on top.
    """
    teacher_texts, student_texts = token_texts(teacher), token_texts(student)
    student_ids = _unique_index(student_texts)
    teacher_ids = _unique_index(teacher_texts)
    mapping = np.full(len(teacher_texts), -1, dtype=np.int64)
    for text, t_id in teacher_ids.items():
        s_id = student_ids.get(text)
        if s_id is not None:
            mapping[t_id] = s_id
    missing = [i for i, text in enumerate(teacher_texts) if text is not None and mapping[i] < 0] if project else []
    if missing:
        encoded = student([teacher_texts[i] for i in missing], add_special_tokens=False)["input_ids"]
        for t_id, ids in zip(missing, encoded, strict=True):
            first = student_texts[ids[0]] if ids and ids[0] < len(student_texts) else None
            # A SentencePiece student may write a space of its own first: then its token is no prefix.
            if first is not None and teacher_texts[t_id].startswith(first):
                mapping[t_id] = ids[0]
    for t_id, s_id in (role_pairs or {}).items():
        mapping[t_id] = s_id
    return mapping


def _unique_index(texts: list[str | None]) -> dict[str, int]:
    """text -> id, for texts that exactly one id decodes to."""
    index: dict[str, int] = {}
    repeated: set[str] = set()
    for i, text in enumerate(texts):
        if text is None:
            continue
        if text in index:
            repeated.add(text)
        index[text] = i
    return {text: i for text, i in index.items() if text not in repeated}
