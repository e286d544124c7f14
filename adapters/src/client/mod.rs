//! The outbound client every adapter shares (issue 5, "Shared client behaviour"): OAuth tokens
//! ([`oauth`]), one audited, rate-limited, retrying HTTP client per connection behind a circuit
//! breaker ([`http`], [`breaker`], [`retry`]), and searchset / NDJSON listings as page streams
//! ([`paging`], [`ndjson`]).
//!
//! It owns every byte that leaves for an EHR. It never logs, and never puts in an error, a URL's
//! query string, a resource id, a body, a token, a secret or an assertion: errors name HTTP
//! statuses, OAuth error codes and OperationOutcome issue codes only.

pub mod breaker;
pub mod http;
pub mod ndjson;
pub mod oauth;
pub mod paging;
pub mod retry;
pub mod settings;

pub use breaker::CircuitBreaker;
pub use http::{EhrClient, OutboundRequest};
pub use oauth::{AccessToken, TokenSource};
pub use paging::{same_origin, search_pages};
pub use retry::{backoff_delay, parse_retry_after, RetryPolicy};
pub use settings::ClientSettings;
