"""The control plane's state: etcd (server, TLS client, store, group-commit writer, key layout) and the in-memory fleet view
(fleet, with its nodes in nodeentry and GPUs in gpustate)."""
