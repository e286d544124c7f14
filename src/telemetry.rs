//! Logging through `tracing`: JSON lines (or pretty for a terminal) with the request span's
//! fields (request id, method, route template) on every line emitted while serving a request.
//! Nothing here may format PHI; callers log ids and counts, never resource content.

use tracing::subscriber::set_global_default;
use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Builds a subscriber writing to `sink` (stdout in `main`, a buffer or sink in tests).
pub fn get_subscriber<Sink>(
    filter: &str,
    format: LogFormat,
    sink: Sink,
) -> Box<dyn Subscriber + Send + Sync>
where
    Sink: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_target(true);
    match format {
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
        LogFormat::Pretty => Box::new(builder.with_ansi(true).finish()),
    }
}

/// Installs the subscriber for the whole process. A second call (tests) is ignored.
pub fn init_subscriber(subscriber: Box<dyn Subscriber + Send + Sync>) {
    let _ = set_global_default(subscriber);
}
