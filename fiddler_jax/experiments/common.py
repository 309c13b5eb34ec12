"""Shared pieces of the commands: where the configs are (``fiddler_jax/conf``, shipped inside the package so a
wheel install works), turning our errors into one clear line, checking output paths before any work, where
outputs go when no ``out=`` says (:func:`run_dir`), and ``fiddler-jax <command> --help`` (:func:`render_help`:
every option with its current value and what it does, from the YAML comments)."""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
import tempfile
import textwrap
import time

from omegaconf import OmegaConf

from fiddler_jax.errors import FiddlerError, InvalidInputError
from fiddler_jax.experiments import CONF_DIR  # noqa: F401  (the commands import it from here)

# Hydra's job logging puts the root logger at INFO; JAX's backend probing is noise at that level.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

OUTPUTS = "fiddler-jax-outputs"  # where a command's outputs go when no out= names a place (in the working folder)
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def interrupted() -> SystemExit:
    """Ctrl-C: one line on stderr, and the exit status a shell gives SIGINT."""
    print("interrupted", file=sys.stderr, flush=True)
    return SystemExit(INTERRUPTED_STATUS)


def clear_errors(task):
    """Run a command's task; a FiddlerError prints ``error: <message>`` and exits with status 2 (no traceback), as
    do a required option left unset and a file the system refuses (permission denied, read-only, no such
    folder: the path and the reason). Ctrl-C prints ``interrupted`` and exits with status 130. After the task --
    each job of a multirun, which Hydra's basic launcher runs in this process -- the compiled programs nothing
    references any more are released (:func:`~fiddler_jax.runtime.compiled_programs.release_compiled_programs`:
    jobs that share a process would otherwise reach the kernel's cap on memory mappings)."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        from omegaconf.errors import MissingMandatoryValue

        try:
            return task(*args, **kwargs)
        except FiddlerError as e:
            message = str(e)
        except MissingMandatoryValue as e:
            key = getattr(e, "full_key", None) or "a required option"
            message = f"{key} is required: pass {key}=<value>"
        except OSError as e:
            if e.filename is None:  # not about a file the user named: a bug, keep the traceback
                raise
            message = f"{e.filename}: {e.strerror or e}"
        except KeyboardInterrupt:
            raise interrupted() from None
        finally:
            from fiddler_jax.runtime.compiled_programs import release_compiled_programs

            release_compiled_programs()
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None

    return wrapper


def check_output_path(path, what: str, *, folder: bool = False) -> str:
    """Refuse, before any work, an output path that cannot be written, naming the path and why; returns it
    (user-expanded, absolute). ``folder``: the output is a folder (made if missing), else a file (its missing
    parent folders are made when it is written). A write probe in the nearest existing folder catches read-only
    file systems and permissions that ``os.access`` misses."""
    if path is None or str(path).strip() == "":
        raise InvalidInputError(f"{what}: empty path")
    full = os.path.abspath(os.path.expanduser(str(path)))
    if folder and os.path.exists(full) and not os.path.isdir(full):
        raise InvalidInputError(f"cannot write {what} to {full}: it exists and is not a folder")
    if not folder and os.path.isdir(full):
        raise InvalidInputError(f"cannot write {what} to {full}: it is a folder; give a file path")
    probe = full if folder else os.path.dirname(full)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InvalidInputError(f"cannot write {what} to {full}: {probe} is a file, not a folder")
    if not folder and os.path.exists(full) and not os.access(full, os.W_OK):
        raise InvalidInputError(f"cannot write {what} to {full}: the file exists and is not writable "
                                "(permission denied)")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".fiddler-jax-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InvalidInputError(f"cannot write {what} to {full}: folder {probe} is not writable "
                                f"({e.strerror or e})") from None
    return full


def write_output(path: str, what: str, write, *, folder: bool = False) -> None:
    """``write(path)`` after making the output's folder (``folder``: ``path`` itself, else its parent); an OSError
    becomes one clear line naming the path and the reason."""
    try:
        os.makedirs(path if folder else os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(path)
    except OSError as e:
        raise InvalidInputError(f"cannot write {what} to {path}: {e.strerror or e}") from None


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def decode_escapes(text: str) -> str:
    r"""``\n``, ``\t``, ``\r`` and ``\\`` in a command-line text (a shell passes them as two characters) as the
    newline, tab, carriage return and backslash they stand for; any other backslash stays as it is."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), text, flags=re.S)


# -- where outputs go ----------------------------------------------------------------------------------------

_STAMP: list[str] = []


def run_dir(command: str, out=None) -> str:
    """Hydra's run folder of a command (the ``fiddler_run_dir`` resolver in ``conf/<command>.yaml``): ``.`` when
    ``out`` names the output (nothing else is written, so no folder is made), else
    ``fiddler-jax-outputs/<command>/<date>_<time>`` in the working folder (the same for the whole process)."""
    if out not in (None, ""):
        return "."
    if not _STAMP:
        _STAMP.append(time.strftime("%Y-%m-%d_%H-%M-%S"))
    return os.path.join(OUTPUTS, command, _STAMP[0])


# -- --help ----------------------------------------------------------------------------------------------------

_KEY = re.compile(r"([A-Za-z_][\w]*)\s*:(.*)$")
WIDTH = 118


def _split_comment(rest: str) -> tuple[str, str]:
    """(value, comment) of what follows ``key:`` on a YAML line (a ``#`` inside quotes is not a comment)."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1:].strip()
    return rest.strip(), ""


def yaml_comments(path: str) -> tuple[list[str], list[tuple[str, str, str]], dict[str, str]]:
    """(header comment lines, defaults entries (group, option, comment), dotted key -> comment) of a config file.
    A comment-only line indented past the key above it continues that key's comment; ``hydra:`` is skipped."""
    header: list[str] = []
    defaults: list[tuple[str, str, str]] = []
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last: tuple[str, int] | None = None
    in_header = True
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for line in lines:
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip(" "))
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if in_header:
                if not text.startswith("@package"):  # Hydra's directive, not a description
                    header.append(text)
            elif last is not None and indent > last[1] and last[0] in comments:
                comments[last[0]] = f"{comments[last[0]]} {text}".strip()
            continue
        in_header = False
        if stripped.startswith("- "):
            if stack and stack[0][1] == "defaults":
                value, comment = _split_comment(stripped[2:])
                m = _KEY.match(value)
                if m:
                    group = m.group(1)
                    defaults.append((group, m.group(2).strip(), comment))
            continue
        m = _KEY.match(stripped)
        if not m:
            continue
        key, rest = m.groups()
        _, comment = _split_comment(rest)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if dotted.split(".")[0] in ("hydra", "defaults"):
            last = None
            continue
        comments[dotted] = comment
        last = (dotted, indent)
    return header, defaults, comments


def _group_options(group: str) -> list[tuple[str, str]]:
    """(option, its description: the first sentence of the option file's header comment) of a config group."""
    folder = os.path.join(CONF_DIR, group)
    options = []
    for name in sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")):
        header, _, _ = yaml_comments(os.path.join(folder, f"{name}.yaml"))
        text = " ".join(header)
        options.append((name, re.split(r"(?<=\.)\s+(?=[A-Z(])", text, maxsplit=1)[0]))
    return options


def _leaves(node, prefix: str = ""):
    """(dotted key, value as written) of every leaf of a config; a dict is entered, a list is one value."""
    if isinstance(node, dict):
        if not node and prefix:
            yield prefix, {}
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, node


def _show(value) -> str:
    """A value as it would be typed after ``key=``."""
    if value is None:
        return "null"
    if value == "???":
        return "??? (required)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, str) and not value.startswith("${"):  # an interpolation shows as written
        if value == "" or value.strip() != value or any(c in value for c in " ,[]{}#"):
            return repr(value)
    return str(value)


def option_help(name: str, root) -> list[tuple[str, str, str]]:
    """(dotted key, current value, what it does) of every option of command config ``name``: the comment on the
    key in ``conf/<name>.yaml``, else in the chosen option's file of its group, else the group schema's help
    (:data:`fiddler_jax.experiments.schemas.OPTION_HELP`), else the nearest parent key's."""
    from fiddler_jax.experiments.schemas import GEOMETRY_HELP, OPTION_HELP

    _, defaults, own = yaml_comments(os.path.join(CONF_DIR, f"{name}.yaml"))
    groups = {g for g, _, _ in defaults if "/" not in g and g != "override"}
    choices = dict(root.hydra.runtime.choices) if "hydra" in root else {}
    group_comments: dict[str, dict[str, str]] = {}
    for group in groups:
        choice = choices.get(group) or next((o for g, o, _ in defaults if g == group), None)
        path = os.path.join(CONF_DIR, group, f"{choice}.yaml")
        group_comments[group] = yaml_comments(path)[2] if choice and os.path.exists(path) else {}
    job = OmegaConf.to_container(root, resolve=False)
    job.pop("hydra", None)
    rows = []
    for key, value in _leaves(job):
        parts = key.split(".")
        text = ""
        for depth in range(len(parts), 0, -1):  # the key itself, then its parents
            k, sub = ".".join(parts[:depth]), ".".join(parts[1:depth])
            text = own.get(k) or _merge(OPTION_HELP.get(k, ""), group_comments.get(parts[0], {}).get(sub, "")
                                        if sub else "")
            if not text and depth > 1 and parts[depth - 2] == "geometry":
                text = GEOMETRY_HELP.get(parts[depth - 1], "")
            if text:
                break
        rows.append((key, _show(value), text))
    return rows


def _merge(general: str, specific: str) -> str:
    """A group key's help: what it is (schemas.OPTION_HELP) and what the chosen option's file says of it, once."""
    words = lambda s: set(re.findall(r"\w+", s.lower()))  # noqa: E731
    if not general or words(general) <= words(specific):
        return specific
    if not specific or words(specific) <= words(general):
        return general
    return f"{general}; {specific}"


def render_help(name: str, *optional_groups: str, _root_=None) -> str:
    """``fiddler-jax <name> --help`` (Hydra's ``hydra.help.template``, through the ``fiddler_help`` resolver):
    what the command does, its config groups with each option's description, and every option with its current
    value and what it does; then the few Hydra flags worth knowing. ``optional_groups``: groups added with
    ``+group=option`` (bench's ``experiment``)."""
    from fiddler_jax.experiments.schemas import GROUP_HELP

    header, defaults, _ = yaml_comments(os.path.join(CONF_DIR, f"{name}.yaml"))
    choices = dict(_root_.hydra.runtime.choices) if _root_ is not None and "hydra" in _root_ else {}
    command = name.replace("_", "-")
    out = [f"usage: fiddler-jax {command} [group=option ...] [key=value ...]", ""]
    out += wrap(" ".join(header)) or [f"fiddler-jax {command}"]
    groups = [(g, o) for g, o, _ in defaults if "/" not in g and g != "override"]
    if groups or optional_groups:
        out += ["", "Config groups (group=option; * = the one in use):"]
        for group, default in groups + [(g, None) for g in optional_groups]:
            chosen = choices.get(group) or default
            plus = "+" if default is None else ""
            out += wrap(f"  {plus}{group}: {GROUP_HELP.get(group, '')}".rstrip(), subsequent="      ")
            options = _group_options(group)
            width = max(len(o) for o, _ in options) + 2
            for option, desc in options:
                mark = "*" if option == chosen else " "
                out += wrap(desc, f"    {mark} {option:<{width}}", " " * (6 + width)) or [f"    {mark} {option}"]
    out += ["", "Options (key=value; the value in use shown):"]
    rows = option_help(name, _root_) if _root_ is not None else []
    for key, value, text in rows:
        left = f"  {key}={value}"
        if len(left) > 40:
            out.append(left)
            left = ""
        out += wrap(text or "", f"{left:<42}", " " * 42) or [left]
    out += [""] + wrap("Values with spaces or brackets: quote them twice, e.g. 'key=\"a [b]\"'. Flags: --cfg job "
                       "(print the resolved config and exit), -m (a sweep: key=a,b,c runs one job per value), "
                       "--hydra-help (Hydra's own flags).")
    return "\n".join(out).replace("$", "$$")  # Hydra fills the help in with string.Template


def wrap(text: str, initial: str = "", subsequent: str = "") -> list[str]:
    """``text`` in lines of at most :data:`WIDTH` (paths and keys are not broken at their hyphens)."""
    return textwrap.wrap(text, WIDTH, initial_indent=initial, subsequent_indent=subsequent, break_on_hyphens=False,
                         break_long_words=False)


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("fiddler_run_dir"):
        OmegaConf.register_new_resolver("fiddler_run_dir", run_dir)
    if not OmegaConf.has_resolver("fiddler_help"):
        OmegaConf.register_new_resolver("fiddler_help", render_help)
    if not OmegaConf.has_resolver("fiddler_host_mem_gb"):
        from fiddler_jax.experiments.cluster import host_memory_gb

        OmegaConf.register_new_resolver("fiddler_host_mem_gb", host_memory_gb)


_register_resolvers()
