"""docs/BENCHMARKS.md holds one section per benchmark script ("## CPU", "## GPU"); each run
replaces only its own section, so the other machine's figures stay."""

from pathlib import Path


def write_section(path, heading, body):
    """Replace the `## {heading}` section (up to the next "## " heading) with `body`, or append it."""
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == f"## {heading}"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.write_text(text)
