"""End-to-end check of Switchyard with the official `openai` Python client.

Usage: openai_e2e.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)

The proxy must front the Rust tests' MockUpstream through a pool named
`small`, which answers deterministically (see tests/support/mock_upstream.rs):
chat echoes the last user message as "echo:<content>", completions answer
"echo:<prompt>#<sample>" per prompt, embeddings return
[chars, first byte, 1.0]. Exits non-zero with a message on the first failure.
"""

import sys

import openai


def check(condition, message):
    """Fails the run with `message` unless `condition` holds."""
    if not condition:
        raise AssertionError(message)


def chat(client):
    raw = client.chat.completions.with_raw_response.create(
        model="small",
        messages=[{"role": "user", "content": "hello there"}],
    )
    check(
        raw.headers.get("x-switchyard-pool") == "small",
        f"x-switchyard-pool header: {raw.headers.get('x-switchyard-pool')!r}",
    )
    reply = raw.parse()
    content = reply.choices[0].message.content
    check(content == "echo:hello there", f"chat content: {content!r}")
    check(reply.usage.prompt_tokens == 2, f"chat usage: {reply.usage}")


def streaming_chat(client):
    stream = client.chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": "stream these words"}],
        stream=True,
    )
    pieces = []
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    text = "".join(pieces)
    check(text == "echo:stream these words", f"streamed content: {text!r}")
    check(len(pieces) >= 3, f"expected one delta per word, got {pieces!r}")
    check(finish == "stop", f"finish_reason: {finish!r}")


def completions(client):
    prompts = ["one", "two words", "three more words"]
    reply = client.completions.create(model="small", prompt=prompts, max_tokens=4)
    check(len(reply.choices) == 3, f"completion choices: {reply.choices}")
    for k, choice in enumerate(reply.choices):
        check(choice.index == k, f"choice {k} index: {choice.index}")
        want = f"echo:{prompts[k]}#0"
        check(choice.text == want, f"choice {k} text: {choice.text!r}, want {want!r}")
    check(reply.usage.prompt_tokens == 6, f"completion usage: {reply.usage}")
    check(reply.usage.completion_tokens == 6, f"completion usage: {reply.usage}")


def embeddings(client):
    inputs = ["a", "bcd"]
    reply = client.embeddings.create(model="small", input=inputs)
    check(len(reply.data) == 2, f"embedding items: {reply.data}")
    for k, item in enumerate(reply.data):
        want = [float(len(inputs[k])), float(ord(inputs[k][0])), 1.0]
        check(item.index == k, f"embedding {k} index: {item.index}")
        check(item.embedding == want, f"embedding {k}: {item.embedding}, want {want}")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: openai_e2e.py BASE_URL")
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
    for step in (chat, streaming_chat, completions, embeddings):
        try:
            step(client)
        except Exception as error:  # noqa: BLE001 - report any failure
            sys.exit(f"openai e2e: {step.__name__} failed: {error!r}")
        print(f"openai e2e: {step.__name__} ok")


if __name__ == "__main__":
    main()
