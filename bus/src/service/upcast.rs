//! Upcasting: reading a message written with an older schema version of its type, through a
//! conversion the service registered ([`Service::upcast`](super::Service::upcast)).

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use bus_core::{headers, Codec, Envelope, Error, ErrorKind, JsonCodec, Message, Result};
use serde::de::DeserializeOwned;

/// Reads the payload of one old schema version of `M` and converts it.
type Convert<M> = Arc<dyn Fn(&[u8]) -> Result<M> + Send + Sync>;

/// The conversions registered per message type, by the schema version they read.
#[derive(Default)]
pub(crate) struct Upcasters {
    /// `TypeId` of `M` → version → `Convert<M>`.
    by_type: HashMap<TypeId, BTreeMap<u32, Box<dyn Any + Send + Sync>>>,
}

impl Upcasters {
    /// Registers `convert` for payloads of `M` written with schema version `from`.
    ///
    /// Returns `false` when one is registered for that version already.
    pub(crate) fn insert<M, Old, F>(&mut self, from: u32, convert: F) -> bool
    where
        M: Message,
        Old: DeserializeOwned,
        F: Fn(Old) -> Result<M> + Send + Sync + 'static,
    {
        let convert: Convert<M> = Arc::new(move |payload: &[u8]| {
            let old: Old = JsonCodec.decode(payload)?;
            convert(old)
        });
        self.by_type
            .entry(TypeId::of::<M>())
            .or_default()
            .insert(from, Box::new(convert))
            .is_none()
    }

    /// The versions registered for `M`.
    fn versions<M: Message>(&self) -> Option<&BTreeMap<u32, Box<dyn Any + Send + Sync>>> {
        self.by_type.get(&TypeId::of::<M>())
    }

    /// Decodes `envelope` as `M`: through the conversion registered for its schema version
    /// if it is older than `M::SCHEMA_VERSION` and one is registered, as `M` otherwise.
    /// Returns whether it was upcast.
    ///
    /// # Errors
    /// As [`Envelope::decode`]; a failed conversion is a
    /// [`Serialization`](ErrorKind::Serialization) error naming the versions.
    pub(crate) fn decode<M: Message>(&self, envelope: &Envelope) -> Result<(M, bool)> {
        let version = match (
            self.versions::<M>(),
            envelope.header(headers::SCHEMA_VERSION),
        ) {
            (Some(versions), Some(version)) => version
                .parse::<u32>()
                .ok()
                .filter(|v| *v < M::SCHEMA_VERSION)
                .and_then(|v| Some((v, versions.get(&v)?))),
            _ => None,
        };
        let Some((version, convert)) = version else {
            return envelope.decode::<M>().map(|m| (m, false));
        };
        let convert = convert
            .downcast_ref::<Convert<M>>()
            .expect("upcasters are stored under their own type");
        if envelope.kind != M::KIND {
            // What `decode` says about a wrong kind.
            return envelope.decode::<M>().map(|m| (m, false));
        }
        convert(&envelope.payload)
            .map(|m| (m, true))
            .map_err(|error| {
                let message = format!(
                    "upcasting from schema version {version} to {} failed: {}",
                    M::SCHEMA_VERSION,
                    error.message()
                );
                Error::with_source(ErrorKind::Serialization, message, error)
            })
    }
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcasters")
            .field("types", &self.by_type.len())
            .finish_non_exhaustive()
    }
}
