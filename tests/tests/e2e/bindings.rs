//! What a running control plane binds to the events exchange: each binding is a queue write
//! per matching event, so this is part of what a job costs the broker (docs/performance.md,
//! "Broker operations per job"). Only the audit stream takes every event; the coalescer takes
//! only the `queued` events of jobs with a coalescing key; a type with admission follows only
//! its final events; a type without admission follows none.

use std::{collections::BTreeSet, process::Command};

use crate::{
    series::{free_port, spawn_serve, until},
    support::Env,
};

/// (destination, routing key) of every binding on `exchange`, from `rabbitmqctl`.
fn bindings(exchange: &str) -> BTreeSet<(String, String)> {
    let out = Command::new("rabbitmqctl").args(["list_bindings", "-s", "source_name", "destination_name", "routing_key"]).output();
    let out = out.expect("rabbitmqctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            (f.next()? == exchange).then(|| (f.next().unwrap_or("").to_string(), f.next().unwrap_or("").to_string()))
        })
        .collect()
}

#[tokio::test]
async fn the_events_exchange_feeds_the_stream_keyed_coalescing_and_final_events_of_admitted_types() {
    let env = Env::new(&["noop", "fair"]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/jobs.db", dir.path().display());
    let config = dir.path().join("control.toml");
    std::fs::write(&config, "job_types = [\"noop\", \"fair\"]\n\n[policy.fair]\nfair_share = true\n").unwrap();
    let serve = spawn_serve(&env, &db, dir.path(), free_port(), &["--config".as_ref(), config.as_os_str()]);
    let exchange = env.topo.events_exchange();
    let coalesce = trainyard::coalesce::Coalescer::queue_name(&env.topo);
    let finals = ["succeeded", "failed", "dead", "cancelled", "superseded"];
    until("the control plane's bindings", || {
        let (exchange, coalesce) = (exchange.clone(), coalesce.clone());
        async move {
            let got = bindings(&exchange);
            got.contains(&(coalesce, "coalesce".into())) && finals.iter().all(|s| got.iter().any(|(_, k)| *k == format!("fair.{s}")))
        }
    })
    .await;
    // Give a late binding (one this release should not make) time to appear.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let got = bindings(&exchange);
    let keys: BTreeSet<&str> = got.iter().map(|(_, k)| k.as_str()).collect();
    let mut expected: BTreeSet<String> = finals.iter().map(|s| format!("fair.{s}")).collect();
    expected.extend(["#".to_string(), "coalesce".to_string()]);
    assert_eq!(keys, expected.iter().map(String::as_str).collect::<BTreeSet<_>>(), "{got:?}");
    assert!(got.contains(&(env.topo.events_log(), "#".into())), "{got:?}");
    assert_eq!(got.len(), expected.len(), "one queue per key: {got:?}");
    drop(serve);
    env.cleanup().await;
}
