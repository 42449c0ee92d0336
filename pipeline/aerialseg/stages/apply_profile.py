"""`aerialseg apply-profile NAME` (not a DVC stage): merge a profile's keys into a params file, every other line,
comment and the layout kept (core.yamledit); the file replaced is kept as OUT.bak."""

from pathlib import Path

from aerialseg.core.config import load_params, load_profile
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_text
from aerialseg.core.yamledit import merged_text


def run(profile: str, out: Path, params: Path) -> str:
    """Write params + profile to ``out`` (an existing backup is never overwritten); returns the message."""
    load_params(params)  # the one-line errors of a missing or broken params file
    source, _ = load_profile(profile)
    text = merged_text(params.read_text(encoding="utf-8"), source.read_text(encoding="utf-8"), params, source)
    replaced = out.exists()
    if replaced:
        backup = out.with_name(out.name + ".bak")
        if backup.exists():
            raise AerialsegError("a backup from an earlier apply-profile exists", backup,
                                 "restore or remove it first, or pass --out elsewhere")
        backup.write_bytes(out.read_bytes())
    write_text(out, text)
    return f"wrote {out} (profile {source})" + (f"; previous file kept as {out.name}.bak" if replaced else "")
