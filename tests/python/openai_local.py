"""The official `openai` Python client against a Switchyard `local` pool.

Usage: openai_local.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)

The proxy must serve the in-process small model as pool `small`. Answers
are the model's own, so the checks are on shapes and on agreement between
calls (greedy decoding repeats itself), not on exact text. Exits non-zero
with a message on the first failure.
"""

import sys

import openai


def check(condition, message):
    """Fails the run with `message` unless `condition` holds."""
    if not condition:
        raise AssertionError(message)


def chat(client):
    reply = client.chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
        logprobs=True,
        top_logprobs=2,
    )
    choice = reply.choices[0]
    check(choice.message.role == "assistant", f"role: {choice.message.role!r}")
    check(choice.message.content, "empty chat answer")
    check(choice.finish_reason in ("stop", "length"), f"finish: {choice.finish_reason}")
    tokens = choice.logprobs.content
    check(len(tokens) == reply.usage.completion_tokens,
          f"{len(tokens)} logprob entries for {reply.usage.completion_tokens} tokens")
    check(all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens),
          "logprob entries out of shape")
    return choice.message.content


def streaming_chat(client, whole):
    stream = client.chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    text = "".join(pieces)
    check(text == whole, f"streamed {text!r}, whole {whole!r}")
    check(usage is not None and usage.completion_tokens > 0, f"usage: {usage}")


def completions(client):
    reply = client.completions.create(
        model="small",
        prompt=["Once upon a time", "The sky is"],
        max_tokens=6,
        temperature=0,
        seed=7,
    )
    check(len(reply.choices) == 2, f"{len(reply.choices)} choices")
    check([c.index for c in reply.choices] == [0, 1], "choice indices")
    check(reply.usage.completion_tokens <= 12, f"usage: {reply.usage}")


def bad_request(client):
    try:
        client.chat.completions.create(
            model="small",
            messages=[{"role": "user", "content": "hi"}],
            temperature=9,
        )
    except openai.BadRequestError as e:
        check(e.body.get("param") == "temperature", f"error body: {e.body}")
    else:
        raise AssertionError("temperature 9 was accepted")


def main():
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
    whole = chat(client)
    streaming_chat(client, whole)
    completions(client)
    bad_request(client)
    print("ok")


if __name__ == "__main__":
    main()
