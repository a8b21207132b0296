"""The output folder of every writer (prune, save, compress, decompress): checked before any work,
written as a temporary sibling and renamed into place at the end, so a failure leaves nothing
half-written. The files get the modes a plain file creation gets under the process umask
(``tempfile.mkdtemp`` makes its folder 0700, and safetensors writes 0600 whatever the umask).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPORT_FILE = "llmprune_report.json"


class OutputExistsError(FileExistsError):
    pass


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if ``output`` exists and may not be replaced."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} is a file; give a folder path")
    parent = next((p for p in out.absolute().parents if p.exists()), None)  # the nearest existing ancestor
    if parent is not None and not parent.is_dir():
        raise OutputExistsError(f"output {str(out)!r} lies under {str(parent)!r}, which is a file; give a folder path")
    if parent is not None:  # can we write there? (a probe folder, removed at once: nothing is left)
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".llmprune-probe-", dir=parent))
        except OSError as e:
            raise OutputExistsError(f"output {str(out)!r} cannot be created in {str(parent)!r} ({e.strerror}); "
                                    "choose another --output") from None
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {str(out)!r} already exists and is not empty; pass --overwrite "
            "(overwrite=True) to replace it, or choose another --output"
        )
    return out


def _umask() -> int:
    """The process umask; read from /proc where possible, since os.umask can only read it by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_permissions(folder: Path) -> None:
    """Folders ``0o777 & ~umask`` and files ``0o666 & ~umask`` (0755 / 0644 under the usual 022), as
    ``save_pretrained`` into a fresh folder gives its files written by ``open``."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for names, mode in ((dirs, 0o777), (files, 0o666)):
            for name in names:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, mode & ~mask)
    os.chmod(folder, 0o777 & ~mask)


@contextlib.contextmanager
def staged(dst: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder of ``dst`` to write into (``dst`` checked first: :func:`check_output`). When
    the block ends, its files get the umask's modes and it takes ``dst``'s place; when the block raises
    (Ctrl-C included), it is removed and ``dst`` stays as it was."""
    dst = check_output(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        _umask_permissions(tmp)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
