"""Pure A1111 prompt syntax: extra-network tags, attention weights, prompt editing and alternation.

Nothing here imports torch; every function maps strings to plain data.

Public API
----------
``extract_lora_tags(text) -> (text, loras)``
    Removes ``<lora:name>``, ``<lora:name:w>``, ``<lora:name:te:unet>`` (and ``<lyco:...>``, and the
    named forms ``te=``/``unet=``) and returns them as :class:`webui.types.LoraRef`:
    ``weight`` is the UNet multiplier, ``te_weight`` the text-encoder one (``None`` when equal).
``extract_extra_networks(text) -> (text, tags)``
    Removes every ``<kind:args>`` tag (A1111 strips all of them) and returns ``ExtraNetworkTag``\\ s.
``parse_attention(text) -> list[(fragment, weight)]``
    A1111's ``parse_prompt_attention``: ``(a)`` x1.1, ``(a:1.3)``, ``[a]`` /1.1, ``\\(`` escapes,
    unclosed brackets apply to the rest, adjacent equal weights merged.  ``BREAK`` becomes the
    marker ``BREAK_MARKER == ("BREAK", -1.0)``; unlike A1111 it is never multiplied by an enclosing
    bracket (A1111 then silently turns it into the literal word "BREAK").
``prompt_schedule(text, steps, *, hires_steps=None, legacy=False) -> list[(end_step, text)]``
    A1111's ``get_learned_conditioning_prompt_schedules`` for one prompt: ``[from:to:when]``,
    ``[to:when]``, ``[from::when]`` and ``[a|b]`` alternation (switches every step).  ``when`` with a
    decimal point is a fraction of ``steps`` (``0.25``, ``.5``, ``1.0`` = all), without one a step
    number (A1111 >= 1.6).  ``legacy=True`` is A1111's "old prompt editing timelines" (``when < 1``
    is a fraction, else a step).  ``hires_steps`` gives the schedule of a hires-fix pass: integers
    count on from the base steps (``[a:b:25]`` with 20 base steps switches at hires step 5) and
    fractions from 1.0.  Text that does not parse (a stray ``|``, a trailing ``\\``) is kept whole.
    Differential tests against A1111's lark grammar agree on random bracket soup except one case:
    where an edit or alternation is directly followed by two or more stray bracket characters
    (``[a:b:5]))``) lark's ambiguity resolution reads it as literal text; we still resolve it.
``entry_at(schedule, step) -> text``
    The entry for a 0-based sampler step, as A1111's ``reconstruct_cond_batch`` picks it: the first
    entry whose ``end_step >= step``.
``parse_prompt(text, steps, ...) -> ParsedPrompt(text, schedule, loras, extra_networks)``
    Ties it together: tags are removed first (like A1111), then the rest is scheduled.

Not supported: composable diffusion (``AND`` stays literal text).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from webui.types import LoraRef, RequestError

__all__ = [
    "BREAK_MARKER",
    "append_lora_tags",
    "ExtraNetworkTag",
    "ParsedPrompt",
    "entry_at",
    "extract_extra_networks",
    "extract_lora_tags",
    "lora_ref",
    "lora_tag",
    "parse_attention",
    "parse_prompt",
    "prompt_schedule",
]

BREAK_MARKER: tuple[str, float] = ("BREAK", -1.0)
LORA_KINDS = frozenset({"lora", "lyco"})

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_ROUND = 1.1
_SQUARE = 1 / 1.1


# --------------------------------------------------------------------------- extra networks
@dataclass(frozen=True)
class ExtraNetworkTag:
    """``<kind:arg1:arg2:key=value>``: ``kind`` ("lora", "hypernet", ...) and the raw ``args``."""

    kind: str
    args: tuple[str, ...]

    @property
    def positional(self) -> tuple[str, ...]:
        return tuple(a for a in self.args if len(a.split("=", 2)) != 2)

    @property
    def named(self) -> dict[str, str]:
        return dict(a.split("=", 1) for a in self.args if len(a.split("=", 2)) == 2)


def extract_extra_networks(text: str, kinds: frozenset[str] | None = None) -> tuple[str, tuple[ExtraNetworkTag, ...]]:
    """Remove ``<kind:...>`` tags (all kinds, or only ``kinds``) and return them in prompt order."""
    found: list[ExtraNetworkTag] = []

    def take(match: re.Match[str]) -> str:
        kind = match.group(1)
        if kinds is not None and kind not in kinds:
            return match.group(0)
        found.append(ExtraNetworkTag(kind, tuple(match.group(2).split(":"))))
        return ""

    return _EXTRA_NETWORK.sub(take, text), tuple(found)


def _number(tag: ExtraNetworkTag, value: str, label: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise RequestError(
            f"<{tag.kind}:{':'.join(tag.args)}>: {label} {value.strip()!r} is not a number; "
            f"write it like <{tag.kind}:name:0.8> or <{tag.kind}:name:te_weight:unet_weight>"
        ) from None


def lora_ref(tag: ExtraNetworkTag) -> LoraRef:
    """A1111 semantics: ``<lora:name:te:unet>``; ``unet`` defaults to ``te``, ``te`` to 1.0."""
    positional, named = tag.positional, tag.named
    name = positional[0].strip() if positional else ""
    te = _number(tag, positional[1], "weight") if len(positional) > 1 else 1.0
    if "te" in named:
        te = _number(tag, named["te"], "te weight")
    unet = _number(tag, positional[2], "unet weight") if len(positional) > 2 else te
    if "unet" in named:
        unet = _number(tag, named["unet"], "unet weight")
    blocks = named.get("lbw", "").strip() or None  # A1111 "LoRA Block Weight": lbw=MIDD or lbw=1,0,...
    return LoraRef(name=name, weight=unet, te_weight=None if te == unet else te, block_weights=blocks)


def lora_tag(ref: LoraRef) -> str:
    """The ``<lora:...>`` tag that ``lora_ref`` reads back as ``ref`` (weights printed with ``%g``)."""
    parts = [ref.name]
    if ref.te_weight is not None and ref.te_weight != ref.weight:
        parts += [f"{ref.te_weight:g}", f"{ref.weight:g}"]
    else:
        parts.append(f"{ref.weight:g}")
    if ref.block_weights:
        parts.append(f"lbw={ref.block_weights}")
    return "<lora:" + ":".join(parts) + ">"


def append_lora_tags(prompt: str, refs: "tuple[LoraRef, ...] | list[LoraRef]") -> str:
    """``prompt`` plus a ``<lora:>`` tag for each of ``refs`` (UI slots) that the prompt has no tag for:
    what the infotext records, so that a pasted infotext restores the whole stack from the prompt alone."""
    _, tagged = extract_lora_tags(prompt)
    names = {ref.name for ref in tagged}
    extra = [lora_tag(ref) for ref in refs if ref.name not in names]
    if not extra:
        return prompt
    return f"{prompt.rstrip()} {' '.join(extra)}" if prompt.strip() else " ".join(extra)


def extract_lora_tags(text: str) -> tuple[str, tuple[LoraRef, ...]]:
    """Remove ``<lora:...>``/``<lyco:...>`` tags; other tags stay in the text."""
    rest, tags = extract_extra_networks(text, LORA_KINDS)
    return rest, tuple(lora_ref(tag) for tag in tags)


# --------------------------------------------------------------------------- attention weights
_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]          # escaped bracket or backslash: literal
    | \\                  # lone backslash: dropped
    | [(\[]               # opening bracket
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # ':1.3)' closes a round bracket with a weight
    | [)\]]               # closing bracket
    | [^\\()\[\]:]+       # plain text
    | :                   # a colon that is not a weight
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(fragment, weight)`` pairs, A1111 ``parse_prompt_attention`` style."""
    out: list[list] = []  # [fragment, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            if not item[2]:
                item[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            out.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(out))
        elif token == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), _ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    out.append([BREAK_MARKER[0], BREAK_MARKER[1], True])
                out.append([part, 1.0, False])

    for start in round_open:
        scale(start, _ROUND)
    for start in square_open:
        scale(start, _SQUARE)

    merged: list[tuple[str, float]] = []
    for fragment, weight, is_break in out:
        if merged and not is_break and merged[-1] != BREAK_MARKER and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + fragment, weight)
        else:
            merged.append(BREAK_MARKER if is_break else (fragment, weight))
    return merged or [("", 1.0)]


# --------------------------------------------------------------------------- scheduling
class _Unparsable(Exception):
    pass


@dataclass(frozen=True)
class _Edit:
    before: tuple | None  # None: "[to:when]"
    after: tuple
    when: str


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple, ...]


_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_WHEN = re.compile(r"\s*([+-]?(?:(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)?))\s*\]")


class _ScheduleGrammar:
    """Recursive descent over A1111's prompt-editing grammar.

    ``seq`` is a run of plain text, ``( seq )``, ``( seq : seq )``, ``[ seq ]``, ``[ [seq :] seq : N ]``
    and ``[ seq | seq ... ]``; at the top level a bracket or colon that starts no construct is
    literal text.  Brackets are kept verbatim (weights are parsed later), only edits and
    alternations are resolved.  Results are memoised per position, so a prompt parses in linear time.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.memo: dict[int, tuple[tuple, int]] = {}

    def top(self) -> tuple:
        items: list = []
        pos, end = 0, len(self.text)
        while pos < end:
            seq, pos = self.seq(pos)
            items.extend(seq)
            if pos < end:
                if self.text[pos] not in "[]():":
                    raise _Unparsable(pos)
                items.append(self.text[pos])
                pos += 1
        return tuple(items)

    def seq(self, pos: int) -> tuple[tuple, int]:
        if pos in self.memo:
            return self.memo[pos]
        start, items, text = pos, [], self.text
        while pos < len(text):
            char = text[pos]
            if char in "):]|":
                break
            if char == "(":
                found = self.round(pos)
            elif char == "[":
                found = self.square(pos)
            else:
                match = _PLAIN.match(text, pos)
                found = ((match.group(0),), match.end()) if match else None
            if found is None:
                break
            items.extend(found[0])
            pos = found[1]
        self.memo[start] = (tuple(items), pos)
        return self.memo[start]

    def _at(self, pos: int, char: str) -> bool:
        return pos < len(self.text) and self.text[pos] == char

    def round(self, pos: int) -> tuple[tuple, int] | None:
        inner, pos = self.seq(pos + 1)
        if self._at(pos, ")"):
            return ("(", *inner, ")"), pos + 1
        if self._at(pos, ":"):
            second, after = self.seq(pos + 1)
            if self._at(after, ")"):
                return ("(", *inner, ":", *second, ")"), after + 1
        return None

    def square(self, pos: int) -> tuple[tuple, int] | None:
        first, pos = self.seq(pos + 1)
        if self._at(pos, "]"):
            return ("[", *first, "]"), pos + 1
        if self._at(pos, ":"):
            when = _WHEN.match(self.text, pos + 1)
            if when:
                return (_Edit(None, first, when.group(1)),), when.end()
            second, pos = self.seq(pos + 1)
            if self._at(pos, ":"):
                when = _WHEN.match(self.text, pos + 1)
                if when:
                    return (_Edit(first, second, when.group(1)),), when.end()
            return None
        if self._at(pos, "|"):
            options = [first]
            while self._at(pos, "|"):
                option, pos = self.seq(pos + 1)
                options.append(option)
            if self._at(pos, "]"):
                return (_Alternate(tuple(options)),), pos + 1
        return None


def _walk(items: tuple):
    for item in items:
        yield item
        if isinstance(item, _Edit):
            yield from _walk(item.before or ())
            yield from _walk(item.after)
        elif isinstance(item, _Alternate):
            for option in item.options:
                yield from _walk(option)


def _render(items: tuple, step: int, when, out: list[str]) -> None:
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Edit):
            _render((item.before or ()) if step <= when(item.when) else item.after, step, when, out)
        else:
            _render(item.options[(step - 1) % len(item.options)], step, when, out)


def prompt_schedule(
    text: str, steps: int, *, hires_steps: int | None = None, legacy: bool = False
) -> list[tuple[int, str]]:
    """``[(end_step, text), ...]`` for ``text`` over ``steps`` (see the module docstring)."""
    int_offset, frac_offset, total = 0, 0.0, steps
    if hires_steps is not None and not legacy:
        int_offset, frac_offset, total = steps, 1.0, hires_steps
    total = max(int(total), 1)

    def when(raw: str) -> int:
        value = float(raw)
        if legacy:
            value = value * total if value < 1 else value
        elif "." in raw:
            value = (value - frac_offset) * total
        else:
            value = value - int_offset
        return int(max(-1.0, min(value, float(total))))

    try:
        tree = _ScheduleGrammar(text).top()
    except (_Unparsable, RecursionError):
        return [(total, text)]

    ends = {total}
    for node in _walk(tree):
        if isinstance(node, _Edit) and when(node.when) >= 1:
            ends.add(when(node.when))
        elif isinstance(node, _Alternate):
            ends.update(range(1, total + 1))

    schedule = []
    for end in sorted(ends):
        out: list[str] = []
        _render(tree, end, when, out)
        schedule.append((end, "".join(out)))
    return schedule


def entry_at(schedule: list[tuple[int, str]] | tuple, step: int):
    """The text (or payload) of ``schedule`` in force at 0-based sampler ``step`` (A1111 rule)."""
    for end, payload in schedule:
        if step <= end:
            return payload
    return schedule[-1][1]


# --------------------------------------------------------------------------- everything together
@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt after tag extraction and scheduling.

    ``text``: the prompt without extra-network tags; ``schedule``: ``((end_step, text), ...)``;
    ``loras``: ``<lora:>``/``<lyco:>`` tags in prompt order; ``extra_networks``: other tags
    (``<hypernet:...>``...) which are removed from the text like A1111 does, for plugins to use.
    """

    text: str
    schedule: tuple[tuple[int, str], ...]
    loras: tuple[LoraRef, ...] = ()
    extra_networks: tuple[ExtraNetworkTag, ...] = ()

    @property
    def texts(self) -> tuple[str, ...]:
        """The distinct texts of the schedule, in order of first use."""
        return tuple(dict.fromkeys(text for _, text in self.schedule))


def parse_prompt(text: str, steps: int, *, hires_steps: int | None = None, legacy: bool = False) -> ParsedPrompt:
    rest, tags = extract_extra_networks(text)
    loras = tuple(lora_ref(tag) for tag in tags if tag.kind in LORA_KINDS)
    others = tuple(tag for tag in tags if tag.kind not in LORA_KINDS)
    schedule = tuple(prompt_schedule(rest, steps, hires_steps=hires_steps, legacy=legacy))
    return ParsedPrompt(text=rest, schedule=schedule, loras=loras, extra_networks=others)
