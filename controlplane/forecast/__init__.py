"""Prediction in the control plane (docs/prediction.md): the history it keeps (history.py, fed by
recorder.py) and ForecastService over it (service.py, forecasting.py). The math is mesh/forecast/."""
