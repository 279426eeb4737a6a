"""The `demo` preset: its corpus generator (deterministic, renders and parses back through the server's
tool-call parser), `train-demo` on a toy size (a few steps; the checkpoint loads and its training forward
equals the model's own), the shipped checkpoint (size, layout, `init-model --preset demo`), and a real
cluster on it answering through a tool, the README's agent SDK example included."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import REPO, local_cluster_spec

from k2serve.chat.parsers import OutputParser
from k2serve.chat.template import GENERATION_PROMPT, render_message
from k2serve.chat.tokenizer import load_tokenizer
from k2serve.cluster.local import LocalCluster
from k2serve.config import ModelConfig
from k2serve.model.checkpoint import write_checkpoint
from k2serve.model.demo_data import (
    ARITH_PHRASES,
    CHATS,
    CONVERT_PHRASES,
    COPY_DRILL_WEIGHTS,
    KIND_WEIGHTS,
    KINDS,
    TABLE_PHRASES,
    TWO_STEP_PHRASES,
    Sample,
    execute_tool,
    heldout_samples,
    render_sample,
    tool_spec,
    training_samples,
)
from k2serve.model.demo_model import DEMO_FILES, demo_model_dir
from k2serve.model.demo_train import (
    TrainConfig,
    build_model,
    demo_config,
    digit_ranks,
    digit_token_mask,
    save_checkpoint,
    train_demo,
    train_forward,
)
from k2serve.model.loader import load_model
from k2serve.model.presets import PRESETS

# A toy size of the demo architecture: a training step in milliseconds.
TOY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "n_routed_experts": 4,
}


def test_generator_is_deterministic_and_covers_every_kind() -> None:
    a, b = training_samples(120, seed=5), training_samples(120, seed=5)
    assert [(s.messages, s.tools) for s in a] == [(s.messages, s.tools) for s in b]
    assert [s.messages for s in training_samples(20, seed=6)] != [s.messages for s in a[:20]]
    assert {s.kind for s in a} == {k for k, w in zip(KINDS, KIND_WEIGHTS, strict=True) if w > 0}
    drills = training_samples(40, seed=5, kind_weights=COPY_DRILL_WEIGHTS)
    assert {s.kind for s in drills} == set(KINDS)
    for s in drills:
        if s.kind == "copy":  # the answer's numbers all occur in the question (a copy, nothing else)
            question, answer = s.messages[-2]["content"], s.messages[-1]["content"]
            assert re.findall(r"\d+", answer) and set(re.findall(r"\d+", answer)) <= set(
                re.findall(r"\d+", question)
            )


def test_heldout_set_has_no_copy_drills() -> None:
    assert "copy" not in {s.kind for s in heldout_samples(300)}
    # a mix from before the "copy" kind (6 weights) still works and draws no drill; bad mixes are named
    assert "copy" not in {s.kind for s in training_samples(100, kind_weights=(1, 1, 1, 1, 1, 1))}
    with pytest.raises(ValueError, match="kind weights"):
        training_samples(3, kind_weights=(1,) * (len(KINDS) + 1))
    with pytest.raises(ValueError, match="kind weights"):
        training_samples(3, kind_weights=(0,) * len(KINDS))


def test_heldout_phrasings_never_occur_in_training() -> None:
    for train, held in ARITH_PHRASES.values():
        assert not set(train) & set(held)
    held_questions = {m["content"] for s in heldout_samples(200) for m in s.messages if m["role"] == "user"}
    train_questions = {
        m["content"] for s in training_samples(2000) for m in s.messages if m["role"] == "user"
    }
    # The same question text can only come from a chat line shared by chance; none is.
    assert not held_questions & train_questions


def _template_regex(template: str) -> re.Pattern[str]:
    """A held-out template as a pattern: its words literal, each {placeholder} any text."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile("(.+?)".join(re.escape(p) for p in parts), re.IGNORECASE)


def test_varied_phrasings_are_new_shapes_never_a_heldout_template() -> None:
    """`train-demo --phrasings varied`: composed questions in many more shapes than the templates, the
    operands where the answer's calls say, and no held-out template inside any of them (searched, any
    case, with words before and after)."""
    varied = training_samples(3000, seed=1, varied=True)
    assert [s.messages for s in varied[:50]] == [
        s.messages for s in training_samples(50, seed=1, varied=True)
    ]
    questions = {m["content"] for s in varied for m in s.messages if m["role"] == "user"}

    def arith_shapes(samples: list[Sample]) -> set[str]:
        return {re.sub(r"\d+", "N", s.messages[-4]["content"]) for s in samples if s.kind == "arith"}

    assert len(arith_shapes(varied)) > 10 * len(arith_shapes(training_samples(3000, seed=1)))
    held = [t for _, ho in ARITH_PHRASES.values() for t in ho]
    held += CONVERT_PHRASES[1] + TABLE_PHRASES[1] + TWO_STEP_PHRASES[1]
    patterns = [_template_regex(t) for t in held]
    assert not [(q, p.pattern) for q in questions for p in patterns if p.search(q)]
    assert not {q for q, _ in CHATS[1]} & questions
    for s in varied:  # every operand of the first call is in the question, and the result is the tool's
        if s.kind in ("arith", "two_step"):
            question = s.messages[-len(s.messages) + (s.messages[0]["role"] == "system")]["content"]
            name, args = s.calls[0]
            assert {str(args["a"]), str(args["b"])} <= set(re.findall(r"\d+", question))
            assert s.expected == execute_tool(*s.calls[-1])


def test_table_rows_spell_names_as_the_reply_does() -> None:
    """A table row starts "| Name |", so the name is the same tokens as in the question and in the
    reasoning ("The row of Name says ..."): at a line start "Name" is often other tokens (" M" vs "M"),
    and the model found another row's value (12 of 25 held-out lookups right against 24 of 25)."""
    tok = load_tokenizer(demo_model_dir())
    samples = [s for s in heldout_samples(200) + training_samples(300, seed=4) if s.kind == "table"]
    assert len(samples) > 20
    for s in samples:
        (table,) = s.tables.values()
        header, *rows = table.splitlines()
        assert header.startswith("| ") and header.endswith(" |") and rows
        name = s.messages[-1]["reasoning_content"].removeprefix("The row of ").split(" says ")[0]
        row = next(r for r in rows if r.startswith(f"| {name} |"))
        assert row == f"| {name} | {s.expected} |"
        in_row = tok.encode(f"| {name} |")[1:-1]  # the name's tokens between "|" and " |"
        said = tok.encode(s.messages[-1]["reasoning_content"])
        assert any(said[i : i + len(in_row)] == in_row for i in range(len(said))), (name, in_row, said)


def test_assistant_turns_parse_back_with_the_tool_call_parser() -> None:
    """What the model learns to emit is what the server's parser reads: the calls with their
    arguments, the reasoning and the answer."""
    for s in training_samples(200, seed=1):
        names = [t["function"]["name"] for t in s.tools]
        calls = []
        for msg in (m for m in s.messages if m["role"] == "assistant"):
            text = render_message(msg, keep_reasoning=True).removeprefix(GENERATION_PROMPT)
            parsed = OutputParser(tool_names=names).parse(text.removesuffix("<|im_end|>"))
            assert parsed.reasoning == msg.get("reasoning_content", "")
            assert parsed.content == msg["content"]
            for call in parsed.tool_calls:
                assert call.valid_arguments and call.known and call.complete
                calls.append((call.name, json.loads(call.arguments)))
        assert calls == s.calls
        if s.kind in ("arith", "convert", "two_step", "table"):
            assert s.expected in s.messages[-1]["content"]
        if s.kind == "refuse":
            assert s.expected not in names  # the needed tool is not offered


def test_loss_mask_covers_exactly_the_assistant_turns(tmp_path: Path) -> None:
    from k2serve.model.demo_train import write_demo_tokenizer

    samples = training_samples(60, seed=2)
    tok = write_demo_tokenizer(tmp_path, samples, PRESETS["demo"]["vocab_size"] - 256)
    for s in samples:
        ids, mask = render_sample(tok, s)
        trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
        want = "".join(
            render_message(m, keep_reasoning=True).removeprefix(GENERATION_PROMPT)
            for m in s.messages
            if m["role"] == "assistant"
        )
        assert trained == want
    # every 1-3 digit string is one token: numbers copy token for token
    assert all(len(tok.encode(d.decode())) == 1 for d in digit_ranks()[::37])
    assert tok.encode("123 4567") == [tok.encode("123")[0], tok.encode(" ")[0], *tok.encode("4567")]


def test_train_demo_runs_on_a_toy_size(tmp_path: Path) -> None:
    lines: list[str] = []
    out = train_demo(
        TrainConfig(out_dir=str(tmp_path), steps=3, batch_size=2, num_samples=40, log_every=1, arch=TOY),
        log=lines.append,
    )
    rows = (out / "train_loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,tokens,seconds,digit_loss" and len(rows) == 4
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    assert all(0 < x < 20 for x in losses)
    digit = [float(r.split(",")[5]) for r in rows[1:]]  # nan only for a batch without a digit target
    assert any(0 < x < 20 for x in digit)
    assert any("step 3/3" in line for line in lines)
    for name in DEMO_FILES:
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["torch_dtype"] == "bfloat16"
    assert load_tokenizer(out).vocab_size == cfg["vocab_size"]
    load_model(out)  # the loader reads the layout (per-expert names, fp32 router bias)


def test_digit_token_mask_marks_exactly_the_digit_tokens() -> None:
    tok = load_tokenizer(demo_model_dir())
    mask = digit_token_mask(tok, PRESETS["demo"]["vocab_size"])
    assert int(mask.sum()) == 10 + 100 + 1000  # every 1-3 digit string is one rank, nothing else all-digit
    assert bool(mask[tok.encode("512")[0]]) and not bool(mask[tok.encode("a")[0]])
    assert not bool(mask[tok.num_ranks :].any())  # special tokens


def test_training_forward_equals_the_loaded_model(tmp_path: Path) -> None:
    """The training forward over the engine's modules and the checkpoint the loader reads compute the
    same logits (fp32 weights, so the comparison is exact up to summation order)."""
    cfg = demo_config(arch=TOY)
    model = build_model(ModelConfig.from_dict(cfg), seed=3)
    with torch.no_grad():
        for layer in model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 4))
    save_checkpoint(model, cfg, tmp_path, torch.float32)
    loaded = load_model(tmp_path)
    ids = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    at = torch.ones(2, 24, dtype=torch.bool)
    with torch.no_grad():
        trained = train_forward(model, ids, at)
    engine = loaded(ids).reshape(-1, cfg["vocab_size"])
    torch.testing.assert_close(trained, engine, rtol=1e-4, atol=1e-4)


def test_shipped_demo_checkpoint(tmp_path: Path) -> None:
    src = demo_model_dir()
    size = sum((src / f).stat().st_size for f in DEMO_FILES)
    assert size <= 30 << 20
    cfg = json.loads((src / "config.json").read_text())
    arch = {k: v for k, v in PRESETS["demo"].items() if k != "torch_dtype"}
    assert {k: cfg[k] for k in arch} == arch
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["topk_method"] == "noaux_tc"
    assert cfg["n_shared_experts"] == 1 and cfg["first_k_dense_replace"] == 1
    rows = (src / "train_loss.csv").read_text().splitlines()
    assert float(rows[-1].split(",")[1]) < float(rows[1].split(",")[1]) / 4  # it did learn
    out = write_checkpoint(tmp_path / "copy", "demo")
    for name in DEMO_FILES:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    with pytest.raises(ValueError, match="demo preset ships unquantised"):
        write_checkpoint(tmp_path / "q", "demo", quant="int4")
    package_data = (REPO / "pyproject.toml").read_text()  # a wheel carries every shipped file
    for pattern in ("model/demo/*.json", "model/demo/*.safetensors", "model/demo/tiktoken.model"):
        assert pattern in package_data


# ----- a real cluster on the demo model -------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = local_cluster_spec(
        demo_model_dir(),
        tmp_path_factory.mktemp("demo-cluster"),
        use_redis=True,
        engine_args=("--kv-cache-mb", "32"),
    )
    with LocalCluster(spec) as c:
        yield c


@pytest.mark.slow
def test_cluster_answers_through_a_tool(demo_cluster: LocalCluster) -> None:
    """A fixed question: the model calls `add` with the numbers, reads the result, answers with it."""
    url = demo_cluster.http_url + "/v1/chat/completions"
    messages: list[dict] = [{"role": "user", "content": "What is 2 + 3?"}]
    body = {"messages": messages, "tools": [tool_spec("add")], "temperature": 0, "max_tokens": 64}
    first = httpx.post(url, json=body, timeout=120).json()["choices"][0]
    assert first["finish_reason"] == "tool_calls", first
    (call,) = first["message"]["tool_calls"]
    assert call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 2, "b": 3}
    messages += [first["message"], {"role": "tool", "tool_call_id": call["id"], "content": "5"}]
    second = httpx.post(url, json=body | {"messages": messages}, timeout=120).json()["choices"][0]
    assert second["finish_reason"] == "stop"
    assert re.search(r"\b5\b", second["message"]["content"]), second


def readme_agent_example() -> str:
    """The README's agent SDK example (the python block that builds an AgentLoop)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    (block,) = [b for b in blocks if "AgentLoop(" in b]
    return block


@pytest.mark.slow
def test_readme_agent_example_adds_through_its_tool(demo_cluster: LocalCluster) -> None:
    code = readme_agent_example().replace("http://127.0.0.1:8000", demo_cluster.http_url)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the repository's own README
    result = scope["result"]
    assert result.stop_reason == "final"
    calls = [c for step in result.steps for c in step.tool_calls]
    assert [
        (c.name, json.loads(c.arguments) if isinstance(c.arguments, str) else c.arguments) for c in calls
    ][:1] == [("add", {"a": 2, "b": 3})]
    assert re.search(r"\b5(\.0)?\b", result.final_answer), result.final_answer
