"""Models on slices, the math usable without a cluster.

- `mesh.models.vram`: the VRAM a variant needs at a context length and concurrency (weights + KV cache +
  the backend's runtime overhead), the KV-cache bytes per token from the architecture, and the smallest
  slice (MIG profile or MPS share) of each GPU model that holds a need.
- `mesh.models.artifact`: where an artifact is (path or file:// URI) and whether it is what its backend
  loads (GGUF magic; a Hugging Face directory with config.json and weights), plus the facts of a
  Hugging Face directory's config.json. Needs nothing beyond the standard library.
- `mesh.models.ggufinfo`: the facts of a GGUF file (architecture, context, heads, quantization, tensor
  bytes) read with the `gguf` package (the `serving` extra).
"""
