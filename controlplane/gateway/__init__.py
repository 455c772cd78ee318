"""mesh-gateway: the OpenAI-compatible, GPU-aware inference gateway in front of the deployments' replicas
(docs/gateway.md). Modules by responsibility: config, view (follows the control plane by watch), auth,
validate, policy (routing plugins), breaker, stats, admission (slots and the priority queue), cache, proxy
(to the backends), metrics, gpuapi (seed 003's /v1/gpu/*), app (the HTTP routes), main (the daemon)."""
