"""The events of the fake inference server's streaming replies, as TGI's OpenAPI document publishes them:
`/generate_stream` sends one `StreamResponse` per token (the last with `details`), `stream: true`
completions one `Chunk` per token, a last chunk saying why generation ended, the usage (when the request
asked for it with `stream_options`) and `[DONE]`."""

from __future__ import annotations

import time
from typing import Any

EOS_TEXT = "</s>"


def tgi_events(tokens: list[str], finish: str, *, seed: int | None) -> list[dict[str, Any]]:
    """`StreamResponse` events for `tokens`; TGI streams the end-of-sequence token too, as a special one."""
    texts = [*tokens, EOS_TEXT] if finish == "eos_token" else tokens
    events: list[dict[str, Any]] = [
        {
            "index": i,
            "token": {
                "id": i + 1,
                "text": text,
                "logprob": -0.25,
                "special": finish == "eos_token" and i == len(tokens),
            },
            "generated_text": None,
            "details": None,
        }
        for i, text in enumerate(texts)
    ]
    events[-1]["generated_text"] = "".join(tokens)
    events[-1]["details"] = {
        "finish_reason": finish,
        "generated_tokens": len(texts),
        "input_length": 1,
        "seed": seed,
    }
    return events


def completion_chunks(
    tokens: list[str],
    finish: str,
    *,
    stop: list[str],
    model: str,
    fingerprint: str,
    stop_reason_field: bool,
    prompt_tokens: int,
    include_usage: bool,
) -> list[dict[str, Any]]:
    """`Chunk`s for `tokens`: the text before a stop string only (as OpenAI and vLLM send it), then the
    finish reason, then the usage when asked."""
    text = "".join(tokens)
    matched = next((s for s in stop if s in text), None)
    shown = text[: text.index(matched)] if matched is not None else text
    pieces: list[str] = []
    for token in tokens:
        room = len(shown) - sum(len(p) for p in pieces)
        if room <= 0:
            break
        pieces.append(token[:room])
    base = {"id": "cmpl-stream", "object": "text_completion", "created": int(time.time()), "model": model}
    base["system_fingerprint"] = fingerprint
    chunks = [{**base, "choices": [{"index": 0, "text": p, "finish_reason": ""}]} for p in pieces]
    last: dict[str, Any] = {
        "index": 0,
        "text": "",
        "finish_reason": "length" if finish == "length" else "stop",
    }
    if stop_reason_field:
        last["stop_reason"] = matched
    chunks.append({**base, "choices": [last]})
    if include_usage:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        chunks.append({**base, "choices": [], "usage": usage})
    return chunks
