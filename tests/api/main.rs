//! Integration tests: the real gateway on a random port against a real database (SQLite, or
//! PostgreSQL when FHIRGATE_TEST_POSTGRES_URL is set).

mod audit;
mod audit_event;
mod auth;
mod binary;
mod bundle;
mod care;
mod claim_prepare;
mod claim_push;
mod connections;
mod db_outage;
mod ehr_faults;
mod export;
mod fhir_surface;
mod helpers;
mod hostile;
mod internal_api;
mod isolation;
mod keys;
mod kill;
mod operations;
mod patient;
mod rate_limits;
mod storage;
mod sync_jobs;
mod webhooks;
