"""Forecasters behind one small protocol: `fit(y, season)` then `predict(h)`.

Every forecaster is a plain object with no global state, so a caller can fit one in a thread or a
process (`concurrent.futures`) and keep the control plane's event loop free. `y` is a 1-D float array
with no gaps (one value per step), `season` the number of steps in one season (1 = none), `h` the
number of steps ahead; `predict` returns `h` points.

The statistical models come from `statsforecast` (the `gpumesh[forecast]` extra): exponential smoothing
(`AutoETS`), a damped additive trend, simple exponential smoothing (`ses`), AutoTheta (`theta`), AutoCES
(`ces`), and `MSTL` (a seasonal decomposition whose deseasonalised part is
forecast by AutoETS), which handles long seasons such as 144 ten-minute steps a day. The naive forecasts
and the local models (`latest`, `linear`: mesh.forecast.local) need only numpy; the LSTM
(`mesh.forecast.neural`) needs torch (`gpumesh[torch]`).
"""

from __future__ import annotations

import warnings
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from mesh.errors import FailedPrecondition

# AutoETS's own seasonal search is slow for long seasons (seconds per fit at 24, more beyond): longer
# seasons are left to MSTL, and `ets` fits a non-seasonal AutoETS there.
ETS_MAX_SEASON = 24


@runtime_checkable
class Forecaster(Protocol):
    """What every model offers. `name` is its registry name."""

    name: str

    def fit(self, y: np.ndarray, season: int) -> "Forecaster":
        """Learn from the history `y` (oldest first); returns self."""

    def predict(self, h: int) -> np.ndarray:
        """The next `h` points after the history given to `fit`."""


def fit_model(model: Forecaster, y: np.ndarray, season: int, recent: np.ndarray | None = None) -> Forecaster:
    """`model.fit(y, season)`, passing `recent` (the last raw sample in each bin, aligned with `y`) to the
    models that use it (`uses_recent`)."""
    if recent is not None and getattr(model, "uses_recent", False):
        return model.fit(y, season, recent=recent)
    return model.fit(y, season)


class Naive:
    """The last value, repeated: the persistence forecast every model must beat."""

    name = "naive"

    def fit(self, y: np.ndarray, season: int) -> "Naive":
        self._last = float(y[-1])
        return self

    def predict(self, h: int) -> np.ndarray:
        return np.full(h, self._last)


class SeasonalNaive:
    """The value one season ago (the last season repeated): the baseline MASE is measured against."""

    name = "snaive"

    def fit(self, y: np.ndarray, season: int) -> "SeasonalNaive":
        m = season if 1 < season <= len(y) else 1
        self._last_season = np.asarray(y[-m:], dtype=float)
        return self

    def predict(self, h: int) -> np.ndarray:
        reps = -(-h // len(self._last_season))
        return np.tile(self._last_season, reps)[:h]


def _statsforecast():
    try:
        from statsforecast import models
    except ImportError:
        raise FailedPrecondition("this model needs statsforecast: pip install 'gpumesh[forecast]'") from None
    return models


class _StatsModel:
    """A statsforecast model built per fit (their objects keep the fitted state)."""

    name = ""

    def _build(self, season: int):
        raise NotImplementedError

    def fit(self, y: np.ndarray, season: int) -> "_StatsModel":
        self._model = self._build(season if season > 1 and len(y) >= 2 * season else 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._model.fit(np.asarray(y, dtype=float))
        return self

    def predict(self, h: int) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self._model.predict(h)["mean"]
        return np.asarray(out, dtype=float)


class ETS(_StatsModel):
    """AutoETS: exponential smoothing, error/trend/season chosen by AICc (seasonal up to 24 steps)."""

    name = "ets"

    def _build(self, season: int):
        m = _statsforecast()
        return m.AutoETS(season_length=season) if season <= ETS_MAX_SEASON else m.AutoETS(model="ZZN")


class DampedTrend(_StatsModel):
    """Holt's additive trend with damping (ETS(A,Ad,N)): a trend that flattens out with the horizon."""

    name = "damped"

    def _build(self, season: int):
        return _statsforecast().AutoETS(model="AAN", damped=True)


class MSTL(_StatsModel):
    """MSTL: the season taken out by STL, the rest forecast by AutoETS (no seasonal term), the season
    added back. Falls back to plain AutoETS when the history holds fewer than two seasons."""

    name = "mstl"

    def _build(self, season: int):
        m = _statsforecast()
        if season <= 1:
            return m.AutoETS(model="ZZN")
        return m.MSTL(season_length=season, trend_forecaster=m.AutoETS(model="ZZN"))


class SES(_StatsModel):
    """Simple exponential smoothing with its weight fitted (ETS(A,N,N)): the level, with the noise of the
    last few steps averaged away; a flat forecast."""

    name = "ses"

    def _build(self, season: int):
        return _statsforecast().SimpleExponentialSmoothingOptimized()


class Theta(_StatsModel):
    """AutoTheta: the theta method (a drift line and exponentially smoothed level, combined), the variant
    chosen by in-sample error, on the deseasonalised series when the season tests significant (seasons up
    to ETS_MAX_SEASON; longer ones non-seasonal)."""

    name = "theta"

    def _build(self, season: int):
        return _statsforecast().AutoTheta(season_length=season if season <= ETS_MAX_SEASON else 1)


class CES(_StatsModel):
    """AutoCES: complex exponential smoothing (level and a "potential" component, no explicit trend),
    seasonal for seasons up to ETS_MAX_SEASON."""

    name = "ces"

    def _build(self, season: int):
        return _statsforecast().AutoCES(season_length=season if season <= ETS_MAX_SEASON else 1)


class Croston(_StatsModel):
    """Croston's method with its smoothing weights optimised (CrostonOptimized): for intermittent demand,
    the size of the non-zero values and the interval between them smoothed apart; a flat forecast of
    their ratio."""

    name = "croston"

    def _build(self, season: int):
        return _statsforecast().CrostonOptimized()


class TSB(_StatsModel):
    """Teunter-Syntetos-Babai: the probability of a non-zero value updated every step (so a stretch of
    zeros lowers the forecast, which Croston's method does not) times the smoothed non-zero size; weights
    0.1 and 0.1, the common choice in the intermittent-demand literature."""

    name = "tsb"

    def _build(self, season: int):
        return _statsforecast().TSB(alpha_d=0.1, alpha_p=0.1)


class ADIDA(_StatsModel):
    """ADIDA: the series aggregated into buckets of the mean interval between non-zero values, forecast by
    SES, and disaggregated: intermittency removed by temporal aggregation."""

    name = "adida"

    def _build(self, season: int):
        return _statsforecast().ADIDA()


class IMAPA(_StatsModel):
    """IMAPA: ADIDA over several aggregation levels, averaged."""

    name = "imapa"

    def _build(self, season: int):
        return _statsforecast().IMAPA()


def _lstm(horizon: int) -> Forecaster:
    from mesh.forecast.neural import LSTMForecaster
    return LSTMForecaster(horizon=horizon)


def _local():
    from mesh.forecast import local
    return local


# name -> factory(horizon); each call gives a fresh, unfitted model. Only the LSTM, a direct multi-step
# model, needs the horizon before it is fitted.
REGISTRY: dict[str, Callable[[int], Forecaster]] = {
    "naive": lambda h: Naive(),
    "snaive": lambda h: SeasonalNaive(),
    "ets": lambda h: ETS(),
    "damped": lambda h: DampedTrend(),
    "mstl": lambda h: MSTL(),
    "ses": lambda h: SES(),
    "theta": lambda h: Theta(),
    "ces": lambda h: CES(),
    "croston": lambda h: Croston(),
    "tsb": lambda h: TSB(),
    "adida": lambda h: ADIDA(),
    "imapa": lambda h: IMAPA(),
    "latest": lambda h: _local().Latest(),
    "linear": lambda h: _local().DirectLinear(),
    "lstm": _lstm,
}
BASELINES = ("naive", "snaive")
DEFAULT_MODELS = ("naive", "snaive", "damped", "mstl")


def rolling_points(name: str, y: np.ndarray, origins: np.ndarray, h: int, season: int, cap: int,
                   recent: np.ndarray | None = None) -> np.ndarray | None:
    """The forecasts of a model that only copies past values (`naive`, `snaive`, `latest`) from every origin
    at once: row i is what fitting on y[max(0, o - cap):o] (o = origins[i]) and predicting h steps gives,
    the same numbers. None for the other models (they are fitted per origin)."""
    o = np.asarray(origins, dtype=np.int64)[:, None]
    k = np.arange(h)[None, :]
    if name == "naive" or (name == "latest" and recent is None):
        return np.asarray(y, dtype=float)[o - 1 + 0 * k]
    if name == "latest":
        return np.asarray(recent, dtype=float)[o - 1 + 0 * k]
    if name == "snaive":
        have = np.minimum(o, cap)                               # the history's length at each origin
        m = np.where((season > 1) & (season <= have), season, 1)
        return np.asarray(y, dtype=float)[o - m + k % m]
    return None


def make(name: str, horizon: int = 1) -> Forecaster:
    """A fresh forecaster by registry name, for forecasts up to `horizon` steps."""
    from mesh.errors import InvalidArgument
    if name not in REGISTRY:
        raise InvalidArgument.of("models", f"unknown model {name!r}", ", ".join(REGISTRY))
    return REGISTRY[name](horizon)
