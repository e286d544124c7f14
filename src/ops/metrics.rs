//! Prometheus metrics. Labels are bounded and PHI-free by construction: route *templates*
//! (`/fhir/r4/Patient/{id}`, never a path with an id in it), method, status code.

use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::store::PoolStats;

/// Route label for requests no route matched (their raw paths could carry ids).
pub const UNMATCHED_ROUTE: &str = "<unmatched>";

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    pool_size: IntGauge,
    pool_idle: IntGauge,
    pool_max: IntGauge,
    rate_limited: IntCounterVec,
    queue_depth: IntGaugeVec,
    queue_oldest: GaugeVec,
    dead_letters: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("fhirgate".into()), None)
            .expect("the prefix is a valid metric name");
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route template, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route template and method",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["route", "method"],
        )
        .expect("valid metric");
        let pool_size = IntGauge::new("db_pool_connections", "Open database connections")
            .expect("valid metric");
        let pool_idle = IntGauge::new("db_pool_idle_connections", "Idle database connections")
            .expect("valid metric");
        let pool_max = IntGauge::new("db_pool_max_connections", "Database pool size limit")
            .expect("valid metric");
        let rate_limited = IntCounterVec::new(
            Opts::new("rate_limited_total", "Requests refused with 429, by quota"),
            &["quota"],
        )
        .expect("valid metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "queue_depth",
                "Rows waiting in a durable queue (outbox, webhook_inbox, quarantine), by connection",
            ),
            &["queue", "connection"],
        )
        .expect("valid metric");
        let queue_oldest = GaugeVec::new(
            Opts::new(
                "queue_oldest_age_seconds",
                "Age of the oldest row waiting in a durable queue, by connection",
            ),
            &["queue", "connection"],
        )
        .expect("valid metric");
        let dead_letters = IntGaugeVec::new(
            Opts::new(
                "outbox_dead_letters",
                "Claim-status updates moved to the dead letters, by connection",
            ),
            &["connection"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(dead_letters.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(queue_depth.clone()),
            Box::new(queue_oldest.clone()),
            Box::new(rate_limited.clone()),
            Box::new(requests.clone()),
            Box::new(latency.clone()),
            Box::new(pool_size.clone()),
            Box::new(pool_idle.clone()),
            Box::new(pool_max.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            latency,
            pool_size,
            pool_idle,
            pool_max,
            rate_limited,
            queue_depth,
            queue_oldest,
            dead_letters,
        }
    }

    /// `quota` is a policy name (`client`, `practice`, `global`, `token`), never a key.
    pub fn observe_rate_limited(&self, quota: &str) {
        self.rate_limited.with_label_values(&[quota]).inc();
    }

    pub fn observe_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let buf = itoa_status(status);
        let status = std::str::from_utf8(&buf).unwrap_or("000");
        self.requests
            .with_label_values(&[route, method, status])
            .inc();
        self.latency
            .with_label_values(&[route, method])
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_pool(&self, stats: PoolStats) {
        self.pool_size.set(i64::from(stats.size));
        self.pool_idle.set(i64::from(stats.idle));
        self.pool_max.set(i64::from(stats.max));
    }

    /// Replaces the queue gauges (a connection whose queue emptied or that was removed drops
    /// out rather than reporting a stale figure).
    pub fn observe_queues(&self, health: &[super::queues::QueueHealth]) {
        self.queue_depth.reset();
        self.queue_oldest.reset();
        for q in health {
            let labels = [q.queue, q.connection_id.as_str()];
            self.queue_depth.with_label_values(&labels).set(q.depth);
            self.queue_oldest
                .with_label_values(&labels)
                .set(q.oldest_age_secs);
        }
    }

    pub fn observe_dead_letters(&self, counts: &[(String, i64)]) {
        self.dead_letters.reset();
        for (connection, n) in counts {
            self.dead_letters
                .with_label_values(&[connection.as_str()])
                .set(*n);
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding our own registry into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A status code as three ASCII digits, without allocating.
fn itoa_status(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

/// Methods outside the standard set share one label so a client cannot mint label values.
pub fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_counted_under_its_route_template() {
        let m = Metrics::new();
        m.observe_request("/fhir/r4/metadata", "GET", 200, Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains(
            r#"fhirgate_http_requests_total{method="GET",route="/fhir/r4/metadata",status="200"} 1"#
        ), "{text}");
        assert!(text.contains("fhirgate_http_request_duration_seconds_bucket"));
    }
}
