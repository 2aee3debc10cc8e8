"""The chat templates xwin.cu knows, as data: one definition for the Python side
(dev/export_tokenizer.py records a template in the tokenizer file, and
dev/data/prepare_sft.py / prepare_pairs.py render with it); llm.cu's ChatTemplate
reads the same fields from the tokenizer file ("The chat template").

A conversation [system], user, assistant, user, assistant, ... renders as

    begin
    system_prefix + system + system_suffix     (system: the system message, else
                                                default_system; no block when there is
                                                no system message and no default)
    per turn pair:
      user_prefix + user + user_suffix
      assistant_prefix + ASSISTANT + END + after_assistant

The loss mask is 1 on the tokens that overlap an assistant content or its END (the
end-of-turn text, assistant_end), 0 elsewhere. With `trim` every content is stripped
of leading and trailing whitespace first (Jinja's trim, Python's str.strip). The
generation prompt is the conversation so far, then user_prefix + user + user_suffix +
assistant_prefix; with `prompt_strips_space` the prompt's assistant_prefix loses its
trailing space unless the tokenizer is byte-level (kind 1): a SentencePiece or BPE
model's first answer token carries its own space (Vicuna v1.1 as Xwin-LM uses it).

"{bos}" and "{eos}" in a field stand for the tokenizer's BOS and EOS text; the exporter
writes the text itself into the tokenizer file.

Each template also has the Jinja source that transformers' apply_chat_template runs for
it (`jinja`): the exporter matches a Hugging Face folder's chat template by rendering a
probe conversation with both and comparing.
"""

VICUNA_DEFAULT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the user's questions.")

FIELDS = ("name", "begin", "default_system", "system_prefix", "system_suffix", "user_prefix", "user_suffix",
          "assistant_prefix", "assistant_end", "after_assistant")
FLAG_TRIM = 1 << 0
FLAG_PROMPT_STRIPS_SPACE = 1 << 1

TEMPLATES = {
    # Xwin-LM's (FastChat "vicuna_v1.1"): <s>{system} USER: {user} ASSISTANT: {assistant}</s>USER: ...
    "vicuna_v1.1": dict(
        begin="{bos}", default_system=VICUNA_DEFAULT_SYSTEM, system_prefix="", system_suffix=" ",
        user_prefix="USER: ", user_suffix=" ", assistant_prefix="ASSISTANT: ", assistant_end="{eos}",
        after_assistant="", flags=FLAG_PROMPT_STRIPS_SPACE,
        jinja=("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
               "{% set loop_messages = messages[1:] %}{% else %}{{ '" + VICUNA_DEFAULT_SYSTEM.replace("'", "\\'") +
               " ' }}{% set loop_messages = messages %}{% endif %}"
               "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
               "{{ 'USER: ' + message['content'] + ' ' }}{% else %}"
               "{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")),
    # Meta Llama 3 Instruct (8B, 70B): no system block unless there is a system message
    "llama3": dict(
        begin="<|begin_of_text|>", default_system="",
        system_prefix="<|start_header_id|>system<|end_header_id|>\n\n", system_suffix="<|eot_id|>",
        user_prefix="<|start_header_id|>user<|end_header_id|>\n\n", user_suffix="<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant_end="<|eot_id|>",
        after_assistant="", flags=FLAG_TRIM,
        jinja=("{% set loop_messages = messages %}{% for message in loop_messages %}"
               "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
               "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
               "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")),
    # ChatML as SmolLM2-Instruct has it (the GGUF's tokenizer.chat_template)
    "chatml": dict(
        begin="", default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant_end="<|im_end|>", after_assistant="\n", flags=0,
        jinja=("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
               "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}")),
}
DEFAULT = "vicuna_v1.1"


class TemplateError(ValueError):
    pass


def resolve(name, bos_text, eos_text):
    """The template `name` with {bos} / {eos} replaced: a dict of FIELDS and flags."""
    if name not in TEMPLATES:
        raise TemplateError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATES)})")
    t = dict(TEMPLATES[name], name=name)
    for f in FIELDS[1:]:
        for key, text in (("{bos}", bos_text), ("{eos}", eos_text)):
            if key in t[f]:
                if not text:
                    raise TemplateError(f"chat template {name} needs the tokenizer's {key[1:-1]} token, it has none")
                t[f] = t[f].replace(key, text)
    return t


def render(t, system, pairs):
    """(text, spans) of a conversation: system is the system message or None, pairs are
    (user, assistant); spans are the [start, end) character ranges of each assistant
    content with its end-of-turn text (the loss mask's targets)."""
    strip = (lambda s: s.strip()) if t["flags"] & FLAG_TRIM else (lambda s: s)
    text = t["begin"]
    if system is not None or t["default_system"]:
        system = t["default_system"] if system is None else system
        text += t["system_prefix"] + strip(system) + t["system_suffix"]
    spans = []
    for user, assistant in pairs:
        text += t["user_prefix"] + strip(user) + t["user_suffix"] + t["assistant_prefix"]
        start = len(text)
        text += strip(assistant) + t["assistant_end"]
        spans.append((start, len(text)))
        text += t["after_assistant"]
    return text, spans


def render_prompt(t, system, pairs, user, byte_level=False):
    """The text that asks for the answer to `user` after the turn pairs."""
    text, _ = render(t, system, pairs)
    strip = (lambda s: s.strip()) if t["flags"] & FLAG_TRIM else (lambda s: s)
    prefix = t["assistant_prefix"]
    if t["flags"] & FLAG_PROMPT_STRIPS_SPACE and not byte_level and prefix.endswith(" "):
        prefix = prefix[:-1]
    return text + t["user_prefix"] + strip(user) + t["user_suffix"] + prefix


def messages_of(system, pairs, user=None):
    m = [] if system is None else [{"role": "system", "content": system}]
    for u, a in pairs:
        m += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    if user is not None:
        m.append({"role": "user", "content": user})
    return m


def render_jinja(source, messages, bos_text, eos_text, add_generation_prompt=False):
    """What transformers' apply_chat_template(tokenize=False) renders: its Jinja
    environment (trim_blocks, lstrip_blocks), the special tokens as variables."""
    import jinja2
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())

    def raise_exception(msg):
        raise TemplateError(msg)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=messages, bos_token=bos_text or "", eos_token=eos_text or "",
                                          add_generation_prompt=add_generation_prompt)


PROBES = [  # conversations that tell the three templates apart, rendered with a generation prompt
    (None, [("Hi there", "Hello! How can I help?")], "  Two spaces around  "),
    ("Be brief.", [("What is 2+2?", " 4\n")], "And 3+3?"),
]


def match(source, bos_text, eos_text):
    """The name of the template whose rendering equals the Jinja `source`'s on every probe
    conversation, or None."""
    for name in TEMPLATES:
        try:
            t = resolve(name, bos_text, eos_text)
        except TemplateError:
            continue
        ok = True
        for system, pairs, user in PROBES:
            try:
                theirs = render_jinja(source, messages_of(system, pairs, user), bos_text, eos_text, True)
            except Exception:  # a template that refuses a probe matches nothing
                return None
            if theirs != render_prompt(t, system, pairs, user, byte_level=True) and \
                    theirs != render_prompt(t, system, pairs, user):
                ok = False
                break
        if ok:
            return name
    return None


def segments(t, system, pairs):
    """render() as (text, from_template, target) pieces, as llm.cu's chat_segments."""
    strip = (lambda s: s.strip()) if t["flags"] & FLAG_TRIM else (lambda s: s)
    out = []

    def add(text, from_template, target):
        if text:
            out.append((text, from_template, target))
    add(t["begin"], True, False)
    if system is not None or t["default_system"]:
        system = t["default_system"] if system is None else system
        add(t["system_prefix"], True, False)
        add(strip(system), False, False)
        add(t["system_suffix"], True, False)
    for user, assistant in pairs:
        add(t["user_prefix"], True, False)
        add(strip(user), False, False)
        add(t["user_suffix"], True, False)
        add(t["assistant_prefix"], True, False)
        add(strip(assistant), False, True)
        add(t["assistant_end"], True, True)
        add(t["after_assistant"], True, False)
    return out


def special_tokens(t):
    """The "<...>" special tokens the template writes (outside default_system)."""
    import re
    found = []
    for field in FIELDS[1:]:
        if field != "default_system":
            found += [p for p in re.findall(r"<[^<>\s]*>", t[field]) if p not in found]
    return found


def folder_source(folder):
    """The Jinja chat template a Hugging Face folder holds (chat_template.jinja, or
    tokenizer_config.json's chat_template, the "default" one of a list), or None."""
    import json
    import os
    if folder is None:
        return None
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        source = json.load(f).get("chat_template")
    if isinstance(source, list):
        source = next((x.get("template") for x in source if isinstance(x, dict) and x.get("name") == "default"), None)
    return source if isinstance(source, str) else None


def choose(source, name, bos_text, eos_text, where):
    """(resolved template, how it was chosen): `name` (--template) when given, else the
    built-in matching the Jinja `source`, else Vicuna v1.1 when there is no source.
    Raises TemplateError in one line naming --template when nothing matches."""
    how = "--template"
    if name is None:
        if source is None:
            name, how = DEFAULT, "no chat template in the folder: Xwin-LM's default"
        else:
            try:
                name = match(source, bos_text, eos_text)
            except ImportError:
                raise TemplateError(f"{where}: matching the folder's chat template needs the jinja2 package; "
                                    f"or choose one with --template {'|'.join(TEMPLATES)}")
            if name is None:
                raise TemplateError(f"{where}: the folder's chat template matches none of {', '.join(TEMPLATES)}; "
                                    "choose one with --template")
            how = "matches the folder's chat template"
    try:
        return resolve(name, bos_text, eos_text), how
    except TemplateError as e:
        raise TemplateError(f"{where}: {e}")
