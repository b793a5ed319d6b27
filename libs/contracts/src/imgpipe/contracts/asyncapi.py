"""The AsyncAPI 3 document of the public events, generated from the pydantic models.

`python -m imgpipe.contracts.asyncapi > docs/asyncapi.json` refreshes the shipped
copy; a test fails when the shipped copy differs from what the models say.
"""

from __future__ import annotations

import json
from typing import Any, cast

from imgpipe.contracts.events import (
    CONTENT_TYPE,
    CancelRequested,
    CloudEvent,
    EventData,
    ImageProcessed,
    RequestCancelled,
    RequestCompleted,
    RequestDeleted,
    RequestReceived,
    RetryRequested,
    RetryStarted,
)
from imgpipe.contracts.topology import Topology

VERSION = "1.0.0"
REF_TEMPLATE = "#/components/schemas/{model}"

DESCRIPTIONS: dict[type[EventData], str] = {
    RequestReceived: "A CSV was accepted: its rows, image count, options and webhook URL.",
    ImageProcessed: "One image has an outcome: its output URL and sizes, or why it failed.",
    RequestCompleted: (
        "Every image of a request's run has an outcome. Published once per run: once, "
        "and again after each retry (`round`)."
    ),
    RequestCancelled: (
        "A running request was stopped: no image of it starts any more. Its final event "
        "in place of RequestCompleted."
    ),
    RetryStarted: (
        "The failed images of a finished request run again (`round`); a RequestCompleted "
        "of the same round follows."
    ),
    RequestDeleted: (
        "A request was deleted (by a user or the retention sweep): every service drops "
        "what it holds of it, stored images included."
    ),
    CancelRequested: "A user asked to stop a running request (ingest to the processor).",
    RetryRequested: (
        "A user asked to run a finished request's failed images again (ingest to the processor)."
    ),
}


def build_document() -> dict[str, Any]:
    exchange = Topology().events_exchange
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for model in DESCRIPTIONS:
        name = model.__name__
        channels[name] = _channel(model, exchange)
        operations[f"publish{name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
        }
        messages[name] = _message(model, schemas)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "imgpipe events",
            "version": VERSION,
            "description": (
                "Events imgpipe publishes on the durable topic exchange "
                f"`{exchange}` (prefixed `<IMGPIPE_NAMESPACE>.` when a namespace is set). "
                "Each message is a CloudEvents 1.0 event in JSON structured mode; `id` is "
                "stable for the same fact, so consumers can deduplicate redeliveries. "
                "`traceparent` (the CloudEvents distributed tracing extension, optional) "
                "carries the W3C trace context of the request's trace."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "local": {"host": "127.0.0.1:5672", "protocol": "amqp", "protocolVersion": "0.9.1"}
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": dict(sorted(schemas.items()))},
    }


def _channel(model: type[EventData], exchange: str) -> dict[str, Any]:
    name = model.__name__
    return {
        "address": model.routing_key,
        "description": f"Routing key `{model.routing_key}`: {DESCRIPTIONS[model]}",
        "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": exchange,
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                },
                "bindingVersion": "0.3.0",
            }
        },
    }


def _message(model: type[EventData], schemas: dict[str, Any]) -> dict[str, Any]:
    envelope = cast("type[CloudEvent[EventData]]", CloudEvent.__class_getitem__(model))
    schema = envelope.model_json_schema(ref_template=REF_TEMPLATE)
    schemas.update(schema.pop("$defs", {}))
    schema["properties"]["type"]["const"] = model.event_type
    return {
        "name": model.__name__,
        "title": model.event_type,
        "summary": DESCRIPTIONS[model],
        "contentType": CONTENT_TYPE,
        "payload": schema,
    }


def render() -> str:
    return json.dumps(build_document(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    print(render(), end="")
