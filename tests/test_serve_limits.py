"""``peftlab serve`` under bad or hostile input: one bad request never fails another, prompts beyond the model's
context and oversized bodies are refused before they are queued, every malformed body is a 422, the API key,
and one SIGTERM stopping a server in the middle of a long generation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest
import torch
from test_serve import SRC, Running, alone, build_folders, free_socket

from peftlab import LoraConfig, get_adapter_model
from peftlab.commands.serve import ServedModel, create_app
from peftlab.commands.serve_model import Batcher

LONE_SURROGATE = b'{"adapter": "hra", "prompt": "the \\ud800 cat", "max_new_tokens": 4}'  # JSON escape, not UTF-8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build_folders(tmp_path_factory.mktemp("serve-limits"))


@pytest.fixture(scope="module")
def lm(folders):
    return ServedModel.load(str(folders / "lm"), {"hra": folders / "hra", "lora": folders / "lora"})


def test_a_bad_request_never_fails_the_others_in_its_batch(lm):
    good = [("hra", "the cat"), ("lora", "a dog ran in the"), ("hra", "red green blue and")]
    expected = [alone(lm, a, p, 4) for a, p in good]
    bodies = [{"json": {"adapter": a, "prompt": p, "max_new_tokens": 4}} for a, p in good]
    bodies += [{"content": LONE_SURROGATE, "headers": {"content-type": "application/json"}},
               {"json": {"adapter": "lora", "prompt": "", "max_new_tokens": 4}}]
    running = Running(create_app(lm, max_batch_size=8, max_wait_ms=500))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client, ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: client.post("/generate", **body), bodies))
            assert [r.status_code for r in responses] == [200, 200, 200, 422, 422], [r.text for r in responses]
            assert [r.json()["text"] for r in responses[:3]] == expected
            assert "lone surrogate" in responses[3].text and "prompt is empty" in responses[4].text
            alone_empty = client.post("/generate", json={"adapter": "hra", "prompt": ""})
            assert alone_empty.status_code == 422 and "prompt is empty" in alone_empty.text
            assert client.get("/health").json()["requests"] == 3  # the bad ones never reached the queue
    finally:
        running.stop()


def test_batcher_runs_a_failing_batch_again_one_by_one():
    """A batch that fails inside the model is retried row by row: only the failing row gets the error."""
    def run(kind: str, items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("the model cannot take 'bad'")
        return [item.upper() for item in items]

    async def main():
        batcher = Batcher(run, max_batch_size=8, max_wait_ms=200)
        worker = asyncio.create_task(batcher.work())
        results = await asyncio.gather(*(batcher.submit("k", x) for x in ["a", "bad", "c"]), return_exceptions=True)
        worker.cancel()
        return results, batcher.stats

    results, stats = asyncio.run(main())
    assert results[0] == "A" and results[2] == "C", results
    assert isinstance(results[1], ValueError)
    assert stats["batches"] == 1 and stats["largest_batch"] == 3  # they did run as one batch first


JSON_HEADER = {"content-type": "application/json"}


def test_malformed_bodies_answer_422(lm):
    running = Running(create_app(lm))
    json_header = JSON_HEADER
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            nan = client.post("/generate", content=b'{"adapter": "hra", "prompt": "a", "max_new_tokens": NaN}',
                              headers=json_header)
            assert nan.status_code == 422 and "NaN" in nan.json()["detail"]
            not_utf8 = client.post("/generate", content=b'{"adapter": "hra", "prompt": "\xff\xfe"}',
                                   headers=json_header)
            assert not_utf8.status_code == 422 and "UTF-8" in not_utf8.json()["detail"]
            surrogate = client.post("/generate", content=LONE_SURROGATE, headers=json_header)
            assert surrogate.status_code == 422 and "lone surrogate" in surrogate.text
    finally:
        running.stop()


def test_oversized_bodies_answer_413(lm):
    running = Running(create_app(lm, max_body_bytes=2000))
    json_header = JSON_HEADER
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            big = {"adapter": "hra", "prompt": "a" * 3000}
            assert client.post("/generate", json=big).status_code == 413
            chunked = client.post("/generate", content=iter([b'{"adapter": "hra", "prompt": "', b"a" * 3000, b'"}']),
                                  headers=json_header)  # no Content-Length: refused while reading
            assert chunked.status_code == 413 and "--max-body-bytes" in chunked.json()["detail"]
            assert client.post("/generate", json={"adapter": "hra", "prompt": "a" * 100}).status_code == 200
    finally:
        running.stop()


def test_a_prompt_beyond_the_context_is_refused_before_it_is_queued(lm, folders):
    context = lm.model.config.n_positions
    fits = " ".join(["the cat"] * 400)
    prompt = lm.tokenizer.decode(lm.tokenizer(fits)["input_ids"][:context - 5])
    assert len(lm.tokenizer(prompt)["input_ids"]) == context - 5
    running = Running(create_app(lm))
    try:
        with httpx.Client(base_url=running.url, timeout=120) as client:
            too_long = client.post("/generate", json={"adapter": "hra", "prompt": prompt, "max_new_tokens": 6})
            assert too_long.status_code == 422 and f"context of {context} positions" in too_long.json()["detail"]
            assert client.get("/health").json()["requests"] == 0
            at_limit = client.post("/generate", json={"adapter": "hra", "prompt": prompt, "max_new_tokens": 5})
            assert at_limit.status_code == 200, at_limit.text
    finally:
        running.stop()
    classifier = ServedModel.load(str(folders / "cls"), {"pos": folders / "pos"})
    running = Running(create_app(classifier))
    try:  # BERT with 64 positions; its tokenizer alone would allow 512
        response = httpx.post(running.url + "/classify", json={"adapter": "pos", "text": "a fine film " * 40},
                              timeout=60)
        assert response.status_code == 422 and "context of 64 positions" in response.json()["detail"]
    finally:
        running.stop()


def test_api_key_guards_every_endpoint_but_health(lm):
    running = Running(create_app(lm, api_key="s3cret"))
    body = {"adapter": "hra", "prompt": "the cat", "max_new_tokens": 2}
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            assert client.post("/generate", json=body).status_code == 401
            wrong = client.post("/generate", json=body, headers={"authorization": "Bearer s3cre"})
            assert wrong.status_code == 401 and "--api-key" in wrong.json()["detail"]
            assert client.get("/adapters").status_code == 401
            assert client.get("/health").status_code == 200
            right = client.post("/generate", json=body, headers={"authorization": "Bearer s3cret"})
            assert right.status_code == 200 and right.json()["text"] == alone(lm, "hra", "the cat", 2)
    finally:
        running.stop()


def test_port_out_of_range_is_a_one_line_error(folders, capsys):
    from peftlab.cli import main

    assert main(["serve", "--model", str(folders / "cls"), "--adapter", f"pos={folders / 'pos'}",
                 "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "'70000' is not a port" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def save_long_context_lm(folders, root) -> None:
    """A 1-layer GPT-2 with 8192 positions (the tiny LM's tokenizer) and a LoRA adapter: 4096 greedy tokens take
    tens of seconds on a CPU."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(folders / "lm")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=1, vocab_size=len(tokenizer), n_positions=8192,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(root / "long")
    tokenizer.save_pretrained(root / "long")
    adapter = get_adapter_model(model, LoraConfig(r=2, target_modules=["c_attn"]))
    adapter.save_pretrained(root / "long-lora")


def test_one_sigterm_stops_the_server_in_the_middle_of_a_long_generation(folders, tmp_path):
    save_long_context_lm(folders, tmp_path)
    port = free_socket().getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PEFTLAB_API_KEY": "k3y"}
    cmd = [sys.executable, "-m", "peftlab.cli", "serve", "--model", str(tmp_path / "long"), "--adapter",
           f"lora={tmp_path / 'long-lora'}", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, answer = f"http://127.0.0.1:{port}", {}
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "peftlab serve did not start in 90 s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:  # open without the key
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"adapter": "lora", "prompt": "the cat", "max_new_tokens": 4096}
        assert httpx.post(url + "/generate", json=body, timeout=30).status_code == 401  # PEFTLAB_API_KEY is set

        def long_request():
            answer["response"] = httpx.post(url + "/generate", json=body, headers={"authorization": "Bearer k3y"},
                                            timeout=300)

        client = threading.Thread(target=long_request)
        client.start()
        while httpx.get(url + "/health", timeout=60).json()["requests"] == 0:  # the generation has begun
            assert time.monotonic() < deadline + 60 and client.is_alive(), "the request never started"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # one signal only
        output, _ = proc.communicate(timeout=120)
        client.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert "Application shutdown complete" in output
    response = answer["response"]
    assert response.status_code == 503 and "shutting down" in response.json()["detail"], response.text
