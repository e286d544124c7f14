//! The conformance kit (`fhirgate_adapters::conformance`) run for every shipped adapter against
//! its simulator personality: one test per check per vendor. `cargo test -p fhirgate-adapters
//! --features conformance --test conformance`.

use fhirgate_adapters::conformance::Personality;
use fhirgate_adapters::conformance_suite;

conformance_suite!(epic, Personality::Epic);
conformance_suite!(cerner, Personality::Cerner);
conformance_suite!(generic, Personality::Generic);
conformance_suite!(athena, Personality::Athena);

/// The adapter form-urlencodes a client id and secret before HTTP Basic (RFC 6749 section
/// 2.3.1), as the simulator now requires: characters that matter (`:`, `+`, space) survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_secret_with_reserved_characters_authenticates() {
    use fhirgate_adapters::conformance::{sim_config, Kit, SimCredential};
    let mut config = sim_config(Personality::Cerner);
    config.client_id = "kit:cerner account".into();
    config.credential = SimCredential::ClientSecret("s3cr+t:/x y%".into());
    let kit = Kit::start(config).await;
    let id = kit.sim.patient_ids()[0].clone();
    kit.adapter
        .patient(&id)
        .await
        .expect("a read with the token");
    assert_eq!(kit.sim.controls().counters().tokens_granted, 1);
    assert_eq!(kit.sim.controls().counters().tokens_refused, 0);
    kit.stop().await;
}
