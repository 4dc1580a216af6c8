"""The ext_proc servicer in-process with grpcio-testing: real messages, no network."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import grpc_testing
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness.messages import headers_request, two_route_policy

from extproc.server.calls import Services
from extproc.server.metrics import Metrics
from extproc.server.servicer import ExternalProcessor

SERVICE = pb.DESCRIPTOR.services_by_name["ExternalProcessor"]
METHOD = SERVICE.methods_by_name["Process"]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[grpc_testing.Server, Metrics, dict[str, str]]:
    source, names = two_route_policy(tmp_path)
    metrics = Metrics()
    servicer = ExternalProcessor(Services(source, metrics))
    server = grpc_testing.server_from_dictionary(
        {SERVICE: servicer}, grpc_testing.strict_real_time()
    )
    return server, metrics, names


def exchange(
    server: grpc_testing.Server, request: pb.ProcessingRequest
) -> tuple[pb.ProcessingResponse, grpc.StatusCode]:
    """One request in; the one answer and how the server ended the stream."""
    rpc = server.invoke_stream_stream(METHOD, (), None)
    rpc.send_request(request)
    answer = pb.ProcessingResponse.FromString(rpc.take_response())
    _metadata, code, _details = rpc.termination()
    return answer, code


def test_no_credential_gets_the_key_in_raw_value_and_the_stream_ends(setup) -> None:
    server, metrics, names = setup
    answer, code = exchange(server, headers_request(names["paid"], [("accept", b"*/*")]))
    [header] = answer.request_headers.response.header_mutation.set_headers
    assert (header.header.key, header.header.raw_value, header.header.value) == (
        "x-api-key",
        b"server-key",
        "",
    )
    assert header.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert code is grpc.StatusCode.OK  # closed right after the headers answer
    meta = answer.dynamic_metadata.fields["credential_gateway"].struct_value.fields
    assert (
        meta["credential_source"].string_value == "injected"
        and meta["route"].string_value == "paid"
    )
    assert metrics.decisions.labels("paid", "injected", "")._value.get() == 1


def test_oauth_bearer_is_left_untouched(setup) -> None:
    server, _, names = setup
    answer, _ = exchange(
        server, headers_request(names["paid"], [("authorization", b"Bearer sk-ant-oat01-x")])
    )
    assert answer.HasField("request_headers")
    assert not answer.request_headers.HasField("response")
    meta = answer.dynamic_metadata.fields["credential_gateway"].struct_value.fields
    assert meta["credential_source"].string_value == "client"


def test_blank_client_header_is_removed_when_injecting(setup) -> None:
    server, _, names = setup
    answer, _ = exchange(server, headers_request(names["paid"], [("authorization", b"  ")]))
    mutation = answer.request_headers.response.header_mutation
    assert list(mutation.remove_headers) == ["authorization"]
    assert mutation.set_headers[0].header.raw_value == b"server-key"


def test_missing_optional_secret_answers_401_json_without_forwarding(setup) -> None:
    server, metrics, names = setup
    answer, _ = exchange(server, headers_request(names["unpaid"]))
    reply = answer.immediate_response
    assert reply.status.code == 401
    body = json.loads(reply.body)
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert metrics.decisions.labels("unpaid", "rejected", "")._value.get() == 1


def test_an_unknown_route_fails_closed_with_503_and_is_counted(setup) -> None:
    server, metrics, _ = setup
    answer, code = exchange(server, headers_request("paid-00000000", [("accept", b"*/*")]))
    assert answer.immediate_response.status.code == 503
    assert code is grpc.StatusCode.OK
    assert metrics.decisions.labels("paid-00000000", "unknown_route", "")._value.get() == 1


def test_no_route_is_left_to_envoy_and_a_client_header_names_no_route(setup) -> None:
    server, _, names = setup
    answer, _ = exchange(
        server, headers_request("", [("host", names["paid"].encode()), ("x-route", b"paid")])
    )
    assert answer.HasField("request_headers") and not answer.request_headers.HasField("response")
    assert not answer.HasField("dynamic_metadata")


def test_other_phases_get_a_valid_pass_through_and_the_stream_stays_open(setup) -> None:
    server, _, _ = setup
    rpc = server.invoke_stream_stream(METHOD, (), None)
    rpc.send_request(pb.ProcessingRequest(response_headers=pb.HttpHeaders()))
    assert pb.ProcessingResponse.FromString(rpc.take_response()).HasField("response_headers")
    rpc.send_request(pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x")))
    assert pb.ProcessingResponse.FromString(rpc.take_response()).HasField("request_body")
    rpc.requests_closed()
    assert rpc.termination()[1] is grpc.StatusCode.OK


def test_a_message_with_no_phase_is_a_grpc_error_not_an_empty_answer(setup) -> None:
    server, _, _ = setup
    rpc = server.invoke_stream_stream(METHOD, (), None)
    rpc.send_request(pb.ProcessingRequest())
    _metadata, code, details = rpc.termination()
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "no phase" in details
