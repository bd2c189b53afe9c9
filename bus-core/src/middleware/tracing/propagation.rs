//! W3C trace context in [`Envelope::headers`]: `traceparent` and `tracestate`.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;

use crate::headers::{TRACEPARENT, TRACESTATE};
use crate::{Envelope, Headers};

/// Writes propagation fields into envelope [`Headers`], for a
/// [`TextMapPropagator`](opentelemetry::propagation::TextMapPropagator).
///
/// Empty values are not written (an empty `tracestate` would only use up one of the few
/// headers some brokers allow).
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            self.0.remove(key);
        } else {
            self.0.insert(key.to_owned(), value);
        }
    }
}

/// Reads propagation fields from envelope [`Headers`], for a
/// [`TextMapPropagator`](opentelemetry::propagation::TextMapPropagator).
#[derive(Debug, Clone, Copy)]
pub struct HeaderExtractor<'a>(pub &'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes the span context of `cx` into `envelope`'s `traceparent` and `tracestate` headers,
/// replacing any there. Writes nothing (and removes nothing) when `cx` has no valid span
/// context.
///
/// [`TracedBroker`](super::TracedBroker) does this on every publish; call it yourself to send
/// a context through a path that is not traced, e.g. a reply to a request.
pub fn inject_context(cx: &Context, envelope: &mut Envelope) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    // A stale `tracestate` must not outlive the `traceparent` it belonged to.
    envelope.headers.remove(TRACESTATE);
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(&mut envelope.headers));
}

/// The remote span context carried in `envelope`'s `traceparent` / `tracestate` headers, on top
/// of the current context (so its other values, e.g. baggage, are kept). When the headers are
/// missing or malformed this is the current context unchanged.
///
/// ```
/// use bus_core::Envelope;
/// use bus_core::middleware::tracing::extract_context;
/// use opentelemetry::trace::TraceContextExt;
///
/// let envelope = Envelope::new("order.placed", "{}")
///     .with_header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// let cx = extract_context(&envelope);
/// assert_eq!(
///     cx.span().span_context().trace_id().to_string(),
///     "4bf92f3577b34da6a3ce929d0e0e4736"
/// );
/// ```
#[must_use]
pub fn extract_context(envelope: &Envelope) -> Context {
    TraceContextPropagator::new()
        .extract_with_context(&Context::current(), &HeaderExtractor(&envelope.headers))
}

/// The valid remote span context in `envelope`'s headers, if any.
pub(crate) fn remote_span_context(envelope: &Envelope) -> Option<SpanContext> {
    envelope.headers.get(TRACEPARENT)?;
    let cx = TraceContextPropagator::new()
        .extract_with_context(&Context::new(), &HeaderExtractor(&envelope.headers));
    let span_context = cx.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}
