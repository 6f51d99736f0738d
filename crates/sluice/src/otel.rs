//! OpenTelemetry traces (cargo feature `otel`): when `SLUICE_OTLP_ENDPOINT`
//! is set (e.g. `http://127.0.0.1:4318/v1/traces`), the spans of every stage
//! — `ingest.request`, `dedup.batch`, `route.batch`, `deliver.attempt` — are
//! exported over OTLP/HTTP (protobuf) in batches. Off unless the variable is
//! set. The feature is on by default (one build serves `scripts/run.sh` and
//! `scripts/test.sh`); built without it, nothing of OpenTelemetry is linked
//! and the spans (debug level) cost a disabled-callsite check.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Flushes and stops the exporter when dropped (at the end of `main`).
pub struct OtelGuard(SdkTracerProvider);

impl Drop for OtelGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("OpenTelemetry: flushing spans at exit failed: {e}");
        }
    }
}

/// The tracing layer exporting Sluice's spans, if `SLUICE_OTLP_ENDPOINT` is set.
pub fn layer<S>() -> Option<(impl Layer<S>, OtelGuard)>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let endpoint = std::env::var("SLUICE_OTLP_ENDPOINT").ok().filter(|e| !e.is_empty())?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_http().with_endpoint(endpoint.clone()).build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("OpenTelemetry: cannot export to {endpoint}: {e}; traces are off");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("sluice").build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer("sluice");
    let targets = ["sluice", "sluice_ingest", "sluice_dedup", "sluice_route", "sluice_deliver", "sluice_log"]
        .into_iter()
        .fold(Targets::new(), |t, target| t.with_target(target, tracing::Level::DEBUG));
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(targets);
    Some((layer, OtelGuard(provider)))
}
