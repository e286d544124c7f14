//! The conformance kit (`fhirgate_adapters::conformance`) run for every shipped adapter against
//! its simulator personality: one test per check per vendor. `cargo test -p fhirgate-adapters
//! --features conformance --test conformance`.

use fhirgate_adapters::conformance::Personality;
use fhirgate_adapters::conformance_suite;

conformance_suite!(epic, Personality::Epic);
conformance_suite!(cerner, Personality::Cerner);
conformance_suite!(generic, Personality::Generic);
