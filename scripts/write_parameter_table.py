"""Write the README's parameter table from the field declarations (pipelines/fields.py).

Usage: python scripts/write_parameter_table.py   (tests/test_fields.py checks it is current)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.form import TABLE_END, TABLE_START, parameter_table  # noqa: E402


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        sys.exit(f"README.md has no parameter table markers ({TABLE_START} ... {TABLE_END})")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    readme.write_text(
        f"{head}{TABLE_START}\n{parameter_table()}\n{TABLE_END}{tail}", encoding="utf-8"
    )
    print("README.md: parameter table written")


if __name__ == "__main__":
    main()
