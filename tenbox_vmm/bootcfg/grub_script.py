"""grub.cfg as GRUB's script language: words, tokens, then a syntax tree (imagetool child at image import; any user).

The lexer resolves quoting ('...', "...", backslash), line continuations and
comments, and keeps `$var`/`${var}` as parts of a word for the interpreter
(grub.py) to expand when it runs the command. The parser builds commands and
if/elif/else, for, while/until, function, menuentry and submenu blocks, with
nesting bounded by MAX_NESTING and a command's words by MAX_WORDS. It reads
nothing but the text it is given; every refusal is a one-line
BootConfigError naming the line.
"""

from __future__ import annotations

import re
from typing import List, NamedTuple, Optional, Tuple, Union

from tenbox_vmm.bootcfg.common import MAX_NESTING, MAX_WORDS, BootConfigError, _show

# ---------------------------------------------------------------------------------------------------------------
# grub.cfg: words and tokens

_LIT, _VAR = 0, 1
_WORD, _SEP, _LBRACE, _RBRACE, _EOF = range(5)

_BLANKS = re.compile(r"[ \t\r\f\v]+")
_PLAIN = re.compile(r"[^ \t\r\f\v\n;'\"\\$]+")
_DQ_PLAIN = re.compile(r'[^"\\$\n]+')
_VARNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[?#@*]")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

Part = Tuple[int, str, bool]  # (_LIT, text, quoted) or (_VAR, name, quoted)


class _Word(NamedTuple):
    parts: Tuple[Part, ...]
    plain: Optional[str]  # the text of a word with no quoting and no variables: keywords, braces, assignments
    line: int


class _Token(NamedTuple):
    kind: int
    word: Optional[_Word]
    line: int


def _variable(text: str, i: int, line: int) -> Tuple[Optional[str], int]:
    """The variable name at text[i] == "$" and the index after it; (None, i + 1) for a lone "$"."""
    if text.startswith("{", i + 1):
        end = text.find("}", i + 2)
        if end < 0:
            raise BootConfigError("grub.cfg line %d: ${ without }" % line)
        name = text[i + 2:end]
        if not _VARNAME.fullmatch(name):
            raise BootConfigError("grub.cfg line %d: bad variable name %s" % (line, _show(name)))
        return name, end + 1
    m = _VARNAME.match(text, i + 1)
    if m:
        return m.group(), m.end()
    return None, i + 1


def _tokens(text: str) -> List[_Token]:
    """grub.cfg as words, separators (newline, ";") and braces; quoting and continuations resolved."""
    out: List[_Token] = []
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\\" and text.startswith("\n", i + 1):
            i, line = i + 2, line + 1
        elif c in " \t\r\f\v":
            i = _BLANKS.match(text, i).end()  # type: ignore[union-attr]
        elif c == "\n" or c == ";":
            out.append(_Token(_SEP, None, line))
            line += c == "\n"
            i += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        else:
            i, line = _word(text, i, line, out)
    out.append(_Token(_EOF, None, line))
    return out


def _word(text: str, i: int, line: int, out: List[_Token]) -> Tuple[int, int]:
    """Scan one word starting at text[i]; append its token; return the index and line after it."""
    n = len(text)
    parts: List[Part] = []
    plain = True
    start = line
    while i < n:
        c = text[i]
        if c in " \t\r\f\v\n;":
            break
        if c == "\\":
            if i + 1 >= n:
                parts.append((_LIT, "\\", False))
                i += 1
            elif text[i + 1] == "\n":
                i, line = i + 2, line + 1
            else:
                parts.append((_LIT, text[i + 1], True))
                plain = False
                i += 2
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise BootConfigError("grub.cfg line %d: unterminated single quote" % line)
            seg = text[i + 1:end]
            parts.append((_LIT, seg, True))
            line += seg.count("\n")
            plain = False
            i = end + 1
        elif c == '"':
            i, line = _double_quoted(text, i + 1, line, parts)
            plain = False
        elif c == "$":
            name, i = _variable(text, i, line)
            if name is None:
                parts.append((_LIT, "$", False))
            else:
                parts.append((_VAR, name, False))
                plain = False
        else:
            m = _PLAIN.match(text, i)
            parts.append((_LIT, m.group(), False))  # type: ignore[union-attr]
            i = m.end()  # type: ignore[union-attr]
    word = _Word(tuple(parts), "".join(p[1] for p in parts) if plain else None, start)
    kind = {"{": _LBRACE, "}": _RBRACE}.get(word.plain or "", _WORD)
    out.append(_Token(kind, word, start))
    return i, line


def _double_quoted(text: str, i: int, line: int, parts: List[Part]) -> Tuple[int, int]:
    """Scan "..." from just after the opening quote: backslash escapes $ " \\ and newline only."""
    n = len(text)
    opened = line
    buf: List[str] = []
    while True:
        if i >= n:
            raise BootConfigError("grub.cfg line %d: unterminated double quote" % opened)
        c = text[i]
        if c == '"':
            i += 1
            break
        if c == "\\" and i + 1 < n and text[i + 1] in '$"\\\n':
            if text[i + 1] == "\n":
                line += 1
            else:
                buf.append(text[i + 1])
            i += 2
        elif c == "$":
            name, i = _variable(text, i, line)
            if name is None:
                buf.append("$")
            else:
                parts.append((_LIT, "".join(buf), True))
                buf = []
                parts.append((_VAR, name, True))
        elif c == "\n" or c == "\\":
            buf.append(c)
            line += c == "\n"
            i += 1
        else:
            m = _DQ_PLAIN.match(text, i)
            buf.append(m.group())  # type: ignore[union-attr]
            i = m.end()  # type: ignore[union-attr]
    parts.append((_LIT, "".join(buf), True))  # even "" makes a word
    return i, line


# ---------------------------------------------------------------------------------------------------------------
# grub.cfg: the syntax tree

class _Cmd(NamedTuple):
    words: Tuple[_Word, ...]
    line: int


class _If(NamedTuple):
    clauses: Tuple[Tuple[List["_Node"], List["_Node"]], ...]  # (condition, body) for if and each elif
    otherwise: List["_Node"]
    line: int


class _For(NamedTuple):
    var: str
    words: Tuple[_Word, ...]
    body: List["_Node"]
    line: int


class _While(NamedTuple):
    cond: List["_Node"]
    body: List["_Node"]
    line: int


class _Function(NamedTuple):
    name: str
    body: List["_Node"]
    line: int


class _Block(NamedTuple):
    submenu: bool
    words: Tuple[_Word, ...]  # the arguments: title, options, positional parameters
    body: List["_Node"]
    line: int


_Node = Union[_Cmd, _If, _For, _While, _Function, _Block]
_CLOSERS = frozenset(("then", "elif", "else", "fi", "do", "done"))
_NO_TERMS: frozenset = frozenset()


class _Parser:
    """Recursive descent over the tokens; the recursion is bounded by MAX_NESTING."""

    def __init__(self, tokens: List[_Token]):
        self.toks = tokens
        self.i = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.toks[self.i]

    def take(self) -> _Token:
        tok = self.toks[self.i]
        if tok.kind != _EOF:
            self.i += 1
        return tok

    def script(self) -> List[_Node]:
        nodes, term = self.body(_NO_TERMS)
        if term is not None:
            raise BootConfigError("grub.cfg line %d: unexpected %s" % (self.peek().line, term))
        return nodes

    def body(self, terms: frozenset) -> Tuple[List[_Node], Optional[str]]:
        """Commands up to EOF (None), "}" (not taken) or a keyword of `terms` at a command's start (taken)."""
        nodes: List[_Node] = []
        while True:
            tok = self.peek()
            if tok.kind == _SEP:
                self.i += 1
            elif tok.kind == _EOF:
                return nodes, None
            elif tok.kind == _RBRACE:
                return nodes, "}"
            elif tok.kind == _LBRACE:
                raise BootConfigError("grub.cfg line %d: unexpected {" % tok.line)
            elif tok.word is not None and tok.word.plain in terms:
                self.i += 1
                return nodes, tok.word.plain
            else:
                nodes.append(self.command())

    def enter(self, line: int) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise BootConfigError("grub.cfg line %d: blocks nest deeper than %d" % (line, MAX_NESTING))

    def command(self) -> _Node:
        tok = self.take()
        assert tok.word is not None
        kw = tok.word.plain
        if kw in _CLOSERS:
            raise BootConfigError("grub.cfg line %d: unexpected %s" % (tok.line, kw))
        parse = {"if": self.if_, "for": self.for_, "while": self.while_, "until": self.while_,
                 "function": self.function, "menuentry": self.block, "submenu": self.block}.get(kw or "")
        if parse is None:
            return _Cmd(self.words(tok.word), tok.line)
        self.enter(tok.line)
        node = parse(kw or "", tok.line)
        self.depth -= 1
        return node

    def words(self, first: Optional[_Word]) -> Tuple[_Word, ...]:
        """The words of a command, up to a separator, "}" or EOF (not taken)."""
        out = [first] if first is not None else []
        while self.peek().kind == _WORD:
            out.append(self.take().word)  # type: ignore[arg-type]
            if len(out) > MAX_WORDS:
                raise BootConfigError("grub.cfg line %d: more than %d words in one command"
                                      % (self.peek().line, MAX_WORDS))
        if self.peek().kind == _LBRACE:
            raise BootConfigError("grub.cfg line %d: unexpected {" % self.peek().line)
        return tuple(out)  # type: ignore[arg-type]

    def if_(self, kw: str, line: int) -> _Node:
        clauses = []
        while True:
            cond, term = self.body(frozenset(("then",)))
            if term != "then":
                raise BootConfigError("grub.cfg line %d: if without then" % line)
            body, term = self.body(frozenset(("elif", "else", "fi")))
            clauses.append((cond, body))
            if term != "elif":
                break
        otherwise: List[_Node] = []
        if term == "else":
            otherwise, term = self.body(frozenset(("fi",)))
        if term != "fi":
            raise BootConfigError("grub.cfg line %d: if without fi" % line)
        return _If(tuple(clauses), otherwise, line)

    def for_(self, kw: str, line: int) -> _Node:
        name = self.take()
        if name.kind != _WORD or not _IDENT.match(name.word.plain or ""):  # type: ignore[union-attr]
            raise BootConfigError("grub.cfg line %d: for without a variable name" % line)
        in_ = self.take()
        if in_.kind != _WORD or in_.word.plain != "in":  # type: ignore[union-attr]
            raise BootConfigError("grub.cfg line %d: for without in" % line)
        words = self.words(None)
        nothing, term = self.body(frozenset(("do",)))
        if term != "do" or nothing:
            raise BootConfigError("grub.cfg line %d: for without do" % line)
        body, term = self.body(frozenset(("done",)))
        if term != "done":
            raise BootConfigError("grub.cfg line %d: for without done" % line)
        return _For(name.word.plain or "", words, body, line)  # type: ignore[union-attr]

    def while_(self, kw: str, line: int) -> _Node:
        cond, term = self.body(frozenset(("do",)))
        if term != "do":
            raise BootConfigError("grub.cfg line %d: %s without do" % (line, kw))
        body, term = self.body(frozenset(("done",)))
        if term != "done":
            raise BootConfigError("grub.cfg line %d: %s without done" % (line, kw))
        return _While(cond, body, line)

    def braced(self, what: str, line: int) -> List[_Node]:
        if self.take().kind != _LBRACE:
            raise BootConfigError("grub.cfg line %d: %s without {" % (line, what))
        body, term = self.body(_NO_TERMS)
        if term != "}":
            raise BootConfigError("grub.cfg line %d: %s without } (unterminated)" % (line, what))
        self.take()
        return body

    def function(self, kw: str, line: int) -> _Node:
        name = self.take()
        if name.kind != _WORD or not name.word.plain:  # type: ignore[union-attr]
            raise BootConfigError("grub.cfg line %d: function without a name" % line)
        return _Function(name.word.plain, self.braced("function", line), line)  # type: ignore[union-attr]

    def block(self, kw: str, line: int) -> _Node:
        words = []
        while self.peek().kind == _WORD:
            words.append(self.take().word)
            if len(words) > MAX_WORDS:
                raise BootConfigError("grub.cfg line %d: more than %d words in one %s" % (line, MAX_WORDS, kw))
        return _Block(kw == "submenu", tuple(words), self.braced(kw, line), line)  # type: ignore[arg-type]
