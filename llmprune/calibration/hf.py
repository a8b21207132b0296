"""HF datasets as calibration sources: by name from the Hub (``"name[:config][:split]"``), or a
``datasets.Dataset`` given. Their records (``text_field``, or chat ``messages``) are sampled as documents.

:func:`load_hub_dataset` is the one place the package calls the Hub (the named sources use it too), so that
tests can simulate an unreachable Hub by patching this module's ``load_hub_dataset``.
"""

from __future__ import annotations

from typing import Any

from ..runtime.hub import hub_unreachable
from .common import CalibrationError
from .sampling import Docs, record_text


def load_hub_dataset(*args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset``; one seam so that tests can simulate an unreachable Hub. Without a network it
    fails at once (:func:`~llmprune.runtime.hub.hub_unreachable`), not after the Hub client's retries."""
    why = hub_unreachable()
    if why is not None:
        raise ConnectionError(f"no connection: {why}")
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def hf_docs(spec: str, text_field: str, tokenizer: Any) -> Docs:
    """The records of the HF dataset ``spec`` (``"name[:config][:split]"``, split ``train`` by default)."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise CalibrationError(f"HF dataset spec '{spec}' is not understood; write it as 'name[:config][:split]'")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        ds = load_hub_dataset(name, config, split=split)
    except Exception as exc:
        raise CalibrationError(
            f"could not load HF dataset '{spec}' (name={name!r}, config={config!r}, split={split!r}): "
            f"{type(exc).__name__}: {exc}. Check the name; if the Hub cannot be reached, save the data as a local "
            f".jsonl/.parquet file and pass its path"
        ) from exc
    columns = list(getattr(ds, "column_names", None) or [])
    if columns and text_field not in columns and "messages" not in columns:
        raise CalibrationError(
            f"HF dataset '{spec}' has no '{text_field}' or 'messages' column (columns: {', '.join(columns)}); "
            "choose the text column with --text-field"
        )
    return dataset_docs(ds, text_field, tokenizer, name=f"hf dataset {spec}")


def dataset_docs(ds: Any, text_field: str, tokenizer: Any, name: str) -> Docs:
    """Records of a ``datasets.Dataset``, read one row at a time (the C4 shard has 356k documents)."""

    def get(i: int) -> tuple[str, bool]:
        return record_text(ds[i], text_field, tokenizer, f"row {i} of {name}")

    return Docs(name=name, n=len(ds), get=get)


def is_hf_dataset(source: Any) -> bool:
    """A ``datasets.Dataset`` or ``IterableDataset`` (checked without importing ``datasets``)."""
    return type(source).__module__.startswith("datasets.") and hasattr(source, "column_names")


def is_text_dataset(source: Any) -> bool:
    """A map-style ``datasets.Dataset`` of text records (no ``input_ids`` column): sampled as documents.
    One with ``input_ids`` (or a streaming one) is read as pre-tokenized rows."""
    columns = getattr(source, "column_names", None) or []
    return (is_hf_dataset(source) and hasattr(source, "__getitem__") and hasattr(source, "__len__")
            and "input_ids" not in columns)
