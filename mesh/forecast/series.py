"""Series from a CSV file for backtests: columns checked, time parsed, one regular series per group.

Times are Unix seconds (numbers) or date-time strings. Without `freq` every series must already be
regular (one step, no gaps, no duplicate times); with `freq` (a pandas offset: `1min`, `10min`, `1h`)
values are aggregated into bins of that width (`agg`: mean, sum, max, min, last, or count of rows). A
bin keeps its last raw value too (`Series.recent`, for the models that use the freshest sample) when the
aggregate is a mean, max or min. A
bin or step with no value is a gap: an error naming the series and where, unless `fill` says how to fill
it (`ffill`: the previous value; `zero`). Every problem is an InvalidArgument naming the column or series.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mesh.errors import FailedPrecondition, InvalidArgument

AGGREGATES = ("mean", "sum", "max", "min", "last", "count")
FILLS = ("none", "ffill", "zero")
MISSING_GROUP = {"", "None", "NULL", "null", "nan", "NaN"}


@dataclass
class Series:
    name: str
    times: np.ndarray          # datetime64[ns], one per value, evenly spaced
    values: np.ndarray         # float
    recent: np.ndarray | None = None   # with --freq and a mean/max/min: the last raw value in each bin


def _pandas():
    try:
        import pandas as pd
    except ImportError:
        raise FailedPrecondition("reading CSV series needs pandas: pip install 'gpumesh[forecast]'") from None
    return pd


def read_csv(path: str, time_col: str, value_col: str, group_col: str | None = None):
    pd = _pandas()
    if not os.path.isfile(path):
        raise InvalidArgument.of("csv", f"no such file {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise InvalidArgument.of("csv", f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InvalidArgument.of("csv", f"{path} is not a readable CSV file: {exc}") from None
    cols = [c for c in df.columns if not str(c).startswith("Unnamed:")]
    for flag, col in (("time-col", time_col), ("value-col", value_col), ("group-col", group_col)):
        if col is not None and col not in df.columns:
            raise InvalidArgument.of(flag, f"no column {col!r} in {path}", ", ".join(map(str, cols)))
    if df.empty:
        raise InvalidArgument.of("csv", f"{path} has a header but no rows")
    return df


def _times(pd, raw, path: str, time_col: str):
    text = raw.str.strip()
    nums = pd.to_numeric(text, errors="coerce")
    if nums.notna().all():
        return pd.to_datetime(nums, unit="s")
    if nums.notna().mean() > 0.5:       # Unix seconds with a stray value
        t = nums
    else:
        t = pd.to_datetime(text, errors="coerce", format="mixed")
    if t.isna().any():
        row = int(np.flatnonzero(t.isna().to_numpy())[0])
        raise InvalidArgument.of("time-col", f"{time_col!r} has a value that is not a time at row {row + 2} of "
                                             f"{path}: {raw.iloc[row]!r}")
    return t


def _values(pd, raw, path: str, value_col: str, flag: str = "value-col"):
    text = raw.str.strip()
    v = pd.to_numeric(text, errors="coerce")
    bad = v.isna() & ~text.isin(["", "nan", "NaN", "NA", "null", "NULL", "None"])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InvalidArgument.of(flag, f"{value_col!r} has a non-numeric value at row {row + 2} of {path}: "
                                              f"{raw.iloc[row]!r}")
    return v


def load(path: str, time_col: str, value_col: str, group_col: str | None = None, freq: str | None = None,
         agg: str = "mean", fill: str = "none", recent_col: str | None = None) -> list[Series]:
    """The CSV's series (one per group, sorted by name), each regular in time. `recent_col`: a column with
    the freshest reading at each row (its last value per bin with `freq`), kept as `Series.recent`."""
    pd = _pandas()
    if agg not in AGGREGATES:
        raise InvalidArgument.of("agg", f"unknown aggregate {agg!r}", ", ".join(AGGREGATES))
    if fill not in FILLS:
        raise InvalidArgument.of("fill", f"unknown fill {fill!r}", ", ".join(FILLS))
    offset = None
    if freq:
        try:
            offset = pd.tseries.frequencies.to_offset(freq)
            pd.Timedelta(offset)
        except ValueError:
            raise InvalidArgument.of("freq", f"not a fixed frequency: {freq!r}", "e.g. 1s, 1min, 10min, 1h") from None
    df = read_csv(path, time_col, value_col, group_col)
    if recent_col is not None and recent_col not in df.columns:
        raise InvalidArgument.of("recent-col", f"no column {recent_col!r} in {path}", ", ".join(map(str, df.columns)))
    frame = pd.DataFrame({"t": _times(pd, df[time_col], path, time_col),
                          "v": _values(pd, df[value_col], path, value_col) if agg != "count" else 1.0})
    if recent_col is not None:
        frame["r"] = _values(pd, df[recent_col], path, recent_col, "recent-col").to_numpy()
    if group_col:
        groups = df[group_col].str.strip()
        frame = frame[~groups.isin(MISSING_GROUP)]
        frame["g"] = groups[frame.index]
        if frame.empty:
            raise InvalidArgument.of("group-col", f"{group_col!r} is empty on every row of {path}")
    else:
        frame["g"] = value_col
    out = []
    for name, part in frame.groupby("g", sort=True):
        out.append(_regular(pd, str(name), part, offset, agg, fill))
    return out


RECENT_AGGREGATES = ("mean", "max", "min")


def _regular(pd, name: str, part, offset, agg: str, fill: str) -> Series:
    s = part.set_index("t")["v"].sort_index()
    given = part.set_index("t")["r"].sort_index() if "r" in part else None
    recent = given
    if offset is not None:
        s = s.dropna() if agg != "count" else s
        if s.empty:
            raise InvalidArgument.of("series", f"{name!r} has no values")
        binned = s.resample(offset)
        if given is not None:
            recent = given.dropna().resample(offset).last()
        elif agg in RECENT_AGGREGATES:
            recent = binned.last()
        if agg == "sum":
            s = binned.sum(min_count=1)       # a bin with no rows is a gap, not 0
        else:
            s = getattr(binned, agg)()
        if agg == "count":
            s = s.astype(float)              # a bin with no rows is 0 requests, not a gap
    else:
        if s.index.has_duplicates:
            dup = s.index[s.index.duplicated()][0]
            raise InvalidArgument.of("series", f"{name!r} has two values at {dup}; give --freq to aggregate them")
        if len(s) >= 2:
            step = pd.Series(s.index).diff().dropna().min()
            s = s.reindex(pd.date_range(s.index[0], s.index[-1], freq=step))
    missing = s.isna().to_numpy()
    if missing.all():
        raise InvalidArgument.of("series", f"{name!r} has no values")
    if missing.any():
        if fill == "none":
            where = s.index[int(np.flatnonzero(missing)[0])]
            raise InvalidArgument.of("series", f"{name!r} has a gap: {int(missing.sum())} missing step(s), the first "
                                               f"at {where}; give --fill ffill|zero (or a coarser --freq)")
        s = s.ffill().bfill() if fill == "ffill" else s.fillna(0.0)
    if recent is not None:
        recent = recent[~recent.index.duplicated(keep="last")]
        recent = (recent.ffill().bfill() if fill != "zero" else recent.fillna(0.0)).reindex(s.index)
        recent = recent.to_numpy(dtype=float) if recent.notna().all() else None
    return Series(name, s.index.to_numpy(), s.to_numpy(dtype=float), recent)


def step_seconds(series: Series) -> float:
    if len(series.times) < 2:
        return 0.0
    return float((series.times[1] - series.times[0]) / np.timedelta64(1, "s"))
