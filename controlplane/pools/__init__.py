"""Resource pools: the store (etcd `/gpumesh/v1/pools/<name>`) and PoolService (docs/pools.md)."""
