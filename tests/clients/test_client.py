"""The project's Python client against a live server."""

from __future__ import annotations

import openai
import pytest

from tests.live import vec_values

MSGS = [{"role": "user", "content": "What is the capital of France?"}]




def test_python_client(server, tiny_lm, model_name):
    from clients import SteerClient, SteerServeError, steering

    url, _ = server
    with SteerClient(url) as c:
        assert c.ready() and c.models()[0]["id"] == model_name
        info = c.upload_vector("client-v", vec_values(tiny_lm, 9, layers=[0, 3]), description="from client")
        assert info["layers"] == [0, 3]
        assert any(v["name"] == "client-v" for v in c.list_vectors())
        with pytest.raises(SteerServeError) as exc:
            c.upload_vector("client-v", vec_values(tiny_lm, 9, layers=[0]))
        assert exc.value.status == 409
        ids = c.tokenize("Hello world")
        assert c.detokenize(ids) == "Hello world"
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = sdk.chat.completions.create(model=model_name, messages=MSGS, max_tokens=4, temperature=0,
                                        extra_body=steering({"name": "client-v", "scale": 2.0}))
        assert r.model_extra["steering"][0]["name"] == "client-v"
        c.delete_vector("client-v")
        with pytest.raises(SteerServeError) as exc:
            c.get_vector("client-v")
        assert exc.value.status == 404 and exc.value.type == "not_found_error"
