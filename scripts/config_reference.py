"""Write docs/config.md, the reference of every floe.yml key, from the config models.

Run it after changing a config model: `.venv/bin/python scripts/config_reference.py`
(tests/test_config_reference.py fails while the page is out of date)."""

from pathlib import Path

from floe.configref import render

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    target.write_text(render())
    print(f"wrote {target}")
