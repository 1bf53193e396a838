//! Integration tests of the control plane against the real RabbitMQ
//! (localhost, guest/guest) and PostgreSQL (127.0.0.1:5432, database `test`).
//! Every test uses its own topology prefix and store, and cleans up.

mod api;
mod cli;
mod confirms;
mod console;
mod dead_letters;
mod fanout;
mod helpers;
mod listing;
mod openapi;
mod openapi_cases;
mod recorder;
mod refused;
mod replay;
mod schedule_faults;
mod schedules;
mod stream_position;
mod submits;
mod versions;
