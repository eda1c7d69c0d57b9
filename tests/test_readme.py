"""The README's generated parts and links: the supported-pipelines table is `postdiff pipelines`'s output, every
page it links exists, and its two commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from postdiff.cli import app
from postdiff.families import supported_pipelines

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _table_in_readme() -> str:
    match = re.search(r"<!-- pipelines:start -->\n(.*?)\n<!-- pipelines:end -->", README, re.S)
    assert match, "the README has no generated pipelines table"
    return match.group(1)


def test_the_pipelines_table_is_the_registrys():
    result = CliRunner().invoke(app, ["pipelines"])
    assert result.exit_code == 0, result.output
    assert _table_in_readme() == result.output.strip()
    for pipeline in supported_pipelines():
        assert f"| `{pipeline}` |" in result.output


def test_every_linked_page_exists_and_the_readme_is_short():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links
    for link in links:
        assert (ROOT / link).exists(), link
    assert len(README.splitlines()) <= 200


def test_every_docs_page_links_only_what_exists():
    for page in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name}: {link}"


def test_the_readme_test_command_is_what_ci_runs():
    command = README.splitlines()[4]
    ci = (ROOT / ".ci" / "run").read_text()
    assert command.startswith("bash scripts/setup.sh && ")
    assert command.removeprefix("bash scripts/setup.sh && ") in ci
