"""Regular expressions matched without backtracking, for module-name patterns read from untrusted files.

PEFT reads ``rank_pattern`` / ``alpha_pattern`` keys and a string ``target_modules`` as Python regexes.
Python's ``re`` backtracks: a crafted key such as ``(a+)+`` takes exponential time on a module name
like ``aaaa…a!``. ``SafeRegex`` gives the same yes/no answers as ``re.match`` / ``re.fullmatch`` for the
subset below, by simulating the pattern's automaton (Thompson's construction) over the text once:
time O(len(text) · states), with at most ``MAX_STATES`` states.

Supported: literal characters; ``\\`` before a character that is not an ASCII letter or digit (a
literal, as ``re.escape`` writes it); ``.`` (any character but a newline); ``\\d \\D \\w \\W \\s \\S``
(Unicode, as ``re`` has them for str patterns); classes ``[...]`` / ``[^...]`` with ranges; groups
``(...)``, ``(?:...)``, ``(?P<name>...)``; ``|``; ``* + ? {m} {m,} {,n} {m,n}``, greedy or lazy
(the same matches for a yes/no question); ``^`` and ``$`` (no MULTILINE: ``$`` also matches before a
final newline, as in ``re``). Anything else — back-references, look-arounds, inline flags,
possessive quantifiers, other escapes, a ``{`` that is not a quantifier — raises ValueError.
"""

from __future__ import annotations

MAX_STATES = 1000  # a dotted module path is ~60; counted repeats ({m,n}) copy their body
MAX_NESTING = 50  # groups inside groups; the parser and the builder recurse once per level
# Cached DFA transitions per pattern. Realistic patterns need a few dozen; a crafted pattern and name can
# reach a new set of up to MAX_STATES states at every character (~17 kB each), so the cache is bounded.
MAX_CACHED = 1000

_CHAR, _SPLIT, _START, _END, _FINAL = range(5)
_ASCII_ALNUM = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_CATEGORIES = {
    "d": str.isdecimal,
    "s": str.isspace,
    "w": lambda c: c.isalnum() or c == "_",
}


def _category(letter: str):
    test = _CATEGORIES[letter.lower()]
    return test if letter.islower() else (lambda c: not test(c))


class _Parser:
    """Recursive descent over the pattern text, giving a tree of tuples:
    ("char", predicate) · ("cat", [nodes]) · ("alt", [nodes]) · ("rep", node, min, max or None) ·
    ("start",) · ("end",)."""

    def __init__(self, pattern: str):
        self.text, self.pos, self.group_names, self.depth = pattern, 0, set(), 0

    def fail(self, why: str):
        raise ValueError(f"{why} at position {self.pos}")

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def take(self) -> str:
        if self.pos >= len(self.text):
            self.fail("unexpected end of pattern")
        c = self.text[self.pos]
        self.pos += 1
        return c

    def parse(self):
        tree = self.alternation()
        if self.pos != len(self.text):
            self.fail("unbalanced parenthesis")
        return tree

    def alternation(self):
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.repetition())
        return ("cat", items)

    def repetition(self):
        atom = self.atom()
        bounds = self.quantifier()
        if bounds is None:
            return atom
        if atom[0] in ("start", "end"):
            self.fail("nothing to repeat")
        if self.peek() == "?":  # lazy: the same yes/no answer as greedy
            self.pos += 1
        if self.peek() in ("*", "+", "?", "{"):
            self.fail("multiple repeat (possessive quantifiers are not supported)")
        return ("rep", atom, *bounds)

    def quantifier(self) -> tuple[int, int | None] | None:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.pos += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{":
            return None
        close = self.text.find("}", self.pos)
        body = self.text[self.pos + 1:close] if close >= 0 else ""
        low, comma, high = body.partition(",")
        if close < 0 or not all(part == "" or part.isascii() and part.isdigit() for part in (low, high)) \
                or (not comma and not low):
            self.fail("'{' that is not a repeat count")
        self.pos = close + 1
        low_n = int(low) if low else 0
        high_n = (int(high) if high else None) if comma else low_n
        if high_n is not None and high_n < low_n:
            self.fail("min repeat greater than max repeat")
        return low_n, high_n

    def atom(self):
        c = self.take()
        if c == "(":
            if self.depth >= MAX_NESTING:
                self.fail(f"groups nested more than {MAX_NESTING} deep")
            if self.peek() == "?":
                self.group_prefix()
            self.depth += 1
            inner = self.alternation()
            self.depth -= 1
            if self.peek() != ")":
                self.fail("missing )")
            self.pos += 1
            return inner
        if c == "{":
            self.pos -= 1
            self.fail("'{' that does not follow something to repeat, or is not a repeat count")
        if c in ("*", "+", "?"):
            self.pos -= 1
            self.fail("nothing to repeat")
        if c == ")":
            self.fail("unbalanced parenthesis")
        if c == "[":
            return ("char", self.char_class())
        if c == ".":
            return ("char", lambda ch: ch != "\n")
        if c == "^":
            return ("start",)
        if c == "$":
            return ("end",)
        if c == "\\":
            return ("char", self.escape())
        return ("char", c.__eq__)

    def group_prefix(self):
        self.pos += 1  # the '?'
        if self.peek() == ":":
            self.pos += 1
            return
        if self.text.startswith("P<", self.pos):
            close = self.text.find(">", self.pos)
            name = self.text[self.pos + 2:close] if close >= 0 else ""
            if not name.isidentifier() or name in self.group_names:
                self.fail(f"bad or repeated group name {name!r}")
            self.group_names.add(name)
            self.pos = close + 1
            return
        self.fail("'(?' other than '(?:' and '(?P<name>' (flags, look-arounds, references) is not supported")

    def escape(self):
        """The predicate of '\\x' (the backslash already taken)."""
        c = self.take()
        if c in "dDwWsS":
            return _category(c)
        if c in _ASCII_ALNUM:
            self.fail(f"escape '\\{c}' is not supported")
        return c.__eq__

    def char_class(self):
        negate = self.peek() == "^"
        if negate:
            self.pos += 1
        tests, first = [], True
        while True:
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            if c == "\\":
                escape_at = self.pos
                test = self.escape()
                low = None if self.text[escape_at] in "dDwWsS" else self.text[escape_at]
            else:
                test, low = c.__eq__, c
            if self.peek() == "-" and self.text[self.pos + 1:self.pos + 2] not in ("]", ""):
                self.pos += 1
                high = self.take()
                if high == "\\":
                    escape_at = self.pos
                    self.escape()
                    high = None if self.text[escape_at] in "dDwWsS" else self.text[escape_at]
                if low is None or high is None or high < low:
                    self.fail("bad character range")
                test = (lambda lo, hi: lambda ch: lo <= ch <= hi)(low, high)
            tests.append(test)
        return lambda ch: any(t(ch) for t in tests) != negate


class SafeRegex:
    """``re.match(pattern, text) is not None`` as ``.match(text)`` and ``re.fullmatch`` as ``.fullmatch``,
    in O(len(text) · states) time; ValueError for a pattern outside the supported subset (module docstring).

    >>> SafeRegex(r"(a+)+$").match("a" * 100 + "!")   # re.match backtracks for ~2**100 steps here
    False
    >>> SafeRegex(r"(.*\\.)?(q_proj|v_proj)$").match("model.layers.0.self_attn.v_proj")
    True
    """

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise ValueError(f"expected a string pattern, got {type(pattern).__name__}")
        self.pattern = pattern
        self._kinds: list[int] = []
        self._args: list = []  # _CHAR: predicate, _SPLIT: list of targets
        self._nexts: list[int] = []
        self._final = self._add(_FINAL, None, -1)
        self._start = self._build(_Parser(pattern).parse(), self._final)
        self._closures: dict = {}  # (state set, at start, at end) -> closed set
        self._transitions: dict = {}  # (closed set, character, at end after it) -> closed set

    def _add(self, kind: int, arg, next_state: int) -> int:
        if len(self._kinds) >= MAX_STATES:
            raise ValueError(f"the pattern needs more than {MAX_STATES} automaton states")
        self._kinds.append(kind)
        self._args.append(arg)
        self._nexts.append(next_state)
        return len(self._kinds) - 1

    def _build(self, node, next_state: int) -> int:
        """The entry state of `node` followed by `next_state` (built back to front)."""
        kind = node[0]
        if kind == "char":
            return self._add(_CHAR, node[1], next_state)
        if kind == "start":
            return self._add(_START, None, next_state)
        if kind == "end":
            return self._add(_END, None, next_state)
        if kind == "cat":
            for item in reversed(node[1]):
                next_state = self._build(item, next_state)
            return next_state
        if kind == "alt":
            return self._add(_SPLIT, [self._build(branch, next_state) for branch in node[1]], -1)
        _, body, low, high = node
        if high is None:  # a loop: entry -> (body -> entry | next)
            loop = self._add(_SPLIT, None, -1)
            self._args[loop] = [self._build(body, loop), next_state]
            next_state = loop
        else:  # optional copies, each skipping straight to what follows
            exit_state = next_state
            for _ in range(high - low):
                next_state = self._add(_SPLIT, [self._build(body, next_state), exit_state], -1)
        for _ in range(low):
            size = len(self._kinds)
            next_state = self._build(body, next_state)
            if len(self._kinds) == size:  # a body without states ("()", "a{0}") matches only "": once is all
                break
        return next_state

    def _closure(self, states: frozenset, at_start: bool, at_end: bool) -> frozenset:
        """The character-consuming (and final) states reachable from `states` without input."""
        key = (states, at_start, at_end)
        closed = self._closures.get(key)
        if closed is None:
            seen, todo, out = set(), list(states), set()
            while todo:
                s = todo.pop()
                if s in seen:
                    continue
                seen.add(s)
                kind = self._kinds[s]
                if kind in (_CHAR, _FINAL):
                    out.add(s)
                elif kind == _SPLIT:
                    todo.extend(self._args[s])
                elif (kind == _START and at_start) or (kind == _END and at_end):
                    todo.append(self._nexts[s])
            closed = self._closures[key] = frozenset(out)
        return closed

    def _step(self, closed: frozenset, ch: str, at_end: bool) -> frozenset:
        """The closed set after reading `ch` (a DFA transition, built on first use)."""
        key = (closed, ch, at_end)
        after = self._transitions.get(key)
        if after is None:
            if len(self._transitions) >= MAX_CACHED:
                self._transitions.clear()
                self._closures.clear()
            states = frozenset(self._nexts[s] for s in closed if self._kinds[s] == _CHAR and self._args[s](ch))
            after = self._transitions[key] = self._closure(states, False, at_end)
        return after

    def _run(self, text: str, whole: bool) -> bool:
        n = len(text)
        ends = {n, n - 1} if text.endswith("\n") else {n}  # where '$' holds
        states = self._closure(frozenset((self._start,)), True, 0 in ends)
        for pos, ch in enumerate(text):
            if not states or (not whole and self._final in states):
                break
            states = self._step(states, ch, pos + 1 in ends)
        else:
            return self._final in states
        return bool(states) and not whole

    def match(self, text: str) -> bool:
        """Whether the pattern matches at the start of `text` (``re.match``)."""
        return self._run(text, whole=False)

    def fullmatch(self, text: str) -> bool:
        """Whether the pattern matches all of `text` (``re.fullmatch``)."""
        return self._run(text, whole=True)
