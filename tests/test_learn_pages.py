"""The "Learn" pages (docs/learn/*.md) run as written, and show what they print.

How a page is checked (the convention the pages are written to):

* Fenced code blocks (```` ``` ```` fences, indented ones inside admonitions included)
  may only be ``python``, ``text`` or ``console``, or have no language at all (formulas
  and other plain text, not checked): any other language fails the test, so no code
  shown on a page escapes it.
* All ``python`` blocks of a page run in order, in one namespace, in a fresh temporary
  working directory that holds a link ``recipes`` to the repository's recipes. Their
  standard output is captured. A traceback points at the page's own line numbers.
* A ``text`` block is the printed output of the ``python`` block right above it (only
  blank lines between). It is compared with the captured output in full, by the rule of
  ``tests/docs_output.py`` (``0.93±0.02`` for a number that varies a little, ``*`` for
  a path or a timing, a ``... (why)`` line for lines left out and why). A ``text``
  block anywhere else fails the test.
* In a ``console`` block, a line starting with ``$ `` is a command and the lines up to
  the next command are its expected output (the same comparison; no lines: only the
  exit status is checked). Commands must be ``trainloop ...``, optionally after
  ``NAME=value`` environment settings (``PYTHONPATH=.``). They run in process through
  ``trainloop.cli.main``, in the page's working directory and in document order with
  the python blocks, and must exit with status 0.
* An HTML comment ``<!-- parse-only -->`` (as on the other docs pages) right above a ``console`` block
  (runs too long or needs the internet here: the full MNIST or Carvana data) means its
  commands are only parsed: ``trainloop run RECIPE OPTIONS --help`` must succeed (which
  type-checks the values) and every ``--option`` used must be listed in that help. Such
  a block may not show output, since nothing here could check it.
* An HTML comment ``<!-- learn-test: file NAME.py -->`` right above a ``python`` block
  also writes the block to that file in the working directory (a plugin module for
  ``-p``), besides running it.
* A command whose recipe file does not exist fails the page, naming the file; so does
  a python block that imports a ``trainloop`` module that is missing.

Page-specific tests follow the generic one: the neuron page's hand computation and its
picture, the index's links.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from docs_output import mismatch as output_mismatch
from PIL import Image

from trainloop import cli

ROOT = Path(__file__).resolve().parents[1]
LEARN = ROOT / "docs" / "learn"
PAGES = ["index", "neuron", "tensors", "mnist", "unet", "callbacks"]
LANGUAGES = {"python", "text", "console", ""}  # "": formulas, shown as they are
PARSE_ONLY = "<!-- parse-only -->"  # the same marker as the rest of the docs
FILE_MARKER = re.compile(r"<!-- learn-test: file ([\w.]+\.py) -->")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`]*)$")


class PageError(AssertionError):
    """A page does not do what it shows; the message names the page and line."""


@dataclasses.dataclass
class Block:
    language: str
    code: str
    line: int  # 1-based line of the first line of code (after the opening fence)
    marker: str  # the HTML comment right above the block, or ""
    follows: Block | None  # the block right above (only blank lines between), or None


@dataclasses.dataclass
class PageRun:
    """What running a page left behind."""

    workdir: Path
    namespace: dict
    outputs: list[str]  # captured stdout of each python block, in order
    commands: list[tuple[list[str], str]]  # each console command and its output


def parse_blocks(text: str, source: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    last_end = -1  # line index of the previous block's closing fence
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, language = match["indent"], match["info"].strip().split(" ")[0]
        start = index + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise PageError(f"{source}:{index + 1}: code block is never closed")
        if language not in LANGUAGES:
            raise PageError(
                f"{source}:{index + 1}: code block language {language!r} is not one of "
                "python, text, console or none (the test runs or checks every code block)"
            )
        body = [
            line[len(indent) :] if line.startswith(indent) else line.lstrip()
            for line in lines[start:end]
        ]
        between = lines[last_end + 1 : index]
        follows = blocks[-1] if blocks and all(not line.strip() for line in between) else None
        above = [line.strip() for line in lines[:index] if line.strip()]
        marker = above[-1] if above and above[-1].startswith("<!--") else ""
        blocks.append(Block(language, "\n".join(body) + "\n", start + 1, marker, follows))
        last_end = end
        index = end + 1
    return blocks


def mismatch(source: str, line: int, what: str, want: str, got: str, why: str) -> PageError:
    return PageError(
        f"{source}:{line}: {what} printed something else than the page shows ({why}).\n"
        f"--- the page shows ---\n{want}--- it printed ---\n{got}"
    )


def run_python(block: Block, namespace: dict, source: str) -> str:
    code = compile("\n" * (block.line - 1) + block.code, source, "exec")
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            exec(code, namespace)
    except ModuleNotFoundError as error:
        if (error.name or "").startswith("trainloop"):
            raise PageError(
                f"{source}:{block.line} needs {error.name}, which does not exist"
            ) from error
        raise
    return stdout.getvalue()


def split_commands(block: Block, source: str) -> list[tuple[int, str, str]]:
    """``(line, command, expected output)`` for each ``$ `` line of a console block."""
    commands: list[tuple[int, str, list[str]]] = []
    for offset, line in enumerate(block.code.splitlines()):
        if line.startswith("$ "):
            commands.append((block.line + offset, line[2:].strip(), []))
        elif commands:
            commands[-1][2].append(line)
        elif line.strip():
            raise PageError(f"{source}:{block.line + offset}: console output before any command")
    return [(line, command, "\n".join(output)) for line, command, output in commands]


def run_command(
    line: int, command: str, parse_only: bool, source: str, workdir: Path, monkeypatch
) -> tuple[list[str], str]:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(name, value)
        if name == "PYTHONPATH":  # what the variable does when the interpreter starts
            for entry in reversed(value.split(os.pathsep)):
                monkeypatch.syspath_prepend(str(workdir / entry))
    if not words or words[0] != "trainloop":
        raise PageError(
            f"{source}:{line}: console commands must be 'trainloop ...', got {command!r}"
        )
    argv = words[1:]
    if argv[:1] == ["run"] and len(argv) > 1 and not (workdir / argv[1]).exists():
        raise PageError(f"{source}:{line}: {argv[1]} does not exist, so '{command}' cannot run")
    stdout, stderr = io.StringIO(), io.StringIO()
    if parse_only:
        if argv[:1] != ["run"]:
            raise PageError(f"{source}:{line}: only 'trainloop run' commands can be parse-only")
        status = _main_with_help(argv, stdout, stderr)
        if status != 0:
            raise PageError(
                f"{source}:{line}: '{command}' does not parse (exit {status}): {stderr.getvalue()}"
            )
        listed = set(re.findall(r"--[\w-]+", stdout.getvalue()))
        unknown = [
            word for word in argv if word.startswith("--") and word.split("=")[0] not in listed
        ]
        if unknown:
            raise PageError(
                f"{source}:{line}: '{command}' uses options its recipe lacks: {unknown}"
            )
        return words, stdout.getvalue()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main(argv)
    if status != 0:
        raise PageError(
            f"{source}:{line}: '{command}' exited with status {status}:\n{stderr.getvalue()}"
        )
    return words, stdout.getvalue()


def _main_with_help(argv: list[str], stdout: io.StringIO, stderr: io.StringIO) -> int:
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            return cli.main([*argv, "--help"])
        except SystemExit as exit_:  # argparse's --help exits
            return int(exit_.code or 0)


def run_page(path: Path, workdir: Path, monkeypatch) -> PageRun:
    """Run every block of the page at ``path`` in ``workdir``; raise PageError on a mismatch."""
    source = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    blocks = parse_blocks(path.read_text(), source)
    (workdir / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(workdir)
    monkeypatch.setenv(cli.DISABLE_AUTOLOAD, "1")  # installed third-party plugins stay out
    modules_before = set(sys.modules)
    threads = torch.get_num_threads()
    # The pages' tensors are tiny: threads gain nothing on them, and on a machine whose
    # cores are busy with other work they make each small operation wait (5x slower).
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__main__"}
    result = PageRun(workdir, namespace, [], [])
    outputs: dict[int, str] = {}
    try:
        for block in blocks:
            if block.language == "python":
                if match := FILE_MARKER.fullmatch(block.marker):
                    (workdir / match[1]).write_text(block.code)
                outputs[id(block)] = run_python(block, namespace, source)
                result.outputs.append(outputs[id(block)])
            elif block.language == "text":
                if block.follows is None or block.follows.language != "python":
                    raise PageError(
                        f"{source}:{block.line}: a text block must come right after the "
                        "python block whose output it shows"
                    )
                got = outputs[id(block.follows)]
                if why := output_mismatch(block.code, got):
                    raise mismatch(
                        source,
                        block.line,
                        f"the block at line {block.follows.line}",
                        block.code,
                        got,
                        why,
                    )
            elif block.language == "console":
                parse_only = block.marker == PARSE_ONLY
                for line, command, want in split_commands(block, source):
                    if parse_only and want.strip():
                        raise PageError(f"{source}:{line}: a parse-only command cannot show output")
                    words, got = run_command(
                        line, command, parse_only, source, workdir, monkeypatch
                    )
                    result.commands.append((words, got))
                    if want.strip() and (why := output_mismatch(want, got)):
                        raise mismatch(source, line, f"'{command}'", want + "\n", got, why)
    finally:
        torch.set_num_threads(threads)
        for name in set(sys.modules) - modules_before:  # plugin modules written by the page
            module_file = getattr(sys.modules[name], "__file__", None) or ""
            if module_file.startswith(str(workdir)):
                del sys.modules[name]
    return result


_RUNS: dict[str, PageRun] = {}


@pytest.fixture
def page_run(tmp_path_factory, request):
    """Run a page once per test session (several tests look at the same run)."""

    def run(name: str) -> PageRun:
        if name not in _RUNS:
            with pytest.MonkeyPatch.context() as monkeypatch:
                workdir = tmp_path_factory.mktemp(f"learn-{name}")
                _RUNS[name] = run_page(LEARN / f"{name}.md", workdir, monkeypatch)
        return _RUNS[name]

    return run


# --- every page ------------------------------------------------------------------------


def test_every_planned_page_exists():
    missing = [name for name in PAGES if not (LEARN / f"{name}.md").is_file()]
    assert missing == []


@pytest.mark.parametrize("name", PAGES)
def test_page_runs_and_prints_what_it_shows(name, page_run):
    page_run(name)  # a PageError says where the page and what it ran part ways


@pytest.mark.parametrize("name", [name for name in PAGES if name != "index"])
def test_page_ends_with_the_trainloop_recipe_that_does_the_same(name):
    blocks = parse_blocks((LEARN / f"{name}.md").read_text(), name)
    last_console = [block for block in blocks if block.language == "console"][-1:]
    assert last_console, f"{name}.md shows no trainloop command"
    commands = [command for _, command, _ in split_commands(last_console[0], name)]
    assert any(re.search(r"trainloop run recipes/\w+\.py", command) for command in commands)
    after = [block for block in blocks if block.line > last_console[0].line]
    # what may follow the recipe: looking at what it wrote
    assert all(block.language in ("python", "text") for block in after)


def test_index_links_every_page_once_in_order():
    text = (LEARN / "index.md").read_text()
    linked = re.findall(r"\]\((\w+)\.md\)", text)
    assert linked == [name for name in PAGES if name != "index"]


# --- the checker itself: a wrong page must fail -----------------------------------------


def write_page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text)
    return page


def test_a_wrong_printed_value_fails_and_names_the_line(tmp_path, monkeypatch):
    page = write_page(tmp_path, "# t\n\n```python\nprint(2 + 2)\n```\n\n```text\n5\n```\n")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(PageError, match=r"page\.md:8: the block at line 4 printed"):
        run_page(page, work, monkeypatch)


def test_numbers_within_their_tolerance_match_and_blocks_share_one_namespace(tmp_path, monkeypatch):
    page = write_page(
        tmp_path,
        "```python\nvalue = 0.98765\n```\n\nProse.\n\n"
        "```python\nprint(f'accuracy {value} in 3.2s')\nprint('done')\n```\n\n"
        "```text\naccuracy 0.99±0.01 in *s\ndone\n```\n",
    )
    work = tmp_path / "work"
    work.mkdir()
    result = run_page(page, work, monkeypatch)
    assert result.outputs == ["", "accuracy 0.98765 in 3.2s\ndone\n"]


def test_a_number_out_of_its_tolerance_or_an_unexplained_elision_fails(tmp_path, monkeypatch):
    for shown, why in [("0.97±0.01\ndone", "does not match"), ("...\ndone", "must say why")]:
        page = write_page(
            tmp_path, f"```python\nprint(0.98765)\nprint('done')\n```\n\n```text\n{shown}\n```\n"
        )
        work = tmp_path / f"work{len(shown)}"
        work.mkdir()
        with pytest.raises(PageError, match=why):
            run_page(page, work, monkeypatch)


def test_an_output_block_after_prose_is_refused(tmp_path, monkeypatch):
    page = write_page(tmp_path, "```python\nprint(1)\n```\nSome prose.\n\n```text\n1\n```\n")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(PageError, match=r"page\.md:7: a text block must come right after"):
        run_page(page, work, monkeypatch)


def test_a_block_in_another_language_is_refused():
    with pytest.raises(PageError, match="page.md:3: code block language 'bash'"):
        parse_blocks("# t\n\n```bash\nls\n```\n", "page.md")


def test_a_console_command_with_an_unknown_option_fails(tmp_path, monkeypatch):
    page = write_page(
        tmp_path,
        f"{PARSE_ONLY}\n```console\n$ trainloop run recipes/single_node.py --no-such-option 3\n```\n",
    )
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(PageError, match="uses options its recipe lacks: \\['--no-such-option'\\]"):
        run_page(page, work, monkeypatch)


def test_a_console_command_with_a_badly_typed_value_fails(tmp_path, monkeypatch):
    page = write_page(
        tmp_path,
        f"{PARSE_ONLY}\n```console\n$ trainloop run recipes/single_node.py --lr fast\n```\n",
    )
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(PageError, match="does not parse \\(exit 2\\).*--lr"):
        run_page(page, work, monkeypatch)


# --- the neuron page --------------------------------------------------------------------

X, TARGET, W0, B0, LR = -0.23, 0.74, 0.5, -0.5, 0.5


def hand_step() -> dict[str, float]:
    """One step of gradient descent from the recipe's start, in float64."""

    def sigmoid(z: float) -> float:
        return 1 / (1 + math.exp(-z))

    z = W0 * X + B0
    output = sigmoid(z)
    delta = (output - TARGET) * output * (1 - output)
    w, b = W0 - LR * delta * X, B0 - LR * delta
    new_output = sigmoid(w * X + b)
    return {
        "z": z,
        "O": output,
        "E": 0.5 * (output - TARGET) ** 2,
        "δ": delta,
        "dE/dw": delta * X,
        "dE/db": delta,
        "new w": w,
        "new b": b,
        "new O": new_output,
        "new E": 0.5 * (new_output - TARGET) ** 2,
    }


def test_the_recipe_starts_where_the_neuron_page_does():
    from trainloop.recipe import load_recipe

    config = load_recipe(ROOT / "recipes" / "single_node.py").Config()
    assert (config.x, config.target, config.w, config.b, config.lr) == (X, TARGET, W0, B0, LR)


def test_neuron_hand_computation_table_holds_the_right_numbers():
    rows = {}
    for line in (LEARN / "neuron.md").read_text().splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3:
            rows[cells[0]] = cells[2].replace("−", "-")
    expected = {name: f"{value:.4f}" for name, value in hand_step().items()}
    shown = {name: rows.get(name) for name in expected}
    assert shown == expected


def test_neuron_autograd_prints_the_hand_computed_numbers(page_run):
    result = page_run("neuron")
    autograd = next(output for output in result.outputs if "dE/dw" in output)
    numbers = dict(re.findall(r"(dE/dw|dE/db|O|E|new w|new b) = (-?\d+\.\d+)", autograd))
    expected = {name: f"{value:.4f}" for name, value in hand_step().items() if name in numbers}
    assert set(numbers) == {"O", "E", "dE/dw", "dE/db", "new w", "new b"}
    assert numbers == expected


def test_neuron_page_picture_is_what_the_recipe_draws_today(page_run):
    result = page_run("neuron")
    drawn_file = result.workdir / "runs" / "neuron" / "error_surface.png"  # default options
    assert drawn_file.is_file(), "the neuron page's recipe run drew no error_surface.png"
    page_picture = Image.open(LEARN / "error_surface.png").convert("RGB")
    drawn = Image.open(drawn_file).convert("RGB")
    assert page_picture.size == drawn.size
    # Same picture: fonts may render a little differently elsewhere, but the heat map,
    # the path and the markers (most of the pixels) must agree.
    difference = np.abs(np.asarray(page_picture, float) - np.asarray(drawn, float))
    assert difference.mean() < 4.0  # another start point: about 40
    assert (difference.max(axis=2) > 40).mean() < 0.05  # another start point: about 0.5
    assert (
        "![" in (LEARN / "neuron.md").read_text()
        and "(error_surface.png)" in (LEARN / "neuron.md").read_text()
    )


# --- the names the prose mentions exist ---------------------------------------------------


def prose_of(name: str) -> str:
    """The page without its fenced code blocks."""
    return re.sub(
        r"^[ \t]*```.*?^[ \t]*```$", "", (LEARN / f"{name}.md").read_text(), flags=re.S | re.M
    )


def recipe_help(recipe: Path) -> str:
    stdout, stderr = io.StringIO(), io.StringIO()
    status = _main_with_help(["run", str(recipe)], stdout, stderr)
    assert status == 0, stderr.getvalue()
    return stdout.getvalue()


def test_every_option_the_prose_names_exists(monkeypatch):
    monkeypatch.setenv(cli.DISABLE_AUTOLOAD, "1")
    helps = "\n".join(recipe_help(recipe) for recipe in sorted((ROOT / "recipes").glob("*.py")))
    known = set(re.findall(r"--[\w-]+", helps)) | {"--help"}
    named = {}
    for page in PAGES:
        spans = re.findall(r"`([^`]+)`", prose_of(page))
        # options of other programs (`tensorboard --logdir DIR`) are not trainloop's
        ours = [span for span in spans if not re.match(r"(tensorboard|pip) ", span)]
        named[page] = sorted(set(re.findall(r"--[a-z][\w-]*", " ".join(ours))) - known)
    named = {page: options for page, options in named.items() if options}
    if not (ROOT / "recipes" / "unet_carvana.py").exists():
        named.pop("unet", None)  # its options are checked once the recipe exists
    assert named == {}


def table_rows(name: str) -> list[list[str]]:
    rows = []
    for line in (LEARN / f"{name}.md").read_text().splitlines():
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_callbacks_table_names_built_in_plugins_and_the_hooks_they_use():
    from trainloop.manager import PluginManager, builtin_plugin_names

    rows = table_rows("callbacks")
    assert [row[0] for row in rows] == [
        "`TensorboardVisualizerCallback`",
        "`TensorboardLoggerCallback`",
        "`ModelSaverCallback`",
        "`PredictionsSaverCallback`",
    ]
    manager = PluginManager()
    manager.load_builtins()
    for _, in_trainloop, hooks_cell in rows:
        plugins = re.findall(r"the `(\w+)` plugin", in_trainloop)
        assert plugins, in_trainloop
        missing = [name for name in plugins if name not in builtin_plugin_names()]
        assert missing == [], f"callbacks.md names plugins that are not built in: {missing}"
        used = set()
        for name in plugins:
            module = manager.get_plugin(name)
            used.update(manager.implemented_hooks(module))
            used.update(re.findall(r"hook\.(\w+)", Path(module.__file__).read_text()))
        hooks = re.findall(r"`(\w+)`", hooks_cell)
        assert [hook for hook in hooks if hook not in used] == [], plugins


def test_carvana_picture_on_the_unet_page_has_the_layout_of_the_default_run():
    import argparse

    from trainloop.plugins import tensorboard
    from trainloop.recipe import load_recipe
    from trainloop.tasks.carvana.pictures import overlay_rows

    width, height = load_recipe(ROOT / "recipes" / "unet_carvana.py").Config().image_size
    parser = argparse.ArgumentParser()
    tensorboard.add_options(parser=parser)
    count = parser.parse_args([]).tensorboard_images
    zeros = torch.zeros(count, 1, height, width)
    expected = overlay_rows(zeros.expand(-1, 3, -1, -1), zeros, zeros)

    picture = Image.open(LEARN / "carvana_samples.png")
    assert picture.size == (expected.shape[2], expected.shape[1])
    assert "(carvana_samples_labelled.png)" in (LEARN / "unet.md").read_text()  # labelled
