"""The client's receive limit admits the largest response the server sends."""

from __future__ import annotations

from service.server import MAX_MESSAGE_BYTES
from service.tls import client_options


def test_the_client_accepts_the_largest_response_the_server_sends() -> None:
    options = dict(client_options())
    assert options["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES
