"""``peftlab serve`` with a real HTTP client (httpx2) against a running uvicorn server: concurrent requests for
different adapters give what the model gives each prompt alone with that adapter active, 404 / 422 / 400 answers,
and a clean shutdown (in a thread, and the CLI in a subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest
import torch
from conftest import save_tiny_classifier, save_tiny_lm

from peftlab import HRAConfig, LoraConfig, get_adapter_model
from peftlab.base_models import load_causal_lm, load_classifier
from peftlab.commands.serve import ServedModel, create_app
from peftlab.mixed import BASE

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four five six", "red green blue"] * 10
PROMPTS = ["the cat", "a dog ran in the", "one two", "red green blue and"]
SRC = Path(__file__).resolve().parents[1] / "src"


def perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_((0.5 if "classifier" in name else 0.3) * torch.randn(p.shape, generator=g))


def build_folders(root: Path) -> Path:
    """A tiny GPT-2 with an HRA and a LoRA adapter, and a tiny BERT classifier with two LoRA adapters."""
    save_tiny_lm(root / "lm", TEXTS, vocab_size=300)
    save_tiny_classifier(root / "cls")
    lm_configs = {"hra": HRAConfig(r=2, target_modules=["c_attn", "c_fc"]),
                  "lora": LoraConfig(r=2, target_modules=["c_attn", "c_proj"])}
    for seed, (name, config) in enumerate(lm_configs.items()):
        model = get_adapter_model(load_causal_lm(str(root / "lm"))[0], config)
        perturb(model, seed)
        model.save_pretrained(root / name)
    for seed, name in enumerate(["pos", "neg"]):
        config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
        model = get_adapter_model(load_classifier(str(root / "cls"), 2)[0], config)
        perturb(model, 10 + seed)
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build_folders(tmp_path_factory.mktemp("serve"))


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class Running:
    """A uvicorn server in a thread, on a free port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def alone(served: ServedModel, adapter, prompt: str, max_new_tokens: int, num_beams: int = 1) -> str:
    """The continuation of ``prompt`` alone (no padding) with ``adapter`` active, as independent reference."""
    model, tokenizer = served.model, served.tokenizer
    ids = tokenizer(prompt, return_tensors="pt")
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        if adapter == BASE:
            with model.disable_adapter():
                out = model.generate(**ids, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        else:
            model.set_adapter(adapter)
            out = model.generate(**ids, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    tokens = out[0, ids["input_ids"].shape[1]:].tolist()
    tokens = tokens[:tokens.index(eos)] if eos in tokens else tokens
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_generation_server(folders):
    served = ServedModel.load(str(folders / "lm"), {"hra": folders / "hra", "lora": folders / "lora"})
    adapters = ["hra", "lora", BASE, ["hra", "lora"]]
    jobs = [(a, p, 6 + (i % 2), 1 + 2 * (i % 3 == 0)) for i, (a, p) in
            enumerate((a, p) for a in adapters for p in PROMPTS)]
    expected = [alone(served, a, p, n, beams) for a, p, n, beams in jobs]
    assert expected[0:4] != expected[8:12] and expected[4:8] != expected[8:12]  # each adapter changes the text

    running = Running(create_app(served, max_batch_size=8, max_wait_ms=300))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            def post(job):
                a, p, n, beams = job
                return client.post("/generate", json={"adapter": a, "prompt": p, "max_new_tokens": n,
                                                      "num_beams": beams})

            with ThreadPoolExecutor(len(jobs)) as pool:
                responses = list(pool.map(post, jobs))
            assert [r.status_code for r in responses] == [200] * len(jobs)
            assert [r.json()["text"] for r in responses] == expected
            health = client.get("/health").json()
            assert health["status"] == "ok" and health["requests"] == len(jobs)
            assert health["largest_batch"] > 1  # concurrent requests ran together
            listed = client.get("/adapters").json()
            assert listed["task"] == "generate" and listed["adapters"]["hra"]["method"] == "hra"

            unknown = client.post("/generate", json={"adapter": "nope", "prompt": "the"})
            assert unknown.status_code == 404
            assert "no adapter named 'nope'" in unknown.json()["detail"] and "'hra', 'lora'" in unknown.json()["detail"]
            malformed = client.post("/generate", content=b'{"adapter": "hra", "prompt": ', headers={
                "content-type": "application/json"})
            assert malformed.status_code == 422
            assert client.post("/generate", json={"adapter": "hra"}).status_code == 422  # no prompt
            zero = {"adapter": "hra", "prompt": "a", "max_new_tokens": 0}
            assert client.post("/generate", json=zero).status_code == 422
            assert client.post("/classify", json={"adapter": "hra", "text": "a"}).status_code == 400
    finally:
        running.stop()
    assert not running.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(running.url + "/health", timeout=2)


def classifier_expectations(served: ServedModel, requests: list) -> list[torch.Tensor]:
    """Softmax scores of each text alone with its adapter active (or disabled), as independent reference."""
    expected = []
    with torch.no_grad():
        for a, t in requests:
            batch = served.tokenizer(t, return_tensors="pt")
            if a == BASE:
                with served.model.disable_adapter():
                    expected.append(served.model(**batch).logits.softmax(-1)[0])
            else:
                served.model.set_adapter(a)
                expected.append(served.model(**batch).logits.softmax(-1)[0])
    return expected


def check_classified(responses, expected, id2label) -> None:
    for response, probs in zip(responses, expected, strict=True):
        assert response.status_code == 200, response.text
        scores = list(response.json()["scores"].values())
        torch.testing.assert_close(torch.tensor(scores), probs, rtol=0, atol=1e-5)
        assert response.json()["label"] == id2label[int(probs.argmax())]


def test_classifier_server(folders):
    served = ServedModel.load(str(folders / "cls"), {"pos": folders / "pos", "neg": folders / "neg"})
    texts = ["a fine film", "the plot was long and slow", "music"]
    requests = [(a, t) for a in ("pos", "neg", BASE) for t in texts]
    expected = classifier_expectations(served, requests)
    assert not torch.allclose(expected[0], expected[3], atol=1e-3)  # the two adapters differ
    running = Running(create_app(served, max_batch_size=16, max_wait_ms=300))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client, ThreadPoolExecutor(len(requests)) as pool:
            responses = list(pool.map(lambda r: client.post("/classify", json={"adapter": r[0], "text": r[1]}),
                                      requests))
            check_classified(responses, expected, served.model.config.id2label)
            assert client.get("/health").json()["largest_batch"] > 1
            assert client.post("/generate", json={"adapter": "pos", "prompt": "a"}).status_code == 400
            composed = client.post("/classify", json={"adapter": ["pos", "neg"], "text": "a"})
            assert composed.status_code == 422 and "cannot be composed" in composed.json()["detail"]
    finally:
        running.stop()
    assert not running.thread.is_alive()


def test_command_line_server_starts_answers_and_stops_on_sigint(folders):
    """``peftlab serve`` in a subprocess: answers as the in-process model does; SIGINT shuts it down cleanly."""
    served = ServedModel.load(str(folders / "cls"), {"pos": folders / "pos", "neg": folders / "neg"})
    expected = classifier_expectations(served, [("neg", "a fine film")])
    port = free_socket().getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "peftlab.cli", "serve", "--model", str(folders / "cls"), "--adapter",
           f"pos={folders / 'pos'}", "--adapter", f"neg={folders / 'neg'}", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "peftlab serve did not start in 90 s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        response = httpx.post(url + "/classify", json={"adapter": "neg", "text": "a fine film"}, timeout=60)
        check_classified([response], expected, served.model.config.id2label)
        assert sorted(httpx.get(url + "/adapters").json()["adapters"]) == ["neg", "pos"]
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "Application shutdown complete" in output


def test_command_line_refuses_bad_adapter_flags(folders, capsys):
    from peftlab.cli import main

    assert main(["serve", "--model", str(folders / "cls"), "--adapter", "pos"]) == 2
    assert "expected NAME=FOLDER" in capsys.readouterr().err
    assert main(["serve", "--model", str(folders / "cls"), "--adapter", f"x={folders / 'missing'}"]) == 2
    assert "is not a folder" in capsys.readouterr().err
