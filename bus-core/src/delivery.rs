//! A received message and its settlement.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Envelope, Error, Result};

/// When a negatively acknowledged message should come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Redeliver {
    /// As soon as the broker can.
    Now,
    /// Not before this delay has passed (native delay, or the adapter's emulation of it).
    After(Duration),
}

/// How a delivery was settled, as an adapter's [`Settle`] implementation receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settlement {
    /// Processed: the broker forgets the message (for this group).
    Ack,
    /// Not processed: deliver it again, as an attempt `attempt + 1`.
    Nack(Redeliver),
    /// Never processable: move it to the dead-letter queue with this reason.
    Reject {
        /// Why, written into the dead letter's reason header.
        reason: String,
        /// How many times the message was tried, written into the dead letter's attempts
        /// header: the broker's deliveries plus the retries the
        /// [`Consumer`](crate::Consumer) ran in place ([`KeyOrder::Ordered`](crate::runtime::KeyOrder)).
        /// [`Delivery::settle`] raises it to at least the delivery's
        /// [`attempt`](Delivery::attempt), so 0 means "the delivery's attempt".
        attempts: u32,
    },
}

/// The broker side of one delivery: what an adapter implements to settle it.
///
/// `bus` guarantees [`settle`](Settle::settle) (or [`try_settle`](Settle::try_settle))
/// succeeds at most once per delivery, and calls
/// [`abandon`](Settle::abandon) when a delivery is dropped without a successful settlement, so
/// the adapter can hand it back to the broker for redelivery.
#[async_trait]
pub trait Settle: Send + Sync + fmt::Debug {
    /// Settles the delivery. On error the delivery stays unsettled and may be settled again.
    async fn settle(&self, settlement: Settlement) -> Result<()>;

    /// Settles at once, without waiting, where the adapter can (an in-process broker, an
    /// acknowledgement kept to be committed later): `Some` with the result, as
    /// [`settle`](Settle::settle) would give it, or `None`, having done nothing, to have
    /// `settle` called instead. `bus` tries it first for every settlement, so that these
    /// settle without a future of their own. The default always answers `None`.
    fn try_settle(&self, _settlement: &Settlement) -> Option<Result<()>> {
        None
    }

    /// Tells the broker the handler is still working, where the broker would otherwise redeliver
    /// after a timeout (NATS ack wait, SQS visibility). The default does nothing.
    async fn in_progress(&self) -> Result<()> {
        Ok(())
    }

    /// Called, synchronously, when the delivery is dropped unsettled. The message must come back
    /// (now or after the broker's timeout): it is never lost and never counted as processed.
    fn abandon(&self);
}

/// One message received from a subscription or queue, to be settled exactly once.
///
/// Settling consumes the delivery, so settling twice does not compile. If settling fails, the
/// error carries the delivery back ([`SettleError::into_delivery`]) so it can be tried again.
/// A delivery dropped without settlement is redelivered, never lost.
pub struct Delivery {
    envelope: Envelope,
    attempt: u32,
    source: Name,
    group: Option<Name>,
    undecodable: Option<String>,
    settle: Option<Box<dyn Settle>>,
}

impl Delivery {
    /// Made by adapters: `envelope` received from `source` (a topic or queue name) in `group`,
    /// on its `attempt`-th delivery (1 on the first), settled through `settle`.
    ///
    /// The delivery owns the names it is given. An adapter that makes many deliveries with
    /// the same names should keep them as `Arc<str>` and use
    /// [`with_shared_names`](Delivery::with_shared_names), which copies nothing.
    pub fn new(
        envelope: Envelope,
        attempt: u32,
        source: impl Into<String>,
        group: Option<String>,
        settle: Box<dyn Settle>,
    ) -> Self {
        Self {
            envelope,
            attempt: attempt.max(1),
            source: Name::Owned(source.into()),
            group: group.map(Name::Owned),
            undecodable: None,
            settle: Some(settle),
        }
    }

    /// As [`new`](Delivery::new), with names shared with the adapter (and with the
    /// [`DeliveryInfo`](crate::runtime::DeliveryInfo) a handler gets): a subscription keeps
    /// its source and group as `Arc<str>` and clones them into each delivery, so that no
    /// delivery copies a name.
    pub fn with_shared_names(
        envelope: Envelope,
        attempt: u32,
        source: Arc<str>,
        group: Option<Arc<str>>,
        settle: Box<dyn Settle>,
    ) -> Self {
        Self {
            envelope,
            attempt: attempt.max(1),
            source: Name::Shared(source),
            group: group.map(Name::Shared),
            undecodable: None,
            settle: Some(settle),
        }
    }

    /// Marks the delivery as undecodable: what the broker delivered could not be read as a
    /// message `bus` understands, for `reason`. Made by adapters, whose decoding never fails:
    /// the envelope then holds what could be kept of the message (the raw body as payload, the
    /// raw headers, an id derived from the broker's identity of the message), and the
    /// [`Consumer`](crate::Consumer) dead-letters it with the reason instead of running the
    /// handler.
    #[must_use]
    pub fn with_undecodable(mut self, reason: impl Into<String>) -> Self {
        self.undecodable = Some(reason.into());
        self
    }

    /// Why the message could not be decoded, if it could not (see
    /// [`with_undecodable`](Delivery::with_undecodable)). Code that reads a subscription
    /// directly should [`reject`](Delivery::reject) such a delivery with this reason.
    #[must_use]
    pub fn undecodable(&self) -> Option<&str> {
        self.undecodable.as_deref()
    }

    /// The message.
    #[must_use]
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Which delivery this is: 1 on the first, 2 after one redelivery, …
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Counts a retry the [`Consumer`](crate::Consumer) runs in place, without the broker:
    /// the next run sees [`attempt`](Delivery::attempt) one higher.
    pub(crate) fn retry_in_place(&mut self) {
        self.attempt = self.attempt.saturating_add(1);
    }

    /// The topic or queue the message was received from.
    #[must_use]
    pub fn source(&self) -> &str {
        self.source.as_str()
    }

    /// The consumer group it was received in, if any.
    #[must_use]
    pub fn group(&self) -> Option<&str> {
        self.group.as_ref().map(Name::as_str)
    }

    /// The source and group names as the delivery holds them, to share (not copy) when
    /// they were shared with it.
    pub(crate) fn names(&self) -> (&Name, Option<&Name>) {
        (&self.source, self.group.as_ref())
    }

    /// Acknowledges the message: it is processed and will not come again.
    ///
    /// # Errors
    /// When the broker could not record the acknowledgement; the delivery is handed back.
    ///
    /// # Cancel safety
    /// If the future is dropped before it completes, the delivery is dropped unsettled (and so
    /// redelivered) unless the broker had already recorded the acknowledgement.
    pub fn ack(self) -> impl Future<Output = Result<(), SettleError>> + Send {
        self.settle(Settlement::Ack)
    }

    /// Negatively acknowledges the message: it comes again as attempt `attempt + 1`, now or
    /// after a delay.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    ///
    /// # Cancel safety
    /// As [`Delivery::ack`].
    pub fn nack(
        self,
        redeliver: Redeliver,
    ) -> impl Future<Output = Result<(), SettleError>> + Send {
        self.settle(Settlement::Nack(redeliver))
    }

    /// Rejects the message: it goes to the dead-letter queue with `reason`.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    ///
    /// # Cancel safety
    /// As [`Delivery::ack`].
    pub fn reject(
        self,
        reason: impl Into<String>,
    ) -> impl Future<Output = Result<(), SettleError>> + Send {
        let attempts = self.attempt;
        self.settle(Settlement::Reject {
            reason: reason.into(),
            attempts,
        })
    }

    /// Settles the message as `settlement` says.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    ///
    /// # Cancel safety
    /// As [`Delivery::ack`].
    // Not an `async fn`: those copy their arguments into the future's state a second time,
    // and a delivery is ~300 bytes carried by every settle future.
    #[allow(clippy::manual_async_fn)]
    pub fn settle(
        mut self,
        mut settlement: Settlement,
    ) -> impl Future<Output = Result<(), SettleError>> + Send {
        async move {
            if let Settlement::Reject { attempts, .. } = &mut settlement {
                *attempts = (*attempts).max(self.attempt);
            }
            let Some(settle) = self.settle.take() else {
                return Err(SettleError::new(
                    Error::closed("delivery has no settlement handle"),
                    self,
                ));
            };
            // If settling panics or this future is dropped mid-way, `guard` abandons the
            // delivery.
            let guard = AbandonOnDrop(Some(settle));
            let handle = guard.0.as_ref().expect("set above");
            let result = match handle.try_settle(&settlement) {
                Some(result) => result,
                None => handle.settle(settlement).await,
            };
            let mut guard = guard;
            let settle = guard.0.take().expect("set above");
            match result {
                Ok(()) => Ok(()),
                Err(error) => {
                    self.settle = Some(settle);
                    Err(SettleError::new(error, self))
                }
            }
        }
    }

    /// Tells the broker the message is still being worked on, so that it is not redelivered to
    /// another consumer meanwhile (where the broker has such a timeout).
    ///
    /// # Errors
    /// When the broker refused or the connection is gone.
    pub async fn in_progress(&self) -> Result<()> {
        match &self.settle {
            Some(settle) => settle.in_progress().await,
            None => Ok(()),
        }
    }
}

/// A topic, queue or group name held by a [`Delivery`]: its own copy ([`Delivery::new`]), or
/// one shared with the adapter ([`Delivery::with_shared_names`]), which a clone shares too.
#[derive(Clone)]
pub(crate) enum Name {
    Owned(String),
    Shared(Arc<str>),
}

impl Name {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Name::Owned(name) => name,
            Name::Shared(name) => name,
        }
    }

    /// The name as an `Arc<str>`: shared when it is, else copied.
    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    pub(crate) fn to_shared(&self) -> Arc<str> {
        match self {
            Name::Owned(name) => Arc::from(name.as_str()),
            Name::Shared(name) => name.clone(),
        }
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Name {}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

struct AbandonOnDrop(Option<Box<dyn Settle>>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(settle) = self.0.take() {
            settle.abandon();
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(settle) = self.settle.take() {
            settle.abandon();
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("envelope", &self.envelope)
            .field("attempt", &self.attempt)
            .field("source", &self.source())
            .field("group", &self.group())
            .field("undecodable", &self.undecodable)
            .finish_non_exhaustive()
    }
}

/// A failed settlement: the error, and the delivery, still unsettled, to try again with.
pub struct SettleError {
    error: Error,
    delivery: Box<Delivery>,
}

impl SettleError {
    fn new(error: Error, delivery: Delivery) -> Self {
        Self {
            error,
            delivery: Box::new(delivery),
        }
    }

    /// The error.
    #[must_use]
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The delivery, still unsettled.
    #[must_use]
    pub fn into_delivery(self) -> Delivery {
        *self.delivery
    }

    /// Both parts.
    #[must_use]
    pub fn into_parts(self) -> (Error, Delivery) {
        (self.error, *self.delivery)
    }
}

impl fmt::Debug for SettleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SettleError")
            .field("error", &self.error)
            .field("message_id", &self.delivery.envelope.id)
            .finish()
    }
}

impl fmt::Display for SettleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "settling message {} failed: {}",
            self.delivery.envelope.id, self.error
        )
    }
}

impl std::error::Error for SettleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<SettleError> for Error {
    fn from(value: SettleError) -> Self {
        value.error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Default)]
    struct Recorder {
        log: Mutex<Vec<String>>,
        fail_next: Mutex<bool>,
    }

    #[derive(Debug)]
    struct Handle(Arc<Recorder>);

    #[async_trait]
    impl Settle for Handle {
        async fn settle(&self, settlement: Settlement) -> Result<()> {
            if std::mem::take(&mut *self.0.fail_next.lock().unwrap()) {
                return Err(Error::new(ErrorKind::Connection, "lost"));
            }
            self.0.log.lock().unwrap().push(format!("{settlement:?}"));
            Ok(())
        }
        fn abandon(&self) {
            self.0.log.lock().unwrap().push("abandon".into());
        }
    }

    fn delivery(rec: &Arc<Recorder>) -> Delivery {
        Delivery::new(
            Envelope::new("k", "p"),
            1,
            "t",
            None,
            Box::new(Handle(rec.clone())),
        )
    }

    #[tokio::test]
    async fn failed_settlement_hands_the_delivery_back() {
        let rec = Arc::new(Recorder::default());
        *rec.fail_next.lock().unwrap() = true;
        let err = delivery(&rec).ack().await.unwrap_err();
        assert_eq!(err.error().kind(), ErrorKind::Connection);
        err.into_delivery().ack().await.unwrap();
        assert_eq!(*rec.log.lock().unwrap(), vec!["Ack".to_string()]);
    }

    #[tokio::test]
    async fn dropping_unsettled_abandons_once() {
        let rec = Arc::new(Recorder::default());
        drop(delivery(&rec));
        delivery(&rec).reject("bad").await.unwrap();
        assert_eq!(
            *rec.log.lock().unwrap(),
            vec![
                "abandon".to_string(),
                "Reject { reason: \"bad\", attempts: 1 }".to_string()
            ]
        );
    }

    /// Settles acks at once (failing the first when told to), everything else through
    /// `settle`, which records it as "waited"; panics on a reject.
    #[derive(Debug)]
    struct AtOnce(Arc<Recorder>);

    #[async_trait]
    impl Settle for AtOnce {
        fn try_settle(&self, settlement: &Settlement) -> Option<Result<()>> {
            if matches!(settlement, Settlement::Reject { .. }) {
                panic!("the adapter failed while settling");
            }
            if *settlement != Settlement::Ack {
                return None;
            }
            if std::mem::take(&mut *self.0.fail_next.lock().unwrap()) {
                return Some(Err(Error::new(ErrorKind::Connection, "lost")));
            }
            self.0.log.lock().unwrap().push("at once".into());
            Some(Ok(()))
        }
        async fn settle(&self, settlement: Settlement) -> Result<()> {
            self.0
                .log
                .lock()
                .unwrap()
                .push(format!("waited {settlement:?}"));
            Ok(())
        }
        fn abandon(&self) {
            self.0.log.lock().unwrap().push("abandon".into());
        }
    }

    #[tokio::test]
    async fn a_settlement_made_at_once_is_final_and_a_refused_one_hands_the_delivery_back() {
        let rec = Arc::new(Recorder::default());
        let at_once = || {
            Delivery::new(
                Envelope::new("k", "p"),
                1,
                "t",
                None,
                Box::new(AtOnce(rec.clone())),
            )
        };
        *rec.fail_next.lock().unwrap() = true;
        let err = at_once().ack().await.unwrap_err();
        assert_eq!(err.error().kind(), ErrorKind::Connection);
        err.into_delivery().ack().await.unwrap();
        at_once().nack(Redeliver::Now).await.unwrap();
        drop(at_once());
        // A panic while settling at once leaves the delivery unsettled: it is abandoned.
        let panicked = tokio::spawn(at_once().reject("bad")).await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(
            *rec.log.lock().unwrap(),
            vec![
                "at once".to_string(),
                "waited Nack(Now)".to_string(),
                "abandon".to_string(),
                "abandon".to_string()
            ]
        );
    }
}
