"""Trace replay: the control plane's scheduler over the Alibaba `openb` traces, without gRPC or
etcd (`meshctl sim`). See docs/scheduler.md for the protocol and how to reproduce the figures."""
