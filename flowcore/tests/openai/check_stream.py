"""Reads the stand-in server's answers with the official `openai` client, and validates every
chunk against the client's own types (`ChatCompletionChunk`): the stand-in's wire format is
the reference's, not just what `llm_chat` happens to parse.

Usage: check_stream.py BASE_URL; prints one JSON line per case.
"""
import json
import sys

import openai
from openai.types.chat import ChatCompletionChunk

client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0)


def read(**extra):
    out = {"content": "", "calls": [], "usage": None, "finish_reason": None, "model": None}
    stream = client.chat.completions.create(
        model="fake-1",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    for chunk in stream:
        # Strict: the chunk as sent must be a valid ChatCompletionChunk.
        ChatCompletionChunk.model_validate(chunk.to_dict())
        out["model"] = chunk.model
        if chunk.usage is not None:
            out["usage"] = chunk.usage.to_dict()
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                out["content"] += delta.content
            for call in delta.tool_calls or []:
                while len(out["calls"]) <= call.index:
                    out["calls"].append({"id": "", "name": "", "arguments": ""})
                slot = out["calls"][call.index]
                slot["id"] += call.id or ""
                if call.function is not None:
                    slot["name"] += call.function.name or ""
                    slot["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                out["finish_reason"] = choice.finish_reason
    return out


print(json.dumps({"case": "text", **read()}))
print(json.dumps({"case": "tools", **read(tools=[{"type": "function", "function": {
    "name": "lookup", "parameters": {"type": "object", "properties": {}}}}])}))
try:
    read()
    print(json.dumps({"case": "rate_limited", "raised": None}))
except openai.RateLimitError as e:
    print(json.dumps({"case": "rate_limited", "raised": "RateLimitError", "status": e.status_code,
                      "message": e.message, "retry_after": e.response.headers.get("retry-after")}))
