"""The README is a front page and the docs site is whole: the README's length, no development history in
the README, docs, package or configs, every docs page in mkdocs.yml's nav (and every nav entry a page), and
every relative link in the README and the docs pointing at a file that exists."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 250
HISTORY = re.compile(r"issue [0-9]|this session|last session|first pass|second pass|third pass", re.IGNORECASE)
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".json", ".html", ".js", ".css", ".txt", ".toml"}
# [text](target) and ![alt](target); a target may carry a "title" or a #fragment
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def history_lines(paths: list[Path]) -> list[str]:
    """'path:line: text' for every line of the text files under `paths` that reads as development history."""
    found = []
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            if path.suffix not in TEXT_SUFFIXES or any(p == "__pycache__" or p.endswith(".egg-info")
                                                       for p in path.parts):
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if HISTORY.search(line):
                    found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{n}: "
                                 f"{line.strip()[:100]}")
    return found


def relative_links(markdown: str) -> list[str]:
    """The link targets of `markdown` that are paths in the repository (no URL, no bare #fragment), fragment
    removed; links inside fenced code blocks are not links."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(page: Path) -> list[str]:
    return [t for t in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]


def nav_pages(nav: list) -> list[str]:
    """Every page path named in an mkdocs nav (nested sections included)."""
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += nav_pages(value)
        elif isinstance(value, str) and not re.match(r"^[a-z]+://", value):
            pages.append(value)
    return pages


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_no_development_history_in_readme_docs_src_configs():
    found = history_lines([ROOT / "README.md", DOCS, ROOT / "src", ROOT / "configs"])
    assert found == [], "development history:\n" + "\n".join(found)


def test_the_history_check_finds_history(tmp_path):
    (tmp_path / "a.md").write_text("fine\nAs in Issue 15, we ...\nthe Second Pass\n")
    (tmp_path / "b.png").write_bytes(b"issue 1")  # not a text file
    found = history_lines([tmp_path])
    assert [f.split(":")[1] for f in found] == ["2", "3"]


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == sorted(nav), "a page is in the nav twice"
    assert [p for p in pages if p not in nav] == [], "docs pages missing from mkdocs.yml's nav"
    assert [p for p in nav if not (DOCS / p).is_file()] == [], "nav entries with no page"


def test_every_relative_link_in_the_readme_and_docs_exists():
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    broken = {str(p.relative_to(ROOT)): b for p in pages if (b := broken_links(p))}
    assert broken == {}, f"links to missing files: {broken}"


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a) ![img](gone.png) [web](https://x.org/y) [top](#here)\n"
                    "```\n[in code](missing.md)\n```\n")
    assert broken_links(page) == ["gone.png"]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_the_readme_python_runs_as_written(tmp_path, monkeypatch):
    """Every Python block of the README runs as written, in order; `runs/demo` is a tiny run of the demo's
    data made here (2 steps), so the blocks that load it find one."""
    from ditkit.config import build_config
    from ditkit.train import train

    monkeypatch.chdir(tmp_path)
    train(build_config(None, {"data": "mnist", "image_size": 8, "patch_size": 4, "hidden_size": 32, "depth": 1,
                              "num_heads": 2, "steps": 2, "batch_size": 4, "out": "runs/demo",
                              "precision": "fp32", "sample": {"steps": 2}}), progress=False)
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 (our own README)
    assert (tmp_path / "g.png").is_file()  # the Pipeline block saved its grid
