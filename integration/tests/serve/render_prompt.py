"""Prints the prompt a chat template gives a conversation in OpenAI's form, rendered as vLLM hands
it to transformers: tool-call arguments parsed from their JSON text into objects, `tools` as given.

usage: render_prompt.py CONVERSATION_JSON TEMPLATE   (needs jinja2; see serve.rs)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"))
from render import environment  # noqa: E402


def template_messages(messages):
    """The messages as templates read them: content None as "", arguments as objects."""
    out = []
    for m in messages:
        m = {**m, "content": m.get("content") or ""}
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"] or "{}")}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def main():
    conversation = json.loads(Path(sys.argv[1]).read_text())
    template = environment().from_string(Path(sys.argv[2]).read_text())
    text = template.render(
        messages=template_messages(conversation["messages"]),
        tools=conversation["tools"],
        add_generation_prompt=True,
        bos_token="",
        eos_token="",
    )
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
