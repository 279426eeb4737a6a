"""The small training corpus behind `bpe_train.write_tokenizer` (original text, written for k2serve).

It mixes English prose, chat and tool-call vocabulary, Python, JSON, shell and Chinese so that a
tiny tokenizer trained on it has merges for the strings tests and examples actually use. Editing
it changes every tokenizer written by `write_tokenizer`; keep it stable.
"""

CORPUS = r"""
You are Kimi, an AI assistant created by Moonshot AI.
The user asked a question and the assistant answered it. The system message sets the rules.
A tool is a function the assistant may call; the result of the tool comes back in a new turn.
What is the weather in Paris today? Let me check the weather for you.
The weather in Paris is sunny, with a high of 24 degrees and a light wind from the west.
Could you book a table for two at seven o'clock tonight? I'll look for a free table near you.
It's a small model, so the answers don't mean much, but the tokens still have to round-trip.
We're testing the server: every request must finish, and no block may be leaked or freed twice.
They've measured the throughput in tokens per second, for prefill and for decode separately.
Reasoning first, then the answer. Think step by step, and check each step before the next one.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
In the beginning, the scheduler picks the waiting requests; then the model runs one step;
then the outputs are appended, stop conditions are checked, and finished sequences are freed.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 64 100 128 256 512 1024 2048 4096 65536 163840.
Dates and times: 2024-05-17, 09:30, 12:00:00 UTC; version 1.2.3; price $19.99; 50% off!
Punctuation: (parentheses), [brackets], {braces}, "double quotes", 'single quotes', a/b, a\b,
a-b, a_b, a+b=c, a*b, a^b, a|b, a&b, a<b>c, #hash, @at, ~tilde, `code`, ... -- ; : ? !

def get_weather(city: str, unit: str = "celsius") -> dict:
    '''Return the current weather for a city.'''
    if not city:
        raise ValueError(f"empty city: {city!r}")
    return {"city": city, "temperature": 21.5, "unit": unit, "sunny": True}


class Scheduler:
    def __init__(self, max_batch: int) -> None:
        self.waiting: list[int] = []
        self.running: list[int] = []
        self.max_batch = max_batch

    def schedule(self) -> list[int]:
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.pop(0))
        return list(self.running)


for i in range(10):
    print(i, i * i, "even" if i % 2 == 0 else "odd")

import json
import torch

x = torch.randn(4, 8)  # [T, D]
y = torch.softmax(x @ x.T, dim=-1)  # [T, T]
print(json.dumps({"shape": list(y.shape), "sum": float(y.sum())}, ensure_ascii=False))

{"name": "get_weather", "description": "Get the current weather for a city",
 "parameters": {"type": "object", "properties": {"city": {"type": "string"},
 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}
{"type": "function", "function": {"name": "search", "arguments": "{\"query\": \"k2serve\"}"}}
{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help?"}
{"id": "functions.get_weather:0", "type": "function", "index": 0, "finish_reason": "tool_calls"}
{"model": "kimi-k2", "stream": true, "max_tokens": 128, "temperature": 0.6, "top_p": 0.95}
[1, 2, 3, 4.5, -6, true, false, null, "text", {"nested": {"deep": [[], {}]}}]
functions.get_weather:0 functions.search:1 functions.calculator:2 functions.read_file:3

$ pip install -e . && python -m pytest -q tests/
$ curl -s http://localhost:8000/v1/chat/completions -H "Content-Type: application/json"
$ git commit -m "Add the chat layer" && git push origin main
$ ls -la /tmp | grep log | wc -l

## Return of functions.get_weather:0
The tool returned an error: the city was not found. Please try another city name.

你好，我是Kimi，由月之暗面科技有限公司开发的人工智能助手。
今天北京的天气晴朗，最高气温二十五度，适合出门散步。
请帮我把这段话翻译成英文，并检查其中的语法错误。
模型先进行推理，然后给出答案；工具调用的结果会在下一轮返回。
我们需要一个高效、可靠的推理服务系统，支持长上下文和多轮对话。
机器学习是人工智能的一个分支，它让计算机从数据中学习规律。
这是一个测试句子，包含中文、English 和数字 123。

Ein kleiner Satz auf Deutsch. Une petite phrase en français, avec des accents: é è à ç ù.
Una frase en español con eñes y acentos: año, canción, corazón. Привет, мир! Γειά σου κόσμε.
こんにちは、世界。カタカナとひらがな。안녕하세요 세계. Emoji: 🙂 🚀 ✅ — and the end.
"""
