"""Which tokens of a rendered conversation are response tokens, for any chat template.

The conversation is rendered once, whole, with its chat template. To find each assistant turn in that
rendering it is rendered a second time with the turn's text replaced by sentinels (the reasoning inside
`<think>...</think>` and the answer after it, each stripped of surrounding whitespace, get one each);
putting the real text back in place of the sentinels must give the real rendering character for
character, or the sample is refused. So templates that drop earlier turns' reasoning (Qwen3), trim
content (Llama 3, Gemma), add a default system prompt (Qwen2.5) or start with an assistant turn are all
located exactly, and the template is never asked to render a partial conversation.

An assistant turn's trained characters run from the end of the template's generation prompt (the text
`add_generation_prompt` appends, e.g. `<|im_start|>assistant\\n`) to the end of the turn's end-of-turn
marker: the first added token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`) that the template writes after
the content, read from the rendering itself, never from `tokenizer.eos_token`; what follows it (a newline)
is not trained. A template with `{% generation %}` blocks defines the trained characters itself.
`reasoning = "context"` leaves each turn's `<think>...</think>` block (and the whitespace before the answer)
untrained and renders with `enable_thinking=False`; `"train"` trains it as rendered. A token is a response
token when any of its characters is trained (a byte-level token that straddles the generation prompt and
the answer is trained).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.errors import UserError

Message = dict[str, str]
Reasoning = Literal["train", "context"]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = [{"role": "user", "content": "kdprobe"}]


@dataclass
class _Turn:
    """One assistant turn located in the real rendering (character offsets)."""

    first: int  # start of its first located text (reasoning, else answer)
    answer: tuple[int, int]  # the answer's non-whitespace core
    segment_start: int  # end of the previous located text: the turn's header lies in between
    cores: list[tuple[int, int]] = field(default_factory=list)  # its located texts: reasoning, answer


@dataclass
class AssistantPieces:
    """Where one assistant turn's own text and end-of-turn token lie in a rendering (character offsets)."""

    cores: list[tuple[int, int]]  # the message's reasoning and answer text, non-empty, in order
    eot: tuple[int, int] | None  # the end-of-turn token after the answer (None: the template writes none)


@dataclass
class Encoding:
    """A conversation rendered and tokenized: what cross-tokenizer alignment needs of each side."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]  # each token's characters in `text`, ascending with the text
    positions: list[int]  # response tokens
    pieces: list[AssistantPieces]  # per assistant turn

    def __post_init__(self) -> None:
        self._starts = [a for a, _ in self.offsets]
        self._ends = [b for _, b in self.offsets]

    def overlapping(self, start: int, end: int) -> range:
        """The tokens whose characters overlap [start, end), found by bisection (no scan of the sequence)."""
        first = bisect.bisect_right(self._ends, start)  # the first token ending after `start`
        return range(first, max(first, bisect.bisect_left(self._starts, end)))


class ChatRenderer:
    """A chat template bound to a tokenizer: renders conversations and locates their responses."""

    def __init__(self, tokenizer: Any, template: str | None, reasoning: Reasoning = "train"):
        template = template if template is not None else getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise UserError("The tokenizer has no chat template: set `dataset.template` to a Jinja template file.")
        self.tokenizer = tokenizer
        self.template = template
        self.reasoning = reasoning
        self.has_generation_blocks = bool(_GENERATION_BLOCK.search(template))
        # Only `context` sets enable_thinking (to False): `train` renders as the template does by default.
        default = dict(tokenizer.special_tokens_map)
        non_thinking = {**default, "enable_thinking": False}
        self._kwargs = non_thinking if reasoning == "context" else default
        # Longest first, so `<|im_end|>` wins over any shorter added token it starts with.
        self._added_tokens = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        # Both modes' prompts: Qwen3 writes earlier turns after the plain header either way.
        self.generation_prompts = sorted({self._generation_prompt(kw) for kw in (default, non_thinking)} - {""})

    def render(self, messages: list[Message], *, add_generation_prompt: bool, where: str = "") -> str:
        return self._render(messages, add_generation_prompt, where)[0]

    def tokenize(self, messages: list[Message], where: str) -> tuple[list[int], list[int]]:
        """(input ids of the whole conversation, indices t >= 1 of its response tokens)."""
        encoding = self.encode(messages, where)
        return encoding.input_ids, encoding.positions

    def encode(self, messages: list[Message], where: str) -> Encoding:
        """The rendering, its tokens with character offsets, the response tokens and each turn's pieces."""
        text, spans, turns = self._spans(messages, where)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in encoded["offset_mapping"]]
        trained = np.zeros(len(text) + 1, dtype=np.int64)
        for start, end in spans:
            trained[start + 1 : end + 1] = 1
        cumulative = np.cumsum(trained)  # cumulative[c] = trained characters before c
        positions = [
            t
            for t, (start, end) in enumerate(offsets)
            if t >= 1 and cumulative[min(max(end, start + 1), len(text))] > cumulative[min(start, len(text))]
        ]
        pieces = [self._pieces(text, turn) for turn in turns]
        return Encoding(text, list(encoded["input_ids"]), offsets, positions, pieces)

    def response_spans(self, messages: list[Message], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendering and its trained character spans (sorted, disjoint)."""
        return self._spans(messages, where)[:2]

    def _spans(self, messages: list[Message], where: str) -> tuple[str, list[tuple[int, int]], list[_Turn]]:
        text, generation_blocks = self._render(messages, False, where)
        turns = self._locate_turns(messages, text, where)
        ends = [turn.answer[1] + self._end_marker(text, turn.answer[1]) for turn in turns]
        if self.has_generation_blocks:
            spans = [tuple(block) for block in generation_blocks]
        else:
            spans = [(self._head_end(text, turn), end) for turn, end in zip(turns, ends, strict=True)]
        if self.reasoning == "context":
            # Everything from the previous turn's end to this answer: the think block, never a response.
            holes = [(start, turn.answer[0]) for start, turn in zip([0, *ends][: len(turns)], turns, strict=True)]
            spans = _subtract(spans, [(s, e) for s, e in holes if THINK_CLOSE in text[s:e]])
        return text, [(s, e) for s, e in spans if e > s], turns

    def _pieces(self, text: str, turn: _Turn) -> AssistantPieces:
        """A turn's own message text (non-empty cores) and its end-of-turn token, as character spans."""
        marker = self._end_marker(text, turn.answer[1])
        rest = text[turn.answer[1] : turn.answer[1] + marker]
        eot = (turn.answer[1] + len(rest) - len(rest.lstrip()), turn.answer[1] + marker) if marker else None
        return AssistantPieces([c for c in turn.cores if c[1] > c[0]], eot)

    def _locate_turns(self, messages: list[Message], text: str, where: str) -> list[_Turn]:
        salt = _free_salt(messages)
        marked, cores = [], {}
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                marked.append(m)
                continue
            content, replaced = m["content"], []
            for kind, (start, end) in message_cores(m["content"]).items():
                if end > start or kind == "answer":  # an empty answer still marks where the turn is
                    replaced.append((start, end, f"kd{salt}x{len(cores)}z"))
                    cores[replaced[-1][2]] = (i, kind, m["content"][start:end])
            for start, end, sentinel in sorted(replaced, reverse=True):
                content = content[:start] + sentinel + content[end:]
            marked.append({"role": "assistant", "content": content})
        sentinel_text = self._render(marked, False, where)[0]
        turns: dict[int, _Turn] = {}
        rebuilt, cursor, previous_end, seen = [], 0, 0, set()
        for match in re.finditer(rf"kd{salt}x\d+z", sentinel_text):
            i, kind, core = cores.get(match.group(), (-1, "", ""))
            if i < 0 or match.group() in seen or (i in turns and kind == "reasoning"):
                raise UserError(f"{where}: the chat template repeats or reorders assistant text; "
                                "response tokens cannot be located.")
            seen.add(match.group())
            rebuilt.append(sentinel_text[cursor : match.start()])
            start = sum(map(len, rebuilt))
            rebuilt.append(core)
            cursor = match.end()
            if i not in turns:
                turns[i] = _Turn(first=start, answer=(start, start + len(core)), segment_start=previous_end)
            if kind == "answer":
                turns[i].answer = (start, start + len(core))
            turns[i].cores.append((start, start + len(core)))
            previous_end = start + len(core)
        rebuilt.append(sentinel_text[cursor:])
        answers = {sentinel for sentinel, (_, kind, _) in cores.items() if kind == "answer"}
        if "".join(rebuilt) != text or not answers <= seen:
            raise UserError(
                f"{where}: the chat template changes or drops the text of an assistant message beyond whitespace, "
                "so its tokens cannot be located in the rendering; use a template (`dataset.template`) that "
                "writes assistant messages as given."
            )
        return [turns[i] for i in sorted(turns)]

    def _head_end(self, text: str, turn: _Turn) -> int:
        """Where the turn's generated text begins: after the last generation prompt before its first text."""
        found = [(text.rfind(p, turn.segment_start, turn.first), len(p)) for p in self.generation_prompts]
        return max((cut + size for cut, size in found if cut >= 0), default=turn.first)

    def _end_marker(self, text: str, answer_end: int) -> int:
        """Length of the end-of-turn marker right after the answer: whitespace + the first added token."""
        rest = text[answer_end:]
        gap = len(rest) - len(rest.lstrip())
        token = next((t for t in self._added_tokens if rest.startswith(t, gap)), None)
        return gap + len(token) if token else 0

    def _generation_prompt(self, kwargs: dict[str, Any]) -> str:
        """What `add_generation_prompt` appends to a one-user-turn conversation (`""` if unknown)."""
        try:
            bare = self._render(_PROBE, False, "", kwargs)[0]
            prompted = self._render(_PROBE, True, "", kwargs)[0]
        except UserError:
            return ""
        if prompted.startswith(bare) and len(prompted) > len(bare):
            return prompted[len(bare) :]
        # Templates that always append it (Llama 3's original): what follows the turn's end-of-turn token.
        end = prompted.rfind(_PROBE[0]["content"]) + len(_PROBE[0]["content"])
        return prompted[end + self._end_marker(prompted, end) :]

    def _render(
        self, messages: list[Message], add_generation_prompt: bool, where: str, kwargs: dict[str, Any] | None = None
    ) -> tuple[str, list]:
        from transformers.utils.chat_template_utils import render_jinja_template

        kwargs = self._kwargs if kwargs is None else kwargs
        try:
            rendered, blocks = render_jinja_template(
                [messages], chat_template=self.template, add_generation_prompt=add_generation_prompt,
                return_assistant_tokens_mask=self.has_generation_blocks, **kwargs,
            )
        except Exception as exc:  # a template's raise_exception() or any Jinja error: the record's fault
            raise UserError(f"{where}: the chat template cannot render this conversation: {exc}") from None
        return rendered[0], (blocks[0] if blocks else [])


def message_cores(content: str) -> dict[str, tuple[int, int]]:
    """Non-whitespace cores of the reasoning (inside <think>...</think>, if any) and of the answer after it."""
    close = content.find(THINK_CLOSE)
    if close < 0:
        return {"answer": _strip_span(content, 0, len(content))}
    opened = content.rfind(THINK_OPEN, 0, close)
    start = opened + len(THINK_OPEN) if opened >= 0 else 0
    return {
        "reasoning": _strip_span(content, start, close),
        "answer": _strip_span(content, close + len(THINK_CLOSE), len(content)),
    }


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    piece = text[start:end]
    if not piece.strip():
        return end, end  # an empty core sits after the whitespace
    lead = len(piece) - len(piece.lstrip())
    return start + lead, start + len(piece.rstrip())


def _free_salt(messages: list[Message]) -> str:
    """A sentinel prefix that occurs in no message."""
    salt = "span"
    while any(f"kd{salt}x" in m["content"] for m in messages):
        salt += "q"
    return salt


def _subtract(spans: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for start, end in spans:
        pieces = [(start, end)]
        for h_start, h_end in holes:
            pieces = [p for s, e in pieces for p in ((s, min(e, h_start)), (max(s, h_end), e)) if p[1] > p[0]]
        out.extend(pieces)
    return out
