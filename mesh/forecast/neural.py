"""A small LSTM forecaster (seed 000): direct multi-step forecasts of the change from the last value.

Input: the last `window` points and, when the series has a season, the values one season before each
target step, all relative to the last value and divided by the history's standard deviation. Output: the
`h` changes from the last value, so an untrained or unsure network falls back to persistence. Training is
bounded: at most `max_windows` of the latest windows, `epochs` passes, one CPU thread, a fixed seed,
and no global torch state touched (fork_rng). In a rolling-origin backtest the network is retrained
every `refit_every` steps and otherwise only sees the new history (`update`), which keeps the backtest
honest (nothing after the origin) and affordable.
"""

from __future__ import annotations

import numpy as np

from mesh.errors import FailedPrecondition


def _torch():
    try:
        import torch
    except ImportError:
        raise FailedPrecondition("model lstm needs torch: pip install 'gpumesh[torch]'") from None
    return torch


class LSTMForecaster:
    name = "lstm"

    def __init__(self, horizon: int = 1, window: int = 32, hidden: int = 32, epochs: int = 40, max_windows: int = 2048,
                 seed: int = 0, threads: int = 1, refit_every: int = 0) -> None:
        self.window, self.hidden, self.epochs = window, hidden, epochs
        self.max_windows, self.seed, self.threads = max_windows, seed, threads
        self.refit_every = refit_every       # 0: the backtest chooses (ten horizons)
        self._net = None
        self._h = horizon

    # -- features ------------------------------------------------------------------------------------------
    def _features(self, y: np.ndarray, t: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs for a forecast made after y[t-1]: (window relative to the last value, seasonal lags)."""
        last = y[t - 1]
        w = y[t - self.window:t] - last
        if self._season > 1:
            idx = np.arange(t, t + h) - self._season
            idx = np.where(idx < t, idx, idx - self._season * ((idx - t) // self._season + 1))
            lags = y[idx] - last
        else:
            lags = np.zeros(h)
        return w / self._sd, lags / self._sd

    def _min_len(self, h: int) -> int:
        return self.window + (self._season if self._season > 1 else 0) + h + 1

    # -- protocol ------------------------------------------------------------------------------------------
    def fit(self, y: np.ndarray, season: int) -> "LSTMForecaster":
        torch = _torch()
        y = np.asarray(y, dtype=float)
        self._season = season if 1 < season < len(y) // 3 else 1
        self._sd = float(np.std(y)) or 1.0
        self._y = y
        starts = list(range(self.window + (self._season if self._season > 1 else 0), len(y) - self._h + 1))
        starts = starts[-self.max_windows:]
        if len(starts) < 16:
            self._net = None          # too little history: persistence
            return self
        xs, ls, ts = [], [], []
        for t in starts:
            w, lag = self._features(y, t, self._h)
            xs.append(w)
            ls.append(lag)
            ts.append((y[t:t + self._h] - y[t - 1]) / self._sd)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                self._net = _Net(torch, self.hidden, self._h)
                self._train(torch, np.array(xs), np.array(ls), np.array(ts))
            finally:
                torch.set_num_threads(threads)
        return self

    def update(self, y: np.ndarray) -> "LSTMForecaster":
        """New history, same weights (between retrains in a backtest)."""
        self._y = np.asarray(y, dtype=float)
        return self

    def predict(self, h: int) -> np.ndarray:
        y = self._y
        last = float(y[-1])
        if self._net is None or h > self._h or len(y) < self.window + self._season + 1:
            return np.full(h, last)
        torch = _torch()
        w, lag = self._features(np.concatenate([y, np.zeros(self._h)]), len(y), self._h)
        with torch.no_grad():
            d = self._net(torch.tensor(w[None, :, None], dtype=torch.float32),
                          torch.tensor(lag[None, :], dtype=torch.float32)).numpy()[0]
        return last + d[:h] * self._sd

    # -- training ------------------------------------------------------------------------------------------
    def _train(self, torch, xs, ls, ts) -> None:
        x = torch.tensor(xs[:, :, None], dtype=torch.float32)
        lag = torch.tensor(ls, dtype=torch.float32)
        target = torch.tensor(ts, dtype=torch.float32)
        opt = torch.optim.Adam(self._net.parameters(), lr=5e-3)
        n, batch = len(x), 128
        for _ in range(self.epochs):
            perm = torch.randperm(n)
            for i in range(0, n, batch):
                b = perm[i:i + batch]
                opt.zero_grad()
                loss = torch.nn.functional.l1_loss(self._net(x[b], lag[b]), target[b])
                loss.backward()
                opt.step()


def _Net(torch, hidden: int, h: int):
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(1, hidden, batch_first=True)
            self.head = torch.nn.Linear(hidden + h, h)

        def forward(self, x, lag):
            _, (hn, _) = self.lstm(x)
            return self.head(torch.cat([hn[-1], lag], dim=1))

    return Net()
