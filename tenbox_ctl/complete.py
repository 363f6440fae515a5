"""Shell completion: click's bash and zsh scripts, and VM and image names asked of tenboxd while completing (CLI).

The package installs the scripts click generates (`python3 -m
tenbox_ctl.complete bash|zsh tenbox|tenboxctl`, run by debian/rules) in
bash-completion's and zsh's folders. At a TAB they run the CLI with
`_TENBOX_COMPLETE` (or `_TENBOXCTL_COMPLETE`) set; click answers with the
commands and options, and the callbacks here add the names tenboxd knows.
A completion never waits long and never prints an error: without a daemon
(or without the right to its socket) names simply do not complete.

click 8 is needed (its `shell_completion`); under click 7 (Ubuntu 20.04,
Debian 11) the scripts complete nothing and the CLI answers them with
nothing rather than running a command.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Callable, Dict, List, Optional

import click

from tenbox_supervisor.protocol import Method

COMPLETE_TIMEOUT_SEC = 1.0  # a TAB must not hang on a busy or absent daemon
NAMES_MAX = 1000  # names offered at most
SHELLS = ("bash", "zsh")
PROGS = ("tenbox", "tenboxctl")
CLICK_8 = importlib.util.find_spec("click.shell_completion") is not None  # new in click 8.0


def complete_var(prog: str) -> str:
    """The variable click's scripts set: _TENBOX_COMPLETE, _TENBOXCTL_COMPLETE."""
    return "_%s_COMPLETE" % prog.replace("-", "_").upper()


def _socket(ctx: click.Context) -> Optional[str]:
    return ctx.find_root().params.get("socket_path")


def _names(ctx: click.Context, method: Method, key: str, incomplete: str) -> List[str]:
    from tenbox_ctl.client import Client, CliError

    try:
        items = Client(_socket(ctx), COMPLETE_TIMEOUT_SEC).request(method)[key]
    except (CliError, OSError, ValueError, KeyError, TypeError):
        return []
    names = sorted({str(i.get("name") or "") for i in items if isinstance(i, dict)} - {""})
    return [n for n in names if n.startswith(incomplete)][:NAMES_MAX]


def vm_names(ctx: click.Context, param: Any, incomplete: str) -> List[str]:
    return _names(ctx, Method.VM_LIST, "vms", incomplete)


def image_names(ctx: click.Context, param: Any, incomplete: str) -> List[str]:
    return _names(ctx, Method.IMAGE_LIST, "images", incomplete)


def completes(fn: Callable[[click.Context, Any, str], List[str]]) -> Dict[str, Any]:
    """Keyword arguments for click.argument/click.option that complete with `fn` (nothing under click 7)."""
    return {"shell_complete": fn} if CLICK_8 else {}


VM = completes(vm_names)
IMAGE = completes(image_names)


def answering_old_click(prog: str, environ: Dict[str, str]) -> bool:
    """Whether this is a completion request that this click cannot answer (click 7 would run the CLI instead)."""
    return not CLICK_8 and bool(environ.get(complete_var(prog)))


def script(cli: click.BaseCommand, shell: str, prog: str) -> str:
    """The completion script click generates for `prog` in `shell`."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    if cls is None:
        raise click.UsageError("no completion for %s" % shell)
    return cls(cli, {}, prog, complete_var(prog)).source()


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in SHELLS or args[1] not in PROGS:
        sys.stderr.write("usage: python3 -m tenbox_ctl.complete bash|zsh tenbox|tenboxctl\n")
        return 2
    if not CLICK_8:
        sys.stderr.write("tenbox: shell completion needs click 8 or later (python3-click %s here)\n"
                         % getattr(click, "__version__", "7"))
        return 1
    from tenbox_ctl.__main__ import cli

    sys.stdout.write(script(cli, args[0], args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
