//! See `fhirgate::fuzzing::search_params`.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod alloc_limit;

fuzz_target!(|data: &[u8]| fhirgate::fuzzing::search_params(data));
