"""Load generation for serving benchmarks, usable without a cluster.

- `trace`: read an Azure LLM inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`) into arrivals.
- `prompts`: prompt text of a given token count, from ShareGPT or synthetic.
- `client`: one streamed OpenAI completion, timed (TTFT, time per output token, end to end).
- `replay`: an open-loop replayer: every request leaves at its arrival time, whatever the others do.
- `stats`: percentiles, tokens/s and goodput of a run.
- `inject`: the `--inject` fault plan (hot, pressure, kill) and its parser.
"""
