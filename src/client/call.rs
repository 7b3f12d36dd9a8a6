//! One call's future, from its registration to its decoded reply, and how a reply is
//! read: the server's error, or the response in the codec the reply names.

use super::in_flight;
use crate::codec::ContentType;
use crate::error::RpcError;
use crate::metrics::CallMetrics;
use crate::transport::Record;
use crate::wire;

pin_project_lite::pin_project! {
    /// One call, from its registration to its decoded reply, with its metrics.
    /// `R` is the type its reply decodes to.
    ///
    /// A named future: the `async` blocks it replaces kept each part twice (captured,
    /// then moved into the awaited future), 832 bytes that every caller moves, and
    /// that `FuturesUnordered` or `tokio::spawn` box once per request.
    pub(super) struct Call<R> {
        // `None` once finished, or when the call failed before it was sent.
        #[pin]
        pending: Option<in_flight::PendingReply>,
        // Why the call failed before it was sent.
        failed: Option<RpcError>,
        content_type: ContentType,
        span: tracing::Span,
        metrics: CallMetrics,
        started: tokio::time::Instant,
        _response: std::marker::PhantomData<fn() -> R>,
    }
}

impl<R> Call<R> {
    /// The call `sent` made: waiting on its reply, or failed before it was sent.
    /// `started` is when it was made, for its round-trip metric.
    pub(super) fn new(
        sent: Result<(in_flight::PendingReply, tracing::Span), RpcError>,
        content_type: ContentType,
        metrics: CallMetrics,
        started: tokio::time::Instant,
    ) -> Self {
        let (pending, failed, span) = match sent {
            Ok((pending, span)) => {
                metrics.sent();
                (Some(pending), None, span)
            }
            Err(e) => (None, Some(e), tracing::Span::none()),
        };
        Call { pending, failed, content_type, span, metrics, started, _response: std::marker::PhantomData }
    }
}

impl<R: serde::de::DeserializeOwned> std::future::Future for Call<R> {
    type Output = Result<R, RpcError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let outcome = match this.pending.as_mut().as_pin_mut() {
            Some(pending) => {
                let outcome = std::task::ready!(pending.poll(cx)).and_then(|reply| decode_reply(&reply.record, *this.content_type));
                // Unregistered now, not when the caller gets round to dropping this.
                this.pending.set(None);
                outcome
            }
            // Polled again after it finished: there is nothing left to give.
            None => Err(this.failed.take().unwrap_or(RpcError::Closed)),
        };
        this.metrics.finished(this.started.elapsed(), &outcome);
        std::task::Poll::Ready(outcome)
    }
}

/// A reply's outcome: the server's error, or its response decoded as `R`.
fn decode_reply<R: serde::de::DeserializeOwned>(reply: &Record, content_type: ContentType) -> Result<R, RpcError> {
    let meta = wire::decode_reply_as(reply, content_type);
    if let Some(error) = meta.error {
        tracing::debug!(code = %error.code, "error reply");
        return Err(RpcError::Remote(error));
    }
    // A value read in a codec it was not written in can come out as a wrong value
    // instead of an error, so an unknown codec is an error.
    Ok(meta.content_type?.decode_value(reply.value.as_deref())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_in_a_codec_nobody_knows_is_an_error_not_a_guess() {
        let mut reply = Record::new(None::<Vec<u8>>, b"5".to_vec());
        reply.headers.push(crate::transport::Header { key: wire::names::CONTENT_TYPE.into(), value: bytes::Bytes::from_static(b"text/plain") });
        let outcome = decode_reply::<u8>(&reply, ContentType::Json);
        assert!(matches!(outcome, Err(RpcError::Codec(crate::codec::CodecError::Unsupported(_)))), "{outcome:?}");
    }

    #[test]
    fn json_replies_are_read_as_a_nestjs_client_reads_them() {
        let json = |v: Option<&[u8]>| ContentType::Json.decode_value::<Option<String>>(v);
        assert_eq!(json(Some(br#""quoted""#)).unwrap(), Some("quoted".into()));
        assert_eq!(json(Some(b"pong")).unwrap(), Some("pong".into()), "NestJS writes strings unquoted");
        assert_eq!(json(None).unwrap(), None, "a handler that returned nothing");
        assert!(ContentType::Json.decode_value::<u32>(Some(b"\"7\"")).is_err(), "valid JSON of another type stays an error");
        assert!(ContentType::Json.decode_value::<u32>(Some(b"pong")).is_err());
        assert!(ContentType::Bincode.decode_value::<u32>(None).is_err(), "bincode keeps an empty value an error");
    }
}
