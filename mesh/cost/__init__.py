"""What GPU capacity costs: a price per GPU-hour per GPU model, apportioned to slices by their share."""

from mesh.cost.prices import PriceTable, slice_cost_per_hour, slice_share

__all__ = ["PriceTable", "slice_cost_per_hour", "slice_share"]
