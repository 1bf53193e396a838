//! Every management command of the `trainyard` binary against a live stack,
//! directly (store + broker) and through the API (`--server`).

use lapin::{
    options::{BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties,
};
use serde_json::Value;
use trainyard::config::ControlConfig;
use trainyard_common::{artifacts::ArtifactStore, codec, event::event_seq, headers, JobEvent, JobStatus};

use crate::{api::start, helpers::*};

/// Runs `trainyard ARGS --json` against the server's store, artifacts and topology.
async fn cli(server: &crate::api::Server, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainyard"))
        .args(args)
        .arg("--json")
        .env("TRAINYARD_DATABASE_URL", &server.db_url)
        .env("TRAINYARD_ARTIFACTS", server.artifacts_dir.path())
        .env("TRAINYARD_PREFIX", server.topo.prefix())
        .env("TRAINYARD_AMQP_URL", AMQP_URL)
        .env_remove("TRAINYARD_SERVER")
        .env_remove("TRAINYARD_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "trainyard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("trainyard {args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
async fn every_cli_command_works_directly_and_through_the_api() {
    let server = start(&["noop", "intent-train"], "admin-tok", 64 * 1024, ControlConfig::default()).await;
    let url = server.url("");
    let with = |args: &[&'static str], remote: bool| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if remote {
            v.extend(["--server", url.as_str(), "--token", "admin-tok"].map(String::from));
        }
        v
    };
    let (_conn, ch) = channel().await;
    let artifacts = ArtifactStore::open(server.artifacts_dir.path().to_str().unwrap()).unwrap();

    // A finished training job with outputs and a log, as a worker leaves it.
    let mut trained = spec("intent-train", "banking");
    trained.priority = trainyard_common::job::Priority::High;
    trained.coalesce_key = Some(trained.bot_coalesce_key());
    let id = trained.job_id.clone();
    publish_event(&ch, &server.topo, &JobEvent::queued(&trained)).await;
    publish_event(&ch, &server.topo, &JobEvent::new(&trained, JobStatus::Started, 1, event_seq(1, 0, 0))).await;
    publish_event(&ch, &server.topo, &JobEvent::new(&trained, JobStatus::Succeeded, 1, event_seq(1, 0, 1))).await;
    artifacts
        .put_json(&format!("jobs/{id}/metrics.json"), &serde_json::json!({"accuracy": 0.9, "macro_f1": 0.8, "per_class": {}}))
        .await
        .unwrap();
    artifacts
        .put_json(&format!("jobs/{id}/confusion_matrix.json"), &serde_json::json!({"labels": ["a", "b"], "matrix": [[3, 1], [0, 4]]}))
        .await
        .unwrap();
    artifacts.put(&format!("jobs/{id}/model/model.bin"), "weights").await.unwrap();
    artifacts.put(&format!("jobs/{id}/model/config.json"), "{}").await.unwrap();
    artifacts.put(&trainyard_common::artifacts::keys::attempt_log(&id, 1), "epoch 1/1 loss 0.4\ndone\n").await.unwrap();
    let store = trainyard::store::Store::open(&server.db_url).await.unwrap();
    eventually(20, "recorded", || async { store.job(&id).await.unwrap().filter(|j| j.status == JobStatus::Succeeded) }).await;

    for remote in [false, true] {
        let list = cli(
            &server,
            &with(&["jobs", "list", "--type", "intent-train", "--since", "1h"], remote).iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
        assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
        assert_eq!(list[0]["job_id"], id.as_str());
        let show = cli(&server, &with(&["jobs", "show"], remote).iter().map(String::as_str).chain([id.as_str()]).collect::<Vec<_>>()).await;
        assert_eq!(show["status"], "succeeded");
        assert_eq!(show["attempts"], 1);
        assert_eq!(show["events"].as_array().unwrap().len(), 3);
        assert_eq!(show["metrics"]["accuracy"], 0.9);
        assert_eq!(show["confusion_matrix"]["matrix"][0][0], 3);
        assert_eq!(show["logs"], serde_json::json!([1]));
    }
    // Logs (plain text, so no --json parsing).
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainyard"))
        .args(["jobs", "logs", &id, "--server", &url, "--token", "admin-tok"])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("epoch 1/1 loss 0.4"), "{out:?}");
    // A job without a saved log says why, and fails.
    let quiet = spec("noop", "bot-q");
    publish_event(&ch, &server.topo, &JobEvent::queued(&quiet)).await;
    eventually(20, "queued", || async { store.job(&quiet.job_id).await.unwrap() }).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainyard"))
        .args(["jobs", "logs", &quiet.job_id, "--server", &url, "--token", "admin-tok"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no saved log"), "{out:?}");

    // Cancel a queued job; cancelling a finished one is refused.
    let queued = spec("noop", "bot-c");
    publish_event(&ch, &server.topo, &JobEvent::queued(&queued)).await;
    eventually(20, "queued", || async { store.job(&queued.job_id).await.unwrap() }).await;
    let cancel = cli(&server, &["jobs", "cancel", &queued.job_id, "--reason", "not needed"]).await;
    assert_eq!(cancel["job_id"], queued.job_id.as_str());
    assert!(artifacts.exists(&trainyard_common::artifacts::keys::cancel_marker(&queued.job_id)).await.unwrap());
    for remote in [false, true] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainyard"))
            .args(with(&["jobs", "cancel"], remote))
            .arg(&id)
            .env("TRAINYARD_DATABASE_URL", &server.db_url)
            .env("TRAINYARD_ARTIFACTS", server.artifacts_dir.path())
            .env("TRAINYARD_PREFIX", server.topo.prefix())
            .env("TRAINYARD_AMQP_URL", AMQP_URL)
            .env_remove("TRAINYARD_SERVER")
            .env_remove("TRAINYARD_TOKEN")
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "cancelling a finished job succeeded (remote: {remote}): {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("is already succeeded"), "{out:?}");
    }
    assert!(
        !artifacts.exists(&trainyard_common::artifacts::keys::cancel_marker(&id)).await.unwrap(),
        "no cancel marker for a finished job"
    );
    // An artifact the store cannot give (here: a torn metrics.json) is reported, not shown as a missing output.
    let broken = spec("intent-train", "bot-broken");
    publish_event(&ch, &server.topo, &JobEvent::queued(&broken)).await;
    eventually(20, "queued", || async { store.job(&broken.job_id).await.unwrap() }).await;
    let job_dir = server.artifacts_dir.path().join(format!("jobs/{}", broken.job_id));
    std::fs::create_dir_all(&job_dir).unwrap();
    std::fs::write(job_dir.join("metrics.json"), b"{\"accuracy\": 0.9, trunc").unwrap();
    let shown = cli(&server, &["jobs", "show", &broken.job_id]).await;
    assert!(shown["metrics"].is_null());
    assert!(shown["artifacts_error"].as_str().is_some_and(|e| e.contains("metrics.json")), "{shown}");
    assert!(cli(&server, &["jobs", "show", &id]).await.get("artifacts_error").is_none());

    // Retry a finished job: a new job with the same type, bot, params, tier and coalescing key
    // (the tier and key used to be dropped: an urgent job retried ran as a normal one).
    let retry = cli(&server, &["jobs", "retry", &id, "--server", &url, "--token", "admin-tok"]).await;
    assert_ne!(retry["job_id"], id.as_str());
    // Sent again while that retry is queued (a client's retry, a double click): the same job,
    // nothing published (a second job was made); by the CLI's own connection too.
    for remote in [true, false] {
        let args = with(&["jobs", "retry"], remote);
        let again = cli(&server, &args.iter().map(String::as_str).chain([id.as_str()]).collect::<Vec<_>>()).await;
        assert_eq!((&again["job_id"], &again["status"]), (&retry["job_id"], &serde_json::json!("queued")), "{again}");
    }
    let retries = trainyard::store::AuditFilter { action: Some("retry".into()), target: Some(id.clone()), ..Default::default() };
    assert_eq!(store.audit(&retries).await.unwrap().len(), 1, "one retry made");
    let new_job = eventually(20, "retry recorded", || async {
        store.job(retry["job_id"].as_str().unwrap()).await.unwrap().filter(|j| j.spec.is_some())
    })
    .await;
    assert!(new_job.trigger.clone().unwrap().source.contains(&id));
    let new_spec = new_job.spec.unwrap();
    assert_eq!(new_spec.priority, trainyard_common::job::Priority::High);
    assert_eq!(new_spec.coalesce_key, trained.coalesce_key);

    // Models: promote the trained job, list, roll back.
    let promoted = cli(&server, &["models", "promote", &id]).await;
    assert_eq!(promoted["job_id"], id.as_str());
    let models = cli(&server, &["models", "list", "--bot", "banking", "--server", &url, "--token", "admin-tok"]).await;
    assert_eq!(models["production"]["job_id"], id.as_str());
    let rolled = cli(&server, &["models", "rollback", "--bot", "banking"]).await;
    assert_eq!(rolled["production"], Value::Null);

    // Dead letters: list, then replay with a fresh attempt count.
    let dead = spec("noop", "bot-d");
    let mut h = FieldTable::default();
    headers::set_str(&mut h, headers::DEAD_REASON, "boom");
    headers::set_str(&mut h, headers::DEAD_KIND, "permanent");
    headers::set_int(&mut h, headers::ATTEMPT, 2);
    publish_raw(
        &ch,
        &server.topo.dead_exchange(),
        "noop",
        &msgpack(&dead),
        BasicProperties::default().with_content_type(codec::MSGPACK.into()).with_headers(h),
    )
    .await;
    eventually(20, "dead", || async { store.job(&dead.job_id).await.unwrap().filter(|j| j.status == JobStatus::Dead) }).await;
    let dlq = cli(&server, &["dlq", "list", "--type", "noop"]).await;
    assert_eq!(dlq.as_array().unwrap().len(), 1);
    assert_eq!(dlq[0]["job_id"], dead.job_id.as_str());
    assert_eq!(dlq[0]["reason"], "boom");
    // Drain the work queue of earlier jobs so the replayed one is easy to find.
    while ch.basic_get(server.topo.jobs_queue("noop").into(), BasicGetOptions { no_ack: true }).await.unwrap().is_some() {}
    let replay = cli(&server, &["dlq", "replay", &dead.job_id, "--server", &url, "--token", "admin-tok"]).await;
    assert_eq!(replay["replayed"], serde_json::json!([dead.job_id]));
    let msg = ch.basic_get(server.topo.jobs_queue("noop").into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("replayed job");
    let hdrs = msg.delivery.properties.headers().as_ref();
    assert_eq!(headers::attempt(hdrs), 1);
    assert!(headers::string(hdrs, headers::REPLAYED).is_some());
    assert!(headers::string(hdrs, headers::DEAD_REASON).is_none());
    let q = ch
        .queue_declare(
            server.topo.dead_queue("noop").into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
    let job =
        eventually(20, "queued again", || async { store.job(&dead.job_id).await.unwrap().filter(|j| j.status == JobStatus::Queued) }).await;
    assert_eq!(job.run, 1);
    assert!(cli(&server, &["dlq", "list"]).await.as_array().unwrap().is_empty());

    store.close().await;
    server.stop(&["noop", "intent-train"]).await;
}
