"""README.md and docs/*.md: every ```python block runs as written, every block showing a command's
output shows it, and every relative link resolves to a file inside the repository."""

from __future__ import annotations

import difflib
import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


BLOCKS = [
    (page, i, code)
    for page in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", _text(page), flags=re.S))
]


# Optional extras a block may use (CI installs them all): a block naming one that is missing here
# is skipped, as the extra's own tests are.
_EXTRAS = ("pandas", "pyarrow", "matplotlib", "tensorboard", "lightning", "ray", "huggingface_hub")


@pytest.mark.parametrize(
    "page, code", [(p, c) for p, _, c in BLOCKS], ids=[f"{_name(p)}:block{i}" for p, i, _ in BLOCKS]
)
def test_python_block_runs(page: Path, code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = [m for m in _EXTRAS if m in code and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, not installed here")
    monkeypatch.chdir(ROOT)
    exec(compile(code, _name(page), "exec"), {"__name__": "__readme__"})


def test_readme_has_python_examples() -> None:
    assert any(page.name == "README.md" for page, _, _ in BLOCKS)


# --------------------------------------------------------------------------- shown output

_COMMAND_OUTPUT = re.compile(r"```\n\$ (wcond [^\n]*)\n(.*?)```", flags=re.S)
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_SECONDS = re.compile(r"\b\d+\.\d s\b")  # wall time, different on every run


def shown_outputs(page: Path = ROOT / "README.md") -> list[tuple[str, str]]:
    """(command, output) for every block of a page that shows what a command prints, in order."""
    return [(m.group(1), m.group(2)) for m in _COMMAND_OUTPUT.finditer(_text(page))]


PAGES_WITH_OUTPUT = [page for page in PAGES if shown_outputs(page)]


def _normal(text: str) -> list[str]:
    return [_SECONDS.sub("N s", line.rstrip()) for line in text.strip("\n").splitlines()]


def _same(got: list[str], want: list[str]) -> bool:
    """Equal text outside numbers; numbers equal to the digits the page prints (1e-2 relative).

    A line holding a value at float32 noise level (0 < |x| < 1e-5, e.g. rare_rows of a planted
    copy) differs between CPUs in every digit: there only the text around the numbers must match.
    """
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if _NUMBER.split(g) != _NUMBER.split(w):
            return False
        a, b = [float(x) for x in _NUMBER.findall(g)], [float(y) for y in _NUMBER.findall(w)]
        if any(0 < abs(v) < 1e-5 for v in a + b):
            continue
        if not all(x == pytest.approx(y, rel=1e-2, abs=1e-9) for x, y in zip(a, b)):
            return False
    return True


def _keep_seconds(now: str, shown: str) -> str:
    """`now` with the wall times `shown` gives, in order: a regenerated page keeps its timings."""
    times = iter(_SECONDS.findall(shown))
    return _SECONDS.sub(lambda s: next(times, s.group(0)), now)


def test_the_shown_outputs_are_found() -> None:
    """The README's Try it and its CI gate, and the command reference's examples, are all checked."""
    assert len(shown_outputs()) >= 2, "the README's output blocks were not found"
    assert sum(len(shown_outputs(page)) for page in PAGES) >= 10


@pytest.mark.parametrize("page", PAGES_WITH_OUTPUT, ids=[_name(p) for p in PAGES_WITH_OUTPUT])
def test_shown_output_is_real(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, update_golden: bool
) -> None:
    """Each block showing `$ wcond ...` and its output matches what that command prints today.

    A page's commands run in order in a scratch copy of sample_checkpoints/ (a later block reads
    what an earlier one wrote), on the CPU, in a 100-column console, in this process (one torch
    import). The output compared is stdout and stderr together, as a terminal shows them.
    `--update-golden` rewrites the page's blocks with what the commands print now.
    """
    import torch
    from typer.testing import CliRunner

    from wcond.cli import app

    shutil.copytree(ROOT / "sample_checkpoints", tmp_path / "sample_checkpoints")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device auto: the CPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    runner = CliRunner()
    text = _text(page)
    fresh = []  # (start, end, output now) of each block's output
    for m in _COMMAND_OUTPUT.finditer(text):
        command, output = m.group(1), m.group(2)
        result = runner.invoke(app, shlex.split(command)[1:], prog_name="wcond")
        got = _normal(result.output)
        want = _normal(output)
        if update_golden and not _same(got, want):
            now = "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())
            fresh.append((m.start(2), m.end(2), _keep_seconds(now, output) + "\n"))
        elif not _same(got, want):
            delta = "\n".join(difflib.unified_diff(want, got, _name(page), "now", lineterm=""))
            pytest.fail(
                f"{_name(page)}: output of `{command}` is not what it prints (rerun with"
                f" --update-golden if intended):\n{delta}"
            )
    for start, end, now in reversed(fresh):
        text = text[:start] + now + text[end:]
    if fresh:
        page.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- links

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", flags=re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` there is no heading, a `](x)` no link)."""
    return _FENCE.sub("", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to dashes."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_prose(_text(page))):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def relative_links(page: Path) -> list[str]:
    """Every link of a page that is not a URL (http:, https:, mailto:)."""
    links = _LINK.findall(_prose(_text(page)))
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link)]


@pytest.mark.parametrize("page", PAGES, ids=[_name(p) for p in PAGES])
def test_relative_links_resolve_inside_the_repository(page: Path) -> None:
    """A relative link names a file or folder of the repository; a #anchor into Markdown names a
    heading there."""
    links = relative_links(page)
    bad = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.is_relative_to(ROOT) or path.startswith("/"):
            bad.append(f"{link}: outside the repository")
        elif not target.exists():
            bad.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            bad.append(f"{link}: no heading #{anchor} in {target.relative_to(ROOT).as_posix()}")
    assert not bad, f"{_name(page)}: " + "; ".join(bad)


def test_the_link_check_sees_links() -> None:
    """The README links each docs page, and the checker's parts catch what they should."""
    readme = relative_links(ROOT / "README.md")
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    assert "the-library-in-ten-lines" in _anchors(ROOT / "README.md")
    assert "fusing-while-training-wcondrare" in _anchors(ROOT / "docs" / "LIBRARY.md")


# --------------------------------------------------------------------------- .gitignore


def test_what_the_examples_write_is_ignored() -> None:
    """A file a shown `$ wcond ...` command writes into the clone's root (-o, --history) is ignored
    by .gitignore, so that following the examples leaves `git status` clean."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    import subprocess

    written = set()
    for page in PAGES:
        for command, _ in shown_outputs(page):
            words = shlex.split(command)
            written |= {b for a, b in zip(words, words[1:]) if a in ("-o", "--output", "--history")}
    at_root = sorted(name for name in written if "/" not in name)
    assert "small.safetensors" in at_root
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *at_root], cwd=ROOT, capture_output=True, text=True
    )
    ignored = set(result.stdout.split())
    assert ignored == set(at_root), f"not in .gitignore: {sorted(set(at_root) - ignored)}"
