"""``d2moe serve`` (vLLM's OpenAI server) on a d2moe checkpoint, through the OpenAI client."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from conftest import ENGINE_ENV, PROMPTS

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], log_path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vllm_d2moe.cli", "serve", *args],
        env={**os.environ, **ENGINE_ENV},
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def server(model_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    template = tmp / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = _free_port()
    model = str(model_zoo["mixtral"]["d2moe"])
    log = tmp / "server.log"
    proc = _serve(
        [model, "--quantization", "d2moe", "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.3",
         "--enforce-eager", "--chat-template", str(template)],
        log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"server not healthy after 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused"), model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_completion_matches_offline_engine(server, engine_results):
    client, model = server
    reply = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    offline = engine_results["mixtral/d2moe-8"]["outputs"][0]["text"]
    assert reply.choices[0].text == offline


def test_chat_completion(server):
    client, model = server
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a parser."}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


def test_invalid_width_option_stops_the_server(model_zoo, tmp_path):
    overrides = json.dumps({"quantization_config": {"quant_method": "d2moe", "bits": 9}})
    proc = _serve([str(model_zoo["mixtral"]["d2moe"]), "--hf-overrides", overrides], tmp_path / "log")
    assert proc.wait(timeout=300) != 0
    assert "d2moe option 'bits' must be an integer in [1, 8], got 9" in (tmp_path / "log").read_text()
