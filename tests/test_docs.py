"""The docs cannot rot: their examples run, their tables match the code, the site builds.

Every page under ``docs/`` (except ``docs/learn/``, which has its own test, and the
plugin pages other engineers keep, unless listed in ``CHECKED_PLUGIN_PAGES``) is run as
a doctest of sorts, in a fresh temporary folder where ``recipes/`` is the project's:

* ```` ```python ```` blocks run in order, in one namespace per page; a ```` ```text ````
  block right after one (nothing but blank lines between) is its expected output;
* ```` ```console ```` / ```` ```bash ```` lines that start with ``trainloop `` (after an
  optional ``$ `` prompt and ``NAME=value`` settings) run through
  ``trainloop.cli.main``, and must exit 0. In ``console`` blocks, the lines after a
  command are its expected output (none: only the exit status is checked), and ``$ echo $?`` prints the exit status of the
  command before it;
* expected output is compared in full, by the rule of ``tests/docs_output.py``:
  ``0.93±0.02`` for a number that varies a little, ``*`` for a path or a timing, a
  ``... (why)`` line for lines left out and why;
* any other ```` ```text ```` block (a file layout, a run too slow for the tests) must
  follow ``<!-- not-output: why -->``, which says why it is not compared;
* a shell block right after ``<!-- parse-only -->`` (a run too slow here, or one that
  needs the internet) only has its ``trainloop run`` commands parsed: the command with
  ``--help`` appended must exit 0 (which checks the option values' types) and every
  ``--option`` it uses must be in that help, so the page names only options that exist;
* a block right after ``<!-- no-test -->`` is not run (for deliberate fragments);
  ``<!-- no-test: why -->`` says why, for a command whose output cannot be shown here;
* a block that only includes files (``--8<-- "file"``) is checked to include an
  existing file, which its own test runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import make_learner
from docs_output import mismatch as output_mismatch

from trainloop import Learner, hookspecs
from trainloop.cli import main as trainloop_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
SNIPPET_BASES = (EXAMPLES, ROOT / "recipes")  # pymdownx.snippets' base_path in mkdocs.yml
NO_TEST = "<!-- no-test -->"
NO_TEST_WHY = re.compile(r"<!-- no-test: .+ -->")  # the same, saying why
NOT_OUTPUT = re.compile(r"<!-- not-output: .+ -->")
PARSE_ONLY = "<!-- parse-only -->"
CLOSED = "<the end of a code block>"
SHELLS = {"console", "bash", "shell", "sh"}
# Plugin pages other engineers write are run once they are known to pass; a page added
# later is built into the site but not run here until it is listed.
MY_PLUGIN_PAGES = {"progress.md", "metrics_jsonl.md", "index.md"}
CHECKED_PLUGIN_PAGES = {
    "checkpoint.md",
    "device.md",
    "distributed.md",
    "early_stopping.md",
    "grad_accumulation.md",
    "grad_clip.md",
    "interrupt.md",
    "lr_scheduler.md",
    "model_saver.md",
    "nan_guard.md",
    "precision.md",
    "predictions.md",
    "profiler.md",
    "summary.md",
    "tensorboard.md",
    "throughput.md",
    "weight_averaging.md",
}


@dataclasses.dataclass
class Block:
    language: str
    code: str
    line: int  # 1-based line of the opening fence
    marker: str = ""  # the HTML comment right above the block, if any
    after_block: bool = False  # only blank lines between this block and the one before


_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    lines = text.splitlines()
    blocks = []
    index = 0
    previous = ""
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            if lines[index].strip():
                previous = lines[index].strip()
            index += 1
            continue
        indent, fence = match["indent"], match["fence"]
        language = (match["info"].split() or [""])[0].lstrip(".").lower()
        body = []
        start = index
        index += 1
        while index < len(lines) and lines[index].strip() != fence:
            body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else "")
            index += 1
        marker = (
            previous
            if previous in (NO_TEST, PARSE_ONLY) or NOT_OUTPUT.fullmatch(previous)
            else NO_TEST
            if NO_TEST_WHY.fullmatch(previous)
            else ""
        )
        after_block = bool(blocks) and previous == CLOSED
        blocks.append(Block(language, "\n".join(body) + "\n", start + 1, marker, after_block))
        previous = CLOSED
        index += 1
    return blocks


def pages_to_run() -> list[Path]:
    pages = []
    for page in sorted(DOCS.rglob("*.md")):
        relative = page.relative_to(DOCS)
        if relative.parts[0] in ("learn", "examples"):
            continue
        if relative.parts[0] == "plugins" and page.name not in (
            MY_PLUGIN_PAGES | CHECKED_PLUGIN_PAGES
        ):
            continue
        pages.append(page)
    return pages


def page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix() if page.is_relative_to(DOCS) else page.name


# --- running a page -------------------------------------------------------------------


def run_command(command: str) -> tuple[int, str]:
    """Run ``[NAME=value ...] trainloop ARGS`` in-process; return (status, output)."""
    words = shlex.split(command)
    settings = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        settings[name] = value
    assert words[0] == "trainloop", command
    output = io.StringIO()
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                status = trainloop_main(words[1:])
            except SystemExit as exit:  # --help and --version exit through argparse
                status = exit.code or 0
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return status, output.getvalue()


def parse_command(command: str, where: str) -> None:
    """Check a command without running it: its options exist and its values parse."""
    words = shlex.split(command)
    assert "run" in words, f"{where}: only 'trainloop run' commands can be parse-only"
    recipe = words[words.index("run") + 1]
    assert not recipe.startswith("recipes/") or (ROOT / recipe).exists(), (
        f"{where}: {recipe} does not exist: write it, or take the command off the page"
    )
    status, help_text = run_command(command + " --help")
    assert status == 0, f"{where}: the options do not parse:\n{help_text}"
    for word in words:
        option = word.split("=", 1)[0]
        if option.startswith("--"):
            assert re.search(rf"{re.escape(option)}(?![\w-])", help_text), (
                f"{where}: {option} is not an option of this command:\n{help_text}"
            )


def check_output(expected: list[str], actual: str, where: str) -> None:
    """The whole output is what the page shows (``tests/docs_output.py``)."""
    why = output_mismatch("\n".join(expected), actual)
    assert why is None, (
        f"{where}: the output is not what the page shows: {why}. The page shows:\n"
        + "\n".join(expected)
        + "\nThe output was:\n"
        + actual
    )


def run_shell_block(block: Block, where: str) -> None:
    commands: list[tuple[str, list[str]]] = []  # (command, expected output lines)
    prompt = block.language == "console"
    for line in block.code.splitlines():
        if prompt and not line.startswith("$ "):
            if commands:
                commands[-1][1].append(line)
            continue
        command = line[2:] if line.startswith("$ ") else line
        commands.append((command.strip(), []))
    status = 0
    for command, expected in commands:
        words = command.split()
        if command == "echo $?":
            check_output(expected, str(status), f"{where}: {command}")
            continue
        settings_then_command = [word for word in words if "=" not in word[:1] and "=" in word]
        program = words[len(settings_then_command)] if words else ""
        if program != "trainloop":
            continue  # pip, tensorboard, kaggle, cd...: not run here
        if block.marker == PARSE_ONLY:
            assert not expected, f"{where}: a parse-only block cannot show output"
            parse_command(command, f"{where}: {command}")
            continue
        status, output = run_command(command)
        if not any(next_command == "echo $?" for next_command, _ in commands):
            assert status == 0, f"{where}: {command} exited {status}:\n{output}"
        if any(line.strip() for line in expected):  # no lines shown: only the status counts
            check_output(expected, output, f"{where}: {command}")


def included_files(code: str) -> list[Path] | None:
    """The files a snippets-only block includes, or ``None`` if it has other lines."""
    names = []
    for line in code.splitlines():
        match = re.fullmatch(r'\s*-{1,}8<-{1,}\s+"([^"]+)"\s*', line)
        if match:
            names.append(match[1])
        elif line.strip():
            return None
    return [next((base / name for base in SNIPPET_BASES if (base / name).exists()), Path(name))
            for name in names]  # fmt: skip


@pytest.fixture
def docs_folder(tmp_path, monkeypatch, example_packages):
    """A fresh working folder with the project's recipes and the example plugins
    (conftest's ``example_packages``)."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(example_packages))  # their entry points are found too
    monkeypatch.delenv("TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return tmp_path


@pytest.mark.parametrize("page", pages_to_run(), ids=page_id)
def test_page_examples_run(page, docs_folder):
    module = types.ModuleType(f"docs_page_{page.stem.replace('-', '_')}")
    sys.modules[module.__name__] = module  # dataclasses and pickle look modules up by name
    printed = None  # what the last python block printed
    try:
        for block in code_blocks(page.read_text()):
            where = f"{page_id(page)}:{block.line}"
            if block.language == "text" and not NOT_OUTPUT.fullmatch(block.marker):
                assert block.after_block and printed is not None, (
                    f"{where}: a text block shows the output of the python block right above"
                    " it; anything else follows '<!-- not-output: why -->'"
                )
                check_output(block.code.splitlines(), printed, where)
            printed = None
            files = included_files(block.code)
            if files is not None:
                missing = [str(file) for file in files if not file.is_file()]
                assert files and not missing, f"{where}: included files missing: {missing}"
                continue
            if block.marker == NO_TEST:
                continue
            if block.language == "python":
                torch.manual_seed(0)
                output = io.StringIO()
                with contextlib.redirect_stdout(output):
                    exec(compile(block.code, where, "exec"), module.__dict__)
                printed = output.getvalue()
            elif block.language in SHELLS:
                run_shell_block(block, where)
    finally:
        del sys.modules[module.__name__]


# --- the runner itself ----------------------------------------------------------------


def test_code_blocks_finds_languages_lines_markers_and_indented_blocks():
    text = (
        "# Title\n\n```python\nx = 1\n```\n\n<!-- no-test -->\n```console\n$ trainloop run a.py\n"
        "```\n\n!!! note\n    ```python\n    y = 2\n    ```\n\n```text\n2\n```\n"
    )
    blocks = code_blocks(text)
    assert [(b.language, b.line, b.marker, b.after_block) for b in blocks] == [
        ("python", 3, "", False),
        ("console", 8, NO_TEST, False),
        ("python", 13, "", False),
        ("text", 17, "", True),
    ]
    assert blocks[2].code == "y = 2\n"


def test_check_output_compares_the_whole_output():
    check_output(["run folder: *", "... (why)", "done"], "run folder: runs/x\nb\ndone\n", "t")
    with pytest.raises(AssertionError, match="not on the page"):
        check_output(["run folder: *"], "run folder: runs/x\ndone\n", "t")
    check_output(["usage: x [-h] *"], "usage: x [-h] [--lr LR]", "t")  # only * is special
    with pytest.raises(AssertionError):
        check_output(["usage: x [-h]"], "usage: x h", "t")


def test_a_text_block_that_is_not_output_must_say_why(docs_folder, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Prose.\n\n```text\nlayout\n```\n")
    with pytest.raises(AssertionError, match="not-output: why"):
        test_page_examples_run(page, docs_folder)
    page.write_text("Prose.\n\n<!-- not-output: a layout -->\n```text\nlayout\n```\n")
    test_page_examples_run(page, docs_folder)


def test_a_failing_console_command_fails_its_page(docs_folder):
    block = Block("console", "$ trainloop run missing.py\n", 1)
    with pytest.raises(AssertionError, match="exited 2"):
        run_shell_block(block, "page.md:1")
    run_shell_block(Block("console", "$ trainloop run missing.py\n$ echo $?\n2\n", 1), "page.md:1")


def test_a_parse_only_command_must_use_options_that_exist(docs_folder):
    good = Block("console", "$ trainloop run recipes/single_node.py --lr 0.1 --epochs 99\n", 1)
    run_shell_block(dataclasses.replace(good, marker=PARSE_ONLY), "page.md:1")
    assert not Path("runs").exists()  # parsed, not run
    for wrong in ("--lr fast", "--no-such-option 1"):
        bad = Block("bash", f"trainloop run recipes/single_node.py {wrong}\n", 1, PARSE_ONLY)
        with pytest.raises(AssertionError):
            run_shell_block(bad, "page.md:1")


# --- the event tables in concepts.md --------------------------------------------------


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after ``heading``, cells stripped of `` ` ``."""
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        line = line.strip()
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line):
            rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header


CONCEPTS = (DOCS / "concepts.md").read_text()
EVENT_ROWS = table_rows(CONCEPTS, "<!-- event-table -->")
STEP_ROWS = table_rows(CONCEPTS, "<!-- step-table -->")


class Recorder:
    """Records the name of every event, once per firing."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def record(self, name: str) -> None:
        self.events.append(name)


def recording_plugin() -> Recorder:
    recorder = Recorder()
    for name in hookspecs.event_names():
        # A class per event is a test convenience: plugins define normal methods.
        setattr(recorder, name, _recording_method(recorder, name))
    return recorder


def _recording_method(recorder: Recorder, name: str):
    def method(**kwargs):
        recorder.record(name)

    method.__name__ = name
    return method


def first_occurrences(events: list[str]) -> list[str]:
    return list(dict.fromkeys(events))


def test_event_table_lists_every_event_of_hookspecs_once():
    names = [row[0] for row in EVENT_ROWS]
    assert sorted(names) == sorted(hookspecs.event_names())
    assert len(names) == len(set(names))


def test_event_table_is_in_the_order_fit_and_predict_fire_them():
    recorder = recording_plugin()
    learner: Learner = make_learner(plugins=[recorder])
    learner.fit(2)
    fit_events = first_occurrences(recorder.events)
    recorder.events.clear()
    learner.predict([batch[0] for batch in learner.train_data[:2]])
    predict_events = first_occurrences(recorder.events)

    table = [row[0] for row in EVENT_ROWS]
    fired = fit_events + predict_events
    assert [name for name in table if name in fired] == fired


def test_event_table_puts_on_exception_just_before_on_fit_end():
    class Failing:
        def on_train_end(self) -> None:
            raise RuntimeError("boom")

    recorder = recording_plugin()
    learner = make_learner(plugins=[recorder, Failing()])
    with pytest.raises(RuntimeError):
        learner.fit(1)
    assert recorder.events[-2:] == ["on_exception", "on_fit_end"]
    table = [row[0] for row in EVENT_ROWS]
    assert table.index("on_exception") + 1 == table.index("on_fit_end")


def test_step_table_lists_exactly_the_firstresult_hooks():
    def is_firstresult(name: str) -> bool:
        opts = getattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec", None)
        return bool(opts and opts.get("firstresult"))

    firstresult = sorted(name for name in dir(hookspecs) if is_firstresult(name))
    assert sorted(row[0] for row in STEP_ROWS) == firstresult


# --- the site and the API it documents ------------------------------------------------


def test_every_public_name_has_a_docstring_and_type_hints():
    griffe = pytest.importorskip("griffe")
    package = griffe.load("trainloop", search_paths=[str(ROOT)])
    import trainloop

    missing = []
    for name in trainloop.__all__:
        obj = package[name]
        target = obj.final_target if obj.is_alias else obj
        if not target.docstring:
            missing.append(f"{name}: no docstring")
        functions = [target] if target.is_function else []
        if target.is_class:
            functions += [
                member
                for member_name, member in target.members.items()
                if member.is_function
                and (not member_name.startswith("_") or member_name == "__init__")
            ]
        for function in functions:
            unannotated = [
                parameter.name
                for parameter in function.parameters
                if parameter.annotation is None and parameter.name not in ("self", "cls")
            ]
            if unannotated or function.returns is None:
                missing.append(f"{function.path}: type hints missing ({unannotated or 'return'})")
    assert not missing, "\n".join(missing)


def nav_files(nav) -> list[str]:
    files = []
    for item in nav:
        if isinstance(item, str):
            files.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                files.extend(nav_files(value) if isinstance(value, list) else [value])
    return files


def test_every_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)  # !!python/name tags
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    listed = set(nav_files(config["nav"]))
    assert sorted(file for file in listed if not (DOCS / file).is_file()) == []
    # The site's hook adds the plugin and Learn pages that the nav does not list yet.
    in_nav = set(nav_files(mkdocs_hooks().complete_nav(config["nav"], DOCS)))
    pages = {
        page.relative_to(DOCS).as_posix()
        for page in DOCS.rglob("*.md")
        if "examples" not in page.relative_to(DOCS).parts
    }
    assert sorted(pages - in_nav) == []


def mkdocs_hooks() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", DOCS / "_ext" / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plugins_page_lists_every_built_in_plugin(tmp_path):
    from trainloop.manager import builtin_plugin_names

    table = mkdocs_hooks().plugin_table(DOCS)
    names = [row.split("|")[1].strip() for row in table.splitlines()[2:]]
    assert [re.sub(r"\[(\w+)\]\(.*", r"\1", name) for name in names] == builtin_plugin_names()
    assert "| [progress](progress.md) | A rich progress bar per epoch" in table


def test_the_nav_hook_adds_pages_the_nav_does_not_list(tmp_path):
    for page in ("plugins/a.md", "plugins/b.md", "learn/x.md"):
        (tmp_path / page).parent.mkdir(exist_ok=True)
        (tmp_path / page).write_text("# page\n")
    nav = [{"Plugins": ["plugins/a.md"]}, {"Learn": []}, {"Other": []}]
    assert mkdocs_hooks().complete_nav(nav, tmp_path) == [
        {"Plugins": ["plugins/a.md", {"b": "plugins/b.md"}]},
        {"Learn": [{"x": "learn/x.md"}]},
        {"Other": []},
    ]


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> Path:
    """The site, built once with ``mkdocs build --strict`` (which must pass)."""
    if shutil.which("mkdocs") is None and not _has_module("mkdocs"):
        pytest.skip("mkdocs is not installed")
    pytest.importorskip("mkdocstrings")
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def test_mkdocs_build_strict_passes(built_site):
    hooks_page = (built_site / "reference" / "hooks" / "index.html").read_text()
    assert 'id="trainloop.hookspecs.on_epoch_end"' in hooks_page
    api_page = (built_site / "reference" / "api" / "index.html").read_text()
    import trainloop

    for name in trainloop.__all__:
        assert f'id="trainloop.{name}"' in api_page, f"{name} is not on the API page"
    for page in (hooks_page, api_page):  # Sphinx roles became links (docs/_ext)
        assert not re.search(r":(class|func|meth|exc|attr):", page)
    assert 'doc-label-firstresult"><code>firstresult' in hooks_page


def reference_ids(site: Path) -> set[str]:
    """The anchors of every documented object on the site."""
    ids = set()
    for html in site.rglob("*.html"):
        ids.update(re.findall(r'id="(trainloop[\w.]*)"', html.read_text()))
    return ids


def trainloop_names(text: str) -> set[str]:
    """The dotted ``trainloop.`` names a page uses: in prose, code and imports."""
    names = set(re.findall(r"(?<![\w/.-])trainloop(?:\.\w+)+", text))
    for module, imported in re.findall(
        r"\bfrom (trainloop(?:\.\w+)*) import (\([^)]*\)|[^\n#]+)", text
    ):
        words = re.findall(r"\w+", re.sub(r"\bas \w+", "", imported))
        names.update(f"{module}.{word}" for word in words)
    return names


def documented_as(name: str, ids: set[str]) -> bool:
    """Whether ``name``, or the object it imports, has an entry in the reference."""
    if name in ids:
        return True
    import trainloop

    module_name, _, attribute = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return False
    canonical = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    return canonical in ids or (
        getattr(trainloop, attribute, None) is obj and f"trainloop.{attribute}" in ids
    )


def test_trainloop_names_are_found_in_prose_code_and_imports():
    text = "Use `trainloop.tasks.carvana.rle.rle_encode`.\n```python\nfrom trainloop.tasks.mnist.data import (\n    load_mnist,\n    write_idx_files as write,\n)\nfrom trainloop_csv import X\n```\n"
    assert trainloop_names(text) == {
        "trainloop.tasks.carvana.rle.rle_encode",
        "trainloop.tasks.mnist.data",
        "trainloop.tasks.mnist.data.load_mnist",
        "trainloop.tasks.mnist.data.write_idx_files",
    }


def test_every_trainloop_name_on_a_page_has_a_reference_entry(built_site):
    ids = reference_ids(built_site)
    missing = {}
    for page in sorted(DOCS.rglob("*.md")):
        if "examples" in page.relative_to(DOCS).parts:
            continue
        unknown = sorted(
            name for name in trainloop_names(page.read_text()) if not documented_as(name, ids)
        )
        if unknown:
            missing[page_id(page)] = unknown
    assert missing == {}


def test_the_hook_reference_shows_every_hook_once_in_its_group(built_site):
    hooks = mkdocs_hooks()
    groups = hooks.hook_groups()
    page = (DOCS / "reference" / "hooks.md").read_text()
    assert sorted(re.findall(r"<!-- hooks: (.+?) -->", page)) == sorted(groups)  # none left out
    listed = [hook for names in groups.values() for hook in names]
    assert sorted(listed) == sorted(
        name
        for name in dir(hookspecs)
        if hasattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec")
    )
    html = (built_site / "reference" / "hooks" / "index.html").read_text()
    for hook in listed:
        assert html.count(f'id="trainloop.hookspecs.{hook}"') == 1, hook
    # each entry says which built-in plugins implement it, as `trainloop plugins` does
    entry = html.split('id="trainloop.hookspecs.on_backward_end"')[1].split("<h3")[0]
    assert re.search(r"Built-in plugins that implement it: .*>nan_guard</a>", entry)


def test_the_site_shows_printed_values_without_their_tolerances(built_site):
    page = (built_site / "learn" / "neuron" / "index.html").read_text()
    assert "0.0238164" in page and "±" not in page


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# --- the install page -----------------------------------------------------------------


def test_the_install_page_lists_every_extra_with_its_packages():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {"(none)": project["dependencies"], **project["optional-dependencies"]}
    rows = table_rows((DOCS / "install.md").read_text(), "<!-- extras-table -->")
    shown = {row[0]: [name.strip("`") for name in row[1].split(", ")] for row in rows}
    # the packages' names, without their version bounds
    wanted = {
        extra.strip("`"): [re.split(r"[<>=!~; ]", requirement)[0] for requirement in requirements]
        for extra, requirements in wanted.items()
    }
    assert shown == wanted


def test_every_command_of_the_seed_map_parses(docs_folder):
    rows = table_rows((DOCS / "from-the-seed.md").read_text(), "<!-- seed-table -->")
    assert len(rows) >= 10
    for seed_name, _, command in rows:
        parse_command(command, f"from-the-seed.md: {seed_name}")


def test_the_plugin_reference_lists_every_option_of_every_built_in_plugin(built_site):
    import argparse

    from trainloop.manager import builtin_plugin_names

    html = (built_site / "reference" / "plugins" / "index.html").read_text()
    missing = []
    for name in builtin_plugin_names():
        module = importlib.import_module(f"trainloop.plugins.{name}")
        if not hasattr(module, "add_options"):
            continue
        parser = argparse.ArgumentParser(add_help=False)
        module.add_options(parser=parser)
        for action in parser._actions:
            missing += [
                f"{name}: {option}" for option in action.option_strings if option not in html
            ]
    assert missing == []
