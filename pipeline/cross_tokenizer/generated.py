"""The teacher's side of a generate-mode cache: its text and character offsets, read from the sampled ids.

In `generate` mode the teacher wrote each response itself, so the cache's token ids are the truth and the
response text is what they decode to. A sampled tokenization need not be the one the tokenizer gives that
text (sampling can pick "th" + "e" where encoding the text gives "the"), so this side is never tokenized
again: each response token's characters end where the decoding of the response up to it ends. Tokens that
end inside a multi-byte character share its span with the token that completes it, so no chunk splits it.
The prompt is the teacher's rendering with its generation prompt, exactly as gen-logits tokenized it.
A response cut at `max_new_tokens` has no end-of-turn token: the caller then leaves the student's
end-of-turn untrained too, as the same-tokenizer path does.
"""

from __future__ import annotations

from typing import Any

from pipeline.alignment import AssistantPieces, ChatRenderer, Encoding, Message, message_cores
from pipeline.errors import UserError

_WINDOW = 6  # tokens of context for incremental decoding (SentencePiece's leading space needs one)


def generated_encoding(
    renderer: ChatRenderer, prompt: list[Message], cache_ids: list[int], first_response: int,
    end_of_turn: set[int], sample_id: str, where: str,
) -> tuple[Encoding, list[Message], bool]:
    """(the teacher's encoding, the conversation with the response as its last message, whether it ended)."""
    tokenizer = renderer.tokenizer
    prompt_text = renderer.render(prompt, add_generation_prompt=True, where=where)
    encoded = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != cache_ids[:first_response]:
        raise UserError(
            f"{where}: sample {sample_id!r}: the teacher tokenizer's rendering of this prompt is not the prompt "
            "in the cache: was the cache written from this dataset, with this teacher and chat template?"
        )
    response = cache_ids[first_response:]
    ended = bool(response) and response[-1] in end_of_turn
    body = response[:-1] if ended else response
    content, spans = _decode_with_offsets(tokenizer, body)
    base = len(prompt_text)
    text = prompt_text + content
    offsets = [tuple(o) for o in encoded["offset_mapping"]] + [(base + a, base + b) for a, b in spans]
    eot = None
    if ended:
        marker = tokenizer.decode(response[-1:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        eot = (len(text), len(text) + len(marker))
        offsets.append(eot)
        text += marker
    # The message's reasoning and answer cores, as the renderer locates them in a template.
    cores = [(base + a, base + b) for a, b in message_cores(content).values() if b > a]
    positions = list(range(first_response, len(cache_ids)))
    encoding = Encoding(text, list(cache_ids), offsets, positions, [AssistantPieces(cores, eot)])
    return encoding, [*prompt, {"role": "assistant", "content": content}], ended


def _decode_with_offsets(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of `ids` and each token's (start, end) in it, by incremental decoding over a short window
    (as vLLM's detokenizer does); the pieces must add up to the whole decoding, else the exact (quadratic)
    decoding of every prefix is used."""
    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    whole = decode(ids)
    for window in (_WINDOW, len(ids)):
        spans, pieces, pending, cursor = [], [], 0, 0
        for i in range(len(ids)):
            start = max(0, i - pending - window)
            before, after = decode(ids[start : i - pending]), decode(ids[start : i + 1])
            if after.endswith("\ufffd") and i + 1 < len(ids):
                pending += 1  # a multi-byte character not finished yet
                continue
            piece = after[len(before):] if after.startswith(before) else None
            if piece is None:
                break
            pieces.append(piece)
            spans += [(cursor, cursor + len(piece))] * (pending + 1)
            cursor, pending = cursor + len(piece), 0
        if "".join(pieces) == whole and len(spans) == len(ids):
            return whole, spans
    raise UserError("A generated response does not decode token by token into its whole text (the tokenizer's "
                    "decoder is not prefix-stable); its characters cannot be aligned.")
