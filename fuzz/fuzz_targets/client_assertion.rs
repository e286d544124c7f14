//! See `fhirgate::fuzzing::client_assertion`.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod alloc_limit;

fuzz_target!(|data: &[u8]| fhirgate::fuzzing::client_assertion(data));
