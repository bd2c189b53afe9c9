//! The AsyncAPI document of a service (feature `asyncapi`): its channels, operations,
//! messages and schemas, servers and bindings from bus URLs, and no credentials. The official
//! parser validates the examples' documents (scripts/asyncapi.sh).
#![cfg(feature = "asyncapi")]

use bus::service::Context;
use bus::{Message, Service};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Serialize, Deserialize, JsonSchema)]
struct OrderPlaced {
    order_id: String,
    lines: Vec<Line>,
}
impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
    const SCHEMA_VERSION: u32 = 2;
}

#[derive(Serialize, Deserialize, JsonSchema)]
struct Line {
    sku: String,
    quantity: u32,
}

/// A type without `JsonSchema`: still handled, listed without a payload schema.
#[derive(Serialize, Deserialize)]
struct OrderCancelled {
    order_id: String,
}
impl Message for OrderCancelled {
    const KIND: &'static str = "order.cancelled";
}

#[derive(Serialize, Deserialize, JsonSchema)]
struct Invoice {
    order_id: String,
}
impl Message for Invoice {
    const KIND: &'static str = "invoice.requested";
}

#[derive(Serialize, Deserialize, JsonSchema)]
struct GetBalance {
    customer: String,
}
impl Message for GetBalance {
    const KIND: &'static str = "balance.get";
}

#[derive(Serialize, Deserialize, JsonSchema)]
struct Balance {
    cents: i64,
}
impl Message for Balance {
    const KIND: &'static str = "balance";
}

#[derive(Serialize, Deserialize, JsonSchema)]
struct PaymentRequested {
    order_id: String,
}
impl Message for PaymentRequested {
    const KIND: &'static str = "payment.requested";
}

async fn placed(_: OrderPlaced, _: Context) -> bus::Result<()> {
    Ok(())
}
async fn cancelled(_: OrderCancelled, _: Context) -> bus::Result<()> {
    Ok(())
}
async fn invoice(_: Invoice, _: Context) -> bus::Result<()> {
    Ok(())
}
async fn balance(_: GetBalance, _: Context) -> bus::Result<Balance> {
    Ok(Balance { cents: 0 })
}

async fn billing() -> Service {
    let bus = bus::connect("memory://").await.unwrap();
    Service::new("billing", bus)
        .on("orders", placed)
        .on("orders", cancelled)
        .on_with(
            "orders",
            bus::service::HandlerOptions::new().with_group("audit"),
            placed,
        )
        .on_queue("invoices", invoice)
        .on_request("balances", balance)
        .publishes::<PaymentRequested>("payments")
        .with_schema::<OrderPlaced>()
        .with_schema::<Invoice>()
        .with_schema::<GetBalance>()
        .with_schema::<Balance>()
        .with_schema::<PaymentRequested>()
}

fn refs(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["$ref"].as_str().unwrap().to_owned())
        .collect()
}

/// Writes `document` to `$BUS_ASYNCAPI_OUT/<name>.json` when that is set: scripts/asyncapi.sh
/// validates these with the official parser too (they have what the examples' services do
/// not: a work queue, a handler in its own group, every binding).
fn keep(name: &str, document: &Value) {
    if let Ok(dir) = std::env::var("BUS_ASYNCAPI_OUT") {
        std::fs::create_dir_all(&dir).unwrap();
        let text = serde_json::to_string_pretty(document).unwrap();
        std::fs::write(format!("{dir}/{name}.json"), text).unwrap();
    }
}

/// Follows a local `$ref` (`#/a/b`) in `document`.
fn resolve<'a>(document: &'a Value, reference: &str) -> &'a Value {
    let target = document
        .pointer(reference.strip_prefix('#').unwrap())
        .unwrap_or_else(|| panic!("{reference} points at nothing"));
    match target.get("$ref").and_then(Value::as_str) {
        Some(next) => resolve(document, next),
        None => target,
    }
}

#[tokio::test]
async fn the_document_lists_channels_operations_and_messages() {
    let document = billing().await.asyncapi().with_version("2.1.0").to_json();
    keep("billing.memory", &document);

    assert_eq!(document["asyncapi"], "3.0.0");
    assert_eq!(document["info"]["title"], "billing");
    assert_eq!(document["info"]["version"], "2.1.0");
    assert_eq!(document["defaultContentType"], "application/json");
    assert!(document.get("servers").is_none(), "memory:// has no server");

    let channels = document["channels"].as_object().unwrap();
    let mut ids: Vec<_> = channels.keys().cloned().collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "balances",
            "balances.reply",
            "invoices",
            "orders",
            "payments"
        ]
    );
    assert_eq!(channels["orders"]["address"], "orders");
    assert!(channels["balances.reply"]["address"].is_null());

    let operations = document["operations"].as_object().unwrap();
    let mut ids: Vec<_> = operations.keys().cloned().collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "receive.balances",
            "receive.invoices",
            "receive.orders",
            "receive.orders.audit",
            "send.payments"
        ]
    );
    let orders = &operations["receive.orders"];
    assert_eq!(orders["action"], "receive");
    assert_eq!(orders["channel"]["$ref"], "#/channels/orders");
    let received: Vec<_> = refs(&orders["messages"])
        .iter()
        .map(|r| resolve(&document, r)["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(received, ["order.cancelled", "order.placed"]);
    assert_eq!(
        refs(&operations["receive.orders.audit"]["messages"]),
        ["#/channels/orders/messages/order.placed"]
    );
    assert_eq!(operations["send.payments"]["action"], "send");
    assert_eq!(
        refs(&operations["send.payments"]["messages"]),
        ["#/channels/payments/messages/payment.requested"]
    );

    // Request and reply: the handler's reply type and the error reply.
    let reply = &operations["receive.balances"]["reply"];
    assert_eq!(reply["channel"]["$ref"], "#/channels/balances.reply");
    let replies: Vec<_> = refs(&reply["messages"])
        .iter()
        .map(|r| resolve(&document, r)["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(replies, ["balance", "bus.error"]);
}

#[tokio::test]
async fn messages_carry_kind_version_headers_and_schema() {
    let document = billing().await.asyncapi().to_json();
    let messages = document["components"]["messages"].as_object().unwrap();

    let placed = &messages["order.placed"];
    assert_eq!(placed["name"], "order.placed");
    assert_eq!(placed["title"], "OrderPlaced");
    assert_eq!(placed["contentType"], "application/json");
    assert_eq!(placed["x-bus-schema-version"], 2);
    let headers = &placed["headers"]["allOf"];
    assert_eq!(headers[0]["$ref"], "#/components/schemas/bus.Headers");
    assert_eq!(headers[1]["properties"]["type"]["const"], "order.placed");
    assert_eq!(headers[1]["properties"]["schemaversion"]["const"], "2");

    // The payload schema, with the nested type among the components.
    let payload = resolve(&document, placed["payload"]["$ref"].as_str().unwrap());
    assert_eq!(payload["type"], "object");
    let mut required: Vec<_> = payload["required"].as_array().unwrap().clone();
    required.sort_by_key(|v| v.to_string());
    assert_eq!(required, ["lines", "order_id"]);
    let line = resolve(
        &document,
        payload["properties"]["lines"]["items"]["$ref"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(line["properties"]["quantity"]["type"], "integer");

    // A type without JsonSchema: named and versioned, no payload.
    let cancelled = &messages["order.cancelled"];
    assert_eq!(cancelled["name"], "order.cancelled");
    assert!(cancelled.get("payload").is_none());

    let error = &messages["bus.error"];
    let error_payload = resolve(&document, error["payload"]["$ref"].as_str().unwrap());
    assert_eq!(
        error_payload["required"],
        serde_json::json!(["kind", "message"])
    );

    // Every reference in the document resolves.
    fn check_refs(document: &Value, value: &Value) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(reference)) = map.get("$ref") {
                    resolve(document, reference);
                }
                map.values().for_each(|v| check_refs(document, v));
            }
            Value::Array(items) => items.iter().for_each(|v| check_refs(document, v)),
            _ => {}
        }
    }
    check_refs(&document, &document);
}

#[tokio::test]
async fn servers_and_bindings_come_from_the_url_without_credentials() {
    let service = billing().await;
    let kafka = service
        .asyncapi()
        .with_server(
            "production",
            "kafka://billing-user:hunter2@kafka.internal:9093?sasl_password=hunter2",
        )
        .unwrap()
        .to_json();
    keep("billing.kafka", &kafka);
    assert!(!kafka.to_string().contains("hunter2"), "{kafka:#}");
    assert!(
        !kafka.to_string().contains("billing-user"),
        "no user name either"
    );
    let server = &kafka["servers"]["production"];
    assert_eq!(server["host"], "kafka.internal:9093");
    assert_eq!(server["protocol"], "kafka");
    assert_eq!(
        kafka["channels"]["orders"]["bindings"]["kafka"]["topic"],
        "orders"
    );
    let group = &kafka["operations"]["receive.orders.audit"]["bindings"]["kafka"]["groupId"];
    assert_eq!(group["enum"], serde_json::json!(["audit"]));
    // The headers as Kafka's CloudEvents binding spells them.
    assert!(kafka["components"]["schemas"]["bus.Headers"]["properties"]["ce_type"].is_object());

    let amqp = service
        .asyncapi()
        .with_server("production", "amqps://app:hunter2@rabbit.internal/shop")
        .unwrap()
        .to_json();
    keep("billing.amqp", &amqp);
    assert!(!amqp.to_string().contains("hunter2"));
    assert_eq!(amqp["servers"]["production"]["protocol"], "amqps");
    assert_eq!(amqp["servers"]["production"]["pathname"], "/shop");
    let exchange = &amqp["channels"]["orders"]["bindings"]["amqp"];
    assert_eq!(exchange["is"], "routingKey");
    assert_eq!(exchange["exchange"]["name"], "bus.topics");
    assert_eq!(exchange["exchange"]["vhost"], "shop");
    let queue = &amqp["channels"]["invoices"]["bindings"]["amqp"];
    assert_eq!(queue["is"], "queue");
    assert_eq!(queue["queue"]["name"], "invoices");

    let nats = service
        .asyncapi()
        .with_server("production", "nats://app:hunter2@nats.internal:4222")
        .unwrap()
        .to_json();
    keep("billing.nats", &nats);
    assert!(!nats.to_string().contains("hunter2"));
    assert_eq!(
        nats["operations"]["receive.orders"]["bindings"]["nats"]["queue"],
        "billing"
    );

    let sqs = service
        .asyncapi()
        .with_server(
            "production",
            "sqs://sqs.eu-west-1.amazonaws.com?access_key_id=AKIAX&secret_access_key=hunter2",
        )
        .unwrap()
        .to_json();
    keep("billing.sqs", &sqs);
    assert!(!sqs.to_string().contains("hunter2"));
    assert!(!sqs.to_string().contains("AKIAX"));
    assert_eq!(
        sqs["servers"]["production"]["host"],
        "sqs.eu-west-1.amazonaws.com"
    );

    let memory = service
        .asyncapi()
        .with_server("local", "memory://")
        .unwrap()
        .to_json();
    assert!(memory.get("servers").is_none());

    let unknown = service
        .asyncapi()
        .with_server("x", "mqtt://user:hunter2@host")
        .unwrap_err();
    assert!(!unknown.to_string().contains("hunter2"), "{unknown}");
}
