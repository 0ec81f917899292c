"""Arrow table → one 2-D NumPy array, the shape training code wants (rows × selected columns)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa


def table_to_numpy(table: pa.Table) -> np.ndarray:
    """Copy the columns of ``table`` into one C-ordered array (a row per record), in a single pass.

    Only integer, floating-point and boolean columns without nulls convert (``ValueError`` otherwise);
    the dtype is NumPy's common type of the columns.
    """
    import pyarrow.types as patypes

    if table.num_columns == 0:
        raise ValueError("no columns selected")
    for field, column in zip(table.schema, table.columns, strict=True):
        if not (patypes.is_integer(field.type) or patypes.is_floating(field.type) or patypes.is_boolean(field.type)):
            raise ValueError(f"column {field.name!r} has type {field.type}; only numeric or boolean columns convert")
        if column.null_count:
            raise ValueError(f"column {field.name!r} has nulls; fill or drop them before converting")
    dtype = np.result_type(*(field.type.to_pandas_dtype() for field in table.schema))
    out = np.empty((table.num_rows, table.num_columns), dtype=dtype)
    for index, column in enumerate(table.columns):
        start = 0
        for chunk in column.chunks:
            out[start : start + len(chunk), index] = chunk.to_numpy(zero_copy_only=False)
            start += len(chunk)
    return out
