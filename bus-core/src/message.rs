//! Typed messages and the codec that turns them into envelope payloads.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{headers, Envelope, Error, ErrorKind, Result};

/// A typed message: a serde type with a stable kind name and a schema version.
///
/// ```
/// use bus_core::{Envelope, Message};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderPlaced { order_id: u64 }
/// impl Message for OrderPlaced {
///     const KIND: &'static str = "order.placed";
///     const SCHEMA_VERSION: u32 = 2;
/// }
/// let envelope = Envelope::encode(&OrderPlaced { order_id: 42 }).unwrap();
/// assert_eq!(envelope.kind, "order.placed");
/// let back: OrderPlaced = envelope.decode().unwrap();
/// assert_eq!(back.order_id, 42);
/// ```
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The message kind on the wire (CloudEvents `type`), e.g. `order.placed`.
    const KIND: &'static str;
    /// The schema version of this type. A reader refuses messages of a newer version than it
    /// knows, and reads older ones (give new fields serde defaults).
    const SCHEMA_VERSION: u32 = 1;
}

/// Turns values into payload bytes and back.
pub trait Codec: Send + Sync + 'static {
    /// The media type this codec writes, e.g. `application/json`.
    fn content_type(&self) -> &'static str;
    /// Encodes `value`.
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`] when the value cannot be encoded.
    fn encode<T: Serialize>(&self, value: &T) -> Result<bytes::Bytes>;
    /// Decodes a `T` from `bytes`.
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`] when the bytes are not a valid `T`.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T>;
}

/// The default codec: JSON through `serde_json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn encode<T: Serialize>(&self, value: &T) -> Result<bytes::Bytes> {
        Ok(serde_json::to_vec(value)?.into())
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

impl Envelope {
    /// A new root envelope holding `message`, encoded as JSON.
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`] when the message cannot be encoded.
    pub fn encode<M: Message>(message: &M) -> Result<Envelope> {
        Self::encode_with(&JsonCodec, message)
    }

    /// A new root envelope holding `message`, encoded with `codec`.
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`] when the message cannot be encoded.
    pub fn encode_with<M: Message, C: Codec>(codec: &C, message: &M) -> Result<Envelope> {
        let payload = codec.encode(message)?;
        Ok(Envelope::new(M::KIND, payload)
            .with_content_type(codec.content_type())
            .with_header(headers::SCHEMA_VERSION, M::SCHEMA_VERSION.to_string()))
    }

    /// Decodes the payload as `M` with the JSON codec, checking kind and schema version.
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`] when the kind differs from `M::KIND`, the schema version is
    /// newer than `M::SCHEMA_VERSION` or unreadable, or the payload is not a valid `M`.
    pub fn decode<M: Message>(&self) -> Result<M> {
        self.decode_with(&JsonCodec)
    }

    /// Decodes the payload as `M` with `codec` (see [`Envelope::decode`]).
    ///
    /// # Errors
    /// As [`Envelope::decode`].
    pub fn decode_with<M: Message, C: Codec>(&self, codec: &C) -> Result<M> {
        if self.kind != M::KIND {
            return Err(Error::new(
                ErrorKind::Serialization,
                format!(
                    "expected a message of kind `{}`, got `{}`",
                    M::KIND,
                    self.kind
                ),
            ));
        }
        if let Some(version) = self.header(headers::SCHEMA_VERSION) {
            let version: u32 = version.parse().map_err(|e| {
                Error::with_source(
                    ErrorKind::Serialization,
                    format!(
                        "schema version `{version}` of `{}` is not a number",
                        self.kind
                    ),
                    e,
                )
            })?;
            if version > M::SCHEMA_VERSION {
                return Err(Error::new(
                    ErrorKind::Serialization,
                    format!(
                        "`{}` has schema version {version}, newer than the {} this reader knows",
                        self.kind,
                        M::SCHEMA_VERSION
                    ),
                ));
            }
        }
        codec.decode(&self.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Ping {
        n: u32,
    }
    impl Message for Ping {
        const KIND: &'static str = "ping";
    }

    #[test]
    fn wrong_kind_is_a_typed_error() {
        let e = Envelope::new("pong", "{}");
        let err = e.decode::<Ping>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Serialization);
    }

    #[test]
    fn newer_schema_is_refused_and_garbage_is_an_error_not_a_panic() {
        let e = Envelope::encode(&Ping { n: 1 })
            .unwrap()
            .with_header(headers::SCHEMA_VERSION, "9");
        assert_eq!(
            e.decode::<Ping>().unwrap_err().kind(),
            ErrorKind::Serialization
        );
        let garbage = Envelope::new("ping", vec![0xff, 0x00, 0x13]);
        assert_eq!(
            garbage.decode::<Ping>().unwrap_err().kind(),
            ErrorKind::Serialization
        );
    }
}
