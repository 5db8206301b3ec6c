"""The OpenAI-compatible endpoints of ``peftlab serve``, driven by the official ``openai`` client against a running
uvicorn server: each answer is compared with the model run directly (greedy, or sampled under the same seed)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
import torch
from test_serve import PROMPTS, Running, alone, build_folders

from peftlab.commands.serve import ServedModel, create_app
from peftlab.mixed import BASE

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
MESSAGES = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "a dog ran in the"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny GPT-2 of test_serve.py (its tokenizer given a chat template) with an HRA and a LoRA adapter."""
    from transformers import AutoTokenizer

    folders = build_folders(tmp_path_factory.mktemp("openai"))
    tokenizer = AutoTokenizer.from_pretrained(folders / "lm")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folders / "lm")
    return ServedModel.load(str(folders / "lm"), {"hra": folders / "hra", "lora": folders / "lora"})


@pytest.fixture(scope="module")
def server(served):
    running = Running(create_app(served, max_batch_size=8, max_wait_ms=300))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def chat_text() -> str:
    return "system: the cat\nuser: a dog ran in the\nassistant:"


def token_count(served: ServedModel, text: str) -> int:
    return len(served.tokenizer(text)["input_ids"])


def sampled(served: ServedModel, adapter: str, prompt: str, max_tokens: int, temperature: float, top_p: float,
            seed: int) -> str:
    """``prompt`` continued by HF ``generate`` sampling alone under ``torch.manual_seed(seed)`` (reference)."""
    ids = served.tokenizer(prompt, return_tensors="pt")
    served.model.set_adapter(adapter)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = served.model.generate(**ids, max_new_tokens=max_tokens, do_sample=True, temperature=temperature,
                                    top_p=top_p, top_k=0, pad_token_id=served.tokenizer.pad_token_id,
                                    eos_token_id=served.tokenizer.eos_token_id)
    tokens = out[0, ids["input_ids"].shape[1]:].tolist()
    eos = served.tokenizer.eos_token_id
    return served.tokenizer.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens, skip_special_tokens=True)


def test_models_completion_and_chat_answer_what_the_model_gives_alone(served, client):
    assert [m.id for m in client.models.list()] == [served.name, "hra", "lora"]
    completion = client.completions.create(model="hra", prompt="the cat", max_tokens=6, temperature=0)
    assert completion.choices[0].text == alone(served, "hra", "the cat", 6)
    usage = completion.usage
    assert usage.prompt_tokens == token_count(served, "the cat") and usage.total_tokens == usage.prompt_tokens + \
        usage.completion_tokens
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.model == "hra"
    base = client.completions.create(model=served.name, prompt="red green blue and", max_tokens=5, temperature=0)
    assert base.choices[0].text == alone(served, BASE, "red green blue and", 5)
    chat = client.chat.completions.create(model="lora", messages=MESSAGES, max_tokens=7, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == alone(served, "lora", chat_text(), 7)
    assert chat.usage.prompt_tokens == token_count(served, chat_text())


def test_stop_strings_cut_the_text_before_the_first_one(served, client):
    full = alone(served, "hra", "one two", 12)
    stop = full[3:5]
    assert stop.strip() and full.find(stop) >= 0
    cut = client.completions.create(model="hra", prompt="one two", max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="hra", prompt="one two", max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.find(stop)]


def test_streamed_chunks_join_to_the_non_streamed_text(served, client):
    for prompt in PROMPTS[:2]:
        whole = client.completions.create(model="lora", prompt=prompt, max_tokens=10, temperature=0)
        chunks = list(client.completions.create(model="lora", prompt=prompt, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it did come in pieces
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    whole = client.chat.completions.create(model="hra", messages=MESSAGES, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="hra", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None


def test_seeded_sampling_is_reproducible_and_matches_generate(served, client):
    options = {"model": "lora", "prompt": "a dog", "max_tokens": 12, "temperature": 0.9, "top_p": 0.8}
    first = client.completions.create(**options, seed=7).choices[0].text
    assert client.completions.create(**options, seed=7).choices[0].text == first
    assert first == sampled(served, "lora", "a dog", 12, 0.9, 0.8, seed=7)
    others = {client.completions.create(**options, seed=s).choices[0].text for s in (8, 9, 10)}
    assert others != {first}  # the seed matters
    streamed = client.completions.create(**options, seed=7, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == first


def test_concurrent_clients_on_different_adapters_get_their_own_answers(served, server):
    jobs = [(model, prompt) for model in ("hra", "lora", served.name) for prompt in PROMPTS]
    expected = [alone(served, BASE if m == served.name else m, p, 6) for m, p in jobs]
    assert len(set(expected[:4]) & set(expected[4:8])) < 4  # the adapters answer differently

    def ask(job):
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
            return client.completions.create(model=job[0], prompt=job[1], max_tokens=6, temperature=0)

    before = httpx.get(server.url + "/health").json()["largest_batch"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert [a.choices[0].text for a in answers] == expected
    assert [a.model for a in answers] == [m for m, _ in jobs]
    assert max(before, httpx.get(server.url + "/health").json()["largest_batch"]) > 1  # they ran batched


def test_errors_have_openai_shape_and_status(served, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="a", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert "'hra'" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="hra", prompt="a", n=2)
    assert err.value.body["param"] == "n" and "n=1" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="hra", messages=MESSAGES, temperature=3)
    assert err.value.body["param"] == "temperature" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="hra", prompt="the cat " * 300, max_tokens=16)
    assert err.value.body["code"] == "context_length_exceeded"
    surrogate = httpx.post(f"{client.base_url}chat/completions", timeout=60,
                           content=b'{"model": "hra", "messages": [{"role": "user", "content": "a \\ud800"}]}',
                           headers={"content-type": "application/json"})
    assert surrogate.status_code == 400 and "lone surrogate" in surrogate.json()["error"]["message"]
    empty_system = [{"role": "system", "content": ""}, MESSAGES[1]]  # an empty message is allowed
    chat = client.chat.completions.create(model="hra", messages=empty_system, max_tokens=3, temperature=0)
    assert chat.choices[0].message.content == alone(served, "hra", "system: \nuser: a dog ran in the\nassistant:", 3)


def test_api_key_is_required_when_set(served):
    running = Running(create_app(served, api_key="s3cret"))
    try:
        with openai.OpenAI(base_url=running.url + "/v1", api_key="wrong", max_retries=0, timeout=60) as client:
            with pytest.raises(openai.AuthenticationError) as err:
                client.models.list()
            assert err.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                client.completions.create(model="hra", prompt="a", max_tokens=2)
        missing = httpx.post(running.url + "/v1/completions", json={"model": "hra", "prompt": "a"}, timeout=60)
        assert missing.status_code == 401 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
        with openai.OpenAI(base_url=running.url + "/v1", api_key="s3cret", max_retries=0, timeout=60) as client:
            answer = client.completions.create(model="hra", prompt="the cat", max_tokens=3, temperature=0)
            assert answer.choices[0].text == alone(served, "hra", "the cat", 3)
    finally:
        running.stop()
