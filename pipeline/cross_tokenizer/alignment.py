"""Aligning the teacher's and the student's tokenizations of the same assistant text, by characters.

Each side renders the conversation with its own chat template (pipeline.alignment.ChatRenderer), so
prompts, headers and whitespace around the turns may differ; what both renderings share character for
character is each assistant message's own text (its reasoning and answer cores). Only that text is
aligned, plus each turn's end-of-turn token, which is matched by role (`<|eot_id|>` to `<|im_end|>`),
never by string.

Within one core, a *boundary* is a character offset where a token of that side starts or ends, counting
only tokens that lie wholly inside the core. A *chunk* is the text between two consecutive boundaries
that both sides share, provided each side's tokens tile it exactly (no token reaches outside it, none
overlaps another: a byte-level token split inside a multi-byte character breaks the tiling) and all of
them are response tokens (they are in the cache's positions on the teacher side, before the student's
`max_seq_length` cut on the other). Both sides then predict exactly the same characters in a chunk from
the same text before it, which is what makes their chunk likelihoods comparable. Characters outside
every chunk are reported, not trained by the chunk loss (the student's CE still covers them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.alignment import ChatRenderer, Encoding, Message
from pipeline.errors import UserError


@dataclass
class SampleAlignment:
    """The student's tokens of one sample and how its response rows meet the teacher's cache rows.

    Rows are response rows: index j on the student side is `positions[j]`, on the teacher side row j of
    the cache sample (its `positions[j]`).
    """

    sample_id: str
    input_ids: np.ndarray  # int64 [L] the student's tokens, cut at max_seq_length
    positions: np.ndarray  # int64 [R] the student's response token indices (t >= 1)
    chunk_of_row: np.ndarray  # int64 [R] each student row's chunk, -1 in none
    chunk_teacher: np.ndarray  # int64 [2, M] (chunk, teacher row) for every teacher row in a chunk
    num_chunks: int
    one_to_one: np.ndarray  # int64 [R] the teacher row of a chunk that is one token on both sides, else -1
    chunk_start: np.ndarray  # int64 [R] on a chunk's first student row, the chunk's first teacher row, else -1
    paired: np.ndarray  # int64 [R] the teacher row whose token holds the student token's first character
    response_chars: int  # characters of the assistant text (cores) on the student side
    aligned_chars: int  # of which inside chunks


class CrossAligner:
    """Aligns cache samples (teacher tokens) with the student's rendering of the same conversations."""

    def __init__(self, teacher: ChatRenderer, student: ChatRenderer, max_seq_length: int):
        self.teacher, self.student = teacher, student
        self.max_seq_length = max_seq_length

    def end_of_turn_pair(self) -> dict[int, int]:
        """{teacher end-of-turn id: student end-of-turn id}, read from both renderings of a probe turn."""
        probe: list[Message] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        ids = [_eot_id(renderer.encode(probe, "end-of-turn probe")) for renderer in (self.teacher, self.student)]
        return {ids[0]: ids[1]} if None not in ids else {}

    def align(
        self, sample_id: str, messages: list[Message], cache_ids: np.ndarray, cache_positions: np.ndarray, where: str,
        *, teacher: Encoding | None = None, ended: bool = True,
    ) -> SampleAlignment:
        """`teacher`: the teacher's side read from a generate-mode cache's ids (pipeline.cross_tokenizer.
        generated), else it is rendered from `messages` and must be the cache's sequence. `ended` False: the
        last response was cut before its end of turn, so the student's end-of-turn token is no response row."""
        length = len(cache_ids)
        if teacher is None:
            teacher = self.teacher.encode(messages, where)
            if teacher.input_ids[:length] != [int(i) for i in cache_ids]:
                raise UserError(
                    f"{where}: sample {sample_id!r}: the teacher tokenizer's rendering of this record is not the "
                    "token sequence in the cache: was the cache written from this dataset, with this teacher and "
                    "chat template?"
                )
        student = self.student.encode(messages, where)
        if not ended and student.pieces:
            student = _without_last_end_of_turn(student)
        if len(teacher.pieces) != len(student.pieces):
            raise UserError(
                f"{where}: sample {sample_id!r}: the teacher's template shows {len(teacher.pieces)} assistant "
                f"turns, the student's {len(student.pieces)}: both must write every assistant turn."
            )
        for side, encoding in (("teacher", teacher), ("student", student)):
            _check_decodes(encoding, side, self.teacher.tokenizer if side == "teacher" else self.student.tokenizer,
                           sample_id, where)
        keep = min(len(student.input_ids), self.max_seq_length)
        s_rows = _row_index(student.positions, keep)
        t_rows = _row_index([int(p) for p in cache_positions], length)
        builder = _ChunkBuilder(len(s_rows.positions))
        response_chars = 0
        for t_turn, s_turn in zip(teacher.pieces, student.pieces, strict=True):
            if len(t_turn.cores) != len(s_turn.cores):
                raise UserError(f"{where}: sample {sample_id!r}: the two templates write different parts of an "
                                "assistant turn (reasoning kept by one, dropped by the other).")
            for (ta, tb), (sa, sb) in zip(t_turn.cores, s_turn.cores, strict=True):
                if teacher.text[ta:tb] != student.text[sa:sb]:
                    raise UserError(f"{where}: sample {sample_id!r}: the templates write an assistant message "
                                    "differently; cross-tokenizer alignment needs it verbatim on both sides.")
                response_chars += sb - sa
                builder.core(_tokens_in(teacher, ta, tb, t_rows), _tokens_in(student, sa, sb, s_rows), sb - sa)
            if t_turn.eot and s_turn.eot:
                t_row = t_rows.row(_token_at(teacher, t_turn.eot))
                s_row = s_rows.row(_token_at(student, s_turn.eot))
                if t_row >= 0 and s_row >= 0:
                    builder.chunk([t_row], [s_row], 0)
        return SampleAlignment(
            sample_id=sample_id,
            input_ids=np.asarray(student.input_ids[:keep], dtype=np.int64),
            positions=np.asarray(s_rows.positions, dtype=np.int64),
            chunk_of_row=builder.chunk_of_row,
            chunk_teacher=np.asarray([builder.teacher_chunks, builder.teacher_rows], dtype=np.int64).reshape(2, -1),
            num_chunks=builder.num_chunks,
            one_to_one=builder.one_to_one,
            chunk_start=builder.chunk_start,
            paired=builder.paired,
            response_chars=response_chars,
            aligned_chars=builder.aligned_chars,
        )


class _RowIndex:
    """Response token index -> row, for the tokens before a cut."""

    def __init__(self, positions: list[int]):
        self.positions = positions
        self._rows = {t: j for j, t in enumerate(positions)}

    def row(self, token: int | None) -> int:
        return -1 if token is None else self._rows.get(token, -1)


def _row_index(positions: list[int], cut: int) -> _RowIndex:
    return _RowIndex([t for t in positions if t < cut])


def _tokens_in(encoding: Encoding, start: int, end: int, rows: _RowIndex) -> list[tuple[int, int, int]]:
    """(start, end, row) relative to the core of every token wholly inside [start, end), in order;
    row -1 for a token that is no response row (untrained or cut)."""
    found = []
    for t in encoding.overlapping(start, end):
        a, b = encoding.offsets[t]
        if b <= a:
            continue
        if a >= start and b <= end:
            found.append((a - start, b - start, rows.row(t)))
        else:  # straddles the core's edge: its characters belong to no chunk
            found.append((max(a, start) - start, min(b, end) - start, -2))
    return found


def _without_last_end_of_turn(encoding: Encoding) -> Encoding:
    """The encoding with its last turn's end-of-turn token neither a response token nor an aligned piece."""
    last = encoding.pieces[-1]
    token = _token_at(encoding, last.eot) if last.eot else None
    return dataclasses.replace(
        encoding,
        positions=[t for t in encoding.positions if t != token],
        pieces=[*encoding.pieces[:-1], dataclasses.replace(last, eot=None)],
    )


def _token_at(encoding: Encoding, span: tuple[int, int]) -> int | None:
    """The token whose characters are exactly `span` (an added token such as the end-of-turn)."""
    return next((t for t in encoding.overlapping(*span) if encoding.offsets[t] == tuple(span)), None)


def _eot_id(encoding: Encoding) -> int | None:
    eot = encoding.pieces[-1].eot if encoding.pieces else None
    token = _token_at(encoding, eot) if eot else None
    return None if token is None else encoding.input_ids[token]


class _ChunkBuilder:
    def __init__(self, student_rows: int):
        self.chunk_of_row = np.full(student_rows, -1, dtype=np.int64)
        self.one_to_one = np.full(student_rows, -1, dtype=np.int64)
        self.chunk_start = np.full(student_rows, -1, dtype=np.int64)
        self.paired = np.full(student_rows, -1, dtype=np.int64)
        self.teacher_chunks: list[int] = []
        self.teacher_rows: list[int] = []
        self.num_chunks = 0
        self.aligned_chars = 0

    def chunk(self, t_rows: list[int], s_rows: list[int], chars: int) -> None:
        c = self.num_chunks
        self.num_chunks += 1
        self.teacher_chunks += [c] * len(t_rows)
        self.teacher_rows += t_rows
        self.chunk_of_row[s_rows] = c
        # Both sides' first tokens of a chunk start at the same character: their next-token
        # distributions describe the same continuation (the shared-vocabulary term compares them).
        self.chunk_start[s_rows[0]] = t_rows[0]
        if len(t_rows) == 1 and len(s_rows) == 1:
            self.one_to_one[s_rows[0]] = t_rows[0]
            self.paired[s_rows[0]] = t_rows[0]
        self.aligned_chars += chars

    def core(self, t_tokens: list[tuple[int, int, int]], s_tokens: list[tuple[int, int, int]], length: int) -> None:
        # ULD's pairing: each student token with the teacher token that holds its first character.
        owner = np.full(length + 1, -1, dtype=np.int64)
        for a, b, row in t_tokens:
            if row >= 0:
                owner[a:b] = row
        for a, _, row in s_tokens:
            if row >= 0:
                self.paired[row] = owner[a]
        inside_t = [tok for tok in t_tokens if tok[2] != -2]
        inside_s = [tok for tok in s_tokens if tok[2] != -2]
        common = sorted(_bounds(inside_t) & _bounds(inside_s))
        t_at, s_at = _by_start(inside_t), _by_start(inside_s)
        for lo, hi in zip(common, common[1:], strict=False):
            t_rows, s_rows = _tiling(t_at, lo, hi), _tiling(s_at, lo, hi)
            if t_rows and s_rows:
                self.chunk(t_rows, s_rows, hi - lo)


def _bounds(tokens: list[tuple[int, int, int]]) -> set[int]:
    return {a for a, _, _ in tokens} | {b for _, b, _ in tokens}


def _by_start(tokens: list[tuple[int, int, int]]) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for a, b, row in tokens:
        out.setdefault(a, []).append((b, row))
    return out


def _tiling(starts: dict[int, list[tuple[int, int]]], lo: int, hi: int) -> list[int] | None:
    """The rows of tokens that tile [lo, hi) one after another, each a response row; None if they don't."""
    rows, at = [], lo
    while at < hi:
        here = starts.get(at, [])
        if len(here) != 1 or here[0][1] < 0 or here[0][0] > hi:  # overlapping, untrained or reaching out
            return None
        at, row = here[0]
        rows.append(row)
    return rows if at == hi else None


def _check_decodes(encoding: Encoding, side: str, tokenizer: Any, sample_id: str, where: str) -> None:
    """The tokens over each assistant text must decode back to it: a normalizing tokenizer (lowercasing,
    NFKC, stripped accents) breaks character alignment, and the sample that shows it is named."""
    for piece in encoding.pieces:
        for start, end in piece.cores:
            ids = [encoding.input_ids[t] for t in encoding.overlapping(start, end)]
            decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            core = encoding.text[start:end]
            if core not in decoded:
                pairs = enumerate(zip(core, decoded, strict=False))
                first = next((i for i, (x, y) in pairs if x != y), min(len(core), len(decoded)))
                raise UserError(
                    f"{where}: sample {sample_id!r}: the {side} tokenizer does not decode the assistant text back "
                    f"to itself (at character {first}: {core[max(0, first - 20):first + 20]!r} decodes as "
                    f"{decoded[max(0, first - 20):first + 20]!r}); it normalizes text, so the two tokenizations "
                    "cannot be aligned by characters. Use a tokenizer without a normalizer on that side."
                )
