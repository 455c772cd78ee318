"""Where a replayed request's token counts come from: the trace, or ShareGPT's conversations.

`trace` (the default) keeps the Azure trace's `ContextTokens` and `GeneratedTokens`. `sharegpt` keeps the
trace's arrival times and takes each request's prompt and token counts from a ShareGPT exchange, the way
vLLM's serving benchmark does (`benchmark_serving.py --dataset-name sharegpt`): the prompt is the first human
turn, the output length is the token count of the assistant's reply to it, and exchanges whose prompt or
reply has fewer than 4 tokens are skipped. Both counts are then capped to the model's context as the trace's
are (`trace.cap_tokens`), and the prompt is cut to its capped count.

Why both: the only Azure trace here is the code trace, whose answers are short (median 13 generated tokens);
chat answers are much longer (ShareGPT's median reply is a few hundred tokens), and a long answer is what a
fault can cut mid-stream.
"""

from __future__ import annotations

from mesh.errors import InvalidArgument
from mesh.loadgen.prompts import Tokenizer
from mesh.loadgen.trace import Arrival, cap_tokens

SOURCES = ("trace", "sharegpt")
MIN_TOKENS = 4          # vLLM's benchmark drops exchanges whose prompt or reply is shorter


def sharegpt_requests(arrivals: list[Arrival], exchanges: list[tuple[str, str]], tokenizer: Tokenizer, *,
                      max_context: int, max_output: int | None = None) -> tuple[list[Arrival], list[str]]:
    """The arrivals with their token counts from `exchanges` (taken in order, skipping the short ones, and
    cycled if there are fewer than arrivals), and the prompts to send, cut to the capped context tokens."""
    usable = []
    for question, answer in exchanges:
        q, a = tokenizer.count(question), tokenizer.count(answer)
        if q >= MIN_TOKENS and a >= MIN_TOKENS:
            usable.append((question, q, a))
        if len(usable) >= len(arrivals):
            break
    if arrivals and not usable:
        raise InvalidArgument.of("lengths", f"no ShareGPT exchange has {MIN_TOKENS} or more tokens each way",
                                 "a dataset with conversations")
    out: list[Arrival] = []
    prompts: list[str] = []
    for i, arrival in enumerate(arrivals):
        question, q, a = usable[i % len(usable)]
        ctx, gen = cap_tokens(q, a, max_context, max_output)
        out.append(Arrival(arrival.index, arrival.at_s, ctx, gen))
        prompts.append(tokenizer.truncate(question, ctx))
    return out, prompts
