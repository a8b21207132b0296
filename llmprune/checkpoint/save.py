"""What ``save_pruned`` does to a checkpoint folder after the weights and metadata are written."""

from __future__ import annotations

from pathlib import Path

from .compressed import compress_in_place


def finish_checkpoint(folder: str | Path, save_format: str = "dense") -> None:
    """Convert ``folder`` (still the temporary folder being written) to ``save_format`` and write
    its model card; the card is made last, from what the folder then holds."""
    from .card import write_card

    if save_format == "compressed":
        compress_in_place(folder)
    elif save_format != "dense":
        raise ValueError(f"save_format {save_format!r} is unknown; choose one of: dense, compressed")
    write_card(folder)
