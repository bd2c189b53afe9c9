//! Request-reply: round trip, timeout, no responders.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::conformance::support::{assert_same, skip, unique};
use crate::conformance::Harness;
use crate::{Envelope, ErrorKind, Request, Requests, ServeOptions};

fn no_request_reply(case: &str, h: &Harness) -> bool {
    let caps = h.capabilities();
    match caps.request_reply.unsupported_reason() {
        Some(reason) => {
            skip(
                case,
                format!("{}: request-reply unsupported: {reason}", caps.name),
            );
            true
        }
        None => false,
    }
}

async fn serve(h: &Harness, topic: &str, case: &str) -> Requests {
    h.broker
        .serve(topic, ServeOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{case}: serve on `{topic}` failed: {e}"))
}

/// Spawns a responder that hands every request to `handle` and reports what it received.
fn respond<F, Fut>(
    mut requests: Requests,
    case: &'static str,
    handle: F,
) -> mpsc::UnboundedReceiver<Envelope>
where
    F: Fn(Request) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (seen, reports) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(item) = requests.next().await {
            match item {
                Ok(request) => {
                    let _ = seen.send(request.envelope().clone());
                    handle(request).await;
                }
                Err(e) => println!("note: {case}: responder receive error: {e}"),
            }
        }
    });
    reports
}

/// Concurrent requests each get their own reply: correlation id = the request's, causation id
/// = the request's id, content as the responder wrote it; the responder sees each request
/// intact.
pub async fn request_reply_round_trip(h: Harness) {
    const CASE: &str = "request_reply_round_trip";
    if no_request_reply(CASE, &h) {
        return;
    }
    let topic = unique("rr");
    let requests = serve(&h, &topic, CASE).await;
    let mut seen = respond(requests, CASE, |request| async move {
        let env = request.envelope();
        let reply = Envelope::new(
            "conf.reply",
            format!("reply to {}", String::from_utf8_lossy(&env.payload)),
        )
        .with_header(
            "x-conf-echo",
            env.header("x-conf-index").unwrap_or("missing"),
        );
        if let Err(e) = request.reply(reply).await {
            println!("note: {CASE}: reply failed: {e}");
        }
    });
    let sent: Vec<Envelope> = (0..5)
        .map(|i| {
            Envelope::new("conf.request", format!("request {i}"))
                .with_correlation_id(format!(
                    "conf-conversation-{i}-{}",
                    uuid::Uuid::now_v7().simple()
                ))
                .with_header("x-conf-index", i.to_string())
        })
        .collect();
    let replies = futures::future::join_all(
        sent.iter()
            .map(|request| h.broker.request(&topic, request.clone(), h.receive_timeout)),
    )
    .await;
    for (i, (request, reply)) in sent.iter().zip(replies).enumerate() {
        let reply = reply.unwrap_or_else(|e| panic!("{CASE}: request {i} failed: {e}"));
        assert_eq!(reply.kind, "conf.reply", "{CASE}: reply kind");
        assert_eq!(
            reply.payload,
            format!("reply to request {i}").as_bytes(),
            "{CASE}: reply {i} payload (replies crossed?)"
        );
        assert_eq!(
            reply.header("x-conf-echo"),
            Some(i.to_string().as_str()),
            "{CASE}: reply header"
        );
        assert_eq!(
            reply.correlation_id, request.correlation_id,
            "{CASE}: reply correlation id"
        );
        assert_eq!(
            reply.causation_id.as_ref(),
            Some(&request.id),
            "{CASE}: reply causation id"
        );
    }
    for _ in 0..sent.len() {
        let got = tokio::time::timeout(h.receive_timeout, seen.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{CASE}: the responder did not report every request"));
        let request = sent
            .iter()
            .find(|r| r.id == got.id)
            .unwrap_or_else(|| panic!("{CASE}: the responder got {}, which was not sent", got.id));
        assert_same(
            request,
            &got,
            &format!("{CASE}: request as the responder saw it"),
        );
    }
}

/// A request whose responder never answers fails with `ErrorKind::Timeout` after about the
/// timeout: not before it, and not much later.
pub async fn request_timeout(h: Harness) {
    const CASE: &str = "request_timeout";
    const TIMEOUT: Duration = Duration::from_millis(500);
    if no_request_reply(CASE, &h) {
        return;
    }
    let topic = unique("rrto");
    let requests = serve(&h, &topic, CASE).await;
    let (hold, mut held) = mpsc::unbounded_channel();
    // The responder keeps every request unanswered until the case ends.
    let mut seen = respond(requests, CASE, move |request| {
        let _ = hold.send(request);
        async {}
    });
    let request = Envelope::new("conf.request", "nobody answers");
    let started = Instant::now();
    let result = h.broker.request(&topic, request.clone(), TIMEOUT).await;
    let elapsed = started.elapsed();
    let err = match result {
        Ok(reply) => panic!("{CASE}: got a reply nobody sent: {reply:?}"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::Timeout, "{CASE}: error kind ({err})");
    assert!(err.is_timeout(), "{CASE}: Error::is_timeout");
    let late = Duration::from_secs(2).max(h.quiet_period * 4);
    assert!(
        elapsed + Duration::from_millis(5) >= TIMEOUT,
        "{CASE}: timed out after {elapsed:?}, before the {TIMEOUT:?} timeout"
    );
    assert!(
        elapsed <= TIMEOUT + late,
        "{CASE}: timed out only after {elapsed:?}, for a {TIMEOUT:?} timeout"
    );
    let got = tokio::time::timeout(h.receive_timeout, seen.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{CASE}: the responder never got the request"));
    assert_eq!(got.id, request.id, "{CASE}: request the responder got");
    held.close();
}

/// A request to a topic nobody serves fails fast with `ErrorKind::NoResponders`, well before
/// its timeout.
pub async fn request_no_responders(h: Harness) {
    const CASE: &str = "request_no_responders";
    if no_request_reply(CASE, &h) {
        return;
    }
    let caps = h.capabilities();
    if !caps.no_responders_detection {
        skip(
            CASE,
            format!(
                "{} cannot tell that nobody serves a topic (Capabilities::no_responders_detection \
                 is false); such requests time out",
                caps.name
            ),
        );
        return;
    }
    let topic = unique("rrnone");
    let timeout = h.receive_timeout;
    let started = Instant::now();
    let result = h
        .broker
        .request(&topic, Envelope::new("conf.request", "anyone?"), timeout)
        .await;
    let elapsed = started.elapsed();
    let err = match result {
        Ok(reply) => panic!("{CASE}: got a reply nobody sent: {reply:?}"),
        Err(e) => e,
    };
    assert_eq!(
        err.kind(),
        ErrorKind::NoResponders,
        "{CASE}: error kind ({err})"
    );
    assert!(
        elapsed < timeout / 2,
        "{CASE}: took {elapsed:?} of the {timeout:?} timeout to find there are no responders"
    );
}
