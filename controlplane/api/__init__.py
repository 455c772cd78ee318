"""The gRPC API of the control plane: servicers, their plumbing (errors, auth, watch fan-out) and metrics."""
