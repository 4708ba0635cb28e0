"""The demo's chat helpers: a question over gRPC (template rendered by the client) and over the OpenAI
HTTP front (rendered by the server) stream the same greedy answer."""

import io

from distserve_jax.models.tokenizer import load_tokenizer
from serving import demo


def test_grpc_and_http_chat_answers_agree(server, tiny_model):
    tok = load_tokenizer(tiny_model, bos_token_id=1, eos_token_ids=(2,))
    assert tok.chat_template  # the session model has one; both paths must apply it
    out_g, out_h = io.StringIO(), io.StringIO()
    by_grpc = demo.ask_grpc(server.address, tok, "Hello there", 8, out=out_g)
    by_http = demo.ask_http(server.http, "tiny-llama", "Hello there", 8, out=out_h)
    assert by_grpc == by_http
    assert out_g.getvalue() == by_grpc + "\n" and out_h.getvalue() == by_http + "\n"
    assert len(by_grpc) > 0
