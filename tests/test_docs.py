"""The user documentation cannot rot: its runnable examples run, and its tables of options,
defaults and parameter counts equal what the code builds.

Convention: every fenced ```python block in ``docs/{models,evaluation,checkpoints}.md`` is
runnable unless it contains ``# doctest: skip``. The runnable blocks of one page run in order in
one namespace, in a fresh temporary working directory, so a page reads as one session. A
```text block that directly follows a runnable block is that block's printed output and must
match it exactly.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO

from nlsr.attention import available_attention, create_attention
from nlsr.models import available, create, options

DOCS = REPO / "docs"
PAGES = ("models.md", "evaluation.md", "checkpoints.md")
SKIP_MARK = "# doctest: skip"
_FENCE = re.compile(r"^```(\w*)\s*$")
_OPTION_HEADER = "| option | default | meaning |"


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """Fenced blocks of a Markdown text as ``(first code line number, language, code)``."""
    blocks: list[tuple[int, str, str]] = []
    lang: str | None = None
    start, lines = 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = _FENCE.match(line)
        if lang is None and fence:
            lang, start, lines = fence.group(1), number + 1, []
        elif lang is not None and line.strip() == "```":
            blocks.append((start, lang, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    if lang is not None:
        raise AssertionError(f"code fence opened at line {start - 1} is never closed")
    return blocks


def runnable(text: str) -> list[tuple[int, str, str | None]]:
    """The ``python`` blocks without the skip mark, as ``(line number, code, expected output)``;
    the expected output is the ``text`` block right after the code block (blank lines between
    allowed), else None."""
    blocks = code_blocks(text)
    lines = text.splitlines()
    out: list[tuple[int, str, str | None]] = []
    for i, (start, lang, code) in enumerate(blocks):
        if lang != "python" or SKIP_MARK in code:
            continue
        expected = None
        if i + 1 < len(blocks) and blocks[i + 1][1] == "text":
            end = start + code.count("\n")  # line number of the closing fence
            between = lines[end : blocks[i + 1][0] - 2]
            if all(not line.strip() for line in between):
                expected = blocks[i + 1][2]
        out.append((start, code, expected))
    return out


def sections(text: str, chapter: str) -> dict[str, str]:
    """``### `name`...`` sections under the ``## chapter`` heading: name -> section text."""
    body = text.split(f"\n## {chapter}\n", 1)[1].split("\n## ", 1)[0]
    parts = re.split(r"^### `(\w+)`.*$", body, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def option_table(section: str) -> dict[str, object]:
    """Rows of the section's ``| option | default | meaning |`` table: name -> default value
    (``inspect.Parameter.empty`` for "required"); {} when the section has no such table."""
    if _OPTION_HEADER not in section:
        return {}
    rows = section.split(_OPTION_HEADER, 1)[1].splitlines()[2:]
    table: dict[str, object] = {}
    for row in rows:
        if not row.startswith("|"):
            break
        name, default = (cell.strip() for cell in row.split("|")[1:3])
        key = name.strip("`")
        assert key not in table, f"option {key} listed twice"
        table[key] = (
            inspect.Parameter.empty
            if default == "required"
            else ast.literal_eval(default.strip("`"))
        )
    return table


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models run much faster without threading on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _read(page: str) -> str:
    path = DOCS / page
    assert path.is_file(), f"{path} is missing"
    return path.read_text(encoding="utf-8")


def test_code_blocks_parser_and_skip_mark() -> None:
    """The fence parser, the skip mark and the output-block pairing on a known text."""
    text = "x\n```python\na = 1\n```\n```\nshell\n```\n```python\n# doctest: skip\nboom\n```\n"
    assert code_blocks(text) == [
        (3, "python", "a = 1\n"),
        (6, "", "shell\n"),
        (9, "python", "# doctest: skip\nboom\n"),
    ]
    assert runnable(text) == [(3, "a = 1\n", None)]
    shown = (
        "```python\nprint(1)\n```\n\n```text\n1\n```\n"
        "```python\nb = 2\n```\ntext\n```text\n2\n```\n"
    )
    assert runnable(shown) == [(2, "print(1)\n", "1\n"), (9, "b = 2\n", None)]
    with pytest.raises(AssertionError, match="never closed"):
        code_blocks("```python\na = 1\n")


@pytest.mark.parametrize("page", PAGES)
def test_runnable_examples(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every runnable block of the page runs, and prints what its output block shows."""
    blocks = runnable(_read(page))
    assert blocks, f"docs/{page} has no runnable python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NLSR_DATA", raising=False)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{Path(page).stem}"}
    for line, code, expected in blocks:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            # The file name in tracebacks points at the block: docs/<page>:<line>.
            exec(compile("\n" * (line - 1) + code, f"docs/{page}", "exec"), namespace)
        if expected is not None:
            assert printed.getvalue() == expected, f"docs/{page}:{line}: printed output differs"


def test_network_option_tables_match_the_registry() -> None:
    """Each network section lists exactly the constructor's options and defaults."""
    documented = sections(_read("models.md"), "Networks")
    assert sorted(documented) == available()
    for name, section in documented.items():
        assert option_table(section) == options(name), f"options table of {name}"


def test_attention_option_tables_match_the_blocks() -> None:
    """Each attention section lists exactly the block's constructor options and defaults."""
    documented = sections(_read("models.md"), "Attention blocks")
    assert sorted(documented) == available_attention()
    for name, section in documented.items():
        signature = inspect.signature(type(create_attention(name, 16)).__init__)
        expected = {k: p.default for k, p in signature.parameters.items() if k != "self"}
        assert option_table(section) == expected, f"options table of {name}"


def test_summary_table_matches_the_built_models() -> None:
    """Parameter counts at x2/x3/x4 and chop thresholds of the paper configurations."""
    rows = re.findall(
        r"^\| `(\w+)` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| .* \| (\d+) \|$",
        _read("models.md"),
        re.MULTILINE,
    )
    assert sorted(r[0] for r in rows) == available()
    for name, *counts, chop in rows:
        for scale, documented in zip((2, 3, 4), counts, strict=True):
            with torch.device("meta"):  # shapes only: no memory, no initialisation
                model = create(name, scale)
            built = sum(p.numel() for p in model.parameters())
            assert int(documented.replace(",", "")) == built, f"{name} x{scale}"
        assert model.chop_min_size == int(chop), name


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page: str) -> None:
    """Relative links point at existing pages and headings."""
    text = _read(page)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        linked = _read(file) if file else text
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked, re.MULTILINE)
            assert anchor in {_anchor(h) for h in headings}, f"{page}: broken link {target}"
