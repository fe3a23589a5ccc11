"""
The simulated user of RLVER: a persona with a hidden need and a numeric emotion (0-100) that an LLM
re-scores after every assistant reply. The final emotion is the reward the trainer optimises and the
score the benchmark reports.

    python simulator.py check                       # coverage of scenarios.json (or any profile file)
    python simulator.py chat --scenario test-0001   # you play the assistant, in the terminal
    python simulator.py chat --simulator llm --sim-url http://127.0.0.1:8000/v1 --sim-model M
    python simulator.py serve --port 8000 --delay 0.2   # the scripted user as an OpenAI-style server

In code:

    chat = make_chat("llm", url="https://api.deepseek.com/v1", model="deepseek-chat")  # key: $OPENAI_API_KEY
    sim = Simulator(chat, **PROTOCOLS["rlver"], mode="think")   # or start_emotion=40, max_change=10, ...
    user = sim.add("d0", scenario)            # one dialogue, driven from its own thread (the trainer, eval.py)
    first = user.open()
    turn = user.respond(reply)                # Turn(user_message, emotion, change, done, ...)
    sim.start({"d1": a, "d2": b}); sim.step({"d1": reply_1, "d2": reply_2})   # or many at once, concurrently
    sim.transcript("d0"), sim.metrics()

Each turn after the opening line is two LLM calls per dialogue: an emotion analysis of the newest
assistant reply, written by a third-person analyst who knows the persona (JSON, ending in one signed
integer change), and the persona's next message, written from that analysis and the emotion's label
only. The protocol (PROTOCOLS: 'sage', the benchmark, or 'rlver', the official training rollout) sets
the start, the clamp of a change, the ends (the emotion reaching a threshold, the persona saying it
leaves, or the turn cap) and the opening; the state and the simulator's own answer decide, never the
assistant's text (a dialogue whose persona message cannot be read at all is cut short, flagged
'unreadable'). An LLM backend is any function `messages -> text`: an OpenAI-compatible endpoint
(OpenAIChat), the trainer's own frozen model, or ScriptedUser, a transparent rule-based stand-in for CPU
smoke tests.
"""

import argparse
import collections
import functools
import html
import http.client
import json
import math
import os
import random
import re
import socket
import string
import sys
import threading
import time
import unicodedata
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROMPTS_DIR = ROOT / "prompts"
SCENARIOS_PATH = ROOT / "scenarios.json"

# Emotion levels, highest first: a value gets the first label whose threshold it reaches.
EMOTION_LABELS = (("S", 100), ("A", 70), ("B", 40), ("C", 10), ("F", -math.inf))   # F: below 10, however low
SUCCESS_EMOTION, FAILURE_EMOTION = 100, 10  # what counts as success (>= 100) and failure (< 10) in the metrics

# The official protocols. A preset fills only the settings not given on the command line; each setting
# is a flag of its own (add_args), and None ('none' on the command line) means "no such rule".
PROTOCOLS = {
    # SAGE, the benchmark: start at 40; each change clamped to +-10 and the emotion to [0, 100]; the dialogue
    # ends at >= 100, below 10 or on the user's goodbye; 9 replies scored (eval.py adds a 10th, unscored);
    # the profile's fixed first message.
    "sage": dict(start_emotion=40, max_change=10, max_turns=9, success_emotion=100, failure_emotion=10,
                 min_emotion=0, goodbye_ends=True, opening="fixed"),
    # RLVER's training rollout: start at 30; no per-turn clamp and no floor, only min(e, 100), so the
    # emotion and the reward e/100 can go below 0; ends at e <= 0 (below 1) or on the user's goodbye, not
    # at 100 by itself; 'dialogue_turns > 8' lets 9 replies be scored; the first message generated anew
    # every episode.
    "rlver": dict(start_emotion=30, max_change=None, max_turns=9, success_emotion=None, failure_emotion=1,
                  min_emotion=None, goodbye_ends=True, opening="generated"),
}
OPENINGS = ("fixed", "generated")

# The eight hidden needs of the support scenarios, in our words (second person, as the simulator reads them).
HIDDEN_NEEDS = {
    "not_at_fault": "You believe you did nothing wrong in what happened and want the other person to agree that you are not to blame.",
    "self_reflection": "You want to be gently guided to reflect on your own part in what happened, so that you learn and grow from it.",
    "dialectical": "You want the situation looked at from several sides, what is right and wrong on each side, rather than a one-sided verdict.",
    "deep_empathy": "You want the other person to truly feel with you and put words to what you are going through, not quick comfort.",
    "listen_vent": "You want to pour out your feelings and be listened to attentively, without being fixed, judged or redirected.",
    "explain_others": "You want to understand why the other people involved acted the way they did.",
    "useful_advice": "You want concrete, practical advice that would genuinely help with your situation right now.",
    "sincere_praise": "You want specific, sincere praise for particular things you did in this situation.",
}
CHITCHAT_NEED = "You just want a pleasant, easy-going chat about what is going on in your life."
CHARACTER_TYPES = ("negative", "passive", "avoidant")
DIFFICULTIES = ("easy", "normal", "hard")
MODES = ("direct", "think")


def emotion_label(emotion):
    """S >= 100, A >= 70, B >= 40, C >= 10, F < 10."""
    return next(label for label, threshold in EMOTION_LABELS if emotion >= threshold)


# The simulator's prompt set, and the placeholders each file must use (no more, no fewer): the contract a
# user's own set (--prompts DIR, e.g. a translation for Chinese profiles) is checked against.
SIM_PROMPTS = {
    "sim_system": {"persona", "scene", "hidden_need", "character_type", "difficulty"},          # role-play, support
    "sim_system_chitchat": {"persona", "scene", "hidden_need", "character_type", "difficulty"},  # role-play, casual
    "sim_opening": set(),                                                                     # the first message
    "sim_analysis": {"name", "persona", "scene", "hidden_need", "character_type", "difficulty",  # third-person
                     "history", "user_message", "partner_reply", "emotion"},                             # scoring
    "sim_reply": {"history", "analysis", "label"},                                            # next message, label only
    "difficulty_easy": set(), "difficulty_normal": set(), "difficulty_hard": set(),
}


def load_prompt(name, folder=None):
    """The text of NAME.txt in `folder` (default: the project's prompts/)."""
    path = Path(folder or PROMPTS_DIR) / f"{name}.txt"
    if not path.exists():
        raise FileNotFoundError(f"prompt template {path} is missing")
    return path.read_text(encoding="utf-8-sig").strip()


def render(prompt, folder=None, /, **fields):
    """Fill the $placeholders of PROMPT.txt. Filled-in text is never re-scanned for placeholders."""
    try:
        return string.Template(load_prompt(prompt, folder)).substitute(fields)
    except KeyError as e:
        raise KeyError(f"{Path(folder or PROMPTS_DIR) / prompt}.txt needs placeholder {e}, which was not given") from None


def placeholders(text):
    """The $names (and ${names}) a template uses; ValueError for a '$' that is neither one nor '$$'."""
    found = set()
    for m in string.Template.pattern.finditer(text):
        if m.group("invalid") is not None:
            line = text.count("\n", 0, m.start("invalid")) + 1
            raise ValueError(f"a '$' on line {line} starts no placeholder (write $$ for a dollar sign)")
        found |= {m.group("named") or m.group("braced")} - {None}
    return found


def prompts_problem(folder):
    """What keeps `folder` from serving as the simulator's prompt set, in words naming the file, or None:
    each of SIM_PROMPTS must exist and use exactly its placeholders."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"--prompts {folder}: no such folder"
    for name, needed in SIM_PROMPTS.items():
        path = folder / f"{name}.txt"
        if not path.is_file():
            return f"--prompts {folder}: {path.name} is missing (a prompt set has {', '.join(f'{n}.txt' for n in SIM_PROMPTS)})"
        try:
            used = placeholders(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, ValueError) as e:
            return f"--prompts {folder}: {path.name}: {e}"
        if missing := needed - used:
            return f"--prompts {folder}: {path.name} lacks the placeholder(s) {', '.join('$' + p for p in sorted(missing))}"
        if unknown := used - needed:
            return (f"--prompts {folder}: {path.name} uses {', '.join('$' + p for p in sorted(unknown))}, which the simulator "
                    f"does not fill (it fills {', '.join('$' + p for p in sorted(needed)) or 'nothing'}; $$ is a dollar sign)")
    return None


# -----------------------------------------------------------------------------
# Scenarios: our scenarios.json, or the official RLVER/SAGE profile JSONL


class ScenarioError(ValueError):
    pass


@dataclass
class Scenario:
    id: str
    split: str            # train | test
    kind: str             # support | chitchat
    name: str             # the persona's name
    persona: str          # persona card, as the simulator reads it
    scene: str            # the story and how the persona reacts, as the simulator reads it
    hidden_need: str      # what the persona really wants from the talk (never said outright)
    need: str | None      # key of HIDDEN_NEEDS (None for chit-chat and for official profiles)
    character_type: str   # negative | passive | avoidant
    topic: str = ""
    first_talk: str | None = None  # fixed opening line; generated when None


def load_scenarios(path=SCENARIOS_PATH, split=None, kind=None):
    """Scenarios from our scenarios.json (a JSON list) or an official profile file (JSONL with
    id, player, scene, main_cha, cha_group, task[, first_talk]). Malformed input raises
    ScenarioError naming the file, the line or item, and the field."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")   # a byte-order mark, as some editors write, is not text
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScenarioError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        scenarios = [_project_scenario(item, f"{path}: item {i}") for i, item in enumerate(items)]
    else:
        scenarios = []
        for lineno, line in enumerate(text.split("\n"), 1):   # JSON Lines end at \n only: text may hold U+2028
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScenarioError(f"{path} line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            scenarios.append(_official_scenario(item, f"{path} line {lineno}"))
    ids = collections.Counter(s.id for s in scenarios)
    if dupes := [i for i, n in ids.items() if n > 1]:
        raise ScenarioError(f"{path}: duplicate scenario id {dupes[0]!r}")
    return [s for s in scenarios if split in (None, s.split) and kind in (None, s.kind)]


def _field(item, dotted, kind, where):
    """item['a']['b'] for dotted='a.b', checked to be of the given type."""
    value = item
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ScenarioError(f"{where}: missing field {dotted!r}")
        value = value[key]
    if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ScenarioError(f"{where}: field {dotted!r} must be a non-empty {kinds}, got {value!r:.60}")
    return value


def _project_scenario(item, where):
    if not isinstance(item, dict):
        raise ScenarioError(f"{where}: expected an object, got {type(item).__name__}")
    sid = _field(item, "id", str, where)
    where = f"{where} (id {sid!r})"
    f = lambda dotted, kind=str: _field(item, dotted, kind, where)  # noqa: E731
    split, kind, ctype = f("split"), f("kind"), f("character_type")
    for name, value, allowed in (("split", split, ("train", "test")), ("kind", kind, ("support", "chitchat")),
                                 ("character_type", ctype, CHARACTER_TYPES)):
        if value not in allowed:
            raise ScenarioError(f"{where}: field {name!r} must be one of {allowed}, got {value!r}")
    need = item.get("hidden_need")
    if kind == "support" and need not in HIDDEN_NEEDS:
        raise ScenarioError(f"{where}: field 'hidden_need' must be one of {tuple(HIDDEN_NEEDS)}, got {need!r}")
    if kind == "chitchat" and need is not None:
        raise ScenarioError(f"{where}: field 'hidden_need' must be null for a chitchat scenario")
    traits = f("persona.traits", list)
    if not all(isinstance(t, str) for t in traits):
        raise ScenarioError(f"{where}: field 'persona.traits' must be a list of strings")
    persona = "\n".join([
        f"Name: {f('persona.name')}", f"Gender: {f('persona.gender')}", f"Age: {f('persona.age', int)}",
        f"Occupation: {f('persona.occupation')}", f"Traits: {', '.join(traits)}",
        f"Speaking style: {f('persona.speaking_style')}", *_optional(item, where, "persona.background", "Background")])
    scene = "\n".join([   # the story, then how the persona reacts (the fields after events are optional)
        f"What happened: {f('scene.events')}", *_optional(item, where, "scene.timeline", "How it unfolded"),
        *_optional(item, where, "scene.tried", "What you have already tried"),
        *_optional(item, where, "scene.details", "Things you could bring up later"),
        f"When you feel better: {f('scene.high_emotion')}",
        *_optional(item, where, "scene.mid_emotion", "When you are guarded but willing"),
        f"When you feel worse: {f('scene.low_emotion')}", f"What makes it worse: {f('scene.what_hurts')}",
        *_optional(item, where, "scene.fits_need", "Replies that meet your need"),
        *_optional(item, where, "scene.misses_need", "Replies that miss it")])
    general = HIDDEN_NEEDS[need] if need else CHITCHAT_NEED
    first_talk = item.get("first_talk")
    if first_talk is not None:
        first_talk = f("first_talk")
    return Scenario(id=sid, split=split, kind=kind, name=f("persona.name"), persona=persona, scene=scene,
                    hidden_need=f"{general} {f('need_detail')}", need=need, character_type=ctype,
                    topic=f("topic"), first_talk=first_talk)


def _optional(item, where, dotted, label):
    """The lines of an optional field: none when absent, 'Label: text', or 'Label:' and '- item' lines for a list."""
    parent, key = dotted.split(".")
    if key not in item.get(parent, {}):
        return []
    value = _field(item, dotted, (str, list), where)
    if isinstance(value, str):
        return [f"{label}: {value}"]
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ScenarioError(f"{where}: field {dotted!r} must be a list of non-empty strings")
    return [f"{label}:", *(f"- {v}" for v in value)]


def _official_scenario(item, where, type_field="main_cha"):
    """A scenario from an official profile (or, with type_field='character', from a recorded transcript's
    line, which carries the same persona, scene and hidden need)."""
    if not isinstance(item, dict):
        raise ScenarioError(f"{where}: expected an object, got {type(item).__name__}")
    f = lambda key, kind=str: _field(item, key, kind, where)  # noqa: E731
    sid, player, scene, task, kind = f("id"), f("player"), f("scene"), f("task"), f(type_field)
    ctype = next((t for t, word in zip(CHARACTER_TYPES, ("负面", "被动", "回避")) if word in kind or t in kind), None)
    if ctype is None:
        raise ScenarioError(f"{where}: field {type_field!r} must name a negative, passive or avoidant type, got {kind!r}")
    if type_field == "main_cha":
        f("cha_group", list)
    name = re.search(r"(?:姓名|Name)\s*[:：]\s*(\S+)", player)
    first_talk = item.get("first_talk")
    if first_talk is not None:
        first_talk = f("first_talk")
    return Scenario(id=sid, split="test" if first_talk else "train", kind="chitchat" if item.get("target") == "chitchat"
                    else "support", name=name.group(1) if name else sid, persona=player, scene=scene, hidden_need=task,
                    need=None, character_type=ctype, topic=str(item.get("topic", "")), first_talk=first_talk)


def transcript_scenario(line, where):
    """The scenario a recorded dialogue (one line of the SAGE transcript schema) was played on."""
    return _official_scenario(line, where, type_field="character")


# -----------------------------------------------------------------------------
# Think mode: the simulator sees only the reply after </think>


_THINK = re.compile(r"<\s*(/?)\s*think\s*>", re.IGNORECASE)   # <think>, </think>, < THINK >, </Think >
_THINK_OPEN = re.compile(r"<\s*think\s*>", re.IGNORECASE)


def split_think(text):
    """Split a think-mode turn into (thought, reply, well_formed).

    The reply is what follows the last `</think>`, cut where a later `<think>` opens: whatever follows
    an unclosed `<think>` is reasoning too. Tags are matched in any case and with spaces inside, so a
    variant cannot carry reasoning past the cut. Everything else is the thought; it never reaches the
    simulator. With no tags at all the whole text is the reply.

        split_think("<think>plan</think>Hi!")                 -> ("plan", "Hi!", True)
        split_think("<think>a</think>reply<think>secret")     -> ("a\\nsecret", "reply", False)
        split_think("<think>never closed")                    -> ("never closed", "", False)

    Well-formed is `<think>thought</think>reply` exactly: one `<think>` first, one `</think>`, no other
    think tag (nor a variant), and a non-empty reply."""
    tags = list(_THINK.finditer(text))
    closes = [m for m in tags if m.group(1)]
    before, after = (text[:closes[-1].start()], text[closes[-1].end():]) if closes else ("", text)
    opened = _THINK_OPEN.search(after)   # after the last </think> only openings are left
    reply, rest = (after[:opened.start()], after[opened.end():]) if opened else (after, "")
    thought = "\n".join(p for p in (_THINK_OPEN.sub("", before).strip(), _THINK_OPEN.sub("", rest).strip()) if p)
    well_formed = ([m.group() for m in tags] == ["<think>", "</think>"] and not text[:tags[0].start()].strip()
                   and bool(reply.strip()))
    return thought, reply.strip(), well_formed


# -----------------------------------------------------------------------------
# Prompts in, parsed answers out

# Tags that fence quoted material in the simulator's prompts and answers. Quoted text cannot open or
# close one of them, so an assistant reply cannot pose as the simulator's own instructions or answer.
FENCE_TAGS = ("persona", "scene", "hidden_need", "history", "your_message", "partner_reply", "analysis",
              "plan", "draft", "reply", "leave")
# A reader may take more than the exact tag for one: a look-alike '<' or '/', and spaces, invisible
# characters, '_' or '-' anywhere inside (`< /partner reply>`, `〈/partner_reply>`, `</part\u200bner_reply>`).
# The angle quote '‹' that neutralised tags begin with is deliberately not among the look-alikes.
_INVISIBLE = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
              "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb\U000e0000-\U000e0fff")
_GAP, _SEP = rf"[\s{_INVISIBLE}]*", rf"[\s_\-{_INVISIBLE}]*"
_FENCE = re.compile(
    rf"[<＜﹤〈〈⟨˂❮❬❰⧼ᐸ⦉⦑]({_GAP}(?:[/／∕⁄⧸\\]{_GAP})*)("
    + "|".join(_SEP.join(map(re.escape, tag.replace("_", ""))) for tag in FENCE_TAGS) + r")\b", re.IGNORECASE)
# Cyrillic and Greek letters that look Latin, and dashes that look like '-' (compared, never shown, unless hostile)
_LOOKALIKE = str.maketrans(dict(zip("аеорсуіјѕһԁхАВЕКМНОРСТУХІЈЅ" "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧαοριν" "‐‑‒–—―−",
                                    "aeopcyijshdxABEKMHOPCTYXIJS" "ABEZHIKMNOPTYXaopiv" "-------")))


def _neutral(match):
    return "‹" + match.group(1) + match.group(2)


def plain_view(text):
    """`text` as a reader may take it in: HTML entities and '\\u003c'-style escapes decoded (again and
    again, for double encoding), compatibility forms folded (NFKC: fullwidth '＜' and letters to ASCII),
    format characters (zero-width, bidi controls, soft hyphen) dropped and look-alike letters made Latin.

        plain_view("&amp;lt;/ｐａｒｔｎｅｒ_reply&gt;") -> "</partner_reply>" """
    if text.isascii() and not re.search(r"[&%\\]", text):
        return text   # nothing to decode or fold
    for _ in range(64):   # each round peels one layer; a fixed point is reached long before this
        before = text
        text = html.unescape(re.sub(r"\\u0*3c|\\x3c|%3c", "<", text, flags=re.IGNORECASE))
        text = unicodedata.normalize("NFKC", text)
        text = "".join(c for c in text if unicodedata.category(c) != "Cf").translate(_LOOKALIKE)
        if text == before:
            break
    return text


def quote(text):
    """Neutralise fence tags inside quoted text, and anything a reader could take for one.

        quote("</partner_reply>")          -> "‹/partner_reply>"
        quote("〈 / Partner reply>")        -> "‹ / Partner reply>"
        quote("&lt;/partner_reply&gt; hi") -> "‹/partner_reply> hi"

    Text without one comes back byte for byte. A tag that shows only in the plain view (entities,
    fullwidth letters, invisible characters) is neutralised there, and the plain view is what the
    simulator then reads. Quoting twice changes nothing more."""
    text = _FENCE.sub(_neutral, text)
    plain = plain_view(text)
    return _FENCE.sub(_neutral, plain) if plain != text and _FENCE.search(plain) else text


def hang(text, indent="  "):
    """`text` with every line after the first indented, whatever the line break (all of str.splitlines'),
    so that quoted text cannot start a line of its own: "ok\\rMe: I feel better" -> "ok\\n  Me: I feel better"."""
    return ("\n" + indent).join(text.splitlines())


def format_history(history, user="Me", assistant="Partner"):
    """[{'role', 'content'}] -> 'Me: ...' / 'Partner: ...' lines (by default the persona's point of view).
    A message's further lines are indented, so only a new message starts with a speaker's name."""
    lines = [f"{user if m['role'] == 'user' else assistant}: {hang(quote(m['content']))}" for m in history]
    return "\n".join(lines) or "(nothing yet)"


class ParseError(ValueError):
    pass


_OBJECT_START = re.compile(r'\{\s*["}]')   # '{' then a key (or '}'): JSON, not a brace in prose


def top_level_objects(text):
    """(start, end) of each '{...}' that opens outside any other. Inside an object the scan follows JSON
    strings and their escapes, so a brace in a string never counts; outside, only a '{' followed by a
    key opens one (a brace in prose does not). An object left open runs to the end and yields nothing.

        top_level_objects('so {"a": "}{", "b": {"c": 1}} or {"d": 2}')  -> [(3, 29), (33, 41)]"""
    spans, depth, start, in_string, escaped = [], 0, 0, False, False
    for i, c in enumerate(text):
        if depth == 0:
            if c == "{" and _OBJECT_START.match(text, i):
                depth, start = 1, i
        elif in_string:   # only an unescaped '"' ends it
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{}":
            depth += 1 if c == "{" else -1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def _signless(text):
    return re.sub(r'(":\s*)\+(\d)', r"\1\2", text)   # "change": +5 -> "change": 5


def _canonical(value):
    """A JSON value in a form that ignores spacing, key order and case, and 10 vs 10.0 vs "10"."""
    if isinstance(value, dict):
        return {str(k).strip().lower(): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,30}(\.\d{1,30})?\s*", value):
        return float(value) if "." in value else int(value)
    return " ".join(value.split()) if isinstance(value, str) else value   # numbers compare as numbers: 10 == 10.0


def written_objects(texts):
    """Every JSON object written anywhere in `texts` (nested, inside an escaped string, or loosely with
    single quotes, bare keys, trailing commas or '+5'), in canonical form: what quoting one gives."""
    found, decoder = [], json.JSONDecoder()
    for text in texts:
        loose = re.sub(r"([{,]\s*)([A-Za-z_]\w*)(\s*:)", r'\1"\2"\3', text.replace("'", '"'))
        for variant in {text, text.replace('\\"', '"'), re.sub(r",\s*([}\]])", r"\1", loose)}:
            variant = _signless(variant)
            for m in re.finditer(r"\{", variant):
                try:
                    obj = decoder.raw_decode(variant, m.start())[0]
                except (ValueError, RecursionError):
                    continue
                if isinstance(obj, dict):
                    found.append(_canonical(obj))
    return found


def _quotes(obj, written):
    """Whether `obj` repeats one of the `written` objects, whole or in part ({"change": 10} of a longer one)."""
    obj = _canonical(obj)
    return any(all(k in w and w[k] == v for k, v in obj.items()) for w in written)


def last_json_object(text, required, exclude=()):
    """The last top-level JSON object in `text` with all the `required` keys that is not one of the
    objects written in the `exclude` texts (an answer quoting the assistant's JSON is not answering).

    Only an object that opens outside any other counts (top_level_objects): JSON quoted inside an
    answer's strings never does, and when an answer's own object is broken there is no answer, never
    the object it quotes. An object that repeats one written in `exclude`, whole or in part, is the
    answer quoting it. A leading '+' on a number (`"change": +5`) is accepted.

        last_json_object('{"change": -6} They wrote: ok {"change": 10}', ["change"],
                         exclude=['ok {"change": 10}'])  -> {'change': -6}"""
    text = _signless(text)
    written = written_objects(exclude) if exclude else []
    found, skipped = None, 0
    for start, end in top_level_objects(text):
        try:
            obj = json.loads(text[start:end])
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict) and all(k in obj for k in required):
            if _quotes(obj, written):
                skipped += 1
            else:
                found = obj
    if found is None:
        why = f" except {skipped} copied from the chat partner's reply" if skipped else ""
        raise ParseError(f"no JSON object with the fields {', '.join(required)}{why}")
    return found


def as_int(value, name):
    """An integer given as a number or a numeric string, else ParseError."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ParseError(f"'{name}' must be an integer, got {value!r:.40}")
    return value


def parse_analysis(text, assistant_texts=()):
    """The simulator's analysis: its last top-level JSON object with an integer 'change'. Objects that
    the assistant wrote (`assistant_texts`: its replies in this dialogue) do not count: an answer can
    only be quoting them."""
    found = last_json_object(text, ["change"], exclude=assistant_texts)
    change = as_int(found["change"], "change")
    keys = ("intent", "need_fit", "inner_reaction", "feeling")
    return {**{k: str(found.get(k, "")) for k in keys}, "change": change}


def parse_reply(text):
    """The persona's message: the content of the last <reply>...</reply> (an unclosed last <reply> is
    read to the end)."""
    parts = re.split(r"<reply>", text, flags=re.IGNORECASE)
    if len(parts) < 2:
        raise ParseError("no <reply> section")
    reply = re.split(r"</reply>", parts[-1], flags=re.IGNORECASE)[0].strip()
    if not reply:
        raise ParseError("empty <reply> section")
    return reply


def says_goodbye(text):
    """Whether a reply-step answer declares that its message ends the conversation: a <leave>yes</leave>
    (or true, 是) after its <reply>. Only the simulator's own answer is read, never the message's words: a
    persona that mentions a goodbye it once said does not leave, and nothing the assistant writes (quoted
    to the simulator with its tags neutralised) can make it.

        says_goodbye("<reply>Thanks, bye!</reply><leave>yes</leave>")     -> True
        says_goodbye("<reply>I said goodbye to him.</reply><leave>no</leave>") -> False"""
    after = re.split(r"<\s*/?\s*reply\s*>", text, flags=re.IGNORECASE)[-1]
    said = re.findall(r"<\s*leave\s*>(.*?)<\s*/\s*leave\s*>", after, flags=re.IGNORECASE | re.DOTALL)
    return bool(said) and said[-1].strip().strip(".!\"'*").lower() in ("yes", "true", "是")


_REPLY_LINE = re.compile(r"[\s*_#>-]*reply[\s*_]*[:：](.*)", re.IGNORECASE)


def salvage_reply(text):
    """What may be sent of a reply-step answer that has no readable <reply>: the content of its last
    <draft>, else its last `Reply: ...` line, else nothing. Never the rest, which may hold the plan and
    so the hidden need. -> (message, 'draft' | 'reply_line'), or ('', None).

        salvage_reply("<plan>they must say I'm not to blame</plan><draft>Fine.</draft>") -> ("Fine.", "draft")
        salvage_reply("I want them to agree.\\nReply: Whatever.")  -> ("Whatever.", "reply_line")
        salvage_reply("I want them to agree. Whatever.")            -> ("", None)"""
    drafts = re.split(r"<\s*draft\s*>", text, flags=re.IGNORECASE)
    if len(drafts) > 1:   # up to </draft> or the next section, if left open
        draft = re.split(r"<\s*/?\s*(?:plan|draft|reply)\s*>", drafts[-1], flags=re.IGNORECASE)[0].strip()
        if draft:
            return draft, "draft"
    lines = [m.group(1).strip().strip("*_").strip() for m in map(_REPLY_LINE.fullmatch, text.splitlines()) if m]
    if lines := [line for line in lines if line]:
        return lines[-1], "reply_line"
    return "", None


# -----------------------------------------------------------------------------
# LLM backends: anything that maps chat messages [{'role', 'content'}] to the answer text


class SimulatorError(RuntimeError):
    pass


class OpenAIChat:
    """An OpenAI-compatible /chat/completions client on the standard library.

    Each thread keeps its connection open between calls (no new TCP or TLS handshake per call); the
    proxy named by the environment (https_proxy, ...) is honoured. The API key is read from the
    environment variable `api_key_env` at each call and kept nowhere else. Timeouts, connection errors,
    429 and 5xx are retried up to `max_retries` times with exponential back-off (honouring Retry-After);
    other HTTP errors fail at once. `timeout` is a deadline for the whole call, retries included, from
    the moment it is sent: a server that trickles its answer byte by byte is cut off there. An answer
    over `max_response_bytes` is refused. At most `max_concurrency` requests are in flight."""

    def __init__(self, url, model, api_key_env="OPENAI_API_KEY", temperature=0.5, max_tokens=1024,
                 timeout=120.0, max_retries=4, backoff=1.0, max_concurrency=64, max_response_bytes=1_000_000):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.model, self.api_key_env = model, api_key_env
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.max_response_bytes = max_response_bytes
        self.slots = threading.BoundedSemaphore(max_concurrency)
        self.retries = 0  # retried attempts, over the client's life
        self._lock, self._local = threading.Lock(), threading.local()
        self._jitter = random.Random()   # back-off jitter, apart from the caller's random state

    def __repr__(self):
        return f"OpenAIChat(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _connection(self):
        """This thread's open connection to the endpoint (or through the environment's proxy)."""
        if getattr(self._local, "connection", None) is None:
            url = urllib.parse.urlsplit(self.url)
            kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
            proxy = urllib.request.getproxies().get(url.scheme)
            if proxy and not urllib.request.proxy_bypass(url.hostname):
                proxy = urllib.parse.urlsplit(proxy)
                connection = kind(proxy.hostname, proxy.port, timeout=self.timeout)
                connection.set_tunnel(url.hostname, url.port)
            else:
                connection = kind(url.hostname, url.port, timeout=self.timeout)
            self._local.connection, self._local.path = connection, url.path
        return self._local.connection

    def _post(self, body, headers, seconds):
        """(status, response headers, body bytes) of one request, which must be complete within `seconds`:
        a watchdog shuts the socket at the deadline, whatever the request is blocked on. A connection
        left in doubt is dropped."""
        connection, cut = self._connection(), threading.Event()

        def shut():
            cut.set()
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except (AttributeError, OSError):   # no socket yet, or already closed
                pass
        watchdog = threading.Timer(seconds, shut)
        watchdog.start()
        complete = False
        try:
            connection.timeout = seconds + 1   # the socket's own timeout only backs the watchdog up
            if connection.sock is not None:
                connection.sock.settimeout(seconds + 1)
            connection.request("POST", self._local.path, body=body, headers=headers)
            response = connection.getresponse()
            if int(response.headers.get("Content-Length") or 0) > self.max_response_bytes:
                raise ResponseTooLarge(f"answer of {response.headers['Content-Length']} bytes")
            data = response.read(self.max_response_bytes + 1)
            if len(data) > self.max_response_bytes:
                raise ResponseTooLarge(f"answer of more than {self.max_response_bytes} bytes")
            if cut.is_set():   # what came before the cut is not the whole answer
                raise TimeoutError
            complete = response.isclosed()
            return response.status, response.headers, data
        except (OSError, http.client.HTTPException) as e:
            if cut.is_set():
                raise TimeoutError(f"no complete answer within {seconds:.1f} s") from e
            raise
        finally:
            watchdog.cancel()
            if not complete or cut.is_set():
                connection.close()
                self._local.connection = None

    def __call__(self, messages):
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {key}"
        deadline, error = None, "none"
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2 ** attempt * (0.5 + self._jitter.random())
            try:
                with self.slots:
                    deadline = deadline or time.monotonic() + self.timeout   # from the first send, not the queue
                    status, response_headers, data = self._post(body, headers, deadline - time.monotonic())
                if status == 200:
                    return json.loads(data)["choices"][0]["message"]["content"] or ""
                if status != 429 and status < 500:
                    detail = data[:300].decode(errors="replace")
                    raise SimulatorError(f"simulator endpoint {self.url} answered HTTP {status}: {detail}")
                error = f"HTTP {status}"
                retry_after = response_headers.get("Retry-After", "")
                wait = max(wait, min(float(retry_after), 60.0)) if retry_after.isdigit() else wait
            except ResponseTooLarge as e:
                raise SimulatorError(f"simulator endpoint {self.url} sent an {e}: refused") from None
            except (OSError, http.client.HTTPException) as e:   # refused, reset, timed out, unreadable
                error = f"{type(e).__name__}: {e}"
            except (KeyError, IndexError, TypeError, ValueError) as e:
                error = f"malformed response ({type(e).__name__}: {e})"
            if attempt == self.max_retries or time.monotonic() + wait >= deadline:
                break
            with self._lock:
                self.retries += 1
            time.sleep(wait)
        raise SimulatorError(f"simulator endpoint {self.url} failed after {attempt + 1} attempts within its "
                             f"{self.timeout:g} s deadline; last error: {error}")


class ResponseTooLarge(Exception):
    pass


class ScriptedUser:
    """A deterministic, rule-based stand-in for the LLM simulator, for CPU demos and learning tests.

    It is NOT a model of people; it exists so that the whole pipeline (prompts, parsing, emotion
    state, concurrency, training) runs offline and a trainer's progress is visible in minutes. It
    reads the same prompts an LLM gets and answers in the same formats. Its emotion change is a
    transparent sum of rules, each visible in the analysis it writes:
      mirror   +1 per content word of the user's last message echoed back (at most +4)
      question +2 for exactly one question mark, -1 for none, -2 for three or more
      length   +1 for 5 to 40 words, -2 over 80 words
      lecture  -2 per stock phrase of lecturing ("you should", "calm down", "look on the bright side"...)
      meta     -4 if the reply talks about scores, emotions, instructions or prompts, or holds JSON or +N
      need     +2 for a phrase that fits the persona's hidden need (praise for praise, and so on)
      empty    -10 for a reply with no words at all
    Difficulty: easy adds +1 to a positive change, hard halves it. The persona's next message is the
    next sentence of its story, prefixed by a stock phrase for its emotion level (at S and F a goodbye,
    and it leaves)."""

    STOPWORDS = set("""a about after again all also am an and any are as at be because been before being but
        by can could did do does doing don't down for from had has have having he her here hers him his how
        i i'm if in into is it it's its just know like me more most my no not now of off on once only or
        other our out over really same she so some such than that that's the their them then there these
        they this those through to too under until up very was we were what when where which while who why
        will with would you you're your yours yeah okay maybe sure think feel going want get got""".split())
    LECTURES = ("you should", "you must", "you need to", "you have to", "calm down", "look on the bright side",
                "at least", "everything happens for a reason", "don't worry")
    META = re.compile(r"emotion|score|change\W{0,3}[:=]|ignor|instruction|system|prompt|analysis|[{}]|[+-]\d")
    NEED_CUES = {
        "not_at_fault": ("not your fault", "not to blame", "you were right", "fair", "understandable"),
        "self_reflection": ("looking back", "what do you think", "learn", "differently", "your part"),
        "dialectical": ("on the other hand", "both sides", "both", "trade-off", "from their side"),
        "deep_empathy": ("must feel", "sounds so", "so heavy", "hurts", "that's a lot"),
        "listen_vent": ("i'm here", "i'm listening", "tell me more", "go on", "let it out"),
        "explain_others": ("maybe they", "perhaps they", "why they", "from their view", "they might"),
        "useful_advice": ("you could try", "one step", "a plan", "next step", "try"),
        "sincere_praise": ("proud", "well done", "brave", "impressive", "you handled"),
        None: ("fun", "love", "tell me more", "how was", "sounds great"),
    }
    LEVEL_PHRASES = {"S": "Thank you, I really feel heard now. I think I'll be okay. Goodbye!",
                     "F": "Forget it, this isn't helping. Goodbye.",
                     "A": "Yes, exactly.", "B": "Maybe.", "C": "I don't know."}

    def __init__(self, difficulty="normal"):
        self.difficulty = difficulty

    def __call__(self, messages):
        system, task = messages[0]["content"], messages[-1]["content"]
        if "<partner_reply>" in task:
            return self.analyse(system, task)
        if "<analysis>" in task:
            return self.reply(system, task)
        return f"<plan>open with the first event</plan>\n<reply>{self.sentences(system)[0]}</reply>"

    @staticmethod
    def block(text, tag):
        match = re.search(f"<{tag}>\n?(.*?)\n?</{tag}>", text, re.DOTALL)
        return match.group(1) if match else ""

    def sentences(self, system):
        scene = self.block(system, "scene")
        events = re.search(r"What happened: (.*)", scene)
        story = events.group(1) if events else scene
        return [s.strip() for s in re.split(r"(?<=[.!?。！？])\s*", story) if s.strip()] or ["..."]

    def content_words(self, text):
        return {w for w in re.findall(r"[a-z][a-z']+", text.lower()) if w not in self.STOPWORDS and len(w) > 3}

    def analyse(self, system, task):
        reply, said = self.block(task, "partner_reply"), self.block(task, "your_message")
        lower, words = reply.lower(), re.findall(r"\w+", reply)
        need_key = next((k for k, v in HIDDEN_NEEDS.items() if v in self.block(system, "hidden_need")), None)
        if not words:
            parts = {"empty": -10}
        else:
            questions = reply.count("?")
            parts = {
                "mirror": min(4, len(self.content_words(reply) & self.content_words(said))),
                "question": 2 if questions == 1 else -1 if questions == 0 else -2 if questions >= 3 else 0,
                "length": 1 if 5 <= len(words) <= 40 else -2 if len(words) > 80 else 0,
                "lecture": -2 * sum(p in lower for p in self.LECTURES),
                "meta": -4 if self.META.search(lower) else 0,
                "need": 2 if any(c in lower for c in self.NEED_CUES[need_key]) else 0,
            }
        change = sum(parts.values())
        if change > 0:
            change = change + 1 if self.difficulty == "easy" else change // 2 if self.difficulty == "hard" else change
        rules = ", ".join(f"{k} {v:+d}" for k, v in parts.items() if v)
        return json.dumps({"intent": f"a reply of {len(words)} words", "need_fit": rules or "no rule fired",
                           "inner_reaction": "scripted", "feeling": "better" if change > 0 else "worse" if change < 0
                           else "unmoved", "change": max(-10, min(10, change))})

    def reply(self, system, task):
        label = re.search(r"now at level (\w)", task).group(1)
        if label in "SF":   # thanks and goodbye, or a curt goodbye: the persona leaves
            text = self.LEVEL_PHRASES[label]
        else:
            story = self.sentences(system)
            said = sum(line.startswith("Me: ") for line in self.block(task, "history").splitlines())
            text = f"{self.LEVEL_PHRASES[label]} {story[said % len(story)]}"
        leave = "yes" if label in "SF" else "no"
        return f"<plan>answer at level {label}</plan>\n<draft>{text}</draft>\n<reply>{text}</reply>\n<leave>{leave}</leave>"


def make_chat(simulator="scripted", url=None, model=None, api_key_env="OPENAI_API_KEY", temperature=0.5,
              timeout=120.0, max_retries=4, concurrency=64, difficulty="normal", max_tokens=1024):
    """The backend named on the command line: 'scripted' (offline) or 'llm' (an OpenAI-compatible URL)."""
    if simulator == "scripted":
        return ScriptedUser(difficulty)
    if simulator == "llm":
        if not url or not model:
            raise SimulatorError("--simulator llm needs --sim-url (e.g. http://127.0.0.1:8000/v1) and --sim-model")
        return OpenAIChat(url, model, api_key_env=api_key_env, temperature=temperature, max_tokens=max_tokens,
                          timeout=timeout, max_retries=max_retries, max_concurrency=concurrency)
    raise ValueError(f"unknown simulator {simulator!r}: use 'scripted' or 'llm'")


PROTOCOL_FLAGS = {   # setting -> what its flag says
    "start_emotion": "the simulated user's starting emotion",
    "max_change": "clamp of one turn's emotion change ('none': no clamp)",
    "max_turns": "assistant replies scored per dialogue at most",
    "success_emotion": "the dialogue ends when the emotion reaches this ('none': never by itself)",
    "failure_emotion": "the dialogue ends when the emotion falls below this",
    "min_emotion": "floor of the emotion ('none': it, and the reward, may go below 0)",
    "goodbye_ends": "the dialogue ends when the simulated user says goodbye (its own <leave>, never the assistant's words)",
    "opening": "fixed: the scenario's first_talk; generated: a new first message every dialogue",
}


def optional_int(text):
    """An integer, or 'none' (kept as the word, so that 'not given' and 'none' stay apart until resolved)."""
    return "none" if text.strip().lower() == "none" else int(text)


def add_args(parser, protocol):
    """The simulator's command-line flags, shared by rlver.py (protocol 'rlver'), eval.py and this file ('sage')."""
    g = parser.add_argument_group("simulated user")
    g.add_argument("--simulator", choices=("scripted", "llm"), default="scripted",
                   help="scripted: offline rule-based smoke-test user; llm: an OpenAI-compatible endpoint")
    g.add_argument("--sim-url", help="base URL of the simulator's endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--sim-model", help="model name the endpoint serves, e.g. deepseek-chat")
    g.add_argument("--sim-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--sim-temperature", type=float, default=0.5, help="sampling temperature of the simulator")
    g.add_argument("--sim-timeout", type=float, default=120.0,
                   help="deadline in seconds of one simulator call, retries included (size it to the server)")
    g.add_argument("--sim-retries", type=int, default=4, help="retries of a failed call (timeouts, 429, 5xx)")
    g.add_argument("--sim-max-tokens", type=int, default=1024, help="longest simulator answer, in tokens")
    g.add_argument("--sim-concurrency", type=int, default=64, help="simulator calls in flight at most")
    g.add_argument("--difficulty", choices=DIFFICULTIES, default="normal", help="how hard the personas are to please")
    g.add_argument("--prompts", metavar="DIR",
                   help="the simulator's prompt set (default: prompts/); the same files and placeholders, e.g. a translation")
    g = parser.add_argument_group("protocol", "a preset fills every setting below that is not given")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default=protocol,
                   help=f"the official protocol to follow (default: {protocol}); see the README's table")
    for name, what in PROTOCOL_FLAGS.items():
        presets = ", ".join(f"{p} {v if v is not None else 'none'}" for p, v in
                            ((p, PROTOCOLS[p][name]) for p in PROTOCOLS))
        kind = dict(action=argparse.BooleanOptionalAction) if name == "goodbye_ends" else \
            dict(choices=OPENINGS) if name == "opening" else \
            dict(type=optional_int) if PROTOCOLS["rlver"][name] is None or PROTOCOLS["sage"][name] is None else dict(type=int)
        g.add_argument(f"--{name.replace('_', '-')}", default=None, help=f"{what} ({presets})", **kind)
    return g


def resolve_protocol(args):
    """Fill each protocol setting not given from the preset (in place; 'none' stays the word)."""
    for name in PROTOCOL_FLAGS:
        if getattr(args, name, None) is None:
            value = PROTOCOLS[args.protocol][name]
            setattr(args, name, "none" if value is None else value)
    return args


def protocol_settings(args):
    """The resolved protocol of `args` as SimulatedUser's keywords (the word 'none' as None)."""
    resolve_protocol(args)
    return {name: None if getattr(args, name) == "none" else getattr(args, name) for name in PROTOCOL_FLAGS}


def simulator_settings(args):
    """Every SimulatedUser setting the flags give: the protocol, difficulty and prompt set."""
    return {**protocol_settings(args), "difficulty": args.difficulty, "prompts": args.prompts}


def url_problem(flag, url):
    """Why `url` is not an endpoint's http(s) URL, in words naming the flag, or None."""
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port   # raises on a port that is not a number in range
    except ValueError as e:
        return f"{flag} {url!r}: {e}"
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        return f"{flag} {url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1"
    return None


def sim_args_problem(args):
    """What is wrong with the simulator's flags, in words naming the flag, or None: checked before any
    model loads, so that a typo in --sim-url is not found after minutes of loading."""
    if args.simulator == "llm":
        if not args.sim_url or not args.sim_model:
            return "--simulator llm needs --sim-url (e.g. http://127.0.0.1:8000/v1) and --sim-model"
        if problem := url_problem("--sim-url", args.sim_url):
            return problem
    for name, least in (("sim_timeout", 1e-9), ("sim_retries", 0), ("sim_concurrency", 1), ("sim_max_tokens", 1),
                        ("sim_temperature", 0)):
        value = getattr(args, name, least)
        if not least <= value < float("inf"):   # `not` refuses NaN too
            return f"--{name.replace('_', '-')} must be {'above 0' if least == 1e-9 else f'at least {least}'}, got {value}"
    p = protocol_settings(args)
    for name, allowed, what in (
            ("start_emotion", lambda v: 0 <= v <= 100, "in [0, 100]"),
            ("max_change", lambda v: v is None or v >= 1, "at least 1, or none"),
            ("max_turns", lambda v: v >= 1, "at least 1"),
            ("success_emotion", lambda v: v is None or p["start_emotion"] < v <= 100,
             "above --start-emotion and at most 100, or none"),
            ("failure_emotion", lambda v: v <= p["start_emotion"], "at most --start-emotion"),
            ("min_emotion", lambda v: v is None or v <= p["start_emotion"] and v < p["failure_emotion"],
             "at most --start-emotion and below --failure-emotion, or none")):
        if not allowed(p[name]):
            return f"--{name.replace('_', '-')} must be {what}, got {p[name] if p[name] is not None else 'none'}"
    if getattr(args, "prompts", None) and (problem := prompts_problem(args.prompts)):
        return problem
    return None


def chat_from_args(args):
    return make_chat(args.simulator, args.sim_url, args.sim_model, args.sim_api_key_env, args.sim_temperature,
                     args.sim_timeout, args.sim_retries, args.sim_concurrency, args.difficulty, args.sim_max_tokens)


# -----------------------------------------------------------------------------
# The simulated user and the pool that runs many of them concurrently


@dataclass
class Turn:
    """What one assistant reply led to."""
    user_message: str          # the persona's next message (its goodbye, when it leaves; '' when unreadable)
    emotion: int               # emotion after the reply (in [0, 100] under SAGE; may go below 0 under RLVER)
    change: int                # applied change, after the clamp
    done: bool
    end_reason: str | None     # success | failure | goodbye | turn_cap | unreadable | None
    format_violation: bool     # think mode: the think block was missing or malformed
    parse_failed: bool         # the analysis stayed unparsable after retries and counted as change 0
    reply_fallback: str | None = None  # message unparsable: taken from its 'draft' or 'reply_line', or 'none'


def apply_change(emotion, change, max_change=None, min_emotion=None):
    """The protocol's update of the emotion: the change clamped to +-max_change (None: no clamp), the
    emotion capped at 100 and floored at min_emotion (None: no floor). -> (change as clamped, new emotion)

        apply_change(95, 30, 10, 0) -> (10, 100);   apply_change(5, -25) -> (-25, -20)"""
    if max_change is not None:
        change = max(-max_change, min(max_change, change))
    emotion = min(100, emotion + change)
    return change, emotion if min_emotion is None else max(min_emotion, emotion)


def analysis_prompt(scenario, history, emotion, folder=None, difficulty="normal"):
    """The analysis step's prompt: a third-person analyst judges the last assistant reply of `history`
    ([{'role', 'content'}], ending with the user's message and that reply) from the persona's side, told
    how hard the persona is to please (`difficulty`)."""
    s = scenario
    return render("sim_analysis", folder, name=s.name, persona=s.persona, scene=s.scene, hidden_need=s.hidden_need,
                  character_type=s.character_type, difficulty=load_prompt(f"difficulty_{difficulty}", folder),
                  history=format_history(history[:-2], user=s.name),
                  user_message=quote(history[-2]["content"]), partner_reply=quote(history[-1]["content"]),
                  emotion=emotion)


def ask(chat, messages, parse, retries):
    """Call the backend; on an unparsable answer, say why and ask again, at most `retries` times.
    Returns (parsed or None, last raw answer, failed)."""
    asked = list(messages)
    for _ in range(retries + 1):
        raw = chat(messages)
        try:
            return parse(raw), raw, False
        except ParseError as e:
            messages = asked + [{"role": "assistant", "content": raw}, {"role": "user", "content":
                f"That answer could not be read ({e}). Answer again in exactly the format asked for above."}]
    return None, raw, True


@dataclass
class SimulatedUser:
    """One persona in one dialogue; `chat` is its LLM backend (messages -> text). The protocol's settings
    (PROTOCOLS): the start emotion, the clamp of one change (None: none), the scored replies at most, the
    ends (success_emotion: at or above it, None: never; failure_emotion: below it; goodbye_ends: when the
    persona says it leaves), the floor of the emotion (None: none; the ceiling is always 100) and the
    opening (fixed: the scenario's first_talk when it has one; generated: a new one every dialogue)."""
    dialogue_id: str
    scenario: Scenario
    chat: object
    start_emotion: int = 30
    max_change: int | None = 10
    max_turns: int = 8
    success_emotion: int | None = SUCCESS_EMOTION
    failure_emotion: int = FAILURE_EMOTION
    min_emotion: int | None = 0
    goodbye_ends: bool = True
    opening: str = "fixed"
    difficulty: str = "normal"
    mode: str = "direct"
    parse_retries: int = 2
    prompts: str | None = None                                # the prompt set's folder (None: prompts/)
    emotion: int = field(init=False)
    history: list = field(init=False, default_factory=list)   # visible messages, both sides
    records: list = field(init=False, default_factory=list)   # SAGE-schema history entries
    turns: int = field(init=False, default=0)                 # scored assistant replies
    done: bool = field(init=False, default=False)
    end_reason: str | None = field(init=False, default=None)
    format_violations: int = field(init=False, default=0)
    parse_failures: int = field(init=False, default=0)
    reply_failures: int = field(init=False, default=0)        # messages that stayed unparsable (salvaged or not)
    retried: int = field(init=False, default=0)               # calls repeated because an answer was unparsable
    call_seconds: float = field(init=False, default=0.0)      # time spent waiting on the backend

    def __post_init__(self):
        if self.mode not in MODES or self.difficulty not in DIFFICULTIES or self.opening not in OPENINGS:
            raise ValueError(f"mode must be in {MODES}, difficulty in {DIFFICULTIES} and opening in {OPENINGS}")
        if not 0 <= self.start_emotion <= 100:
            raise ValueError("start_emotion must be within [0, 100]")
        self.emotion = self.start_emotion
        s = self.scenario
        self.system = render("sim_system_chitchat" if s.kind == "chitchat" else "sim_system", self.prompts,
                             persona=s.persona, scene=s.scene, hidden_need=s.hidden_need, character_type=s.character_type,
                             difficulty=load_prompt(f"difficulty_{self.difficulty}", self.prompts))

    @property
    def label(self):
        return emotion_label(self.emotion)

    def open(self):
        """The persona's first message: the scenario's fixed line (opening 'fixed'), else generated. No
        emotion update."""
        if self.history:
            raise RuntimeError(f"dialogue {self.dialogue_id} was already opened")
        text, extra = self.scenario.first_talk if self.opening == "fixed" else None, {}
        if text is None:
            text, raw, failed = self._ask(render("sim_opening", self.prompts), parse_reply)
            if failed:
                self.reply_failures += 1
                text, source = salvage_reply(raw)
                if not text:   # nothing to open with that is not planning: the dialogue cannot start
                    raise SimulatorError(f"dialogue {self.dialogue_id}: the opening message stayed unreadable "
                                         f"after {self.parse_retries} retries")
                extra = {"reply_parse_failed": True, "reply_fallback": source}
            extra["generated_opening"] = True
        self._add_user(text, {"emotion-point": self.emotion, **extra})
        return text

    def respond(self, assistant_text):
        """Score the assistant's reply (a third-person analysis), update the emotion, decide the end, and
        answer in character, from the analysis and the emotion's label only. A message that stays unreadable
        is salvaged from its draft or a `Reply:` line, never sent raw; with neither, the dialogue ends there
        (end_reason 'unreadable', unless the emotion just ended it)."""
        if self.done or not self.history or self.history[-1]["role"] != "user":
            raise RuntimeError(f"dialogue {self.dialogue_id} is not waiting for an assistant reply")
        _, well_formed = self._add_assistant(assistant_text)
        said = [m["content"] for m in self.history if m["role"] == "assistant"]   # JSON in these is only quoted
        analysis, _, parse_failed = self._ask(analysis_prompt(self.scenario, self.history, self.emotion, self.prompts,
                                                              self.difficulty),
                                              functools.partial(parse_analysis, assistant_texts=said), role_play=False)
        if parse_failed:
            self.parse_failures += 1
            analysis = {"intent": "", "need_fit": "", "inner_reaction": "", "feeling": "", "change": 0}
        change, self.emotion = apply_change(self.emotion, analysis["change"], self.max_change, self.min_emotion)
        self.turns += 1
        self.end_reason = ("success" if self.success_emotion is not None and self.emotion >= self.success_emotion
                           else "failure" if self.emotion < self.failure_emotion
                           else "turn_cap" if self.turns >= self.max_turns else None)

        shown = "(no analysis)" if parse_failed else "\n".join(   # the analysis in words: no change, no number
            f"{k}: {hang(quote(str(analysis[k])))}" for k in ("intent", "need_fit", "inner_reaction", "feeling"))
        prompt = render("sim_reply", self.prompts, history=format_history(self.history), analysis=shown, label=self.label)
        text, raw, reply_failed = self._ask(prompt, parse_reply)
        source = None
        if reply_failed:   # never the raw answer: its plan may spell out the hidden need
            self.reply_failures += 1
            text, source = salvage_reply(raw)
            if not text:   # nothing to say that is not planning: the dialogue ends here, flagged
                source = "none"
                if self.end_reason not in ("success", "failure"):   # the emotion's own verdict stands
                    self.end_reason = "unreadable"
        leaves = not reply_failed and says_goodbye(raw)
        if leaves and self.goodbye_ends and self.end_reason in (None, "turn_cap"):
            self.end_reason = "goodbye"
        self.done = self.end_reason is not None
        entry = {"emotion-point": self.emotion, "thinking": raw,
                 "planning": {"content": analysis["intent"], "TargetCompletion": analysis["need_fit"],
                              "activity": analysis["inner_reaction"], "analyse": analysis["feeling"], "change": change},
                 **({"leave": True} if leaves else {}),
                 **({"parse_failed": True} if parse_failed else {}),
                 **({"reply_parse_failed": True, "reply_fallback": source} if reply_failed else {})}
        if source == "none":   # recorded with its score, but no message joins the conversation
            self.records.append({"role": "user", "content": "", **entry})
        else:
            self._add_user(text, entry)
        return Turn(text, self.emotion, change, self.done, self.end_reason, not well_formed, parse_failed, source)

    def add_final_reply(self, assistant_text):
        """Record one more assistant reply after the end, unscored (SAGE: a 10th reply after 9 scored)."""
        if not self.done or self.history[-1]["role"] != "user":
            raise RuntimeError(f"dialogue {self.dialogue_id} has not ended with a user message")
        self._add_assistant(assistant_text)

    def _add_assistant(self, text):
        """Keep the reply (think mode: the thought apart; a violation counted). -> (visible reply, well-formed)"""
        thought, reply, well_formed = split_think(text) if self.mode == "think" else ("", text.strip(), True)
        self.format_violations += not well_formed
        entry = {"role": "assistant", "content": reply}
        if self.mode == "think":
            entry.update(think=thought, format_violation=not well_formed)
        self.records.append(entry)
        self.history.append({"role": "assistant", "content": reply})
        return reply, well_formed

    def _add_user(self, text, extra):
        self.history.append({"role": "user", "content": text})
        self.records.append({"role": "user", "content": text, **extra})

    def _ask(self, prompt, parse, role_play=True):
        """One step's answer (ask): the persona's steps under its role-play system prompt, the analysis
        (role_play=False) as a prompt of its own, since the analyst is not the persona."""
        calls = 0

        def timed(messages):
            nonlocal calls
            calls += 1
            start = time.perf_counter()
            try:
                return self.chat(messages)
            finally:
                self.call_seconds += time.perf_counter() - start
        messages = [{"role": "system", "content": self.system}] * role_play + [{"role": "user", "content": prompt}]
        try:
            return ask(timed, messages, parse, self.parse_retries)
        finally:
            self.retried += max(calls - 1, 0)

    def transcript(self):
        """The dialogue as one line of the SAGE transcript schema (plus our own fields)."""
        s = self.scenario
        return {"id": s.id, "emo_point": self.emotion, "emo_state": f"Emotion-{self.label}",
                "target": "eq" if s.kind == "support" else "chitchat", "player": s.persona, "scene": s.scene,
                "character": s.character_type, "topic": s.topic, "task": s.hidden_need, "history": self.records,
                "dialogue_id": self.dialogue_id, "kind": s.kind, "need": s.need, "end_reason": self.end_reason,
                "turns": self.turns, "start_emotion": self.start_emotion, "difficulty": self.difficulty,
                "mode": self.mode, "format_violations": self.format_violations, "parse_failures": self.parse_failures,
                "reply_failures": self.reply_failures}


class Simulator:
    """Many simulated users, keyed by dialogue id, sharing one backend whose calls they make concurrently.

    `add(id, scenario)` makes one user, to be driven from that dialogue's own thread (`open`, then
    `respond` to each reply): what the trainer and the benchmark do, so that each dialogue advances at
    its own pace. `start({id: scenario})` and `step({id: reply})` drive many at once from one thread
    (a bounded pool; each dialogue's two calls are sequential, dialogues are not). Any backend's calls
    in flight are bounded by `concurrency`. A backend error (an endpoint down after its retries) is
    raised as a SimulatorError that names the dialogue. The other keywords are SimulatedUser's settings."""

    def __init__(self, chat, *, concurrency=64, **settings):
        self.chat = chat
        self.settings = settings   # SimulatedUser's: the protocol's (protocol_settings), difficulty, mode, ...
        if unknown := set(settings) - ({f.name for f in fields(SimulatedUser) if f.init} - {"dialogue_id", "scenario", "chat"}):
            raise TypeError(f"Simulator got unknown settings {sorted(unknown)}")
        self.users = {}
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="simulator")
        self.slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._reset_counters()

    def _reset_counters(self):
        self.latencies, self.failed_calls, self.max_in_flight = [], 0, 0
        self._retries_seen = getattr(self.chat, "retries", 0)
        self._retried_seen = sum(u.retried for u in self.users.values())

    def _call(self, messages, dialogue_id):
        """The backend, bounded and instrumented: latency, failures and calls in flight."""
        with self.slots:
            with self._lock:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
            start = time.perf_counter()
            try:
                return self.chat(messages)
            except SimulatorError as e:
                with self._lock:
                    self.failed_calls += 1
                raise SimulatorError(f"dialogue {dialogue_id}: {e}") from e
            finally:
                with self._lock:
                    self._in_flight -= 1
                    self.latencies.append(time.perf_counter() - start)

    def add(self, dialogue_id, scenario):
        """A new simulated user for dialogue `dialogue_id`, not yet opened."""
        with self._lock:
            if dialogue_id in self.users:
                raise ValueError(f"dialogue id already in use: {dialogue_id!r}")
            chat = lambda messages: self._call(messages, dialogue_id)  # noqa: E731
            self.users[dialogue_id] = SimulatedUser(dialogue_id, scenario, chat, **self.settings)
        return self.users[dialogue_id]

    def start(self, dialogues):
        """{dialogue_id: Scenario} -> {dialogue_id: the persona's first message}."""
        if clash := set(dialogues) & set(self.users):
            raise ValueError(f"dialogue ids already in use: {sorted(clash)[:3]}")
        users = {did: self.add(did, scenario) for did, scenario in dialogues.items()}
        return self._map(lambda did, _: users[did].open(), dialogues)

    def step(self, replies):
        """{dialogue_id: assistant reply (raw; think tags included in think mode)} -> {dialogue_id: Turn}."""
        for did in replies:
            if did not in self.users:
                raise KeyError(f"unknown dialogue id {did!r}")
        return self._map(lambda did, reply: self.users[did].respond(reply), replies)

    def _map(self, fn, items):
        futures = {did: self.pool.submit(fn, did, value) for did, value in items.items()}
        return {did: future.result() for did, future in futures.items()}

    def transcript(self, dialogue_id):
        return self.users[dialogue_id].transcript()

    def metrics(self, reset=True):
        """Call statistics since the last reset: latency, failures, HTTP retries, parallelism, parsing."""
        with self._lock:
            lat = sorted(self.latencies)
            retries = getattr(self.chat, "retries", 0)
            out = {"sim_calls": len(lat), "sim_failed_calls": self.failed_calls,
                   "sim_http_retries": retries - self._retries_seen, "sim_max_in_flight": self.max_in_flight,
                   "sim_latency_mean_s": sum(lat) / len(lat) if lat else 0.0,
                   "sim_latency_p50_s": lat[len(lat) // 2] if lat else 0.0, "sim_latency_max_s": lat[-1] if lat else 0.0,
                   "sim_parse_retries": sum(u.retried for u in self.users.values()) - self._retried_seen,
                   # the longest any one dialogue waited on the simulator: no schedule can beat it
                   "sim_slowest_dialogue_s": max((u.call_seconds for u in self.users.values()), default=0.0)}
            if reset:
                self._reset_counters()
        return out

    def close(self):
        self.pool.shutdown(wait=True)


# -----------------------------------------------------------------------------
# Command line


MIN_SUPPORT_WORDS = 800   # a persona that has to last 9 turns needs a story to draw on


def scenario_depth(scenario):
    """(words, characters) of a scenario's own text: the persona card, the scene and the hidden need, as
    the simulator reads them. Words count whitespace-separated words plus CJK characters (one each)."""
    text = "\n".join((scenario.persona, scenario.scene, scenario.hidden_need))
    cjk = len(re.findall(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]", text))
    return len(re.sub(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]", " ", text).split()) + cjk, len(text)


def check(paths):
    """Print the coverage of scenario files; return a list of problems with the project's targets."""
    problems = []
    for path in paths:
        scenarios = load_scenarios(path)
        print(f"{path}: {len(scenarios)} scenarios")
        table = collections.Counter((s.split, s.kind, s.need or "-") for s in scenarios)
        for key in sorted(table):
            print(f"  {key[0]:5s} {key[1]:8s} {key[2]:16s} {table[key]:4d}")
        types = collections.Counter((s.split, s.kind, s.character_type) for s in scenarios)
        print("  character types: " + ", ".join(f"{'/'.join(k)}={n}" for k, n in sorted(types.items())))
        for kind in sorted({s.kind for s in scenarios}):
            depth = sorted(scenario_depth(s) for s in scenarios if s.kind == kind)
            words, chars = [d[0] for d in depth], [d[1] for d in depth]
            print(f"  depth of {kind} scenarios (persona, scene and need, as the simulator reads them): mean "
                  f"{sum(words) / len(words):.0f} words / {sum(chars) / len(chars):.0f} characters, "
                  f"min {min(words)} words, max {max(words)} words")
            if Path(path).suffix == ".json" and kind == "support" and sum(words) / len(words) < MIN_SUPPORT_WORDS:
                problems.append(f"{path}: support scenarios average {sum(words) / len(words):.0f} words (< {MIN_SUPPORT_WORDS})")
        names = collections.defaultdict(set)
        for s in scenarios:
            names[s.name].add(s.split)
        if shared := [n for n, splits in names.items() if len(splits) > 1]:
            print(f"  personas in both splits: {len(shared)} (e.g. {shared[0]})")
        if Path(path).suffix == ".json":  # the project's own file must meet the coverage targets
            for need in HIDDEN_NEEDS:
                for split, least in (("train", 55), ("test", 10)):
                    if table[(split, "support", need)] < least:
                        problems.append(f"{path}: {split} has {table[(split, 'support', need)]} '{need}' scenarios (< {least})")
            if sum(n for (_, kind, _), n in table.items() if kind == "chitchat") < 60:
                problems.append(f"{path}: fewer than 60 chitchat scenarios")
            if shared:
                problems.append(f"{path}: {len(shared)} test personas also appear in training")
            for what, values in (("name", [s.name for s in scenarios]), ("scene", [s.scene for s in scenarios]),
                                 ("first_talk", [s.first_talk for s in scenarios if s.first_talk])):
                if dupes := [v for v, n in collections.Counter(values).items() if n > 1]:
                    problems.append(f"{path}: {len(dupes)} repeated {what}s, e.g. {dupes[0][:60]!r}")
            sentences = collections.Counter()   # no sentence of 8 words or more is shared by two scenarios
            for s in scenarios:
                sentences.update({" ".join(t.split()) for t in re.split(r"(?<=[.!?])\s+|\n", f"{s.persona}\n{s.scene}")
                                  if len(t.split()) >= 8})
            if dupes := [v for v, n in sentences.items() if n > 1]:
                problems.append(f"{path}: {len(dupes)} sentences appear in more than one scenario, e.g. {dupes[0][:60]!r}")
    return problems


def interactive_chat(args):
    """You play the assistant; the simulated user answers and shows its emotion."""
    scenarios = {s.id: s for s in load_scenarios(args.scenarios)}
    scenario = scenarios.get(args.scenario) or random.Random(args.seed).choice(list(scenarios.values()))
    sim = Simulator(chat_from_args(args), mode="direct", **simulator_settings(args))
    print(f"[{scenario.id}] {scenario.name}, {scenario.character_type}; hidden need: {scenario.hidden_need}\n")
    print(f"user ({sim.settings['start_emotion']}): {sim.start({'you': scenario})['you']}")
    while not sim.users["you"].done:
        reply = input("you: ")
        turn = sim.step({"you": reply})["you"]
        print(f"user ({turn.emotion}, {turn.change:+d}): {turn.user_message}")
    print(f"\nended: {sim.users['you'].end_reason} at emotion {sim.users['you'].emotion}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("check", help="coverage of scenario files")
    p.add_argument("paths", nargs="*", default=[str(SCENARIOS_PATH)])
    p = commands.add_parser("chat", help="talk to a simulated user yourself")
    p.add_argument("--scenarios", default=str(SCENARIOS_PATH))
    p.add_argument("--scenario", help="scenario id (default: a random one)")
    p.add_argument("--seed", type=int, default=0)
    add_args(p, "sage")
    p = commands.add_parser("serve", help="the scripted user behind an OpenAI-compatible loopback server")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--difficulty", choices=DIFFICULTIES, default="normal")
    args = parser.parse_args(argv)
    if args.command == "check":
        problems = check(args.paths)
        print("\n".join(problems) or "coverage targets met")
        sys.exit(1 if problems else 0)
    elif args.command == "chat":
        if problem := sim_args_problem(args):
            p.error(problem)
        interactive_chat(args)
    else:
        from loopback import serve
        server = serve(ScriptedUser(args.difficulty), port=args.port, latency=args.delay)
        print(f"scripted simulated user at {server.url} (Ctrl-C to stop)")
        threading.Event().wait()


if __name__ == "__main__":
    main()
