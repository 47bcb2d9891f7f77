"""Print (or write into README.md) the configuration reference generated from aenode.config.

``python scripts/config_reference.py --write`` refreshes the block between the
``config-reference`` markers; the test suite checks that the block is current.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aenode.config import Settings  # noqa: E402

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def _type_name(annotation: Any) -> str:
    text = str(annotation) if getattr(annotation, "__args__", None) else annotation.__name__
    for noise in ("typing.", "pathlib.", "aenode.config.", "aenode.select.spec."):
        text = text.replace(noise, "")
    return text.replace("NoneType", "None")


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(_rows(ann, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        elif isinstance(default, Path):
            default = str(default)
        desc = (field.description or "").replace("|", "\\|")
        typ = _type_name(ann).replace("|", "\\|")
        rows.append(f"| `{key}` | `{typ}` | `{default!r}` | {desc} |")
    return rows


def reference() -> str:
    """The Markdown table of every setting with its type and default."""
    lines = ["| key | type | default | notes |", "|---|---|---|---|"]
    lines.extend(_rows(Settings, ""))
    return "\n".join(lines)


def main() -> int:
    block = f"{START}\n{reference()}\n{END}"
    if "--write" in sys.argv:
        readme = ROOT / "README.md"
        text = readme.read_text()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(head + block + tail)
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
