//! W3C Trace Context over Kafka headers (feature `otel`): one call followed across
//! services.
//!
//! A client writes `traceparent` (and `tracestate` when the context has one) from the
//! OpenTelemetry context of its `rpc.request` span, which is a child of the caller's
//! current span. A server reads them from the request record and makes its
//! `rpc.handle` span a child of that context, so the handler's work (and anything it
//! calls) lands in the caller's trace. The headers are the ones Spring (Micrometer
//! Tracing) and NestJS (OpenTelemetry's kafkajs instrumentation) write and read, so a
//! trace crosses those peers the same way.
//!
//! Both spans are DEBUG-level `tracing` spans; the application turns them into
//! OpenTelemetry spans with a `tracing_opentelemetry` layer that lets `kafka_rpc=debug`
//! through. Without the feature, or without such a layer, nothing is written and
//! incoming headers are ignored. The header names are in `docs/wire-format.md`.

use crate::transport::{Header, Record};

/// The W3C `traceparent` header: `00-<trace id>-<parent span id>-<flags>`.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header: vendor-specific key-value pairs riding with the trace.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) const TRACESTATE: &str = "tracestate";

/// Adds the trace context of `span` to a request's `headers`, unless the caller set
/// `traceparent` itself (a value passed through from elsewhere wins). When `span` is
/// not recorded by an OpenTelemetry layer (filtered out), the caller's current span's
/// context is written instead, so the trace still continues.
#[cfg_attr(not(feature = "otel"), allow(unused_variables, clippy::ptr_arg))]
pub(crate) fn inject(span: &tracing::Span, headers: &mut Vec<Header>) {
    #[cfg(feature = "otel")]
    otel::inject(span, headers);
}

/// Makes `span` a child of the trace context carried by `record`, if it carries a valid
/// one. Call before `span` is first entered: an OpenTelemetry span's parent is fixed
/// when it starts.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn extract(record: &Record, span: &tracing::Span) {
    #[cfg(feature = "otel")]
    otel::extract(record, span);
}

#[cfg(feature = "otel")]
mod otel {
    use std::borrow::Cow;

    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{TRACEPARENT, TRACESTATE};
    use crate::transport::{Header, Record};

    struct Headers<'a>(&'a mut Vec<Header>);

    impl Injector for Headers<'_> {
        fn set(&mut self, key: &str, value: String) {
            let key = match key {
                TRACEPARENT => Cow::Borrowed(TRACEPARENT),
                TRACESTATE => Cow::Borrowed(TRACESTATE),
                other => Cow::Owned(other.to_owned()),
            };
            self.0.push(Header { key, value: value.into() });
        }
    }

    struct RecordHeaders<'a>(&'a Record);

    impl Extractor for RecordHeaders<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            // A value that is not UTF-8 is no valid trace context: the span starts a new trace.
            // A repeated header is read as its last value (`Headers.lastHeader`), as
            // OpenTelemetry Java's Kafka getter and Micrometer's read `tracestate`; the
            // W3C rule that joins repeated `tracestate` fields with commas is HTTP's, and
            // the Kafka propagators do not apply it, so neither do we.
            self.0.header(key).and_then(|v| std::str::from_utf8(v).ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.headers.iter().map(|h| h.key.as_ref()).collect()
        }
    }

    pub(super) fn inject(span: &tracing::Span, headers: &mut Vec<Header>) {
        if headers.iter().any(|h| h.key == TRACEPARENT) {
            return;
        }
        let valid = |cx: &opentelemetry::Context| cx.span().span_context().is_valid();
        let mut cx = span.context();
        if !valid(&cx) {
            cx = tracing::Span::current().context();
        }
        if valid(&cx) {
            TraceContextPropagator::new().inject_context(&cx, &mut Headers(headers));
        }
    }

    pub(super) fn extract(record: &Record, span: &tracing::Span) {
        let cx = TraceContextPropagator::new().extract(&RecordHeaders(record));
        if cx.span().span_context().is_valid() {
            // Fails only when the span is not recorded by an OpenTelemetry layer: then
            // there is no span to parent.
            let _ = span.set_parent(cx);
        }
    }
}
