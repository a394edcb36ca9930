"""A minimal Markdown table (GitHub-flavoured), written by hand: it is ten lines, not worth a dependency."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Table:
    """Column headers and string cells; numeric-looking columns are right-aligned."""

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""  # a line printed under the table
    prose: bool = False  # every column left-aligned (tables of text, e.g. README's experiments)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells but the table has {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        def esc(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        align = [":---" if i == 0 or self.prose else "---:" for i in range(len(self.columns))]
        lines = ["| " + " | ".join(esc(c) for c in self.columns) + " |", "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.rows]
        if self.caption:
            lines += ["", self.caption]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:  # shown as a table in notebooks
        return self.markdown()
