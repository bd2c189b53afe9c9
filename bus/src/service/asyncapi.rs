//! The [AsyncAPI 3.0](https://www.asyncapi.com/docs/reference/specification/v3.0.0) document
//! of a [`Service`]: its channels, what it receives and sends on them, its messages with their
//! JSON Schemas, and the servers and broker bindings it runs on.
//!
//! [`Service::asyncapi`] builds it from what the service registered:
//!
//! | registered with | in the document |
//! |---|---|
//! | [`on`](Service::on), [`on_queue`](Service::on_queue) | a `receive` operation on the topic's or queue's channel |
//! | [`on_request`](Service::on_request) | a `receive` operation with a `reply` (the handler's reply type, and the error reply [`bus.error`](super::ERROR_REPLY_KIND)) |
//! | [`publishes`](Service::publishes), [`sends`](Service::sends) | a `send` operation |
//! | [`requests`](Service::requests) | a `send` operation with a `reply` |
//! | [`with_schema`](Service::with_schema) | the message's `payload`: the type's JSON Schema (draft 7, from [`schemars`]) |
//!
//! Every message is named by its kind ([`Message::KIND`]) and carries its schema version
//! (the `schemaversion` header, as a `const` in its headers schema, and the extension
//! `x-bus-schema-version`), the content type `application/json` and a headers schema of the
//! CloudEvents attributes `bus` writes, spelled as the binding of the document's first
//! server spells them (`ce_type` on Kafka, `cloudEvents:type` on AMQP, `ce-type` on NATS and
//! SQS, the bare attribute names without a server). A type without a
//! [`with_schema`](Service::with_schema) registration is listed without a payload schema:
//! [`Service::on`] works for every [`Message`], whether or not it implements [`JsonSchema`].
//!
//! Servers come from bus URLs ([`AsyncApi::with_server`]): the protocol from the scheme
//! (`kafka`, `amqp`, `amqps`, `nats`, `sqs`), the host, port and path (the AMQP virtual host).
//! The user, password and query of the URL (where credentials and tokens live) are never
//! written. `memory://` is in-process, with nothing to connect to: it adds no server. With a
//! Kafka, AMQP or NATS server, the channels and operations carry bindings: the Kafka topic and
//! consumer group (`groupId`), the AMQP topic exchange (`bus.topics`, the adapter's default)
//! with the routing key or the work queue, the NATS queue (the consumer group). SQS gets no
//! bindings: the adapter derives its queue names from settings (prefix, FIFO) that the URL
//! does not always carry (`SqsBroker::group_queue_name` gives them).
//!
//! ```
//! use bus::{Message, Service, service::Context};
//!
//! #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! struct OrderPlaced { order_id: String }
//! impl Message for OrderPlaced { const KIND: &'static str = "order.placed"; }
//!
//! #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! struct PaymentRequested { order_id: String }
//! impl Message for PaymentRequested { const KIND: &'static str = "payment.requested"; }
//!
//! async fn on_order(order: OrderPlaced, ctx: Context) -> bus::Result<()> {
//!     ctx.publish("payments", &PaymentRequested { order_id: order.order_id }).await?;
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> bus::Result<()> {
//! let bus = bus::connect("memory://").await?;
//! let billing = Service::new("billing", bus)
//!     .on("orders", on_order)
//!     .publishes::<PaymentRequested>("payments")
//!     .with_schema::<OrderPlaced>()
//!     .with_schema::<PaymentRequested>();
//!
//! let document = billing
//!     .asyncapi()
//!     .with_version("1.4.0")
//!     .with_server("production", "kafka://user:secret@kafka.internal:9092")?
//!     .to_json();
//! assert_eq!(document["asyncapi"], "3.0.0");
//! assert_eq!(document["servers"]["production"]["host"], "kafka.internal:9092");
//! assert_eq!(document["operations"]["receive.orders"]["action"], "receive");
//! assert_eq!(document["operations"]["send.payments"]["action"], "send");
//! assert!(!document.to_string().contains("secret"));
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bus_core::{Error, Message, Result};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};
use url::Url;

use super::{Channel, MessageType, Service, ERROR_REPLY_KIND};

/// The AsyncAPI version the documents follow.
pub const ASYNCAPI_VERSION: &str = "3.0.0";

/// Where the schemas of message types go: `#/components/schemas/<name>`.
const SCHEMAS: &str = "/components/schemas";

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// The JSON Schemas registered with [`Service::with_schema`], by kind.
#[derive(Default)]
pub(crate) struct Schemas(BTreeMap<&'static str, SchemaFn>);

impl fmt::Debug for Schemas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

fn schema_of<M: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<M>()
}

impl Service {
    /// Gives messages of type `M` their JSON Schema (from its [`JsonSchema`] derive) in the
    /// service's [AsyncAPI document](Service::asyncapi), wherever `M` appears: handled,
    /// replied, published, sent or requested. Types without it are listed with no payload
    /// schema; the handlers are the same either way.
    pub fn with_schema<M: Message + JsonSchema>(mut self) -> Self {
        self.schemas.0.insert(M::KIND, schema_of::<M>);
        self
    }

    /// The service's AsyncAPI 3.0 document as registered so far: see the
    /// [module docs](self) for what it holds. Set the application's version and the servers
    /// on the returned [`AsyncApi`], then take its JSON with [`AsyncApi::to_json`].
    #[must_use]
    pub fn asyncapi(&self) -> AsyncApi {
        let mut operations = Vec::new();
        for registered in &self.registered {
            let mut messages: Vec<_> = registered.routes.values().map(|r| r.message).collect();
            messages.sort_by_key(|m| m.kind);
            let mut replies: Vec<_> = registered.routes.values().filter_map(|r| r.reply).collect();
            replies.sort_by_key(|m| m.kind);
            replies.dedup_by_key(|m| m.kind);
            operations.push(Operation {
                action: Action::Receive,
                channel: registered.channel,
                name: registered.name.clone(),
                group: registered.group.clone(),
                messages,
                replies,
            });
        }
        for declared in &self.declared {
            let same = operations.iter_mut().find(|o| {
                o.action == Action::Send && o.channel == declared.channel && o.name == declared.name
            });
            let operation = match same {
                Some(operation) => operation,
                None => {
                    operations.push(Operation {
                        action: Action::Send,
                        channel: declared.channel,
                        name: declared.name.clone(),
                        group: None,
                        messages: Vec::new(),
                        replies: Vec::new(),
                    });
                    operations.last_mut().expect("just pushed")
                }
            };
            if !operation.messages.contains(&declared.message) {
                operation.messages.push(declared.message);
            }
            if let Some(reply) = declared.reply {
                if !operation.replies.contains(&reply) {
                    operation.replies.push(reply);
                }
            }
        }
        AsyncApi {
            title: self.name.to_string(),
            version: "0.0.0".to_owned(),
            description: None,
            servers: Vec::new(),
            operations,
            schemas: self.schemas.0.clone(),
        }
    }
}

/// The AsyncAPI 3.0 document of a service ([`Service::asyncapi`]), with the application's
/// version, a description and servers to add before it is written out as JSON
/// ([`to_json`](AsyncApi::to_json)).
#[derive(Debug, Clone)]
pub struct AsyncApi {
    title: String,
    version: String,
    description: Option<String>,
    servers: Vec<(String, Server)>,
    operations: Vec<Operation>,
    schemas: BTreeMap<&'static str, SchemaFn>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Receive,
    Send,
}

/// One operation: what the service receives on (or sends to) one channel.
#[derive(Debug, Clone)]
struct Operation {
    action: Action,
    channel: Channel,
    name: String,
    /// The consumer or responder group a receiving operation reads in.
    group: Option<String>,
    messages: Vec<MessageType>,
    /// For requests: the replies.
    replies: Vec<MessageType>,
}

/// A server, from a bus URL without its credentials.
#[derive(Debug, Clone)]
struct Server {
    protocol: &'static str,
    host: String,
    pathname: Option<String>,
    /// The AMQP virtual host, for the bindings.
    vhost: String,
}

impl AsyncApi {
    /// Sets `info.version`, the version of the application (default `0.0.0`).
    #[must_use]
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets `info.description` (CommonMark); by default one is written from the service's
    /// name.
    #[must_use]
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Adds the server `name` (`production`, `staging`…) that `url`, a bus URL as given to
    /// [`connect`](crate::connect), points at: its scheme's protocol, host, port and path.
    /// The URL's user, password and query are left out. A `memory://` URL adds nothing (the
    /// broker is in-process). The first server also sets how the messages' headers are
    /// spelled, and every server's protocol adds its bindings (see the [module docs](self)).
    ///
    /// # Errors
    /// [`ErrorKind::Config`](bus_core::ErrorKind::Config) when `url` does not parse, has a
    /// scheme `bus` does not know, or (other than `memory://`) no host.
    pub fn with_server(mut self, name: impl Into<String>, url: &str) -> Result<Self> {
        let parsed = Url::parse(url).map_err(|e| {
            // The URL may hold a password: the error names only its scheme.
            let scheme = url.split("://").next().unwrap_or_default();
            Error::config(format!("cannot read the {scheme}:// server URL: {e}"))
        })?;
        let protocol = match parsed.scheme() {
            "memory" => return Ok(self),
            "kafka" => "kafka",
            "amqp" => "amqp",
            "amqps" => "amqps",
            "nats" => "nats",
            "sqs" => "sqs",
            other => {
                return Err(Error::config(format!(
                    "`{other}://` is not a bus URL scheme: no AsyncAPI server for it"
                )))
            }
        };
        let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
            return Err(Error::config(format!(
                "the {protocol}:// server URL has no host"
            )));
        };
        let host = match parsed.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let path = parsed.path();
        let pathname = (!path.is_empty() && path != "/").then(|| path.to_owned());
        let vhost = match path.strip_prefix('/') {
            Some(vhost) if !vhost.is_empty() => percent_decoded(vhost),
            _ => "/".to_owned(),
        };
        self.servers.push((
            name.into(),
            Server {
                protocol,
                host,
                pathname,
                vhost,
            },
        ));
        Ok(self)
    }

    /// The document as JSON.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let protocols: BTreeSet<&str> = self.servers.iter().map(|(_, s)| s.protocol).collect();
        let header_prefix = match self.servers.first().map(|(_, s)| s.protocol) {
            Some("kafka") => "ce_",
            Some("amqp" | "amqps") => "cloudEvents:",
            Some(_) => "ce-",
            None => "",
        };
        let vhost = self
            .servers
            .iter()
            .find(|(_, s)| s.protocol.starts_with("amqp"))
            .map_or("/", |(_, s)| s.vhost.as_str());

        let mut generator = SchemaSettings::draft07()
            .with(|s| {
                s.definitions_path = SCHEMAS.into();
                s.meta_schema = None;
            })
            .into_generator();
        let mut messages = Map::new();
        let mut channels: BTreeMap<String, Value> = BTreeMap::new();
        let mut channel_ids: BTreeMap<(Channel, &str), String> = BTreeMap::new();
        let mut operations = Map::new();

        for operation in &self.operations {
            let channel_id = channel_ids
                .entry((operation.channel, operation.name.as_str()))
                .or_insert_with(|| unique(&channels, &identifier(&operation.name)))
                .clone();
            let channel = channels.entry(channel_id.clone()).or_insert_with(|| {
                channel_object(operation.channel, &operation.name, &protocols, vhost)
            });
            let mut refs = Vec::new();
            for message in &operation.messages {
                let id = self.message(&mut messages, &mut generator, *message, header_prefix);
                channel["messages"][&id] = json!({ "$ref": format!("#/components/messages/{id}") });
                refs.push(json!({ "$ref": format!("#/channels/{channel_id}/messages/{id}") }));
            }

            let action = match operation.action {
                Action::Receive => "receive",
                Action::Send => "send",
            };
            let mut operation_id = format!("{action}.{channel_id}");
            if let (Action::Receive, Some(group)) = (operation.action, &operation.group) {
                if *group != self.title {
                    operation_id = format!("{operation_id}.{}", identifier(group));
                }
            }
            let mut object = json!({
                "action": action,
                "channel": { "$ref": format!("#/channels/{channel_id}") },
                "summary": summary(operation, &self.title),
                "messages": refs,
            });
            if let Some(bindings) = operation_bindings(operation, &protocols) {
                object["bindings"] = bindings;
            }
            if operation.channel == Channel::Requests {
                object["reply"] = self.reply(
                    operation,
                    &channel_id,
                    &mut channels,
                    &mut messages,
                    &mut generator,
                    header_prefix,
                );
            }
            operations.insert(operation_id, object);
        }

        let mut schemas = generator.take_definitions(true);
        schemas.insert(
            "bus.ErrorReply".to_owned(),
            json!({
                "type": "object",
                "description": "The reply of a responder whose handler failed: the error's kind (bus's ErrorKind name) and message.",
                "required": ["kind", "message"],
                "properties": {
                    "kind": { "type": "string", "examples": ["handler", "not_found", "serialization"] },
                    "message": { "type": "string" }
                }
            }),
        );
        schemas.insert("bus.Headers".to_owned(), headers_schema(header_prefix));

        let description = self.description.clone().unwrap_or_else(|| {
            format!(
                "The `{}` service, built with bus (`bus::Service`). Messages are CloudEvents in \
                 their broker binding's binary mode, the payload JSON. A message its handler \
                 fails on for good goes to the dead-letter queue `<topic>.dlq`.",
                self.title
            )
        });
        let mut document = json!({
            "asyncapi": ASYNCAPI_VERSION,
            "info": {
                "title": self.title,
                "version": self.version,
                "description": description,
            },
            "defaultContentType": "application/json",
            "channels": Value::Object(channels.into_iter().collect()),
            "operations": operations,
            "components": {
                "messages": messages,
                "schemas": schemas,
            },
        });
        if !self.servers.is_empty() {
            let servers: Map<String, Value> = self
                .servers
                .iter()
                .map(|(name, server)| {
                    let mut object = json!({ "host": server.host, "protocol": server.protocol });
                    if let Some(pathname) = &server.pathname {
                        object["pathname"] = json!(pathname);
                    }
                    (name.clone(), object)
                })
                .collect();
            document["servers"] = Value::Object(servers);
        }
        rename_schemas(&mut document);
        document
    }

    /// The `reply` of a request operation, with its reply channel.
    fn reply(
        &self,
        operation: &Operation,
        channel_id: &str,
        channels: &mut BTreeMap<String, Value>,
        messages: &mut Map<String, Value>,
        generator: &mut SchemaGenerator,
        header_prefix: &str,
    ) -> Value {
        let reply_id = format!("{channel_id}.reply");
        let channel = channels.entry(reply_id.clone()).or_insert_with(|| {
            json!({
                "address": null,
                "title": format!("replies to {}", operation.name),
                "description": "Where a responder's reply goes: the requester's own reply address (an inbox, a reply queue or topic, chosen per request by the adapter), tied to the request by its causation id.",
                "messages": {},
            })
        });
        let error = MessageType {
            kind: ERROR_REPLY_KIND,
            version: 1,
            rust_type: "bus::service::ErrorReply",
        };
        let mut refs = Vec::new();
        for message in operation.replies.iter().chain([&error]) {
            let id = self.message(messages, generator, *message, header_prefix);
            channel["messages"][&id] = json!({ "$ref": format!("#/components/messages/{id}") });
            refs.push(json!({ "$ref": format!("#/channels/{reply_id}/messages/{id}") }));
        }
        json!({
            "channel": { "$ref": format!("#/channels/{reply_id}") },
            "messages": refs,
        })
    }

    /// Adds `message` to the components (once) and returns its id there.
    fn message(
        &self,
        messages: &mut Map<String, Value>,
        generator: &mut SchemaGenerator,
        message: MessageType,
        header_prefix: &str,
    ) -> String {
        let id = identifier(message.kind);
        if messages.contains_key(&id) {
            return id;
        }
        let short_type = message
            .rust_type
            .rsplit("::")
            .next()
            .unwrap_or(message.rust_type);
        let mut object = json!({
            "name": message.kind,
            "title": short_type,
            "contentType": "application/json",
            "headers": {
                "allOf": [
                    { "$ref": format!("#{SCHEMAS}/bus.Headers") },
                    {
                        "type": "object",
                        "properties": {
                            format!("{header_prefix}type"): { "const": message.kind },
                            "schemaversion": { "const": message.version.to_string() },
                        }
                    }
                ]
            },
            "x-bus-schema-version": message.version,
        });
        if message.kind == ERROR_REPLY_KIND {
            object["payload"] = json!({ "$ref": format!("#{SCHEMAS}/bus.ErrorReply") });
            object["summary"] =
                json!("A responder's handler failed, or nothing handles the request's kind.");
        } else if let Some(schema_fn) = self.schemas.get(message.kind) {
            let mut schema = schema_fn(generator);
            for transform in generator.transforms_mut() {
                transform.transform(&mut schema);
            }
            object["payload"] = schema.to_value();
        }
        messages.insert(id.clone(), object);
        id
    }
}

/// A channel of the service's `channel` kind called `name` on the bus.
fn channel_object(channel: Channel, name: &str, protocols: &BTreeSet<&str>, vhost: &str) -> Value {
    let title = match channel {
        Channel::Topic => format!("topic {name}"),
        Channel::Queue => format!("work queue {name}"),
        Channel::Requests => format!("requests on {name}"),
    };
    let mut object = json!({ "address": name, "title": title, "messages": {} });
    let mut bindings = Map::new();
    if protocols.contains("kafka") && channel != Channel::Requests {
        bindings.insert(
            "kafka".to_owned(),
            json!({ "topic": name, "bindingVersion": "0.5.0" }),
        );
    }
    if protocols.contains("amqp") || protocols.contains("amqps") {
        match channel {
            Channel::Topic => {
                bindings.insert(
                    "amqp".to_owned(),
                    json!({
                        "is": "routingKey",
                        "exchange": {
                            "name": "bus.topics",
                            "type": "topic",
                            "durable": true,
                            "autoDelete": false,
                            "vhost": vhost,
                        },
                        "bindingVersion": "0.3.0",
                    }),
                );
            }
            Channel::Queue => {
                bindings.insert(
                    "amqp".to_owned(),
                    json!({
                        "is": "queue",
                        "queue": {
                            "name": name,
                            "durable": true,
                            "exclusive": false,
                            "autoDelete": false,
                            "vhost": vhost,
                        },
                        "bindingVersion": "0.3.0",
                    }),
                );
            }
            Channel::Requests => {}
        }
    }
    if !bindings.is_empty() {
        object["bindings"] = Value::Object(bindings);
    }
    object
}

/// The bindings of a receiving operation: its consumer group, where the protocol has one.
fn operation_bindings(operation: &Operation, protocols: &BTreeSet<&str>) -> Option<Value> {
    let group = operation.group.as_ref()?;
    if operation.action != Action::Receive {
        return None;
    }
    let mut bindings = Map::new();
    if protocols.contains("kafka") && operation.channel == Channel::Topic {
        bindings.insert(
            "kafka".to_owned(),
            json!({ "groupId": { "type": "string", "enum": [group] }, "bindingVersion": "0.5.0" }),
        );
    }
    if protocols.contains("nats") {
        bindings.insert(
            "nats".to_owned(),
            json!({ "queue": group, "bindingVersion": "0.1.0" }),
        );
    }
    (!bindings.is_empty()).then_some(Value::Object(bindings))
}

fn summary(operation: &Operation, service: &str) -> String {
    let name = &operation.name;
    match (operation.action, operation.channel, &operation.group) {
        (Action::Receive, Channel::Topic, Some(group)) if group == service => {
            format!("{service} handles {name} in its consumer group")
        }
        (Action::Receive, Channel::Topic, Some(group)) => {
            format!("{service} handles {name} in the consumer group {group}")
        }
        (Action::Receive, Channel::Requests, _) => format!("{service} answers requests on {name}"),
        (Action::Receive, _, _) => format!("{service} consumes the work queue {name}"),
        (Action::Send, Channel::Topic, _) => format!("{service} publishes to {name}"),
        (Action::Send, Channel::Queue, _) => format!("{service} sends to the work queue {name}"),
        (Action::Send, Channel::Requests, _) => format!("{service} asks requests on {name}"),
    }
}

/// The headers `bus` writes on every message: the CloudEvents attributes in the binding's
/// spelling, the schema version and the W3C trace context.
fn headers_schema(prefix: &str) -> Value {
    let ce = |name: &str| format!("{prefix}{name}");
    json!({
        "type": "object",
        "description": "CloudEvents attributes (binary mode of the broker's binding), the schema version and the W3C trace context.",
        "required": [ce("specversion"), ce("id"), ce("source"), ce("type")],
        "properties": {
            ce("specversion"): { "type": "string", "const": "1.0" },
            ce("id"): { "type": "string", "description": "The message id (a UUID v7 when bus made it)." },
            ce("source"): { "type": "string", "description": "The producing service (the adapter's `source` setting)." },
            ce("type"): { "type": "string", "description": "The message kind." },
            ce("time"): { "type": "string", "format": "date-time" },
            ce("correlationid"): { "type": "string", "description": "The id shared by every message of one conversation." },
            ce("causationid"): { "type": "string", "description": "The id of the message that caused this one." },
            ce("partitionkey"): { "type": "string", "description": "The ordering key." },
            "schemaversion": { "type": "string", "pattern": "^[0-9]+$", "description": "The schema version of the payload's type." },
            "traceparent": { "type": "string", "description": "W3C trace context." },
            "tracestate": { "type": "string", "description": "W3C trace context." }
        }
    })
}

/// `name` as a component or channel id: letters, digits, `.`, `-` and `_`.
fn identifier(name: &str) -> String {
    let id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if id.is_empty() {
        "_".to_owned()
    } else {
        id
    }
}

/// `id`, or `id_2`, `id_3`… if a channel has it already (a topic and a queue of one name).
fn unique(channels: &BTreeMap<String, Value>, id: &str) -> String {
    let mut candidate = id.to_owned();
    let mut n = 1;
    while channels.contains_key(&candidate) {
        n += 1;
        candidate = format!("{id}_{n}");
    }
    candidate
}

/// Renames schemas whose schemars name is not a valid component id (generic types), and the
/// references to them.
fn rename_schemas(document: &mut Value) {
    let Some(schemas) = document["components"]["schemas"].as_object_mut() else {
        return;
    };
    let renames: BTreeMap<String, String> = schemas
        .keys()
        .filter(|name| identifier(name) != **name)
        .map(|name| (name.clone(), identifier(name)))
        .collect();
    if renames.is_empty() {
        return;
    }
    for (old, new) in &renames {
        if let Some(schema) = schemas.remove(old) {
            schemas.insert(new.clone(), schema);
        }
    }
    let refs: BTreeMap<String, String> = renames
        .iter()
        .map(|(old, new)| {
            let escape = |s: &str| s.replace('~', "~0").replace('/', "~1");
            (
                format!("#{SCHEMAS}/{}", escape(old)),
                format!("#{SCHEMAS}/{new}"),
            )
        })
        .collect();
    rewrite_refs(document, &refs);
}

fn rewrite_refs(value: &mut Value, refs: &BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(target) if key == "$ref" => {
                        if let Some(new) = refs.get(target.as_str()) {
                            target.clone_from(new);
                        }
                    }
                    other => rewrite_refs(other, refs),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_refs(v, refs)),
        _ => {}
    }
}

/// `text` with its `%XX` escapes decoded (an AMQP virtual host in a URL path: `%2F` is `/`).
fn percent_decoded(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}
