"""An Ollama Modelfile for an exported checkpoint: its chat template translated into Ollama's Go template language.

A chat template is a Jinja program and Ollama's TEMPLATE a Go text/template: there is no general translation. But
the chat templates of the families this pipeline runs (the demo's, ChatML for SmolLM2 and Qwen, Llama 3, llm-jp-3)
all render a conversation as a sequence of per-role pieces, `prefix + content + suffix`, with a generation prompt at
the end and at most a default system message. So the pieces are read off the template by rendering conversations of
marker strings (`template_pieces`), written as one Go template of that shape (`go_template`), and the result is
checked by rendering the same chats both ways (`render_go`, a renderer for exactly the Go forms emitted here). A
template that does not decompose (the system message folded into the first user turn, as Mistral's does; turns that
depend on their position) is not translated: the export writes no Modelfile and says why in one line.

BOS: a template that writes the BOS text itself (Llama 3's `<|begin_of_text|>`) while the tokenizer also adds it is
compared without it, as the pipeline's own prompts are (prompts.render_prompt): llama.cpp and Ollama add BOS at
tokenization from the GGUF's add_bos_token, so a TEMPLATE that wrote it would double it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

# Marker contents: plain ASCII words that no template rewrites (no spaces to strip, no case to change).
SYSTEM, USER1, ANSWER1, USER2 = "SYSTEMQZXMARK", "USERONEQZXMARK", "ANSWERONEQZXMARK", "USERTWOQZXMARK"


class Untranslatable(Exception):
    """The chat template is not a sequence of per-role pieces; the message says where it differs."""


@dataclass
class Pieces:
    system: tuple  # (prefix, suffix) around a system message's content; suffix None: the content is not used
    user: tuple
    assistant: tuple
    generation: str  # after the last message, where the model starts to answer
    default_system: Optional[str]  # the system message the template adds when none is given (Modelfile SYSTEM)


def _split(text: str, marker: str, where: str) -> tuple:
    if text.count(marker) != 1:
        raise Untranslatable(f"{where}: the message content appears {text.count(marker)} times")
    i = text.index(marker)
    return text[:i], text[i + len(marker):]


def _after(text: str, prefix: str, where: str) -> str:
    if not text.startswith(prefix):
        raise Untranslatable(f"{where}: adding a message changes how the earlier ones are rendered")
    return text[len(prefix):]


def template_pieces(render: Callable[[List[dict], bool], str]) -> Pieces:
    """The per-role pieces of the chat template behind `render(messages, add_generation_prompt)`."""
    u1, a1, u2 = ({"role": "user", "content": USER1}, {"role": "assistant", "content": ANSWER1},
                  {"role": "user", "content": USER2})
    one = render([u1], False)
    head, user_suffix = _split(one, USER1, "one user message")
    two = render([u1, a1], False)
    a_prefix, a_suffix = _split(_after(two, one, "an answer"), ANSWER1, "an answer")
    three = _after(render([u1, a1, u2], False), two, "a second question")
    u_prefix, u_suffix2 = _split(three, USER2, "a second question")
    if u_suffix2 != user_suffix:
        raise Untranslatable("the second user turn ends differently from the first")
    if not head.endswith(u_prefix):
        raise Untranslatable("the first user turn starts differently from the second")
    default = head[:len(head) - len(u_prefix)]
    generation = _after(render([u1], True), one, "the generation prompt")

    with_system = render([{"role": "system", "content": SYSTEM}, u1], False)
    before_user, _ = _split(with_system, USER1, "a system message")
    if not before_user.endswith(u_prefix):
        raise Untranslatable("a system message changes how the user turn after it starts")
    system_block = before_user[:len(before_user) - len(u_prefix)]
    if SYSTEM in system_block:
        system = _split(system_block, SYSTEM, "a system message")
    else:  # the template writes a fixed text for any system message (llm-jp-3's instruction header)
        system = (system_block, None)
    default_system = None
    if default:
        prefix, suffix = system
        if suffix is None or not (default.startswith(prefix) and default.endswith(suffix)) or \
                len(default) < len(prefix) + len(suffix):
            raise Untranslatable("the template adds a default system text that is not a system message")
        default_system = default[len(prefix):len(default) - len(suffix)]
    return Pieces(system, (u_prefix, user_suffix), (a_prefix, a_suffix), generation, default_system)


def _literal(text: str) -> str:
    """Text as it stands in a Go template: verbatim, or as a quoted string where it holds template delimiters."""
    if "{{" in text or "}}" in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # a JSON string is a valid Go string literal
    return text


def go_template(p: Pieces) -> str:
    """Ollama's TEMPLATE for the pieces: every message by its role, then the generation prompt."""
    sys_prefix, sys_suffix = p.system
    system = _literal(sys_prefix) + ("{{ .Content }}" + _literal(sys_suffix) if sys_suffix is not None else "")
    return ('{{ range .Messages }}{{ if eq .Role "system" }}' + system
            + '{{ else if eq .Role "user" }}' + _literal(p.user[0]) + "{{ .Content }}" + _literal(p.user[1])
            + '{{ else if eq .Role "assistant" }}' + _literal(p.assistant[0]) + "{{ .Content }}"
            + _literal(p.assistant[1]) + "{{ end }}{{ end }}" + _literal(p.generation))


# --- a renderer for the Go template forms go_template writes ------------------------------------------------------
_ACTION = re.compile(r'\{\{((?:"(?:[^"\\]|\\.)*"|.)*?)\}\}', re.S)  # a quoted string may hold }}


def _parse(parts: List[tuple], i: int, stop: Sequence[str]) -> tuple:
    """Nodes up to (not including) an action in `stop`; returns (nodes, index of that action)."""
    nodes = []
    while i < len(parts):
        kind, value = parts[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        if value == "end" or value.startswith("else"):
            if (value == "end" and "end" in stop) or (value.startswith("else") and "else" in stop):
                return nodes, i
            raise ValueError(f"unexpected {{{{ {value} }}}}")
        if value == "range .Messages":
            body, i = _parse(parts, i + 1, ("end",))
            nodes.append(("range", body))
            i += 1
        elif value.startswith("if "):
            branches, cond = [], value[3:]
            while True:
                body, i = _parse(parts, i + 1, ("end", "else"))
                branches.append((cond, body))
                action = parts[i][1]
                if action == "end":
                    break
                cond = action[len("else if "):] if action.startswith("else if ") else None
                if action != "else" and not action.startswith("else if "):
                    raise ValueError(f"unsupported {{{{ {action} }}}}")
            nodes.append(("if", branches))
            i += 1
        elif value in (".Content", ".Role"):
            nodes.append(("field", value[1:]))
            i += 1
        elif value.startswith('"'):
            nodes.append(("text", json.loads(value)))
            i += 1
        else:
            raise ValueError(f"unsupported {{{{ {value} }}}}")
    if stop:
        raise ValueError(f"missing {{{{ {stop[0]} }}}}")
    return nodes, i


def _condition(cond: Optional[str], dot: dict) -> bool:
    if cond is None:  # a plain else
        return True
    m = re.fullmatch(r'eq \.Role ("(?:[^"\\]|\\.)*")', cond)
    if not m:
        raise ValueError(f"unsupported condition {cond!r}")
    return dot.get("role") == json.loads(m[1])


def _eval(nodes, dot, messages) -> str:
    out = []
    for kind, value in nodes:
        if kind == "text":
            out.append(value)
        elif kind == "field":
            if dot is None:
                raise ValueError(f".{value} outside range .Messages")
            out.append(dot["content" if value == "Content" else "role"])
        elif kind == "range":
            out += [_eval(value, m, messages) for m in messages]
        else:
            out.append(next((_eval(body, dot, messages) for cond, body in value if _condition(cond, dot)), ""))
    return "".join(out)


def render_go(template: str, messages: List[dict], system: Optional[str] = None) -> str:
    """What Ollama renders for `messages` with this TEMPLATE (the subset go_template writes: text, quoted strings,
    range .Messages, if/else if/else on eq .Role, .Content, .Role). `system`: the Modelfile's SYSTEM, which Ollama
    puts first when the messages have no system message."""
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        parts.append(("text", template[pos:m.start()]))
        action = m[1].strip()
        if action.startswith("-") or action.endswith("-"):
            raise ValueError("whitespace-trimming actions are not supported")
        parts.append(("action", action))
        pos = m.end()
    parts.append(("text", template[pos:]))
    nodes, _ = _parse([p for p in parts if p != ("text", "")], 0, ())
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + list(messages)
    return _eval(nodes, None, messages)


# --- the Modelfile --------------------------------------------------------------------------------------------------
CHECK_CHATS = (
    [{"role": "user", "content": "P-101の定格能力は？"}, {"role": "assistant", "content": "880トンです。"},
     {"role": "user", "content": "担当者は誰ですか？"}],
    [{"role": "system", "content": "工場の質問に答えてください。"}, {"role": "user", "content": "炉-3の温度は？"},
     {"role": "assistant", "content": "1150度です。"}, {"role": "user", "content": "点検は何曜日？"}],
)


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise Untranslatable(f'the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(render: Callable[[List[dict], bool], str], stops: Sequence[str], model_dir: str = "./model"
              ) -> Dict[str, object]:
    """The Modelfile text for the checkpoint at `model_dir` (relative to the Modelfile), with its TEMPLATE checked:
    each of CHECK_CHATS renders through the Go template exactly as `render` (the tokenizer's chat template, with the
    generation prompt) renders it. Raises Untranslatable with the reason otherwise."""
    pieces = template_pieces(render)
    template = go_template(pieces)
    for chat in CHECK_CHATS:
        expected, got = render(chat, True), render_go(template, chat, pieces.default_system)
        if expected != got:
            raise Untranslatable(f"the translated template renders a {len(chat)}-message chat as {got[:60]!r}..., "
                                 f"the chat template as {expected[:60]!r}...")
    lines = [f"FROM {model_dir}", "", f"TEMPLATE {_quoted(template, 'template')}"]
    if pieces.default_system is not None:
        lines.append(f"SYSTEM {_quoted(pieces.default_system, 'default system message')}")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return {"text": "\n".join(lines) + "\n", "template": template, "system": pieces.default_system}


def check_translatable(render) -> Optional[str]:
    """None when the chat template translates, else the one-line reason (for the export's warning)."""
    try:
        modelfile(render, [])
        return None
    except (Untranslatable, ValueError) as e:
        return str(e)

