//! See `fhirgate::fuzzing::transaction_bundle`.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod alloc_limit;

fuzz_target!(|data: &[u8]| fhirgate::fuzzing::transaction_bundle(data));
