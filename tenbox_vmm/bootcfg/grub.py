"""GRUB's default menu entry, found by running grub.cfg's script (imagetool child at image import; any user).

grub.cfg, as grub-mkconfig writes it (Debian, Ubuntu): the script is run by
a small interpreter, the way GRUB builds its menu, except that nothing
outside the text exists.

- Understood: quoting ('...', "...", backslash), line continuation,
  comments; `$var`, `${var}` (unquoted values split into words, unknown
  ones empty); `set`, `unset`, `NAME=value`; `if/elif/else/fi` with `[`
  and `test` (strings, numbers, `-z`, `-n`, `!`, `-a`, `-o`, parentheses);
  `function` and calls with `$1`...; `for` loops; `menuentry` and
  `submenu` with `--id`/`$menuentry_id_option`, `--class`, ...; `search`
  (`--fs-uuid --set=root UUID`, `search.fs_uuid`); `linux`/`linuxefi`/
  `linux16` and `initrd`/`initrdefi`/`initrd16` with several files.
- The GRUB it plays: 2.06 or later on a PC BIOS (`grub_platform=pc`, every
  `feature_*` grub-mkconfig tests for set to `y`), no grubenv unless the
  caller passes its variables, so `set default="${saved_entry}"` is entry 0.
- Not modelled: files. A file test (`-e`, `-f`, `-s`, `-d`) is false except
  for grubenv when its variables were given; `source`/`configfile` are not
  followed (a stub grub.cfg that only loads another one has no entries, and
  the error says which file it loads). Commands the interpreter does not know
  (`hwmatch`, `cmostest`, `keystatus`, `loadfont`, `fwsetup`, ...) fail,
  so an `if` on one takes its plain (else) path. `while`/`until` loops are
  parsed but never entered. `blscfg` (Fedora, RHEL) is refused with a
  pointer to `default_bls_entry`.
- The default: `set default=` the way GRUB reads it: a number (`grub_strtoul`,
  so "1>2" is entry 1, then entry 2 of that submenu), or a title or id, with
  `>` separating submenu levels (`>>` is a literal `>`). Where GRUB falls back
  to entry 0 for a number past the end of the menu, this refuses: the image
  would not boot what its operator asked for. A name that matches nothing is
  entry 0, as in GRUB (the usual case after a saved entry's kernel went away).
- The kernel command line: the `linux` arguments joined by spaces; one that
  contains a space is put in double quotes, as GRUB does, so the kernel sees
  one parameter.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from tenbox_vmm.bootcfg.common import (
    MAX_CONFIG_CHARS,
    MAX_ENTRIES,
    MAX_EXPANDED_CHARS,
    MAX_NESTING,
    MAX_RUN_DEPTH,
    MAX_STEPS,
    MAX_VALUE_CHARS,
    MAX_WORDS,
    BootConfigError,
    BootEntry,
    _show,
)
from tenbox_vmm.bootcfg.grub_script import (
    _IDENT,
    _LIT,
    _Block,
    _Cmd,
    _For,
    _Function,
    _If,
    _Node,
    _Parser,
    _tokens,
    _While,
    _Word,
)

# The GRUB the interpreter plays (module docstring): what grub-mkconfig's tests ask of it.
_GRUB_PRESET = {
    "grub_platform": "pc",
    "grub_cpu": "i386",
    "feature_200_final": "y",
    "feature_all_video_module": "y",
    "feature_chainloader_bpb": "y",
    "feature_default_font_path": "y",
    "feature_menuentry_id": "y",
    "feature_menuentry_options": "y",
    "feature_nativedisk_cmd": "y",
    "feature_ntldr": "y",
    "feature_platform_search_hint": "y",
    "feature_timeout_style": "y",
}

_ASSIGN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=")
_FIELD_SEP = re.compile(r"[ \t\r\n]+")


class _Item(NamedTuple):
    """One line of a menu: a menuentry, or a submenu whose body makes the next menu."""

    title: str
    id: str
    submenu: bool
    args: List[str]  # the positional parameters: title, then the extra arguments
    body: List[_Node]
    line: int


class _Boot:
    """What a menu entry loaded."""

    def __init__(self) -> None:
        self.kernel: Optional[str] = None
        self.options = ""
        self.initrds: List[str] = []
        self.root_uuid: Optional[str] = None


class _Scope:
    """Variables, the UUIDs `search` put in them, the positional parameters, and where entries and loads go."""

    def __init__(self, env: Dict[str, str], uuids: Dict[str, str], args: List[str],
                 menu: Optional[List[_Item]] = None, boot: Optional[_Boot] = None):
        self.env = env
        self.uuids = uuids
        self.args = args
        self.menu = menu
        self.boot = boot
        self.status = 0

    def child(self, args: List[str], menu: Optional[List[_Item]] = None, boot: Optional[_Boot] = None) -> "_Scope":
        return _Scope(dict(self.env), dict(self.uuids), args, menu, boot)


class _Return(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Stop(Exception):
    """`exit` in the script, or `boot` in an entry: nothing after it runs."""


# GRUB's option tables for the commands whose options matter: long name -> takes a value.
_MENU_OPTIONS = {"class": True, "users": True, "hotkey": True, "source": True, "id": True, "unrestricted": False}
_SEARCH_OPTIONS = {"file": False, "label": False, "fs-uuid": False, "set": True, "no-floppy": False,
                   "efidisk-only": False, "hint": True, "hint-ieee1275": True, "hint-bios": True,
                   "hint-baremetal": True, "hint-efi": True, "hint-arc": True}
_SEARCH_SHORT = {"f": "file", "l": "label", "u": "fs-uuid", "s": "set", "n": "no-floppy", "h": "hint"}
_OPTIONAL_VALUE = frozenset(("set",))


def _getopt(args: List[str], table: Dict[str, bool],
            short: Optional[Dict[str, str]] = None) -> Optional[Tuple[List[Tuple[str, Optional[str]]], List[str]]]:
    """GRUB's option parsing (lib/arg.c): (options, positional), or None where GRUB refuses the command.

    A long option without "=" takes the next argument as its value if that does not start with "-".
    """
    opts: List[Tuple[str, Optional[str]]] = []
    pos: List[str] = []
    k = 0
    while k < len(args):
        a = args[k]
        k += 1
        if a == "--":
            pos.extend(args[k:])
            break
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            if name not in table:
                return None
            if not eq and table[name] and k < len(args) and not args[k].startswith("-"):
                value, eq, k = args[k], "=", k + 1
            if eq and not table[name]:
                return None
            if table[name] and not eq and name not in _OPTIONAL_VALUE:
                return None
            opts.append((name, value if eq else None))
        elif a.startswith("-") and len(a) > 1 and short is not None:
            for j, ch in enumerate(a[1:]):
                name = short.get(ch, "")
                if name not in table:
                    return None
                value = None
                last = j == len(a) - 2
                if last and table[name] and k < len(args) and (
                        name not in _OPTIONAL_VALUE or len(args[k]) < 2 or not args[k].startswith("-")):
                    value, k = args[k], k + 1
                if last and table[name] and value is None and name not in _OPTIONAL_VALUE:
                    return None
                opts.append((name, value))
        else:
            pos.append(a)
    return opts, pos


def _grub_strtoul(text: str) -> Optional[int]:
    """GRUB's grub_strtoul(text, 0, 0): the leading number (0x hex, 0 octal, else decimal), None if there is none."""
    s = text.lstrip(" \t\n\r\f\v")
    base = 10
    if s.startswith("0x"):
        base, s = 16, s[2:]
    elif len(s) > 1 and s[0] == "0" and s[1] in "01234567":
        base = 8
    digits = "0123456789abcdef"[:base]
    k = 0
    while k < len(s) and k < 20 and s[k].lower() in digits:
        k += 1
    if k == 0 or k == 20:  # none, or far past the largest menu: GRUB's out-of-range error
        return None if k == 0 else 1 << 64
    return int(s[:k], base)


def _menuentry_eq(name: str, spec: str) -> bool:
    """GRUB's menuentry_eq: `spec` names `name` up to its first single ">" (">>" is a literal ">")."""
    i = j = 0
    while True:
        single = j < len(spec) and spec[j] == ">" and not spec.startswith(">>", j)
        if single:
            return i == len(name)
        if spec.startswith(">>", j):
            j += 1
        a = name[i] if i < len(name) else ""
        b = spec[j] if j < len(spec) else ""
        if a != b:
            return False
        if a == "":
            return True
        i, j = i + 1, j + 1


def _after_first_level(spec: str) -> Optional[str]:
    """What a submenu gets as its default: `spec` after its first single ">" (GRUB's grub_menu_execute_entry)."""
    j = 0
    while j < len(spec):
        if spec.startswith(">>", j):
            j += 2
        elif spec[j] == ">":
            return spec[j + 1:] or None
        else:
            j += 1
    return None


def _test(args: List[str], exists: Callable[[str], bool]) -> bool:
    """GRUB's `test`: ! -a -o ( ), string and number comparisons, -z -n; -e -f -s ask `exists`, -d is false."""
    pos = [0]

    def at(k: int) -> Optional[str]:
        return args[k] if k < len(args) else None

    def or_(depth: int) -> bool:
        value = and_(depth)
        while at(pos[0]) == "-o":
            pos[0] += 1
            value = and_(depth) or value
        return value

    def and_(depth: int) -> bool:
        value = not_(depth)
        while at(pos[0]) == "-a":
            pos[0] += 1
            value = not_(depth) and value
        return value

    def not_(depth: int) -> bool:
        negate = False
        while at(pos[0]) == "!":
            pos[0] += 1
            negate = not negate
        return primary(depth) != negate

    def primary(depth: int) -> bool:
        a = at(pos[0])
        if a is None:
            return False
        if a == "(":
            if depth >= MAX_NESTING:
                raise BootConfigError("grub.cfg: test expression nests deeper than %d" % MAX_NESTING)
            pos[0] += 1
            value = or_(depth + 1)
            if at(pos[0]) == ")":
                pos[0] += 1
            return value
        op, b = at(pos[0] + 1), at(pos[0] + 2)
        if op is not None and b is not None and op in _BINARY:
            pos[0] += 3
            return _BINARY[op](a, b)
        if a in ("-z", "-n", "-e", "-f", "-s", "-d") and op is not None:
            pos[0] += 2
            if a in ("-z", "-n"):
                return (op == "") == (a == "-z")
            return a != "-d" and exists(op)
        pos[0] += 1
        return a != ""

    return or_(0)


def _number(text: str) -> int:
    m = re.match(r"\s*(-?[0-9]{1,20})", text)
    return int(m.group(1)) if m else 0


_BINARY: Dict[str, Callable[[str, str], bool]] = {
    "=": lambda a, b: a == b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
    "-eq": lambda a, b: _number(a) == _number(b), "-ne": lambda a, b: _number(a) != _number(b),
    "-lt": lambda a, b: _number(a) < _number(b), "-le": lambda a, b: _number(a) <= _number(b),
    "-gt": lambda a, b: _number(a) > _number(b), "-ge": lambda a, b: _number(a) >= _number(b),
    "-nt": lambda a, b: False, "-ot": lambda a, b: False,
}


def _cmdline(args: List[str]) -> str:
    return " ".join('"%s"' % a if " " in a else a for a in args)


class _Interpreter:
    """Runs grub.cfg the way GRUB's normal mode does, within the bounds above."""

    def __init__(self, grubenv: Optional[Dict[str, str]]):
        self.grubenv = grubenv
        self.functions: Dict[str, _Function] = {}
        self.steps = 0
        self.depth = 0
        self.expanded = 0
        self.items = 0
        self.loads: List[str] = []  # files `source`/`configfile` would have read
        self.commands: Dict[str, Callable[[str, List[str], _Scope, int], int]] = {
            "set": self.set_, "unset": self.unset, "export": self.ok, "insmod": self.ok, "echo": self.ok,
            "save_env": self.ok, "terminal_input": self.ok, "terminal_output": self.ok, "serial": self.ok,
            "true": self.ok, "false": self.fail, "[": self.test, "test": self.test, "load_env": self.load_env,
            "search": self.search, "search.fs_uuid": self.search, "search.fs_label": self.search,
            "search.file": self.search,
            "linux": self.linux, "linuxefi": self.linux, "linux16": self.linux,
            "initrd": self.initrd, "initrdefi": self.initrd, "initrd16": self.initrd,
            "boot": self.boot, "blscfg": self.blscfg, "return": self.return_, "break": self.break_,
            "continue": self.continue_, "exit": self.exit,
            "source": self.load, ".": self.load, "configfile": self.load, "normal": self.load,
            "extract_entries_source": self.load, "extract_entries_configfile": self.load,
        }

    # -- running -------------------------------------------------------------------------------------------------

    def run(self, nodes: List[_Node], scope: _Scope) -> int:
        """Run a list of commands; its status is the last one's (0 for none)."""
        self.depth += 1
        if self.depth > MAX_RUN_DEPTH:
            line = nodes[0].line if nodes else 0
            raise BootConfigError("grub.cfg line %d: blocks and function calls nest deeper than %d when run"
                                  % (line, MAX_RUN_DEPTH))
        try:
            status = 0
            for node in nodes:
                status = scope.status = self.node(node, scope)
            return status
        finally:
            self.depth -= 1

    def node(self, node: _Node, scope: _Scope) -> int:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise BootConfigError("grub.cfg line %d: runs more than %d commands" % (node.line, MAX_STEPS))
        if isinstance(node, _Cmd):
            return self.command(node, scope)
        if isinstance(node, _If):
            for cond, body in node.clauses:
                if self.run(cond, scope) == 0:
                    return self.run(body, scope)
            return self.run(node.otherwise, scope)
        if isinstance(node, _For):
            values = self.expand_all(node.words, scope)
            for value in values:
                scope.env[node.var] = value
                try:
                    self.run(node.body, scope)
                except _Break:
                    break
                except _Continue:
                    continue
            return 0
        if isinstance(node, _While):
            return 0  # never entered (module docstring)
        if isinstance(node, _Function):
            self.functions[node.name] = node
            return 0
        return self.menu_item(node, scope)

    def command(self, node: _Cmd, scope: _Scope) -> int:
        if len(node.words) == 1:
            first = node.words[0].parts[0]
            m = _ASSIGN.match(first[1]) if first[0] == _LIT and not first[2] else None
            if m:
                value = self.expand_string(node.words[0], scope, node.line)
                scope.env[m.group(1)] = value[m.end():]
                return 0
        argv = self.expand_all(node.words, scope)
        if not argv:
            return 0
        negate = argv[0] == "!"
        if negate:
            argv = argv[1:]
            if not argv:
                return 1
        name, args = argv[0], argv[1:]
        if name in self.functions:
            status = self.call(self.functions[name], args, scope, node.line)
        else:
            handler = self.commands.get(name, self.fail)  # what is not modelled fails (module docstring)
            status = handler(name, args, scope, node.line)
        return int(status == 0) if negate else status

    def call(self, fn: _Function, args: List[str], scope: _Scope, line: int) -> int:
        """A function shares its caller's variables; only the positional parameters are its own."""
        saved = scope.args
        scope.args = args
        try:
            return self.run(fn.body, scope)
        except _Return as r:
            return r.status
        finally:
            scope.args = saved

    def menu_item(self, node: _Block, scope: _Scope) -> int:
        args = self.expand_all(node.words, scope)
        parsed = _getopt(args, _MENU_OPTIONS)
        if parsed is None or not parsed[1] or scope.menu is None:
            return 1  # GRUB refuses the command: no entry
        opts, pos = parsed
        ids = [v for k, v in opts if k == "id" and v is not None]
        self.items += 1
        if self.items > MAX_ENTRIES:
            raise BootConfigError("grub.cfg line %d: more than %d menu entries" % (node.line, MAX_ENTRIES))
        scope.menu.append(_Item(pos[0], ids[-1] if ids else pos[0], node.submenu, pos, node.body, node.line))
        return 0

    # -- words ---------------------------------------------------------------------------------------------------

    def lookup(self, name: str, scope: _Scope) -> str:
        if name.isdigit():
            k = int(name)
            return scope.args[k - 1] if 0 < k <= len(scope.args) else ""
        if name == "#":
            return str(len(scope.args))
        if name in ("@", "*"):
            return " ".join(scope.args)
        if name == "?":
            return str(scope.status)
        return scope.env.get(name, "")

    def expand_all(self, words: Tuple[_Word, ...], scope: _Scope) -> List[str]:
        out: List[str] = []
        for w in words:
            out.extend(self.expand(w, scope))
        if len(out) > MAX_WORDS:
            raise BootConfigError("grub.cfg line %d: more than %d words in one command" % (words[0].line, MAX_WORDS))
        return out

    def expand(self, word: _Word, scope: _Scope) -> List[str]:
        """A word's fields: unquoted variables split at blanks, an empty unquoted one is no field."""
        fields: List[str] = []
        cur: Optional[List[str]] = None  # the field being built; None: no field started
        size = 0
        for kind, text, quoted in word.parts:
            value = text if kind == _LIT else self.lookup(text, scope)
            size += len(value)
            if size > MAX_VALUE_CHARS:
                raise BootConfigError("grub.cfg line %d: a word longer than %d characters"
                                      % (word.line, MAX_VALUE_CHARS))
            if kind == _LIT or quoted:
                cur = [] if cur is None else cur
                cur.append(value)
                continue
            pieces = _FIELD_SEP.split(value)
            if len(pieces) == 1:
                if value:
                    cur = [] if cur is None else cur
                    cur.append(value)
                continue
            if pieces[0]:
                cur = [] if cur is None else cur
                cur.append(pieces[0])
            if cur is not None:
                fields.append("".join(cur))
            fields.extend(pieces[1:-1])
            cur = [pieces[-1]] if pieces[-1] else None
        if cur is not None:
            fields.append("".join(cur))
        self.spend(size, word.line)
        return fields

    def spend(self, chars: int, line: int) -> None:
        self.expanded += chars
        if self.expanded > MAX_EXPANDED_CHARS:
            raise BootConfigError("grub.cfg line %d: expands more than %d characters in all"
                                  % (line, MAX_EXPANDED_CHARS))

    def expand_string(self, word: _Word, scope: _Scope, line: int) -> str:
        """A word without splitting, as the value of an assignment."""
        value = "".join(text if kind == _LIT else self.lookup(text, scope) for kind, text, _ in word.parts)
        if len(value) > MAX_VALUE_CHARS:
            raise BootConfigError("grub.cfg line %d: a value longer than %d characters" % (line, MAX_VALUE_CHARS))
        self.spend(len(value), line)
        return value

    # -- commands: (name, args, scope, line) -> status -----------------------------------------------------------

    def ok(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        return 0

    def fail(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        return 1

    def set_(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        if args:
            var, eq, value = args[0].partition("=")
            if eq and _IDENT.match(var):
                scope.env[var] = value
                if var in scope.uuids:
                    del scope.uuids[var]  # `set root=...` after a search: no longer that UUID
        return 0

    def unset(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        for var in args:
            scope.env.pop(var, None)
            scope.uuids.pop(var, None)
        return 0

    def test(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        if name == "[":
            if not args or args[-1] != "]":
                return 1
            args = args[:-1]
        return 0 if _test(args, self.exists) else 1

    def exists(self, path: str) -> bool:
        """The one file there is: grubenv, when the caller gave its variables."""
        return self.grubenv is not None and path.rsplit("/", 1)[-1] == "grubenv"

    def load_env(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        if self.grubenv is None:
            return 1
        for var, value in self.grubenv.items():
            if _IDENT.match(var) and len(value) <= MAX_VALUE_CHARS:
                scope.env[var] = value
        return 0

    def search(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        if name != "search":  # search.fs_uuid KEY [VAR]
            if not args:
                return 1
            mode = {"search.fs_uuid": "fs-uuid", "search.fs_label": "label", "search.file": "file"}[name]
            key, var = args[0], (args[1] if len(args) > 1 else "root")
        else:
            parsed = _getopt(args, _SEARCH_OPTIONS, _SEARCH_SHORT)
            if parsed is None or not parsed[1]:
                return 1
            opts, pos = parsed
            names = [k for k, _ in opts]
            mode = "fs-uuid" if "fs-uuid" in names else "label" if "label" in names else "file"
            sets = [v or "root" for k, v in opts if k == "set"]
            if not sets:
                return 0  # only prints what it finds
            key, var = pos[0], sets[-1]
        if mode == "fs-uuid":
            scope.uuids[var] = key
        else:
            scope.uuids.pop(var, None)
        return 0

    def linux(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        if scope.boot is None or not args:
            return 1
        scope.boot.kernel = args[0]
        scope.boot.options = _cmdline(args[1:])
        scope.boot.initrds = []
        scope.boot.root_uuid = scope.uuids.get("root")
        return 0

    def initrd(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        if scope.boot is None or scope.boot.kernel is None or not args:
            return 1  # GRUB: "you need to load the kernel first"
        scope.boot.initrds = list(args)
        return 0

    def boot(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        if scope.boot is None:
            return 1
        raise _Stop()

    def blscfg(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        raise BootConfigError("grub.cfg line %d: the menu comes from Boot Loader Specification entries (blscfg): "
                              "read /loader/entries/*.conf with default_bls_entry" % line)

    def load(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        if args:
            self.loads.append("%s %s" % (name, args[-1]))
        return 1

    def return_(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        raise _Return(_number(args[0]) if args else scope.status)

    def break_(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        raise _Break()

    def continue_(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        raise _Continue()

    def exit(self, name: str, args: List[str], scope: _Scope, line: int) -> int:
        raise _Stop()

    # -- the menu ------------------------------------------------------------------------------------------------

    def run_guarded(self, nodes: List[_Node], scope: _Scope) -> None:
        """Run a script, an entry or a submenu body: `exit`/`boot` end it; a stray return/break ends it too."""
        try:
            self.run(nodes, scope)
        except (_Stop, _Return, _Break, _Continue):
            pass

    def choose(self, menu: List[_Item], spec: Optional[str], where: str) -> _Item:
        """The entry `spec` names in `menu` (GRUB's get_entry_number)."""
        if spec is None:
            return menu[0]
        index = _grub_strtoul(spec)
        if index is not None:
            if index >= len(menu):
                raise BootConfigError("grub.cfg: default entry %s is past the end of %s (%d entries)"
                                      % (_show(spec), where, len(menu)))
            return menu[index]
        for item in menu:
            if _menuentry_eq(item.title, spec) or _menuentry_eq(item.id, spec):
                return item
        return menu[0]

    def default_entry(self, script: List[_Node]) -> BootEntry:
        menu: List[_Item] = []
        scope = _Scope(dict(_GRUB_PRESET), {}, [], menu)
        self.run_guarded(script, scope)
        where = "the menu"
        for _ in range(MAX_NESTING + 1):
            if not menu:
                loads = (" (it loads another config: %s)" % _show(self.loads[-1])) if self.loads else ""
                raise BootConfigError("grub.cfg: no menu entries in %s%s" % (where, loads))
            spec = scope.env.get("default")
            item = self.choose(menu, spec, where)
            if not item.submenu:
                return self.run_entry(item, scope)
            menu = []
            scope = scope.child(item.args, menu)
            rest = _after_first_level(spec) if spec is not None else None
            if rest is None:
                scope.env.pop("default", None)
            else:
                scope.env["default"] = rest
            self.run_guarded(item.body, scope)
            where = "submenu %s" % _show(item.title)
        raise BootConfigError("grub.cfg: submenus nest deeper than %d" % MAX_NESTING)

    def run_entry(self, item: _Item, scope: _Scope) -> BootEntry:
        boot = _Boot()
        self.run_guarded(item.body, scope.child(item.args, None, boot))
        if boot.kernel is None:
            raise BootConfigError("grub.cfg line %d: menu entry %s loads no kernel (no linux command)"
                                  % (item.line, _show(item.title)))
        return BootEntry(item.title, boot.kernel, boot.initrds, boot.options, boot.root_uuid)


def default_grub_entry(text: str, grubenv: Optional[Dict[str, str]] = None) -> BootEntry:
    """The entry GRUB boots by default with this grub.cfg (see the module docstring for what is understood).

    `grubenv`: the variables of the image's /boot/grub/grubenv, if the caller read it (saved_entry, next_entry);
    without it `set default="${saved_entry}"` means entry 0, as on a first boot.
    """
    if len(text) > MAX_CONFIG_CHARS:
        raise BootConfigError("grub.cfg is larger than %d characters (%d)" % (MAX_CONFIG_CHARS, len(text)))
    if grubenv is not None and sum(len(k) + len(v) for k, v in grubenv.items()) > MAX_CONFIG_CHARS:
        raise BootConfigError("grubenv is larger than %d characters (a real one is 1024 bytes)" % MAX_CONFIG_CHARS)
    script = _Parser(_tokens(text)).script()
    return _Interpreter(grubenv).default_entry(script)
