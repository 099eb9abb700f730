"""An agent using an official SDK with a placeholder key. Configured only by the environment
(HTTPS_PROXY and the CA variables), as `keyswap dev` prints them.

usage: chat.py anthropic|openai plain|stream
"""
import sys

KEY = "keyswap-injected-by-proxy"
MESSAGES = [{"role": "user", "content": "Say hello"}]
provider, mode = sys.argv[1], sys.argv[2]

if provider == "anthropic":
    import anthropic

    client = anthropic.Anthropic(api_key=KEY, max_retries=0, timeout=20)
    if mode == "stream":
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES) as stream:
            text = "".join(stream.text_stream)
            usage = stream.get_final_message().usage.output_tokens
    else:
        message = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES)
        text, usage = message.content[0].text, message.usage.output_tokens
elif provider == "openai":
    import openai

    client = openai.OpenAI(api_key=KEY, max_retries=0, timeout=20)
    if mode == "stream":
        text, usage = "", None
        for chunk in client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage.completion_tokens
    else:
        completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        text, usage = completion.choices[0].message.content, completion.usage.completion_tokens
else:
    sys.exit(f"unknown provider {provider}")

print(f"{provider} {mode}: {text} (output tokens: {usage})")
