"""Generated documentation stays equal to the code it is rendered from."""

from __future__ import annotations

from hdkd.cli import main
from hdkd.config import all_keys, render_markdown
from tests.conftest import REPO


def test_configuration_page_matches_dataclasses():
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == render_markdown(), "re-render: python -m hdkd config --markdown > docs/configuration.md"


def test_configuration_page_lists_every_key(capsys):
    assert main(["config", "--markdown"]) == 0
    page = capsys.readouterr().out
    assert page == render_markdown()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    keys = [row.split("`")[1] for row in rows]
    assert keys == all_keys()
