"""Build the ext_proc answers; the policy serialises them once per config load.

Header values go in ``raw_value`` only: Envoy sends values there and takes
them from there; a ``value``-only mutation arrives upstream empty and setting
both is an error. Every answer carries dynamic metadata (route, credential
source) for the access log.
"""

from __future__ import annotations

import json
from types import MappingProxyType

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc.decision import Outcome
from extproc.model import ErrorStyle

METADATA_NAMESPACE = "credential_gateway"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _metadata(route: str, outcome: Outcome) -> struct_pb2.Struct:
    meta = struct_pb2.Struct()
    meta.update(
        {
            METADATA_NAMESPACE: {
                "route": route,
                "credential_source": outcome.credential_source,
                "outcome": outcome.value,
            }
        }
    )
    return meta


def pass_through(route: str, outcome: Outcome) -> ext_proc.ProcessingResponse:
    """Leave the request exactly as the client sent it."""
    return ext_proc.ProcessingResponse(
        request_headers=ext_proc.HeadersResponse(), dynamic_metadata=_metadata(route, outcome)
    )


def inject(
    route: str, header: str, value: bytes, remove: tuple[str, ...] = ()
) -> ext_proc.ProcessingResponse:
    """Set ``header`` (replacing every copy) and drop the blank headers in ``remove``."""
    mutation = ext_proc.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=header, raw_value=value), append_action=_OVERWRITE
            )
        ],
        remove_headers=list(remove),
    )
    return ext_proc.ProcessingResponse(
        request_headers=ext_proc.HeadersResponse(
            response=ext_proc.CommonResponse(header_mutation=mutation)
        ),
        dynamic_metadata=_metadata(route, Outcome.INJECTED),
    )


def reject(route: str, style: ErrorStyle, header_hint: str) -> ext_proc.ProcessingResponse:
    """A 401 from the gateway itself, in the provider's error shape; no upstream call."""
    message = (
        f"No credential: this gateway has no server key for route '{route}'. "
        f"Send your own credential ({header_hint})."
    )
    return ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
            headers=ext_proc.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(
                            key="content-type", raw_value=b"application/json"
                        ),
                        append_action=_OVERWRITE,
                    )
                ]
            ),
            body=error_body(style, message),
            details="credential_gateway_no_credential",
        ),
        dynamic_metadata=_metadata(route, Outcome.REJECTED),
    )


def error_body(style: ErrorStyle, message: str, kind: str = "authentication_error") -> bytes:
    """A JSON error body in the shape the provider's SDKs parse."""
    if style is ErrorStyle.OPENAI:
        body: dict[str, object] = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    else:
        body = {"type": "error", "error": {"type": kind, "message": message}}
    return json.dumps(body).encode()


def unmanaged() -> ext_proc.ProcessingResponse:
    """For requests on no credential route (e.g. no route matched): change nothing."""
    return ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse())


# Replies for phases this processor never asks for, should Envoy send one anyway.
PHASE_REPLIES = MappingProxyType(
    {
        "request_headers": unmanaged().SerializeToString(),
        "response_headers": ext_proc.ProcessingResponse(
            response_headers=ext_proc.HeadersResponse()
        ).SerializeToString(),
        "request_body": ext_proc.ProcessingResponse(
            request_body=ext_proc.BodyResponse()
        ).SerializeToString(),
        "response_body": ext_proc.ProcessingResponse(
            response_body=ext_proc.BodyResponse()
        ).SerializeToString(),
        "request_trailers": ext_proc.ProcessingResponse(
            request_trailers=ext_proc.TrailersResponse()
        ).SerializeToString(),
        "response_trailers": ext_proc.ProcessingResponse(
            response_trailers=ext_proc.TrailersResponse()
        ).SerializeToString(),
    }
)
