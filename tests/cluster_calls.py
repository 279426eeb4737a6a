"""Greedy requests through a router as a client makes them (OpenAI HTTP and the public gRPC API),
returning the generated token ids: shared by the tests that compare a cluster with the offline engine."""

from __future__ import annotations

import openai

from k2serve.proto import api_pb2, api_pb2_grpc, common_pb2


async def http_greedy(
    client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int
) -> list[int]:
    """/v1/completions with token ids in and out (k2serve's `return_token_ids`), EOS ignored."""
    r = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    return list(r.choices[0].token_ids)  # type: ignore[attr-defined]  # k2serve's return_token_ids


async def grpc_greedy(stub: api_pb2_grpc.K2ServeStub, prompt: list[int], max_tokens: int) -> list[int]:
    """K2Serve.Generate, streamed, EOS ignored."""
    req = api_pb2.GenerateRequest(
        token_ids=api_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
    )
    out: list[int] = []
    async for chunk in stub.Generate(req):
        out += chunk.token_ids
    return out
