//! Promotion history, production pointer, compare-and-set and rollback.

use super::*;

#[test]
fn promotion_status_reads_the_gate_decision_of_a_result() {
    use serde_json::json;
    let cases = [
        (json!({"promotion": {"passed": true, "promoted": true}}), Some("promoted")),
        (json!({"promotion": {"passed": true, "promoted": false, "mode": "manual"}}), Some("held")),
        (json!({"promotion": {"passed": false, "promoted": false}}), Some("rejected")),
        (json!({"promotion": {"passed": false}}), Some("rejected")),
        (json!({"slept_ms": 5}), None),
        (json!({"promotion": "yes"}), None),
    ];
    for (result, want) in cases {
        assert_eq!(promotion_status(&result), want, "{result}");
        if let Some(w) = want {
            assert!(crate::metrics::PROMOTION_STATUSES.contains(&w));
        }
    }
}

fn entry(job: &str) -> ProductionEntry {
    ProductionEntry {
        bot: "b".into(),
        job_id: job.into(),
        model: model_prefix(job),
        metrics: serde_json::json!({"accuracy": 0.9}),
        promoted_at: Utc::now(),
        reason: "test".into(),
    }
}

#[tokio::test]
async fn promote_then_rollback_restores_previous() {
    let store = ArtifactStore::open("memory://").unwrap();
    assert_eq!(production(&store, "b").await.unwrap(), None);
    assert!(rollback(&store, "b", "x", None).await.is_err());
    set_production(&store, "b", entry("j1"), Replacing::Any).await.unwrap();
    set_production(&store, "b", entry("j2"), Replacing::Any).await.unwrap();
    set_production(&store, "b", entry("j3"), Replacing::Any).await.unwrap();
    assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, "j3");
    assert_eq!(rollback(&store, "b", "bad", None).await.unwrap().unwrap().job_id, "j2");
    assert_eq!(rollback(&store, "b", "bad too", None).await.unwrap().unwrap().job_id, "j1");
    assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, "j1");
    assert_eq!(rollback(&store, "b", "none left", None).await.unwrap(), None);
    assert_eq!(production(&store, "b").await.unwrap(), None);
    let h = history(&store, "b").await.unwrap();
    assert_eq!(h.records.len(), 6);
    assert_eq!(h.records[3].action, PromotionAction::Rollback);
    assert_eq!(h.records[3].from.as_deref(), Some("j3"));
}

/// A promote of the model already in production writes nothing, so one rollback after a
/// promote sent twice restores the model before it (it restored the same one: j2, j2).
#[tokio::test]
async fn promoting_the_production_model_again_changes_nothing() {
    let store = ArtifactStore::open("memory://").unwrap();
    assert_eq!(set_production(&store, "b", entry("j1"), Replacing::Any).await.unwrap(), Promotion::Made);
    assert_eq!(set_production(&store, "b", entry("j2"), Replacing::Any).await.unwrap(), Promotion::Made);
    assert_eq!(
        set_production(&store, "b", entry("j2"), Replacing::Any).await.unwrap(),
        Promotion::AlreadyProduction,
        "already in production"
    );
    assert_eq!(history(&store, "b").await.unwrap().records.len(), 2);
    // A pointer left behind its history (a writer that failed after its record) is set
    // right by the promote that finds the record already there.
    store.put_json(&keys::production("b"), &entry("j1")).await.unwrap();
    assert_eq!(set_production(&store, "b", entry("j2"), Replacing::Any).await.unwrap(), Promotion::AlreadyProduction);
    assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, "j2");
    assert_eq!(rollback(&store, "b", "bad", None).await.unwrap().unwrap().job_id, "j1");
    // Once rolled back, the same model can be promoted again.
    assert_eq!(set_production(&store, "b", entry("j2"), Replacing::Any).await.unwrap(), Promotion::Made);
    assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, "j2");
}

/// A promotion that may replace only the model its gate compared with writes nothing when
/// another was made production meanwhile (it replaced it unseen: a worse model could win).
#[tokio::test]
async fn a_gated_promotion_replaces_only_the_model_it_was_compared_with() {
    let store = ArtifactStore::open("memory://").unwrap();
    assert_eq!(set_production(&store, "b", entry("j1"), Replacing::Only(Some("j0"))).await.unwrap(), Promotion::Moved { production: None });
    assert_eq!(set_production(&store, "b", entry("j1"), Replacing::Only(None)).await.unwrap(), Promotion::Made);
    // j2's gate compared with j1; j3 was promoted before j2's promotion.
    assert_eq!(set_production(&store, "b", entry("j3"), Replacing::Only(Some("j1"))).await.unwrap(), Promotion::Made);
    let moved = set_production(&store, "b", entry("j2"), Replacing::Only(Some("j1"))).await.unwrap();
    assert_eq!(moved, Promotion::Moved { production: Some("j3".into()) });
    assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, "j3");
    assert_eq!(history(&store, "b").await.unwrap().records.len(), 2, "nothing written for the moved one");
    // Compared with j3 now: it replaces it; and a retry of it finds itself in production.
    assert_eq!(set_production(&store, "b", entry("j2"), Replacing::Only(Some("j3"))).await.unwrap(), Promotion::Made);
    let again = set_production(&store, "b", entry("j2"), Replacing::Only(Some("j3"))).await.unwrap();
    assert_eq!(again, Promotion::AlreadyProduction);
}

/// A rollback from a named model goes back once: sent twice (a retried request, two
/// operators), the second is refused (it went back two models, and from the second model
/// to none at all).
#[tokio::test]
async fn a_rollback_from_a_named_model_goes_back_once() {
    let store = ArtifactStore::open("memory://").unwrap();
    for j in ["j1", "j2"] {
        set_production(&store, "b", entry(j), Replacing::Any).await.unwrap();
    }
    assert_eq!(rollback(&store, "b", "bad", Some("j2")).await.unwrap().unwrap().job_id, "j1");
    let twice = rollback(&store, "b", "bad", Some("j2")).await.unwrap_err();
    assert!(matches!(&twice, CommonError::ProductionMoved { current: Some(c), .. } if c == "j1"), "{twice}");
    assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, "j1");
    assert_eq!(history(&store, "b").await.unwrap().records.len(), 3, "one rollback recorded");
}

#[tokio::test]
async fn promote_job_needs_a_model() {
    let store = ArtifactStore::open("memory://").unwrap();
    assert!(promote_job(&store, "b", "nope", "by hand").await.is_err());
    store.put("jobs/j9/model/model.bin", "x").await.unwrap();
    // A model without its config (its job stopped while writing it) is not complete.
    assert!(matches!(promote_job(&store, "b", "j9", "by hand").await, Err(CommonError::ModelMissing { .. })));
    store.put("jobs/j9/model/config.json", "{}").await.unwrap();
    store.put_json(&metrics_key("j9"), &serde_json::json!({"accuracy": 0.5, "per_class": {}})).await.unwrap();
    let (e, made) = promote_job(&store, "b", "j9", "by hand").await.unwrap();
    assert!(made);
    assert_eq!(e.metrics, serde_json::json!({"accuracy": 0.5}));
    assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, "j9");
    let (again, made) = promote_job(&store, "b", "j9", "by hand, twice").await.unwrap();
    assert!(!made, "already production");
    assert_eq!((again.promoted_at, again.reason.as_str()), (e.promoted_at, "by hand"), "the entry as first promoted");
}

/// `n` promoters of one bot at once, each promoting its own job: every promotion is in
/// the history, and the production pointer is the last one recorded.
async fn concurrent_promotions_are_all_recorded(store: ArtifactStore) {
    let n = 8;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (store, start) = (store.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                set_production(&store, "b", entry(&format!("j{i}")), Replacing::Any).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let h = history(&store, "b").await.unwrap();
    let mut promoted: Vec<String> = h.records.iter().filter_map(|r| r.to.as_ref().map(|e| e.job_id.clone())).collect();
    let last = promoted.last().cloned().unwrap();
    assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, last, "the pointer is the last record");
    promoted.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("j{i}")).collect();
    want.sort();
    assert_eq!(promoted, want, "every promotion is in the history once");
    // Each record names the production model it replaced: the one recorded before it.
    for w in h.records.windows(2) {
        assert_eq!(w[1].from.as_deref(), w[0].to.as_ref().map(|e| e.job_id.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_promotions_lose_no_record_in_memory() {
    for _ in 0..20 {
        concurrent_promotions_are_all_recorded(ArtifactStore::open("memory://").unwrap()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_promotions_lose_no_record_in_a_local_directory() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        concurrent_promotions_are_all_recorded(ArtifactStore::open(dir.path().to_str().unwrap()).unwrap()).await;
    }
}

/// A rollback whose record was kept though its create's reply was lost rolls back once: taken
/// for another writer's record, it popped a second model and the bot had none.
#[tokio::test]
async fn a_record_kept_though_its_reply_was_lost_is_not_written_again() {
    let lossy = std::sync::Arc::new(crate::artifacts::faulty::Faulty::default());
    let store = ArtifactStore::from_object_store(lossy.clone());
    set_production(&store, "b", entry("j1"), Replacing::Any).await.unwrap();
    set_production(&store, "b", entry("j2"), Replacing::Any).await.unwrap();
    lossy.lose_create_reply.store(true, std::sync::atomic::Ordering::SeqCst);
    let back = rollback(&store, "b", "r", None).await.unwrap();
    assert_eq!(back.map(|e| e.job_id), Some("j1".to_string()));
    assert_eq!(history(&store, "b").await.unwrap().records.len(), 3, "one rollback record");
    assert_eq!(production(&store, "b").await.unwrap().map(|e| e.job_id), Some("j1".to_string()));
}

/// A pointer left behind its history (the writer failed between its record and the pointer)
/// does not refuse a rollback: the history says which model is production.
#[tokio::test]
async fn a_rollback_follows_the_history_when_the_pointer_was_left_behind() {
    let store = ArtifactStore::open("memory://").unwrap();
    set_production(&store, "b", entry("j1"), Replacing::Any).await.unwrap();
    set_production(&store, "b", entry("j2"), Replacing::Any).await.unwrap();
    store.delete(&keys::production("b")).await.unwrap();
    let back = rollback(&store, "b", "r", None).await.unwrap();
    assert_eq!(back.map(|e| e.job_id), Some("j1".to_string()));
    assert_eq!(production(&store, "b").await.unwrap().map(|e| e.job_id), Some("j1".to_string()));
}
