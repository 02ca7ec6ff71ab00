"""Docs that run: every fenced block of README.md and docs/*.md (a sorted glob, so a new page
is picked up by itself) is run or checked as written, one test per block, named
``FILE:N-LANG`` (the N-th fenced block of FILE).

Each block runs in a fresh temporary directory that holds what the repository's commands
name by relative path: a COPY of ``examples/`` (its job files write ``../../runs/...``,
which then lands in the temporary directory, never in the checkout) and ``.venv``, a
symlink to the environment running the tests (``sys.prefix``), whose ``bin`` is also put
first on PATH, as an activated environment is.

- ``bash`` blocks run with ``bash -euo pipefail`` (at most BASH_SECONDS), without any Ray
  address or token variable and with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and must exit
  0; a line of a ``&&`` chain fails the block when any command of the chain fails.
  Install lines never touch the network or reinstall anything; each command of a ``&&``
  chain that installs is verified here, then replaced by ``true``, and the rest of the chain
  runs:

  * ``python3 -m venv .venv``: ``.venv`` is this environment, which has ``pip``, on a
    Python that ``requires-python`` of pyproject.toml allows;
  * ``pip install [-e] .`` / ``'.[EXTRA,...]'`` / ``'shardstep[EXTRA,...]'`` (any ``pip``,
    ``.venv/bin/pip`` or ``python -m pip``): every EXTRA is a key of pyproject.toml's
    ``[project.optional-dependencies]``; every requirement of ``[project] dependencies`` and
    of those extras is installed at a version its specifier allows, with what its own extras
    (``ray[default]``, ``ray[data]``) require; the top-level modules of each import (in a
    subprocess); and the ``shardstep`` distribution is this checkout (its version, its code);
  * ``pip install NAME==VERSION``: a pin of torch must be exactly the ``parity`` extra's pin,
    a pin of any other package must satisfy every specifier pyproject.toml gives for it; and
    that version is the one installed;
  * any other install line fails the block: the runner cannot verify it.

  A block that needs torch (it installs an extra that requires torch) is marked
  ``torch_live``: without torch it is reported as skipped, except under
  ``SHARDSTEP_REQUIRE_TORCH=1`` (CI's pass with the parity extra), where it must run.
- ``toml`` blocks are decided by TOML_BLOCKS, keyed by (file, a line of the block): a complete
  job is written as a job file where its relative paths point, validated by
  ``shardstep.service.jobspec.load_job`` and, where cheap, run with ``--backend inline``; a
  fragment is compared with the repository's job file it is part of (every key it gives must
  be that file's) or merged into the job it completes (no key may contradict it), then
  validated, and run where TOML_BLOCKS says so.
- ``python`` blocks run with this interpreter in their directory; PYTHON_CONTEXT names the
  blocks a block continues (run before it, in the same process or in their own) and the
  files it reads.
- blocks without a language (diagrams, output, command synopses) are not run: every
  ``shardstep`` command they show must name a real subcommand and only flags (and choices)
  that its ``shardstep SUBCOMMAND --help`` lists, and no other command line may hide in them.
- A block that cannot run here (Docker, Kubernetes, AWS, a remote cluster) carries
  ``<!-- docs-test: not run: REASON -->`` on the line right before its fence. Its test
  requires the reason and checks what needs no cluster: the syntax (``bash -n``,
  ``compile``, ``tomllib``), its install lines as above, the repository files it names, and
  its ``shardstep`` commands against ``--help``.

The one block that needs a Ray head (docs/cluster.md's ``submit`` / ``jobs`` walk-through)
runs against a head of its own on loopback, started and stopped by
``tests.ray_heads.running_head``; its placeholders (``HEAD:8265``, the submission id, the
shared path) are filled in by BASH_GIVEN.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", *sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md"))]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PYPROJECT["optional-dependencies"]
ENVIRONMENT = Path(sys.prefix)
SHARDSTEP = ENVIRONMENT / "bin" / "shardstep"
BASH_SECONDS = 300
PYTHON_SECONDS = 300
CLI_SECONDS = 120
RAY_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

OPENING = re.compile(r"^\s*(`{3,}|~{3,})\s*([^\s`]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:(.*?)-->\s*$")
NOT_RUN = re.compile(r"^\s*not run:\s*(.*?)\s*$")
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "toml": "toml", "python": "python", "": "text"}
# a line of a block without a language that starts with one of these is a command, not a synopsis
COMMAND_WORDS = ("python", "python3", "pip", "pip3", "ray", "kubectl", "docker", "helm", "aws", "bash", "sh",
                 "cd", "export", "curl", "tensorboard", "mc", "kind", "uv", "conda", "git")


# ---------------------------------------------------------------------------------------
# the blocks


@dataclass(frozen=True)
class Block:
    path: str         # relative to the repository root
    index: int        # 1-based, among the fenced blocks of the file
    language: str     # as written after the fence ("" for none)
    text: str
    line: int         # the opening fence's line, 1-based
    marker: str | None = None  # what the docs-test comment right before the fence says

    @property
    def id(self) -> str:
        return f"{self.path}:{self.index}-{self.language or 'text'}"

    @property
    def kind(self) -> str:
        return LANGUAGES.get(self.language, f"unknown language {self.language!r}")

    def has_line(self, prefix: str) -> bool:
        return any(line.strip().startswith(prefix) for line in self.text.splitlines())


def parse_blocks(relative: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a markdown file, and what is wrong with its fences and markers."""
    lines = (ROOT / relative).read_text().splitlines()
    blocks, problems = [], []
    i = 0
    while i < len(lines):
        opening = OPENING.match(lines[i])
        if not opening:
            if MARKER.match(lines[i]) and not (i + 1 < len(lines) and OPENING.match(lines[i + 1])):
                problems.append(f"{relative}:{i + 1}: a docs-test comment must be the line right before a fence")
            i += 1
            continue
        fence = opening.group(1)
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        if end is None:
            problems.append(f"{relative}:{i + 1}: the fence is never closed")
            break
        marker = MARKER.match(lines[i - 1]) if i else None
        blocks.append(Block(relative, len(blocks) + 1, opening.group(2), "\n".join(lines[i + 1:end]) + "\n", i + 1,
                            marker.group(1).strip() if marker else None))
        i = end + 1
    return blocks, problems


def _all_blocks() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for relative in DOC_FILES:
        found, wrong = parse_blocks(relative)
        blocks += found
        problems += wrong
    return blocks, problems


BLOCKS, FENCE_PROBLEMS = _all_blocks()


def find_block(path: str, line: str, kind: str | None = None) -> Block:
    """The one block of ``path`` (of that kind) with a line that starts with ``line``."""
    found = [b for b in BLOCKS if b.path == path and b.has_line(line) and (kind is None or b.kind == kind)]
    assert len(found) == 1, f"{path}: {len(found)} blocks have a line starting with {line!r}; the tables need one"
    return found[0]


# ---------------------------------------------------------------------------------------
# the tables: what each toml block is, what a python or bash block continues or is given


@dataclass(frozen=True)
class Job:
    """A complete job: written as ``name`` in ``where`` (its relative paths point from there),
    validated with load_job, and run inline unless ``why`` says why not."""

    where: str = "."
    name: str = "job.toml"
    given: tuple[str, ...] = ()
    why: str = ""  # non-empty: validated only, for this reason


@dataclass(frozen=True)
class Part:
    """A part of the repository's job file ``of``: every key it gives is that file's."""

    of: str


@dataclass(frozen=True)
class Addition:
    """Tables that complete the repository's job file ``to``: merged into it (contradicting
    none of its keys), written beside it as ``name``, validated and run inline."""

    to: str
    name: str = "job.toml"
    given: tuple[str, ...] = ()


TOML_BLOCKS: dict[tuple[str, str], Job | Part | Addition] = {
    # "its task part": the README shows the part of the digits-csv job that describes its data and model
    ("README.md", 'run_dir = "../../runs/digits-csv"'): Part(of="examples/jobs/digits-csv.toml"),
    # a job file at the repository root ("digits-tuned.toml", as the text names it) fine-tuning
    # the run of examples/jobs/digits.toml
    ("README.md", 'run_dir = "runs/digits-tuned"'): Job(name="digits-tuned.toml", given=("digits run",)),
    # a job of its own whose paths point from examples/jobs/ to examples/data/
    ("docs/data.md", 'run_dir = "../../runs/sensors-parquet"'): Job(where="examples/jobs"),
    ("docs/jobs.md", 'run_dir = "runs/digits-full"'): Job(
        why="its [init] source (runs/digits-base at step 600, with the same model) and its address = \"auto\" "
            "(a running Ray cluster) exist only where this reference job would run"),
    ("docs/jobs.md", 'from = "runs/digits"'): Job(name="digits-tuned.toml", given=("digits run",)),
    # the [init] table of a job fine-tuning from the export of docs/torch.md's first block: the digits job
    ("docs/torch.md", 'from = "model.safetensors"'): Addition(to="examples/jobs/digits.toml", name="from-file.toml",
                                                             given=("model.safetensors",)),
    # the job beside nets.py (the python block before it) and the digits data
    ("docs/torch.md", 'run_dir = "runs/convnet"'): Job(given=("nets.py", "digits csv")),
}


@dataclass(frozen=True)
class Context:
    """What a python block continues: blocks run before it in the same process (their names
    are its names), blocks run before it in a process of their own (their files are its
    files), and files given in its directory."""

    same_process: tuple[tuple[str, str], ...] = ()
    before: tuple[tuple[str, str], ...] = ()
    given: tuple[str, ...] = ()


PYTHON_CONTEXT: dict[tuple[str, str], Context] = {
    # "w and optimizer: the example of "Optimizers" above"
    ("README.md", "checkpoints.dump("): Context(same_process=(("README.md", "def closure():"),)),
    # the run directory the store above wrote: runs/exp1
    ("docs/checkpoints.md", 'checkpoint = open_checkpoint("runs/exp1")'): Context(
        same_process=(("docs/checkpoints.md", "pending = store.begin("),)),
    ("docs/checkpoints.md", "step, damaged = newest_intact("): Context(
        before=(("docs/checkpoints.md", "pending = store.begin("),)),
    ("docs/checkpoints.md", "saver = checkpoints.AsyncSaver()"): Context(
        same_process=(("docs/checkpoints.md", "checkpoints.dump({\"model\": params"),)),
    # the model.pt that docs/torch.md's first block exports from runs/digits
    ("docs/torch.md", "saved = torch.load("): Context(given=("model.pt",)),
}

# bash blocks with placeholders for a cluster: filled in by a function of (script, head, directory)
BASH_GIVEN: dict[tuple[str, str], str] = {
    ("docs/cluster.md", "export RAY_API_SERVER_ADDRESS=http://HEAD:8265"): "a Ray head on loopback",
}

# files a block can be given, made from a digits run (examples/jobs/digits.toml, inline) or the docs
GIVEN = ("digits run", "model.pt", "model.safetensors", "nets.py", "digits csv")


def table_entry(table: dict, block: Block):
    """The table's entry for the block: the key's line names exactly one block of its file."""
    entries = [value for (path, line), value in table.items()
               if path == block.path and block.has_line(line) and find_block(path, line) is block]
    assert len(entries) <= 1, f"{block.id} matches {len(entries)} entries of one table"
    return entries[0] if entries else None


def is_marked(block: Block) -> bool:
    return block.marker is not None


# ---------------------------------------------------------------------------------------
# install lines


@dataclass
class InstallCheck:
    """What install lines claim, checked against pyproject.toml and this environment."""

    problems: list[str] = field(default_factory=list)
    modules: set[str] = field(default_factory=set)
    needs_torch: bool = False
    seen: set[str] = field(default_factory=set)


def _top_level_modules(distribution: metadata.Distribution) -> set[str]:
    """The importable top-level names a distribution installs (from its RECORD)."""
    names = set()
    for file in distribution.files or ():
        parts = file.parts
        if not parts or parts[0] == ".." or parts[0].endswith((".dist-info", ".data", ".egg-info", ".pth")):
            continue
        if parts[0] == "__pycache__":
            continue
        if len(parts) == 1:
            if parts[0].endswith((".py", ".so", ".pyd")):
                names.add(parts[0].split(".")[0])
        else:
            names.add(parts[0])
    return {name for name in names if name.isidentifier()}


def _needs_torch(requirement: Requirement) -> bool:
    return canonicalize_name(requirement.name) == "torch"


def _check_requirement(requirement: Requirement, check: InstallCheck, *, extra: str = "", top: bool = True) -> None:
    key = f"{requirement}"
    if key in check.seen:
        return
    check.seen.add(key)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
        return
    if _needs_torch(requirement):
        check.needs_torch = True
    try:
        distribution = metadata.distribution(requirement.name)
    except metadata.PackageNotFoundError:
        if _needs_torch(requirement) and not require_torch_installed():
            return  # reported by the caller (torch: skipped outside CI's parity pass)
        check.problems.append(f"{requirement} is not installed")
        return
    if not requirement.specifier.contains(distribution.version, prereleases=True):
        check.problems.append(f"{requirement}: version {distribution.version} is installed")
    for wanted in sorted(requirement.extras):
        for line in distribution.requires or ():
            inner = Requirement(line)
            if inner.marker is not None and "extra" in str(inner.marker) and inner.marker.evaluate({"extra": wanted}):
                _check_requirement(Requirement(str(inner).split(";")[0]), check, top=False)
    if top:
        modules = _top_level_modules(distribution)
        if not modules:
            check.problems.append(f"{requirement}: no importable module found in {distribution.metadata['Name']}")
        check.modules |= modules


def require_torch_installed() -> bool:
    try:
        metadata.distribution("torch")
        return True
    except metadata.PackageNotFoundError:
        return False


def _check_project(extras: list[str], check: InstallCheck, *, editable: bool) -> None:
    for name in extras:
        if name not in EXTRAS:
            check.problems.append(f"extra {name!r} is not in pyproject.toml's [project.optional-dependencies] "
                                  f"({', '.join(EXTRAS)})")
            return
    for line in PYPROJECT["dependencies"] + [line for name in extras for line in EXTRAS[name]]:
        _check_requirement(Requirement(line), check)
    try:
        installed = metadata.distribution("shardstep").version
    except metadata.PackageNotFoundError:
        check.problems.append("shardstep is not installed")
        return
    if installed != PYPROJECT["version"]:
        check.problems.append(f"shardstep {installed} is installed; pyproject.toml says {PYPROJECT['version']}")
    if editable:
        import shardstep.service

        where = Path(shardstep.service.__file__).resolve().parent
        if where != ROOT / "service":
            check.problems.append(f"shardstep is installed from {where}, not from this checkout (pip install -e .)")


def _pinned(name: str) -> list[Requirement]:
    lines = PYPROJECT["dependencies"] + [line for group in EXTRAS.values() for line in group]
    return [r for r in map(Requirement, lines) if canonicalize_name(r.name) == canonicalize_name(name)]


def check_pip_arguments(arguments: list[str], check: InstallCheck, *, strict: bool = True) -> None:
    """``pip install`` arguments: the project with extras, or pins pyproject.toml agrees with,
    and (``strict``, for blocks) what they install is installed here; without ``strict``
    (prose, which may also name what goes next to the project) only pyproject.toml is read."""
    editable = False
    for argument in arguments:
        if argument in ("-e", "--editable"):
            editable = True
            continue
        if argument.startswith("-"):
            check.problems.append(f"pip option {argument!r}: the runner does not know what it would change")
            continue
        project = re.fullmatch(r"(\.|shardstep)(?:\[([\w,\s-]*)\])?", argument)
        if project:
            extras = [e.strip() for e in (project.group(2) or "").split(",") if e.strip()]
            if strict:
                _check_project(extras, check, editable=editable or project.group(1) == "shardstep")
            else:
                check.problems += [f"extra {e!r} is not in pyproject.toml's [project.optional-dependencies]"
                                   for e in extras if e not in EXTRAS]
            continue
        try:
            requirement = Requirement(argument)
        except Exception:
            check.problems.append(f"pip install {argument!r}: not a requirement the runner can verify")
            continue
        named = _pinned(requirement.name)
        if not named:
            if strict:
                check.problems.append(f"pip install {argument}: pyproject.toml names no {requirement.name}; "
                                      "the runner cannot verify it")
            continue
        pins = [s.version for s in requirement.specifier if s.operator == "=="]
        if _needs_torch(requirement):
            parity = [r for r in map(Requirement, EXTRAS["parity"]) if _needs_torch(r)]
            if [str(r.specifier) for r in parity] != [str(requirement.specifier)]:
                check.problems.append(f"pip install {argument}: the parity extra pins {', '.join(map(str, parity))}")
        for pin in pins:
            for wanted in named:
                if not wanted.specifier.contains(pin, prereleases=True):
                    check.problems.append(f"pip install {argument}: pyproject.toml requires {wanted}")
        if strict:
            _check_requirement(requirement, check)


def install_command(argv: list[str]) -> str | None:
    """``venv`` or ``pip`` when the command line installs, else None."""
    if len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1:3] == ["-m", "venv"]:
        return "venv"
    if argv and Path(argv[0]).name in ("pip", "pip3") and argv[1:2] == ["install"]:
        return "pip"
    if len(argv) >= 4 and Path(argv[0]).name.startswith("python") and argv[1:4] == ["-m", "pip", "install"]:
        return "pip"
    if argv and (Path(argv[0]).name in ("pip", "pip3", "conda", "uv", "pipx") or argv[:2] == ["python", "-m"]
                 and argv[2:3] == ["pip"]):
        return "unknown"
    return None


def check_install(argv: list[str], check: InstallCheck) -> None:
    what = install_command(argv)
    if what == "venv":
        target = argv[3] if len(argv) > 3 else ""
        if target != ".venv":
            check.problems.append(f"{shlex.join(argv)}: the commands use .venv; this makes {target!r}")
        allowed = PYPROJECT["requires-python"]
        from packaging.specifiers import SpecifierSet

        version = ".".join(map(str, sys.version_info[:3]))
        if not SpecifierSet(allowed).contains(version):
            check.problems.append(f"Python {version} is not allowed by requires-python {allowed}")
        if not (ENVIRONMENT / "bin" / "pip").exists():
            check.problems.append(f"{ENVIRONMENT} has no bin/pip")
    elif what == "pip":
        start = argv.index("install") + 1
        check_pip_arguments(argv[start:], check)
    else:
        check.problems.append(f"{shlex.join(argv)}: an install line the runner cannot verify")


@functools.cache
def import_problems(modules: frozenset[str]) -> str:
    """Imports the modules in a fresh interpreter; '' when all import."""
    script = ("import importlib, sys\nbad = []\nfor name in sys.argv[1:]:\n    try:\n"
              "        importlib.import_module(name)\n    except Exception as error:\n"
              "        bad.append(f'{name}: {type(error).__name__}: {error}')\nprint('\\n'.join(bad))\n")
    result = subprocess.run([sys.executable, "-c", script, *sorted(modules)], capture_output=True, text=True,
                            timeout=CLI_SECONDS, cwd="/", env=clean_environment())
    return (result.stdout + (result.stderr if result.returncode else "")).strip()


def finish_install_check(check: InstallCheck, where: str) -> None:
    """Fail on what the install lines claim wrongly; torch (missing outside CI's parity
    pass) goes through require_torch."""
    if check.needs_torch:
        from tests.conftest import require_torch

        require_torch()
    assert not check.problems, f"{where}: install lines claim what is not so:\n" + "\n".join(check.problems)
    if check.modules:
        problems = import_problems(frozenset(check.modules))
        assert not problems, f"{where}: modules of the installed requirements do not import:\n{problems}"


# ---------------------------------------------------------------------------------------
# shell lines


def logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def split_and_chain(line: str) -> list[str]:
    """The commands of a ``&&`` chain (quotes respected); one element for any other line."""
    parts, current, quote, i = [], [], None, 0
    while i < len(line):
        char = line[i]
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            current.append(line[i:])
            break
        elif line.startswith("&&", i):
            parts.append("".join(current))
            current, i = [], i + 2
            continue
        current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def words(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError:
        return command.split()


def prepare_bash(block: Block) -> tuple[str, InstallCheck]:
    """The block's script with its install commands verified and replaced by ``true``."""
    check = InstallCheck()
    lines = []
    for line in logical_lines(block.text):
        if not line.strip() or line.lstrip().startswith("#"):
            lines.append(line)
            continue
        commands = split_and_chain(line)
        kept = []
        for command in commands:
            argv = words(command)
            if install_command(argv):
                check_install(argv, check)
                kept.append(" true ")
            else:
                kept.append(command)
        prepared = "&&".join(kept)
        # a failure before the last command of a && chain does not stop `bash -e`; this does
        lines.append(f"{{ {prepared}\n}} || exit $?" if len(commands) > 1 else prepared)
    return "\n".join(lines) + "\n", check


SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}


def shell_tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:
        return line.split()


def shardstep_commands(line: str, *, shell: bool) -> list[list[str]]:
    """The ``shardstep ...`` invocations of a line (nested in quotes too): the words after
    ``shardstep`` up to a shell separator."""
    tokens = shell_tokens(line) if shell else re.sub(r"\s#\s.*$", "", line).split()
    found = []
    for index, token in enumerate(tokens):
        if " " in token and shell:
            found += shardstep_commands(token, shell=True)
            continue
        if Path(token).name != "shardstep" or index + 1 >= len(tokens):
            continue
        if not re.fullmatch(r"[a-z][a-z-]*", tokens[index + 1]):
            continue  # `shardstep run: error: ...`, `shardstep:0.1.0`: output and images, not commands
        command = []
        for word in tokens[index + 1:]:
            if word in SEPARATORS:
                break
            command.append(word)
        found.append(command)
    return found


@functools.cache
def help_text(*words_: str) -> tuple[int, str]:
    result = subprocess.run([str(SHARDSTEP), *words_, "--help"], capture_output=True, text=True,
                            timeout=CLI_SECONDS, cwd="/", env=clean_environment())
    return result.returncode, result.stdout + result.stderr


def check_command(argv: list[str], where: str) -> list[str]:
    """What in one documented ``shardstep`` command its --help does not list."""
    problems = []
    subcommand = [argv[0]]
    if argv[0] == "jobs" and len(argv) > 1 and re.fullmatch(r"[a-z]+", argv[1]):
        subcommand.append(argv[1])
    code, text = help_text(*subcommand)
    shown = f"shardstep {' '.join(subcommand)}"
    if code != 0:
        return [f"{where}: `{shown}` is not a command: {text.strip().splitlines()[-1:]}"]
    for index, word in enumerate(argv):
        flag = re.match(r"\[?(--[a-z][a-z-]*)", word)
        if not flag:
            continue
        name = flag.group(1)
        if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
            problems.append(f"{where}: `{shown} --help` lists no {name}")
            continue
        value = argv[index + 1] if index + 1 < len(argv) and "=" not in word else ""
        choices = re.fullmatch(r"([\w.-]+(?:\|[\w.-]+)+)\]*", value)
        if choices:
            listed = re.search(rf"{re.escape(name)} \{{([^}}]*)\}}", text)
            allowed = set(listed.group(1).split(",")) if listed else set()
            missing = set(choices.group(1).split("|")) - allowed
            if missing:
                problems.append(f"{where}: `{shown} {name}` takes {sorted(allowed)}; the docs show {sorted(missing)}")
    return problems


def repository_names() -> set[str]:
    ignored = {"runs", ".venv", ".git", "build", "dist", ".pytest_cache", ".hypothesis", "__pycache__"}
    return {path.name for path in ROOT.iterdir()} - ignored - {p.name for p in ROOT.glob("*.egg-info")}


def repository_paths(line: str, *, shell: bool) -> list[str]:
    """The words of a line that name a path in the checkout (their first part is a top-level
    entry of the repository: ``deploy/kuberay/rayjob.yaml``, ``examples/jobs/``)."""
    tops = repository_names()
    found = []
    for word in shell_tokens(line) if shell else line.split():
        for candidate in (word, word.partition("=")[2]):
            candidate = candidate.strip("[]()`,;'\"")
            if "/" not in candidate or "$" in candidate or ":" in candidate or candidate.startswith("/"):
                continue
            if candidate.split("/")[0] in tops:
                found.append(candidate)
    return found


def static_command_problems(block: Block, *, shell: bool) -> list[str]:
    problems = []
    for line in logical_lines(block.text):
        for argv in shardstep_commands(line, shell=shell):
            problems += check_command(argv, block.id)
        for path in repository_paths(line, shell=shell):
            if not (ROOT / path).exists():
                problems.append(f"{block.id}: {path} is not in the repository")
    return problems


# ---------------------------------------------------------------------------------------
# running


def clean_environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in RAY_VARIABLES + ("PYTHONPATH",)}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def workspace(directory: Path) -> Path:
    """A directory with what the docs' commands name by relative path: a copy of examples/
    and .venv, this environment."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "examples", directory / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    (directory / ".venv").symlink_to(ENVIRONMENT, target_is_directory=True)
    return directory


def block_environment(directory: Path, **extra: str) -> dict[str, str]:
    venv = directory / ".venv"
    return clean_environment(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(venv),
                             **extra)


@dataclass(frozen=True)
class Outcome:
    code: int | None  # None: killed at the time limit
    stdout: str
    stderr: str

    def report(self, what: str) -> str:
        ended = "timed out" if self.code is None else f"exit code {self.code}"
        return f"{what}: {ended}\n--- stdout ---\n{self.stdout[-6000:]}\n--- stderr ---\n{self.stderr[-6000:]}"


def run_process(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float, name: str) -> Outcome:
    """Runs in a process group of its own with its output in files (a daemon that inherits
    them cannot hold the test); at the time limit, and at the end, whatever is left of that
    process group is killed."""
    out, err = cwd / f".{name}.stdout", cwd / f".{name}.stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    return Outcome(code, out.read_text(errors="replace"), err.read_text(errors="replace"))


def run_cli(args: list[str], *, cwd: Path, timeout: float = CLI_SECONDS) -> Outcome:
    return run_process([str(SHARDSTEP), *args], cwd=cwd, env=block_environment(cwd) if (cwd / ".venv").exists()
                       else clean_environment(), timeout=timeout, name="shardstep")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """runs/digits as examples/jobs/digits.toml trains it (inline: bit-identical to Ray)."""
    directory = workspace(tmp_path_factory.mktemp("digits-source"))
    outcome = run_cli(["run", "examples/jobs/digits.toml", "--backend", "inline", "--quiet"], cwd=directory)
    assert outcome.code == 0, outcome.report("the source run examples/jobs/digits.toml")
    return directory / "runs" / "digits"


def provide(name: str, directory: Path, request) -> None:
    """A given file in ``directory``, where the block's job file or script is."""
    assert name in GIVEN, name
    if name == "digits run":
        shutil.copytree(request.getfixturevalue("digits_run"), directory / "runs" / "digits")
    elif name in ("model.pt", "model.safetensors"):
        outcome = run_cli(["export", str(request.getfixturevalue("digits_run")), "--out", str(directory / name)],
                          cwd=directory)
        assert outcome.code == 0, outcome.report(f"exporting {name} from the digits run")
    elif name == "nets.py":
        (directory / "nets.py").write_text(find_block("docs/torch.md", "def convnet(", "python").text)
    elif name == "digits csv":
        for data in ("digits-train.csv", "digits-test.csv"):
            shutil.copy(ROOT / "examples" / "data" / data, directory / data)


def needs_torch(block: Block) -> bool:
    if block.kind == "python" and re.search(r"^\s*(import torch|from torch)\b", block.text, re.M):
        return True
    if block.kind == "bash" and not is_marked(block):
        for line in logical_lines(block.text):
            for command in split_and_chain(line):
                argv = words(command)
                if install_command(argv) == "pip":
                    check = InstallCheck()
                    check_pip_arguments(argv[argv.index("install") + 1:], check)
                    if check.needs_torch:
                        return True
    entry = table_entry(TOML_BLOCKS, block) if block.kind == "toml" else None
    given = getattr(entry, "given", ()) + (table_entry(PYTHON_CONTEXT, block).given
                                           if block.kind == "python" and table_entry(PYTHON_CONTEXT, block) else ())
    return "model.pt" in given or ("nets.py" in given and needs_torch(find_block("docs/torch.md", "def convnet(")))


# ---------------------------------------------------------------------------------------
# per kind


def run_bash_block(block: Block, directory: Path, request) -> None:
    script, check = prepare_bash(block)
    finish_install_check(check, block.id)
    env = block_environment(directory)
    given = table_entry(BASH_GIVEN, block)
    if given == "a Ray head on loopback":
        script, env = with_ray_head(script, env, directory, request)
    (directory / ".block.sh").write_text(script)
    outcome = run_process(["bash", "-euo", "pipefail", str(directory / ".block.sh")], cwd=directory, env=env,
                          timeout=BASH_SECONDS, name="block")
    assert outcome.code == 0, outcome.report(f"{block.id} (docs line {block.line}) as run:\n{script}")


@pytest.fixture(scope="module")
def ray_head():
    from tests.ray_heads import running_head

    with running_head() as head:
        yield head


def with_ray_head(script: str, env: dict[str, str], directory: Path, request) -> tuple[str, dict[str, str]]:
    """docs/cluster.md's walk-through against a head of its own: HEAD:8265 is its job server,
    the shared path a directory here, the submission id the one submit printed; the
    cluster's token is in RAY_AUTH_TOKEN, where Ray's client reads it."""
    head = request.getfixturevalue("ray_head")
    script = script.replace("http://HEAD:8265", head.url)
    script = script.replace("/mnt/shared/runs/digits", str(directory / "shared" / "runs" / "digits"))
    lines = script.splitlines()
    first = next(i for i, line in enumerate(lines) if shardstep_commands(line, shell=True)[:1]
                 and shardstep_commands(line, shell=True)[0][0] == "submit")
    lines[first] = (f"{{ {lines[first]}\n}} | tee .submitted\n"
                    "SUBMISSION_ID=$(grep -o -m1 -E '^submitted raysubmit_[A-Za-z0-9]+' .submitted | cut -d' ' -f2)")
    script = "\n".join(lines).replace("raysubmit_XXXX", '"$SUBMISSION_ID"') + "\n"
    assert "HEAD" not in script and "/mnt/" not in script, script
    return script, {**env, "RAY_AUTH_TOKEN": head.token}


def _agrees(part, whole, path: str = "") -> list[str]:
    """Where ``part`` (a fragment) gives a value that ``whole`` does not have."""
    if isinstance(part, dict):
        if not isinstance(whole, dict):
            return [f"{path or 'the job'} is not a table there"]
        problems = []
        for key, value in part.items():
            where = f"{path}.{key}" if path else key
            problems += [f"{where} is not in the file"] if key not in whole else _agrees(value, whole[key], where)
        return problems
    return [] if part == whole else [f"{path} = {part!r}; the file has {whole!r}"]


def _merge(addition: dict, job: dict, path: str = "") -> tuple[dict, list[str]]:
    merged, problems = dict(job), []
    for key, value in addition.items():
        where = f"{path}.{key}" if path else key
        if key not in job:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(job[key], dict):
            merged[key], inner = _merge(value, job[key], where)
            problems += inner
        elif value != job[key]:
            problems.append(f"{where} = {value!r} contradicts the job's {job[key]!r}")
    return merged, problems


def _toml_text(document: dict) -> str:
    """TOML for a job document (tables of plain values, arrays of tables, inline arrays)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(item)}" for k, item in v.items()) + " }"
        raise TypeError(type(v))

    lines = [f"{json.dumps(k)} = {value(v)}" for k, v in document.items()
             if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(i, dict) for i in v))]
    for key, item in document.items():
        if isinstance(item, dict):
            lines.append(f"[{json.dumps(key)}]")
            lines += [f"{json.dumps(k)} = {value(v)}" for k, v in item.items()]
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            for entry in item:
                lines.append(f"[[{json.dumps(key)}]]")
                lines += [f"{json.dumps(k)} = {value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def validate_job(path: Path, cwd: Path) -> None:
    """load_job, in a process of its own (a job's code is imported from its directory)."""
    script = ("import sys\nfrom shardstep.service.jobspec import load_job\nspec = load_job(sys.argv[1])\n"
              "print(spec.task, spec.optimizer, spec.run_dir)\n")
    outcome = run_process([sys.executable, "-c", script, str(path)], cwd=cwd, env=block_environment(cwd),
                          timeout=CLI_SECONDS, name="load_job")
    assert outcome.code == 0, outcome.report(f"load_job({path.relative_to(cwd)})")


def run_job(path: Path, cwd: Path, what: str) -> None:
    outcome = run_cli(["run", str(path.relative_to(cwd)), "--backend", "inline", "--quiet"], cwd=cwd,
                      timeout=BASH_SECONDS)
    assert outcome.code == 0 and outcome.stdout.startswith("done: "), outcome.report(f"{what}, run inline")
    document = tomllib.loads(path.read_text())
    if "init" in document:
        run_dir = (path.parent / document["run_dir"]).resolve()
        init = json.loads((run_dir / "init.json").read_text())
        assert init["loaded"], f"{what}: nothing was loaded from {init['from']}"


def run_toml_block(block: Block, directory: Path, request) -> None:
    document = tomllib.loads(block.text)
    entry = table_entry(TOML_BLOCKS, block)
    assert entry is not None, f"{block.id} is in no entry of TOML_BLOCKS: say what it is (Job, Part or Addition)"
    if isinstance(entry, Part):
        problems = _agrees(document, tomllib.loads((ROOT / entry.of).read_text()))
        assert not problems, f"{block.id} is said to be part of {entry.of}, but:\n" + "\n".join(problems)
        from shardstep.service.jobspec import load_job

        load_job(directory / entry.of)  # what it is part of validates (with the part's values: they agree)
        return
    if isinstance(entry, Addition):
        job = directory / entry.to
        merged, problems = _merge(document, tomllib.loads(job.read_text()))
        assert not problems, f"{block.id} does not fit {entry.to}:\n" + "\n".join(problems)
        path = job.parent / entry.name
        path.write_text(_toml_text(merged))
        assert tomllib.loads(path.read_text()) == merged
    else:
        path = directory / entry.where / entry.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text)
    for name in entry.given:
        provide(name, path.parent, request)
    validate_job(path, directory)
    if isinstance(entry, Job) and entry.why:
        return
    run_job(path, directory, block.id)


def _source(block: Block) -> list:
    return [str(ROOT / block.path), block.line, block.text]


PYTHON_RUNNER = """\
import json, sys
namespace = {"__name__": "__main__"}
for path, line, source in json.load(open(sys.argv[1])):
    exec(compile("\\n" * line + source, path, "exec"), namespace)
"""


def run_python(sources: list, directory: Path, name: str) -> Outcome:
    (directory / f".{name}.json").write_text(json.dumps(sources))
    (directory / ".runner.py").write_text(PYTHON_RUNNER)
    return run_process([sys.executable, str(directory / ".runner.py"), str(directory / f".{name}.json")],
                       cwd=directory, env=block_environment(directory), timeout=PYTHON_SECONDS, name=name)


def run_python_block(block: Block, directory: Path, request) -> None:
    context = table_entry(PYTHON_CONTEXT, block) or Context()
    for name in context.given:
        provide(name, directory, request)
    for index, (path, line) in enumerate(context.before):
        earlier = find_block(path, line, "python")
        outcome = run_python([_source(earlier)], directory, f"before-{index}")
        assert outcome.code == 0, outcome.report(f"{earlier.id}, which {block.id} continues")
    sources = [_source(find_block(path, line, "python")) for path, line in context.same_process] + [_source(block)]
    outcome = run_python(sources, directory, "block")
    assert outcome.code == 0, outcome.report(f"{block.id} (docs line {block.line})")


def check_text_block(block: Block) -> None:
    commands = [line for line in block.text.splitlines()
                if line.split() and (line.split()[0] in COMMAND_WORDS or line.split()[0].startswith(("./", ".venv/")))]
    assert not commands, (f"{block.id} has no language but holds command lines; give it one (```bash) so they run, "
                          f"or mark it not run:\n" + "\n".join(commands))
    problems = static_command_problems(block, shell=False)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------
# the tests


def _param(block: Block):
    marks = [pytest.mark.torch_live] if needs_torch(block) else []
    return pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if not is_marked(b)])
def test_block(block: Block, tmp_path, request):
    """The block runs (bash, python), validates and runs (toml) or names only real commands
    and flags (no language), as written."""
    assert block.kind in ("bash", "toml", "python", "text"), f"{block.id}: no runner for {block.kind}"
    if needs_torch(block):
        from tests.conftest import require_torch

        require_torch()
    directory = workspace(tmp_path / "docs")
    if block.kind == "bash":
        run_bash_block(block, directory, request)
    elif block.kind == "toml":
        run_toml_block(block, directory, request)
    elif block.kind == "python":
        run_python_block(block, directory, request)
    else:
        check_text_block(block)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS if is_marked(b)])
def test_not_run_block(block: Block, tmp_path):
    """A block marked not run says why, and what needs no cluster holds: its syntax, its
    install lines, the repository files and the shardstep commands and flags it names."""
    reason = NOT_RUN.match(block.marker)
    assert reason, f"{block.id}: the comment before its fence must read `docs-test: not run: REASON`; " \
                   f"got {block.marker!r}"
    assert re.search(r"[A-Za-z]{3}", reason.group(1)), f"{block.id}: `not run:` must give a reason"
    assert not table_entry(TOML_BLOCKS, block) and not table_entry(PYTHON_CONTEXT, block), \
        f"{block.id} is marked not run and has a table entry too"
    if block.kind == "bash":
        syntax = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True, timeout=30)
        assert syntax.returncode == 0, f"{block.id}: {syntax.stderr}"
        check = InstallCheck()
        for line in logical_lines(block.text):
            for command in split_and_chain(line):
                argv = words(command)
                if install_command(argv):
                    check_install(argv, check)
        finish_install_check(check, block.id)
    elif block.kind == "python":
        compile(block.text, str(ROOT / block.path), "exec")
    elif block.kind == "toml":
        from shardstep.service.jobspec import TOP_LEVEL_KEYS
        from shardstep.workers.tasks.supervised import DATA_KEYS

        document = tomllib.loads(block.text)
        assert set(document) <= set(TOP_LEVEL_KEYS), f"{block.id}: {sorted(set(document) - set(TOP_LEVEL_KEYS))}"
        assert set(document.get("data", {})) <= set(DATA_KEYS), f"{block.id}: unknown [data] keys"
    else:
        assert block.kind == "text", f"{block.id}: no checks for {block.kind}"
    problems = static_command_problems(block, shell=block.kind == "bash")
    assert not problems, "\n".join(problems)


def test_fences_close_and_markers_sit_on_fences():
    assert BLOCKS and {b.path for b in BLOCKS} >= {"README.md"}
    assert not FENCE_PROBLEMS, "\n".join(FENCE_PROBLEMS)


def test_tables_name_blocks_that_exist_and_every_toml_block_has_an_entry():
    for table, kind in ((TOML_BLOCKS, "toml"), (PYTHON_CONTEXT, "python"), (BASH_GIVEN, "bash")):
        for path, line in table:
            block = find_block(path, line)
            assert block.kind == kind, f"{block.id}: an entry of the {kind} table"
            assert not is_marked(block), f"{block.id} is marked not run; drop its table entry"
    for context in PYTHON_CONTEXT.values():
        for path, line in context.same_process + context.before:
            find_block(path, line, "python")
        assert set(context.given) <= set(GIVEN)
    for entry in TOML_BLOCKS.values():
        assert set(getattr(entry, "given", ())) <= set(GIVEN)
        for job in (getattr(entry, "of", None), getattr(entry, "to", None)):
            assert job is None or (ROOT / job).is_file(), job
    missing = [b.id for b in BLOCKS if b.kind == "toml" and not is_marked(b) and not table_entry(TOML_BLOCKS, b)]
    assert not missing, f"toml blocks TOML_BLOCKS does not decide: {missing}"


def test_install_commands_in_prose():
    """`pip install ...` in the prose: extras pyproject.toml has and pins it agrees with
    (`torch==...`: the parity extra's)."""
    check, spans = InstallCheck(), 0
    for relative in DOC_FILES:
        prose = re.sub(r"```.*?```", "", (ROOT / relative).read_text(), flags=re.S)
        for span in re.findall(r"`([^`\n]*pip install [^`\n]*)`", prose):
            argv = words(span)
            start = argv.index("install") + 1
            check_pip_arguments(argv[start:], check, strict=False)
            spans += 1
    assert spans, "the prose shows no install command"
    assert not check.problems, "\n".join(check.problems)
    wrong = InstallCheck()
    check_pip_arguments(["torch==2.12.0", "'.[plots]'".strip("'")], wrong, strict=False)
    assert any("the parity extra pins" in p for p in wrong.problems), wrong.problems
    assert any("'plots' is not in pyproject.toml" in p for p in wrong.problems), wrong.problems


def test_the_runner_verifies_install_lines():
    """The install handling can fail: an unknown extra, a wrong pin, an unknown package."""
    for argv, expected in ((["pip", "install", "-e", ".[nonexistent]"], "not in pyproject.toml"),
                           (["pip", "install", "torch==2.0.0"], "the parity extra pins"),
                           (["pip", "install", "requests"], "cannot verify"),
                           (["python3", "-m", "venv", "env"], "the commands use .venv"),
                           (["conda", "install", "numpy"], "cannot verify")):
        check = InstallCheck()
        check_install(argv, check)
        assert any(expected in problem for problem in check.problems), (argv, check.problems)
    script, check = prepare_bash(Block("x.md", 1, "bash", "python3 -m venv .venv && .venv/bin/pip install -e . "
                                       "&& .venv/bin/shardstep run a.toml\n", 1))
    assert script.startswith("{  true && true && .venv/bin/shardstep run a.toml") and not check.problems, \
        (script, check.problems)
    assert check_command(["run", "a.toml", "--shardz", "2"], "x") and check_command(["trian"], "x")
    assert check_command(["run", "a.toml", "--backend", "ray|cuda"], "x")
    assert not check_command(["run", "a.toml", "--backend", "ray|inline"], "x")
